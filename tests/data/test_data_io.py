"""Volume I/O: round trips keep values, affine and spacing; atomic writes; clear errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volattack.data import io as vio
from volattack.data.io import lps_to_ras, read_volume, write_nifti

# float32-exact affine (NIfTI stores the sform in float32)
AFFINE = np.array(
    [[1.5, 0.0, 0.0, -12.25], [0.0, 1.5, 0.0, 4.5], [0.0, 0.0, 3.0, -30.0], [0.0, 0.0, 0.0, 1.0]]
)


def _vol(shape=(6, 5, 4)) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 100.0, shape).astype(np.float32)


def test_roundtrip_keeps_values_affine_spacing(tmp_path):
    arr = _vol()
    p = write_nifti(arr, tmp_path / "sub" / "a.nii.gz", AFFINE)
    assert p == tmp_path / "sub" / "a.nii.gz" and p.exists()
    back, aff, spacing = read_volume(p)
    assert back.dtype == np.float32 and np.array_equal(back, arr)
    assert np.array_equal(aff, AFFINE)
    assert spacing == (1.5, 1.5, 3.0)
    hdr = nib.load(str(p)).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1


def test_uncompressed_and_torch_input(tmp_path):
    t = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    p = write_nifti(t, tmp_path / "t.nii", torch.from_numpy(AFFINE))
    back, aff, _ = read_volume(p)
    assert back.dtype == np.float32 and np.array_equal(back, t.numpy().astype(np.float32))
    assert np.array_equal(aff, AFFINE)


def test_label_dtypes_round_and_range(tmp_path):
    lab = np.array([[[0.0, 1.0], [2.0, 3.9999]]])
    back, _, _ = read_volume(write_nifti(lab, tmp_path / "l.nii.gz", AFFINE, dtype=np.uint8))
    assert back.dtype == np.uint8 and back.ravel().tolist() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match=r"do not fit dtype uint8"):
        write_nifti(np.full((2, 2, 2), 300.0), tmp_path / "bad.nii.gz", AFFINE, dtype=np.uint8)
    back16, _, _ = read_volume(write_nifti(np.full((2, 2, 2), -1000.0), tmp_path / "i.nii.gz", AFFINE, dtype=np.int16))
    assert back16.dtype == np.int16 and np.all(back16 == -1000)


def test_gzip_output_is_deterministic(tmp_path):
    arr = _vol()
    a = write_nifti(arr, tmp_path / "a.nii.gz", AFFINE).read_bytes()
    b = write_nifti(arr, tmp_path / "b.nii.gz", AFFINE).read_bytes()
    assert a == b


def test_atomic_write_leaves_no_temp_file(tmp_path):
    write_nifti(_vol(), tmp_path / "a.nii.gz", AFFINE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.nii.gz"
    write_nifti(np.zeros((2, 2, 2)), target, AFFINE)
    before = target.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(vio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(np.ones((2, 2, 2)), target, AFFINE)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_nrrd_and_mha_read_like_nifti(tmp_path):
    arr = _vol((7, 6, 5))
    nii = write_nifti(arr, tmp_path / "a.nii.gz", AFFINE)
    img = sitk.ReadImage(str(nii))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(img, str(tmp_path / f"a{suffix}"))
        back, aff, spacing = read_volume(tmp_path / f"a{suffix}")
        assert back.shape == (7, 6, 5) and np.array_equal(back, arr)
        assert np.allclose(aff, AFFINE) and np.allclose(spacing, (1.5, 1.5, 3.0))


def test_sitk_lps_geometry_converted_to_ras(tmp_path):
    """Hand-built ITK image: origin/direction in LPS; x axis pointing to LPS -x (= RAS +x)."""
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32))  # (z, y, x)
    img.SetSpacing((2.0, 1.0, 3.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "b.mha"))
    arr, aff, spacing = read_volume(tmp_path / "b.mha")
    assert arr.shape == (4, 3, 2)
    expected = np.array([[2.0, 0, 0, -10.0], [0, -1.0, 0, -20.0], [0, 0, 3.0, 30.0], [0, 0, 0, 1.0]])
    assert np.allclose(aff, expected) and spacing == (2.0, 1.0, 3.0)
    assert np.allclose(lps_to_ras(lps_to_ras(aff)), aff)


def test_truncated_file_raises_value_error_naming_path(tmp_path):
    p = write_nifti(_vol((20, 20, 20)), tmp_path / "full.nii.gz", AFFINE)
    data = p.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Cannot read volume '.*cut\.nii\.gz'"):
        read_volume(cut)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Cannot read volume '.*junk\.nrrd'"):
        read_volume(junk)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: '.*nope\.nii\.gz'"):
        read_volume(tmp_path / "nope.nii.gz")
    with pytest.raises(ValueError, match="got the directory"):
        read_volume(tmp_path)


@pytest.mark.parametrize(
    "array, affine, name, match",
    [
        (np.zeros((2, 2)), AFFINE, "a.nii.gz", r"array must have shape \(H, W, D\), got shape \(2, 2\)"),
        (np.zeros((2, 2, 2)), np.eye(3), "a.nii.gz", r"affine must have shape \(4, 4\), got shape \(3, 3\)"),
        (np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]), "a.nii.gz", "affine must be finite and invertible"),
        (np.zeros((2, 2, 2)), AFFINE, "a.nrrd", r"path must end with \.nii or \.nii\.gz, got '.*a\.nrrd'"),
    ],
)
def test_write_bad_input(tmp_path, array, affine, name, match):
    with pytest.raises(ValueError, match=match):
        write_nifti(array, tmp_path / name, affine)
    assert not any(Path(tmp_path).iterdir())
