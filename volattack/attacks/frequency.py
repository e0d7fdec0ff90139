"""Frequency-domain attacks, one module each: VAFA (:mod:`volattack.attacks.vafa`, Hanif et al.,
MICCAI 2023), SA^2 (:mod:`volattack.attacks.sa2`, Hanif et al., ISBI 2025) and the 3D FFT attack
(:mod:`volattack.attacks.fft`), on the shared :class:`~volattack.attacks.spectral_base.SpectralAttack`.

This module keeps the 0.1 import path ``volattack.attacks.frequency`` of their public classes;
importing it registers ``vafa``, ``sa2`` and ``fft``.
"""

from volattack.attacks.fft import FFTAttack
from volattack.attacks.sa2 import SA2
from volattack.attacks.spectral_base import PatchSSIM, SpectralAttack
from volattack.attacks.vafa import VAFA, slice_minmax

__all__ = ["FFTAttack", "PatchSSIM", "SA2", "SpectralAttack", "VAFA", "slice_minmax"]
