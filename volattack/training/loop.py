"""The training run: :func:`train`, clean or adversarial with ``train.adversary``.

Recipe: AdamW + MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` on random
foreground/background crops (``RandCropByPosNegLabeld``, the nnU-Net / MONAI tutorial
practice), validated every ``val_interval`` epochs on whole validation volumes by the
evaluation's rule (:mod:`volattack.training.validation`: gaussian sliding window, mean
foreground Dice with hallucinated classes scoring 0, averaged over cases).

Reproducibility: the model is initialised from ``seed``; every epoch draws its crops,
shuffling, dropout and attack random starts from seeds derived from ``(seed, epoch)`` (and the
rank under DDP) in a forked torch RNG, so the caller's global random state is untouched and a
run resumed from ``last.pt`` replays the remaining epochs exactly as an uninterrupted run would
(up to float noise); see :mod:`volattack.training.data`. Files: :mod:`volattack.training.state`.

Distributed data parallel (``torchrun --nproc_per_node N -m volattack train cfg.yaml``): with
``WORLD_SIZE > 1`` in the environment (or an initialised process group of more than one rank)
the model is wrapped in ``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, nccl on
CUDA, one GPU per rank by ``LOCAL_RANK``, :func:`volattack.distributed.setup_distributed`). Every
epoch the training cases are shuffled by the permutation that a single process would use and
dealt round-robin to the ranks (:func:`~volattack.training.data.shard_indices`, as
``DistributedSampler(drop_last=True)`` with ``set_epoch``). ``train.batch_size`` is per rank
(global batch ``N * batch_size``). Crops, dropout and attack random starts draw from a
``(seed, epoch, rank)`` stream, and every crop has its own attack sample id. Adversarial examples
are crafted on the unwrapped module, so the attack's eval-mode switch and its input-gradient
passes never reach DDP's gradient hooks or buffer broadcasts. Validation is sharded (case ``i``
on rank ``i mod N``) and reduced over the ranks, so every rank takes the same "best" decision.
Only rank 0 writes files; all ranks read ``last.pt`` on resume.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from volattack.data.config import DataConfig
from volattack.distributed import DistContext, all_sum, barrier, from_rank0, setup_distributed, teardown
from volattack.models.checkpoint import load_weights_into
from volattack.models.config import ModelConfig
from volattack.models.zoo import create_model
from volattack.training.config import TrainConfig, scheduled_lr, validate_train_config
from volattack.training.data import (
    epoch_seed,
    load_split,
    poison_split,
    private_rng,
    rank_seed,
    train_loader,
    validation_loader,
)
from volattack.training.state import (
    BEST,
    LAST,
    LOG,
    Progress,
    check_ranks_in_sync,
    load_resume_state,
    save_best,
    save_last,
    summary,
    write_log,
)
from volattack.training.step import train_epoch
from volattack.training.validation import validation_dice
from volattack.utils import resolve_device

logger = logging.getLogger(__name__)


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
    ``train_cfg.val_interval`` epochs and at the last epoch
    (:func:`~volattack.training.validation.validation_dice`, the evaluation's rule).

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) the same call trains with
    ``DistributedDataParallel`` (see the module docstring); with one process it is a plain run.

    Args:
        model_cfg: registry name, channels (``out_channels`` = classes K) and kwargs.
        train_cfg: epochs, batch size (cases per step and rank; each yields ``num_samples``
            crops), lr and its schedule, weight decay, validation and sliding-window settings,
            ``amp`` (bfloat16 autocast on CPU, float16 + ``GradScaler`` on CUDA; the adversary
            gets the same ``amp_dtype``), ``init_checkpoint`` to fine-tune from, and
            ``adversary`` (``name: none`` trains clean; see ``volattack.defenses.adversarial``).
        data_cfg: the datalist and its split keys, and the preprocessing (spacing in mm,
            HU window, roi size in voxels).
        out_dir: run folder for ``last.pt``, ``best.pt`` and ``train_log.json``.
        seed: seed of the model initialisation and of every random crop / shuffle / attack
            start; recorded in the log and the checkpoints.
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
        ValueError: bad training values or seed, an empty training split (or fewer training
            cases than ranks), an existing run without ``resume``, a resumed run whose model or
            seed differs, a ``roi_size`` the model cannot process, or an ``init_checkpoint``
            for another architecture (before any training).
        FileNotFoundError: missing datalist, data file or ``init_checkpoint``.
        FloatingPointError: a non-finite mean training loss in an epoch.
    """
    t_start = time.perf_counter()
    validate_train_config(train_cfg, seed)
    if not data_cfg.datalist:
        raise ValueError(f"data.datalist must be the path of a datalist JSON, got {data_cfg.datalist!r}.")
    device = resolve_device(train_cfg.device or "auto")
    out = Path(out_dir)
    if (out / LAST).exists() and not resume:
        raise ValueError(
            f"out_dir {str(out)!r} already holds a training run ({LAST}); pass --resume "
            f"(resume=True) to continue it or choose another output folder."
        )
    # Data lists first: cheap, and errors in paths surface before any model work.
    train_list = load_split(data_cfg, data_cfg.train_key, optional=False)
    if len(train_list) == 0:
        raise ValueError(
            f"The training split '{data_cfg.train_key}' of {data_cfg.datalist!r} is empty; "
            f"at least one case is needed."
        )
    val_list = load_split(data_cfg, data_cfg.val_key, optional=True)

    ctx, device = setup_distributed(device)
    try:
        run = _Run.prepare(model_cfg, train_cfg, data_cfg, out, train_list, val_list, ctx, device,
                           seed=seed, resume=resume)
        return run.fit(progress=progress, t_start=t_start)
    finally:
        teardown(ctx)


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


def _check_split_sizes(data_cfg: DataConfig, n_train: int, n_val: int, ctx: DistContext) -> None:
    if n_train < ctx.world:
        raise ValueError(
            f"The training split '{data_cfg.train_key}' of {data_cfg.datalist!r} has {n_train} "
            f"case(s), fewer than the {ctx.world} ranks; every rank needs at least one case."
        )
    if n_val == 0 and ctx.rank == 0:
        logger.warning(
            "No validation cases under '%s' in %s: best.pt will be the final model.",
            data_cfg.val_key, data_cfg.datalist,
        )


@dataclass
class _Run:
    """Everything one training run holds once the ranks are known (built by :meth:`prepare`)."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data_cfg: DataConfig
    out: Path
    ctx: DistContext
    device: torch.device
    seed: int
    net: nn.Module
    optimizer: torch.optim.Optimizer
    state: Progress
    attack: Optional[Any]
    train_list: list[dict[str, Any]]
    val_list: list[dict[str, Any]]
    amp_dtype: Optional[torch.dtype] = None
    model: Optional[nn.Module] = None  # ``net`` or its DDP wrapper
    datasets: tuple[Any, Any] = (None, None)
    scaler: Optional[Any] = None  # torch.amp.GradScaler for float16 (CUDA), kept over the whole run
    steps_per_epoch: int = 1
    configs: dict[str, Any] = field(default_factory=dict)
    objective: Optional[Any] = None  # the loss: train.temperature / distill / defense (training.distill)
    joint: Optional[Any] = None  # train.poison.joint: the trigger optimised in training (threats.joint_trigger)

    @property
    def main(self) -> bool:
        return self.ctx.rank == 0

    @classmethod
    def prepare(cls, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, out: Path,
                train_list: list[dict[str, Any]], val_list: list[dict[str, Any]], ctx: DistContext,
                device: torch.device, *, seed: int, resume: bool) -> "_Run":
        """Seeded model (identical on every rank), optimizer, resume or fine-tune, roi check and
        adversary: everything that can fail on the config before any data is cached."""
        from volattack.defenses.adversarial import build_adversary
        from volattack.threats.joint_trigger import joint_poisoning
        from volattack.training.distill import build_objective

        _check_split_sizes(data_cfg, len(train_list), len(val_list), ctx)
        main = ctx.rank == 0
        with private_rng(seed, torch.device("cpu")):
            net = create_model(model_cfg.name, model_cfg.in_channels, model_cfg.out_channels, **model_cfg.kwargs)
        net.to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        state = _restore(out / LAST, net, optimizer, model_cfg, train_cfg, ctx, device, seed=seed, resume=resume)
        pre = data_cfg.preprocess
        _check_roi(net, model_cfg, [int(r) for r in pre.roi_size], device)
        # fp16 with loss scaling on CUDA, bf16 on CPU; the attack gets the same dtype and scales
        # its own loss instead of running under the training step's autocast
        amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if train_cfg.amp else None
        # The adversary holds the unwrapped network: its eval-mode switch and input-gradient
        # passes never touch DDP's hooks or buffers. Built now, so a bad name or budget fails at once.
        objective = build_objective(train_cfg, model_cfg, net, device, seed=seed)  # teacher, sanitiser
        attack = build_adversary(train_cfg.adversary, objective.attack_model,
                                 bounds=(float(pre.b_min), float(pre.b_max)), seed=seed, amp_dtype=amp_dtype)
        train_list = poison_split(train_list, train_cfg.poison, data_cfg, out, ctx.world)  # train.poison
        joint = joint_poisoning(train_cfg.poison, data_cfg, out, resume=resume)  # train.poison.joint, or None
        if main:
            out.mkdir(parents=True, exist_ok=True)
        configs = {"model": asdict(model_cfg), "train": asdict(train_cfg), "data": asdict(data_cfg)}
        return cls(model_cfg, train_cfg, data_cfg, out, ctx, device, seed, net, optimizer, state, attack,
                   train_list, val_list, amp_dtype=amp_dtype, configs=configs, objective=objective, joint=joint)

    def write_log(self) -> None:
        if self.main:
            write_log(self.out / LOG, self.state, seed=self.seed, world_size=self.ctx.world, configs=self.configs)

    def fit(self, *, progress: bool, t_start: float) -> dict[str, Any]:
        """Train the remaining epochs; returns :func:`~volattack.training.state.summary`. The DDP
        wrapper is dropped on the way out, returning or raising (:meth:`release_ddp`)."""
        try:
            return self._fit(progress=progress, t_start=t_start)
        finally:
            self.release_ddp()

    def _fit(self, *, progress: bool, t_start: float) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.train_cfg
        if self.state.epoch >= cfg.epochs:
            if self.main:
                logger.info("Run in %s already has %d epochs; nothing to train.", self.out, self.state.epoch)
            self.write_log()
            barrier(self.ctx, self.device)
            return summary(self.out, self.state.best_dice, self.state.epoch, time.perf_counter() - t_start, self.seed)
        self._build_data(progress)
        bar = tqdm(range(self.state.epoch + 1, cfg.epochs + 1), initial=self.state.epoch, total=cfg.epochs,
                   desc="train", unit="epoch", disable=not progress or not self.main)
        for epoch in bar:
            self._epoch(epoch)
            best = self.state.best_dice
            bar.set_postfix(loss=f"{self.state.history[-1]['loss']:.3f}",
                            dice=f"{best:.3f}" if math.isfinite(best) else "-")
        bar.close()
        if self.state.best_epoch == 0 and self.main:  # no validation case, or no finite Dice: the final model
            logger.warning("No finite validation Dice; %s is the final model.", self.out / BEST)
            save_best(self.out / BEST, self.net, self.model_cfg, self.state, seed=self.seed)
        check_ranks_in_sync(self.ctx, self.net)
        barrier(self.ctx, self.device)  # no rank returns (and reads best.pt) before rank 0 has written it
        return summary(self.out, self.state.best_dice, cfg.epochs, time.perf_counter() - t_start, self.seed)

    def release_ddp(self) -> None:
        """Drop the DDP wrapper before the process group is destroyed.

        DDP's reducer holds a reference to the gloo/nccl group. Were it the last one, the group
        would be destroyed inside the reducer's destructor with the GIL held, joining a worker
        thread that may still need the GIL to free the last collective's tensors: a deadlock,
        seen under CPU contention between two ``train`` calls in one torchrun worker. Freed here,
        the group's last reference is the registry's, which ``destroy_process_group`` drops with
        the GIL released.
        """
        import gc

        self.model = self.net
        gc.collect()  # a wrapper caught in a reference cycle goes now, not at some later collection

    def _build_data(self, progress: bool) -> None:
        """Datasets (deterministic transforms cached when ``train.cache``), the DDP wrapper and
        the number of steps per epoch."""
        from volattack.data.transforms import build_dataset, build_transforms

        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        cfg, pre, show = self.train_cfg, self.data_cfg.preprocess, progress and self.main
        train_ds = build_dataset(self.train_list, build_transforms(pre, mode="train", seed=self.seed), cfg.cache,
                                 progress=show)
        val_ds = (build_dataset(self.val_list, build_transforms(pre, mode="eval", seed=self.seed), cfg.cache,
                                progress=show) if self.val_list else None)
        self.datasets = (train_ds, val_ds)
        self.model, cases_per_rank = self.net, len(train_ds)
        if self.ctx.world > 1:
            dev = self.device
            self.model = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[dev.index] if dev.type == "cuda" else None)
            cases_per_rank = len(train_ds) // self.ctx.world
            if self.main:
                logger.info("DDP over %d ranks: %d case(s) per rank and epoch (%d left out per epoch), "
                            "global batch %d.", self.ctx.world, cases_per_rank, len(train_ds) % self.ctx.world,
                            cfg.batch_size * self.ctx.world)
        self.steps_per_epoch = math.ceil(cases_per_rank / cfg.batch_size)

    def _epoch(self, epoch: int) -> None:
        """Train, validate, checkpoint and log epoch ``epoch`` (1-based)."""
        cfg, ctx, device = self.train_cfg, self.ctx, self.device
        t_epoch = time.perf_counter()
        eseed, rseed = epoch_seed(self.seed, epoch), rank_seed(self.seed, epoch, ctx)  # equal in one process
        first_step, total_steps = (epoch - 1) * self.steps_per_epoch, self.steps_per_epoch * cfg.epochs
        self.model.train()
        if self.joint is not None:
            self.joint.epoch = epoch  # train.poison.joint.freeze_after counts epochs
        with private_rng(rseed, device):
            loader = train_loader(self.datasets[0], cfg.batch_size, cfg.num_workers, eseed, rseed, ctx)
            losses = train_epoch(
                self.model, loader, self.optimizer, self.objective, device=device,
                attack=self.attack, adv_cfg=cfg.adversary,
                lr_at=lambda it: scheduled_lr(cfg.lr, cfg.lr_schedule, first_step + it, total_steps),
                amp_dtype=self.amp_dtype, scaler=self.scaler, seed=rseed,
                rank=ctx.rank, world_size=ctx.world, noise_sigma=cfg.noise_sigma,
                bounds=(float(self.data_cfg.preprocess.b_min), float(self.data_cfg.preprocess.b_max)),
                poison_hook=self.joint,
            )
        if self.joint is not None and self.main:
            self.joint.save()  # the trigger's coefficients so far (<out>/poison/), named in poison.json
        # mean over every rank's steps (the same on all ranks)
        total = all_sum(ctx, torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device))
        mean_loss = float(total[0] / total[1]) if float(total[1]) > 0 else math.nan
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"Training loss is {mean_loss} at epoch {epoch}; lower train.lr ({cfg.lr}).")
        val_dice = self._validate(eseed) if self._validates(epoch) else None
        self.state.epoch = epoch
        if self.state.improves(val_dice) and self.main:
            save_best(self.out / BEST, self.net, self.model_cfg, self.state, seed=self.seed)
        seconds = time.perf_counter() - t_epoch
        self.state.history.append({"epoch": epoch, "loss": mean_loss, "val_dice": val_dice,
                                   "seconds": round(seconds, 3)})
        if self.main:
            save_last(self.out / LAST, self.net, self.model_cfg, self.state, self.optimizer, seed=self.seed,
                      world_size=ctx.world)
        self.write_log()
        if self.main:
            val_txt = f" val_dice {val_dice:.4f}" if val_dice is not None else ""
            logger.info("epoch %d/%d loss %.4f%s (%.1fs)", epoch, cfg.epochs, mean_loss, val_txt, seconds)

    def _validates(self, epoch: int) -> bool:
        cfg = self.train_cfg
        return self.datasets[1] is not None and (epoch % cfg.val_interval == 0 or epoch == cfg.epochs)

    def _validate(self, eseed: int) -> float:
        """The validation Dice of the unwrapped network (sharded over the ranks, rank 0's value kept)."""
        cfg, ctx = self.train_cfg, self.ctx
        loader = validation_loader(self.datasets[1], cfg.num_workers, eseed, ctx)
        dice = validation_dice(self.net, loader, self.model_cfg.out_channels, self.data_cfg.preprocess.roi_size,
                               cfg.sw_batch_size, cfg.sw_overlap, self.device,
                               cval=float(self.data_cfg.preprocess.b_min), ctx=ctx)
        return from_rank0(ctx, dice, self.device)


def _restore(last_path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, model_cfg: ModelConfig,
             train_cfg: TrainConfig, ctx: DistContext, device: torch.device, *, seed: int, resume: bool) -> Progress:
    """Resume from ``last.pt`` (weights, optimizer, progress; lr and weight decay from the config),
    or fine-tune from ``train.init_checkpoint``, or start fresh."""
    main = ctx.rank == 0
    if resume and last_path.exists():
        state = load_resume_state(last_path, net, optimizer, model_cfg, seed, device)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = train_cfg.lr, train_cfg.weight_decay
        if state.world_size not in (None, ctx.world) and main:
            logger.warning(
                "%s was trained with %d rank(s), resumed with %d: the remaining epochs shard the "
                "cases differently from an uninterrupted run.", last_path, state.world_size, ctx.world,
            )
        if main:
            logger.info("Resuming %s at epoch %d of %d.", last_path, state.epoch, train_cfg.epochs)
        return state
    if resume and main:
        logger.warning("resume requested but %s does not exist: starting a new run.", last_path)
    if train_cfg.init_checkpoint:
        load_weights_into(net, train_cfg.init_checkpoint, map_location=device)
        if main:
            logger.info("Fine-tuning from %s.", train_cfg.init_checkpoint)
    return Progress()
