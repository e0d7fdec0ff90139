"""Per-sample random streams of an attack call.

Every random draw of sample ``b`` of a call (random start, noise, SA^2's initial factors, the
random starts of restarts) comes from its own CPU ``torch.Generator`` seeded with
``volattack.ops.seed_from(seed, sample_ids[b])`` (restart ``r > 0``:
``seed_from(seed, sample_ids[b], r)``). So a batch with sample ids ``[i, j]`` draws exactly what
its samples attacked alone with ``[i]`` and ``[j]`` draw, two samples of one batch never share a
draw, and a seeded call replays bit for bit. Draws are made in float32 on the CPU (identical on
every device) and then moved to the device and dtype of the tensor they perturb.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from volattack.checks import is_int
from volattack.ops import seed_from

__all__ = ["RandomStreams", "check_sample_ids"]

#: noise kinds of :meth:`RandomStreams.noise`
NOISE_KINDS: tuple[str, ...] = ("uniform", "normal")


def check_sample_ids(sample_ids: Optional[Any], batch: int) -> tuple[int, ...]:
    """Validate per-sample ids: ``None`` gives ``(0, .., batch - 1)``; otherwise a sequence (list,
    tuple, range, 1-D integer tensor or array) of ``batch`` non-negative integers.

    Raises:
        ValueError: naming ``sample_ids`` and the bad value or length.
    """
    if sample_ids is None:
        return tuple(range(batch))
    if torch.is_tensor(sample_ids):
        if sample_ids.ndim != 1 or sample_ids.is_floating_point() or sample_ids.is_complex():
            raise ValueError(f"sample_ids must be a 1-D integer tensor, got {sample_ids!r}.")
        sample_ids = sample_ids.tolist()
    if isinstance(sample_ids, (str, bytes)) or not hasattr(sample_ids, "__len__"):
        raise ValueError(f"sample_ids must be a sequence of {batch} non-negative integers, got {sample_ids!r}.")
    ids = list(sample_ids)
    if len(ids) != batch:
        raise ValueError(f"sample_ids must hold one id per sample ({batch}), got {len(ids)}: {ids!r}.")
    out = []
    for v in ids:
        if hasattr(v, "item") and not isinstance(v, (int, float)):  # numpy integer scalars
            v = v.item()
        if not is_int(v) or v < 0:
            raise ValueError(f"sample_ids must be non-negative integers, got {v!r} in {ids!r}.")
        out.append(int(v))
    return tuple(out)


class RandomStreams:
    """One seeded CPU generator per sample of an attack call (see the module docstring).

    Args:
        seed: the call's seed (``Attack.seed`` or ``run(seed=...)``), >= 0.
        sample_ids: one non-negative id per sample (see :func:`check_sample_ids`).
        restart: restart index; 0 is the plain call.

    Successive draws of one sample continue its generator, so their order inside an attack is
    part of its definition (e.g. PGD-L2: direction, then radius).
    """

    def __init__(self, seed: int, sample_ids: Sequence[int], restart: int = 0) -> None:
        self.seed = int(seed)
        self.sample_ids = tuple(int(i) for i in sample_ids)
        self.restart = int(restart)
        self.generators = []
        for i in self.sample_ids:
            g = torch.Generator(device="cpu")
            g.manual_seed(seed_from(self.seed, i) if self.restart == 0 else seed_from(self.seed, i, self.restart))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def for_restart(self, restart: int) -> "RandomStreams":
        """Fresh streams of restart ``restart`` for the same seed and samples."""
        return RandomStreams(self.seed, self.sample_ids, restart)

    def noise(self, like: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
        """Per-sample noise shaped like ``like`` ``(B, ...)``: sample b's slice is drawn from its own
        generator, ``"uniform"`` in [-1, 1) or ``"normal"`` (standard normal).

        Shape:
            ``like`` ``(B, ...)`` -> same shape, on ``like``'s device and dtype.
        """
        if kind not in NOISE_KINDS:
            raise ValueError(f"kind must be 'uniform' or 'normal', got {kind!r}.")
        self._check_batch(like)
        shape = tuple(like.shape[1:])
        if kind == "uniform":
            draws = [torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1 for g in self.generators]
        else:
            draws = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)

    def uniform(self, like: torch.Tensor) -> torch.Tensor:
        """One ``U[0, 1)`` number per sample (next draw of each generator).

        Shape:
            ``like`` ``(B, ...)`` -> ``(B,)`` on ``like``'s device and dtype.
        """
        self._check_batch(like)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float32) for g in self.generators])
        return u.to(device=like.device, dtype=like.dtype)

    def _check_batch(self, like: torch.Tensor) -> None:
        if like.shape[0] != len(self):
            raise ValueError(
                f"the tensor has {like.shape[0]} samples but the streams hold {len(self)} (sample_ids "
                f"{list(self.sample_ids)})."
            )
