"""Differentiable preprocessing steps of a deployed segmenter, fitted to one scan.

A deployed pipeline maps a scan on its own grid, in its own units (HU for CT), to the model's
input: reorientation, resampling to the model's spacing, intensity normalisation, cropping.
Each :class:`Step` here is one of those operations with its geometry fixed for one scan, as a
``torch.nn.Module``:

- :meth:`Step.forward` maps an image ``(1, C, *in_shape)`` to ``(1, C, *out_shape)`` and is
  differentiable in the image (what an attack in the scan's own domain back-propagates through);
- :meth:`Step.invert` maps class probabilities ``(1, K, *out_shape)`` back to ``(1, K, *in_shape)``
  (orientation: the inverse permutation and flips; resampling: linear interpolation back to the
  input grid; intensity: the identity; crop: padding with background probability 1).

Steps carry their input/output geometry (``in_shape``, ``out_shape``, ``in_affine``,
``out_affine``: voxel index -> world mm, RAS+), so a pipeline is built by chaining
constructors, each taking the previous step's output geometry:

- :class:`Orient`: permutation and flips from a scan's affine to orientation codes (``"RAS"``),
  with the axis choice and order of MONAI's ``Orientation`` (nibabel's ``io_orientation``);
- :class:`Resample`: an exact separable linear operator, one matrix per axis
  (:meth:`Resample.from_matrices`, applied axis by axis), or linear interpolation given by
  per-axis sample coordinates (:meth:`Resample.linear`, gathered and blended, ``O(N)``);
  :meth:`Resample.like_monai_spacing` reproduces MONAI's ``Spacing`` (``mode="bilinear"``,
  ``padding_mode="border"``, ``align_corners=False``): that transform samples the input at
  ``inv(A_in) @ A_out`` of each output voxel with ``grid_sample``, which for an output affine of
  the same directions is a per-axis scale and shift, so trilinear interpolation factorises exactly
  into three 1-D linear interpolations;
- :class:`Intensity`: an :class:`~volattack.data.intensity.IntensityModel` (window and clipping,
  z-score, percentiles) applied to tensors (``clamp``, ``kthvalue``: differentiable, with zero
  gradient where the window clips);
- :class:`Crop`: a fixed box.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

Shape3 = tuple[int, int, int]

#: Tolerance on affine entries when checking that a resampling is separable (MONAI's AFFINE_TOL).
AFFINE_TOL = 1e-3


def _shape3(name: str, shape: Any) -> Shape3:
    vals = tuple(shape) if isinstance(shape, (tuple, list, torch.Size, np.ndarray)) else None
    if vals is None or len(vals) != 3 or not all(int(v) == v and int(v) > 0 for v in vals):
        raise ValueError(f"{name} must be 3 positive integers, got {shape!r}.")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def _affine(name: str, affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{name} must be a finite invertible 4x4 affine, got {affine!r}.")
    return a


class Step(nn.Module):
    """One preprocessing step fitted to one scan (orientation, resampling, intensity, crop, ...).

    Attributes:
        in_shape, out_shape: spatial shapes ``(I, J, K)`` of its input and output (``None``:
            not fixed, e.g. an intensity step).
        in_affine, out_affine: ``(4, 4)`` voxel -> world (mm, RAS+) of its input and output
            grids (``None`` when unknown or unchanged).
    """

    in_shape: Optional[Shape3] = None
    out_shape: Optional[Shape3] = None
    in_affine: Optional[np.ndarray] = None
    out_affine: Optional[np.ndarray] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Image ``(1, C, *in)`` -> ``(1, C, *out)``, differentiable in ``x``."""
        raise NotImplementedError

    def invert(self, p: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Probabilities ``(1, K, *out)`` -> ``(1, K, *in)``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain description (kind and parameters) for reports and cache keys."""
        return {"kind": type(self).__name__.lower()}

    def _check_spatial(self, x: torch.Tensor, shape: Optional[Shape3], what: str) -> None:
        if x.ndim != 5:
            raise ValueError(f"{what} must be (1, C, I, J, K), got shape {tuple(x.shape)}.")
        if shape is not None and tuple(x.shape[2:]) != tuple(shape):
            raise ValueError(
                f"{what} of {type(self).__name__} must have spatial shape {tuple(shape)}, "
                f"got {tuple(x.shape[2:])}."
            )


# --------------------------------------------------------------------------- orientation


class Orient(Step):
    """Reorientation: flips of input axes, then a permutation (MONAI ``Orientation``'s order).

    Args:
        ornt: ``(3, 2)`` nibabel orientation transform: input axis ``i`` goes to output axis
            ``ornt[i, 0]``, reversed when ``ornt[i, 1] == -1``.
        in_shape: the input's spatial shape (gives the output shape and affine).
        in_affine: the input's affine (optional; gives :attr:`out_affine`).

    Shape:
        forward ``(1, C, *in_shape)`` -> ``(1, C, *out_shape)``; invert the reverse.
    """

    def __init__(self, ornt: Any, in_shape: Sequence[int], in_affine: Any = None) -> None:
        super().__init__()
        o = np.asarray(ornt, dtype=np.float64)
        if o.shape != (3, 2) or sorted(o[:, 0].astype(int).tolist()) != [0, 1, 2] or not set(o[:, 1]) <= {1.0, -1.0}:
            raise ValueError(f"ornt must be a (3, 2) orientation transform (a permutation and flips +-1), got {ornt!r}.")
        self.in_shape = _shape3("in_shape", in_shape)
        self.flips = [i + 2 for i in range(3) if o[i, 1] == -1]
        perm = np.argsort(o[:, 0]).astype(int)  # output axis k <- input axis perm[k]
        self.perm = [0, 1] + [int(p) + 2 for p in perm]
        self.inv_perm = [0, 1] + [int(p) + 2 for p in np.argsort(perm)]
        self.out_shape = tuple(self.in_shape[int(p)] for p in perm)  # type: ignore[assignment]
        self.ornt = o
        if in_affine is not None:
            import nibabel as nib

            self.in_affine = _affine("in_affine", in_affine)
            self.out_affine = self.in_affine @ nib.orientations.inv_ornt_aff(o, self.in_shape)

    @classmethod
    def to_codes(cls, affine: Any, shape: Sequence[int], codes: str = "RAS") -> "Orient":
        """The reorientation of a grid with ``affine`` to the axis codes ``codes`` (as MONAI's
        ``Orientation(axcodes=codes)``: the closest axis per world direction for oblique affines).

        Raises:
            ValueError: ``codes`` are not three of L/R, A/P, S/I; a singular affine.
        """
        import nibabel as nib

        a = _affine("affine", affine)
        if not isinstance(codes, str) or len(codes) != 3:
            raise ValueError(f"codes must be 3 axis codes such as 'RAS', got {codes!r}.")
        try:
            dst = nib.orientations.axcodes2ornt(tuple(codes))
        except ValueError as e:
            raise ValueError(f"codes must be 3 axis codes, one of each of L/R, A/P, S/I, got {codes!r}.") from e
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(a), dst)
        return cls(ornt, shape, a)

    @property
    def is_identity(self) -> bool:
        """True when the step neither flips nor permutes."""
        return not self.flips and self.perm == [0, 1, 2, 3, 4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_spatial(x, self.in_shape, "x")
        if self.flips:
            x = torch.flip(x, dims=self.flips)
        return x.permute(self.perm)

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        self._check_spatial(p, self.out_shape, "p")
        p = p.permute(self.inv_perm)
        return torch.flip(p, dims=self.flips) if self.flips else p

    def describe(self) -> dict[str, Any]:
        return {"kind": "orient", "ornt": self.ornt.astype(int).tolist()}


# --------------------------------------------------------------------------- resampling


def linear_weights(coords: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of 1-D linear interpolation at ``coords`` on ``n_in`` samples, with
    border padding (coordinates clamped to ``[0, n_in - 1]``, as ``grid_sample``'s ``"border"``).

    Returns:
        ``(i0, i1, w)``: ``value = (1 - w) * x[i0] + w * x[i1]``, each of ``coords``' length.
    """
    c = np.clip(np.asarray(coords, dtype=np.float64), 0.0, n_in - 1.0)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, c - i0


def linear_matrix(coords: np.ndarray, n_in: int) -> np.ndarray:
    """The ``(len(coords), n_in)`` matrix of :func:`linear_weights` (rows sum to 1)."""
    i0, i1, w = linear_weights(coords, n_in)
    m = np.zeros((len(i0), n_in), dtype=np.float64)
    rows = np.arange(len(i0))
    np.add.at(m, (rows, i0), 1.0 - w)
    np.add.at(m, (rows, i1), w)
    return m


def _sample_coords(matrix: np.ndarray) -> np.ndarray:
    """The input coordinate each output row samples (its weights' centre of mass: exact for linear
    interpolation, the sampling position of a symmetric kernel), for the linear inverse."""
    m = np.asarray(matrix, dtype=np.float64)
    s = m.sum(axis=1)
    if np.any(np.abs(s) < 1e-12):
        raise ValueError("matrices must have rows with a nonzero sum (an interpolation), got a zero row.")
    return (m @ np.arange(m.shape[1])) / s


def _inverse_coords(coords: np.ndarray, n_in: int) -> np.ndarray:
    """Coordinates on the output grid of each input index, for sampling positions ``coords``
    (increasing): piecewise-linear inverse of ``index -> coords[index]``, clamped at the ends."""
    c = np.asarray(coords, dtype=np.float64)
    if len(c) > 1 and not np.all(np.diff(c) >= -1e-9):
        raise ValueError("a resampling must sample increasing input positions along each axis to be inverted.")
    pos, first = np.unique(np.round(c, 9), return_index=True)  # border clamping repeats positions
    if len(pos) == 1:
        return np.full(n_in, float(first[0]))
    return np.interp(np.arange(n_in, dtype=np.float64), pos, first.astype(np.float64))


class _Axis(nn.Module):
    """One axis of a separable resampling: linear gather-and-blend or a dense matrix."""

    def __init__(self, dim: int, n_in: int, coords: Optional[np.ndarray] = None, matrix: Optional[np.ndarray] = None):
        super().__init__()
        self.dim, self.n_in = dim, n_in
        self.dense = matrix is not None
        if matrix is not None:
            self.register_buffer("m", torch.as_tensor(np.asarray(matrix), dtype=torch.float32), persistent=False)
            self.n_out = int(matrix.shape[0])
        else:
            i0, i1, w = linear_weights(coords, n_in)  # type: ignore[arg-type]
            self.register_buffer("i0", torch.as_tensor(i0), persistent=False)
            self.register_buffer("i1", torch.as_tensor(i1), persistent=False)
            self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32), persistent=False)
            self.n_out = len(i0)
            self.identity = bool(self.n_out == n_in and np.all(w == 0) and np.array_equal(i0, np.arange(n_in)))

    def matrix(self) -> torch.Tensor:
        """The ``(n_out, n_in)`` float32 matrix of this axis."""
        if self.dense:
            return self.m
        m = torch.zeros(self.n_out, self.n_in, dtype=torch.float32, device=self.w.device)
        rows = torch.arange(self.n_out, device=self.w.device)
        m.index_put_((rows, self.i0), 1 - self.w, accumulate=True)
        m.index_put_((rows, self.i1), self.w, accumulate=True)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            xt = x.movedim(self.dim, -1)
            return torch.matmul(xt, self.m.to(x.dtype).t()).movedim(-1, self.dim)
        if self.identity:
            return x
        shape = [1] * x.ndim
        shape[self.dim] = self.n_out
        w = self.w.to(x.dtype).reshape(shape)
        if self.dim == x.ndim - 1:  # gather: index_select along the innermost axis is ~6x slower on CPU
            size = x.shape[:-1] + (self.n_out,)
            a = torch.gather(x, -1, self.i0.view(shape).expand(size))
            b = torch.gather(x, -1, self.i1.view(shape).expand(size))
        else:
            a, b = x.index_select(self.dim, self.i0), x.index_select(self.dim, self.i1)
        return a + (b - a) * w


class Resample(Step):
    """Separable linear resampling: one linear operator per spatial axis, applied in turn.

    ``forward`` applies ``A_i, A_j, A_k`` (shapes ``(I', I)``, ``(J', J)``, ``(K', K)``), i.e.
    ``y[a, b, c] = sum_ijk A_i[a, i] A_j[b, j] A_k[c, k] x[i, j, k]``, exactly and differentiably.
    ``invert`` resamples probabilities back to the input grid by linear interpolation (not the
    adjoint): each input voxel reads the output grid at the position it has there, so
    probabilities stay in ``[0, 1]`` and sum to 1.

    Build it with :meth:`from_matrices` (any per-axis matrices, e.g. spline interpolation),
    :meth:`linear` (sample coordinates per axis) or :meth:`like_monai_spacing`.

    Shape:
        forward ``(1, C, I, J, K)`` -> ``(1, C, I', J', K')``; invert the reverse.
    """

    def __init__(self, forward_axes: Sequence[_Axis], inverse_axes: Optional[Sequence[_Axis]], in_shape: Sequence[int],
                 out_shape: Sequence[int], in_affine: Any = None, out_affine: Any = None,
                 info: Optional[dict] = None) -> None:
        super().__init__()
        self.fwd = nn.ModuleList(forward_axes)
        self.inv = None if inverse_axes is None else nn.ModuleList(inverse_axes)
        self.in_shape = _shape3("in_shape", in_shape)
        self.out_shape = _shape3("out_shape", out_shape)
        self.in_affine = None if in_affine is None else _affine("in_affine", in_affine)
        self.out_affine = None if out_affine is None else _affine("out_affine", out_affine)
        self.info = dict(info or {})

    @classmethod
    def from_matrices(cls, matrices: Sequence[Any], inverse: Optional[Sequence[Any]] = None, *,
                      in_affine: Any = None, out_affine: Any = None) -> "Resample":
        """A resampling given by one matrix per axis.

        Args:
            matrices: ``[A_i, A_j, A_k]``, each ``(n_out, n_in)`` (numpy or torch).
            inverse: ``[B_i, B_j, B_k]`` ``(n_in, n_out)`` for :meth:`invert`; default: linear
                interpolation at the inverse of the positions each output row samples (its
                weights' centre of mass; exact for linear interpolation); matrices whose rows do
                not sample increasing positions then have no inverse (:meth:`invert` raises).
            in_affine, out_affine: the grids' affines, when known.

        Raises:
            ValueError: not three 2-D finite matrices; inverse shapes that do not match.
        """
        mats = [np.asarray(m.detach().cpu() if torch.is_tensor(m) else m, dtype=np.float64) for m in matrices]
        if len(mats) != 3 or any(m.ndim != 2 or m.size == 0 or not np.all(np.isfinite(m)) for m in mats):
            raise ValueError(f"matrices must be 3 finite 2-D matrices (one per axis), got shapes "
                             f"{[getattr(m, 'shape', None) for m in mats]}.")
        in_shape = tuple(m.shape[1] for m in mats)
        out_shape = tuple(m.shape[0] for m in mats)
        fwd = [_Axis(d + 2, m.shape[1], matrix=m) for d, m in enumerate(mats)]
        inv: Optional[list[_Axis]]
        if inverse is None:
            try:
                inv = [_Axis(d + 2, m.shape[0], coords=_inverse_coords(_sample_coords(m), m.shape[1]))
                       for d, m in enumerate(mats)]
            except ValueError:  # not an interpolation: invert() says so when it is called
                inv = None
        else:
            invs = [np.asarray(b.detach().cpu() if torch.is_tensor(b) else b, dtype=np.float64) for b in inverse]
            if len(invs) != 3 or any(b.shape != (m.shape[1], m.shape[0]) for b, m in zip(invs, mats)):
                raise ValueError(f"inverse must be 3 matrices shaped (n_in, n_out) = "
                                 f"{[(m.shape[1], m.shape[0]) for m in mats]}, got {[b.shape for b in invs]}.")
            inv = [_Axis(d + 2, b.shape[1], matrix=b) for d, b in enumerate(invs)]
        return cls(fwd, inv, in_shape, out_shape, in_affine, out_affine, info={"form": "matrices"})

    @classmethod
    def linear(cls, coords: Sequence[Any], in_shape: Sequence[int], *, in_affine: Any = None,
               out_affine: Any = None) -> "Resample":
        """Linear interpolation (border padding) at input coordinates ``coords[d]`` (voxel-centre
        indices, one increasing array per axis) of each output index; trilinear in 3-D.

        Raises:
            ValueError: a bad ``in_shape``, empty or non-finite or decreasing coordinates.
        """
        shape = _shape3("in_shape", in_shape)
        cs = [np.asarray(c, dtype=np.float64).reshape(-1) for c in coords]
        if len(cs) != 3 or any(c.size == 0 or not np.all(np.isfinite(c)) for c in cs):
            raise ValueError("coords must be 3 non-empty finite 1-D arrays (one per axis).")
        fwd = [_Axis(d + 2, n, coords=c) for d, (c, n) in enumerate(zip(cs, shape))]
        inv = [_Axis(d + 2, len(c), coords=_inverse_coords(c, n)) for d, (c, n) in enumerate(zip(cs, shape))]
        out_shape = tuple(len(c) for c in cs)
        return cls(fwd, inv, shape, out_shape, in_affine, out_affine, info={"form": "linear"})

    @classmethod
    def like_monai_spacing(cls, affine: Any, shape: Sequence[int], pixdim: Sequence[float]) -> "Resample":
        """The resampling of MONAI's ``Spacing(pixdim, mode="bilinear")`` (its defaults:
        ``padding_mode="border"``, ``align_corners=False``, ``diagonal=False``,
        ``scale_extent=False``) of a grid ``(affine, shape)``: the same output affine
        (``zoom_affine``) and shape and offset (``compute_shape_offset``), and the same samples
        (output voxel ``o`` reads the input at ``inv(A_in) @ A_out @ o``, linearly).

        Raises:
            ValueError: a bad ``pixdim``; an affine whose columns are not orthogonal (a sheared
                grid: the resampling would not be separable).
        """
        from monai.data.utils import compute_shape_offset, zoom_affine

        a = _affine("affine", affine)
        shp = _shape3("shape", shape)
        pd = [float(p) for p in pixdim] if isinstance(pixdim, (list, tuple, np.ndarray)) else None
        if pd is None or len(pd) != 3 or not all(math.isfinite(p) and p > 0 for p in pd):
            raise ValueError(f"pixdim must be 3 positive spacings (mm), got {pixdim!r}.")
        new_affine = zoom_affine(a, np.asarray(pd), diagonal=False)
        out_shape, offset = compute_shape_offset(shp, a, new_affine, False)
        new_affine[:3, -1] = offset[:3]
        xform = np.linalg.solve(a, new_affine)
        off_diag = xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))
        if np.max(np.abs(off_diag)) > AFFINE_TOL:
            raise ValueError(f"affine must have orthogonal columns for a separable resampling, got\n{a}.")
        out = tuple(int(s) for s in out_shape)
        if out == shp and np.allclose(xform, np.eye(4), atol=AFFINE_TOL):  # MONAI returns the input as is
            coords, new_affine = [np.arange(n, dtype=np.float64) for n in shp], a.copy()
        else:
            coords = [xform[d, d] * np.arange(out[d]) + xform[d, 3] for d in range(3)]
        step = cls.linear(coords, shp, in_affine=a, out_affine=new_affine)
        step.info = {"form": "monai_spacing", "pixdim": pd}
        return step

    def matrices(self) -> list[torch.Tensor]:
        """The forward operator's three ``(n_out, n_in)`` matrices."""
        return [ax.matrix() for ax in self.fwd]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_spatial(x, self.in_shape, "x")
        for ax in self.fwd:
            x = ax(x)
        return x

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        self._check_spatial(p, self.out_shape, "p")
        if self.inv is None:
            raise ValueError("this Resample has no inverse: its matrices are not interpolations (rows with "
                             "increasing sampling positions); build it with from_matrices(..., inverse=[...]).")
        for ax in self.inv:
            p = ax(p)
        return p

    def describe(self) -> dict[str, Any]:
        return {"kind": "resample", **self.info, "in_shape": list(self.in_shape), "out_shape": list(self.out_shape)}


# --------------------------------------------------------------------------- intensity


class Intensity(Step):
    """Source intensities -> model inputs with an :class:`~volattack.data.intensity.IntensityModel`
    (its ``from_source`` on tensors: window and clipping, z-score, percentiles; differentiable,
    zero gradient where it clips). ``invert`` is the identity (probabilities do not change).

    Args:
        model: the intensity model.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        from volattack.data.intensity import IntensityModel

        if not isinstance(model, IntensityModel):
            raise ValueError(f"model must be an IntensityModel, got {type(model).__name__}.")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}.")
        return self.model.from_source(x)

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def describe(self) -> dict[str, Any]:
        return {"kind": "intensity", "model": self.model.describe()}


# --------------------------------------------------------------------------- crop


class Crop(Step):
    """A fixed box ``[start, end)`` per axis; ``invert`` pads with background probability 1
    (class 0 gets 1, the other classes 0, outside the box).

    Args:
        start, end: box corners in voxels of the input grid, ``0 <= start < end <= in_shape``.
        in_shape: the input's spatial shape.
        in_affine: the input's affine (optional; gives :attr:`out_affine`).
    """

    def __init__(self, start: Sequence[int], end: Sequence[int], in_shape: Sequence[int], in_affine: Any = None):
        super().__init__()
        self.in_shape = _shape3("in_shape", in_shape)
        s, e = [int(v) for v in start], [int(v) for v in end]
        if len(s) != 3 or len(e) != 3 or not all(0 <= a < b <= n for a, b, n in zip(s, e, self.in_shape)):
            raise ValueError(f"start/end must be a box with 0 <= start < end <= {list(self.in_shape)}, "
                             f"got start={list(start)}, end={list(end)}.")
        self.start, self.end = tuple(s), tuple(e)
        self.out_shape = tuple(b - a for a, b in zip(s, e))  # type: ignore[assignment]
        if in_affine is not None:
            self.in_affine = _affine("in_affine", in_affine)
            shift = np.eye(4)
            shift[:3, 3] = s
            self.out_affine = self.in_affine @ shift

    @property
    def is_identity(self) -> bool:
        """True when the box is the whole grid."""
        return self.start == (0, 0, 0) and self.end == self.in_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_spatial(x, self.in_shape, "x")
        (a0, a1, a2), (b0, b1, b2) = self.start, self.end
        return x[:, :, a0:b0, a1:b1, a2:b2]

    def invert(self, p: torch.Tensor) -> torch.Tensor:
        return self.pad(p, 1.0, 0.0)

    def pad(self, p: torch.Tensor, background: float, other: float) -> torch.Tensor:
        """``p`` inside the box; outside, ``background`` in class 0 and ``other`` in the other classes
        (``(1, 0)`` for probabilities, ``(0, log(min prob))`` for log-probabilities)."""
        self._check_spatial(p, self.out_shape, "p")
        if self.is_identity:
            return p
        full = p.new_full((p.shape[0], p.shape[1]) + tuple(self.in_shape), float(other))
        full[:, 0] = float(background)
        (a0, a1, a2), (b0, b1, b2) = self.start, self.end
        full[:, :, a0:b0, a1:b1, a2:b2] = p
        return full

    def describe(self) -> dict[str, Any]:
        return {"kind": "crop", "start": list(self.start), "end": list(self.end)}


__all__ = ["AFFINE_TOL", "Crop", "Intensity", "Orient", "Resample", "Step", "linear_matrix", "linear_weights"]
