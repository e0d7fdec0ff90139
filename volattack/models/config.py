"""Configuration dataclass of models (light: no torch/MONAI import). The training settings are
:class:`volattack.training.config.TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
