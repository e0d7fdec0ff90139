"""The one definition of every reported perturbation size: L-inf, L2, RMS (input and source
units), PSNR and the 3D SSIM, plus the window code the SSIM objectives of the frequency attacks
share (bottom layer: imports torch only, nothing else of volattack).

Every attack's ``info``, :mod:`volattack.metrics` (which re-exports :func:`ssim3d` and
:func:`perturbation_stats`) and the evaluation report these numbers through this module, so the
same pair of images gives the same number everywhere (README, "Metric definitions").

SSIM (Wang et al., IEEE TIP 2004): local means, variances and covariance under a separable
window ``w`` (gaussian, sigma 1.5, 7 voxels per axis, normalised), then per window position::

    SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)),
    C1 = (0.01 R)^2,  C2 = (0.03 R)^2,  R = data range,

averaged over the "valid" positions (no padding; every window inside the image) and channels.
Along an axis shorter than the window the window shrinks to the largest odd size that fits
(:func:`ssim_window`). The separable window is applied as one ``einsum`` with a banded
``(n - w + 1, n)`` matrix per axis (:func:`valid_filter`): no loop over voxels or blocks, and the
same code filters a whole volume and the 8^3 blocks of VAFA / SA^2 (their per-block SSIM
*objective*, window 3, is :class:`volattack.attacks.spectral_base.PatchSSIM`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "KERNEL_TYPES",
    "band_matrix",
    "perturbation_stats",
    "ssim3d",
    "ssim_from_stats",
    "ssim_window",
    "valid_filter",
    "window_taps",
]

#: window shapes accepted by :func:`window_taps` and :func:`ssim3d`
KERNEL_TYPES: tuple[str, ...] = ("gaussian", "uniform")

#: SSIM stabilisers of Wang et al. 2004 (``C1 = (K1 R)^2``, ``C2 = (K2 R)^2``)
K1, K2 = 0.01, 0.03


def window_taps(
    win_size: int,
    sigma: float = 1.5,
    *,
    kernel_type: str = "gaussian",
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalised 1D window: sampled gaussian ``exp(-d^2 / (2 sigma^2))`` with ``d`` the offset from
    the centre (MONAI's SSIM window), or uniform ``1 / win_size``.

    Args:
        win_size: number of taps, >= 1.
        sigma: gaussian standard deviation in voxels, > 0 (ignored for ``"uniform"``).
        kernel_type: ``"gaussian"`` or ``"uniform"``.
        device, dtype: of the result (computed in float64).

    Shape:
        ``(win_size,)``, summing to 1.
    """
    if kernel_type == "uniform":
        w = torch.ones(win_size, dtype=torch.float64)
    else:
        d = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2.0
        w = torch.exp(-(d**2) / (2.0 * float(sigma) ** 2))
    return (w / w.sum()).to(device=device, dtype=dtype)


def ssim_window(spatial: Sequence[int], win_size: int = 7) -> list[int]:
    """Per-axis window sizes: ``win_size`` shrunk, on axes shorter than it, to the largest odd size
    that fits (``n`` if ``n`` is odd, else ``n - 1``; at least 1).

    Example: spatial ``(4, 5, 12)`` with window 7 -> ``[3, 5, 7]``.
    """
    return [max(1, min(int(win_size), n if n % 2 == 1 else n - 1)) for n in spatial]


def band_matrix(taps: torch.Tensor, n: int) -> torch.Tensor:
    """``(n - w + 1, n)`` matrix whose row ``a`` holds ``taps`` at columns ``a .. a + w - 1``: "valid"
    filtering of a length-``n`` axis as one matrix product.

    Shape:
        taps ``(w,)`` with ``w <= n`` -> ``(n - w + 1, n)``.
    """
    w = taps.numel()
    rows = torch.arange(n - w + 1, device=taps.device)[:, None]
    cols = torch.arange(n, device=taps.device)[None, :]
    k = cols - rows
    inside = (k >= 0) & (k < w)
    return torch.where(inside, taps[k.clamp(0, w - 1)], taps.new_zeros(()))


_AXES = "ijklmn"
_OUT = "abcdef"


def valid_filter(t: torch.Tensor, taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Separable "valid" filtering of the last ``len(taps)`` axes of ``t`` (one tap vector per axis):
    one ``einsum`` with the :func:`band_matrix` of every axis (no loop over voxels or blocks).

    Shape:
        ``(..., n_1, .., n_k)`` -> ``(..., n_1 - w_1 + 1, .., n_k - w_k + 1)`` with ``k = len(taps)``
        (1 to 6) and ``w_i = len(taps[i])``.
    """
    k = len(taps)
    if not 1 <= k <= len(_AXES) or t.ndim < k:
        raise ValueError(f"taps must give 1 to {len(_AXES)} axes of t (shape {tuple(t.shape)}), got {k}.")
    mats = [band_matrix(w, n) for w, n in zip(taps, t.shape[-k:])]
    src, dst = _AXES[:k], _OUT[:k]
    spec = "..." + src + "," + ",".join(dst[i] + src[i] for i in range(k)) + "->..." + dst
    return torch.einsum(spec, t, *mats)


def ssim_from_stats(
    mu_a: torch.Tensor,
    mu_b: torch.Tensor,
    var_a: torch.Tensor,
    var_b: torch.Tensor,
    cov: torch.Tensor,
    data_range: float,
) -> torch.Tensor:
    """The SSIM map from local statistics (Wang et al. 2004, k1 0.01, k2 0.03): luminance times
    contrast-structure, ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``.

    Shape:
        five tensors of one shape -> that shape.
    """
    c1, c2 = (K1 * float(data_range)) ** 2, (K2 * float(data_range)) ** 2
    return ((2 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)) * ((2 * cov + c2) / (var_a + var_b + c2))


def _check_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str]) -> None:
    for name, t in zip(names, (x, y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point image, got dtype {t.dtype}.")
    if x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {names[0]} {tuple(x.shape)} "
            f"and {names[1]} {tuple(y.shape)}."
        )
    if x.device != y.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got {x.device} and {y.device}.")


def _check_ssim_args(x: torch.Tensor, data_range: float, win_size: int, kernel_type: str, kernel_sigma: float) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(f"x must have shape (B, C, H, W[, D]) (2 or 3 spatial dims), got {tuple(x.shape)}.")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}.")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"data_range must be a positive number, got {data_range}.")
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}.")
    if kernel_type not in KERNEL_TYPES:
        raise ValueError(f"kernel_type must be one of {KERNEL_TYPES}, got {kernel_type!r}.")
    if isinstance(kernel_sigma, bool) or not isinstance(kernel_sigma, (int, float)) or not kernel_sigma > 0:
        raise ValueError(f"kernel_sigma must be a positive number, got {kernel_sigma}.")


def ssim3d(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 7,
    kernel_type: str = "gaussian",
    kernel_sigma: float = 1.5,
) -> torch.Tensor:
    """The reported SSIM: structural similarity of two volumes (or images), one value per sample.

    The definition of the module docstring: gaussian window of 7 voxels per axis with sigma 1.5
    (or uniform), shrunk per axis to fit (:func:`ssim_window`), k1 0.01, k2 0.03, mean over the
    valid window positions and the channels. 1 for identical inputs. Differentiable. Computed in
    float32 (float64 inputs in float64); equal to MONAI's ``compute_ssim_and_cs`` with the same
    window to float precision (tested).

    Args:
        x: reference images (e.g. the clean input).
        y: compared images (e.g. the adversarial input), same shape as ``x``.
        data_range: dynamic range of the images in input units (``hi - lo``), > 0.
        win_size: odd window size in voxels (>= 1) per axis, before shrinking.
        kernel_type: ``"gaussian"`` or ``"uniform"``.
        kernel_sigma: standard deviation of the gaussian window in voxels, > 0.

    Shape:
        x, y: ``(B, C, H, W, D)`` or ``(B, C, H, W)`` floating -> ``(B,)`` in the dtype of ``x``.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shapes or devices differ, non-floating inputs, ``x`` not 4-D or 5-D,
            ``data_range <= 0``, ``win_size`` not a positive odd integer, unknown
            ``kernel_type``, ``kernel_sigma <= 0``.
    """
    _check_pair(x, y, ("x", "y"))
    _check_ssim_args(x, data_range, win_size, kernel_type, kernel_sigma)
    wd = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    a, b = x.to(wd), y.to(wd)
    taps = [
        window_taps(w, kernel_sigma, kernel_type=kernel_type, device=a.device, dtype=wd)
        for w in ssim_window(a.shape[2:], win_size)
    ]
    st = valid_filter(torch.stack([a, b, a * a, b * b, a * b]), taps)
    mu_a, mu_b = st[0], st[1]
    s = ssim_from_stats(mu_a, mu_b, st[2] - mu_a * mu_a, st[3] - mu_b * mu_b, st[4] - mu_a * mu_b, data_range)
    return s.flatten(1).mean(dim=1).to(x.dtype)


def _check_range(data_range: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi) of numbers, got {data_range!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be (lo, hi) with finite lo < hi, got {tuple(data_range)}.")
    return lo, hi


def perturbation_stats(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    data_range: Sequence[float] = (0.0, 1.0),
    unit_scale: float | None = None,
    *,
    with_ssim: bool = True,
) -> dict[str, torch.Tensor]:
    """Size of the perturbation ``delta = x_adv - x`` of each sample (what every attack reports).

    Definitions, per sample over all N non-batch elements (channels and voxels),
    with ``R = data_range[1] - data_range[0]``:

    * ``linf`` = max |delta| (input units);
    * ``l2`` = sqrt(sum delta^2) (input units; grows with the volume size);
    * ``rms`` = sqrt(mean delta^2) = l2 / sqrt(N) (input units; size-independent);
    * ``linf_units``, ``rms_units`` (only when ``unit_scale`` is given) = ``linf`` and
      ``rms`` times ``unit_scale``, the source units per input unit -- e.g. 425 HU
      for CT windowed from [-175, 250] HU to [0, 1], so these are in HU;
    * ``psnr`` = 10 log10(R^2 / mean delta^2) in dB, ``inf`` when x_adv == x;
    * ``ssim`` = :func:`ssim3d` (x, x_adv, data_range=R) with its defaults (gaussian
      window 7, sigma 1.5), unless ``with_ssim=False``.

    The difference is taken in float64; results are returned in the floating dtype
    of the inputs, detached (a report, not a loss).

    Args:
        x: clean images in the model's input range.
        x_adv: perturbed images, same shape as ``x``.
        data_range: ``(lo, hi)`` input range, ``hi > lo``; ``R = hi - lo`` sets PSNR and SSIM.
        unit_scale: source units per input unit (> 0), e.g. HU per unit; None to skip.
        with_ssim: compute ``ssim`` (the most expensive entry).

    Shape:
        x, x_adv: ``(B, C, H, W, D)`` or ``(B, C, H, W)`` floating.
        Output: dict of ``(B,)`` tensors with keys ``linf``, ``rms``, ``l2``, ``psnr``,
        ``ssim`` and, with ``unit_scale``, ``linf_units``, ``rms_units``.

    Raises:
        ValueError: shapes differ, non-floating inputs, ``data_range`` not ``(lo, hi)``
            with ``hi > lo``, ``unit_scale <= 0``, or the inputs are not 4-D/5-D.
    """
    _check_pair(x, x_adv, ("x", "x_adv"))
    if with_ssim and x.ndim not in (4, 5):
        raise ValueError(f"x must have shape (B, C, H, W[, D]) (2 or 3 spatial dims), got {tuple(x.shape)}.")
    lo, hi = _check_range(data_range)
    if unit_scale is not None and (
        isinstance(unit_scale, bool)
        or not isinstance(unit_scale, (int, float))
        or not (math.isfinite(unit_scale) and unit_scale > 0)
    ):
        raise ValueError(
            f"unit_scale must be a positive finite number (source units per input unit), got {unit_scale}."
        )
    x, x_adv = x.detach(), x_adv.detach()
    out_dtype = torch.promote_types(x.dtype, x_adv.dtype)
    rng = hi - lo
    with torch.no_grad():
        delta = (x_adv.double() - x.double()).flatten(1)
        linf = delta.abs().amax(1)
        sq = delta.pow(2)
        l2 = sq.sum(1).sqrt()
        mse = sq.mean(1)
        rms = mse.sqrt()
        psnr = 10.0 * torch.log10(rng**2 / mse)  # rng^2 / 0 = inf -> psnr inf for identical inputs
        stats = {"linf": linf, "rms": rms, "l2": l2, "psnr": psnr}
        if with_ssim:
            stats["ssim"] = ssim3d(x.to(out_dtype), x_adv.to(out_dtype), data_range=rng)
    if unit_scale is not None:
        stats["linf_units"] = linf * float(unit_scale)
        stats["rms_units"] = rms * float(unit_scale)
    return {k: v.to(out_dtype) for k, v in stats.items()}
