"""Known-value, rule and bad-input tests of volattack.metrics.segmentation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from volattack.metrics import dice_per_class, hd95, mean_foreground_dice

NAN = float("nan")


def _map(values: list[int], shape: tuple[int, ...] = (2, 2, 2)) -> torch.Tensor:
    """One sample as (1, 1, *shape) int64 from a flat list in C order."""
    return torch.tensor(values, dtype=torch.long).view(1, 1, *shape)


def _assert_close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0, equal_nan=True)


# --------------------------------------------------------------------------- Dice


def test_dice_2x2x2_by_hand() -> None:
    # voxel:        0  1  2  3  4  5  6  7
    label = _map([0, 1, 1, 1, 2, 2, 0, 0])
    pred = _map([1, 1, 1, 0, 2, 0, 0, 2])
    # class 1: |P| = 3 {0,1,2}, |G| = 3 {1,2,3}, |P n G| = 2 {1,2} -> 2*2/6 = 2/3
    # class 2: |P| = 2 {4,7},   |G| = 2 {4,5},   |P n G| = 1 {4}   -> 2*1/4 = 1/2
    # class 3: absent from both -> NaN
    d = dice_per_class(pred, label, num_classes=4)
    assert d.shape == (1, 3) and d.dtype == torch.float32
    _assert_close(d, [[2 / 3, 1 / 2, NAN]])
    _assert_close(mean_foreground_dice(pred, label, num_classes=4), [7 / 12])


def test_dice_absent_class_rules() -> None:
    label = _map([0, 1, 1, 0, 0, 0, 0, 0])
    # class 2 absent from label but predicted (false-positive organ) -> 0
    # class 3 absent from both -> NaN
    pred = _map([0, 1, 1, 0, 2, 0, 0, 0])
    _assert_close(dice_per_class(pred, label, 4), [[1.0, 0.0, NAN]])
    # class 1 present in label, missed by the prediction -> 0
    pred_miss = _map([0, 0, 0, 0, 0, 0, 0, 0])
    _assert_close(dice_per_class(pred_miss, label, 4), [[0.0, NAN, NAN]])
    _assert_close(mean_foreground_dice(pred_miss, label, 4), [0.0])
    # everything absent from both -> all NaN, mean NaN
    empty = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    assert torch.isnan(dice_per_class(empty, empty, 3)).all()
    assert torch.isnan(mean_foreground_dice(empty, empty, 3)).all()


def test_dice_perfect_and_disjoint() -> None:
    label = _map([0, 1, 1, 2, 2, 2, 0, 0])
    _assert_close(dice_per_class(label, label, 3), [[1.0, 1.0]])
    swapped = _map([0, 2, 2, 1, 1, 1, 0, 0])
    _assert_close(dice_per_class(swapped, label, 3), [[0.0, 0.0]])


def test_dice_accepts_channelless_and_float_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=gen)
    pred = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=gen)
    ref = dice_per_class(pred, label, 4)
    torch.testing.assert_close(dice_per_class(pred[:, 0], label[:, 0], 4), ref, equal_nan=True)
    torch.testing.assert_close(dice_per_class(pred.float(), label.float(), 4), ref, equal_nan=True)


def test_dice_matches_monai_on_present_classes() -> None:
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    gen = torch.Generator().manual_seed(1)
    label = torch.randint(0, 3, (3, 1, 7, 6, 5), generator=gen)
    noise = torch.randint(0, 3, label.shape, generator=gen)
    pred = torch.where(torch.rand(label.shape, generator=gen) < 0.3, noise, label)
    ref = compute_dice(one_hot(pred, 3), one_hot(label, 3), include_background=False)
    torch.testing.assert_close(dice_per_class(pred, label, 3), ref.float(), atol=1e-6, rtol=0)


def test_dice_batch_consistency() -> None:
    gen = torch.Generator().manual_seed(2)
    label = torch.randint(0, 5, (4, 1, 8, 8, 8), generator=gen)
    pred = torch.randint(0, 5, (4, 1, 8, 8, 8), generator=gen)
    label[1] = 0  # a sample without foreground
    pred[1, 0, :2] = 3
    batch = dice_per_class(pred, label, 5)
    single = torch.cat([dice_per_class(pred[i : i + 1], label[i : i + 1], 5) for i in range(4)])
    torch.testing.assert_close(batch, single, equal_nan=True)
    mean = mean_foreground_dice(pred, label, 5)
    assert mean.shape == (4,)
    single_mean = torch.cat([mean_foreground_dice(pred[i : i + 1], label[i : i + 1], 5) for i in range(4)])
    torch.testing.assert_close(mean, single_mean)


@pytest.mark.parametrize("fn", [dice_per_class, mean_foreground_dice, hd95])
def test_segmentation_bad_inputs(fn) -> None:
    ok = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 1, 4, 4, 4\).*\(1, 1, 4, 4, 3\)"):
        fn(ok, torch.zeros(1, 1, 4, 4, 3, dtype=torch.long), 3)
    too_big = ok.clone()
    too_big[0, 0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"pred values must be in \[0, 2\] for num_classes=3, got max 3"):
        fn(too_big, ok, 3)
    with pytest.raises(ValueError, match=r"label values must be in \[0, 2\] for num_classes=3, got max 3"):
        fn(ok, too_big, 3)
    negative = ok.clone()
    negative[0, 0, 1, 1, 1] = -1
    with pytest.raises(ValueError, match=r"label values .*got min -1"):
        fn(ok, negative, 3)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2.*got 1"):
        fn(ok, ok, 1)
    with pytest.raises(ValueError, match=r"num_classes .*got 2.5"):
        fn(ok, ok, 2.5)
    with pytest.raises(ValueError, match=r"pred must hold integer class indices"):
        fn(ok.float() + 0.5, ok, 3)
    with pytest.raises(TypeError, match=r"pred and label must be torch.Tensors"):
        fn(ok.numpy(), ok, 3)


# --------------------------------------------------------------------------- HD95


def _cubes(shift: tuple[int, int, int], size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A size^3 cube of class 1 at (2, 2, 2) in the label and the same cube shifted in pred."""
    label = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    pred = torch.zeros_like(label)
    label[0, 0, 2 : 2 + size, 2 : 2 + size, 2 : 2 + size] = 1
    x, y, z = (2 + s for s in shift)
    pred[0, 0, x : x + size, y : y + size, z : z + size] = 1
    return pred, label


def test_hd95_shifted_cubes_anisotropic_spacing() -> None:
    # 2x2x2 cubes: every voxel is a surface voxel (one erosion empties the cube).
    # Shift by 2 voxels along z: the cubes touch; from each cube half of the surface
    # voxels are 1 voxel from the other cube and half are 2 voxels away, so the
    # distances are [1, 1, 1, 1, 2, 2, 2, 2] voxels, whose 95th percentile is 2 voxels.
    pred, label = _cubes((0, 0, 2))
    _assert_close(hd95(pred, label, 2), [[2.0]])  # voxel units
    _assert_close(hd95(pred, label, 2, spacing=(1, 1, 3)), [[6.0]])  # 2 voxels * 3 mm
    # the same shift along x costs 1 mm per voxel with spacing (1, 1, 3)
    pred_x, label_x = _cubes((2, 0, 0))
    _assert_close(hd95(pred_x, label_x, 2, spacing=(1.0, 1.0, 3.0)), [[2.0]])
    _assert_close(hd95(pred_x, label_x, 2, spacing=(0.5, 1.0, 3.0)), [[1.0]])


def test_hd95_one_voxel_shift_of_a_slab() -> None:
    # A one-voxel-thick slab (all surface) shifted by 1 voxel along z: every voxel's
    # nearest counterpart is straight above/below it, 1 voxel = 3 mm away.
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    pred = torch.zeros_like(label)
    label[0, 0, 2:6, 2:6, 3] = 1
    pred[0, 0, 2:6, 2:6, 4] = 1
    _assert_close(hd95(pred, label, 2, spacing=[1.0, 1.0, 3.0]), [[3.0]])
    _assert_close(hd95(label, label, 2, spacing=[1.0, 1.0, 3.0]), [[0.0]])


def test_hd95_absent_class_rules() -> None:
    # classes: 1 present in both, 2 only in label (missed), 3 only in pred (false positive), 4 absent
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    pred = torch.zeros_like(label)
    label[0, 0, 1:3, 1:3, 1:3] = 1
    pred[0, 0, 1:3, 1:3, 1:3] = 1
    label[0, 0, 5:7, 5:7, 5:7] = 2
    pred[0, 0, 5:7, 1:3, 5:7] = 3
    diag_mm = 7 * math.sqrt(1 + 1 + 9)  # ((8-1)*1)^2 + ((8-1)*1)^2 + ((8-1)*3)^2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rules are applied before MONAI, which would warn
        out = hd95(pred, label, 5, spacing=(1, 1, 3))
    _assert_close(out, [[0.0, diag_mm, diag_mm, NAN]], atol=1e-4)
    _assert_close(hd95(pred, label, 5), [[0.0, 7 * math.sqrt(3), 7 * math.sqrt(3), NAN]], atol=1e-4)


def _hd95_brute_force(pred: np.ndarray, label: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Independent HD95 of two binary masks: surface voxels by erosion, all pairwise distances."""
    def surface(m: np.ndarray) -> np.ndarray:
        padded = np.pad(m, 1)
        return np.argwhere(padded & ~ndimage.binary_erosion(padded)) * np.asarray(spacing)

    sp, sg = surface(pred), surface(label)
    d = cdist(sp, sg)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_matches_brute_force_and_batch_consistency() -> None:
    gen = torch.Generator().manual_seed(3)
    # smooth random blobs: threshold a blurred noise field into 3 classes
    noise = torch.rand(3, 1, 12, 10, 9, generator=gen, dtype=torch.float64).numpy()
    field = np.stack([ndimage.gaussian_filter(n[0], 1.5) for n in noise])[:, None]
    qs = np.quantile(field, [0.6, 0.8])
    label = torch.from_numpy(np.digitize(field, qs))
    pred = torch.from_numpy(np.digitize(np.roll(field, 1, axis=2), qs))
    pred[2] = 0  # sample 2: nothing predicted -> penalties
    spacing = (0.8, 1.2, 2.5)
    out = hd95(pred, label, 3, spacing=spacing)
    assert out.shape == (3, 2) and out.dtype == torch.float32
    diag = math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip((12, 10, 9), spacing)))
    for b in range(3):
        for c in (1, 2):
            p, g = pred[b, 0].numpy() == c, label[b, 0].numpy() == c
            expected = _hd95_brute_force(p, g, spacing) if p.any() and g.any() else diag
            assert out[b, c - 1].item() == pytest.approx(expected, abs=1e-4), (b, c)
    single = torch.cat([hd95(pred[i : i + 1], label[i : i + 1], 3, spacing=spacing) for i in range(3)])
    torch.testing.assert_close(out, single, equal_nan=True)


def test_hd95_2d() -> None:
    label = torch.zeros(2, 1, 9, 9, dtype=torch.long)
    pred = torch.zeros_like(label)
    label[:, 0, 2:4, 2:4] = 1
    pred[0, 0, 2:4, 2:4] = 1
    pred[1, 0, 2:4, 5:7] = 1  # shifted by 3 along the second axis: distances [2, 2, 3, 3] per side
    _assert_close(hd95(pred, label, 2, spacing=(1.0, 2.0)), [[0.0], [6.0]])


def test_hd95_bad_spacing_and_rank() -> None:
    pred, label = _cubes((0, 0, 1))
    with pytest.raises(ValueError, match=r"spacing must have one value per spatial dimension \(3\), got \[1.0, 1.0\]"):
        hd95(pred, label, 2, spacing=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"spacing values must be positive and finite, got \[1.0, 0.0, 3.0\]"):
        hd95(pred, label, 2, spacing=(1, 0, 3))
    with pytest.raises(ValueError, match=r"spacing must be a sequence"):
        hd95(pred, label, 2, spacing=3.0)
    with pytest.raises(ValueError, match=r"2 or 3 spatial dimensions"):
        hd95(torch.zeros(2, 1, 5, dtype=torch.long), torch.zeros(2, 1, 5, dtype=torch.long), 2)


# --------------------------------------------------------------------------- NSD


def test_nsd_shifted_cubes_by_hand_in_mm() -> None:
    from volattack.metrics.segmentation import nsd

    # the cubes of test_hd95_shifted_cubes_anisotropic_spacing: boundary distances [1, 1, 1, 1, 2, 2, 2, 2]
    # voxels from each side, so 8 of the 16 boundary voxels lie within 1 voxel of the other boundary
    pred, label = _cubes((0, 0, 2))
    _assert_close(nsd(pred, label, 2, spacing=(1, 1, 3), tolerance_mm=3.0), [[0.5]])  # 1 voxel = 3 mm along z
    _assert_close(nsd(pred, label, 2, spacing=(1, 1, 3), tolerance_mm=2.9), [[0.0]])
    _assert_close(nsd(pred, label, 2, spacing=(1, 1, 3), tolerance_mm=6.0), [[1.0]])
    pred_x, label_x = _cubes((2, 0, 0))  # the same shift along x: 1 mm per voxel
    _assert_close(nsd(pred_x, label_x, 2, spacing=(1, 1, 3), tolerance_mm=1.0), [[0.5]])
    _assert_close(nsd(label, label, 2, spacing=(1, 1, 3), tolerance_mm=0.0), [[1.0]])


def test_nsd_matches_monai_and_its_absent_class_rules() -> None:
    import torch.nn.functional as F
    from monai.metrics import compute_surface_dice

    from volattack.metrics.segmentation import nsd

    gen = torch.Generator().manual_seed(5)
    noise = torch.rand(2, 1, 12, 10, 9, generator=gen, dtype=torch.float64).numpy()
    field = np.stack([ndimage.gaussian_filter(n[0], 1.5) for n in noise])[:, None]
    label = torch.from_numpy(np.digitize(field, np.quantile(field, [0.6, 0.8])))
    pred = torch.from_numpy(np.digitize(np.roll(field, 1, axis=2), np.quantile(field, [0.55, 0.8])))
    label[1][label[1] == 2] = 0  # sample 1: class 2 only predicted
    spacing, tol = (0.8, 1.2, 2.5), 2.0
    out = nsd(pred, label, 4, spacing=spacing, tolerance_mm=tol)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    hot = lambda m: F.one_hot(m[:, 0].long(), 4).permute(0, 4, 1, 2, 3)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about the empty classes
        ref = compute_surface_dice(hot(pred), hot(label), [tol] * 3, spacing=list(spacing))
    torch.testing.assert_close(out, ref.float(), equal_nan=True)
    assert out[1, 1].item() == 0.0  # present in one map only
    assert math.isnan(out[0, 2].item()) and math.isnan(out[1, 2].item())  # class 3: absent from both
    assert 0 < out[0, 0].item() < 1
    single = torch.cat([nsd(pred[i : i + 1], label[i : i + 1], 4, spacing=spacing, tolerance_mm=tol) for i in range(2)])
    torch.testing.assert_close(out, single, equal_nan=True)


def test_nsd_bad_tolerance() -> None:
    from volattack.metrics.segmentation import nsd

    pred, label = _cubes((0, 0, 1))
    with pytest.raises(ValueError, match=r"tolerance_mm must be a finite number >= 0, got -1.0"):
        nsd(pred, label, 2, spacing=(1, 1, 1), tolerance_mm=-1.0)
    with pytest.raises(ValueError, match=r"spacing must have one value per spatial dimension"):
        nsd(pred, label, 2, spacing=(1, 1), tolerance_mm=1.0)
