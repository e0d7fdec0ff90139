"""Preprocessing pipeline: readers agree, windowing, resampling, crops, seeding, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volattack.data.config import PreprocessConfig
from volattack.data.intensity import ZScoreIntensity, intensity_from_preprocess
from volattack.data.io import read_volume, write_nifti
from volattack.data.phantoms import generate_phantom
from volattack.data.transforms import (
    LoadVolumed,
    SimpleITKReader,
    build_dataset,
    build_transforms,
    hu_per_unit,
    to_source_units,
)

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A 24^3 phantom saved as NIfTI, NRRD and MHA (the latter two via SimpleITK)."""
    d = tmp_path_factory.mktemp("case")
    ph = generate_phantom(0, (24, 24, 24), spacing=(1.5, 1.5, 3.0))
    img = write_nifti(ph.image, d / "img.nii.gz", ph.affine)
    lab = write_nifti(ph.label, d / "lab.nii.gz", ph.affine, dtype=np.uint8)
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(sitk.ReadImage(str(img)), str(d / f"img{suffix}"))
        sitk.WriteImage(sitk.ReadImage(str(lab)), str(d / f"lab{suffix}"))
    return {"dir": d, "phantom": ph, "image": str(img), "label": str(lab)}


@pytest.mark.parametrize("reader", [None, "ITKReader", "SimpleITKReader"])
def test_nifti_nrrd_mha_load_to_same_array(case, reader):
    t = build_transforms(PreprocessConfig(reader=reader, spacing=[3.0, 3.0, 3.0]))
    ref = t({"image": case["image"], "label": case["label"]})
    for suffix in (".nrrd", ".mha"):
        d = case["dir"]
        out = t({"image": str(d / f"img{suffix}"), "label": str(d / f"lab{suffix}")})
        assert out["image"].shape == ref["image"].shape
        assert torch.allclose(out["image"], ref["image"], atol=1e-6)
        assert torch.equal(out["label"], ref["label"])
        assert np.allclose(out["image"].affine, ref["image"].affine)


def test_nibabel_reader_matches_default(case):
    a = build_transforms(PreprocessConfig(reader="NibabelReader"))({"image": case["image"]})
    b = build_transforms(PreprocessConfig())({"image": case["image"]})
    assert torch.equal(a["image"], b["image"])


def test_simpleitk_reader_verify_suffix():
    r = SimpleITKReader()
    assert r.verify_suffix("a.NRRD") and r.verify_suffix(["a.mha", "b.mhd"])
    assert not r.verify_suffix("a.nii.gz")


def test_eval_output_types_range_and_label_values(case):
    out = build_transforms(PreprocessConfig())({"image": case["image"], "label": case["label"]})
    img, lab = out["image"], out["label"]
    assert img.dtype == torch.float32 and lab.dtype == torch.int64
    assert img.ndim == 4 and img.shape[0] == 1 and lab.shape == img.shape
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert set(torch.unique(lab).tolist()) == {0, 1, 2, 3, 4}
    # the body crop removed air: smaller than the 24^3 grid, no all-b_min border plane
    assert img.shape[1] < 24 and img.shape[2] < 24
    assert float(img[0, 0].max()) > 0.0 and float(img[0, -1].max()) > 0.0


def test_window_maps_known_hu_values(tmp_path):
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 1000.0], np.float32).reshape(5, 1, 1)
    p = write_nifti(np.broadcast_to(hu, (5, 2, 2)).copy(), tmp_path / "w.nii.gz", np.eye(4))
    cfg = PreprocessConfig(crop_foreground=False, b_min=-1.0, b_max=1.0)
    out = build_transforms(cfg)({"image": str(p)})["image"]
    # (HU - a_min) / (a_max - a_min) * 2 - 1, clipped: hand-computed
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))
    back = intensity_from_preprocess(cfg).to_source(out[0, :, 0, 0])
    assert torch.allclose(back, torch.tensor([-175.0, -175.0, 37.5, 250.0, 250.0]))


def test_deprecated_intensity_wrappers_follow_the_intensity_model():
    cfg = PreprocessConfig()  # [-175, 250] -> [0, 1]
    assert hu_per_unit(cfg) == intensity_from_preprocess(cfg).unit_scale == 425.0
    assert to_source_units(0.5, cfg) == 37.5
    assert np.allclose(to_source_units(np.array([0.0, 1.0]), cfg), [-175.0, 250.0])


def test_pipeline_takes_another_intensity_model(tmp_path):
    """A z-score model (nnU-Net CT style) replaces the window; crop and padding follow its bounds."""
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 1000.0], np.float32).reshape(5, 1, 1)
    p = write_nifti(np.broadcast_to(hu, (5, 2, 2)).copy(), tmp_path / "z.nii.gz", np.eye(4))
    z = ZScoreIntensity(mean=50.0, std=100.0, clip=(-150.0, 350.0))
    out = build_transforms(PreprocessConfig(crop_foreground=False), intensity=z)({"image": str(p)})["image"]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-2.0, -2.0, -0.125, 2.0, 3.0]))
    crop = build_transforms(PreprocessConfig(), intensity=z)({"image": str(p)})["image"]
    assert crop.shape[1] == 3  # the first two planes sit at the lower bound (-2): cropped as air
    with pytest.raises(ValueError, match="intensity must be None or an IntensityModel, got dict"):
        build_transforms(PreprocessConfig(), intensity={"kind": "window"})  # type: ignore[arg-type]


def test_preprocess_config_validates_at_construction():
    with pytest.raises(ValueError, match="a_max must be > a_min"):
        PreprocessConfig(a_min=10.0, a_max=10.0)
    cfg = PreprocessConfig()
    cfg.num_samples = 0  # changed afterwards: build_transforms checks again
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        build_transforms(cfg)


def test_spacing_resamples_to_known_shape_and_affine(tmp_path):
    # 21 x 21 x 11 voxels of 1.5 x 1.5 x 3 mm span 30 x 30 x 30 mm -> 11^3 voxels of 3 mm
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    p = write_nifti(np.zeros((21, 21, 11)), tmp_path / "s.nii.gz", aff)
    cfg = PreprocessConfig(spacing=[3.0, 3.0, 3.0], crop_foreground=False)
    out = build_transforms(cfg)({"image": str(p)})["image"]
    assert tuple(out.shape) == (1, 11, 11, 11)
    assert np.allclose(np.diag(np.asarray(out.affine))[:3], 3.0)
    no_resample = build_transforms(PreprocessConfig(crop_foreground=False))({"image": str(p)})["image"]
    assert tuple(no_resample.shape) == (1, 21, 21, 11)


def test_orientation_reorients_lps_stored_volume(tmp_path):
    arr = np.random.default_rng(0).uniform(0, 100, (5, 4, 3)).astype(np.float32)
    ras = write_nifti(arr, tmp_path / "ras.nii.gz", np.eye(4))
    # the same physical volume stored with flipped x and y axes (LPS voxel order)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [4.0, 3.0]
    lps = write_nifti(arr[::-1, ::-1].copy(), tmp_path / "lps.nii.gz", flip)
    cfg = PreprocessConfig(crop_foreground=False, a_min=0.0, a_max=100.0)
    t = build_transforms(cfg)
    a, b = t({"image": str(ras)})["image"], t({"image": str(lps)})["image"]
    assert torch.allclose(a, b) and np.allclose(a.affine, b.affine)


def test_train_crops_have_roi_shape_and_replay_with_seed(case):
    cfg = PreprocessConfig(roi_size=[16, 16, 8], num_samples=3)
    sample = {"image": case["image"], "label": case["label"]}
    out = build_transforms(cfg, "train", seed=5)(sample)
    assert isinstance(out, list) and len(out) == 3
    for o in out:
        assert tuple(o["image"].shape) == (1, 16, 16, 8) and o["image"].dtype == torch.float32
        assert tuple(o["label"].shape) == (1, 16, 16, 8) and o["label"].dtype == torch.int64
        assert float(o["image"].min()) >= 0.0 and float(o["image"].max()) <= 1.0
    again = build_transforms(cfg, "train", seed=5)(sample)
    other = build_transforms(cfg, "train", seed=6)(sample)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(out, again))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(out, other))


def test_train_pads_small_volume_to_roi(case):
    cfg = PreprocessConfig(roi_size=[40, 40, 40], num_samples=1)
    (o,) = build_transforms(cfg, "train")({"image": case["image"], "label": case["label"]})
    assert tuple(o["image"].shape) == (1, 40, 40, 40)
    assert float(o["image"][0, 0, 0, 0]) == 0.0 and int(o["label"][0, 0, 0, 0]) == 0


def test_affine_tracks_crop_and_resample_for_write_back(case, tmp_path):
    cfg = PreprocessConfig(spacing=[3.0, 3.0, 3.0])
    out = build_transforms(cfg)({"image": case["image"], "label": case["label"]})
    img = out["image"]
    p = write_nifti(img[0], tmp_path / "back.nii.gz", img.affine)
    arr, aff, spacing = read_volume(p)
    assert np.allclose(aff, np.asarray(img.affine), atol=1e-5) and np.allclose(spacing, 3.0)
    assert np.allclose(arr, img[0].numpy())
    # world position of the output's first voxel lies inside the source field of view
    src = case["phantom"].affine
    corner = np.linalg.inv(src) @ np.asarray(img.affine)[:, 3]
    assert np.all(corner[:3] >= -1.0) and np.all(corner[:3] <= 24.0)
    # the label is carried the same way
    assert np.allclose(np.asarray(out["label"].affine), np.asarray(img.affine))


def test_truncated_file_error_names_file(case, tmp_path):
    data = open(case["image"], "rb").read()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 3])
    t = build_transforms(PreprocessConfig())
    with pytest.raises(ValueError, match=r"Cannot read image '.*cut\.nii\.gz'"):
        t({"image": str(cut), "label": case["label"]})
    ds = build_dataset([{"image": str(cut), "label": case["label"]}], t, cache=False)
    with pytest.raises(ValueError, match=r"Cannot read image '.*cut\.nii\.gz'"):
        ds[0]
    with pytest.raises(ValueError, match=r"Cannot read image '.*cut\.nii\.gz'"):
        build_dataset([{"image": str(cut), "label": case["label"]}], t, cache=True)


def test_missing_file_error(case, tmp_path):
    t = build_transforms(PreprocessConfig())
    with pytest.raises(FileNotFoundError, match=r"key 'label' not found: '.*gone\.nii\.gz'"):
        t({"image": case["image"], "label": str(tmp_path / "gone.nii.gz")})


def test_channel_files_are_stacked_as_channels(case, tmp_path):
    """A list of single-channel files (nnU-Net's raw layout) loads as one multi-channel image."""
    hu = case["phantom"].image
    other = np.where(hu > -100.0, hu + 50.0, hu)  # another channel with the same foreground (HU > -175)
    second = write_nifti(other, tmp_path / "img_0001.nii.gz", case["phantom"].affine)
    t = build_transforms(PreprocessConfig())
    one = t({"image": case["image"], "label": case["label"]})
    two = t({"image": [case["image"], str(second)], "label": case["label"]})
    assert two["image"].shape == (2,) + tuple(one["image"].shape[1:])
    assert torch.equal(two["image"][:1], one["image"]) and not torch.equal(two["image"][1], one["image"][0])
    assert torch.equal(two["label"], one["label"])
    with pytest.raises(FileNotFoundError, match=r"key 'image' not found: '.*gone_0001\.nii\.gz'"):
        t({"image": [case["image"], str(tmp_path / "gone_0001.nii.gz")], "label": case["label"]})
    with pytest.raises(ValueError, match=r"sample\['image'\] must be a file path or a list of them .*got \[3\]"):
        LoadVolumed(["image"])({"image": [3]})


def test_train_mode_requires_label(case):
    with pytest.raises(ValueError, match=r"missing \['label'\]"):
        build_transforms(PreprocessConfig(), "train")({"image": case["image"]})


def test_build_dataset_cached_and_plain_agree(case):
    dl = [{"image": case["image"], "label": case["label"]}] * 2
    t = build_transforms(PreprocessConfig())
    plain, cached = build_dataset(dl, t, cache=False), build_dataset(dl, t, cache=True)
    assert len(plain) == len(cached) == 2
    assert torch.equal(plain[1]["image"], cached[1]["image"])
    with pytest.raises(ValueError, match="datalist must hold at least one case"):
        build_dataset([], t)
    with pytest.raises(ValueError, match="cache_rate must be in \\(0, 1\\], got 0.0"):
        build_dataset(dl, t, cache=True, cache_rate=0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(a_min=100.0, a_max=0.0), "a_max must be > a_min, got a_min=100.0, a_max=0.0"),
        (dict(b_min=1.0, b_max=1.0), "b_max must be > b_min"),
        (dict(roi_size=[32, 0, 32]), r"roi_size must be 3 positive integers, got \[32, 0, 32\]"),
        (dict(roi_size=[32, 32]), "roi_size must be 3 positive integers"),
        (dict(spacing=[1.0, -1.0, 1.0]), "spacing must be None or 3 positive numbers"),
        (dict(orientation="RAR"), "orientation must be 3 axis codes.*got 'RAR'"),
        (dict(num_samples=0), "num_samples must be an integer >= 1, got 0"),
        (dict(pos=0.0, neg=0.0), "pos and neg must be >= 0 and not both 0"),
        (dict(reader="PILReader"), "reader must be None or one of"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_transforms(PreprocessConfig(**kwargs))


def test_bad_mode_and_seed():
    with pytest.raises(ValueError, match="mode must be one of \\['train', 'eval'\\], got 'test'"):
        build_transforms(PreprocessConfig(), mode="test")
    with pytest.raises(ValueError, match="seed must be an integer in \\[0, 2\\*\\*32\\), got -1"):
        build_transforms(PreprocessConfig(), seed=-1)
