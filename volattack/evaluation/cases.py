"""Case loading and scoring: a datalist entry -> preprocessed tensors, checked; a prediction ->
:class:`~volattack.evaluation.records.Scores` through the results schema."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from volattack.evaluation import columns as schema
from volattack.evaluation.records import Scores, attack_extras

logger = logging.getLogger(__name__)

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def case_id(entry: Mapping[str, Any], index: int) -> str:
    """``<index:04d>_<image file name without suffix>`` (the name of the case's files)."""
    name = Path(str(entry.get("image", f"case_{index}"))).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{index:04d}_{name}"


@dataclass
class CaseData:
    """One preprocessed case.

    Attributes:
        image: ``(1, C, H, W, D)`` float32 model input.
        label: ``(1, 1, H, W, D)`` long class indices.
        affine: ``(4, 4)`` numpy affine of the preprocessed image.
        spacing: voxel spacing in mm (3 floats).
    """

    image: torch.Tensor
    label: torch.Tensor
    affine: Any
    spacing: list[float]

    def to(self, device: torch.device) -> "CaseData":
        return CaseData(self.image.to(device), self.label.to(device), self.affine, self.spacing)


def load_case(entry: Mapping[str, Any], transforms: Any) -> tuple[torch.Tensor, torch.Tensor, Any, list[float]]:
    """Load and preprocess one datalist entry.

    Args:
        entry: ``{"image": path, "label": path}``.
        transforms: the eval transforms (``volattack.data.transforms.build_transforms(pre, mode="eval")``).

    Returns:
        image ``(1, C, H, W, D)`` float32, label ``(1, 1, H, W, D)`` long, the image's affine
        after preprocessing ``(4, 4)`` (numpy), and its voxel spacing in mm.
    """
    from monai.data.utils import affine_to_spacing

    sample = transforms(dict(entry))
    image, label = sample["image"], sample["label"]
    affine = getattr(image, "affine", None)
    if affine is None:
        affine = torch.eye(4)
    spacing = [float(s) for s in affine_to_spacing(torch.as_tensor(affine), r=3)]
    img = torch.as_tensor(image).float().unsqueeze(0)
    lab = torch.as_tensor(label).long().unsqueeze(0)
    return img, lab, torch.as_tensor(affine).cpu().numpy(), spacing


def check_case(data: CaseData, entry: Mapping[str, Any], num_classes: int, roi_size: Sequence[int],
               pad_value: float, patch_size: Optional[Sequence[int]] = None) -> None:
    """Fail a case that cannot be scored, with the reason; log a volume smaller than the window.

    A volume smaller than the sliding window is padded with ``pad_value`` (as training pads its
    crops). Under the ``patch`` threat model (``patch_size`` given) an attack tile larger than the
    volume would attack padding, so the case fails instead.

    Raises:
        ValueError: a tile larger than the volume, NaN/Inf in the image, labels outside ``[0, K)``.
    """
    shape = list(data.image.shape[2:])
    if any(w > n for w, n in zip(roi_size, shape)):
        logger.info("case %r: volume %s is smaller than the sliding window %s; padded with %g as in training",
                    entry.get("image"), shape, list(roi_size), pad_value)
    if patch_size is not None and any(w > n for w, n in zip(patch_size, shape)):
        raise ValueError(
            f"case {entry.get('image')!r}: the attack tile evaluate.patch_size={list(patch_size)} is "
            f"larger than the preprocessed volume {shape}; choose evaluate.patch_size that fits "
            "(or keep more of the volume: data.preprocess.crop_foreground, spacing)."
        )
    if not bool(torch.isfinite(data.image).all()):
        raise ValueError(f"case {entry.get('image')!r}: image contains NaN or Inf values.")
    lo, hi = int(data.label.min()), int(data.label.max())
    if hi >= num_classes or lo < 0:
        raise ValueError(f"case {entry.get('label')!r}: labels must be in [0, {num_classes - 1}], "
                         f"got values in [{lo}, {hi}].")


def measure_perturbation(x: torch.Tensor, adv: torch.Tensor, *, data_range: Sequence[float],
                         unit_scale: Optional[float]) -> dict[str, Any]:
    """:func:`volattack.measure.perturbation_stats` (the one definition of every size)."""
    from volattack.measure import perturbation_stats

    return perturbation_stats(x, adv, data_range=data_range, unit_scale=unit_scale)


def score(outcome: schema.Outcome, *, clean_row: bool = False) -> Scores:
    """The schema's per-case values of ``outcome`` (only the ``clean`` columns for the clean
    prediction), and the attack-specific extras of its ``info``."""
    values = {c.key: c.case(outcome) for c in schema.COLUMNS
              if c.case is not None and (c.clean or not clean_row)}
    return Scores(values=values, info={} if clean_row else attack_extras(outcome.info))


def clean_outcome(pred: torch.Tensor, data: CaseData, num_classes: int) -> schema.Outcome:
    """The outcome of a clean prediction."""
    return schema.Outcome(pred, data.label, num_classes, data.spacing)


def attack_outcome(pred: torch.Tensor, adv: torch.Tensor, info: Mapping[str, Any], data: CaseData,
                   clean: schema.Outcome, *, bounds: tuple[float, float],
                   unit_scale: Optional[float]) -> schema.Outcome:
    """The outcome of an adversarial prediction (sizes from ``info`` or measured once)."""
    return schema.Outcome(pred, data.label, clean.num_classes, data.spacing, clean=clean, image=data.image,
                          adv=adv, info=info, bounds=bounds, unit_scale=unit_scale, measure=measure_perturbation)
