"""nnU-Net v2's preprocessing operators as exact, differentiable torch modules.

nnU-Net (Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical
image segmentation", Nature Methods 2021) prepares an image as: transpose, crop to the non-zero
box, normalise per channel, resample to the configuration's spacing; it resamples the predicted
logits back to the cropped grid for export. This module reproduces the two operators that are
not plain tensor indexing:

- :class:`NnunetResize`: nnU-Net's default resampling (``resample_data_or_seg`` with
  ``skimage.transform.resize``, ``mode="edge"``, no anti-aliasing: a tensor-product spline of
  order ``order``, order ``order_z`` nearest-neighbour along a strongly anisotropic axis) as one
  matrix per axis. Each matrix is obtained by applying nnU-Net's own interpolation
  (``skimage.transform.resize`` / ``scipy.ndimage.map_coordinates``) to unit impulses, so the
  operator is the interpolation itself, not a re-derivation; ``resize``'s output clipping to the
  input's range (per volume, or per slice when the anisotropic axis is resampled separately) is
  applied as ``clamp`` with the input's min and max (differentiable in both).
- :class:`NnunetNormalize`: nnU-Net's normalisation schemes on tensors (``CTNormalization``:
  clip to the foreground 0.5/99.5 percentiles of the plans, z-score with the plans' foreground
  mean and std; ``ZScoreNormalization``: per-image mean and std, optionally inside the non-zero
  mask; ``NoNormalization``, ``RescaleTo01Normalization``, ``RGBTo01Normalization``).

nnunetv2, scikit-image and scipy are imported lazily (``pip install 'volattack[nnunet]'``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from volattack.inference.steps import Step

#: normalisation schemes (nnU-Net class names) :class:`NnunetNormalize` implements.
NORMALIZATION_SCHEMES: tuple[str, ...] = (
    "CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization", "RGBTo01Normalization",
)


def resize_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of ``skimage.transform.resize`` along one axis, as nnU-Net
    calls it (``mode="edge"``, ``anti_aliasing=False``), without the output clipping: column ``j``
    is the resize of the unit impulse ``e_j``."""
    from skimage.transform import resize

    eye = np.eye(n_in, dtype=np.float64)
    cols = [resize(eye[j], (n_out,), order, mode="edge", anti_aliasing=False, clip=False) for j in range(n_in)]
    return np.stack(cols, axis=1)


def nearest_z_matrix(n_in: int, n_out: int, order_z: int = 0) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of nnU-Net's out-of-plane resampling along the anisotropic
    axis (``map_coordinates(order=order_z, mode="nearest")`` at ``scale * (i + 0.5) - 0.5``)."""
    from scipy.ndimage import map_coordinates

    coords = (float(n_in) / n_out) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
    eye = np.eye(n_in, dtype=np.float64)
    cols = [map_coordinates(eye[j], coords[None], order=order_z, mode="nearest") for j in range(n_in)]
    return np.stack(cols, axis=1)


class NnunetResize(nn.Module):
    """nnU-Net's default resampling of a ``(1, C, *in_shape)`` tensor to ``out_shape``.

    Build it with :meth:`plan` (nnU-Net's rule for separate-z resampling from the spacings).
    ``forward`` computes in float64 (as nnU-Net, which resamples ``astype(float)``) and returns
    float64: the caller casts to the dtype nnU-Net stores (float32 images, float16 logits).
    :meth:`adjoint` applies the transposed matrices (no clipping): the exact backward of the
    linear part.

    Attributes:
        in_shape, out_shape: spatial shapes.
        separate_axis: the axis resampled separately with order ``order_z`` (``None``: none).
        identity: shapes are equal, nnU-Net returns the input unchanged.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], matrices: Sequence[Optional[np.ndarray]],
                 separate_axis: Optional[int], info: dict[str, Any]) -> None:
        super().__init__()
        self.in_shape = tuple(int(v) for v in in_shape)
        self.out_shape = tuple(int(v) for v in out_shape)
        self.identity = self.in_shape == self.out_shape
        self.separate_axis = separate_axis
        self.info = dict(info)
        self.mats = [None if m is None else torch.as_tensor(m, dtype=torch.float64) for m in matrices]

    @classmethod
    def plan(cls, in_shape: Sequence[int], out_shape: Sequence[int], current_spacing: Sequence[float],
             new_spacing: Sequence[float], *, order: int = 3, order_z: int = 0,
             force_separate_z: Optional[bool] = None, is_seg: bool = False) -> "NnunetResize":
        """The resampling ``resample_data_or_seg_to_shape(data, out_shape, current_spacing,
        new_spacing, is_seg, order, order_z, force_separate_z)`` performs.

        Raises:
            ValueError: ``is_seg=True`` (label resampling is not a linear operator), a negative order.
        """
        from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

        if is_seg:
            raise ValueError("is_seg must be False: segmentation resampling is not differentiable.")
        if int(order) < 0 or int(order_z) < 0:
            raise ValueError(f"order and order_z must be >= 0, got {order!r}, {order_z!r}.")
        shp_in, shp_out = tuple(int(v) for v in in_shape), tuple(int(v) for v in out_shape)
        info = {"order": int(order), "order_z": int(order_z), "in_shape": list(shp_in), "out_shape": list(shp_out)}
        if shp_in == shp_out:
            return cls(shp_in, shp_out, [None] * 3, None, {**info, "identity": True})
        sep, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing)
        axis = int(axis) if sep else None
        mats: list[Optional[np.ndarray]] = []
        for d in range(3):
            if d == axis:
                mats.append(None if shp_in[d] == shp_out[d] else nearest_z_matrix(shp_in[d], shp_out[d], order_z))
            else:
                mats.append(resize_matrix(shp_in[d], shp_out[d], order))
        return cls(shp_in, shp_out, mats, axis, {**info, "separate_axis": axis})

    def _axis(self, x: torch.Tensor, d: int, transpose: bool = False) -> torch.Tensor:
        m = self.mats[d]
        if m is None:
            return x
        m = m.to(device=x.device, dtype=x.dtype)
        return torch.matmul(x.movedim(d + 2, -1), m if transpose else m.t()).movedim(-1, d + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, C, *in_shape)`` -> ``(1, C, *out_shape)`` float64, differentiable."""
        if tuple(x.shape[2:]) != self.in_shape:
            raise ValueError(f"x must have spatial shape {self.in_shape}, got {tuple(x.shape[2:])}.")
        if self.identity:
            return x.double()
        y = x.double()
        src = y
        ax = self.separate_axis
        for d in range(3):
            if d != ax:
                y = self._axis(y, d)
        if self.info.get("order", 0) > 0:  # skimage's resize(clip=True): the range of each resized input
            dims = tuple(d + 2 for d in range(3) if d != ax)
            lo, hi = src.amin(dim=dims, keepdim=True), src.amax(dim=dims, keepdim=True)
            y = torch.clamp(y, lo, hi)
        if ax is not None:
            y = self._axis(y, ax)
        return y

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """The transposed linear operator ``(1, K, *out_shape)`` -> ``(1, K, *in_shape)`` (clipping
        ignored: exact where the output lies inside the input's range, always so for order 1)."""
        if self.identity:
            return g
        ax = self.separate_axis
        if ax is not None:
            g = self._axis(g, ax, transpose=True)
        for d in reversed(range(3)):
            if d != ax:
                g = self._axis(g, d, transpose=True)
        return g

    def describe(self) -> dict[str, Any]:
        """Plain description."""
        return {"kind": "nnunet_resize", **self.info}


class NnunetNormalize(Step):
    """nnU-Net's per-channel intensity normalisation, on tensors (differentiable).

    Args:
        schemes: one nnU-Net class name per channel (:data:`NORMALIZATION_SCHEMES`).
        properties: per channel, the plans' ``foreground_intensity_properties_per_channel``
            entry (``mean``, ``std``, ``percentile_00_5``, ``percentile_99_5``; CT only).
        use_mask: per channel, the configuration's ``use_mask_for_norm``.
        mask: ``(I, J, K)`` bool, nnU-Net's filled non-zero mask on this grid (fixed from the
            clean scan), used where ``use_mask`` is set (z-score).

    Raises:
        ValueError: an unsupported scheme (named, with the supported ones), missing CT
            properties, lengths that differ.
    """

    def __init__(self, schemes: Sequence[str], properties: Sequence[Optional[dict]], use_mask: Sequence[bool],
                 mask: Optional[np.ndarray] = None) -> None:
        super().__init__()
        self.schemes = [str(s) for s in schemes]
        if not (len(self.schemes) == len(properties) == len(use_mask)) or not self.schemes:
            raise ValueError(f"schemes, properties and use_mask need one entry per channel, got "
                             f"{len(self.schemes)}, {len(properties)}, {len(use_mask)}.")
        for s in self.schemes:
            check_scheme(s)
        for c, (s, p) in enumerate(zip(self.schemes, properties)):
            if s == "CTNormalization" and not (p and all(k in p for k in ("mean", "std", "percentile_00_5",
                                                                          "percentile_99_5"))):
                raise ValueError(f"CTNormalization of channel {c} needs the plans' foreground_intensity_properties "
                                 f"(mean, std, percentile_00_5, percentile_99_5), got {p!r}.")
        self.properties = [dict(p or {}) for p in properties]
        self.use_mask = [bool(u) for u in use_mask]
        self.register_buffer("mask", None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool)),
                             persistent=False)

    def _channel(self, x: torch.Tensor, c: int) -> torch.Tensor:
        s, p = self.schemes[c], self.properties[c]
        if s == "CTNormalization":
            x = torch.clamp(x, float(p["percentile_00_5"]), float(p["percentile_99_5"]))
            return (x - float(p["mean"])) / max(float(p["std"]), 1e-8)
        if s == "ZScoreNormalization":
            if self.use_mask[c] and self.mask is not None:
                m = self.mask.to(x.device)
                vals = x[m]
                mean, std = vals.mean(), vals.std(unbiased=False)
                return torch.where(m, (x - mean) / torch.clamp(std, min=1e-8), x)
            return (x - x.mean()) / torch.clamp(x.std(unbiased=False), min=1e-8)
        if s == "RescaleTo01Normalization":
            x = x - x.min()
            return x / torch.clamp(x.max(), min=1e-8)
        if s == "RGBTo01Normalization":
            return x / 255.0
        return x  # NoNormalization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, C, I, J, K)`` source units -> normalised, float32."""
        if x.ndim != 5 or x.shape[1] != len(self.schemes):
            raise ValueError(f"x must be (1, {len(self.schemes)}, I, J, K), got {tuple(x.shape)}.")
        x = x.float()
        return torch.stack([self._channel(x[:, c], c) for c in range(x.shape[1])], dim=1)

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def describe(self) -> dict[str, Any]:
        return {"kind": "nnunet_normalize", "schemes": list(self.schemes), "use_mask_for_norm": list(self.use_mask),
                "properties": [{k: p[k] for k in ("mean", "std", "percentile_00_5", "percentile_99_5") if k in p}
                               for p in self.properties]}


def check_scheme(scheme: str) -> str:
    """``scheme`` if :class:`NnunetNormalize` implements it.

    Raises:
        ValueError: naming the scheme and the supported ones.
    """
    if scheme not in NORMALIZATION_SCHEMES:
        raise ValueError(f"normalization scheme {scheme!r} of the plans is not supported; volattack implements "
                         f"{', '.join(NORMALIZATION_SCHEMES)}.")
    return scheme


__all__ = ["NORMALIZATION_SCHEMES", "NnunetNormalize", "NnunetResize", "check_scheme", "nearest_z_matrix",
           "resize_matrix"]
