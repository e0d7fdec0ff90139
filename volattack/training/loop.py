"""Training of a zoo model on a datalist: clean, or adversarial with ``train.adversary``.

Recipe: AdamW + MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` on random
foreground/background crops (``RandCropByPosNegLabeld``, the nnU-Net / MONAI tutorial
practice), validated every ``val_interval`` epochs by sliding-window inference over whole
validation volumes with the mean foreground Dice (MONAI ``DiceMetric``,
``include_background=False``, classes absent from the ground truth ignored).

Reproducibility: the model is initialised from ``seed``; every epoch ``e`` draws its crops,
shuffling and any dropout from a seed derived from ``(seed, e)``, inside a forked torch RNG
so the caller's global random state is untouched. A run resumed from ``last.pt`` therefore
replays the remaining epochs exactly as an uninterrupted run would (up to float noise).
Crops depend on ``train.num_workers`` (each DataLoader worker seeds its own transforms), so
runs are reproducible for a fixed number of workers (and of DDP ranks, see below).

Files written to ``out_dir``: ``last.pt`` (every epoch: model, optimizer, epoch, best
metric, seed, history), ``best.pt`` (when the validation Dice improves) and
``train_log.json`` (configs, seed, world size, per-epoch loss / validation Dice / seconds).

Distributed data parallel (``torchrun --nproc_per_node N -m volattack train cfg.yaml``): with
``WORLD_SIZE > 1`` in the environment (or an initialised process group of more than one rank)
the model is wrapped in ``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, nccl on
CUDA, one GPU per rank by ``LOCAL_RANK``). Every epoch the training cases are shuffled by the
``(seed, epoch)`` permutation that a single process would use and dealt round-robin to the
ranks (``permutation[rank::N]``, the remainder ``n mod N`` left out of that epoch, so shares are
disjoint and every rank runs the same number of steps, as ``DistributedSampler(drop_last=True)``
with ``set_epoch``). ``train.batch_size`` is per rank (global batch ``N * batch_size``). Crops,
dropout and attack random starts draw from a ``(seed, epoch, rank)`` stream. Adversarial
examples are crafted on the unwrapped module, so the attack's eval-mode switch and its
input-gradient passes never reach DDP's gradient hooks or buffer broadcasts. Validation is
sharded (case ``i`` on rank ``i mod N``) and the per-case Dice values are all-reduced, so every
rank takes the same "best" decision. Only rank 0 writes files; all ranks read ``last.pt`` on
resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from volattack.data.config import DataConfig
from volattack.defenses.config import AdversaryConfig
from volattack.models.checkpoint import load_weights_into, read_checkpoint, save_checkpoint
from volattack.models.config import ModelConfig, TrainConfig
from volattack.models.zoo import create_model
from volattack.distributed import DistContext as _Dist
from volattack.distributed import all_sum as _all_sum
from volattack.distributed import barrier as _barrier
from volattack.distributed import from_rank0 as _from_rank0
from volattack.distributed import setup_distributed as _setup_distributed
from volattack.utils import atomic_write_json, versions

logger = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
LOG = "train_log.json"
LR_SCHEDULES = ("constant", "cosine", "poly")


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """Learning rate of optimisation step ``step`` (0-based) out of ``total_steps``.

    ``constant``: ``base_lr``; ``cosine``: ``base_lr * (1 + cos(pi * t)) / 2`` (Loshchilov &
    Hutter, SGDR, ICLR 2017, one cycle without restart); ``poly``: ``base_lr * (1 - t) ** 0.9``
    (the nnU-Net schedule), with ``t = step / total_steps``.

    Args:
        base_lr: the initial learning rate.
        schedule: one of ``LR_SCHEDULES``.
        step: index of the current step, 0 <= step < total_steps.
        total_steps: number of steps of the whole run (>= 1).

    Returns:
        The learning rate for this step.
    """
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return base_lr * (1.0 - t) ** 0.9
    return base_lr


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate_train_config(train_cfg: TrainConfig, seed: int = 0) -> None:
    """Check a :class:`TrainConfig` (and the seed) before any work is done.

    Args:
        train_cfg: the training settings (epochs, batch size, lr, schedule, ...).
        seed: the run seed (integer >= 0).

    Raises:
        ValueError: naming the field and the bad value, e.g.
            ``"train.epochs must be an integer >= 1, got 0."``.
    """
    for name in ("epochs", "batch_size", "val_interval", "sw_batch_size"):
        v = getattr(train_cfg, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"train.{name} must be an integer >= 1, got {v!r}.")
    if not _is_int(train_cfg.num_workers) or train_cfg.num_workers < 0:
        raise ValueError(f"train.num_workers must be an integer >= 0, got {train_cfg.num_workers!r}.")
    if not _is_number(train_cfg.lr) or not math.isfinite(train_cfg.lr) or train_cfg.lr <= 0:
        raise ValueError(f"train.lr must be a finite number > 0, got {train_cfg.lr!r}.")
    wd = train_cfg.weight_decay
    if not _is_number(wd) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"train.weight_decay must be a finite number >= 0, got {wd!r}.")
    if train_cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(
            f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {train_cfg.lr_schedule!r}."
        )
    ov = train_cfg.sw_overlap
    if not _is_number(ov) or not 0 <= ov < 1:
        raise ValueError(f"train.sw_overlap must be in [0, 1), got {ov!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed for epoch ``epoch`` of run ``seed`` (independent streams per epoch)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


@contextlib.contextmanager
def _private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside a fork, so the caller's global random state is restored."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}.") from e


def _datalist_keys(path: Union[str, os.PathLike]) -> Optional[set[str]]:
    """Top-level keys of a datalist JSON, or ``None`` if it cannot be read (the loader reports it)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return set(data) if isinstance(data, dict) else None


def _load_split(data_cfg: DataConfig, key: str, optional: bool) -> list[dict[str, Any]]:
    from volattack.data.datalist import load_datalist

    if optional:
        keys = _datalist_keys(data_cfg.datalist)
        if keys is not None and key not in keys:
            return []
    return load_datalist(data_cfg.datalist, key=key, base_dir=data_cfg.base_dir)


def _as_tensor(x: Any) -> torch.Tensor:
    """Plain tensor (MetaTensor metadata dropped: faster, and not needed in training)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _rank_seed(seed: int, epoch: int, ctx: _Dist) -> int:
    """Seed of this rank's crops, dropout and attack starts in ``epoch``: the epoch seed in a
    single process (unchanged behaviour), a ``(seed, epoch, rank)`` stream under DDP."""
    if ctx.world == 1:
        return _epoch_seed(seed, epoch)
    state = np.random.SeedSequence([int(seed), int(epoch), int(ctx.rank)]).generate_state(1)[0]
    return int(state & 0x7FFFFFFF)


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
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}.")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}.")
    if not _is_int(n) or n < world_size:
        raise ValueError(
            f"n must be an integer >= world_size={world_size} (every rank needs a training case), got {n!r}."
        )
    g = torch.Generator().manual_seed(int(epoch_seed))
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader iterator's base seed
    perm = torch.randperm(n, generator=g).tolist()
    return perm[rank : n - n % world_size : world_size]


def _params_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes (CPU, in ``named_parameters`` order)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", copy=True).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_ranks_in_sync(ctx: _Dist, module: nn.Module) -> None:
    """Raise if the ranks' parameters differ at the end of DDP training (they never should)."""
    if ctx.world == 1:
        return
    import torch.distributed as dist

    digests: list[Optional[str]] = [None] * ctx.world
    dist.all_gather_object(digests, _params_digest(module))
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended training with different parameters (SHA-256 per rank: {digests}).")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validation_dice(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    roi_size: list[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: Union[str, torch.device] = "cpu",
    cval: float = 0.0,
) -> float:
    """Mean foreground Dice of ``model`` on whole volumes by sliding-window inference.

    Each volume is segmented with ``monai.inferers.sliding_window_inference`` (windows of
    ``roi_size`` voxels, ``overlap`` fraction), the argmax label map is one-hot encoded and
    compared with the one-hot ground truth by ``monai.metrics.DiceMetric(include_background=
    False, ignore_empty=True)``: Dice = 2|P n G| / (|P| + |G|) per case and class; classes
    absent from a case's ground truth are ignored; the result is the mean over the remaining
    (case, class) pairs (``nan`` if there are none).

    Args:
        model: network mapping images to logits; evaluated in eval mode, mode restored.
        loader: iterable of dict batches with ``"image"`` (B, C, H, W, D) and ``"label"``
            (B, 1, H, W, D) integer class indices (eval transforms, whole volumes).
        num_classes: K, classes including background.
        roi_size: sliding-window size in voxels.
        sw_batch_size: windows per forward pass.
        overlap: window overlap fraction in [0, 1).
        device: where to run the model.
        cval: value padding volumes smaller than the window (``b_min``, as training pads crops).

    Returns:
        Mean foreground Dice in [0, 1].

    Shape:
        image (B, C, H, W, D), label (B, 1, H, W, D) -> scalar.
    """
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True, get_not_nans=True)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            image = _as_tensor(batch["image"]).to(device)
            label = _as_tensor(batch["label"]).to(device).long()
            logits = sliding_window_inference(
                image, list(roi_size), sw_batch_size, model, overlap=overlap, cval=cval
            )
            pred = one_hot(_as_tensor(logits).argmax(dim=1, keepdim=True), num_classes)
            metric(y_pred=pred, y=one_hot(label, num_classes))
        if metric.get_buffer() is not None:
            value, counted = metric.aggregate()
            dice = float(value.item()) if float(counted.sum()) > 0 else math.nan
        else:  # an empty loader
            dice = math.nan
    finally:
        model.train(was_training)
    return dice


@torch.no_grad()
def _sharded_validation_dice(
    module: nn.Module,
    val_ds: Any,
    ctx: _Dist,
    num_classes: int,
    roi_size: list[int],
    sw_batch_size: int,
    overlap: float,
    num_workers: int,
    seed: int,
    device: torch.device,
    cval: float = 0.0,
) -> float:
    """:func:`validation_dice` with case ``i`` evaluated on rank ``i mod world``.

    Every rank fills its cases' rows of an ``(n_cases, 2, K - 1)`` table (foreground Dice per
    class, and whether the class counted: present in the ground truth); one all-reduce sums the
    tables, and every rank reduces the same table as MONAI's ``DiceMetric(reduction="mean")``
    does: mean over counted classes per case, then mean over cases with at least one counted
    class (``nan`` if none). ``module`` is the unwrapped network (no DDP hooks, so ranks may
    evaluate different numbers of cases).

    Shape:
        image (1, C, H, W, D), label (1, 1, H, W, D) per case -> scalar.
    """
    from monai.data import DataLoader
    from monai.inferers import sliding_window_inference
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    n = len(val_ds)
    mine = list(range(ctx.rank, n, ctx.world))
    table = torch.zeros(n, 2, num_classes - 1, dtype=torch.float64, device=device)
    loader = DataLoader(val_ds, batch_size=1, sampler=mine, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    was_training = module.training
    module.eval()
    try:
        for i, batch in zip(mine, loader):
            image = _as_tensor(batch["image"]).to(device)
            label = _as_tensor(batch["label"]).to(device).long()
            logits = sliding_window_inference(image, list(roi_size), sw_batch_size, module, overlap=overlap,
                                              cval=cval)
            pred = one_hot(_as_tensor(logits).argmax(dim=1, keepdim=True), num_classes)
            dice = compute_dice(pred, one_hot(label, num_classes), include_background=False, ignore_empty=True)[0]
            counted = ~torch.isnan(dice)
            table[i, 0] = torch.where(counted, dice, torch.zeros_like(dice)).double()
            table[i, 1] = counted.double()
    finally:
        module.train(was_training)
    table = _all_sum(ctx, table)
    per_class, counted = table[:, 0], table[:, 1]
    n_counted = counted.sum(dim=1)
    keep = n_counted > 0
    if not bool(keep.any()):
        return math.nan
    per_case = per_class.sum(dim=1)[keep] / n_counted[keep]
    return float(per_case.mean().item())


# ----------------------------------------------------------------------------- training


def _check_roi(model: nn.Module, model_cfg: ModelConfig, roi: list[int], device: torch.device) -> None:
    """A forward pass on one zero crop, so an incompatible roi_size fails before training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, model_cfg.in_channels, *roi, device=device))
    except Exception as e:  # noqa: BLE001 - re-raised with the config values
        raise ValueError(
            f"Model '{model_cfg.name}' cannot process training crops of "
            f"data.preprocess.roi_size={list(roi)}: {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, model_cfg.out_channels, *roi):
        raise ValueError(
            f"Model '{model_cfg.name}' maps roi_size={list(roi)} to {tuple(out.shape)}, "
            f"expected {(1, model_cfg.out_channels, *roi)}."
        )


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    out_dir: Union[str, os.PathLike],
    *,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a zoo model on the training split and keep the best validation checkpoint.

    AdamW (Loshchilov & Hutter, ICLR 2019) on MONAI ``DiceCELoss`` (softmax, one-hot
    labels; Dice + cross-entropy as in nnU-Net) over ``num_samples`` random pos/neg crops
    of ``data_cfg.preprocess.roi_size`` voxels per case; validation every
    ``train_cfg.val_interval`` epochs and at the last epoch by sliding-window inference
    (see :func:`validation_dice`).

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) the same call trains with
    ``DistributedDataParallel``: the process group is created if needed (gloo on CPU, nccl on
    CUDA) and destroyed at the end if this call created it, the cases of every epoch are
    sharded across the ranks (:func:`shard_indices`), ``train_cfg.batch_size`` is per rank,
    validation is sharded, and only rank 0 writes files (see the module docstring). With one
    process the behaviour is exactly that of a plain single-process run.

    Args:
        model_cfg: registry name, channels (``out_channels`` = classes K) and kwargs.
        train_cfg: epochs, batch size (cases per step and rank; each yields ``num_samples``
            crops), lr and its schedule, weight decay, validation and sliding-window settings,
            ``amp`` (bfloat16 autocast on CPU, float16 + ``GradScaler`` on CUDA),
            ``init_checkpoint`` to fine-tune from, and ``adversary`` (``name: none`` trains
            clean; otherwise adversarial training, see ``volattack.defenses.adversarial``).
        data_cfg: the datalist and its split keys, and the preprocessing (spacing in mm,
            HU window, roi size in voxels).
        out_dir: run folder for ``last.pt``, ``best.pt`` and ``train_log.json``.
        seed: seed of the model initialisation and of every random crop / shuffle; recorded
            in the log and the checkpoints.
        resume: continue from ``out_dir/last.pt`` (optimizer, epoch counter and best metric
            restored; the remaining epochs replay as in an uninterrupted run with the same
            number of ranks). Without it an existing ``last.pt`` is an error. A missing
            ``last.pt`` starts a new run.
        progress: show a tqdm bar over epochs (rank 0 only).

    Returns:
        ``{"best_checkpoint": str, "best_dice": float, "epochs": int, "seconds": float,
        "seed": int}`` (the same on every rank): ``epochs`` is the number of completed epochs,
        ``seconds`` the wall time of this call, ``best_dice`` the best mean foreground
        validation Dice (``nan`` without validation cases; ``best.pt`` is then the final model).

    Raises:
        ValueError: bad training values (epochs, batch_size, lr, ...), an empty training
            split (or fewer training cases than ranks), an existing run without ``resume``, a
            resumed run whose model or seed differs, a ``roi_size`` the model cannot process, or
            an ``init_checkpoint`` for another architecture (before any training).
        FileNotFoundError: missing datalist, data file or ``init_checkpoint``.
        FloatingPointError: a non-finite mean training loss in an epoch.
    """
    t_start = time.perf_counter()
    validate_train_config(train_cfg, seed)
    if not data_cfg.datalist:
        raise ValueError(f"data.datalist must be the path of a datalist JSON, got {data_cfg.datalist!r}.")
    device = _resolve_device(getattr(train_cfg, "device", None))
    out = Path(out_dir)
    if (out / LAST).exists() and not resume:
        raise ValueError(
            f"out_dir {str(out)!r} already holds a training run ({LAST}); pass --resume "
            f"(resume=True) to continue it or choose another output folder."
        )

    # Data lists first: cheap, and errors in paths surface before any model work.
    train_list = _load_split(data_cfg, data_cfg.train_key, optional=False)
    if len(train_list) == 0:
        raise ValueError(
            f"The training split '{data_cfg.train_key}' of {data_cfg.datalist!r} is empty; "
            f"at least one case is needed."
        )
    val_list = _load_split(data_cfg, data_cfg.val_key, optional=True)

    ctx, device = _setup_distributed(device)
    try:
        return _train(model_cfg, train_cfg, data_cfg, out, train_list, val_list, ctx, device,
                      seed=seed, resume=resume, progress=progress, t_start=t_start)
    finally:
        if ctx.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    out: Path,
    train_list: list[dict[str, Any]],
    val_list: list[dict[str, Any]],
    ctx: _Dist,
    device: torch.device,
    *,
    seed: int,
    resume: bool,
    progress: bool,
    t_start: float,
) -> dict[str, Any]:
    """The body of :func:`train` once the data lists are read and the ranks are known."""
    from monai.data import DataLoader
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from volattack.data.transforms import build_dataset, build_transforms

    pre = data_cfg.preprocess
    roi = [int(r) for r in pre.roi_size]
    main = ctx.rank == 0
    last_path, best_path, log_path = out / LAST, out / BEST, out / LOG
    if len(train_list) < ctx.world:
        raise ValueError(
            f"The training split '{data_cfg.train_key}' of {data_cfg.datalist!r} has {len(train_list)} "
            f"case(s), fewer than the {ctx.world} ranks; every rank needs at least one case."
        )
    if not val_list and main:
        logger.warning(
            "No validation cases under '%s' in %s: best.pt will be the final model.",
            data_cfg.val_key, data_cfg.datalist,
        )

    # Model: seeded initialisation (identical on every rank), then resume / fine-tune weights.
    with _private_rng(seed, torch.device("cpu")):
        net = create_model(model_cfg.name, model_cfg.in_channels, model_cfg.out_channels, **model_cfg.kwargs)
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    start_epoch, best_dice, best_epoch = 0, -math.inf, 0
    history: list[dict[str, Any]] = []
    if resume and last_path.exists():
        state = _load_resume_state(last_path, net, optimizer, model_cfg, seed, device)
        start_epoch, best_dice, best_epoch, history = (
            state["epoch"], state["best_dice"], state["best_epoch"], state["history"],
        )
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = train_cfg.lr, train_cfg.weight_decay
        if state["world_size"] not in (None, ctx.world) and main:
            logger.warning(
                "%s was trained with %d rank(s), resumed with %d: the remaining epochs shard the "
                "cases differently from an uninterrupted run.", last_path, state["world_size"], ctx.world,
            )
        if main:
            logger.info("Resuming %s at epoch %d of %d.", last_path, start_epoch, train_cfg.epochs)
    else:
        if resume and main:
            logger.warning("resume requested but %s does not exist: starting a new run.", last_path)
        if train_cfg.init_checkpoint:
            load_weights_into(net, train_cfg.init_checkpoint, map_location=device)
            if main:
                logger.info("Fine-tuning from %s.", train_cfg.init_checkpoint)
    _check_roi(net, model_cfg, roi, device)
    # The adversary (train.adversary; "none" = clean training) is built before any data is
    # cached, so a bad attack name or budget fails at once. It holds the unwrapped network:
    # its eval-mode switch and input-gradient passes never touch DDP's hooks or buffers.
    from volattack.defenses.adversarial import build_adversary

    adv_cfg = train_cfg.adversary
    attack = build_adversary(adv_cfg, net, bounds=(float(pre.b_min), float(pre.b_max)), seed=seed)

    configs = {"model": asdict(model_cfg), "train": asdict(train_cfg), "data": asdict(data_cfg)}
    if main:
        out.mkdir(parents=True, exist_ok=True)

    def write_log() -> None:
        if not main:
            return
        finite_best = best_dice if math.isfinite(best_dice) else None
        atomic_write_json(
            log_path,
            {
                "seed": seed,
                "world_size": ctx.world,
                "epochs_completed": history[-1]["epoch"] if history else 0,
                "best_dice": finite_best,
                "best_epoch": best_epoch or None,
                "versions": versions(),
                "config": configs,
                "history": history,
            },
        )

    if start_epoch >= train_cfg.epochs:
        if main:
            logger.info("Run in %s already has %d epochs; nothing to train.", out, start_epoch)
        write_log()
        _barrier(ctx, device)
        return _summary(out, best_dice, start_epoch, time.perf_counter() - t_start, seed)

    # Datasets (deterministic transforms cached when train_cfg.cache).
    train_ds = build_dataset(train_list, build_transforms(pre, mode="train", seed=seed), train_cfg.cache,
                             progress=progress and main)
    val_ds = (build_dataset(val_list, build_transforms(pre, mode="eval", seed=seed), train_cfg.cache,
                            progress=progress and main) if val_list else None)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    use_amp = bool(train_cfg.amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")

    model: nn.Module = net
    cases_per_rank = len(train_ds)
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
        )
        cases_per_rank = len(train_ds) // ctx.world
        if main:
            logger.info(
                "DDP over %d ranks: %d case(s) per rank and epoch (%d left out per epoch), "
                "global batch %d.", ctx.world, cases_per_rank, len(train_ds) % ctx.world,
                train_cfg.batch_size * ctx.world,
            )
    steps_per_epoch = math.ceil(cases_per_rank / train_cfg.batch_size)
    total_steps = steps_per_epoch * train_cfg.epochs
    bar = tqdm(
        range(start_epoch + 1, train_cfg.epochs + 1),
        initial=start_epoch,
        total=train_cfg.epochs,
        desc="train",
        unit="epoch",
        disable=not progress or not main,
    )
    for epoch in bar:
        t_epoch = time.perf_counter()
        eseed = _epoch_seed(seed, epoch)
        rseed = _rank_seed(seed, epoch, ctx)  # == eseed in a single process
        model.train()
        with _private_rng(rseed, device):
            if ctx.world == 1:
                loader = DataLoader(
                    train_ds,
                    batch_size=train_cfg.batch_size,
                    shuffle=True,
                    num_workers=train_cfg.num_workers,
                    generator=torch.Generator().manual_seed(eseed),
                )
            else:  # the epoch's shared permutation, dealt to the ranks; crops from the rank's stream
                loader = DataLoader(
                    train_ds,
                    batch_size=train_cfg.batch_size,
                    sampler=shard_indices(len(train_ds), eseed, ctx.rank, ctx.world),
                    num_workers=train_cfg.num_workers,
                    generator=torch.Generator().manual_seed(rseed),
                )
            losses = train_epoch(
                model, loader, optimizer, loss_fn, device=device, attack=attack, adv_cfg=adv_cfg,
                lr_at=lambda it: scheduled_lr(
                    train_cfg.lr, train_cfg.lr_schedule, (epoch - 1) * steps_per_epoch + it, total_steps
                ),
                amp_dtype=amp_dtype if use_amp else None, scaler=scaler, seed=rseed,
            )
        if ctx.world == 1:
            mean_loss = float(np.mean(losses)) if losses else math.nan
        else:  # mean over every rank's steps (the same on all ranks)
            total = _all_sum(ctx, torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device))
            mean_loss = float(total[0] / total[1]) if float(total[1]) > 0 else math.nan
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"Training loss is {mean_loss} at epoch {epoch}; lower train.lr ({train_cfg.lr}).")

        val_dice: Optional[float] = None
        if val_ds is not None and (epoch % train_cfg.val_interval == 0 or epoch == train_cfg.epochs):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                if ctx.world == 1:
                    val_loader = DataLoader(  # own generator: the global RNG is never drawn from
                        val_ds, batch_size=1, shuffle=False, num_workers=train_cfg.num_workers,
                        generator=torch.Generator().manual_seed(eseed),
                    )
                    val_dice = validation_dice(
                        net, val_loader, model_cfg.out_channels, roi,
                        train_cfg.sw_batch_size, train_cfg.sw_overlap, device, cval=float(pre.b_min),
                    )
                else:
                    val_dice = _from_rank0(ctx, _sharded_validation_dice(
                        net, val_ds, ctx, model_cfg.out_channels, roi, train_cfg.sw_batch_size,
                        train_cfg.sw_overlap, train_cfg.num_workers, eseed, device, cval=float(pre.b_min),
                    ), device)
            if math.isfinite(val_dice) and val_dice > best_dice:
                best_dice, best_epoch = val_dice, epoch
                if main:
                    save_checkpoint(
                        best_path, net, model_cfg, epoch=epoch, best_dice=best_dice, seed=seed, kind="best",
                        metrics={"val_dice": val_dice},
                    )
        seconds = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, "loss": mean_loss, "val_dice": val_dice, "seconds": round(seconds, 3)})
        if main:
            save_checkpoint(
                last_path, net, model_cfg, epoch=epoch, seed=seed, kind="last",
                best_dice=best_dice if math.isfinite(best_dice) else None, best_epoch=best_epoch,
                optimizer=optimizer.state_dict(), history=history, world_size=ctx.world,
            )
        write_log()
        if main:
            val_txt = f" val_dice {val_dice:.4f}" if val_dice is not None else ""
            logger.info("epoch %d/%d loss %.4f%s (%.1fs)", epoch, train_cfg.epochs, mean_loss, val_txt, seconds)
        bar.set_postfix(loss=f"{mean_loss:.3f}", dice=f"{best_dice:.3f}" if math.isfinite(best_dice) else "-")
    bar.close()

    if best_epoch == 0 and main:  # no validation case, or no foreground in any: keep the final model
        logger.warning("No finite validation Dice; %s is the final model.", best_path)
        save_checkpoint(best_path, net, model_cfg, epoch=train_cfg.epochs, best_dice=None, seed=seed, kind="best")
    _check_ranks_in_sync(ctx, net)
    _barrier(ctx, device)  # no rank returns (and reads best.pt) before rank 0 has written it
    return _summary(out, best_dice, train_cfg.epochs, time.perf_counter() - t_start, seed)


def train_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    attack: Optional[Any] = None,
    adv_cfg: Optional[AdversaryConfig] = None,
    lr_at: Optional[Callable[[int], float]] = None,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[Any] = None,
    seed: int = 0,
) -> list[float]:
    """One pass over ``loader``: per batch, the clean loss (``attack`` None) or
    :func:`~volattack.defenses.adversarial.adversarial_loss` (PGD-AT, fast AT, VAFT ...), backward
    and an optimiser step. This is the loop body of :func:`train` (also under DDP, where ``model``
    is the DDP wrapper); benchmarks time it directly.

    Args:
        model: the segmenter (or its DDP wrapper), in train mode.
        loader: yields ``{"image": (B, C, H, W, D), "label": (B, 1, H, W, D)}`` batches.
        optimizer: updates ``model``'s parameters.
        loss_fn: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        device: where batches are moved.
        attack: the adversary from ``build_adversary`` (None: clean training); it must hold the
            unwrapped module.
        adv_cfg: ``train.adversary`` (weights and share), required with ``attack``.
        lr_at: learning rate of the ``it``-th step of this epoch (None keeps the optimiser's).
        amp_dtype: autocast dtype (None: no autocast).
        scaler: a ``torch.amp.GradScaler`` (None: plain backward and step).
        seed: base seed of this epoch's attack calls (step ``it`` uses ``seed * 100003 + it``).

    Returns:
        The loss of every step, as floats.
    """
    from volattack.defenses.adversarial import adversarial_loss

    losses: list[float] = []
    for it, batch in enumerate(loader):
        if lr_at is not None:
            lr_now = lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
        image = _as_tensor(batch["image"]).to(device)
        label = _as_tensor(batch["label"]).to(device).long()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            if attack is None:
                loss = loss_fn(model(image), label)
            else:  # examples crafted in eval mode; the attack restores train mode
                loss, _terms = adversarial_loss(model, image, label, attack, adv_cfg, loss_fn,
                                                seed=seed * 100_003 + it)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _summary(out: Path, best_dice: float, epochs: int, seconds: float, seed: int) -> dict[str, Any]:
    return {
        "best_checkpoint": str(out / BEST),
        "best_dice": float(best_dice) if math.isfinite(best_dice) else math.nan,
        "epochs": int(epochs),
        "seconds": float(seconds),
        "seed": int(seed),
    }


def _load_resume_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_cfg: ModelConfig,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Restore model and optimizer from ``last.pt``; check that model and seed match."""
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
    return {
        "world_size": int(ws) if ws is not None else None,
        "epoch": int(ckpt["epoch"]),
        "best_dice": float(best) if best is not None else -math.inf,
        "best_epoch": int(ckpt.get("best_epoch") or 0),
        "history": list(ckpt["history"]),
    }


def _normalise(value: Any) -> Any:
    """Lists and tuples compare equal (YAML gives lists, Python code often tuples)."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
