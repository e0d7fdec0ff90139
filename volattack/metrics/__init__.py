"""Per-case metrics: segmentation quality, robustness to attacks, perceptibility.

All functions take torch tensors (CPU or GPU), score every sample on its own
(results of shape ``(B,)`` or ``(B, K - 1)``) and never pool over the batch,
except :func:`fooling_rate`, which is a fraction of cases by definition.
This package never imports :mod:`volattack.evaluation` (data flows one way).
"""

from volattack.metrics.perceptibility import perturbation_stats, ssim3d
from volattack.metrics.robustness import dice_drop, fooling_rate, voxel_flip_rate
from volattack.metrics.segmentation import dice_per_class, hd95, mean_foreground_dice

__all__ = [
    "dice_per_class",
    "mean_foreground_dice",
    "hd95",
    "dice_drop",
    "fooling_rate",
    "voxel_flip_rate",
    "perturbation_stats",
    "ssim3d",
]
