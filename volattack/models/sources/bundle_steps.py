"""Steps of MONAI bundle transforms that volattack's shared steps (:mod:`volattack.inference.steps`)
do not cover: an unclipped ``ScaleIntensityRange``, ``NormalizeIntensity`` and ``ScaleIntensity``
with the image's own statistics, and a ``CropForeground`` box that leaves the grid or a
``SpatialPad``/``DivisiblePad`` (crop and pad).

Each reproduces the MONAI transform's arithmetic on tensors (same operations, float32) and is
differentiable in the image; used by :mod:`volattack.models.sources.bundle_deploy`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from volattack.inference.steps import Step


class LinearIntensity(Step):
    """MONAI ``ScaleIntensityRange(a_min, a_max, b_min, b_max, clip=False)``:
    ``(x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``, unclipped. ``invert``: identity.

    Raises:
        ValueError: ``a_min == a_max`` (MONAI then only subtracts ``a_min``; not a window).
    """

    def __init__(self, a_min: float, a_max: float, b_min: float, b_max: float) -> None:
        super().__init__()
        if a_max == a_min:
            raise ValueError(f"a_max must differ from a_min for a linear intensity scaling, got {a_min} and {a_max}.")
        self.a_min, self.a_max, self.b_min, self.b_max = float(a_min), float(a_max), float(b_min), float(b_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.a_min) / (self.a_max - self.a_min)
        return x * (self.b_max - self.b_min) + self.b_min

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear_intensity", "a_min": self.a_min, "a_max": self.a_max, "b_min": self.b_min,
                "b_max": self.b_max}


def factor_step(factor: Optional[float]) -> Optional[LinearIntensity]:
    """MONAI ``ScaleIntensity(minv=None, maxv=None, factor=f)``: ``x * (1 + f)``, which is the
    :class:`LinearIntensity` ``(0, 1) -> (0, 1 + f)``; ``None`` (no step) where ``f`` is ``None``,
    because MONAI then leaves the image as it is.
    """
    return None if factor is None else LinearIntensity(0.0, 1.0, 0.0, 1.0 + float(factor))


class _PerImage(Step):
    """An intensity step computed from each image's own values (``_one``): per sample, or per
    sample and channel with ``channel_wise``; probabilities pass back unchanged (``invert``).

    Shape:
        ``(B, C, *spatial)`` -> the same.
    """

    channel_wise: bool = False

    def _one(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_spatial(x, None, "x")
        if self.channel_wise:
            return torch.stack([torch.stack([self._one(x[b, c]) for c in range(x.shape[1])]) for b in range(x.shape[0])])
        return torch.stack([self._one(x[b]) for b in range(x.shape[0])])

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        return p


class ImageZScore(_PerImage):
    """MONAI ``NormalizeIntensity``: ``(x - mean) / std`` with the image's own statistics (or the
    fixed ``subtrahend``/``divisor`` where given), over the nonzero voxels only when ``nonzero``
    (zeros stay zero) and per channel when ``channel_wise``; ``std`` is the population standard
    deviation (``unbiased=False``) and a zero ``std`` divides by 1, as MONAI does. Differentiable
    through the statistics; the nonzero mask is fixed by the input it sees. ``invert``: identity.

    Shape:
        ``(1, C, *spatial)`` -> the same.
    """

    def __init__(self, subtrahend: Optional[float] = None, divisor: Optional[float] = None, nonzero: bool = False,
                 channel_wise: bool = False) -> None:
        super().__init__()
        self.subtrahend, self.divisor = subtrahend, divisor
        self.nonzero, self.channel_wise = bool(nonzero), bool(channel_wise)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != 0).detach() if self.nonzero else None
        vals = x[mask] if mask is not None else x.reshape(-1)
        if vals.numel() == 0:
            return x
        mean = vals.mean() if self.subtrahend is None else torch.as_tensor(self.subtrahend, dtype=x.dtype)
        if self.divisor is None:
            std = vals.std(unbiased=False) if vals.numel() > 1 else vals.new_zeros(())
            std = torch.where(std == 0, torch.ones_like(std), std)
        else:
            std = torch.as_tensor(self.divisor if self.divisor != 0 else 1.0, dtype=x.dtype)
        out = (x - mean) / std
        return torch.where(mask, out, x) if mask is not None else out

    def describe(self) -> dict[str, Any]:
        return {"kind": "image_zscore", "subtrahend": self.subtrahend, "divisor": self.divisor,
                "nonzero": self.nonzero, "channel_wise": self.channel_wise}


class ImageMinMax(_PerImage):
    """MONAI ``ScaleIntensity(minv, maxv)`` (``rescale_array``): the image's own ``[min, max]`` ->
    ``[minv, maxv]`` (``(x - min) / (max - min)`` when either is ``None``; a constant image times
    ``minv``), over the whole image or per channel (``channel_wise``); differentiable through the
    extremes. ``invert``: identity.

    Shape:
        ``(1, C, *spatial)`` -> the same.
    """

    def __init__(self, minv: Optional[float] = 0.0, maxv: Optional[float] = 1.0, channel_wise: bool = False) -> None:
        super().__init__()
        self.minv = None if minv is None else float(minv)
        self.maxv = None if maxv is None else float(maxv)
        self.channel_wise = bool(channel_wise)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min(), x.max()
        same = hi == lo  # a constant image (decided on the device: no host sync in an attack step)
        norm = (x - lo) / torch.where(same, torch.ones_like(hi), hi - lo)
        scaled = norm if self.minv is None or self.maxv is None else norm * (self.maxv - self.minv) + self.minv
        return torch.where(same, x * self.minv if self.minv is not None else x, scaled)

    def describe(self) -> dict[str, Any]:
        return {"kind": "image_minmax", "minv": self.minv, "maxv": self.maxv, "channel_wise": self.channel_wise}


class PadCrop(Step):
    """MONAI ``CropForeground``'s crop-and-pad of a box ``[start, end)`` that may leave the grid
    (a margin or ``k_divisible`` beyond the border): the part inside is cropped, the rest padded
    with ``value`` (MONAI's default ``mode="constant"``, 0). ``invert`` puts the probabilities
    back; outside the box it gives background probability 1 (``fill="background"``, as
    :class:`~volattack.inference.steps.Crop`) or probability 0 to every class (``fill="zero"``:
    what MONAI's ``Invertd`` does, so that the inverse resampling mixes zeros in near the box's
    edge exactly as the bundle's own postprocessing does; the argmax outside is class 0 either way).

    Args:
        start, end: box corners in voxels of the input grid (``start < end``; may be negative or
            beyond ``in_shape``).
        in_shape: the input's spatial shape. in_affine: its affine (gives :attr:`out_affine`).
        value: the padding value.
        fill: ``"background"`` or ``"zero"`` (see above).
    """

    def __init__(self, start: Sequence[int], end: Sequence[int], in_shape: Sequence[int], in_affine: Any = None,
                 value: float = 0.0, fill: str = "background") -> None:
        super().__init__()
        if fill not in ("background", "zero"):
            raise ValueError(f"fill must be 'background' or 'zero', got {fill!r}.")
        self.fill = fill
        s, e = [int(v) for v in start], [int(v) for v in end]
        n = [int(v) for v in in_shape]
        if len(s) != 3 or len(e) != 3 or len(n) != 3 or not all(a < b and b > 0 and a < m for a, b, m in zip(s, e, n)):
            raise ValueError(f"start/end must be a box overlapping the grid {n}, got start={list(start)}, end={list(end)}.")
        self.in_shape = tuple(n)  # type: ignore[assignment]
        self.start, self.end, self.value = tuple(s), tuple(e), float(value)
        self.out_shape = tuple(b - a for a, b in zip(s, e))  # type: ignore[assignment]
        self.inner = tuple(slice(max(a, 0), min(b, m)) for a, b, m in zip(s, e, n))
        self.pad = [p for a, b, m in reversed(list(zip(s, e, n))) for p in (max(-a, 0), max(b - m, 0))]
        if in_affine is not None:
            self.in_affine = np.asarray(in_affine, dtype=np.float64)
            shift = np.eye(4)
            shift[:3, 3] = s
            self.out_affine = self.in_affine @ shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_spatial(x, self.in_shape, "x")
        return F.pad(x[(slice(None), slice(None)) + self.inner], self.pad, mode="constant", value=self.value)

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        self._check_spatial(p, self.out_shape, "p")
        full = p.new_zeros((p.shape[0], p.shape[1]) + tuple(self.in_shape))
        if self.fill == "background":
            full[:, 0] = 1.0
        within = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(self.inner, self.start))
        full[(slice(None), slice(None)) + self.inner] = p[(slice(None), slice(None)) + within]
        return full

    def describe(self) -> dict[str, Any]:
        return {"kind": "pad_crop", "start": list(self.start), "end": list(self.end), "value": self.value, "fill": self.fill}


__all__ = ["ImageMinMax", "ImageZScore", "LinearIntensity", "PadCrop"]
