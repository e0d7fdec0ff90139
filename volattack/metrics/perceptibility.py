"""Perceptibility of a perturbation: norms in input and source units, PSNR, 3D SSIM.

Attacks are compared at matched *measured* budgets (L-inf, RMS, SSIM), not at nominal
parameters. The definitions live in :mod:`volattack.measure` (one SSIM, one set of norms,
also what every attack reports in ``AttackResult.info``); this module re-exports them so that
``volattack.metrics.ssim3d`` and ``volattack.metrics.perturbation_stats`` are the same functions.
"""

from __future__ import annotations

from volattack.measure import perturbation_stats, ssim3d

__all__ = ["perturbation_stats", "ssim3d"]
