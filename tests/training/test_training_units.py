"""Pieces of the training loop with hand-computed values: LR schedules, config checks, validation Dice
(the evaluation's rule and sliding window)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from volattack.training import LR_SCHEDULES, scheduled_lr, validate_train_config, validation_dice
from volattack.training.config import TrainConfig


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
        TrainConfig(lr_schedule="step")
    cfg = TrainConfig()
    cfg.lr_schedule = "step"  # assigned after construction: validate_train_config checks again
    with pytest.raises(ValueError, match=r"train\.lr_schedule must be one of constant, cosine, poly, got 'step'"):
        validate_train_config(cfg)


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


def test_validation_dice_mean_over_classes_and_cases() -> None:
    label = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, :4] = 1
    label[1, 0, :4] = 2
    pred = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    pred[0, :4] = 1  # case 0: class 1 perfect (1.0); class 2 absent from both -> skipped: case Dice 1.0
    # case 1: class 2 predicted as class 1 -> class 2 Dice 0, and class 1 (absent from the truth,
    # predicted) also 0: case Dice 0.0
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


def test_validation_dice_without_foreground() -> None:
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    batch = {"image": torch.rand(1, 1, 8, 8, 8), "label": label}
    # no foreground in the truth, class 1 predicted everywhere: a hallucinated organ scores 0
    hallucinating = _Fixed(torch.ones(1, 8, 8, 8, dtype=torch.long), 3)
    assert validation_dice(hallucinating, [batch], 3, [8, 8, 8], 1, 0.0) == 0.0
    # no foreground in either: undefined (nan), not 0 or 1; and no case at all: nan
    empty = _Fixed(torch.zeros(1, 8, 8, 8, dtype=torch.long), 3)
    assert math.isnan(validation_dice(empty, [batch], 3, [8, 8, 8], 1, 0.0))
    assert math.isnan(validation_dice(empty, [], 3, [8, 8, 8], 1, 0.0))
    # a case without any foreground does not dilute the mean over the other cases
    label1 = label.clone()
    label1[0, 0, :2, :2, :2] = 1

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.maps = [torch.zeros(1, 8, 8, 8, dtype=torch.long), label1[:, 0]]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(self.maps.pop(0), 3).permute(0, 4, 1, 2, 3).float()

    two = [batch, {"image": torch.rand(1, 1, 8, 8, 8), "label": label1}]
    assert validation_dice(Two(), two, 3, [8, 8, 8], 1, 0.0) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- one definition of validation


def test_validation_counts_a_hallucinated_organ_as_the_evaluation_does() -> None:
    """Issue 9 item 4: the validation Dice is the evaluation's case Dice. The model segments the liver
    (class 1) perfectly and hallucinates a spleen (class 2) the ground truth does not have: the case
    Dice is mean(1, 0) = 0.5 (MONAI's ``ignore_empty`` rule, used before, gave 1.0)."""
    from volattack.metrics import mean_foreground_dice

    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, :4] = 1
    pred = label[:, 0].clone()
    pred[0, 6:, 6:, 6:] = 2  # 8 voxels of an organ absent from the ground truth
    batch = {"image": torch.rand(1, 1, 8, 8, 8), "label": label}
    honest = validation_dice(_Fixed(label[:, 0], 3), [batch], 3, [8, 8, 8], 1, 0.0)
    hallucinating = validation_dice(_Fixed(pred, 3), [batch], 3, [8, 8, 8], 1, 0.0)
    assert honest == pytest.approx(1.0)
    assert hallucinating < honest
    assert hallucinating == pytest.approx(0.5)
    assert hallucinating == pytest.approx(float(mean_foreground_dice(pred[:, None], label, 3)[0]))


class _WindowPosition(nn.Module):
    """Logits that depend on the position inside the window (a ramp along H), so the stitched
    prediction depends on how overlapping windows are blended."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        ramp = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(ramp), ramp + 0.1 * x, -ramp], dim=1)


def test_validation_uses_the_evaluation_inferer() -> None:
    """The validation's logits are the evaluation inferer's (gaussian blending, ``b_min`` padding), and
    its Dice is the evaluation's case Dice on that prediction: with the label set to the evaluation's
    prediction the validation Dice is 1, while constant blending (used before) predicts another map."""
    from monai.inferers import sliding_window_inference

    from volattack.inference import make_inferer
    from volattack.metrics import mean_foreground_dice
    from volattack.training import validation_logits

    model = _WindowPosition().eval()
    image = torch.rand(1, 1, 24, 8, 8, generator=torch.Generator().manual_seed(0))
    roi, sw, overlap, cval = [12, 8, 8], 2, 0.5, 0.0
    ours = validation_logits(model, image, roi, sw, overlap, cval)
    evaluation = make_inferer(roi, sw, overlap, cval=cval)(image, model)
    torch.testing.assert_close(ours, evaluation, rtol=0, atol=0)
    # padding of a volume smaller than the window with b_min, as the evaluation does
    small = torch.rand(1, 1, 6, 8, 8)
    torch.testing.assert_close(validation_logits(model, small, roi, sw, overlap, cval=-1.0),
                               make_inferer(roi, sw, overlap, cval=-1.0)(small, model), rtol=0, atol=0)

    eval_pred = evaluation.argmax(1, keepdim=True)
    constant_pred = sliding_window_inference(image, roi, sw, model, overlap=overlap).argmax(1, keepdim=True)
    assert not torch.equal(eval_pred, constant_pred)  # the blending decides the prediction here
    batch = {"image": image, "label": eval_pred}
    dice = validation_dice(model, [batch], 3, roi, sw, overlap)
    assert dice == pytest.approx(float(mean_foreground_dice(eval_pred, eval_pred, 3)[0])) == pytest.approx(1.0)
    constant_dice = float(mean_foreground_dice(constant_pred, eval_pred, 3)[0])
    assert constant_dice < 0.999
