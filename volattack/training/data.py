"""Training data: the split lists, per-epoch seeds, the epoch's loaders and DDP sharding.

Reproducibility: every epoch ``e`` of run ``seed`` draws its crops, shuffling and dropout from
:func:`epoch_seed` (``(seed, e)``) in a single process, or from :func:`rank_seed`
(``(seed, e, rank)``) under DDP, inside a forked torch RNG (:func:`private_rng`) so the caller's
global random state is untouched. Crops depend on ``train.num_workers`` (each DataLoader worker
seeds its own transforms), so runs are reproducible for a fixed number of workers and ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from volattack.checks import is_int
from volattack.data.config import DataConfig
from volattack.distributed import DistContext, my_share


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed for epoch ``epoch`` of run ``seed`` (independent streams per epoch)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


def rank_seed(seed: int, epoch: int, ctx: DistContext) -> int:
    """Seed of this rank's crops, dropout and attack starts in ``epoch``: :func:`epoch_seed` in a
    single process, a ``(seed, epoch, rank)`` stream under DDP."""
    if ctx.world == 1:
        return epoch_seed(seed, epoch)
    state = np.random.SeedSequence([int(seed), int(epoch), int(ctx.rank)]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF)


@contextlib.contextmanager
def private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside a fork, so the caller's global random state is restored."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def as_tensor(x: Any) -> torch.Tensor:
    """Plain tensor (MetaTensor metadata dropped: faster, and not needed in training)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _datalist_keys(path: Union[str, os.PathLike]) -> Optional[set[str]]:
    """Top-level keys of a datalist JSON, or ``None`` if it cannot be read (the loader reports it)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return set(data) if isinstance(data, dict) else None


def load_split(data_cfg: DataConfig, key: str, optional: bool) -> list[dict[str, Any]]:
    """The cases of split ``key`` of ``data_cfg.datalist`` (``[]`` for a missing optional split).

    Raises:
        FileNotFoundError: the datalist or a file it names does not exist.
    """
    from volattack.data.datalist import load_datalist

    if optional:
        keys = _datalist_keys(data_cfg.datalist)
        if keys is not None and key not in keys:
            return []
    return load_datalist(data_cfg.datalist, key=key, base_dir=data_cfg.base_dir)


def poison_split(train_list: list[dict[str, Any]], poison: Any, data_cfg: DataConfig,
                 out: Union[str, os.PathLike], world: int = 1) -> list[dict[str, Any]]:
    """The ``train.poison`` hook: the training split with ``round(rate * n)`` cases poisoned
    (:func:`volattack.threats.poison.poison_training_cases`; ids in ``<out>/poison.json``), or the
    split itself when ``poison`` is ``None``. Every check runs before anything is written;
    ``train.poison.joint`` (the trigger optimised in training) needs a single process (``world`` 1)."""
    if poison is None:
        return train_list
    from volattack.threats.poison import poison_training_cases

    if getattr(poison, "joint", None) is not None and world > 1:
        raise ValueError(f"train.poison.joint trains the trigger in a single process, got {world} ranks "
                         "(WORLD_SIZE); run it without torchrun.")

    return poison_training_cases(poison, train_list, data_cfg, out)


def shard_indices(n: int, epoch_seed: int, rank: int, world_size: int) -> list[int]:
    """The training cases of one rank in one epoch (``DistributedSampler(drop_last=True)`` style).

    The permutation is the one a single-process run draws for the same epoch seed (torch's
    ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(epoch_seed))``: one
    ``int64`` base seed drawn from the generator, then ``torch.randperm``). Rank ``r`` gets
    ``perm[r:n - n % world_size:world_size]``: the shares are disjoint, all of equal length
    ``n // world_size`` (so every rank runs the same number of optimisation steps), and the
    ``n mod world_size`` left-over cases change from epoch to epoch. Batch ``b`` of rank ``r`` with
    ``B`` cases per rank then holds exactly the cases the single-process batch ``b`` of ``B *
    world_size`` cases would hold when ``world_size`` divides ``n``.

    Args:
        n: number of training cases (>= world_size).
        epoch_seed: the epoch's seed (shared by all ranks).
        rank: this rank, in [0, world_size).
        world_size: number of ranks (>= 1).

    Returns:
        Case indices of this rank, in visiting order.

    Raises:
        ValueError: ``world_size < 1``, ``rank`` outside [0, world_size) or ``n < world_size``.
    """
    if not is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}.")
    if not is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}.")
    if not is_int(n) or n < world_size:
        raise ValueError(
            f"n must be an integer >= world_size={world_size} (every rank needs a training case), got {n!r}."
        )
    g = torch.Generator().manual_seed(int(epoch_seed))
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader iterator's base seed
    perm = torch.randperm(n, generator=g).tolist()
    return perm[rank : n - n % world_size : world_size]


def train_loader(dataset: Any, batch_size: int, num_workers: int, eseed: int, rseed: int, ctx: DistContext) -> Any:
    """The epoch's training loader: shuffled by ``eseed`` in one process; under DDP the epoch's
    shared permutation dealt to the ranks (:func:`shard_indices`), crops from the rank's stream
    ``rseed``. Build it inside :func:`private_rng` of ``rseed``."""
    from monai.data import DataLoader

    if ctx.world == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(eseed))
    return DataLoader(dataset, batch_size=batch_size, sampler=shard_indices(len(dataset), eseed, ctx.rank, ctx.world),
                      num_workers=num_workers, generator=torch.Generator().manual_seed(rseed))


def validation_loader(dataset: Any, num_workers: int, seed: int, ctx: DistContext) -> Any:
    """Whole validation volumes one by one; under DDP case ``i`` goes to rank ``i mod world``.
    The loader has its own generator: the global RNG is never drawn from."""
    from monai.data import DataLoader

    sampler = my_share(len(dataset), ctx) if ctx.world > 1 else None
    return DataLoader(dataset, batch_size=1, shuffle=False, sampler=sampler, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))
