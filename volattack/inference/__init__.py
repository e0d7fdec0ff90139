"""Inference: sliding-window inference whose input gradient is exact and computed window by
window (:class:`~volattack.inference.sliding.WindowedInferer`), shared by evaluation, training
validation and the attacks."""

from __future__ import annotations

from typing import Sequence

from volattack.inference.sliding import WindowedInferer


def make_inferer(roi: Sequence[int], sw_batch_size: int, overlap: float, cval: float = 0.0) -> WindowedInferer:
    """Gaussian-weighted sliding-window inferer with exact, memory-bounded input gradients
    (:class:`~volattack.inference.sliding.WindowedInferer`, MONAI's windowing).

    Args:
        roi: window size in voxels.
        sw_batch_size: windows per forward pass.
        overlap: window overlap in [0, 1).
        cval: value that pads a volume smaller than the window; pass ``b_min`` (air), the value
            training pads crops with, so the model sees what it was trained on.
    """
    return WindowedInferer(roi_size=list(roi), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
                           cval=float(cval))


__all__ = ["WindowedInferer", "make_inferer"]
