"""Known-value, rule and bad-input tests of volattack.metrics.robustness."""

from __future__ import annotations

import math

import pytest
import torch

from volattack.metrics import dice_drop, fooling_rate, voxel_flip_rate

NAN = float("nan")


def test_dice_drop_by_hand() -> None:
    clean = torch.tensor([0.75, 0.5, 0.0, NAN, 0.25], dtype=torch.float64)
    adv = torch.tensor([0.375, 0.5, 0.0, 0.25, 0.5], dtype=torch.float64)
    absolute, relative = dice_drop(clean, adv)
    expected_abs = torch.tensor([0.375, 0.0, 0.0, NAN, -0.25], dtype=torch.float64)
    torch.testing.assert_close(absolute, expected_abs, equal_nan=True)
    # relative NaN where clean == 0; an attack that raised Dice gives a negative drop
    torch.testing.assert_close(relative, torch.tensor([0.5, 0.0, NAN, NAN, -1.0], dtype=torch.float64), equal_nan=True)


def test_dice_drop_per_class_shape_and_batch_consistency() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, generator=gen) + 0.1
    adv = torch.rand(4, 3, generator=gen)
    absolute, relative = dice_drop(clean, adv)
    assert absolute.shape == relative.shape == (4, 3)
    for i in range(4):
        a_i, r_i = dice_drop(clean[i : i + 1], adv[i : i + 1])
        torch.testing.assert_close(a_i, absolute[i : i + 1])
        torch.testing.assert_close(r_i, relative[i : i + 1])


def test_dice_drop_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"clean and adv must have the same shape, got clean \(3,\) and adv \(2,\)"):
        dice_drop(torch.ones(3), torch.ones(2))


def test_fooling_rate_small_list() -> None:
    # relative drops: 0.5, 0.25, 1.0, excluded (clean 0), excluded (clean NaN), 0.0
    clean = [1.0, 0.75, 0.5, 0.0, NAN, 0.625]
    adv = [0.5, 0.5625, 0.0, 0.0, 0.125, 0.625]
    assert fooling_rate(clean, adv) == pytest.approx(2 / 4)  # default threshold 0.5; 0.5 counts (>=)
    assert fooling_rate(torch.tensor(clean), torch.tensor(adv), threshold=0.25) == pytest.approx(3 / 4)
    assert fooling_rate(clean, adv, threshold=1.0) == pytest.approx(1 / 4)
    assert fooling_rate(clean, adv, threshold=0.9) == pytest.approx(1 / 4)
    assert isinstance(fooling_rate(clean, adv), float)


def test_fooling_rate_no_valid_case_warns_and_returns_nan() -> None:
    with pytest.warns(UserWarning, match="none of the 2 cases"):
        assert math.isnan(fooling_rate([0.0, NAN], [0.0, 0.5]))


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, True, float("nan")])
def test_fooling_rate_bad_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got"):
        fooling_rate([0.5], [0.1], threshold=threshold)


def test_fooling_rate_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"clean and adv must have the same shape"):
        fooling_rate([0.5, 0.4], [0.1])


def test_voxel_flip_rate_by_hand() -> None:
    # voxel:            0  1  2  3  4  5  6  7
    label = [0, 1, 1, 0, 0, 2, 0, 0]
    pred_clean = [1, 1, 0, 0, 0, 2, 0, 0]
    pred_adv = [0, 1, 2, 0, 1, 1, 0, 0]
    # union of clean foreground {0, 1, 5} and true foreground {1, 2, 5} = {0, 1, 2, 5}
    # flips inside it: v0 (1->0), v2 (0->2), v5 (2->1) = 3; v4 (0->1) is outside the union
    as_map = lambda v: torch.tensor(v).view(1, 1, 2, 2, 2)  # noqa: E731
    empty = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    rate = voxel_flip_rate(
        torch.cat([as_map(pred_clean), empty]),
        torch.cat([as_map(pred_adv), as_map([1, 0, 0, 0, 0, 0, 0, 0])]),
        torch.cat([as_map(label), empty]),
    )
    assert rate.shape == (2,) and rate.dtype == torch.float32
    torch.testing.assert_close(rate, torch.tensor([0.75, NAN]), equal_nan=True)  # empty union -> NaN
    # no change -> 0, everything in the union changed -> 1
    unchanged = voxel_flip_rate(as_map(pred_clean), as_map(pred_clean), as_map(label))
    torch.testing.assert_close(unchanged, torch.tensor([0.0]))
    flipped_all = as_map([2, 2, 1, 0, 0, 0, 0, 0])
    torch.testing.assert_close(voxel_flip_rate(as_map(pred_clean), flipped_all, as_map(label)), torch.tensor([1.0]))


def test_voxel_flip_rate_batch_consistency() -> None:
    gen = torch.Generator().manual_seed(1)
    label = torch.randint(0, 3, (3, 1, 6, 6, 6), generator=gen)
    clean = torch.randint(0, 3, (3, 1, 6, 6, 6), generator=gen)
    adv = torch.randint(0, 3, (3, 1, 6, 6, 6), generator=gen)
    batch = voxel_flip_rate(clean, adv, label)
    single = torch.cat([voxel_flip_rate(clean[i : i + 1], adv[i : i + 1], label[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single)
    torch.testing.assert_close(voxel_flip_rate(clean[:, 0], adv[:, 0], label[:, 0]), batch)


def test_voxel_flip_rate_bad_inputs() -> None:
    ok = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"same shape, got pred_clean \(1, 1, 4, 4, 4\), pred_adv \(1, 1, 4, 4, 3\)"):
        voxel_flip_rate(ok, torch.zeros(1, 1, 4, 4, 3, dtype=torch.long), ok)
    with pytest.raises(ValueError, match=r"pred_adv must hold integer class indices"):
        voxel_flip_rate(ok, ok.float() + 0.25, ok)
