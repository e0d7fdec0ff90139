"""What a training run keeps on disk, and how it resumes.

Files written to the run folder (rank 0 only): ``last.pt`` (every epoch: model, optimizer,
epoch, best metric, best epoch, seed, history, world size), ``best.pt`` (when the validation
Dice improves) and ``train_log.json`` (configs, seed, world size, versions, per-epoch loss /
validation Dice / seconds). A run resumed from ``last.pt`` replays the remaining epochs as an
uninterrupted run would (see :mod:`volattack.training.data` for the seeds).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from volattack.distributed import DistContext, all_gather_objects
from volattack.models.checkpoint import load_weights_into, read_checkpoint, save_checkpoint
from volattack.models.config import ModelConfig
from volattack.utils import atomic_write_json, versions

LAST = "last.pt"
BEST = "best.pt"
LOG = "train_log.json"


@dataclass
class Progress:
    """The state of a run between epochs.

    Attributes:
        epoch: number of completed epochs.
        best_dice: best validation Dice so far (``-inf`` before any finite one).
        best_epoch: the epoch of ``best_dice`` (0: none yet).
        history: one ``{"epoch", "loss", "val_dice", "seconds"}`` dict per completed epoch.
        world_size: ranks of the run that wrote the resumed ``last.pt`` (None: unknown or new run).
    """

    epoch: int = 0
    best_dice: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    world_size: Optional[int] = None

    @property
    def finite_best(self) -> Optional[float]:
        """``best_dice`` as stored in files: ``None`` until a finite value was reached."""
        return self.best_dice if math.isfinite(self.best_dice) else None

    def improves(self, val_dice: Optional[float]) -> bool:
        """Record ``val_dice`` of the current epoch; True when it is a new best."""
        if val_dice is None or not math.isfinite(val_dice) or val_dice <= self.best_dice:
            return False
        self.best_dice, self.best_epoch = val_dice, self.epoch
        return True


def save_last(path: Path, net: nn.Module, model_cfg: ModelConfig, progress: Progress, optimizer: torch.optim.Optimizer,
              *, seed: int, world_size: int) -> None:
    """Write ``last.pt``: everything :func:`load_resume_state` needs."""
    save_checkpoint(
        path, net, model_cfg, epoch=progress.epoch, seed=seed, kind="last", best_dice=progress.finite_best,
        best_epoch=progress.best_epoch, optimizer=optimizer.state_dict(), history=progress.history,
        world_size=world_size,
    )


def save_best(path: Path, net: nn.Module, model_cfg: ModelConfig, progress: Progress, *, seed: int) -> None:
    """Write ``best.pt`` (the validation Dice of the best epoch, or none: the final model)."""
    extra = {"metrics": {"val_dice": progress.finite_best}} if progress.finite_best is not None else {}
    save_checkpoint(path, net, model_cfg, epoch=progress.epoch, best_dice=progress.finite_best, seed=seed,
                    kind="best", **extra)


def write_log(path: Path, progress: Progress, *, seed: int, world_size: int, configs: dict[str, Any]) -> None:
    """Write ``train_log.json`` atomically."""
    atomic_write_json(
        path,
        {
            "seed": seed,
            "world_size": world_size,
            "epochs_completed": progress.history[-1]["epoch"] if progress.history else 0,
            "best_dice": progress.finite_best,
            "best_epoch": progress.best_epoch or None,
            "versions": versions(),
            "config": configs,
            "history": progress.history,
        },
    )


def summary(out: Path, best_dice: float, epochs: int, seconds: float, seed: int) -> dict[str, Any]:
    """The value :func:`volattack.training.train` returns."""
    return {
        "best_checkpoint": str(out / BEST),
        "best_dice": float(best_dice) if math.isfinite(best_dice) else math.nan,
        "epochs": int(epochs),
        "seconds": float(seconds),
        "seed": int(seed),
    }


def load_resume_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_cfg: ModelConfig,
    seed: int,
    device: torch.device,
) -> Progress:
    """Restore model and optimizer from ``last.pt``; check that model and seed match.

    Raises:
        ValueError: the checkpoint was trained with another model or seed, or is not a
            ``last.pt`` of a training run; the message names the file and both values.
    """
    ckpt = read_checkpoint(path, map_location=device)
    stored = dict(ckpt["model"])
    wanted = {
        "name": model_cfg.name,
        "in_channels": model_cfg.in_channels,
        "out_channels": model_cfg.out_channels,
        "kwargs": dict(model_cfg.kwargs),
    }
    if _normalise(stored) != _normalise(wanted):
        raise ValueError(
            f"Cannot resume {str(path)!r}: it was trained with model {stored}, but the config asks "
            f"for {wanted}. Use the original model config or another output folder."
        )
    if ckpt.get("seed") != seed:
        raise ValueError(
            f"Cannot resume {str(path)!r}: it was trained with seed={ckpt.get('seed')!r}, got seed={seed!r}."
        )
    for key in ("optimizer", "epoch", "history"):
        if key not in ckpt:
            raise ValueError(f"Cannot resume {str(path)!r}: it has no '{key}' entry (not a last.pt of a training run).")
    load_weights_into(model, path, map_location=device)
    optimizer.load_state_dict(ckpt["optimizer"])
    best = ckpt.get("best_dice")
    ws = ckpt.get("world_size")
    return Progress(
        epoch=int(ckpt["epoch"]),
        best_dice=float(best) if best is not None else -math.inf,
        best_epoch=int(ckpt.get("best_epoch") or 0),
        history=list(ckpt["history"]),
        world_size=int(ws) if ws is not None else None,
    )


def _normalise(value: Any) -> Any:
    """Lists and tuples compare equal (YAML gives lists, Python code often tuples)."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _params_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes (CPU, in ``named_parameters`` order). Parameters only:
    buffers such as BatchNorm running statistics are updated by each rank's last batch and
    legitimately differ between DDP ranks."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", copy=True).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_in_sync(ctx: DistContext, module: nn.Module) -> None:
    """Raise if the ranks' parameters differ at the end of DDP training (they never should).

    Raises:
        RuntimeError: with the SHA-256 of every rank's parameters.
    """
    if ctx.world == 1:
        return
    digests = all_gather_objects(ctx, _params_digest(module))
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended training with different parameters (SHA-256 per rank: {digests}).")
