"""Smoothing defences: Gaussian smoothing (linear) and the median filter (BPDA)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from volattack.checks import check_number
from volattack.defenses.registry import register_defense
from volattack.defenses.transforms.base import BPDAMixin, InputTransform, check_bpda, check_images


@register_defense("gaussian")
class GaussianSmoothing(InputTransform):
    """Gaussian smoothing of each channel (a classic denoising defence; linear, differentiable).

    Separable MONAI filtering (``separable_filtering`` with ``gaussian_1d`` "erf" kernels
    truncated at ``truncated * sigma``, each normalised to sum 1) with **replicate** padding,
    so a constant volume is preserved exactly (up to float round-off), borders included.
    ``sigma = 0`` on an axis leaves that axis unfiltered.

    Args:
        sigma: standard deviation in **voxels** (not mm), one value or one per spatial axis, >= 0.
        truncated: kernel half-width in units of sigma, > 0.

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    def __init__(self, sigma: Union[float, Sequence[float]] = 1.0, truncated: float = 4.0) -> None:
        super().__init__()
        sig = [sigma] if isinstance(sigma, (int, float)) else list(sigma) if isinstance(sigma, (list, tuple)) else None
        if not sig:
            raise ValueError(f"sigma must be a number or a sequence of numbers, got {sigma!r}.")
        for s in sig:
            check_number("sigma", s, low=0)
        check_number("truncated", truncated, low=0, low_open=True)
        self.sigma = tuple(float(s) for s in sig)
        self.truncated = float(truncated)

    def describe_args(self) -> list[str]:
        s = self.sigma[0] if len(self.sigma) == 1 else self.sigma
        return [f"sigma={s}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Smoothed images.

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        from monai.networks.layers import separable_filtering
        from monai.networks.layers.convutils import gaussian_1d

        x = check_images(x, None)
        nd = x.ndim - 2
        sig = self.sigma * nd if len(self.sigma) == 1 else self.sigma
        if len(sig) != nd:
            raise ValueError(f"sigma must have 1 or {nd} values for {nd} spatial dims, got {len(sig)}.")
        if all(s == 0 for s in sig):
            return x
        one = torch.ones(1, dtype=x.dtype, device=x.device)
        kernels = [
            gaussian_1d(torch.tensor(s), truncated=self.truncated, approx="erf", normalize=True).to(x)
            if s > 0 else one
            for s in sig
        ]
        return separable_filtering(x, kernels, mode="replicate")


@register_defense("median")
class MedianFilter(BPDAMixin, InputTransform):
    """Median filter over a cubic window (Xu et al., "Feature Squeezing", NDSS 2018, in 3D).

    MONAI's ``median_filter`` (replicate padding at the borders). Its autograd gradient is the
    selection of each window's median voxel: sparse, and zero for voxels that are never a
    median (an isolated spike), hence ``differentiable = False`` and the ``bpda`` option.

    Args:
        kernel_size: odd window side in voxels (>= 1; 1 is the identity).
        bpda: ``"none"`` (autograd of the median), ``"identity"`` (backward = identity) or
            ``"smooth"`` (backward = gradient of the mean over the same window, the L2
            counterpart of the window median).

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    differentiable = False

    def __init__(self, kernel_size: int = 3, bpda: Optional[str] = "none") -> None:
        super().__init__()
        check_number("kernel_size", kernel_size, low=1, integer=True)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.kernel_size = int(kernel_size)
        self.bpda = check_bpda(bpda)

    def describe_args(self) -> list[str]:
        return [f"kernel_size={self.kernel_size}"]

    def median(self, x: torch.Tensor) -> torch.Tensor:
        """The exact median filter (autograd as torch provides it).

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        from monai.networks.layers import median_filter

        if self.kernel_size == 1:
            return x
        nd = x.ndim - 2
        return median_filter(x, kernel_size=[self.kernel_size] * nd, spatial_dims=nd)

    def smooth_approximation(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the same window (replicate padding): the BPDA ``"smooth"`` surrogate.

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        from monai.networks.layers import separable_filtering

        k = self.kernel_size
        box = torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device)
        return separable_filtering(x, [box] * (x.ndim - 2), mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Median-filtered images, with the backward pass chosen by ``bpda``.

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        x = check_images(x, None)
        return self.apply_bpda(x, self.median(x))
