"""Blockwise-DCT defences: a low-pass filter (linear) and 3D JPEG-like quantisation (BPDA)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from volattack.attacks.spectral import block_merge, block_split, dct3, idct3, soft_round
from volattack.checks import check_block_size, check_number
from volattack.defenses.registry import register_defense
from volattack.defenses.transforms.base import BPDAMixin, InputTransform, check_bpda, check_images


def _index_sum(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``i + j + k`` for every coefficient of a DCT block of ``shape`` ``(b1, b2, b3)``."""
    a, b, c = (torch.arange(n, device=device) for n in shape)
    return a.view(-1, 1, 1) + b.view(1, -1, 1) + c.view(1, 1, -1)


def _to_blocks(x: torch.Tensor, block_size: Optional[int]) -> torch.Tensor:
    """DCT coefficients: whole volume ``(B, C, H, W, D)`` or blockwise ``(B, C, n.., b, b, b)``."""
    return dct3(x) if block_size is None else dct3(block_split(x, block_size))


def _from_blocks(coeffs: torch.Tensor, shape: torch.Size, block_size: Optional[int]) -> torch.Tensor:
    return idct3(coeffs) if block_size is None else block_merge(idct3(coeffs), shape)


@register_defense("dct_lowpass")
class DCTLowPass(InputTransform):
    """Blockwise DCT low-pass filter: keep coefficients with ``i + j + k <= keep``.

    Each non-overlapping ``b^3`` block (:func:`~volattack.attacks.spectral.block_split`,
    replicate padding of sides that are not multiples of b, cropped after the merge) is
    transformed with the orthonormal 3D DCT; coefficients whose index sum exceeds ``keep`` are
    zeroed; the block is transformed back. Linear, hence differentiable. ``keep=0`` replaces
    each block by its mean; ``keep=None`` (or ``>= 3 (b - 1)``) keeps everything (identity up
    to round-off).

    Args:
        block_size: block side b in voxels (>= 1), or None for the whole volume (index sums
            then run over the volume's own coefficient grid).
        keep: largest kept index sum ``i + j + k`` (>= 0), or None / ``"all"`` to keep all.

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    def __init__(self, block_size: Optional[int] = 8, keep: Union[int, str, None] = None) -> None:
        super().__init__()
        self.block_size = check_block_size(block_size)
        if keep == "all":
            keep = None
        if keep is not None:
            check_number("keep", keep, low=0, integer=True)
        self.keep = keep

    def describe_args(self) -> list[str]:
        return [f"block_size={self.block_size}", f"keep={'all' if self.keep is None else self.keep}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Low-passed images.

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        x = check_images(x)
        coeffs = _to_blocks(x, self.block_size)
        if self.keep is not None:
            coeffs = coeffs * (_index_sum(coeffs.shape[-3:], x.device) <= self.keep).to(coeffs.dtype)
        return _from_blocks(coeffs, x.shape, self.block_size)


@register_defense("dct_quant")
class DCTQuantization(BPDAMixin, InputTransform):
    """3D JPEG-like compression: hard quantisation of blockwise DCT coefficients (cf. Das et al.,
    "Keeping the Bad Guys Out", 2017, and Guo et al., ICLR 2018, for JPEG as a defence).

    On the quantisation scale ``v = intensity_scale * x`` (255: input [0, 1] -> 0..255, like
    VAFA), each ``b^3`` block's orthonormal DCT coefficients ``c`` become
    ``round(c / Q) * Q`` with the table ``Q[i, j, k] = q * (1 + growth * (i + j + k))``
    growing with frequency (``growth = 0``: a flat table); then the inverse DCT and
    ``/ intensity_scale``. No clamping. Rounding is hard (``torch.round``, half to even), so
    the autograd gradient is exactly zero: ``differentiable = False``, see ``bpda``.
    With an orthonormal DCT each coefficient moves by at most ``Q / 2``.

    Args:
        block_size: block side b (>= 1, JPEG: 8) or None for the whole volume.
        q: base quantisation step (the DC step) on the quantisation scale, > 0.
        growth: relative step growth per unit of index sum, >= 0.
        intensity_scale: quantisation-scale units per input unit, > 0.
        bpda: ``"none"``, ``"identity"`` or ``"smooth"`` (backward = gradient of the same
            quantisation with AdvDrop soft rounding of softness ``soft_round_a``).
        soft_round_a: softness in (0, 1) of the ``"smooth"`` surrogate (larger is smoother).

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    differentiable = False

    def __init__(
        self,
        block_size: Optional[int] = 8,
        q: float = 10.0,
        *,
        growth: float = 1.0,
        intensity_scale: float = 255.0,
        bpda: Optional[str] = "none",
        soft_round_a: float = 0.5,
    ) -> None:
        super().__init__()
        self.block_size = check_block_size(block_size)
        check_number("q", q, low=0, low_open=True)
        check_number("growth", growth, low=0)
        check_number("intensity_scale", intensity_scale, low=0, low_open=True)
        check_number("soft_round_a", soft_round_a, low=0, high=1, low_open=True, high_open=True)
        self.q = float(q)
        self.growth = float(growth)
        self.intensity_scale = float(intensity_scale)
        self.bpda = check_bpda(bpda)
        self.soft_round_a = float(soft_round_a)

    def describe_args(self) -> list[str]:
        return [f"block_size={self.block_size}", f"q={self.q}", f"growth={self.growth}",
                f"intensity_scale={self.intensity_scale}"]

    def table(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: Optional[torch.device] = None) -> torch.Tensor:
        """Quantisation table ``Q[i, j, k] = q * (1 + growth * (i + j + k))``.

        Shape:
            ``(b1, b2, b3)`` for a block of that shape.
        """
        s = _index_sum(shape, torch.device(device) if device is not None else torch.device("cpu"))
        return (self.q * (1.0 + self.growth * s.to(torch.float64))).to(dtype)

    def _quantize(self, x: torch.Tensor, rounding: str) -> torch.Tensor:
        coeffs = _to_blocks(x * self.intensity_scale, self.block_size)
        t = self.table(coeffs.shape[-3:], coeffs.dtype, x.device)
        v = coeffs / t
        r = torch.round(v) if rounding == "hard" else soft_round(v, self.soft_round_a)
        return _from_blocks(r * t, x.shape, self.block_size) / self.intensity_scale

    def smooth_approximation(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantisation with AdvDrop soft rounding (the BPDA ``"smooth"`` surrogate).

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        return self._quantize(x, "soft")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised images, with the backward pass chosen by ``bpda``.

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        x = check_images(x)
        return self.apply_bpda(x, self._quantize(x, "hard"))
