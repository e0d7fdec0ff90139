"""Perceptibility of a perturbation: norms in input and original units, PSNR, 3D SSIM.

Attacks are compared at matched *measured* budgets (L-inf, RMS, SSIM), not at
nominal parameters; these functions measure them per sample.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from monai.metrics.regression import compute_ssim_and_cs

__all__ = ["perturbation_stats", "ssim3d"]

logger = logging.getLogger(__name__)

_KERNEL_TYPES = ("gaussian", "uniform")


def _check_images(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str]) -> None:
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


def ssim3d(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 7,
    kernel_type: str = "gaussian",
    kernel_sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (SSIM) of two volumes (or images), one value per sample.

    Definition (Wang et al., IEEE TIP 2004), computed by MONAI's
    ``compute_ssim_and_cs`` in 3D (2D for 4-D inputs, ``spatial_dims = x.ndim - 2``):
    local means, variances and covariance under a window w (Gaussian with standard
    deviation ``kernel_sigma`` voxels, truncated to ``win_size`` voxels per axis and
    normalised; or uniform), then::

        SSIM map = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
        C1 = (0.01 * data_range)^2,  C2 = (0.03 * data_range)^2

    and the result is the mean of the map over channels and all "valid" window
    positions (no padding). Along an axis shorter than ``win_size`` the window is
    reduced to the largest odd size that fits (``n`` if ``n`` is odd, else ``n - 1``),
    so tiny volumes and thin slabs work. Differentiable (can serve as an attack
    objective). 1 for identical inputs, lower for dissimilar ones.

    Args:
        x: reference images (e.g. the clean input).
        y: compared images (e.g. the adversarial input), same shape as ``x``.
        data_range: dynamic range of the images in input units (``hi - lo``), > 0.
        win_size: odd window size in voxels (>= 1) per axis, before reduction.
        kernel_type: ``"gaussian"`` or ``"uniform"``.
        kernel_sigma: standard deviation of the Gaussian window in voxels, > 0.

    Shape:
        x, y: ``(B, C, H, W, D)`` or ``(B, C, H, W)`` floating.
        Output: ``(B,)`` in the dtype of ``x`` (computed in float32), unitless, at most 1.

    Raises:
        ValueError: shapes differ, ``x`` is not 4-D or 5-D, ``data_range <= 0``,
            ``win_size`` not a positive odd integer, unknown ``kernel_type``,
            ``kernel_sigma <= 0``.
    """
    _check_images(x, y, ("x", "y"))
    if x.ndim not in (4, 5):
        raise ValueError(f"x must have shape (B, C, H, W[, D]) (2 or 3 spatial dims), got {tuple(x.shape)}.")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}.")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"data_range must be a positive number, got {data_range}.")
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}.")
    if kernel_type not in _KERNEL_TYPES:
        raise ValueError(f"kernel_type must be one of {_KERNEL_TYPES}, got {kernel_type!r}.")
    if isinstance(kernel_sigma, bool) or not isinstance(kernel_sigma, (int, float)) or not kernel_sigma > 0:
        raise ValueError(f"kernel_sigma must be a positive number, got {kernel_sigma}.")
    spatial_dims = x.ndim - 2
    kernel_size = [min(win_size, n if n % 2 == 1 else n - 1) for n in x.shape[2:]]
    if kernel_size != [win_size] * spatial_dims:
        logger.debug("ssim3d: window %d reduced to %s for spatial shape %s", win_size, kernel_size, tuple(x.shape[2:]))
    ssim_map, _ = compute_ssim_and_cs(
        x,
        y,
        spatial_dims=spatial_dims,
        kernel_size=kernel_size,
        kernel_sigma=[float(kernel_sigma)] * spatial_dims,
        data_range=float(data_range),
        kernel_type=kernel_type,
    )
    return ssim_map.flatten(1).mean(1).to(x.dtype)


def perturbation_stats(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    data_range: Sequence[float] = (0.0, 1.0),
    unit_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Size of the perturbation ``delta = x_adv - x`` of each sample.

    Definitions, per sample over all N non-batch elements (channels and voxels),
    with ``R = data_range[1] - data_range[0]``:

    * ``linf`` = max |delta| (input units);
    * ``l2`` = sqrt(sum delta^2) (input units; grows with the volume size);
    * ``rms`` = sqrt(mean delta^2) = l2 / sqrt(N) (input units; size-independent);
    * ``linf_units``, ``rms_units`` (only when ``unit_scale`` is given) = ``linf`` and
      ``rms`` times ``unit_scale``, the original units per input unit -- e.g. 425 HU
      for CT windowed from [-175, 250] HU to [0, 1], so these are in HU;
    * ``psnr`` = 10 log10(R^2 / mean delta^2) in dB, ``inf`` when x_adv == x;
    * ``ssim`` = :func:`ssim3d` (x, x_adv, data_range=R) with its defaults (Gaussian
      window 7, sigma 1.5).

    The difference is taken in float64; results are returned in the floating dtype
    of the inputs, detached (a report, not a loss).

    Args:
        x: clean images in the model's input range.
        x_adv: perturbed images, same shape as ``x``.
        data_range: ``(lo, hi)`` input range, ``hi > lo``; ``R = hi - lo`` sets PSNR and SSIM.
        unit_scale: original units per input unit (> 0), e.g. HU per unit; None to skip.

    Shape:
        x, x_adv: ``(B, C, H, W, D)`` or ``(B, C, H, W)`` floating.
        Output: dict of ``(B,)`` tensors with keys ``linf``, ``rms``, ``l2``, ``psnr``,
        ``ssim`` and, with ``unit_scale``, ``linf_units``, ``rms_units``.

    Raises:
        ValueError: shapes differ, non-floating inputs, ``data_range`` not ``(lo, hi)``
            with ``hi > lo``, ``unit_scale <= 0``, or the inputs are not 4-D/5-D.
    """
    _check_images(x, x_adv, ("x", "x_adv"))
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi) of numbers, got {data_range!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be (lo, hi) with finite lo < hi, got {tuple(data_range)}.")
    if unit_scale is not None and (
        isinstance(unit_scale, bool)
        or not isinstance(unit_scale, (int, float))
        or not (math.isfinite(unit_scale) and unit_scale > 0)
    ):
        raise ValueError(
            f"unit_scale must be a positive finite number (original units per input unit), got {unit_scale}."
        )
    x = x.detach()
    x_adv = x_adv.detach()
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
        ssim = ssim3d(x.to(out_dtype), x_adv.to(out_dtype), data_range=rng)
    stats = {"linf": linf, "rms": rms, "l2": l2, "psnr": psnr, "ssim": ssim}
    if unit_scale is not None:
        stats["linf_units"] = linf * float(unit_scale)
        stats["rms_units"] = rms * float(unit_scale)
    return {k: v.to(out_dtype) for k, v in stats.items()}
