"""Configuration dataclasses of models and training (light: no torch/MONAI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from volattack.defenses.config import AdversaryConfig


@dataclass
class ModelConfig:
    """A registered model name, its channels, and keyword arguments for its constructor.

    Attributes:
        name: registry name (``volattack.models.zoo.list_models()``).
        in_channels: input channels C (1 for CT).
        out_channels: classes K including background (5 for the phantoms).
        kwargs: constructor arguments of the MONAI network overriding the zoo defaults
            (e.g. ``{"channels": [16, 32, 64], "strides": [2, 2]}`` for ``unet``).
    """

    name: str = "unet"
    in_channels: int = 1
    out_channels: int = 5
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Clean training: AdamW + Dice-CE, sliding-window validation Dice.

    Attributes:
        epochs: number of passes over the training cases (>= 1).
        batch_size: cases per optimisation step; each contributes
            ``data.preprocess.num_samples`` crops (>= 1).
        lr: AdamW learning rate (> 0), the initial value of ``lr_schedule``.
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"poly"`` (nnU-Net ``(1 - t) ** 0.9``)
            decay per optimisation step over the whole run.
        weight_decay: AdamW decoupled weight decay (>= 0).
        val_interval: validate every this many epochs (and always at the last one).
        sw_batch_size: windows per forward pass in sliding-window validation.
        sw_overlap: sliding-window overlap fraction in [0, 1).
        num_workers: DataLoader worker processes (0: load in the main process).
        cache: cache the deterministic transforms (MONAI ``CacheDataset``).
        amp: automatic mixed precision (float16 on CUDA, bfloat16 on CPU).
        init_checkpoint: checkpoint to fine-tune from (same architecture), or ``None``.
        device: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:0"``.
        adversary: adversarial training (``volattack.defenses.config.AdversaryConfig``):
            ``name: none`` trains clean; ``pgd``, ``fgsm_rs``, ``vafa`` (+ ``fr_weight`` for VAFT),
            ``sa2`` or any registered attack with its ``params``.
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
