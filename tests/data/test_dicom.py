"""DICOM series in and out (volattack.data.dicom): a synthetic CT series written with SimpleITK
(int16 stored, RescaleSlope 1, RescaleIntercept -1024, an oblique orientation, anisotropic
spacing), read back, written back adversarially, and each bad series."""

from __future__ import annotations

import locale
import shutil
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from volattack.data.dicom import DicomHeader, list_series, quantise, read_dicom_series, write_dicom_series  # noqa: E402

SERIES_UID = "1.2.826.0.1.3680043.2.1125.7.1"
SPACING = (0.7, 0.9, 2.5)  # mm along x (columns), y (rows), z (slices)
ANGLE = 0.3  # rad about the patient's z axis


def _direction() -> np.ndarray:
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # columns: row dir, column dir, normal


def _stored(shape=(6, 5, 4)) -> np.ndarray:
    """Stored int16 values, array (z, y, x) = (slices, rows, columns)."""
    rng = np.random.default_rng(0)
    return rng.integers(-200, 2500, size=shape).astype(np.int16)


def _image(stored: np.ndarray) -> "sitk.Image":
    img = sitk.GetImageFromArray(stored)
    img.SetSpacing(SPACING)
    img.SetDirection(tuple(_direction().ravel()))
    img.SetOrigin((12.5, -30.0, 41.0))
    return img


def _write_series(folder: Path, stored: np.ndarray, *, uid: str = SERIES_UID, desc: str = "abdomen",
                  positions: dict[int, tuple] | None = None, iop: dict[int, str] | None = None,
                  skip: tuple[int, ...] = ()) -> Path:
    """A CT series, one file per slice, written as scanners do (stored values + rescale tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = _image(stored)
    d = _direction()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(stored.shape[0]):
        if k in skip:
            continue
        sl = img[:, :, k]
        pos = (positions or {}).get(k, img.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0010|0010": "Phantom^Test",
            "0010|0020": "PID-7", "0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": uid,
            "0008|0018": f"{uid}.{k + 1}", "0008|103e": desc, "0020|0013": str(k + 1), "0018|0050": "2.5",
            "0028|1052": "-1024", "0028|1053": "1", "0028|0100": "16", "0028|0101": "16", "0028|0102": "15",
            "0028|0103": "1", "0009|0010": "VOLATTACK_TEST",
            "0020|0037": (iop or {}).get(k, "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
        }
        # written as real values (HU): GDCM undoes the rescale into int16 stored values
        real = sitk.Cast(sl, sitk.sitkFloat64) - 1024.0
        for key, v in tags.items():
            real.SetMetaData(key, v)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(real)
    return folder


def _tags(path: Path) -> dict[str, str]:
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.LoadPrivateTagsOn()
    r.ReadImageInformation()
    return {k: r.GetMetaData(k) for k in r.GetMetaDataKeys()}


def _expected_affine() -> np.ndarray:
    img = _image(_stored())
    a = np.eye(4)
    a[:3, :3] = _direction() @ np.diag(SPACING)
    a[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a  # LPS -> RAS


def test_read_series_geometry_and_values(tmp_path):
    stored = _stored()
    folder = _write_series(tmp_path / "ct", stored)
    scan = read_dicom_series(folder)
    expected = np.transpose(stored.astype(np.float32) - 1024.0, (2, 1, 0))[None]  # (1, I, J, K) in HU
    assert scan.array.dtype == np.float32 and scan.array.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(scan.array, expected)
    np.testing.assert_allclose(scan.affine, _expected_affine(), atol=1e-5)
    np.testing.assert_allclose(scan.spacing, SPACING, rtol=1e-6)
    assert scan.format == "dicom" and scan.path == folder
    # int16 stored (16 bits) shifted by -1024 needs int32; 12 bits stored would fit int16
    assert isinstance(scan.header, DicomHeader) and scan.dtype == np.int32
    assert scan.header.stored_range == (-32768, 32767) and (scan.header.slope, scan.header.intercept) == (1.0, -1024.0)
    assert [f.name for f in scan.header.files] == [f"IM{k:04d}.dcm" for k in range(6)]
    assert list_series(folder) == [(SERIES_UID, "abdomen", 6)]


def test_slices_are_sorted_by_position_not_by_name(tmp_path):
    stored = _stored()
    folder = _write_series(tmp_path / "ct", stored)
    for k, f in enumerate(sorted(folder.iterdir())):  # names now in reverse position order
        f.rename(folder / f"X{5 - k}.dcm")
    scan = read_dicom_series(folder)
    np.testing.assert_array_equal(scan.array[0], np.transpose(stored - 1024.0, (2, 1, 0)))
    assert [f.name for f in scan.header.files] == [f"X{5 - k}.dcm" for k in range(6)]


def test_write_adversarial_series_and_read_it_back(tmp_path):
    stored = _stored()
    src = _write_series(tmp_path / "ct", stored)
    scan = read_dicom_series(src)
    rng = np.random.default_rng(1)
    adv = scan.array + rng.uniform(-8.0, 8.0, size=scan.array.shape).astype(np.float32)
    adv[0, 0, 0, 0] = 1e6  # clipped to the stored type: int16 max 32767 -> 31743 HU
    adv[0, 1, 0, 0] = -3.5  # rounds half to even, as SourceScan.quantize does: -3.5 -> -4
    out = write_dicom_series(scan, adv, tmp_path / "adv")
    assert out == tmp_path / "adv" and sorted(p.name for p in out.iterdir()) == [f"IM{k:04d}.dcm" for k in range(6)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    back = read_dicom_series(out)
    expected = np.rint(adv.astype(np.float64))
    expected = np.clip(expected, -32768 - 1024, 32767 - 1024)
    np.testing.assert_array_equal(back.array, expected.astype(np.float32))
    assert back.array[0, 0, 0, 0] == 31743.0 and back.array[0, 1, 0, 0] == -4.0
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-6)
    assert back.spacing == pytest.approx(scan.spacing) and back.dtype == scan.dtype
    assert back.header.bits == scan.header.bits
    uids = set()
    for a, b in zip(scan.header.files, back.header.files):
        ta, tb = _tags(a), _tags(b)
        changed = {k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k)}
        assert changed == {"0020|000e", "0008|0018", "0008|103e"}, changed
        assert tb["0008|103e"].strip() == "volattack adversarial: abdomen"
        assert tb["0020|000e"] == back.header.series_uid != scan.header.series_uid
        assert tb["0020|000e"].startswith("2.25.") and tb["0008|0018"].startswith("2.25.")
        uids.add(tb["0008|0018"])
    assert len(uids) == 6
    meta = (out / "IM0000.dcm").read_bytes()  # MediaStorageSOPInstanceUID (0002,0003) = the new SOP UID
    assert back.header.tags[0]["0008|0018"].strip("\x00 ").encode() in meta[:400]
    # deterministic: the same array gives the same UIDs; the folder is replaced atomically
    write_dicom_series(scan, adv, tmp_path / "adv")
    assert _tags(out / "IM0000.dcm")["0008|0018"] == back.header.tags[0]["0008|0018"]


def test_quantise_is_the_inverse_rescale():
    header = DicomHeader(series_uid="1", description="", files=(), tags=(), slope=0.5, intercept=10.0,
                         bits=(16, 12, 11, 0), pixel_spacing=(1.0, 1.0))
    assert header.stored_range == (0, 4095) and header.value_dtype == np.float32
    np.testing.assert_array_equal(quantise(header, np.array([10.0, 10.26, 10.25, 9.0, 1e9])), [0, 1, 0, 0, 4095])


def test_write_bad_inputs(tmp_path):
    src = _write_series(tmp_path / "ct", _stored())
    scan = read_dicom_series(src)
    with pytest.raises(ValueError, match=r"array must have the scan's shape \(1, 4, 5, 6\)"):
        write_dicom_series(scan, np.zeros((4, 5, 5)), tmp_path / "adv")
    with pytest.raises(ValueError, match="array must be finite numbers"):
        write_dicom_series(scan, np.full(scan.array.shape, np.nan), tmp_path / "adv")
    with pytest.raises(ValueError, match="folder must differ from the source series folder"):
        write_dicom_series(scan, scan.array, src)
    with pytest.raises(ValueError, match="description must be a non-empty string"):
        write_dicom_series(scan, scan.array, tmp_path / "adv", description=" ")
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"scan must be a DICOM SourceScan .*format 'nifti'"):
        write_dicom_series(replace(scan, header=None, format="nifti"), scan.array, tmp_path / "adv")
    assert not (tmp_path / "adv").exists()


# --------------------------------------------------------------------------- bad series


def test_missing_slice_is_named(tmp_path):
    folder = _write_series(tmp_path / "ct", _stored(), skip=(3,))
    with pytest.raises(ValueError, match=rf"DICOM series '{SERIES_UID}' in .* has missing slice\(s\) \(1 missing\): "
                                         r"IM0002.dcm and IM0004.dcm are 5 mm apart, the other slices 2.5 mm"):
        read_dicom_series(folder)


def test_uneven_spacing_is_named(tmp_path):
    img = _image(_stored())
    p = np.array(img.TransformIndexToPhysicalPoint((0, 0, 4))) + 0.8 * _direction()[:, 2]
    folder = _write_series(tmp_path / "ct", _stored(), positions={4: tuple(p)})
    with pytest.raises(ValueError, match=rf"'{SERIES_UID}' .* has unevenly spaced slices: IM0003.dcm and IM0004.dcm "
                                         r"are 3.3 mm apart"):
        read_dicom_series(folder)


def test_two_series_in_one_folder_are_listed(tmp_path):
    folder = _write_series(tmp_path / "ct", _stored())
    other = _write_series(tmp_path / "other", _stored(), uid="1.2.826.0.1.3680043.2.1125.7.2", desc="venous")
    for f in other.iterdir():
        shutil.move(str(f), str(folder / f"B{f.name}"))
    with pytest.raises(ValueError, match=r"holds 2 DICOM series; keep one per folder or pass series_uid .*: "
                                         r"(?=.*1125\.7\.1 \(abdomen, 6 files\))(?=.*1125\.7\.2 \(venous, 6 files\))"):
        read_dicom_series(folder)
    scan = read_dicom_series(folder, series_uid="1.2.826.0.1.3680043.2.1125.7.2")
    assert scan.header.description == "venous"
    with pytest.raises(ValueError, match=r"series_uid '9.9' is not in .*; its series: "):
        read_dicom_series(folder, series_uid="9.9")


def test_mixed_orientation_is_an_error(tmp_path):
    folder = _write_series(tmp_path / "ct", _stored(), iop={2: "1\\0\\0\\0\\1\\0"})
    with pytest.raises(ValueError, match=rf"'{SERIES_UID}' .* has mixed orientations \(ImageOrientationPatient "
                                         r"0020\|0037\): .* x5; .* x1"):
        read_dicom_series(folder)


def test_not_a_series(tmp_path):
    with pytest.raises(FileNotFoundError, match="DICOM folder not found"):
        read_dicom_series(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"No DICOM series found in '.*empty'"):
        read_dicom_series(tmp_path / "empty")
    folder = _write_series(tmp_path / "one", _stored(), skip=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"must have >= 2 single-frame slices, got 1 file"):
        read_dicom_series(folder)


def test_private_tag_of_unknown_vr_is_dropped_with_a_warning(tmp_path, caplog):
    from dataclasses import replace

    scan = read_dicom_series(_write_series(tmp_path / "ct", _stored()))
    assert scan.header.tags[0]["0009|0010"].strip() == "VOLATTACK_TEST"  # private creator: kept
    tags = tuple({**t, "0009|1001": "opaque"} for t in scan.header.tags)
    scan = replace(scan, header=replace(scan.header, tags=tags))
    with caplog.at_level("WARNING", logger="volattack.data.dicom"):
        out = write_dicom_series(scan, scan.array, tmp_path / "adv")
    assert "dropping private tags SimpleITK cannot write (unknown VR): ['0009|1001']" in caplog.text
    back = _tags(out / "IM0003.dcm")
    assert "0009|1001" not in back and back["0009|0010"].strip() == "VOLATTACK_TEST"
    assert not (out / ".probe.dcm").exists()


def test_reading_and_writing_keep_the_process_locale(tmp_path):
    """GDCM sets LC_ALL to "C" and leaves it: after a read, Path.read_text() would decode as ASCII."""
    folder = _write_series(tmp_path / "ct", _stored())
    try:
        locale.setlocale(locale.LC_ALL, "C.UTF-8")
    except locale.Error:
        pytest.skip("the C.UTF-8 locale is not available here")
    scan = read_dicom_series(folder)
    assert locale.setlocale(locale.LC_CTYPE) == "C.UTF-8"
    write_dicom_series(scan, scan.array, tmp_path / "adv")
    list_series(tmp_path / "adv")
    assert locale.setlocale(locale.LC_CTYPE) == "C.UTF-8"
    assert locale.getpreferredencoding(False).lower().replace("-", "") == "utf8"
