"""Input validation of the attack contract: images, label maps, perturbation masks and the
autocast dtype.

Each check raises ``ValueError`` naming the parameter and the bad value, before any model call.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["AMP_DTYPES", "check_images", "check_labels", "check_mask", "parse_amp_dtype"]

#: ``amp_dtype`` values accepted by :class:`Attack` (strings as YAML gives them)
AMP_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_amp_dtype(amp_dtype: Any) -> Optional[torch.dtype]:
    """``None``, ``torch.float16``/``torch.bfloat16`` or their names ``"float16"``/``"bfloat16"``
    (as a YAML config gives them) -> the torch dtype; anything else raises ``ValueError`` naming it."""
    if amp_dtype is None or amp_dtype in (torch.float16, torch.bfloat16):
        return amp_dtype
    if isinstance(amp_dtype, str) and amp_dtype in AMP_DTYPES:
        return AMP_DTYPES[amp_dtype]
    raise ValueError(
        f"amp_dtype must be None, torch.float16, torch.bfloat16, 'float16' or 'bfloat16', got {amp_dtype!r}."
    )


def check_images(images: Any, *, spatial_dims: int, bounds: Sequence[float]) -> torch.Tensor:
    """Finite floating images of rank ``2 + spatial_dims`` inside ``bounds`` (1e-6 relative
    tolerance); returns them detached.

    Shape:
        ``(B, C, *spatial)``.
    """
    if not torch.is_tensor(images):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}.")
    want = 2 + spatial_dims
    if images.ndim != want:
        axes = ", ".join("HWD"[:spatial_dims]) if spatial_dims <= 3 else "..."
        raise ValueError(f"images must be {want}-D (B, C, {axes}), got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}.")
    if images.numel() == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}.")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or Inf values.")
    lo, hi = bounds
    tol = 1e-6 * max(1.0, hi - lo)
    if bool((images < lo - tol).any()) or bool((images > hi + tol).any()):
        raise ValueError(
            f"images must lie inside bounds {tuple(bounds)}, got values in "
            f"[{float(images.min()):.6g}, {float(images.max()):.6g}]."
        )
    return images.detach()


def check_labels(labels: Any, x: torch.Tensor, name: str = "labels") -> torch.Tensor:
    """Non-negative integer class indices matching ``x``; returns them as long on x's device.

    Shape:
        ``(B, 1, *spatial)`` or ``(B, *spatial)`` -> ``(B, 1, *spatial)``.
    """
    if not torch.is_tensor(labels):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}.")
    spatial = tuple(x.shape[2:])
    if labels.ndim == x.ndim - 1:
        labels = labels.unsqueeze(1)
    if (
        labels.ndim != x.ndim
        or labels.shape[0] != x.shape[0]
        or labels.shape[1] != 1
        or tuple(labels.shape[2:]) != spatial
    ):
        raise ValueError(
            f"{name} must have shape {(x.shape[0], 1) + spatial} to match images {tuple(x.shape)}, "
            f"got {tuple(labels.shape)}."
        )
    if labels.is_floating_point():
        if not bool((labels == labels.round()).all()):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values.")
    elif labels.dtype == torch.bool:
        labels = labels.long()
    if bool((labels < 0).any()):
        raise ValueError(f"{name} must be >= 0, got minimum {int(labels.min())}.")
    return labels.to(device=x.device, dtype=torch.long)


def check_mask(mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A perturbation mask broadcastable to ``x`` with its spatial size, as 0/1 in x's dtype.

    Shape:
        ``(B or 1, C or 1, *spatial)`` or ``(B or 1, *spatial)`` -> ``(B or 1, C or 1, *spatial)``.
    """
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}.")
    if mask.ndim == x.ndim - 1:  # (B, *spatial) or (1, *spatial)
        mask = mask.unsqueeze(1)
    try:
        torch.broadcast_shapes(tuple(mask.shape), tuple(x.shape))
        ok = mask.ndim == x.ndim and tuple(mask.shape[2:]) == tuple(x.shape[2:])
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask must be broadcastable to images {tuple(x.shape)} with the same spatial size, "
            f"got {tuple(mask.shape)}."
        )
    return (mask != 0).to(device=x.device, dtype=x.dtype)
