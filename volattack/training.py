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
runs are reproducible for a fixed number of workers.

Files written to ``out_dir``: ``last.pt`` (every epoch: model, optimizer, epoch, best
metric, seed, history), ``best.pt`` (when the validation Dice improves) and
``train_log.json`` (configs, seed, per-epoch loss / validation Dice / seconds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from volattack.data.config import DataConfig
from volattack.models.checkpoint import load_weights_into, read_checkpoint, save_checkpoint
from volattack.models.config import ModelConfig, TrainConfig
from volattack.models.zoo import create_model

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


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
                image, list(roi_size), sw_batch_size, model, overlap=overlap
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

    Args:
        model_cfg: registry name, channels (``out_channels`` = classes K) and kwargs.
        train_cfg: epochs, batch size (cases per step; each yields ``num_samples`` crops),
            lr and its schedule, weight decay, validation and sliding-window settings,
            ``init_checkpoint`` to fine-tune from, and ``adversary`` (``name: none`` trains
            clean; otherwise adversarial training, see ``volattack.defenses.adversarial``).
        data_cfg: the datalist and its split keys, and the preprocessing (spacing in mm,
            HU window, roi size in voxels).
        out_dir: run folder for ``last.pt``, ``best.pt`` and ``train_log.json``.
        seed: seed of the model initialisation and of every random crop / shuffle; recorded
            in the log and the checkpoints.
        resume: continue from ``out_dir/last.pt`` (optimizer, epoch counter and best metric
            restored; the remaining epochs replay as in an uninterrupted run). Without it an
            existing ``last.pt`` is an error. A missing ``last.pt`` starts a new run.
        progress: show a tqdm bar over epochs.

    Returns:
        ``{"best_checkpoint": str, "best_dice": float, "epochs": int, "seconds": float,
        "seed": int}``: ``epochs`` is the number of completed epochs, ``seconds`` the wall
        time of this call, ``best_dice`` the best mean foreground validation Dice (``nan``
        without validation cases; ``best.pt`` is then the final model).

    Raises:
        ValueError: bad training values (epochs, batch_size, lr, ...), an empty training
            split, an existing run without ``resume``, a resumed run whose model or seed
            differs, a ``roi_size`` the model cannot process, or an ``init_checkpoint`` for
            another architecture (before any training).
        FileNotFoundError: missing datalist, data file or ``init_checkpoint``.
    """
    from monai.data import DataLoader
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from volattack.data.transforms import build_dataset, build_transforms

    t_start = time.perf_counter()
    validate_train_config(train_cfg, seed)
    pre = data_cfg.preprocess
    roi = [int(r) for r in pre.roi_size]
    if not data_cfg.datalist:
        raise ValueError(f"data.datalist must be the path of a datalist JSON, got {data_cfg.datalist!r}.")
    device = _resolve_device(getattr(train_cfg, "device", None))
    out = Path(out_dir)
    last_path, best_path, log_path = out / LAST, out / BEST, out / LOG
    if last_path.exists() and not resume:
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
    if not val_list:
        logger.warning(
            "No validation cases under '%s' in %s: best.pt will be the final model.",
            data_cfg.val_key, data_cfg.datalist,
        )

    # Model: seeded initialisation, then resume / fine-tune weights.
    with _private_rng(seed, torch.device("cpu")):
        model = create_model(model_cfg.name, model_cfg.in_channels, model_cfg.out_channels, **model_cfg.kwargs)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    start_epoch, best_dice, best_epoch = 0, -math.inf, 0
    history: list[dict[str, Any]] = []
    if resume and last_path.exists():
        state = _load_resume_state(last_path, model, optimizer, model_cfg, seed, device)
        start_epoch, best_dice, best_epoch, history = (
            state["epoch"], state["best_dice"], state["best_epoch"], state["history"],
        )
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = train_cfg.lr, train_cfg.weight_decay
        logger.info("Resuming %s at epoch %d of %d.", last_path, start_epoch, train_cfg.epochs)
    else:
        if resume:
            logger.warning("resume requested but %s does not exist: starting a new run.", last_path)
        if train_cfg.init_checkpoint:
            load_weights_into(model, train_cfg.init_checkpoint, map_location=device)
            logger.info("Fine-tuning from %s.", train_cfg.init_checkpoint)
    _check_roi(model, model_cfg, roi, device)
    # The adversary (train.adversary; "none" = clean training) is built before any data is
    # cached, so a bad attack name or budget fails at once.
    from volattack.defenses.adversarial import adversarial_loss, build_adversary

    adv_cfg = train_cfg.adversary
    attack = build_adversary(adv_cfg, model, bounds=(float(pre.b_min), float(pre.b_max)), seed=seed)

    configs = {"model": asdict(model_cfg), "train": asdict(train_cfg), "data": asdict(data_cfg)}
    out.mkdir(parents=True, exist_ok=True)

    def write_log() -> None:
        finite_best = best_dice if math.isfinite(best_dice) else None
        _write_json_atomic(
            log_path,
            {
                "seed": seed,
                "epochs_completed": history[-1]["epoch"] if history else 0,
                "best_dice": finite_best,
                "best_epoch": best_epoch or None,
                "versions": _versions(),
                "config": configs,
                "history": history,
            },
        )

    if start_epoch >= train_cfg.epochs:
        logger.info("Run in %s already has %d epochs; nothing to train.", out, start_epoch)
        write_log()
        return _summary(out, best_dice, start_epoch, time.perf_counter() - t_start, seed)

    # Datasets (deterministic transforms cached when train_cfg.cache).
    train_ds = build_dataset(train_list, build_transforms(pre, mode="train", seed=seed), train_cfg.cache)
    val_ds = build_dataset(val_list, build_transforms(pre, mode="eval", seed=seed), train_cfg.cache) if val_list else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    use_amp = bool(train_cfg.amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")

    steps_per_epoch = math.ceil(len(train_ds) / train_cfg.batch_size)
    total_steps = steps_per_epoch * train_cfg.epochs
    bar = tqdm(
        range(start_epoch + 1, train_cfg.epochs + 1),
        initial=start_epoch,
        total=train_cfg.epochs,
        desc="train",
        unit="epoch",
        disable=not progress,
    )
    for epoch in bar:
        t_epoch = time.perf_counter()
        eseed = _epoch_seed(seed, epoch)
        model.train()
        losses = []
        with _private_rng(eseed, device):
            loader = DataLoader(
                train_ds,
                batch_size=train_cfg.batch_size,
                shuffle=True,
                num_workers=train_cfg.num_workers,
                generator=torch.Generator().manual_seed(eseed),
            )
            for it, batch in enumerate(loader):
                lr_now = scheduled_lr(
                    train_cfg.lr, train_cfg.lr_schedule, (epoch - 1) * steps_per_epoch + it, total_steps
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                image = _as_tensor(batch["image"]).to(device)
                label = _as_tensor(batch["label"]).to(device).long()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    if attack is None:
                        loss = loss_fn(model(image), label)
                    else:  # examples crafted in eval mode; the attack restores train mode
                        loss, _terms = adversarial_loss(
                            model, image, label, attack, adv_cfg, loss_fn,
                            seed=eseed * 100_003 + it,
                        )
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
        mean_loss = float(np.mean(losses)) if losses else math.nan
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"Training loss is {mean_loss} at epoch {epoch}; lower train.lr ({train_cfg.lr}).")

        val_dice: Optional[float] = None
        if val_ds is not None and (epoch % train_cfg.val_interval == 0 or epoch == train_cfg.epochs):
            val_loader = DataLoader(  # own generator: the global RNG is never drawn from
                val_ds, batch_size=1, shuffle=False, num_workers=train_cfg.num_workers,
                generator=torch.Generator().manual_seed(eseed),
            )
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                val_dice = validation_dice(
                    model, val_loader, model_cfg.out_channels, roi,
                    train_cfg.sw_batch_size, train_cfg.sw_overlap, device,
                )
            if math.isfinite(val_dice) and val_dice > best_dice:
                best_dice, best_epoch = val_dice, epoch
                save_checkpoint(
                    best_path, model, model_cfg, epoch=epoch, best_dice=best_dice, seed=seed, kind="best",
                    metrics={"val_dice": val_dice},
                )
        seconds = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, "loss": mean_loss, "val_dice": val_dice, "seconds": round(seconds, 3)})
        save_checkpoint(
            last_path, model, model_cfg, epoch=epoch, seed=seed, kind="last",
            best_dice=best_dice if math.isfinite(best_dice) else None, best_epoch=best_epoch,
            optimizer=optimizer.state_dict(), history=history,
        )
        write_log()
        val_txt = f" val_dice {val_dice:.4f}" if val_dice is not None else ""
        logger.info("epoch %d/%d loss %.4f%s (%.1fs)", epoch, train_cfg.epochs, mean_loss, val_txt, seconds)
        bar.set_postfix(loss=f"{mean_loss:.3f}", dice=f"{best_dice:.3f}" if math.isfinite(best_dice) else "-")
    bar.close()

    if best_epoch == 0:  # no validation case, or no foreground in any: keep the final model
        logger.warning("No finite validation Dice; %s is the final model.", best_path)
        save_checkpoint(best_path, model, model_cfg, epoch=train_cfg.epochs, best_dice=None, seed=seed, kind="best")
    return _summary(out, best_dice, train_cfg.epochs, time.perf_counter() - t_start, seed)


def _summary(out: Path, best_dice: float, epochs: int, seconds: float, seed: int) -> dict[str, Any]:
    return {
        "best_checkpoint": str(out / BEST),
        "best_dice": float(best_dice) if math.isfinite(best_dice) else math.nan,
        "epochs": int(epochs),
        "seconds": float(seconds),
        "seed": int(seed),
    }


def _versions() -> dict[str, str]:
    import monai

    try:
        from importlib.metadata import version

        vol = version("volattack")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        vol = "unknown"
    return {"volattack": vol, "torch": torch.__version__, "monai": monai.__version__}


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
    return {
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
