"""Spectral building blocks of the frequency-domain attacks: block split/merge, 3D DCT, band
masks, differentiable rounding and real-FFT helpers.

Pure tensor operations: differentiable, on any device and floating dtype, without Python
loops over blocks or voxels.

- :func:`block_split` / :func:`block_merge` cut ``(B, C, *spatial)`` volumes into
  non-overlapping cubes of side ``block_size`` by one ``reshape``/``permute`` (and back).
  A side that is not a multiple of the block is padded at its far end by **replicate**
  padding (the edge voxel is repeated) and the merge crops the padding off again.
- :func:`dct3` / :func:`idct3` apply the separable orthonormal DCT-II (and its inverse, the
  transpose) over the last three dimensions with a precomputed matrix (:func:`dct_matrix`).
- :func:`band_mask` gives the SA^2 frequency bands of a DCT block (Hanif et al., ISBI 2025).
- :func:`soft_round` is the AdvDrop differentiable rounding (Duan et al., ICCV 2021) used by
  VAFA (Hanif et al., MICCAI 2023); :func:`ste_round` is the straight-through alternative.
- :func:`rfft3`, :func:`irfft3`, :func:`rfft_radius` and :func:`rfft_mask` are the
  real-FFT helpers of the additive / amplitude FFT attack.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from volattack.ops import straight_through

logger = logging.getLogger(__name__)

#: frequency bands accepted by :func:`band_mask` and :func:`rfft_mask`
BANDS: tuple[str, ...] = ("all", "low", "middle", "high")

#: edges (in units of the per-axis Nyquist frequency) of the FFT bands of :func:`rfft_mask`
FFT_BAND_EDGES: dict[str, tuple[float, float]] = {
    "all": (0.0, math.inf),
    "low": (0.0, 1.0 / 3.0),
    "middle": (1.0 / 3.0, 2.0 / 3.0),
    "high": (2.0 / 3.0, math.inf),
}


def check_band(band: str) -> str:
    """Validate a frequency band name (one of :data:`BANDS`; ``ValueError`` naming ``band``, with a
    suggestion)."""
    if band not in BANDS:
        from volattack.registry import suggest

        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}.{suggest(str(band), BANDS)}")
    return band


# ------------------------------------------------------------------------------------- DCT
@functools.lru_cache(maxsize=64)
def _dct_matrix_cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)  # frequency index (rows)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)  # sample index (columns)
    m = torch.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * math.sqrt(2.0 / n)
    m[0] = m[0] / math.sqrt(2.0)
    return m.to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` with ``C[k, i] = a_k cos(pi (2i + 1) k / (2n))``,
    ``a_0 = sqrt(1/n)``, ``a_k = sqrt(2/n)``; ``C @ C.T = I`` and the inverse DCT is ``C.T``.

    Computed in float64, cast to ``dtype``, cached per ``(n, dtype, device)`` (do not modify
    the returned tensor in place).

    Args:
        n: transform length (a block side), >= 1.
        dtype: floating dtype of the result.
        device: device of the result (default CPU).

    Shape:
        ``(n, n)``, rows indexed by frequency, columns by sample position.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
    return _dct_matrix_cached(n, dtype, torch.device(device if device is not None else "cpu"))


def _apply_along_last3(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    if x.ndim < 3:
        raise ValueError(f"the input must have at least 3 dimensions, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"the input must be floating point, got dtype {x.dtype}.")
    a, b, c = (dct_matrix(n, x.dtype, x.device) for n in x.shape[-3:])
    if inverse:  # x = C^T X along each axis
        a, b, c = a.t(), b.t(), c.t()
    x = torch.einsum("pi,...ijk->...pjk", a, x)
    x = torch.einsum("qj,...pjk->...pqk", b, x)
    return torch.einsum("rk,...pqk->...pqr", c, x)


def dct3(blocks: torch.Tensor) -> torch.Tensor:
    """Separable orthonormal 3D DCT-II over the last three dimensions.

    ``X[p, q, r] = sum_{ijk} C[p, i] C[q, j] C[r, k] x[i, j, k]`` with :func:`dct_matrix`;
    orthonormal, so it preserves the L2 norm (Parseval) and ``idct3(dct3(x)) == x``.

    Args:
        blocks: e.g. the output of :func:`block_split`; any leading dimensions.

    Shape:
        ``(..., b1, b2, b3)`` -> ``(..., b1, b2, b3)`` (coefficient ``(0, 0, 0)`` is DC).
    """
    return _apply_along_last3(blocks, inverse=False)


def idct3(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct3` (the transposed matrices: orthonormal DCT-III).

    Shape:
        ``(..., b1, b2, b3)`` -> ``(..., b1, b2, b3)``.
    """
    return _apply_along_last3(coeffs, inverse=True)


# ---------------------------------------------------------------------------- blocks
def check_block(block_size: int, spatial: Sequence[int], shape: Sequence[int]) -> None:
    """Raise ``ValueError`` naming ``block_size`` unless it is a positive integer no larger than the
    smallest of the ``spatial`` sides of a volume of ``shape`` (used in the message)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    if block_size > min(spatial):
        raise ValueError(
            f"block_size must not exceed the smallest spatial side of the volume, got block_size={block_size} "
            f"for volume shape {tuple(shape)}."
        )


def block_split(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a volume into non-overlapping cubic blocks by ``reshape``/``permute`` (no loops).

    A spatial side that is not a multiple of ``block_size`` is padded at its far end with
    **replicate** padding (the last voxel repeated); :func:`block_merge` crops it off.

    Args:
        x: images ``(B, C, *spatial)`` (any number of spatial dims, 3 for volumes).
        block_size: block side b in voxels, at most the smallest spatial side.

    Shape:
        ``(B, C, H, W, D)`` -> ``(B, C, nH, nW, nD, b, b, b)`` with ``nH = ceil(H / b)`` etc.

    Raises:
        ValueError: ``block_size`` is not a positive integer or exceeds a spatial side.
    """
    if x.ndim < 3:
        raise ValueError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}.")
    spatial = tuple(x.shape[2:])
    check_block(block_size, spatial, x.shape)
    b = block_size
    nd = len(spatial)
    pads = [(-s) % b for s in spatial]
    if any(pads):
        # F.pad takes (last_lo, last_hi, ..., first_lo, first_hi); replicate needs float input
        x = F.pad(x, [v for p in reversed(pads) for v in (0, p)], mode="replicate")
    n = [(s + p) // b for s, p in zip(spatial, pads)]
    x = x.reshape(*x.shape[:2], *[v for ni in n for v in (ni, b)])
    order = [0, 1] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)]
    return x.permute(order)


def block_merge(blocks: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`block_split`: reassemble the blocks and crop the padding.

    Args:
        blocks: ``(B, C, nH, nW, nD, b, b, b)`` as returned by :func:`block_split`.
        shape: the original image shape ``(B, C, H, W, D)``.

    Shape:
        ``(B, C, nH, nW, nD, b, b, b)`` -> ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape) - 2
    if blocks.ndim != 2 + 2 * nd:
        raise ValueError(
            f"blocks must have {2 + 2 * nd} dims for image shape {shape}, got shape {tuple(blocks.shape)}."
        )
    n = blocks.shape[2 : 2 + nd]
    bs = blocks.shape[2 + nd :]
    if any(ni * bi < s for ni, bi, s in zip(n, bs, shape[2:])):
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not cover image shape {shape}.")
    order = [0, 1] + [v for i in range(nd) for v in (2 + i, 2 + nd + i)]
    x = blocks.permute(order).reshape(*blocks.shape[:2], *[ni * bi for ni, bi in zip(n, bs)])
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape[2:])]


# ------------------------------------------------------------------------------ bands
def band_mask(
    block_size: int,
    band: str = "all",
    *,
    exclude_dc: bool = False,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """Frequency band of a cubic DCT block (SA^2, Hanif et al., ISBI 2025).

    With coefficient indices ``(i, j, k)`` and ``s = i + j + k`` on a block of side b:
    ``"low"``: ``s <= b/2 - 1``; ``"high"``: ``s >= 5b/2 - 2``; ``"middle"``: the rest;
    ``"all"``: every coefficient. For b = 8: 20 low, 472 middle, 20 high coefficients.

    Args:
        block_size: block side b >= 1.
        band: one of :data:`BANDS`.
        exclude_dc: set the DC coefficient ``(0, 0, 0)`` to False.
        device: device of the mask.

    Shape:
        ``(b, b, b)`` bool.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    check_band(band)
    b = block_size
    r = torch.arange(b, device=device)
    s = r.view(b, 1, 1) + r.view(1, b, 1) + r.view(1, 1, b)
    low = s <= b / 2 - 1
    high = s >= 5 * b / 2 - 2
    if band == "all":
        m = torch.ones_like(s, dtype=torch.bool)
    elif band == "low":
        m = low
    elif band == "high":
        m = high
    else:
        m = ~(low | high)
    if exclude_dc:
        m = m.clone()
        m[0, 0, 0] = False
    return m


# ---------------------------------------------------------------------------- rounding
def soft_round(x: torch.Tensor, a: float) -> torch.Tensor:
    """AdvDrop differentiable rounding (Duan et al., ICCV 2021), as used by VAFA.

    ``round_a(x) = floor(x) + 0.5 * (1 + s * tanh(k * (x - floor(x) - 0.5)))`` with
    ``k = ln(2/a - 1)`` and ``s = 1 / (1 - a)``.

    Why ``s = 1/(1 - a)``: at the cell edges ``r = x - floor(x) -> 0`` and ``-> 1`` the tanh
    term is ``-/+ tanh(k/2)``, so ``round_a`` hits ``floor(x)`` and ``floor(x) + 1`` (continuous
    across integers) iff ``s * tanh(k/2) = 1``. With ``e^k = 2/a - 1``,
    ``tanh(k/2) = (e^k - 1)/(e^k + 1) = (2/a - 2)/(2/a) = 1 - a``, hence ``s = 1/(1 - a)``.
    ``a -> 0`` gives hard rounding (k -> inf, s -> 1); larger ``a`` is smoother. The gradient
    ``0.5 s k sech^2(k (r - 0.5))`` is continuous too (equal at both cell edges).

    Args:
        x: any floating tensor.
        a: softness in the open interval (0, 1).

    Shape:
        same as ``x``.
    """
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.0 < a < 1.0):
        raise ValueError(f"a must be in the open interval (0, 1), got {a!r}.")
    k = math.log(2.0 / a - 1.0)
    s = 1.0 / (1.0 - a)
    fl = torch.floor(x).detach()
    return fl + 0.5 * (1.0 + s * torch.tanh(k * (x - fl - 0.5)))


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Straight-through rounding: ``round(x)`` forward, identity backward (gradient 1), i.e.
    :func:`volattack.ops.straight_through` of ``torch.round`` (the one home of the pattern).

    Shape:
        same as ``x``.
    """
    return straight_through(torch.round(x), x)


# ------------------------------------------------------------------------------- FFT
def rfft3(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal real 3D FFT over the last three dimensions (``torch.fft.rfftn``, norm "ortho").

    Shape:
        ``(..., H, W, D)`` real -> ``(..., H, W, D // 2 + 1)`` complex.
    """
    return torch.fft.rfftn(x, dim=(-3, -2, -1), norm="ortho")


def irfft3(spectrum: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`rfft3` for a real signal of spatial ``size`` ``(H, W, D)``.

    Entries of the half spectrum that must be Hermitian-symmetric (the ``D`` index 0 and,
    for even ``D``, ``D/2`` planes) are effectively replaced by their Hermitian part.

    Shape:
        ``(..., H, W, D // 2 + 1)`` complex -> ``(..., H, W, D)`` real.
    """
    return torch.fft.irfftn(spectrum, s=tuple(int(s) for s in size), dim=(-3, -2, -1), norm="ortho")


def rfft_radius(
    size: Sequence[int], *, dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """Radial frequency of every :func:`rfft3` bin, in units of the Nyquist frequency.

    ``r = sqrt(sum_d (f_d / 0.5)^2)`` with ``f_d`` in cycles per voxel (``torch.fft.fftfreq``,
    ``rfftfreq`` on the last axis): 0 at DC, 1 at the Nyquist frequency of one axis, up to
    ``sqrt(3)`` in the corner.

    Shape:
        ``(H, W, D // 2 + 1)``.
    """
    h, w, d = (int(s) for s in size)
    fh = torch.fft.fftfreq(h, dtype=dtype, device=device) * 2
    fw = torch.fft.fftfreq(w, dtype=dtype, device=device) * 2
    fd = torch.fft.rfftfreq(d, dtype=dtype, device=device) * 2
    return (fh.view(-1, 1, 1) ** 2 + fw.view(1, -1, 1) ** 2 + fd.view(1, 1, -1) ** 2).sqrt()


def rfft_mask(
    size: Sequence[int],
    band: str = "all",
    *,
    radius: Optional[tuple[float, float]] = None,
    exclude_dc: bool = False,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """Boolean mask of :func:`rfft3` bins inside a frequency band and/or radius range.

    Bands (radius in Nyquist units, see :func:`rfft_radius`, and :data:`FFT_BAND_EDGES`):
    ``"low"`` ``[0, 1/3)``, ``"middle"`` ``[1/3, 2/3)``, ``"high"`` ``[2/3, inf)``, ``"all"``.
    ``radius=(r_min, r_max)`` further keeps ``r_min <= r <= r_max``.

    Shape:
        ``(H, W, D // 2 + 1)`` bool.
    """
    check_band(band)
    r = rfft_radius(size, dtype=torch.float64, device=device)
    lo, hi = FFT_BAND_EDGES[band]
    m = (r >= lo) & (r < hi)
    if radius is not None:
        r_min, r_max = radius
        if not (0.0 <= r_min <= r_max):
            raise ValueError(f"radius must be (r_min, r_max) with 0 <= r_min <= r_max, got {radius!r}.")
        m = m & (r >= r_min) & (r <= r_max)
    if exclude_dc:
        m[0, 0, 0] = False
    return m
