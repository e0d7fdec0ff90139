"""Per-case, per-class segmentation metrics: foreground Dice, HD95 and NSD (in mm).

Every function takes integer label maps of shape ``(B, 1, *spatial)`` or
``(B, *spatial)`` (CPU or GPU tensors), scores each sample on its own (nothing is
pooled over the batch) and returns one value per sample and foreground class,
shape ``(B, num_classes - 1)``: column ``j`` is class ``j + 1``; background
(class 0) is never scored.

Published volumetric attack papers average Dice *including* background and
report HD95 in voxels; volattack reports foreground classes only, with the rules
for absent classes stated below, and HD95 in millimetres when a spacing is given.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Sequence

import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

__all__ = ["dice_per_class", "mean_foreground_dice", "hd95", "nsd"]

logger = logging.getLogger(__name__)

# Number of (case, class) pairs handed to MONAI's Hausdorff distance in one call;
# bounds the memory of the temporary binary masks (MONAI loops over pairs anyway).
_HD_PAIRS_PER_CALL = 8


def _as_label_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check one integer label map and return it as ``(B, *spatial)`` int64.

    A singleton dimension 1 is taken as the channel dimension and removed when the
    tensor has at least 3 dimensions. Floating tensors are accepted when every
    value is a whole number (MONAI's ``LoadImage`` returns float label maps).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (B, 1, *spatial) or (B, *spatial), got {tuple(x.shape)}.")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}.")
    if x.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {x.dtype}.")
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()) or not bool((x == x.round()).all()):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values (dtype {x.dtype}).")
    if x.ndim >= 3 and x.shape[1] == 1:
        x = x[:, 0]
    return x.long()


def _check_pair(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``pred``/``label``/``num_classes``; return both maps as ``(B, *spatial)`` int64."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background + at least one class), got {num_classes}.")
    if not isinstance(pred, torch.Tensor) or not isinstance(label, torch.Tensor):
        raise TypeError(
            f"pred and label must be torch.Tensors, got {type(pred).__name__} and {type(label).__name__}."
        )
    if pred.shape != label.shape:
        raise ValueError(
            f"pred and label must have the same shape, got pred {tuple(pred.shape)} and label {tuple(label.shape)}."
        )
    if pred.device != label.device:
        raise ValueError(f"pred and label must be on the same device, got {pred.device} and {label.device}.")
    maps = []
    for name, x in (("pred", pred), ("label", label)):
        m = _as_label_map(x, name)
        lo, hi = int(m.min()), int(m.max())
        if hi >= num_classes:
            raise ValueError(
                f"{name} values must be in [0, {num_classes - 1}] for num_classes={num_classes}, got max {hi}."
            )
        if lo < 0:
            raise ValueError(f"{name} values must be in [0, {num_classes - 1}] (class indices), got min {lo}.")
        maps.append(m)
    return maps[0], maps[1]


def _class_counts(m: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxel count of every class in every sample: ``(B, *spatial)`` -> ``(B, num_classes)`` int64."""
    b = m.shape[0]
    offset = torch.arange(b, device=m.device).view(-1, *([1] * (m.ndim - 1))) * num_classes
    return torch.bincount((m + offset).flatten(), minlength=b * num_classes).view(b, num_classes)


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice similarity coefficient of every foreground class, per sample.

    Definition (Dice 1945; Soerensen 1948), for sample ``b`` and class ``c`` in
    ``1 .. num_classes - 1`` with P = {voxels where pred == c} and G = {voxels
    where label == c}::

        Dice[b, c - 1] = 2 |P n G| / (|P| + |G|)

    Rule for a class absent from the ground truth (|G| = 0):

    * absent from the prediction too (|P| = 0): ``NaN`` -- nothing to segment,
      the class is left out of means (``torch.nanmean``);
    * present in the prediction (|P| > 0): ``0.0`` -- a false-positive organ is
      an error.

    A class present in the ground truth but absent from the prediction scores
    ``0.0``. Computed exactly from voxel counts (one ``bincount`` per map, no
    one-hot tensor), so it is independent of the other samples in the batch.

    Args:
        pred: predicted class indices (e.g. ``logits.argmax(1, keepdim=True)``).
        label: ground-truth class indices, same shape as ``pred``.
        num_classes: number of classes K including background (>= 2).

    Shape:
        pred, label: ``(B, 1, *spatial)`` or ``(B, *spatial)``, integer values in
        ``[0, K - 1]`` (floating tensors with whole-number values are accepted).
        Output: ``(B, K - 1)`` float32 on the input device, unitless in [0, 1] or NaN.

    Raises:
        ValueError: shapes differ, a value is outside ``[0, K - 1]``, ``num_classes < 2``.
    """
    p, g = _check_pair(pred, label, num_classes)
    b = p.shape[0]
    count_p = _class_counts(p, num_classes)
    count_g = _class_counts(g, num_classes)
    offset = torch.arange(b, device=p.device).view(-1, *([1] * (p.ndim - 1))) * num_classes
    agree = p == g
    inter = torch.bincount((g + offset)[agree], minlength=b * num_classes).view(b, num_classes)
    inter, count_p, count_g = inter[:, 1:], count_p[:, 1:], count_g[:, 1:]
    denom = (count_p + count_g).double()
    dice = 2.0 * inter.double() / denom.clamp_min(1.0)
    dice = torch.where(denom == 0, torch.full_like(dice, float("nan")), dice)
    return dice.float()


def mean_foreground_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean Dice over the foreground classes of each sample, ignoring NaN classes.

    Definition: ``nanmean_c dice_per_class(pred, label, K)[b, c]`` -- the mean over
    classes ``1 .. K - 1`` that are present in the ground truth or the prediction
    (see :func:`dice_per_class` for the absent-class rule). ``NaN`` when every
    class is absent from both (an all-background sample predicted all-background).
    Background is never included (unlike the papers' 14-class Dice).

    Args:
        pred: predicted class indices.
        label: ground-truth class indices, same shape as ``pred``.
        num_classes: number of classes K including background (>= 2).

    Shape:
        pred, label: ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        Output: ``(B,)`` float32, unitless in [0, 1] or NaN.

    Raises:
        ValueError: as :func:`dice_per_class`.
    """
    return torch.nanmean(dice_per_class(pred, label, num_classes), dim=1)


def _check_spacing(spacing: Sequence[float] | None, spatial_dims: int) -> list[float] | None:
    """Validate ``spacing`` (one positive finite value per spatial dimension) and return it as floats."""
    if spacing is None:
        return None
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Sequence):
        try:
            spacing = list(spacing)  # type: ignore[arg-type]  # numpy arrays and other iterables
        except TypeError:
            raise ValueError(
                f"spacing must be a sequence of {spatial_dims} positive numbers (one per spatial dimension), "
                f"got {spacing!r}."
            ) from None
    if len(spacing) != spatial_dims:
        raise ValueError(
            f"spacing must have one value per spatial dimension ({spatial_dims}), got {list(spacing)} "
            f"(length {len(spacing)})."
        )
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise ValueError(f"spacing values must be numbers, got {list(spacing)}.") from None
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be positive and finite, got {values}.")
    return values


def _hd95_of_pairs(p: torch.Tensor, g: torch.Tensor, bi: torch.Tensor, ci: torch.Tensor,
                   sp: list[float] | None) -> torch.Tensor:
    """MONAI's HD95 of the (sample ``bi``, class ``ci + 1``) pairs, one batched call.

    Shape:
        p, g ``(B, *spatial)``; bi, ci ``(N,)`` -> ``(N,)``.
    """
    cls = (ci + 1).view(-1, *([1] * (p.ndim - 1)))
    mask_p = (p[bi] == cls).unsqueeze(1)
    mask_g = (g[bi] == cls).unsqueeze(1)
    with warnings.catch_warnings():
        # MONAI >= 1.5 warns about its own internal use of a deprecated argument on every call.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        dist = compute_hausdorff_distance(
            mask_p, mask_g, include_background=True, percentile=95,
            spacing=None if sp is None else [list(sp) for _ in range(int(bi.numel()))],
        )
    return dist[:, 0]


def hd95(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance of every foreground class, per sample.

    Definition (Huttenlocher et al. 1993, robust 95th percentile as in MONAI's
    ``compute_hausdorff_distance(percentile=95)``): with S_P and S_G the surface
    voxels of the predicted and true masks of class ``c`` (voxels of the mask
    removed by one binary erosion), d(A -> B) the Euclidean distances (with the
    voxel ``spacing``) from each voxel centre of A to the nearest voxel centre of
    B, and P95 the 95th percentile (linear interpolation)::

        HD95[b, c - 1] = max( P95 d(S_P -> S_G), P95 d(S_G -> S_P) )

    Units: millimetres when ``spacing`` is given in mm per voxel (e.g. the NIfTI
    pixdim); **voxel units** (spacing 1 along every axis) when ``spacing`` is None.

    Rules for absent classes:

    * absent from both prediction and ground truth: ``NaN`` (not counted in means);
    * absent from exactly one of them (a missed organ or a false-positive organ;
      MONAI would return ``inf``): the **image diagonal** as a worst-case
      penalty, ``sqrt(sum_i ((n_i - 1) * spacing_i) ** 2)`` for a volume of
      ``n_i`` voxels along axis ``i`` -- the largest distance between two voxel
      centres of the volume, hence an upper bound of every finite HD95 on it.
      Means therefore stay finite and penalise erased or hallucinated organs.

    Args:
        pred: predicted class indices.
        label: ground-truth class indices, same shape as ``pred``.
        num_classes: number of classes K including background (>= 2).
        spacing: voxel size along each spatial dimension (mm), same order as the
            spatial axes; ``None`` for voxel units.

    Shape:
        pred, label: ``(B, 1, *spatial)`` or ``(B, *spatial)`` with 2 or 3 spatial dims.
        Output: ``(B, K - 1)`` float32 on the input device, in mm (voxels when
        ``spacing`` is None), NaN where the class is absent from both maps.

    Raises:
        ValueError: shapes differ, a value is outside ``[0, K - 1]``, ``num_classes < 2``,
            ``len(spacing)`` differs from the number of spatial dimensions, or a
            spacing value is not positive.
    """
    p, g = _check_pair(pred, label, num_classes)
    spatial = tuple(p.shape[1:])
    if len(spatial) not in (2, 3):
        raise ValueError(f"hd95 needs 2 or 3 spatial dimensions, got pred/label of shape {tuple(pred.shape)}.")
    sp = _check_spacing(spacing, len(spatial))
    step = sp if sp is not None else [1.0] * len(spatial)
    diagonal = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(spatial, step)))

    has_p = _class_counts(p, num_classes)[:, 1:] > 0
    has_g = _class_counts(g, num_classes)[:, 1:] > 0
    out = torch.full(has_p.shape, float("nan"), dtype=torch.float32, device=p.device)
    out[has_p ^ has_g] = diagonal

    b_idx, c_idx = torch.nonzero(has_p & has_g, as_tuple=True)
    n_pairs = int(b_idx.numel())
    logger.debug("hd95: %d (case, class) pairs present in both maps, spacing %s", n_pairs, sp)
    for start in range(0, n_pairs, _HD_PAIRS_PER_CALL):
        bi = b_idx[start : start + _HD_PAIRS_PER_CALL]
        ci = c_idx[start : start + _HD_PAIRS_PER_CALL]
        out[bi, ci] = _hd95_of_pairs(p, g, bi, ci, sp).to(device=out.device, dtype=out.dtype)
    return out


def nsd(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 2.0,
) -> torch.Tensor:
    """Normalised surface Dice of every foreground class at a tolerance, per sample.

    Definition (Nikolov et al., "Clinically applicable segmentation of head and neck anatomy for
    radiotherapy", JMIR 2021; MONAI ``compute_surface_dice``): with S_P and S_G the boundary voxels
    of the predicted and true masks of class ``c`` and d the Euclidean distance (with the voxel
    ``spacing``) to the nearest boundary voxel of the other mask::

        NSD[b, c - 1] = (|{p in S_P: d(p, S_G) <= tau}| + |{g in S_G: d(g, S_P) <= tau}|) / (|S_P| + |S_G|)

    the fraction of both boundaries that lies within ``tau = tolerance_mm`` of the other, in [0, 1].

    Rules for absent classes (MONAI's): absent from both maps ``NaN`` (not counted in means),
    present in exactly one ``0``.

    Args:
        pred: predicted class indices.
        label: ground-truth class indices, same shape as ``pred``.
        num_classes: number of classes K including background (>= 2).
        spacing: voxel size along each spatial dimension (mm); ``None``: voxel units (then
            ``tolerance_mm`` is in voxels).
        tolerance_mm: the tolerance tau in mm (>= 0).

    Shape:
        pred, label: ``(B, 1, *spatial)`` or ``(B, *spatial)`` with 2 or 3 spatial dims.
        Output: ``(B, K - 1)`` float32 on the input device.

    Raises:
        ValueError: as :func:`hd95`, or a negative or non-finite ``tolerance_mm``.
    """
    p, g = _check_pair(pred, label, num_classes)
    spatial = tuple(p.shape[1:])
    if len(spatial) not in (2, 3):
        raise ValueError(f"nsd needs 2 or 3 spatial dimensions, got pred/label of shape {tuple(pred.shape)}.")
    sp = _check_spacing(spacing, len(spatial))
    if isinstance(tolerance_mm, bool) or not isinstance(tolerance_mm, (int, float)) or not (
            math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}.")
    has_p = _class_counts(p, num_classes)[:, 1:] > 0
    has_g = _class_counts(g, num_classes)[:, 1:] > 0
    out = torch.full(has_p.shape, float("nan"), dtype=torch.float32, device=p.device)
    out[has_p ^ has_g] = 0.0
    b_idx, c_idx = torch.nonzero(has_p & has_g, as_tuple=True)
    for start in range(0, int(b_idx.numel()), _HD_PAIRS_PER_CALL):
        bi = b_idx[start : start + _HD_PAIRS_PER_CALL]
        ci = c_idx[start : start + _HD_PAIRS_PER_CALL]
        cls = (ci + 1).view(-1, *([1] * (p.ndim - 1)))
        mask_p, mask_g = (p[bi] == cls).unsqueeze(1), (g[bi] == cls).unsqueeze(1)
        with warnings.catch_warnings():  # MONAI >= 1.5 warns about its own use of a deprecated argument
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            val = compute_surface_dice(mask_p, mask_g, [float(tolerance_mm)], include_background=True,
                                       spacing=None if sp is None else [list(sp) for _ in range(int(bi.numel()))])
        out[bi, ci] = val[:, 0].to(device=out.device, dtype=out.dtype)
    return out
