"""Defences: VAFT training losses (:mod:`volattack.defenses.vaft`) and input-transform defences
with BPDA / EOT adaptive evaluation (:mod:`volattack.defenses.input_transforms`).

Names are loaded lazily on first access, so importing this package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "frequency_consistency_loss": "volattack.defenses.vaft",
    "logits_dct": "volattack.defenses.vaft",
    "VAFTLoss": "volattack.defenses.vaft",
    "vaft_objective": "volattack.defenses.vaft",
    "AdaptiveModel": "volattack.defenses.input_transforms",
    "BPDA_MODES": "volattack.defenses.input_transforms",
    "DCTLowPass": "volattack.defenses.input_transforms",
    "DCTQuantization": "volattack.defenses.input_transforms",
    "DefendedModel": "volattack.defenses.input_transforms",
    "EOTModel": "volattack.defenses.input_transforms",
    "GaussianSmoothing": "volattack.defenses.input_transforms",
    "InputTransform": "volattack.defenses.input_transforms",
    "MedianFilter": "volattack.defenses.input_transforms",
    "RandomNoise": "volattack.defenses.input_transforms",
    "adaptive_wrapper": "volattack.defenses.input_transforms",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'volattack.defenses' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
