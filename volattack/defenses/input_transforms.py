"""Input-transform defences and their adaptive evaluation (BPDA and EOT): the names of
:mod:`volattack.defenses.transforms` (the registered transforms) and
:mod:`volattack.defenses.adaptive` (``DefendedModel``, ``EOTModel``, ``AdaptiveModel``,
``adaptive_wrapper``), kept importable from here."""

from __future__ import annotations

from volattack.defenses.adaptive import AdaptiveModel, DefendedModel, EOTModel, adaptive_wrapper
from volattack.defenses.transforms import (
    BPDA_MODES,
    DCTLowPass,
    DCTQuantization,
    GaussianSmoothing,
    InputTransform,
    MedianFilter,
    RandomNoise,
)

__all__ = [
    "BPDA_MODES",
    "AdaptiveModel",
    "DCTLowPass",
    "DCTQuantization",
    "DefendedModel",
    "EOTModel",
    "GaussianSmoothing",
    "InputTransform",
    "MedianFilter",
    "RandomNoise",
    "adaptive_wrapper",
]
