"""DICOM series in and out: a CT or MR series folder as a scan, and an adversarial scan written
back as a DICOM series.

Reading (:func:`read_dicom_series`) uses SimpleITK's GDCM series reader. The slices of the one
series in the folder are sorted by their position along the slice normal (the cross product of
the ImageOrientationPatient row and column directions), their rescale slope and intercept are
applied (HU for CT), and the geometry is checked before any pixel is read: one orientation, one
slice size and pixel spacing, positions along the normal (no gantry tilt), no duplicate, missing
or unevenly spaced slice. The array is returned in ITK index order ``(i, j, k)`` (SimpleITK's
``(z, y, x)`` transposed) with a voxel-to-RAS affine, the conventions of :mod:`volattack.data.io`.

Writing (:func:`write_dicom_series`) keeps every tag SimpleITK exposes (public and private data
elements, read as strings, binary values base64-encoded) of each original slice, except a new
SeriesInstanceUID, new SOPInstanceUIDs (GDCM writes the MediaStorageSOPInstanceUID of the file
meta information from them) and a SeriesDescription saying the series was modified by volattack.
Pixel data are quantised to the stored type of the original: the rescale is undone
(``stored = (value - intercept) / slope``), rounded to the nearest integer (half to even, as
:meth:`volattack.data.source.SourceScan.quantize` rounds) and clipped to the range of BitsStored and
PixelRepresentation. New UIDs are ``2.25.`` UUID-derived UIDs
(DICOM PS3.5 B.2) computed from a SHA-256 of the original SeriesInstanceUID, the description and
the quantised pixels, so a rewrite of the same array gives the same UIDs (nothing random). The
series is written into a temporary folder beside the target and renamed into place.

Limitation: SimpleITK's metadata dictionary does not carry sequence (SQ) elements, so nested
sequences of the original files (e.g. a ReferencedImageSequence) are not written back.

This module imports SimpleITK lazily (no torch/MONAI).
"""

from __future__ import annotations

import functools
import hashlib
import locale
import logging
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from volattack.data.io import sitk_image_to_ras

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Tags the writer replaces (everything else is copied from the original slice).
SERIES_UID, SOP_UID, DESCRIPTION = "0020|000e", "0008|0018", "0008|103e"
IOP, IPP, PIXEL_SPACING = "0020|0037", "0020|0032", "0028|0030"
BITS_TAGS = ("0028|0100", "0028|0101", "0028|0102", "0028|0103")  # allocated, stored, high bit, representation

#: Orientation cosines closer than this are the same orientation; relative spacing tolerance.
ORIENTATION_TOL = 1e-4
SPACING_RTOL = 1e-2


def _keep_locale(fn: Any) -> Any:
    """Restore the process locale after ``fn``: GDCM's DICOM readers and writers set ``LC_ALL``
    to ``"C"`` and leave it there, which turns Python's preferred text encoding into ASCII for the
    rest of the process."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        saved = {cat: locale.setlocale(cat) for cat in (locale.LC_CTYPE, locale.LC_NUMERIC, locale.LC_COLLATE)}
        try:
            return fn(*args, **kwargs)
        finally:
            for cat, value in saved.items():
                if locale.setlocale(cat) != value:
                    locale.setlocale(cat, value)

    return wrapper


@dataclass(frozen=True)
class DicomHeader:
    """What :func:`write_dicom_series` needs to write a series like the one read.

    Attributes:
        series_uid: the original SeriesInstanceUID.
        description: the original SeriesDescription (``""`` when absent).
        files: the slice files, sorted along the slice normal (index ``k`` of the array).
        tags: per slice, the tags as SimpleITK reads them (``"gggg|eeee" -> str``).
        slope, intercept: the rescale (RescaleSlope, RescaleIntercept; 1 and 0 when absent).
        bits: ``(BitsAllocated, BitsStored, HighBit, PixelRepresentation)`` of the stored pixels.
        pixel_spacing: in-plane spacing ``(along i, along j)`` in mm.
    """

    series_uid: str
    description: str
    files: tuple[Path, ...]
    tags: tuple[dict[str, str], ...]
    slope: float
    intercept: float
    bits: tuple[int, int, int, int]
    pixel_spacing: tuple[float, float]

    @property
    def stored_range(self) -> tuple[int, int]:
        """``(lo, hi)`` of the stored integers (BitsStored, signed when PixelRepresentation is 1)."""
        stored, signed = self.bits[1], self.bits[3] == 1
        return (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)

    @property
    def value_dtype(self) -> np.dtype:
        """The narrowest dtype holding every rescaled stored value: a signed/unsigned integer
        type for integral slope and intercept, float32 otherwise."""
        if self.slope != int(self.slope) or self.intercept != int(self.intercept):
            return np.dtype(np.float32)
        ends = [v * self.slope + self.intercept for v in self.stored_range]
        lo, hi = min(ends), max(ends)
        for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                return np.dtype(t)
        return np.dtype(np.float64)


# --------------------------------------------------------------------------- reading


def _floats(tags: dict[str, str], key: str, n: int, what: str) -> np.ndarray:
    raw = tags.get(key, "").strip()
    try:
        vals = np.array([float(v) for v in raw.split("\\")], dtype=np.float64)
    except ValueError:
        vals = np.zeros(0)
    if vals.size != n or not np.all(np.isfinite(vals)):
        raise ValueError(f"{what} ({key}) must be {n} numbers, got {raw!r}.")
    return vals


def _read_tags(path: str) -> dict[str, str]:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(path)
    r.LoadPrivateTagsOn()
    r.ReadImageInformation()
    return {k: r.GetMetaData(k) for k in r.GetMetaDataKeys()}


@_keep_locale
def list_series(folder: PathLike) -> list[tuple[str, str, int]]:
    """The DICOM series in ``folder`` (not recursive): ``(SeriesInstanceUID, SeriesDescription,
    number of files)`` each.

    Raises:
        FileNotFoundError: ``folder`` does not exist. ValueError: it is not a folder.
    """
    import SimpleITK as sitk

    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"DICOM folder not found: {str(path)!r}.")
    if not path.is_dir():
        raise ValueError(f"folder must be a DICOM series folder, got the file {str(path)!r}.")
    out = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)
        desc = _read_tags(files[0]).get(DESCRIPTION, "").strip() if files else ""
        out.append((uid, desc, len(files)))
    return out


def _choose_series(folder: Path, series_uid: Optional[str]) -> str:
    series = list_series(folder)
    listing = "; ".join(f"{uid} ({desc or 'no description'}, {n} files)" for uid, desc, n in series)
    if not series:
        raise ValueError(f"No DICOM series found in {str(folder)!r}.")
    if series_uid is not None:
        if series_uid not in [s[0] for s in series]:
            raise ValueError(f"series_uid {series_uid!r} is not in {str(folder)!r}; its series: {listing}.")
        return series_uid
    if len(series) > 1:
        raise ValueError(f"{str(folder)!r} holds {len(series)} DICOM series; keep one per folder or pass "
                         f"series_uid (SeriesInstanceUID): {listing}.")
    return series[0][0]


def _check_same(name: str, key: str, values: list[str], label: str) -> None:
    counts = Counter(values)
    if len(counts) > 1:
        found = ", ".join(f"{v.strip()!r} x{n}" for v, n in counts.most_common())
        raise ValueError(f"DICOM series {label} has slices with different {name} ({key}): {found}.")


def _sort_slices(label: str, files: Sequence[str], tags: list[dict[str, str]]) -> tuple[list[int], float]:
    """Order of the slices along the normal and their spacing, after the geometry checks.

    Raises:
        ValueError: mixed orientations, sizes or pixel spacings; positions off the normal
            (gantry tilt); duplicate, missing or unevenly spaced slices; the message names the
            series (``label``) and the slices.
    """
    iops = [_floats(t, IOP, 6, f"ImageOrientationPatient of {f!r}") for f, t in zip(files, tags)]
    ref = iops[0]
    if any(np.max(np.abs(o - ref)) > ORIENTATION_TOL for o in iops):
        found = Counter(tuple(np.round(o, 4)) for o in iops)
        listing = "; ".join(f"{list(o)} x{n}" for o, n in found.most_common())
        raise ValueError(f"DICOM series {label} has mixed orientations (ImageOrientationPatient {IOP}): {listing}.")
    for name, key in (("sizes", "0028|0010"), ("sizes", "0028|0011"), ("pixel spacings", PIXEL_SPACING)):
        _check_same(name, key, [t.get(key, "").strip() for t in tags], label)
    normal = np.cross(ref[:3], ref[3:])
    pos = np.stack([_floats(t, IPP, 3, f"ImagePositionPatient of {f!r}") for f, t in zip(files, tags)])
    order = [int(i) for i in np.argsort(pos @ normal, kind="stable")]
    pos, names = pos[order], [Path(files[i]).name for i in order]
    steps = np.diff(pos, axis=0)
    along = steps @ normal
    spacing = float(np.median(along))
    tol = max(SPACING_RTOL * spacing, 1e-3)
    if spacing <= tol or np.any(along <= tol):
        i = int(np.argmin(along))
        raise ValueError(f"DICOM series {label} has duplicate slice positions: {names[i]} and {names[i + 1]} "
                         f"are {along[i]:.4g} mm apart along the slice normal.")
    off = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    if np.any(off > tol):
        i = int(np.argmax(off))
        raise ValueError(f"DICOM series {label} has slice positions off the slice normal (gantry tilt?): "
                         f"{names[i + 1]} is {off[i]:.4g} mm off the normal through {names[i]}.")
    bad = np.flatnonzero(np.abs(along - spacing) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = along[i] / spacing
        kind = (f"missing slice(s) ({round(ratio) - 1} missing)" if abs(ratio - round(ratio)) * spacing <= tol
                and round(ratio) >= 2 else "unevenly spaced slices")
        raise ValueError(f"DICOM series {label} has {kind}: {names[i]} and {names[i + 1]} are {along[i]:.4g} mm "
                         f"apart, the other slices {spacing:.4g} mm.")
    return order, spacing


def _header(uid: str, files: list[str], tags: list[dict[str, str]]) -> DicomHeader:
    label = f"{uid!r} in {str(Path(files[0]).parent)!r}"

    def num(key: str, default: float) -> float:
        raw = tags[0].get(key, "").strip()
        try:
            return float(raw) if raw else default
        except ValueError as e:
            raise ValueError(f"DICOM series {label}: tag {key} must be a number, got {raw!r}.") from e

    slope, intercept = num("0028|1053", 1.0), num("0028|1052", 0.0)
    if not slope > 0:
        raise ValueError(f"DICOM series {label}: RescaleSlope (0028|1053) must be > 0, got {slope}.")
    _check_same("rescale slopes", "0028|1053", [t.get("0028|1053", "").strip() for t in tags], label)
    _check_same("rescale intercepts", "0028|1052", [t.get("0028|1052", "").strip() for t in tags], label)
    bits = tuple(int(num(k, d)) for k, d in zip(BITS_TAGS, (16, 16, 15, 0)))
    ps = _floats(tags[0], PIXEL_SPACING, 2, f"PixelSpacing of {files[0]!r}")
    return DicomHeader(series_uid=uid, description=tags[0].get(DESCRIPTION, "").strip(),
                       files=tuple(Path(f) for f in files), tags=tuple(tags), slope=slope, intercept=intercept,
                       bits=bits, pixel_spacing=(float(ps[1]), float(ps[0])))  # type: ignore[arg-type]


@_keep_locale
def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None) -> Any:
    """Read the CT or MR DICOM series in ``folder`` as a :class:`~volattack.data.source.SourceScan`.

    Args:
        folder: a folder holding one DICOM series (single-frame files, any names; other files
            are ignored).
        series_uid: the SeriesInstanceUID to read when the folder holds several series.

    Returns:
        ``SourceScan(array, affine, spacing, dtype, path=folder, format="dicom", header=DicomHeader)``:
        array ``(1, I, J, K)`` float32 in rescaled units (HU for CT), affine voxel -> RAS mm,
        spacing in mm along ``i, j, k``, dtype the narrowest type of the rescaled stored values
        (:attr:`DicomHeader.value_dtype`).

    Shape:
        array ``(1, I, J, K)``: ``I`` columns, ``J`` rows, ``K`` slices.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: not a folder; no series, several series (each listed with its UID and
            description) or an unknown ``series_uid``; fewer than 2 slices or multi-frame files;
            mixed orientations, sizes, pixel spacings or rescales; duplicate, missing, unevenly
            spaced or tilted slices (the message names the series and the files); unreadable files.
    """
    import SimpleITK as sitk

    from volattack.data.source import SourceScan

    path = Path(folder).expanduser()
    uid = _choose_series(path, series_uid)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid))
    label = f"{uid!r} in {str(path)!r}"
    try:
        tags = [_read_tags(f) for f in files]
    except RuntimeError as e:
        raise ValueError(f"Cannot read DICOM series {label}: {e}") from e
    frames = [int(t.get("0028|0008", "1").strip() or 1) for t in tags]
    if len(files) < 2 or max(frames) > 1:
        raise ValueError(f"DICOM series {label} must have >= 2 single-frame slices, got {len(files)} file(s) "
                         f"with {sum(frames)} frame(s).")
    order, spacing = _sort_slices(label, files, tags)
    header = _header(uid, [files[i] for i in order], [tags[i] for i in order])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in header.files])
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ValueError(f"Cannot read DICOM series {label}: {e}") from e
    if abs(image.GetSpacing()[2] - spacing) > SPACING_RTOL * spacing:  # pragma: no cover - ITK disagrees
        raise ValueError(f"DICOM series {label}: slice spacing {spacing} mm, SimpleITK found {image.GetSpacing()[2]}.")
    arr, affine, spacing3 = sitk_image_to_ras(image)
    logger.info("read DICOM series %s: %s slices of %s, spacing %s", label, arr.shape[2], arr.shape[:2], spacing3)
    return SourceScan(array=arr.astype(np.float32)[None], affine=affine, spacing=tuple(spacing3),
                      dtype=header.value_dtype, path=path, format="dicom", header=header)


# --------------------------------------------------------------------------- writing


def new_uid(*parts: Any) -> str:
    """A ``2.25.`` UID (UUID-derived, DICOM PS3.5 B.2) from a SHA-256 of ``parts`` (deterministic).

    Returns:
        A UID of at most 44 characters.
    """
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()[:16]
    return f"2.25.{uuid.UUID(bytes=h).int}"


def quantise(header: DicomHeader, values: np.ndarray) -> np.ndarray:
    """Stored integers of rescaled ``values``: ``(v - intercept) / slope`` rounded (half to even,
    ``np.rint``) and clipped to :attr:`DicomHeader.stored_range`.

    Shape:
        any -> the same, int64.
    """
    lo, hi = header.stored_range
    stored = np.rint((np.asarray(values, dtype=np.float64) - header.intercept) / header.slope)
    return np.clip(stored, lo, hi).astype(np.int64)


def _check_array(scan: Any, array: Any) -> tuple[DicomHeader, np.ndarray]:
    header = getattr(scan, "header", None)
    if not isinstance(header, DicomHeader):
        raise ValueError(f"scan must be a DICOM SourceScan (read by read_dicom_series), got header "
                         f"{type(header).__name__} of format {getattr(scan, 'format', None)!r}.")
    arr = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    src = tuple(scan.array.shape)
    if arr.shape != src and (1,) + arr.shape != src:
        raise ValueError(f"array must have the scan's shape {src} (or {src[1:]}), got {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError(f"array must be finite numbers, got dtype {arr.dtype}"
                         + ("" if not np.issubdtype(arr.dtype, np.number) else " with non-finite values") + ".")
    return header, arr.reshape(src[1:])


def _slice_tags(header: DicomHeader, k: int, series_uid: str, sop_uid: str, description: str) -> dict[str, str]:
    tags = {key: v for key, v in header.tags[k].items() if len(key) == 9 and key[4] == "|"}
    defaults = dict(zip(BITS_TAGS, (str(b) for b in header.bits)))
    for key, v in defaults.items():
        tags.setdefault(key, v)
    tags.update({SERIES_UID: series_uid, SOP_UID: sop_uid, DESCRIPTION: description,
                 "0028|1053": tags.get("0028|1053", "1"), "0028|1052": tags.get("0028|1052", "0")})
    return tags


def _unwritable(tmp: Path, tags: dict[str, str]) -> set[str]:
    """Private tags GDCM cannot encode from a string (a private element of unknown VR)."""
    import SimpleITK as sitk

    bad = set()
    probe = tmp / ".probe.dcm"
    for key in [k for k in tags if int(k[:4], 16) % 2 == 1]:
        img = sitk.Image(1, 1, sitk.sitkInt16)
        img.SetMetaData(key, tags[key])
        try:
            sitk.WriteImage(img, str(probe))
        except RuntimeError:
            bad.add(key)
    probe.unlink(missing_ok=True)
    return bad


def _write_into(tmp: Path, header: DicomHeader, stored: np.ndarray, description: str) -> None:
    """Write every slice into ``tmp``; private tags GDCM cannot encode are dropped with a warning."""
    import SimpleITK as sitk

    series_uid = new_uid(header.series_uid, description, hashlib.sha256(stored.tobytes()).hexdigest())
    values = stored.astype(np.float64) * header.slope + header.intercept  # exact: GDCM inverts and rounds
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    drop: set[str] = set()
    for k, src in enumerate(header.files):
        sl = sitk.GetImageFromArray(np.ascontiguousarray(values[:, :, k].T))  # (I, J) -> (rows, columns)
        sl.SetSpacing(header.pixel_spacing)
        tags = _slice_tags(header, k, series_uid, new_uid(series_uid, k), description)
        writer.SetFileName(str(tmp / src.name))
        for attempt in range(2):
            for key, v in tags.items():
                if key not in drop:
                    sl.SetMetaData(key, v)
            try:
                writer.Execute(sl)
                break
            except RuntimeError as e:
                bad = _unwritable(tmp, tags) - drop if attempt == 0 else set()
                if not bad:
                    raise ValueError(f"Cannot write DICOM slice {str(tmp / src.name)!r} like {str(src)!r}: {e}") from e
                logger.warning("dropping private tags SimpleITK cannot write (unknown VR): %s", sorted(bad))
                drop |= bad
                for key in bad:
                    sl.EraseMetaData(key)


@_keep_locale
def write_dicom_series(scan: Any, array: Any, folder: PathLike, description: str = "volattack adversarial") -> Path:
    """Write ``array`` as a DICOM series like ``scan`` (read by :func:`read_dicom_series`).

    Every original tag is kept but the SeriesInstanceUID, the SOPInstanceUIDs (and so the
    MediaStorageSOPInstanceUID) and the SeriesDescription (``"<description>: <original>"``,
    at most 64 characters); pixel data are quantised to the original stored type (:func:`quantise`).
    The files keep the original names. Written into a temporary folder beside ``folder`` and
    renamed into place (an existing ``folder`` is replaced only once the new series is complete).

    Args:
        scan: the source scan (``format == "dicom"``, its ``header`` a :class:`DicomHeader`).
        array: values in rescaled units (HU for CT), shape ``(1, I, J, K)`` or ``(I, J, K)``.
        folder: the output series folder (must not be the source folder).
        description: what the SeriesDescription starts with.

    Returns:
        The written folder.

    Shape:
        array ``(1, I, J, K)`` = ``scan.array.shape``.

    Raises:
        ValueError: ``scan`` is not a DICOM scan; ``array`` has another shape or non-finite
            values; ``folder`` is the source folder or a file; an empty ``description``.
    """
    header, arr = _check_array(scan, array)
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"description must be a non-empty string, got {description!r}.")
    target = Path(folder).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"folder must be a folder for the DICOM series, got the file {str(target)!r}.")
    if target.resolve() == header.files[0].parent.resolve():
        raise ValueError(f"folder must differ from the source series folder {str(target)!r} (it would be replaced).")
    full = f"{description.strip()}: {header.description}" if header.description else description.strip()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_into(tmp, header, quantise(header, arr), full[:64])
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote DICOM series %s (%d slices, %s)", target, len(header.files), full[:64])
    return target


__all__ = ["DicomHeader", "list_series", "new_uid", "quantise", "read_dicom_series", "write_dicom_series"]
