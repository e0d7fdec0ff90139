"""Clinical attack goals on one case: the target map, the perturbation mask, and the goal's metrics.

:func:`resolve_case_goal` turns a :class:`~volattack.evaluation.goal_config.BoundGoal` (class
indices, see :mod:`~volattack.evaluation.goal_config`) into tensors on the grid of one case (any
grid: the model's preprocessed one or the scan's own, given its affine and spacing):

- target map (targeted attacks, Attack's ``target_labels``): the reference map (the clean
  prediction, or the label with ``reference: label``) with the removed classes set to background
  and each relabelled class set to its new class;
- mask (Attack's ``mask``): ``body``: the preprocessing's foreground (model input above its
  lower bound, as ``CropForegroundd`` selects it) and, in HU, above ``BODY_HU`` (or the given
  threshold in source units), holes filled slice by slice along the axis closest to the world's
  superior axis (lungs and bowel gas stay inside); ``near``: voxels whose centre lies within
  ``mm`` millimetres of the class in the reference map (Euclidean distance transform with the
  voxel spacing, so anisotropic voxels count in mm); ``box``: voxels whose centre, mapped through
  the case's affine (voxel index -> world mm, RAS), lies in the box.

An empty mask (the organ absent from the reference, a box outside the volume) is an error naming
the case. The goal's metrics (columns of :mod:`volattack.evaluation.columns`):
:func:`target_dice` (Dice of a prediction to the target map), :func:`target_reached` (fraction of
the voxels the goal changes that reached their target class) and :func:`removed_fraction`
(fraction of each removed organ's clean-predicted volume no longer predicted as that organ).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from volattack.evaluation.goal_config import BODY_HU, BoundGoal

logger = logging.getLogger(__name__)


@dataclass
class CaseGoal:
    """A goal on one case's grid.

    Attributes:
        goal: the bound goal it comes from.
        target: target map ``(1, 1, *spatial)`` long (``None``: untargeted).
        mask: perturbation mask ``(1, 1, *spatial)`` float 0/1 (``None``: everywhere).
        changed: bool ``(1, 1, *spatial)``, the voxels whose class the goal changes (target map
            different from the reference map; ``None``: untargeted).
    """

    goal: BoundGoal
    target: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    changed: Optional[torch.Tensor] = None

    def run_kwargs(self, attack: Any) -> dict[str, Any]:
        """The keyword arguments of ``attack.run`` (``target_labels`` only for a targeted attack)."""
        kw: dict[str, Any] = {}
        if self.target is not None and getattr(attack, "targeted", False):
            kw["target_labels"] = self.target
        if self.mask is not None:
            kw["mask"] = self.mask
        return kw


def target_map(reference: torch.Tensor, goal: BoundGoal) -> torch.Tensor:
    """The reference map with ``goal.remove`` set to 0 and each ``goal.relabel`` pair ``a -> b`` applied.

    Shape:
        reference ``(B, 1, *spatial)`` integer -> same, long.
    """
    ref = reference.long()
    k = max([int(ref.max()) + 1, *[c + 1 for c in goal.remove], *[max(a, b) + 1 for a, b in goal.relabel]])
    lut = torch.arange(k, device=ref.device)
    for c in goal.remove:
        lut[c] = 0
    for a, b in goal.relabel:
        lut[a] = b
    return lut[ref]


def near_mask(reference: torch.Tensor, cls: int, mm: float, spacing: Sequence[float]) -> torch.Tensor:
    """Voxels whose centre is within ``mm`` of a voxel of class ``cls`` (distances in mm:
    ``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``); the organ itself included.

    Shape:
        reference ``(1, 1, *spatial)`` -> bool, same shape, on its device.
    """
    from scipy import ndimage

    organ = (reference[0, 0] == cls).cpu().numpy()
    if not organ.any():
        return torch.zeros_like(reference, dtype=torch.bool)
    dist = ndimage.distance_transform_edt(~organ, sampling=[float(s) for s in spacing])
    return torch.from_numpy(dist <= mm + 1e-6).to(reference.device)[None, None]


def voxel_centres_world(affine: Any, shape: Sequence[int]) -> list[np.ndarray]:
    """World coordinates (mm) x, y, z of every voxel centre: ``affine @ [i, j, k, 1]``, each of
    ``shape`` (broadcast from one row of the affine per axis, no index grid held)."""
    a = np.asarray(affine, dtype=np.float64)
    idx = [np.arange(n, dtype=np.float64).reshape([-1 if d == ax else 1 for d in range(len(shape))])
           for ax, n in enumerate(shape)]
    return [a[r, 3] + sum(a[r, ax] * idx[ax] for ax in range(len(shape))) for r in range(3)]


def box_mask(box: Sequence[float], affine: Any, shape: Sequence[int]) -> torch.Tensor:
    """Voxels whose centre lies in the world box ``[x0, y0, z0, x1, y1, z1]`` (mm, RAS, inclusive).

    Shape:
        ``shape`` (spatial) -> bool ``(1, 1, *shape)`` on the CPU.
    """
    coords = voxel_centres_world(affine, shape)
    inside = np.ones(tuple(shape), dtype=bool)
    for r in range(3):
        inside &= (coords[r] >= box[r] - 1e-6) & (coords[r] <= box[r + 3] + 1e-6)
    return torch.from_numpy(inside)[None, None]


def world_extent(affine: Any, shape: Sequence[int]) -> list[list[float]]:
    """``[[x_min, x_max], [y_min, y_max], [z_min, z_max]]`` of the voxel centres in world mm."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(len(shape), -1)
    w = np.asarray(affine, dtype=np.float64)[:3, :3] @ corners + np.asarray(affine, dtype=np.float64)[:3, 3:]
    return [[round(float(w[r].min()), 2), round(float(w[r].max()), 2)] for r in range(3)]


def check_goal(goal: Any, class_names: Any, num_classes: int, cases: Sequence[Any]) -> Optional[BoundGoal]:
    """Bind ``evaluate.goal`` to class indices and check a box mask against every case's scan from its
    header, before any model runs or file is written.

    Args:
        goal: ``evaluate.goal`` (:class:`~volattack.evaluation.goal_config.GoalConfig` or ``None``).
        class_names: class index -> name.
        num_classes: K, background included.
        cases: the evaluated datalist entries (``image``: a path or a list of channel paths).

    Raises:
        ValueError: a class the dataset lacks (:func:`~volattack.evaluation.goal_config.bind_goal`),
            or a box that misses the world extent of a case's voxel centres (the case and its extent named).
    """
    from volattack.data.source import read_geometry
    from volattack.evaluation.goal_config import bind_goal

    bound = bind_goal(goal, class_names, num_classes)
    if bound is None or bound.mask is None or bound.mask.kind != "box":
        return bound
    box = bound.mask.box or []
    for entry in cases:
        image = entry.get("image")
        geom = read_geometry(image[0] if isinstance(image, (list, tuple)) else image)
        if geom is None:  # a DICOM series: checked on the case itself
            continue
        ext = world_extent(geom[1], geom[0])
        if any(box[r] > ext[r][1] + 1e-6 or box[r + 3] < ext[r][0] - 1e-6 for r in range(3)):
            raise ValueError(f"case {image!r}: evaluate.goal.mask box {box} (world mm, RAS) is outside the volume, "
                             f"whose voxel centres span x {ext[0]}, y {ext[1]}, z {ext[2]} mm.")
    return bound


def superior_axis(affine: Any) -> int:
    """The array axis whose direction is closest to the world's superior (z) axis."""
    return int(np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[2, :3])))


def body_mask(image: torch.Tensor, bounds: Sequence[float], affine: Any, *, threshold: Optional[float] = None,
              to_source: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The body: voxels above the model input's lower bound (the preprocessing's foreground) in
    any channel and, with ``threshold``, above it in source units, holes filled per slice
    across :func:`superior_axis` (``scipy.ndimage.binary_fill_holes`` with in-plane connectivity).

    Shape:
        image ``(1, C, *spatial)`` -> bool ``(1, 1, *spatial)`` on its device.
    """
    from scipy import ndimage

    x = image[0].detach()
    inside = (x > float(bounds[0]) + 1e-6 * max(1.0, float(bounds[1]) - float(bounds[0]))).any(0)
    if threshold is not None:
        if to_source is None:
            raise ValueError(f"mask.body={threshold!r}: a threshold in source units needs an intensity model "
                             "that maps model inputs back to source units.")
        inside &= (to_source(x.float()) > threshold).any(0)
    plane = np.zeros((3,) * inside.ndim, dtype=bool)
    centre = [slice(None)] * inside.ndim
    centre[superior_axis(affine)] = 1
    plane[tuple(centre)] = ndimage.generate_binary_structure(inside.ndim - 1, 1)
    filled = ndimage.binary_fill_holes(inside.cpu().numpy(), structure=plane)
    return torch.from_numpy(filled).to(image.device)[None, None]


def _mask(goal: BoundGoal, reference: torch.Tensor, image: torch.Tensor, affine: Any, spacing: Sequence[float],
          bounds: Sequence[float], units: str, to_source: Optional[Callable], where: str) -> torch.Tensor:
    """The perturbation mask of ``goal.mask`` on this grid (bool ``(1, 1, *spatial)``), checked non-empty."""
    m = goal.mask
    assert m is not None
    shape = list(image.shape[2:])
    if m.kind == "near":
        mask = near_mask(reference, int(goal.near_class or 0), float(m.mm or 0.0), spacing)
        why = (f"the class {goal.name(int(goal.near_class or 0))!r} is absent from the {goal.reference} "
               "map of this case")
    elif m.kind == "box":
        mask = box_mask(m.box or [], affine, shape).to(image.device)
        ext = world_extent(affine, shape)
        why = (f"the box {m.box} (world mm, RAS) is outside the volume, whose voxel centres span "
               f"x {ext[0]}, y {ext[1]}, z {ext[2]} mm")
    else:
        thr = BODY_HU if (m.body is True and units == "HU") else (None if m.body is True else float(m.body))
        mask = body_mask(image, bounds, affine, threshold=thr, to_source=to_source)
        why = "no voxel is above the body threshold" + (f" {thr:g} {units}" if thr is not None else "")
    if not bool(mask.any()):
        raise ValueError(f"{where}: evaluate.goal.mask {goal.describe()['mask']} is empty: {why}.")
    return mask


def resolve_case_goal(goal: BoundGoal, *, clean_pred: torch.Tensor, label: Optional[torch.Tensor],
                      image: torch.Tensor, affine: Any, spacing: Sequence[float], bounds: Sequence[float],
                      units: str = "HU", to_source: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      where: str = "case") -> CaseGoal:
    """The target map and mask of ``goal`` on one case (all on the grid of ``image``).

    Args:
        goal: the bound goal.
        clean_pred: the clean prediction ``(1, 1, *spatial)``.
        label: the ground truth, same shape (needed with ``reference: label``).
        image: the attacked input ``(1, C, *spatial)`` (the body mask reads it).
        affine: ``(4, 4)`` voxel index -> world mm (RAS) of this grid.
        spacing: voxel spacing in mm along the spatial axes.
        bounds: the input range ``(lo, hi)``.
        units: the source unit label (``HU``: ``mask: body`` uses :data:`BODY_HU`).
        to_source: model input -> source units (a body threshold in source units needs it).
        where: the case, for messages.

    Raises:
        ValueError: the mask is empty on this case (the reason named), or ``reference: label``
            without a label.
    """
    if goal.reference == "label" and label is None:
        raise ValueError(f"{where}: evaluate.goal.reference='label' needs the case's label.")
    reference = label if goal.reference == "label" else clean_pred
    out = CaseGoal(goal)
    if goal.targeted:
        out.target = target_map(reference, goal)
        out.changed = out.target != reference
        absent = [goal.name(c) for c in goal.removed if not bool((reference == c).any())]
        if absent:
            logger.warning("%s: %s absent from the %s map: nothing to remove there", where, ", ".join(absent),
                           goal.reference)
    if goal.mask is not None:
        out.mask = _mask(goal, reference, image, affine, spacing, bounds, units, to_source, where).to(image.dtype)
    return out


# ----------------------------------------------------------------------- metrics


def target_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean foreground Dice of ``pred`` to the target map (the Dice rule of every Dice column: a
    class absent from both is not counted, so a removed organ that is gone counts nothing and one
    that remains counts 0).

    Shape:
        pred, target ``(1, 1, *spatial)``.
    """
    from volattack.metrics import dice_per_class

    k = num_classes
    if bool((pred < 0).any()):  # a certified map's abstentions (-1): in no class
        pred, k = pred.masked_fill(pred < 0, k), k + 1
    vals = [v for v in dice_per_class(pred, target, k)[0, : num_classes - 1].tolist() if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


def removed_fraction(clean_pred: torch.Tensor, pred: torch.Tensor, classes: Sequence[int],
                     num_classes: int) -> list[float]:
    """Per foreground class ``c`` (index ``c - 1``): for ``c`` in ``classes``, the fraction of its
    clean-predicted voxels no longer predicted as ``c``, ``|C_c \\ P_c| / |C_c|`` in [0, 1]; NaN for
    the other classes and for a class absent from the clean prediction.

    Shape:
        clean_pred, pred ``(1, 1, *spatial)`` -> a list of ``num_classes - 1`` floats.
    """
    out = [math.nan] * (num_classes - 1)
    for c in classes:
        was = clean_pred == c
        n = int(was.sum())
        if n:
            out[c - 1] = float((was & (pred != c)).sum()) / n
    return out


def _goal_of(o: Any) -> Optional[CaseGoal]:
    return o.goal if o.clean is None else o.clean.goal


def target_dice_of(o: Any) -> Optional[float]:
    """:func:`target_dice` of an :class:`~volattack.evaluation.columns.Outcome` (``None`` untargeted)."""
    g = _goal_of(o)
    if g is None or g.target is None:
        return None
    return target_dice(o.pred, g.target, max(o.num_classes, int(g.target.max()) + 1))


def removed_fraction_of(o: Any) -> Optional[list[float]]:
    """:func:`removed_fraction` of an attack outcome against its clean prediction (``None`` for the
    clean outcome and without removed classes)."""
    g = _goal_of(o)
    if o.clean is None or g is None or not g.goal.removed:
        return None
    return removed_fraction(o.clean.pred, o.pred, g.goal.removed, o.num_classes)


def target_reached(pred: torch.Tensor, target: torch.Tensor, changed: torch.Tensor) -> float:
    """Fraction of the voxels the goal changes (``changed``) whose prediction is their target
    class: ``|{v in changed: pred_v = target_v}| / |changed|`` (NaN when the goal changes none).

    Shape:
        pred, target, changed ``(1, 1, *spatial)``.
    """
    n = int(changed.sum())
    return float(((pred == target) & changed).sum()) / n if n else math.nan


def target_reached_of(o: Any) -> Optional[float]:
    """:func:`target_reached` of an attack outcome (``None`` for the clean outcome and untargeted runs)."""
    g = _goal_of(o)
    if o.clean is None or g is None or g.target is None or g.changed is None:
        return None
    return target_reached(o.pred, g.target, g.changed)


def removed_mean_of(o: Any) -> Optional[float]:
    """Mean of :func:`removed_fraction_of` over the removed organs present in the clean prediction."""
    per = removed_fraction_of(o)
    if per is None:
        return None
    vals = [v for v in per if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


__all__ = ["CaseGoal", "body_mask", "box_mask", "check_goal", "near_mask", "removed_fraction",
           "removed_fraction_of", "removed_mean_of", "resolve_case_goal", "superior_axis", "target_dice",
           "target_dice_of", "target_map", "target_reached", "target_reached_of", "voxel_centres_world",
           "world_extent"]
