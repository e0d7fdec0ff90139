"""Pieces of the training loop with hand-computed values: LR schedules, validation Dice."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from volattack.models.config import TrainConfig
from volattack.training import LR_SCHEDULES, scheduled_lr, validate_train_config, validation_dice


def test_scheduled_lr_known_values() -> None:
    assert scheduled_lr(0.1, "constant", 37, 100) == 0.1
    assert scheduled_lr(0.1, "cosine", 0, 100) == pytest.approx(0.1)
    assert scheduled_lr(0.1, "cosine", 50, 100) == pytest.approx(0.05)
    assert scheduled_lr(0.1, "cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(0.1, "poly", 0, 100) == pytest.approx(0.1)
    assert scheduled_lr(0.1, "poly", 50, 100) == pytest.approx(0.1 * 0.5**0.9)
    assert scheduled_lr(0.1, "poly", 99, 100) == pytest.approx(0.1 * 0.01**0.9)


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_scheduled_lr_decreases(schedule: str) -> None:
    values = [scheduled_lr(1.0, schedule, s, 20) for s in range(20)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert all(0 < v <= 1.0 for v in values)


def test_bad_lr_schedule() -> None:
    assert LR_SCHEDULES == ("constant", "cosine", "poly")
    with pytest.raises(ValueError, match=r"train\.lr_schedule must be one of constant, cosine, poly, got 'step'"):
        validate_train_config(replace(TrainConfig(), lr_schedule="step"))


class _Fixed(nn.Module):
    """Returns logits whose argmax is a fixed label map (ignores the image values)."""

    def __init__(self, pred: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("pred", pred)
        self.k = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sliding windows cover the whole 8^3 volume at once (roi == volume), so the map fits
        logits = torch.nn.functional.one_hot(self.pred.long(), self.k).permute(0, 4, 1, 2, 3).float()
        return logits.expand(x.shape[0], -1, -1, -1, -1)


def test_validation_dice_hand_computed() -> None:
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, :2, :2, :2] = 1  # 8 voxels of class 1; class 2 absent from the ground truth
    pred = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    pred[0, :2, :2, :4] = 1  # 16 voxels, 8 overlapping: Dice = 2 * 8 / (8 + 16) = 2/3
    model = _Fixed(pred, 3).train()
    batch = {"image": torch.rand(1, 1, 8, 8, 8), "label": label}
    dice = validation_dice(model, [batch], num_classes=3, roi_size=[8, 8, 8], sw_batch_size=1, overlap=0.0)
    assert dice == pytest.approx(2 / 3)
    assert model.training  # mode restored

    perfect = _Fixed(label[:, 0], 3)
    assert validation_dice(perfect, [batch], 3, [8, 8, 8], 1, 0.0) == pytest.approx(1.0)


def test_validation_dice_mean_over_present_classes_and_cases() -> None:
    label = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, :4] = 1
    label[1, 0, :4] = 2
    pred = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    pred[0, :4] = 1  # case 0: class 1 perfect (1.0); class 2 absent -> ignored
    # case 1: class 2 predicted as class 1 -> class 2 Dice 0; class 1 absent in truth -> ignored
    pred[1, :4] = 1
    batches = [{"image": torch.rand(1, 1, 8, 8, 8), "label": label[i : i + 1]} for i in range(2)]

    class PerCase(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.i = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.one_hot(pred[self.i : self.i + 1], 3).permute(0, 4, 1, 2, 3).float()
            self.i += 1
            return out

    assert validation_dice(PerCase(), batches, 3, [8, 8, 8], 1, 0.0) == pytest.approx(0.5)


def test_validation_dice_without_foreground_is_nan() -> None:
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    model = _Fixed(torch.ones(1, 8, 8, 8, dtype=torch.long), 3)  # predicts class 1 everywhere
    value = validation_dice(model, [{"image": torch.rand(1, 1, 8, 8, 8), "label": label}], 3, [8, 8, 8], 1, 0.0)
    assert math.isnan(value)  # no foreground class in the ground truth: undefined, not 0 or 1
    assert math.isnan(validation_dice(model, [], 3, [8, 8, 8], 1, 0.0))
