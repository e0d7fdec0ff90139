"""The registered input-transform defences (``@register_defense``), one module per family:
:mod:`~volattack.defenses.transforms.smoothing` (``gaussian``, ``median``),
:mod:`~volattack.defenses.transforms.dct` (``dct_lowpass``, ``dct_quant``),
:mod:`~volattack.defenses.transforms.noise` (``noise``), on the base class of
:mod:`~volattack.defenses.transforms.base`.

Every module of this package is imported here, so a new defence is one new file with one
``@register_defense(name)`` class (and its test); the evaluation config then accepts the name.
"""

from __future__ import annotations

from volattack.registry import import_submodules

from volattack.defenses.transforms.base import BPDA_MODES, BPDAMixin, InputTransform, check_bpda, check_images
from volattack.defenses.transforms.dct import DCTLowPass, DCTQuantization
from volattack.defenses.transforms.noise import RandomNoise
from volattack.defenses.transforms.smoothing import GaussianSmoothing, MedianFilter

import_submodules(__name__, __path__)  # every file registers its extensions on import

__all__ = [
    "BPDAMixin",
    "BPDA_MODES",
    "DCTLowPass",
    "DCTQuantization",
    "GaussianSmoothing",
    "InputTransform",
    "MedianFilter",
    "RandomNoise",
    "check_bpda",
    "check_images",
]
