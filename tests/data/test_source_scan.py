"""Scans as stored (volattack.data.source): read on their own grid in source units, written back
with the source's shape, affine, header and data type (NIfTI with scl_slope/inter, NRRD/MHA),
and every bad input."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volattack.data.io import read_volume
from volattack.data.source import SourceScan, read_geometry, read_scan, write_scan
from volattack.data.source_channels import channel_file_names, write_scan_channels

SPACING = (1.4, 1.4, 3.2)


def lps_oblique_affine(shape, spacing=SPACING, angle_deg: float = 7.0) -> np.ndarray:
    """A scanner-like affine: stored in LPS order (i toward the patient's left, j posterior),
    rotated by ``angle_deg`` about z, anisotropic spacing."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    aff[:3, 3] = [80.0, 95.0, -40.0]
    return aff


def write_ct(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.int16, slope=None, inter=None) -> Path:
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.fixture
def ct(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 1500, size=(10, 9, 7)).astype(np.int16)
    aff = lps_oblique_affine(hu.shape)
    return write_ct(tmp_path / "ct.nii.gz", hu, aff), hu, aff


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_nifti_int16_round_trip_keeps_shape_affine_dtype_and_header(ct, tmp_path):
    path, hu, aff = ct
    before = _digest(path)
    scan = read_scan(path)
    assert scan.array.shape == (1, 10, 9, 7) and scan.array.dtype == np.float32
    assert scan.dtype == np.int16 and scan.format == "nifti"
    np.testing.assert_array_equal(scan.array[0], hu)
    np.testing.assert_allclose(scan.affine, aff, atol=1e-5)
    np.testing.assert_allclose(scan.spacing, SPACING, atol=1e-5)
    assert scan.value_range() == (-32768.0, 32767.0) and scan.grid_step == 1.0

    adv = scan.array + np.float32(3.4)
    adv[0, 0, 0, 0] = 40000.0  # beyond int16: clipped
    arr_before = adv.copy()
    out = write_scan(scan, adv, tmp_path / "adv.nii.gz", description="modified")
    np.testing.assert_array_equal(adv, arr_before)  # inputs untouched
    assert _digest(path) == before
    img = nib.load(str(out))
    assert img.header.get_data_dtype() == np.int16 and img.shape == hu.shape
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"modified"
    back = read_scan(out)
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-6)
    expected = np.rint(hu.astype(np.float64) + 3.4)
    expected[0, 0, 0] = 32767
    np.testing.assert_array_equal(back.array[0], expected)


def test_scaled_nifti_keeps_slope_and_intercept(tmp_path):
    raw = np.random.default_rng(1).integers(0, 3000, size=(6, 5, 4)).astype(np.uint16)
    path = write_ct(tmp_path / "s.nii", raw, lps_oblique_affine(raw.shape), dtype=np.uint16, slope=1.0, inter=-1024.0)
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.array[0], raw.astype(np.float64) - 1024)  # HU
    assert scan.dtype == np.int32  # the scaled range of uint16 - 1024 needs int32
    assert scan.value_range() == (-1024.0, 65535.0 - 1024.0)
    out = write_scan(scan, scan.array - 2.0, tmp_path / "s_adv.nii")
    img = nib.load(str(out))
    assert img.header.get_data_dtype() == np.uint16
    assert (img.dataobj.slope, img.dataobj.inter) == (1.0, -1024.0)
    got = read_scan(out).array[0]
    np.testing.assert_array_equal(got, np.maximum(raw.astype(np.float64) - 2, 0) - 1024)  # raw 0 clips at 0


def test_fractional_slope_quantises_to_its_grid(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = write_ct(tmp_path / "f.nii.gz", raw, np.eye(4), slope=0.5, inter=10.0)
    scan = read_scan(path)
    assert scan.dtype == np.float32 and scan.grid_step == 0.5
    np.testing.assert_array_equal(scan.quantize(np.array([10.2, 10.3, 11.9])), [10.0, 10.5, 12.0])
    back = read_scan(write_scan(scan, scan.array + 0.3, tmp_path / "f_adv.nii.gz"))
    np.testing.assert_array_equal(back.array, scan.array + 0.5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_round_trip_and_same_geometry_as_nifti(ct, tmp_path, suffix):
    path, hu, aff = ct
    nifti = read_scan(path)
    out = write_scan(nifti, nifti.array, tmp_path / f"x{suffix}")
    scan = read_scan(out)
    assert scan.format == "sitk" and scan.dtype == np.int16
    np.testing.assert_array_equal(scan.array, nifti.array)
    np.testing.assert_allclose(scan.affine, nifti.affine, atol=1e-5)
    arr, affine, _ = read_volume(out)  # the io module's conventions
    np.testing.assert_array_equal(arr, hu)
    np.testing.assert_allclose(affine, aff, atol=1e-5)
    again = read_scan(write_scan(scan, scan.array + 1, tmp_path / f"y{suffix}"))
    np.testing.assert_array_equal(again.array, scan.array + 1)
    assert again.dtype == np.int16
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ct.nii.gz", f"x{suffix}", f"y{suffix}"])  # no temp


def test_header_geometry_matches_the_data(ct, tmp_path):
    path, hu, aff = ct
    shape, affine = read_geometry(path)
    assert shape == hu.shape
    np.testing.assert_allclose(affine, aff, atol=1e-5)
    nrrd = write_scan(read_scan(path), read_scan(path).array, tmp_path / "x.nrrd")
    shape2, affine2 = read_geometry(nrrd)
    assert shape2 == hu.shape
    np.testing.assert_allclose(affine2, aff, atol=1e-5)


def test_channels_from_a_4d_file_and_from_a_list(tmp_path):
    data = np.random.default_rng(2).normal(size=(5, 4, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "mc.nii.gz"))
    scan = read_scan(tmp_path / "mc.nii.gz")
    assert scan.array.shape == (2, 5, 4, 3) and scan.dtype == np.float32
    np.testing.assert_allclose(scan.array[1], data[..., 1])
    back = read_scan(write_scan(scan, scan.array * 2, tmp_path / "mc2.nii.gz"))
    np.testing.assert_allclose(back.array, scan.array * 2, rtol=1e-6)
    for c in range(2):
        nib.save(nib.Nifti1Image(data[..., c], np.eye(4)), str(tmp_path / f"c{c}.nii.gz"))
    listed = read_scan([tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz"])
    np.testing.assert_allclose(listed.array, scan.array)
    assert listed.path == tmp_path / "c0.nii.gz" and len(listed.paths) == 2
    with pytest.raises(ValueError, match="source_channels.write_scan_channels"):
        write_scan(listed, listed.array, tmp_path / "z.nii.gz")


def test_channel_files_are_written_back_one_file_each_with_their_own_type(tmp_path):
    # an int16 CT-like channel and a float32 channel: each keeps its own stored type and header
    g = np.random.default_rng(0)
    ct = g.integers(-1000, 1000, (5, 4, 3)).astype(np.int16)
    mr = g.random((5, 4, 3)).astype(np.float32) * 300
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    ct_img = nib.Nifti1Image(ct, aff)
    ct_img.header.set_data_dtype(np.int16)
    nib.save(ct_img, str(tmp_path / "case_0000.nii.gz"))
    nib.save(nib.Nifti1Image(mr, aff), str(tmp_path / "case_0001.nii.gz"))
    scan = read_scan([tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"])
    assert [p.dtype for p in scan.parts] == [np.dtype(np.int16), np.dtype(np.float32)]
    assert channel_file_names("adv", scan) == ["adv_0000.nii.gz", "adv_0001.nii.gz"]
    new = scan.array + np.float32(0.4)  # rounds away on the int16 channel, stays on the float one
    q = scan.quantize(new)
    np.testing.assert_array_equal(q[0], ct.astype(np.float32))
    np.testing.assert_allclose(q[1], mr + np.float32(0.4), rtol=1e-6)
    out = write_scan_channels(scan, new, [tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"])
    disk = [nib.load(str(p)) for p in out]
    assert disk[0].get_data_dtype() == np.int16 and disk[1].get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(disk[0].dataobj), ct)
    np.testing.assert_allclose(np.asarray(disk[1].dataobj), mr + np.float32(0.4), rtol=1e-6)
    for d in disk:
        np.testing.assert_allclose(d.affine, aff)
    back = read_scan(out)
    np.testing.assert_allclose(back.array, q, rtol=1e-6)
    with pytest.raises(ValueError, match=r"paths must name one file per channel \(2\), got 1"):
        write_scan_channels(scan, new, [tmp_path / "b.nii.gz"])
    with pytest.raises(ValueError, match="scan was read from one file"):
        write_scan_channels(scan.parts[0], new[:1], [tmp_path / "b.nii.gz"])
    with pytest.raises(ValueError, match="array must have the scan's shape"):
        write_scan_channels(scan, new[:1], [tmp_path / "b0.nii.gz", tmp_path / "b1.nii.gz"])
    assert not (tmp_path / "b0.nii.gz").exists()


def test_dicom_folder_needs_the_dicom_module(tmp_path, monkeypatch):
    folder = tmp_path / "series"
    folder.mkdir()
    monkeypatch.setitem(sys.modules, "volattack.data.dicom", None)  # as if not installed
    with pytest.raises(ValueError, match="volattack.data.dicom"):
        read_scan(folder)


def test_bad_inputs(ct, tmp_path):
    path, hu, aff = ct
    scan = read_scan(path)
    with pytest.raises(FileNotFoundError, match="Scan not found"):
        read_scan(tmp_path / "missing.nii.gz")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="Cannot read scan"):
        read_scan(broken)
    with pytest.raises(ValueError, match="at least one file"):
        read_scan([])
    other = write_ct(tmp_path / "other.nii.gz", hu[:, :, :6], aff)
    with pytest.raises(ValueError, match="(?s)share one grid.*other.nii.gz"):
        read_scan([path, other])
    with pytest.raises(ValueError, match=r"must have the scan's shape \(1, 10, 9, 7\)"):
        write_scan(scan, scan.array[:, :5], tmp_path / "a.nii.gz")
    bad = scan.array.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        write_scan(scan, bad, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="path must end with"):
        write_scan(scan, scan.array, tmp_path / "a.png")
    with pytest.raises(ValueError, match="for a nifti scan"):
        write_scan(scan, scan.array, tmp_path / "folder")
    with pytest.raises(ValueError, match=r"array must be \(C, I, J, K\)"):
        SourceScan(np.zeros((3, 3)), np.eye(4), (1, 1, 1), np.int16, path, "nifti")
    with pytest.raises(ValueError, match="format must be one of"):
        SourceScan(np.zeros((1, 2, 2, 2)), np.eye(4), (1, 1, 1), np.int16, path, "png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.nii.gz", "ct.nii.gz", "other.nii.gz"]


def _dicom_series(folder: Path, stored: np.ndarray) -> Path:
    """A CT series (stored int16, RescaleIntercept -1024), one file per slice, as scanners write it."""
    sitk = pytest.importorskip("SimpleITK")
    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(stored)  # (z, y, x)
    img.SetSpacing((0.8, 0.8, 2.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.8.1"
    for k in range(stored.shape[0]):
        sl = sitk.Cast(img[:, :, k], sitk.sitkFloat64) - 1024.0
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.8", "0020|000e": uid,
                "0008|0018": f"{uid}.{k + 1}", "0008|103e": "abdomen", "0020|0013": str(k + 1),
                "0028|1052": "-1024", "0028|1053": "1", "0028|0100": "16", "0028|0101": "16", "0028|0102": "15",
                "0028|0103": "1", "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": "\\".join(f"{v:.6f}" for v in pos)}
        for key, v in tags.items():
            sl.SetMetaData(key, v)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)
    return folder


def test_dicom_series_round_trip_through_read_and_write_scan(tmp_path):
    stored = np.random.default_rng(3).integers(0, 2000, size=(4, 5, 6)).astype(np.int16)
    folder = _dicom_series(tmp_path / "ct", stored)
    scan = read_scan(folder)
    assert scan.format == "dicom" and scan.array.shape == (1, 6, 5, 4) and scan.grid_step == 1.0
    np.testing.assert_array_equal(scan.array[0], np.transpose(stored, (2, 1, 0)) - 1024.0)
    assert scan.value_range() == (-32768.0 - 1024.0, 32767.0 - 1024.0)
    out = write_scan(scan, scan.array + 3.4, tmp_path / "adv")
    back = read_scan(out)
    np.testing.assert_array_equal(back.array, scan.array + 3.0)
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-5)
    with pytest.raises(ValueError, match="folder \\(no suffix\\) for a DICOM scan"):
        write_scan(scan, scan.array, tmp_path / "adv.nii.gz")
