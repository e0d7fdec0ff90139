"""The input-transform base class and the BPDA plumbing shared by the registered transforms.

A transform is an ``nn.Module`` mapping images ``(B, C, H, W, D)`` (model-input units) to images
of the same shape. The class states what the evaluation needs to know about it:

- ``differentiable``: False when autograd through it is useless or misleading for an attacker
  (zero or sparse gradients); such a transform has a ``bpda`` mode (:class:`BPDAMixin`);
- ``randomized``: True when its output is random; its ``forward`` then takes a ``generator``
  keyword and :meth:`InputTransform.reseed` restarts its own stream;
- :meth:`InputTransform.describe`: ``Name(arguments)``, with or without the BPDA mode.

BPDA (Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML
2018): ``"none"`` is plain autograd, ``"identity"`` the straight-through identity backward pass,
``"smooth"`` the gradient of the transform's ``smooth_approximation``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from volattack.defenses.config import DEFENSE_BPDA
from volattack.ops import straight_through

#: BPDA modes of the non-differentiable transforms and of ``adaptive_wrapper``
BPDA_MODES: tuple[str, ...] = DEFENSE_BPDA


def check_bpda(bpda: Any) -> str:
    """``None`` -> ``"none"``; one of :data:`BPDA_MODES`, else ``ValueError`` with a suggestion."""
    if bpda is None:
        return "none"
    if not isinstance(bpda, str) or bpda not in BPDA_MODES:
        from volattack.registry import suggest

        raise ValueError(
            f"bpda must be one of {', '.join(BPDA_MODES)}, got {bpda!r}.{suggest(str(bpda), BPDA_MODES)}"
        )
    return bpda


def check_images(x: Any, spatial_dims: Optional[int] = 3) -> torch.Tensor:
    """A floating-point tensor ``(B, C, *spatial)`` (with ``spatial_dims`` axes when given)."""
    if not torch.is_tensor(x):
        raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}.")
    if spatial_dims is not None and x.ndim != 2 + spatial_dims:
        raise ValueError(f"images must be {2 + spatial_dims}-D (B, C, H, W, D), got shape {tuple(x.shape)}.")
    if x.ndim < 3:
        raise ValueError(f"images must be (B, C, *spatial), got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"images must be floating point, got dtype {x.dtype}.")
    return x


class InputTransform(nn.Module):
    """Base class of the input transforms (shape-preserving maps of images).

    Class attributes:
        differentiable: False when autograd through the transform is useless or misleading for
            an attacker (zero or sparse gradients); such transforms have a ``bpda`` mode.
        randomized: True when the output is random; its ``forward`` then accepts a
            ``generator`` keyword and it overrides :meth:`reseed`.

    Subclasses list their arguments in :meth:`describe_args`.

    Shape:
        ``(B, C, H, W, D)`` -> ``(B, C, H, W, D)``.
    """

    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False

    def describe_args(self) -> list[str]:
        """The constructor arguments shown by :meth:`describe` (``["sigma=1.0"]``), BPDA mode excluded."""
        return []

    def describe(self, with_bpda: bool = True) -> str:
        """``Name(arguments)``, e.g. ``MedianFilter(kernel_size=3, bpda='identity')``; with
        ``with_bpda=False`` the BPDA mode is left out (the forward pass does not depend on it)."""
        args = self.describe_args()
        if with_bpda and hasattr(self, "bpda"):
            args = args + [f"bpda={self.bpda!r}"]
        return f"{type(self).__name__}({', '.join(args)})"

    def extra_repr(self) -> str:
        return self.describe()[len(type(self).__name__) + 1 : -1]

    def reseed(self, seed: int) -> None:
        """Restart the transform's own random stream from ``seed`` (nothing to do when deterministic)."""


class BPDAMixin:
    """Shared BPDA plumbing: ``bpda`` attribute, :meth:`with_bpda` and the straight-through forward."""

    bpda: str

    def with_bpda(self, bpda: str) -> "InputTransform":
        """A copy of this transform with BPDA mode ``bpda`` (``"none"``, ``"identity"``, ``"smooth"``)."""
        new = copy.deepcopy(self)
        new.bpda = check_bpda(bpda)
        return new  # type: ignore[return-value]

    def apply_bpda(self, x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        """``exact`` forward; backward per ``bpda`` (autograd, identity, or the smooth surrogate)."""
        if self.bpda == "none":
            return exact
        if self.bpda == "identity":
            return straight_through(exact, x)
        return straight_through(exact, self.smooth_approximation(x))  # type: ignore[attr-defined]
