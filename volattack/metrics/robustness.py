"""Robustness metrics: Dice drop, fooling rate and voxel flip rate.

They compare a model's clean and adversarial results case by case; nothing is
pooled over the batch except :func:`fooling_rate`, which is by definition a
fraction of cases.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from volattack.metrics.segmentation import _as_label_map

__all__ = ["dice_drop", "fooling_rate", "voxel_flip_rate"]

logger = logging.getLogger(__name__)


def _as_scores(x: torch.Tensor, name: str) -> torch.Tensor:
    """Per-case scores as a floating tensor (array-likes such as lists are converted)."""
    t = torch.as_tensor(x)
    if t.is_complex():
        raise ValueError(f"{name} must hold real Dice values, got dtype {t.dtype}.")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _check_same_shape(clean: torch.Tensor, adv: torch.Tensor) -> None:
    if clean.shape != adv.shape:
        raise ValueError(
            f"clean and adv must have the same shape, got clean {tuple(clean.shape)} and adv {tuple(adv.shape)}."
        )


def dice_drop(clean: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute and relative Dice drop caused by an attack, element by element.

    Definition::

        absolute = clean - adv
        relative = (clean - adv) / clean      (NaN where clean == 0)

    Positive values mean the attack lowered Dice. NaN inputs (classes absent from
    both maps, see :func:`~volattack.metrics.segmentation.dice_per_class`) give
    NaN outputs. "Fooling rate" in the VAFA thesis means this Dice drop.

    Args:
        clean: Dice on clean inputs (per case ``(B,)`` or per case and class ``(B, K-1)``).
        adv: Dice on adversarial inputs, same shape as ``clean``.

    Shape:
        clean, adv: any shape, identical (typically ``(B,)`` or ``(B, K-1)``).
        Output: two tensors of that shape, floating; ``absolute`` in Dice units
        (fraction of 1), ``relative`` as a fraction of the clean Dice.

    Raises:
        ValueError: shapes differ.
    """
    c = _as_scores(clean, "clean")
    a = _as_scores(adv, "adv")
    _check_same_shape(c, a)
    absolute = c - a
    relative = torch.where(c == 0, torch.full_like(absolute, float("nan")), absolute / c)
    return absolute, relative


def fooling_rate(clean: torch.Tensor, adv: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of cases whose Dice falls by at least ``threshold`` relative to clean.

    Definition: over the valid cases ``V`` (clean Dice finite and non-zero, adversarial
    Dice not NaN)::

        fooling_rate = |{i in V : (clean_i - adv_i) / clean_i >= threshold}| / |V|

    Cases with clean Dice 0 or NaN are excluded (there is nothing left to fool),
    as are cases with NaN adversarial Dice. Computed in float64. Returns NaN, with a
    warning, when no case is valid. Every element counts as one case, so a
    ``(B, K-1)`` per-class input gives the fraction of (case, class) pairs.

    Args:
        clean: per-case Dice on clean inputs (e.g. ``mean_foreground_dice``);
            array-likes such as lists are converted.
        adv: per-case Dice on adversarial inputs, same shape as ``clean``.
        threshold: relative Dice drop that counts as fooled, in (0, 1].

    Shape:
        clean, adv: ``(N,)`` (any identical shape is flattened).
        Output: a Python float in [0, 1] (or NaN), unitless.

    Raises:
        ValueError: ``threshold`` outside (0, 1], shapes differ.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
    c = _as_scores(clean, "clean")
    a = _as_scores(adv, "adv")
    _check_same_shape(c, a)
    c, a = c.double().flatten(), a.double().flatten()
    valid = torch.isfinite(c) & (c != 0) & ~torch.isnan(a)
    n_valid = int(valid.sum())
    if n_valid == 0:
        warnings.warn(
            f"fooling_rate: none of the {c.numel()} cases has a finite non-zero clean Dice; returning NaN.",
            stacklevel=2,
        )
        return math.nan
    relative = (c[valid] - a[valid]) / c[valid]
    n_fooled = int((relative >= threshold).sum())
    logger.debug("fooling_rate: %d of %d valid cases fooled (%d excluded)", n_fooled, n_valid, c.numel() - n_valid)
    return n_fooled / n_valid


def voxel_flip_rate(pred_clean: torch.Tensor, pred_adv: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Fraction of relevant voxels whose predicted class the attack changed, per sample.

    Definition, with U = {voxels where pred_clean > 0 or label > 0} (union of the
    clean-predicted foreground and the true foreground)::

        flip_rate[b] = |{v in U : pred_adv[v] != pred_clean[v]}| / |U|

    NaN when U is empty. Voxels outside U (background in both the clean
    prediction and the label) are not counted, so the rate is not diluted by the
    usually huge background.

    Args:
        pred_clean: predicted class indices on the clean input.
        pred_adv: predicted class indices on the adversarial input.
        label: ground-truth class indices.

    Shape:
        pred_clean, pred_adv, label: ``(B, 1, *spatial)`` or ``(B, *spatial)``, identical.
        Output: ``(B,)`` float32, a fraction in [0, 1] or NaN.

    Raises:
        ValueError: shapes differ, or a map holds non-integer values.
    """
    named = (("pred_clean", pred_clean), ("pred_adv", pred_adv), ("label", label))
    shapes = {name: tuple(t.shape) for name, t in named}
    if len(set(shapes.values())) != 1:
        raise ValueError(
            "pred_clean, pred_adv and label must have the same shape, got "
            + ", ".join(f"{k} {v}" for k, v in shapes.items())
            + "."
        )
    pc = _as_label_map(pred_clean, "pred_clean")
    pa = _as_label_map(pred_adv, "pred_adv")
    g = _as_label_map(label, "label")
    union = ((pc > 0) | (g > 0)).flatten(1)
    flipped = (pc != pa).flatten(1) & union
    n_union = union.sum(1).double()
    rate = flipped.sum(1).double() / n_union.clamp_min(1.0)
    return torch.where(n_union == 0, torch.full_like(rate, float("nan")), rate).float()
