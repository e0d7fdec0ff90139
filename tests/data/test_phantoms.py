"""Synthetic phantoms: determinism, anatomy, intensities, geometry, dataset files, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from volattack.data.phantoms import (
    CLASS_NAMES,
    HU_MEANS,
    case_seed,
    generate_phantom,
    make_phantom_dataset,
)

SMALL = (32, 32, 24)


def _world_centroid(ph, cls: int) -> np.ndarray:
    idx = np.argwhere(ph.label == cls).mean(axis=0)
    return (ph.affine @ np.append(idx, 1.0))[:3]


@pytest.fixture(scope="module")
def full_phantoms():
    return [generate_phantom(s) for s in (0, 1, 7)]


def test_same_seed_identical_different_seed_differs():
    a, b = generate_phantom(3, SMALL), generate_phantom(3, SMALL)
    c = generate_phantom(4, SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine) and a.spacing == b.spacing
    assert not np.array_equal(a.label, c.label)
    assert np.abs(a.image - c.image).mean() > 5.0


def test_types_and_shapes():
    ph = generate_phantom(0, (24, 20, 16))
    assert ph.image.shape == ph.label.shape == (24, 20, 16)
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    assert ph.affine.shape == (4, 4) and ph.affine.dtype == np.float64
    assert set(np.unique(ph.label)) <= set(CLASS_NAMES)


def test_all_classes_present(full_phantoms):
    for ph in full_phantoms:
        assert ph.image.shape == (64, 64, 48)
        assert set(np.unique(ph.label).tolist()) == {0, 1, 2, 3, 4}
        counts = np.bincount(ph.label.ravel(), minlength=5)
        # liver is the largest organ; every organ is more than a speck
        assert counts[1] > max(counts[2], counts[3], counts[4])
        assert counts[2:].min() > 200


def test_anatomical_sides_in_world_coordinates(full_phantoms):
    for ph in full_phantoms:
        # RAS: +x is the patient's right, +y anterior
        left_k, right_k = _world_centroid(ph, 3), _world_centroid(ph, 4)
        liver, spleen = _world_centroid(ph, 1), _world_centroid(ph, 2)
        assert left_k[0] < 0 < right_k[0]
        assert liver[0] > 0 > spleen[0]
        assert left_k[1] < liver[1] and right_k[1] < liver[1]  # kidneys posterior to the liver
        # the spine (bone > 400 HU) is midline and posterior to the kidneys' front
        bone = np.argwhere(ph.image > 400).mean(axis=0)
        bone_w = (ph.affine @ np.append(bone, 1.0))[:3]
        assert abs(bone_w[0]) < abs(left_k[0]) and abs(bone_w[0]) < abs(right_k[0])
        assert bone_w[1] < liver[1]


def test_hu_ranges_plausible(full_phantoms):
    for ph in full_phantoms:
        corner = ph.image[:4, :4, :]  # outside the body: air
        assert abs(float(corner.mean()) + 1000.0) < 5.0
        assert ph.image.min() >= -1024.0
        assert (ph.image > 400).sum() > 50  # spine
        assert 10.0 < float(ph.image[ph.label == 1].std()) < 60.0  # textured, noisy organs
        for cls, key in ((1, "liver"), (2, "spleen")):  # texture moves organ means a little
            assert abs(float(ph.image[ph.label == cls].mean()) - ph.params["hu_means"][key]) < 25.0


@pytest.mark.parametrize("seed", [0, 3])
def test_organ_means_near_targets_without_texture(seed):
    ph = generate_phantom(seed, texture_hu=0.0)
    hu = ph.params["hu_means"]
    assert abs(hu["liver"] - HU_MEANS["liver"]) <= 12.0 and abs(hu["spleen"] - HU_MEANS["spleen"]) <= 12.0  # jitter 2 sd
    # organ interiors (eroded: no partial volume) hold the sampled mean + white noise
    for cls, key in ((1, "liver"), (2, "spleen")):
        core = ndimage.binary_erosion(ph.label == cls, iterations=2)
        assert abs(float(ph.image[core].mean()) - hu[key]) < 4.0
    for cls in (3, 4):
        core = ndimage.binary_erosion(ph.label == cls, iterations=1)
        # cortex at the mean, a slightly darker medulla: the mean lies between the two
        m = float(ph.image[core].mean())
        assert hu["kidney"] + HU_MEANS["medulla_delta"] - 4.0 < m < hu["kidney"] + 4.0


def test_noise_free_image_matches_targets_and_labels():
    """Without jitter, blur or noise each organ holds exactly its target HU: no overlap."""
    ph = generate_phantom(
        5, (40, 40, 32), noise_hu=0.0, texture_hu=0.0, blur_sigma=0.0, hu_jitter=0.0
    )
    assert np.all(ph.image[ph.label == 1] == np.float32(HU_MEANS["liver"]))
    assert np.all(ph.image[ph.label == 2] == np.float32(HU_MEANS["spleen"]))
    kidney_vals = set(np.unique(ph.image[(ph.label == 3) | (ph.label == 4)]).tolist())
    assert kidney_vals == {HU_MEANS["kidney"], HU_MEANS["kidney"] + HU_MEANS["medulla_delta"]}
    assert np.all(ph.image[ph.label == 0] != np.float32(HU_MEANS["liver"]))  # no unlabelled liver paint
    assert np.all(ph.image[:2, :2, :] == -1000.0)


def test_kidneys_share_intensity_and_liver_spleen_overlap_within_noise():
    ph = generate_phantom(2, hu_jitter=0.0)
    left = ph.image[ndimage.binary_erosion(ph.label == 3)].mean()
    right = ph.image[ndimage.binary_erosion(ph.label == 4)].mean()
    assert abs(left - right) < 5.0
    liver = ph.image[ph.label == 1]
    spleen = ph.image[ph.label == 2]
    gap = abs(liver.mean() - spleen.mean())
    assert gap < liver.std() + spleen.std()  # not separable by a threshold


def test_spacing_given_is_exact_and_anatomy_independent_of_spacing():
    a = generate_phantom(11, SMALL, spacing=(1.25, 1.25, 2.5))
    b = generate_phantom(11, SMALL)
    assert a.spacing == (1.25, 1.25, 2.5)
    assert np.allclose(np.diag(a.affine)[:3], (1.25, 1.25, 2.5))
    # the centre of the grid is the world origin
    centre = a.affine @ np.append((np.array(SMALL) - 1) / 2.0, 1.0)
    assert np.allclose(centre[:3], 0.0)
    # the jittered default is anisotropic and close to 1.5 x 1.5 x 3.0
    assert b.spacing[0] == b.spacing[1] and b.spacing[2] > 2.0 * b.spacing[0] * 0.85
    assert 1.35 <= b.spacing[0] <= 1.65 and 2.55 <= b.spacing[2] <= 3.45
    # in-plane spacing only rescales world units: same labels on the same grid
    assert np.array_equal(a.label, generate_phantom(11, SMALL, spacing=(1.25, 1.25, 2.5)).label)


def test_dataset_files_json_and_header_spacing(tmp_path):
    path = make_phantom_dataset(tmp_path / "ds", n=2, size=(16, 16, 16), seed=3, n_val=1, n_test=1,
                                spacing=(1.25, 1.25, 2.5))
    assert path == tmp_path / "ds" / "dataset.json"
    meta = json.loads(path.read_text())
    assert meta["numTraining"] == 2 and meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "spleen",
                              "3": "kidney_left", "4": "kidney_right"}
    assert [len(meta[k]) for k in ("training", "validation", "test")] == [2, 1, 1]
    assert meta["training"][0] == {"image": "imagesTr/case_000.nii.gz", "label": "labelsTr/case_000.nii.gz"}
    assert meta["test"][0]["image"] == "imagesTr/case_003.nii.gz"
    img = nib.load(str(tmp_path / "ds" / "imagesTr" / "case_000.nii.gz"))
    lab = nib.load(str(tmp_path / "ds" / "labelsTr" / "case_000.nii.gz"))
    assert img.header.get_zooms() == (1.25, 1.25, 2.5)
    assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
    ph = generate_phantom(case_seed(3, 0), (16, 16, 16), spacing=(1.25, 1.25, 2.5))
    assert np.array_equal(np.asanyarray(img.dataobj), ph.image)
    assert np.array_equal(np.asanyarray(lab.dataobj), ph.label)
    assert np.allclose(img.affine, ph.affine)
    assert not [p for p in (tmp_path / "ds").rglob(".*")]  # no temp files left


def test_default_spacing_in_header_matches_phantom(tmp_path):
    make_phantom_dataset(tmp_path, n=1, size=(16, 16, 16), seed=1, n_val=0, n_test=0)
    img = nib.load(str(tmp_path / "imagesTr" / "case_000.nii.gz"))
    ph = generate_phantom(case_seed(1, 0), (16, 16, 16))
    assert np.allclose(img.header.get_zooms(), ph.spacing, rtol=1e-6)


def test_dataset_reproducible_and_cases_differ(tmp_path):
    kw = dict(n=2, size=(16, 16, 16), seed=0, n_val=0, n_test=1)
    make_phantom_dataset(tmp_path / "a", **kw)
    make_phantom_dataset(tmp_path / "b", **kw)
    make_phantom_dataset(tmp_path / "a", **kw)  # rerun in place
    for sub in ("imagesTr/case_000.nii.gz", "labelsTr/case_002.nii.gz", "dataset.json"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes()
    a0 = (tmp_path / "a" / "imagesTr" / "case_000.nii.gz").read_bytes()
    a1 = (tmp_path / "a" / "imagesTr" / "case_001.nii.gz").read_bytes()
    assert a0 != a1
    assert len({case_seed(0, i) for i in range(50)} | {case_seed(1, i) for i in range(50)}) == 100


def test_phantom_kwargs_are_applied_and_recorded(tmp_path):
    path = make_phantom_dataset(tmp_path, n=1, size=(16, 16, 16), n_val=0, n_test=0,
                                phantom_kwargs={"noise_hu": 0.0, "texture_hu": 0.0, "blur_sigma": 0.0})
    meta = json.loads(path.read_text())
    assert meta["generator"]["phantom_kwargs"]["noise_hu"] == 0.0
    img = np.asanyarray(nib.load(str(tmp_path / "imagesTr" / "case_000.nii.gz")).dataobj)
    assert np.all(img[:2, :2, :] == -1000.0)  # no noise in the air


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=(15, 32, 32)), "size must be >= 16"),
        (dict(size=(32, 32)), "size must be 3 integers"),
        (dict(size=(32, 32, 16.5)), "size must be 3 integers"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(spacing=(1.0, 0.0, 1.0)), "spacing must be 3 positive"),
        (dict(noise_hu=-1.0), "noise_hu must be"),
        (dict(visceral_fat=0.9, gas=0.2), "visceral_fat \\+ gas"),
        (dict(shape_jitter=0.6), "shape_jitter must be in"),
    ],
)
def test_generate_bad_args(kwargs, match):
    args = dict(seed=0, size=(16, 16, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_phantom(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be an integer >= 1, got 0"),
        (dict(n_val=-1), "n_val must be an integer >= 0, got -1"),
        (dict(n_test=-2), "n_test must be an integer >= 0, got -2"),
        (dict(size=(16, 8, 16)), "size must be >= 16"),
        (dict(seed=-3), "seed must be a non-negative integer"),
        (dict(phantom_kwargs={"nois_hu": 1.0}), "unknown keys \\['nois_hu'\\]"),
        (dict(phantom_kwargs={"blur_sigma": -1.0}), "blur_sigma must be"),
    ],
)
def test_dataset_bad_args(tmp_path, kwargs, match):
    args = dict(n=1, size=(16, 16, 16), n_val=0, n_test=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_phantom_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()  # validated before writing anything
