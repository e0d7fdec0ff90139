"""Training configuration: :class:`TrainConfig` (validated when built) and the learning-rate
schedules it names. Light: imports neither torch nor MONAI, so the CLI's ``--help`` and YAML
loading stay fast."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from volattack.checks import check_bool, check_choice, is_finite_number, is_int
from volattack.defenses.config import AdversaryConfig, DefenseConfig
from volattack.threats.config import PoisonConfig  # train.poison
from volattack.training.distill import DistillConfig, check_objective
from volattack.yaml_config import ConfigError

#: names accepted by ``TrainConfig.lr_schedule`` (see :func:`scheduled_lr`)
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "poly")

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """Learning rate of optimisation step ``step`` (0-based) out of ``total_steps``.

    ``constant``: ``base_lr``; ``cosine``: ``base_lr * (1 + cos(pi * t)) / 2`` (Loshchilov &
    Hutter, SGDR, ICLR 2017, one cycle without restart); ``poly``: ``base_lr * (1 - t) ** 0.9``
    (the nnU-Net schedule), with ``t = step / total_steps`` clamped to [0, 1].

    Args:
        base_lr: the initial learning rate.
        schedule: one of :data:`LR_SCHEDULES`.
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


@dataclass
class TrainConfig:
    """The ``train`` section: AdamW + Dice-CE on random crops, sliding-window validation Dice.

    Every value is checked when the config is built (and again by :meth:`validate`, e.g. after
    fields were assigned); a bad value raises :class:`~volattack.yaml_config.ConfigError` (a
    ``ValueError``) naming the key and the value, e.g. ``"train.epochs must be an integer >= 1,
    got 0."``, the same message from Python and from YAML.

    Attributes:
        epochs: number of passes over the training cases (>= 1).
        batch_size: cases per optimisation step (and rank under torchrun); each contributes
            ``data.preprocess.num_samples`` crops (>= 1).
        lr: AdamW learning rate (finite, > 0), the initial value of ``lr_schedule``.
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"poly"`` (nnU-Net ``(1 - t) ** 0.9``)
            decay per optimisation step over the whole run (:func:`scheduled_lr`).
        weight_decay: AdamW decoupled weight decay (finite, >= 0).
        val_interval: validate every this many epochs (and always at the last one), >= 1.
        sw_batch_size: windows per forward pass in sliding-window validation (>= 1).
        sw_overlap: sliding-window overlap fraction in [0, 1).
        num_workers: DataLoader worker processes (0: load in the main process).
        cache: cache the deterministic transforms (MONAI ``CacheDataset``).
        amp: automatic mixed precision for the training passes and the adversary (float16 with
            loss scaling on CUDA, bfloat16 on CPU); validation always runs in float32, as the
            evaluation does.
        init_checkpoint: checkpoint to fine-tune from (same architecture), or ``None``.
        device: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``; under torchrun each rank uses ``cuda:LOCAL_RANK``.
        adversary: adversarial training (:class:`~volattack.defenses.config.AdversaryConfig`):
            ``name: none`` trains clean; ``pgd``, ``fgsm_rs``, ``vafa`` (+ ``fr_weight`` for VAFT),
            ``sa2`` or any registered attack with its ``params``.
        noise_sigma: Gaussian noise augmentation (finite, >= 0; 0 turns it off): every training
            crop gets ``clamp(x + N(0, noise_sigma^2 I), b_min, b_max)`` in model-input units before
            the model (or the adversary) sees it, so that the model can be certified by randomized
            smoothing at that sigma (Cohen, Rosenfeld & Kolter, ICML 2019; ``volattack.certify``).
        temperature: softmax temperature T of the training loss (finite, > 0): its cross-entropy
            term sees ``logits / T``, its Dice term ``logits`` (the teacher of defensive
            distillation, :mod:`volattack.training.distill`); the checkpoint is used at T = 1.
        distill: train a defensively distilled student from a teacher checkpoint
            (:class:`~volattack.training.distill.DistillConfig`), or ``None``.
        defense: input transforms in front of the model during training, also crafted through by
            the adversary (the hybrid defence, :mod:`volattack.defenses.hybrid`), or ``None``.
        poison: backdoor poisoning of the training cases
            (:class:`~volattack.threats.config.PoisonConfig`: trigger, rate, target behaviour by
            class name, clean-label, seed; :func:`volattack.threats.poison.poison_training_cases`),
            or ``None``.
    """

    epochs: int = 50
    batch_size: int = 2
    lr: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 1e-5
    val_interval: int = 5
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    num_workers: int = 0
    cache: bool = True
    amp: bool = False
    init_checkpoint: Optional[str] = None
    device: Optional[str] = None
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    noise_sigma: float = 0.0
    temperature: float = 1.0
    distill: Optional[DistillConfig] = None
    defense: Optional[DefenseConfig] = None
    poison: Optional[PoisonConfig] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (see the class docstring).

        Raises:
            ConfigError: a ``ValueError`` naming the field and the bad value.
        """
        try:
            self._check_fields()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check_fields(self) -> None:
        for name in ("epochs", "batch_size", "val_interval", "sw_batch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("num_workers", self.num_workers, 0)
        if not is_finite_number(self.lr) or self.lr <= 0:
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr!r}.")
        if not is_finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay!r}.")
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not is_finite_number(self.sw_overlap) or not 0 <= self.sw_overlap < 1:
            raise ValueError(f"train.sw_overlap must be in [0, 1), got {self.sw_overlap!r}.")
        check_bool("train.cache", self.cache)
        check_bool("train.amp", self.amp)
        if self.init_checkpoint is not None and not isinstance(self.init_checkpoint, str):
            raise ValueError(f"train.init_checkpoint must be a path or None, got {self.init_checkpoint!r}.")
        if self.device not in (None, "") and not (isinstance(self.device, str) and _DEVICE.match(self.device)):
            raise ValueError(
                f"train.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}."
            )
        if not is_finite_number(self.noise_sigma) or self.noise_sigma < 0:
            raise ValueError(f"train.noise_sigma must be a finite number >= 0 (input units), got {self.noise_sigma!r}.")
        if not isinstance(self.adversary, AdversaryConfig):
            raise ValueError(f"train.adversary must be an AdversaryConfig, got {type(self.adversary).__name__}.")
        if self.poison is not None and not isinstance(self.poison, PoisonConfig):
            raise ValueError(f"train.poison must be a PoisonConfig or None, got {type(self.poison).__name__}.")
        check_objective(self)  # temperature, distill, defense (volattack.training.distill)


def _check_int(name: str, value: Any, low: int) -> None:
    if not is_int(value) or value < low:
        raise ValueError(f"train.{name} must be an integer >= {low}, got {value!r}.")


def validate_train_config(train_cfg: TrainConfig, seed: int = 0) -> None:
    """Re-check a :class:`TrainConfig` (fields may have been assigned after it was built) and the
    run seed, before any work is done.

    Args:
        train_cfg: the training settings.
        seed: the run seed (integer >= 0).

    Raises:
        ValueError: naming the field and the bad value (``"seed must be an integer >= 0, got -1."``).
    """
    if not isinstance(train_cfg, TrainConfig):
        raise ValueError(f"train_cfg must be a TrainConfig, got {type(train_cfg).__name__}.")
    train_cfg.validate()
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
