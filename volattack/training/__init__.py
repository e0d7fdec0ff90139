"""Training of a zoo model on a datalist: clean, or adversarial with ``train.adversary``.

Modules:

- :mod:`~volattack.training.config`: :class:`TrainConfig` (validated when built) and the
  learning-rate schedules (light: no torch import);
- :mod:`~volattack.training.data`: data lists, per-epoch seeds and loaders, DDP sharding;
- :mod:`~volattack.training.step`: :func:`train_epoch`, one pass of optimisation steps;
- :mod:`~volattack.training.validation`: the validation Dice, by the evaluation's rule and
  sliding window;
- :mod:`~volattack.training.state`: checkpoints, resume and the training log;
- :mod:`~volattack.training.loop`: :func:`train`, the whole run (also under torchrun).

Names are loaded lazily on first access, so ``import volattack.training.config`` stays light.
"""

from __future__ import annotations

from volattack.registry import lazy_exports

_LAZY = {
    "TrainConfig": "volattack.training.config",
    "LR_SCHEDULES": "volattack.training.config",
    "scheduled_lr": "volattack.training.config",
    "validate_train_config": "volattack.training.config",
    "epoch_seed": "volattack.training.data",
    "shard_indices": "volattack.training.data",
    "train_epoch": "volattack.training.step",
    "crop_sample_ids": "volattack.training.step",
    "validation_dice": "volattack.training.validation",
    "validation_logits": "volattack.training.validation",
    "LAST": "volattack.training.state",
    "BEST": "volattack.training.state",
    "LOG": "volattack.training.state",
    "train": "volattack.training.loop",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
