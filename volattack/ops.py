"""Small tensor operations shared by inference, attacks, defences, training and metrics (the
lowest torch layer: imports nothing else of volattack)."""

from __future__ import annotations

from typing import Any

import torch


def first_head(out: Any) -> torch.Tensor:
    """The logits of a model output: the first head of a deep-supervision output (a tuple or
    list of logits, finest first, as MONAI's and nnU-Net's networks return), else ``out``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass
    (straight-through estimator; Bengio et al. 2013, BPDA of Athalye et al. 2018).

    Shape:
        value and surrogate of one shape -> that shape.
    """
    return surrogate + (value - surrogate).detach()


def per_sample_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` tensor to broadcast against ``like`` ``(B, ...)`` (rank-agnostic)."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm.

    Shape:
        ``(B, ...)`` -> ``(B,)``.
    """
    return v.flatten(1).norm(dim=1)


def seed_from(*values: int) -> int:
    """A 63-bit seed mixed from integers (numpy ``SeedSequence``), for independent random streams
    (e.g. ``seed_from(seed, sample_index)``)."""
    import numpy as np

    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0]
    return int(state >> np.uint64(1))


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (every parameter's and buffer's name, dtype, shape and bytes, in
    ``state_dict`` order): what a cached result computed with these weights is keyed on.

    Returns:
        64 hex digits.
    """
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not torch.is_tensor(t):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def place_for_inference(module: torch.nn.Module, map_location: Any = None) -> torch.nn.Module:
    """Move a freshly loaded network to ``map_location`` (when it names a device) and set eval mode.

    ``torch.load``'s other forms of ``map_location`` (a callable, a dict) have already placed the
    tensors while loading, so ``.to`` is skipped for them.
    """
    if map_location is not None:
        try:
            module.to(map_location)
        except (TypeError, RuntimeError):  # callable / dict map_location: tensors already placed
            pass
    return module.eval()
