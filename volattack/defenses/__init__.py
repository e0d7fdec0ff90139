"""Defences: VAFT training losses (:mod:`volattack.defenses.vaft`), input-transform defences
(:mod:`volattack.defenses.transforms`, registered by name in :mod:`volattack.defenses.registry`)
and their BPDA / EOT adaptive evaluation (:mod:`volattack.defenses.adaptive`).

Names are loaded lazily on first access, so importing this package stays light.
"""

from __future__ import annotations

from volattack.registry import lazy_exports

_LAZY = {
    "frequency_consistency_loss": "volattack.defenses.vaft",
    "logits_dct": "volattack.defenses.vaft",
    "VAFTLoss": "volattack.defenses.vaft",
    "vaft_objective": "volattack.defenses.vaft",
    "AdaptiveModel": "volattack.defenses.adaptive",
    "DefendedModel": "volattack.defenses.adaptive",
    "EOTModel": "volattack.defenses.adaptive",
    "adaptive_wrapper": "volattack.defenses.adaptive",
    "BPDA_MODES": "volattack.defenses.transforms",
    "DCTLowPass": "volattack.defenses.transforms",
    "DCTQuantization": "volattack.defenses.transforms",
    "GaussianSmoothing": "volattack.defenses.transforms",
    "InputTransform": "volattack.defenses.transforms",
    "MedianFilter": "volattack.defenses.transforms",
    "RandomNoise": "volattack.defenses.transforms",
    "build_defense": "volattack.defenses.registry",
    "describe_defense": "volattack.defenses.registry",
    "list_defenses": "volattack.defenses.registry",
    "register_defense": "volattack.defenses.registry",
    "reseed_defense": "volattack.defenses.registry",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
