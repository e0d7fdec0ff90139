"""Configuration dataclasses of models and training (light: no torch/MONAI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    """A registered model name, its channels, and keyword arguments for its constructor."""

    name: str = "unet"
    in_channels: int = 1
    out_channels: int = 5
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Clean training: AdamW + Dice-CE, sliding-window validation Dice."""

    epochs: int = 50
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    val_interval: int = 5
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    num_workers: int = 0
    cache: bool = True
    amp: bool = False
    init_checkpoint: Optional[str] = None
