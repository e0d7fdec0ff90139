"""Validation during training, by exactly the evaluation's rule, so the checkpoint kept as
``best.pt`` is the best by the number the evaluation reports.

- Inference: :func:`volattack.inference.make_inferer` (gaussian-weighted sliding windows, the
  volume padded with ``b_min`` when smaller than the window), in float32.
- Dice: :func:`volattack.metrics.mean_foreground_dice` per case: a foreground class absent from
  the ground truth but predicted scores 0 (a hallucinated organ counts against the model), a
  class absent from both is skipped (``nan``), and a case with no class present in either is
  ``nan``.
- Aggregation: the mean over the cases with a finite Dice (``nan`` if there are none), as the
  evaluation's summary averages its per-case Dice.

Under DDP every rank scores its share of the cases; one all-reduce of (sum, count) gives every
rank the same mean over all cases.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from volattack.distributed import DistContext, all_sum
from volattack.inference import make_inferer
from volattack.metrics import mean_foreground_dice
from volattack.training.data import as_tensor


@torch.no_grad()
def validation_logits(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    cval: float = 0.0,
) -> torch.Tensor:
    """Logits of ``model`` on whole volumes, as the evaluation computes them: the gaussian
    sliding-window inferer of :func:`volattack.inference.make_inferer`, float32, no autocast.

    Args:
        model: network mapping images to logits (put it in eval mode first).
        image: ``(B, C, H, W, D)`` volumes in the model's input range.
        roi_size: window size in voxels.
        sw_batch_size: windows per forward pass.
        overlap: window overlap fraction in [0, 1).
        cval: value padding volumes smaller than the window (``b_min``).

    Shape:
        ``(B, C, H, W, D)`` -> ``(B, K, H, W, D)``.
    """
    inferer = make_inferer(roi_size, sw_batch_size, overlap, cval=cval)
    with torch.autocast(image.device.type, enabled=False):
        return as_tensor(inferer(image, model)).float()


@torch.no_grad()
def validation_dice(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    num_classes: int,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: Union[str, torch.device] = "cpu",
    cval: float = 0.0,
    *,
    ctx: Optional[DistContext] = None,
) -> float:
    """Mean foreground Dice of ``model`` over whole validation volumes (see the module docstring).

    Per case: ``mean_foreground_dice(argmax(validation_logits(image)), label, K)``; the result is
    the mean over cases with a finite value, over every rank's cases when ``ctx`` is a
    multi-rank context (every rank must call it; each passes a loader of its own share).

    Args:
        model: network mapping images to logits; evaluated in eval mode, mode restored.
        loader: iterable of dict batches with ``"image"`` (B, C, H, W, D) and ``"label"``
            (B, 1, H, W, D) integer class indices (eval transforms, whole volumes).
        num_classes: K, classes including background.
        roi_size: sliding-window size in voxels.
        sw_batch_size: windows per forward pass.
        overlap: window overlap fraction in [0, 1).
        device: where to run the model.
        cval: value padding volumes smaller than the window (``b_min``, as training pads crops).
        ctx: the distributed context (None: a single process).

    Returns:
        Mean foreground Dice in [0, 1], or ``nan`` when no case has a foreground class in its
        ground truth or prediction (or there is no case).

    Shape:
        image (B, C, H, W, D), label (B, 1, H, W, D) -> scalar.
    """
    device = torch.device(device)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of finite case Dice, their number
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            image = as_tensor(batch["image"]).to(device)
            label = as_tensor(batch["label"]).to(device).long()
            logits = validation_logits(model, image, roi_size, sw_batch_size, overlap, cval)
            dice = mean_foreground_dice(logits.argmax(dim=1, keepdim=True), label, num_classes).double()
            finite = ~torch.isnan(dice)
            total += torch.stack([dice[finite].sum(), finite.sum().double()])
    finally:
        model.train(was_training)
    if ctx is not None:
        total = all_sum(ctx, total)
    return float(total[0] / total[1]) if float(total[1]) > 0 else math.nan
