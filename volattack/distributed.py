"""PyTorch distributed (``torchrun``) plumbing shared by training and evaluation.

One implementation of joining the process group, choosing this rank's device and the few
collectives volattack needs, so that training (DDP) and evaluation (cases sharded over ranks)
agree: on CUDA each rank binds to GPU ``LOCAL_RANK`` with ``torch.cuda.set_device`` *before*
the NCCL group is created (otherwise every rank's collectives would run on ``cuda:0``); on
CPU the backend is gloo.

Usage::

    ctx, device = setup_distributed(resolve_device("auto"))
    ...                      # work on ctx.rank's share
    barrier(ctx, device)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.

    Attributes:
        rank: this process's rank in ``[0, world)``.
        world: number of ranks (1 without torchrun).
        created: True when :func:`setup_distributed` created the process group (the caller then
            destroys it at the end with :func:`teardown`).
    """

    rank: int = 0
    world: int = 1
    created: bool = False


def env_int(name: str, default: int) -> int:
    """Integer environment variable ``name`` (``default`` when unset or empty).

    Raises:
        ValueError: the variable is set but not an integer (names the variable and the value).
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}.") from e


#: process groups created by :func:`setup_distributed` in this process (each gets its own store prefix)
_groups_created = 0


def _init_process_group(backend: str) -> None:
    """``init_process_group`` by the ``env://`` rendezvous, under a store prefix of its own.

    ``destroy_process_group`` resets torch's group counter, so a second default group made the
    ordinary way in the same torchrun worker (a second ``train``, or ``train`` then an
    evaluation) would reuse the first group's keys, still held by the launcher's store, and its
    gloo/nccl rendezvous could pair ranks by stale addresses and hang. Every rank calls this the
    same number of times, so the ``volattack.group.<n>`` prefixes agree across ranks.
    """
    import torch.distributed as dist

    global _groups_created
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"volattack.group.{_groups_created}", store)
    _groups_created += 1
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)


def local_cuda_device() -> torch.device:
    """This rank's GPU: ``cuda:LOCAL_RANK`` under torchrun (``cuda:0`` without it), made current
    with ``torch.cuda.set_device``."""
    device = torch.device("cuda", env_int("LOCAL_RANK", 0))
    torch.cuda.set_device(device)
    return device


def setup_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join (or create) the process group when launched by torchrun with ``WORLD_SIZE > 1``.

    The backend is nccl for a CUDA device and gloo otherwise; on CUDA each rank uses the GPU
    ``LOCAL_RANK`` (set current before the group exists, as NCCL requires). An already
    initialised group of more than one rank is used as it is (and left alive at the end).

    Args:
        device: the device asked for (``cpu`` or ``cuda``; the index is replaced by
            ``LOCAL_RANK`` under torchrun).

    Returns:
        The rank description and the device this rank works on.

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but torch has no distributed support.
    """
    import torch.distributed as dist

    ws = env_int("WORLD_SIZE", 1)
    initialised = dist.is_available() and dist.is_initialized()
    if ws <= 1 and not (initialised and dist.get_world_size() > 1):
        return DistContext(), device
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={ws} but this torch build has no torch.distributed support.")
    if device.type == "cuda":  # before init: nccl binds to the current device
        device = local_cuda_device()
    created = False
    if not initialised:
        _init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()
    logger.info("Distributed run: rank %d of %d on %s (%s).", rank, world, device, dist.get_backend())
    return DistContext(rank, world, created), device


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if ctx.created:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistContext, device: torch.device) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def all_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks (identity in a single process); the same result on every rank."""
    if ctx.world > 1:
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def from_rank0(ctx: DistContext, value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (so every rank takes rank 0's decisions)."""
    if ctx.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in one process)."""
    if ctx.world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, obj)
    return gathered


def my_share(n: int, ctx: DistContext) -> list[int]:
    """Indices ``i`` of ``range(n)`` handled by this rank: ``i % world == rank`` (round robin)."""
    return [i for i in range(n) if i % ctx.world == ctx.rank]
