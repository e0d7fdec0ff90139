"""A scan as stored: its array in source units, its geometry, its on-disk type and header.

:func:`read_scan` reads a scan on its own grid (no reorientation, no resampling) into a
:class:`SourceScan`; :func:`write_scan` writes an array on that grid back with the source's
shape, affine, header and data type, so that a modified scan (an adversarial example) can be
fed to the deployed segmenter as the original was.

- **NIfTI** (``.nii``, ``.nii.gz``; nibabel): the array is the stored data scaled by
  ``scl_slope``/``scl_inter``; writing keeps the header (sform/qform and their codes, units,
  descriptions, the data type, slope and intercept) and stores ``(value - inter) / slope``
  rounded and clipped to the on-disk integer type. A 4-D file ``(I, J, K, C)`` is a
  multi-channel scan.
- **NRRD / MHA** (SimpleITK): LPS geometry converted to RAS and ``(z, y, x)`` arrays transposed
  to ``(i, j, k)`` (the conventions of :mod:`volattack.data.io`); writing keeps the pixel type,
  origin, spacing, direction and the metadata dictionary.
- **DICOM** (a series folder): read and written by :mod:`volattack.data.dicom`.

Conventions: ``array`` is ``(C, I, J, K)`` float32 in source units, indexed in stored voxel
order (nibabel's array order, ITK index ``(i, j, k)``); ``affine`` maps voxel indices to world
millimetres in RAS+.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from volattack.data.io import (
    NIFTI_SUFFIXES,
    SITK_SUFFIXES,
    PathLike,
    atomic_write_bytes,
    is_nifti,
    lps_to_ras,
    sitk_image_to_ras,
)

logger = logging.getLogger(__name__)

#: Formats of :attr:`SourceScan.format`.
FORMATS: tuple[str, ...] = ("nifti", "sitk", "dicom")

#: Single-file SimpleITK formats :func:`write_scan` writes atomically.
SITK_WRITE_SUFFIXES: tuple[str, ...] = (".nrrd", ".mha")


@dataclass
class SourceScan:
    """One scan on its own grid, in its own units.

    Attributes:
        array: ``(C, I, J, K)`` float32 in source units (slope/intercept applied), stored voxel
            index order.
        affine: ``(4, 4)`` voxel index -> world mm, RAS+.
        spacing: mm along ``i, j, k`` (the affine's column norms).
        dtype: the stored dtype after scaling (``int16`` for a typical CT; ``float32`` when a
            non-integral slope or intercept makes the values non-integral).
        path: the file, the DICOM series folder, or the first of several channel files.
        format: ``"nifti"``, ``"sitk"`` or ``"dicom"``.
        header: what :func:`write_scan` needs to write the same geometry, header and tags back
            (format-specific; a dict with ``"slope"``/``"inter"``/``"disk_dtype"`` for the
            representable values).
        paths: the files the channels were read from (one entry for a single file or series).
        parts: for a scan read from several channel files, one single-channel scan per file, in
            channel order, each with its own type and header (what quantising and writing each
            channel back uses); empty otherwise.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: np.dtype
    path: Path
    format: str
    header: Any = None
    paths: list[Path] = field(default_factory=list)
    parts: list["SourceScan"] = field(default_factory=list)

    def __post_init__(self) -> None:
        a = np.asarray(self.array)
        if a.ndim != 4 or 0 in a.shape:
            raise ValueError(f"array must be (C, I, J, K), got shape {a.shape}.")
        self.array = np.ascontiguousarray(a, dtype=np.float32)
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise ValueError(f"affine must be a finite invertible 4x4 matrix, got\n{aff}.")
        self.affine = aff
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.dtype = np.dtype(self.dtype)
        self.path = Path(self.path)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}.")
        if not self.paths:
            self.paths = [self.path]
        if self.parts and (len(self.parts) != self.channels or any(p.channels != 1 for p in self.parts)):
            raise ValueError(f"parts must be one single-channel scan per channel ({self.channels}), got "
                             f"{[p.channels for p in self.parts]} channels.")

    def channel_scans(self) -> list["SourceScan"]:
        """The scan whose storage governs each channel: the channel file's own scan for a scan
        read from several files, this scan for every channel otherwise."""
        return list(self.parts) if self.parts else [self] * self.channels

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(I, J, K)``."""
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.array.shape[0])

    def storage(self) -> tuple[Optional[tuple[float, float]], float, float]:
        """How values are stored: ``(raw range, slope, intercept)`` with ``value = raw * slope +
        intercept``; the raw range is ``None`` for floating storage. Reads a NIfTI/SimpleITK header
        dict (``disk_dtype``, ``slope``, ``inter``) or a DICOM header (``stored_range``, ``slope``,
        ``intercept``)."""
        h = self.header
        if hasattr(h, "stored_range") and hasattr(h, "slope"):
            lo, hi = h.stored_range
            return (float(lo), float(hi)), float(h.slope), float(h.intercept)
        h = h if isinstance(h, dict) else {}
        disk = np.dtype(h.get("disk_dtype", self.dtype))
        slope, inter = float(h.get("slope", 1.0)), float(h.get("inter", 0.0))
        if not np.issubdtype(disk, np.integer):
            return None, slope, inter
        info = np.iinfo(disk)
        return (float(info.min), float(info.max)), slope, inter

    def value_range(self) -> tuple[float, float]:
        """``(lo, hi)``: the source values the stored type can represent (``slope * [min, max] +
        inter`` of an integer type; ``(-inf, inf)`` for floating types)."""
        raw, slope, inter = self.storage()
        if raw is None:
            return (-np.inf, np.inf)
        ends = sorted((raw[0] * slope + inter, raw[1] * slope + inter))
        return (float(ends[0]), float(ends[1]))

    @property
    def grid_step(self) -> float:
        """Spacing of the representable source values: the slope for integer storage (1 for an
        unscaled int16 CT), 0 for floating storage."""
        raw, slope, _ = self.storage()
        return abs(slope) if raw is not None else 0.0

    def quantize(self, array: np.ndarray) -> np.ndarray:
        """``array`` (source units) as the stored type holds it: for integer storage
        ``inter + slope * clip(rint((array - inter) / slope))``, else cast to the float type;
        float32 out, the same shape.

        Raises:
            ValueError: non-finite values.
        """
        a = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError("array must be finite to be written, got NaN or infinite values.")
        if self.parts:
            if a.ndim != 4 or a.shape[0] != len(self.parts):
                raise ValueError(f"array must be (C, I, J, K) with C = {len(self.parts)} (one channel per file), "
                                 f"got shape {a.shape}.")
            return np.concatenate([p.quantize(a[c:c + 1]) for c, p in enumerate(self.parts)], axis=0)
        raw, slope, inter = self.storage()
        if raw is None:
            return a.astype(self.dtype if np.issubdtype(self.dtype, np.floating) else np.float32).astype(np.float32)
        stored = np.clip(np.rint((a - inter) / slope), raw[0], raw[1])
        return (stored * slope + inter).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """Plain description: path, format, shape, spacing, dtype, value range."""
        return {"path": str(self.path), "format": self.format, "shape": list(self.shape),
                "channels": self.channels, "spacing": list(self.spacing), "dtype": str(self.dtype),
                "value_range": list(self.value_range())}


def _scaled_dtype(disk: np.dtype, slope: float, inter: float) -> np.dtype:
    """The dtype of the values after scaling (integral scaling of integers stays an integer type
    that holds the scaled range)."""
    if slope == 1.0 and inter == 0.0:
        return disk
    if np.issubdtype(disk, np.integer) and float(slope).is_integer() and float(inter).is_integer():
        info = np.iinfo(disk)
        lo, hi = sorted((info.min * slope + inter, info.max * slope + inter))
        for cand in (disk, np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64)):
            ci = np.iinfo(cand)
            if ci.min <= lo and hi <= ci.max:
                return np.dtype(cand)
    return np.dtype(np.float32)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


def _read_nifti(path: Path) -> SourceScan:
    import nibabel as nib

    img = nib.load(str(path))
    raw = np.asanyarray(img.dataobj.get_unscaled())
    slope, inter = img.dataobj.slope, img.dataobj.inter
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.ndim != 4:
        raise ValueError(f"Cannot read scan {str(path)!r}: expected a 3-D or 4-D (I, J, K, C) volume, got shape {raw.shape}.")
    arr = np.moveaxis(raw.astype(np.float64) * slope + inter, -1, 0)
    affine = np.asarray(img.affine, dtype=np.float64)
    header = {"nifti": img.header.copy(), "slope": slope, "inter": inter, "disk_dtype": raw.dtype,
              "ndim": int(np.asanyarray(img.dataobj).ndim)}
    return SourceScan(arr, affine, _spacing(affine), _scaled_dtype(raw.dtype, slope, inter), path, "nifti", header)


def _read_sitk(path: Path) -> SourceScan:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise ValueError(f"Cannot read scan {str(path)!r}: expected a 3-D image, got {image.GetDimension()}-D.")
    arr, affine, _ = sitk_image_to_ras(image)
    arr = arr[None] if arr.ndim == 3 else np.moveaxis(arr, -1, 0)
    meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    header = {"pixel_id": image.GetPixelID(), "meta": meta, "disk_dtype": arr.dtype, "slope": 1.0, "inter": 0.0}
    return SourceScan(arr, affine, _spacing(affine), arr.dtype, path, "sitk", header)


def _dicom_module() -> Any:
    import importlib

    try:  # import_module (not ``from ... import``) honours a module blocked in sys.modules
        dicom = importlib.import_module("volattack.data.dicom")
    except ImportError as e:
        raise ValueError(
            "DICOM series need volattack.data.dicom, which is not available in this installation "
            f"({type(e).__name__}: {e})."
        ) from e
    return dicom


def _read_one(path: Path) -> SourceScan:
    if not path.exists():
        raise FileNotFoundError(f"Scan not found: {str(path)!r}.")
    if path.is_dir():
        return _dicom_module().read_dicom_series(path)
    try:
        if is_nifti(path):
            return _read_nifti(path)
        return _read_sitk(path)
    except ValueError:
        raise
    except Exception as e:  # nibabel/SimpleITK/zlib raise many unrelated types
        raise ValueError(f"Cannot read scan {str(path)!r}: {type(e).__name__}: {e}") from e


def read_scan(path_or_paths: Union[PathLike, Sequence[PathLike]]) -> SourceScan:
    """Read a scan on its own grid: NIfTI (nibabel), NRRD/MHA (SimpleITK), a DICOM series folder
    (:mod:`volattack.data.dicom`), or a list of single-channel files stacked as channels.

    Args:
        path_or_paths: a file, a DICOM series folder, or a list of files sharing one grid.

    Returns:
        The :class:`SourceScan` (array ``(C, I, J, K)`` float32 in source units).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: an unreadable file (named), an empty list, or channel files on different
            grids (both named).
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        return _read_one(Path(path_or_paths).expanduser())
    paths = [Path(p).expanduser() for p in path_or_paths]
    if not paths:
        raise ValueError("path_or_paths must name at least one file, got an empty list.")
    scans = [_read_one(p) for p in paths]
    first = scans[0]
    for p, s in zip(paths[1:], scans[1:]):
        if s.shape != first.shape or not np.allclose(s.affine, first.affine, atol=1e-4):
            raise ValueError(f"channel files must share one grid: {str(paths[0])!r} has shape {first.shape} "
                             f"and affine\n{first.affine}\nbut {str(p)!r} has shape {s.shape} and affine\n{s.affine}.")
    if len(scans) == 1:
        return first
    arr = np.concatenate([s.array for s in scans], axis=0)
    return SourceScan(arr, first.affine, first.spacing, first.dtype, first.path, first.format,
                      first.header, paths=paths, parts=scans)


def read_geometry(path: PathLike) -> Optional[tuple[tuple[int, ...], np.ndarray]]:
    """``(spatial shape, RAS affine)`` of a scan file from its header only (no voxel data), or
    ``None`` for a DICOM series folder (its geometry needs the whole series).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unreadable header (named).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"Scan not found: {str(p)!r}.")
    if p.is_dir():
        return None
    try:
        if is_nifti(p):
            import nibabel as nib

            img = nib.load(str(p))
            return tuple(int(v) for v in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        n = reader.GetDimension()
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(n, n)
        lps = np.eye(n + 1)
        lps[:n, :n] = direction @ np.diag(reader.GetSpacing())
        lps[:n, n] = reader.GetOrigin()
        return tuple(int(v) for v in reader.GetSize()), lps_to_ras(lps)
    except Exception as e:  # nibabel/SimpleITK raise many unrelated types
        raise ValueError(f"Cannot read the header of {str(p)!r}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- writing


def _check_array(scan: SourceScan, array: Any) -> np.ndarray:
    a = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array, dtype=np.float64)
    if a.ndim == 5 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3:
        a = a[None]
    if a.shape != scan.array.shape:
        raise ValueError(f"array must have the scan's shape {scan.array.shape} (C, I, J, K), got {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError("array must be finite to be written, got NaN or infinite values.")
    return a


def _disk_values(scan: SourceScan, a: np.ndarray, disk: np.dtype) -> np.ndarray:
    """Stored values of source values ``a``: unscaled, rounded and clipped for integer types."""
    h = scan.header if isinstance(scan.header, dict) else {}
    slope, inter = float(h.get("slope", 1.0)), float(h.get("inter", 0.0))
    raw = (a - inter) / slope
    if np.issubdtype(disk, np.integer):
        info = np.iinfo(disk)
        raw = np.clip(np.rint(raw), info.min, info.max)
    return raw.astype(disk)


def _write_nifti(scan: SourceScan, a: np.ndarray, path: Path, description: str) -> Path:
    import gzip

    import nibabel as nib

    h = scan.header if scan.format == "nifti" and isinstance(scan.header, dict) else None
    if h is not None:
        disk = np.dtype(h["disk_dtype"])
        raw = np.moveaxis(_disk_values(scan, a, disk), 0, -1)
        raw = raw[..., 0] if h.get("ndim", 3) == 3 else raw
        hdr = h["nifti"].copy()
        img = nib.Nifti1Image(raw, None, header=hdr)  # affine None: keep the header's sform/qform
        if h["slope"] != 1.0 or h["inter"] != 0.0:
            img.header.set_slope_inter(h["slope"], h["inter"])  # written unscaled with these
    else:
        disk = scan.dtype if np.issubdtype(scan.dtype, np.integer) else np.dtype(np.float32)
        raw = np.moveaxis(_disk_values(scan, a, disk), 0, -1)
        raw = raw[..., 0] if raw.shape[-1] == 1 else raw
        img = nib.Nifti1Image(raw, scan.affine)
        img.set_qform(scan.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    payload = img.to_bytes()
    gz = str(path).lower().endswith(".gz")
    if gz:
        payload = gzip.compress(payload, compresslevel=4, mtime=0)
    return atomic_write_bytes(payload, path, suffix=".nii.gz" if gz else ".nii")


def _write_sitk(scan: SourceScan, a: np.ndarray, path: Path, description: str) -> Path:
    import SimpleITK as sitk

    h = scan.header if scan.format == "sitk" and isinstance(scan.header, dict) else {}
    disk = np.dtype(h.get("disk_dtype", scan.dtype if np.issubdtype(scan.dtype, np.integer) else np.float32))
    raw = _disk_values(scan, a, disk)
    vec = raw.shape[0] > 1
    zyx = np.ascontiguousarray(np.transpose(raw, (3, 2, 1, 0)) if vec else np.transpose(raw[0], (2, 1, 0)))
    image = sitk.GetImageFromArray(zyx, isVector=vec)
    lps = lps_to_ras(scan.affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).reshape(-1)])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    for k, v in h.get("meta", {}).items():
        image.SetMetaData(k, v)
    if path.suffix.lower() == ".nrrd":
        image.SetMetaData("content", description)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / f"scan{suffix}"  # SimpleITK writes files only: stage, then move atomically
        sitk.WriteImage(image, str(staged), useCompression=True)
        atomic_write_bytes(staged.read_bytes(), path, suffix=suffix)
    return path


def write_scan(scan: SourceScan, array: Any, path: PathLike, *, description: str = "volattack adversarial") -> Path:
    """Write ``array`` (source units, on ``scan``'s grid) with ``scan``'s shape, affine, header and
    data type, atomically.

    Float values are rounded and clipped to an integer storage type's range (after undoing the
    NIfTI slope and intercept). The format follows ``path``: ``.nii``/``.nii.gz`` (the NIfTI
    header of a NIfTI scan is kept: sform/qform, codes, slope/intercept), ``.nrrd``/``.mha``
    (pixel type and metadata of a SimpleITK scan kept), or a folder without suffix for a DICOM
    scan (:func:`volattack.data.dicom.write_dicom_series`, keeping its tags).

    Args:
        scan: the source scan.
        array: ``(C, I, J, K)``, ``(1, C, I, J, K)`` or (one channel) ``(I, J, K)`` numpy array or
            tensor, finite.
        path: destination file (or DICOM series folder).
        description: what the file's description field says (NIfTI ``descrip``, NRRD
            ``content``, DICOM SeriesDescription).

    Returns:
        The written path.

    Raises:
        ValueError: a shape other than the scan's, non-finite values, an unsupported suffix, a
            DICOM scan written to a file or a file scan written as DICOM, several channel files
            (:func:`volattack.data.source_channels.write_scan_channels` writes those).
    """
    p = Path(path).expanduser()
    a = _check_array(scan, array)
    if not isinstance(description, str):
        raise ValueError(f"description must be a string, got {type(description).__name__}.")
    if len(scan.paths) > 1:
        raise ValueError(f"scan was read from {len(scan.paths)} channel files; write_scan writes one file: "
                         "use volattack.data.source_channels.write_scan_channels(scan, array, paths), one file per channel.")
    if scan.format == "dicom" or p.suffix == "":
        if scan.format != "dicom":
            raise ValueError(f"path must end with one of {list(NIFTI_SUFFIXES + SITK_WRITE_SUFFIXES)} for a "
                             f"{scan.format} scan, got {str(p)!r}.")
        if p.suffix:
            raise ValueError(f"path must be a folder (no suffix) for a DICOM scan, got {str(p)!r}.")
        return Path(_dicom_module().write_dicom_series(scan, scan.quantize(a), p, description))
    if is_nifti(p):
        out = _write_nifti(scan, a, p, description)
    elif p.suffix.lower() in SITK_WRITE_SUFFIXES:
        out = _write_sitk(scan, a, p, description)
    else:
        raise ValueError(f"path must end with one of {list(NIFTI_SUFFIXES + SITK_WRITE_SUFFIXES)} "
                         f"(readable: {list(SITK_SUFFIXES)}), got {str(p)!r}.")
    logger.debug("wrote %s %s %s", out, scan.shape, scan.dtype)
    return out


def scan_suffix(image: Any) -> str:
    """The suffix an adversarial scan of the source ``image`` is written with (its own format;
    ``""`` for a DICOM series folder, ``.mha`` for a two-file ``.mhd``, ``.nrrd`` for ``.nhdr``)."""
    name = str(image).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    if name.endswith((".nrrd", ".nhdr")):
        return ".nrrd"
    if name.endswith((".mha", ".mhd")):
        return ".mha"
    return ""


__all__ = ["FORMATS", "SourceScan", "read_geometry", "read_scan", "scan_suffix", "write_scan"]
