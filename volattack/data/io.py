"""Reading and writing volumes: NIfTI through nibabel, NRRD/MHA/... through SimpleITK.

Conventions (the same as MONAI's ``NibabelReader``/``ITKReader`` with RAS output):

- arrays are indexed ``(i, j, k)`` = NIfTI voxel order (``(H, W, D)`` for 3D volumes), i.e.
  SimpleITK's ``(z, y, x)`` arrays are transposed to ``(x, y, z)``;
- affines map voxel indices to world millimetres in **RAS+** (``+x`` toward the patient's
  right, ``+y`` anterior, ``+z`` superior; NIfTI convention); ITK's LPS geometry (``+x``
  toward the patient's left, ``+y`` posterior) is converted by negating the first two rows;
- spacings are in mm, one per spatial axis.

Writes are atomic: the file is serialised in memory, written to a temporary file in the
target folder and moved into place with ``os.replace``, so a crash never leaves a partial
file under the final name, and no temporary file is left behind on error. Gzip output is
byte-for-byte deterministic (no timestamp and no file name in the gzip header).

This module imports nibabel/SimpleITK lazily (no torch/MONAI at import time).
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Suffixes read with nibabel; everything else goes through SimpleITK.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")

#: Formats SimpleITK reads that MONAI has no installed reader for here (ITK and pynrrd absent).
SITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, case-insensitive).

    Args:
        path: a file name.

    Returns:
        True for NIfTI suffixes.
    """
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Convert an affine between LPS (ITK/DICOM) and RAS (NIfTI) world coordinates.

    The map negates the first two world axes; it is its own inverse.

    Args:
        affine: ``(N+1, N+1)`` homogeneous voxel-to-world matrix (mm).

    Returns:
        The converted ``(N+1, N+1)`` float64 matrix.
    """
    affine = np.asarray(affine, dtype=np.float64)
    flip = np.ones(affine.shape[0])
    flip[: min(2, affine.shape[0] - 1)] = -1.0
    return np.diag(flip) @ affine


def sitk_image_to_ras(image: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Array, RAS affine and spacing of a ``SimpleITK.Image`` in NIfTI index order.

    Args:
        image: a ``SimpleITK.Image`` (scalar or vector pixels).

    Returns:
        ``(array, affine, spacing)``: array of shape ``(X, Y, Z)`` (``(X, Y, Z, C)`` for vector
        pixels), the ``(N+1, N+1)`` voxel-to-RAS affine in mm, and the spacing in mm.
    """
    import SimpleITK as sitk

    ndim = image.GetDimension()
    arr = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
    spatial = tuple(range(ndim))[::-1]
    axes = spatial + tuple(range(ndim, arr.ndim))
    arr = np.ascontiguousarray(np.transpose(arr, axes))
    spacing = tuple(float(s) for s in image.GetSpacing())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine_lps = np.eye(ndim + 1)
    affine_lps[:ndim, :ndim] = direction @ np.diag(spacing)
    affine_lps[:ndim, ndim] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return arr, lps_to_ras(affine_lps), spacing


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"Volume file not found: {str(path)!r}.")
    if path.is_dir():
        raise ValueError(f"path must be a volume file, got the directory {str(path)!r}.")


def read_volume(path: PathLike) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a volume, its voxel-to-RAS affine and its spacing.

    NIfTI (``.nii``/``.nii.gz``) is read with nibabel (sform/qform as nibabel chooses, data
    scaled by ``scl_slope``/``scl_inter``); every other format (NRRD, MHA/MHD, ...) with
    SimpleITK, whose LPS geometry is converted to RAS and whose ``(z, y, x)`` array is
    transposed to ``(x, y, z)``, so that a volume saved in both formats reads back equal.

    Args:
        path: the file.

    Returns:
        ``(array, affine, spacing)``: the voxel array in its stored dtype (float for scaled
        NIfTI), the ``(4, 4)`` float64 voxel-to-world (RAS, mm) affine for 3D volumes, and the
        voxel spacing in mm per spatial axis.

    Shape:
        array ``(H, W, D)`` for 3D volumes (trailing channel/time axes kept as stored).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (corrupt, truncated, unknown format); the message
            names the path.
    """
    path = Path(path).expanduser()
    _check_exists(path)
    try:
        if is_nifti(path):
            import nibabel as nib

            img = nib.load(str(path))
            arr = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
            ndim_spatial = min(3, arr.ndim)
            spacing = tuple(float(z) for z in img.header.get_zooms()[:ndim_spatial])
        else:
            import SimpleITK as sitk

            arr, affine, spacing = sitk_image_to_ras(sitk.ReadImage(str(path)))
    except Exception as e:  # nibabel/SimpleITK/zlib raise many unrelated types
        raise ValueError(f"Cannot read volume {str(path)!r}: {type(e).__name__}: {e}") from e
    return np.asarray(arr), affine, spacing


def _as_numpy(x: Any) -> np.ndarray:
    """Detach a torch tensor (possibly a MONAI MetaTensor) or pass an array-like through."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


def atomic_write_bytes(data: bytes, path: PathLike, suffix: str = ".tmp") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`volattack.utils.atomic_write_bytes`)."""
    from volattack.utils import atomic_write_bytes as _write

    return _write(data, path, suffix=suffix)


def write_nifti(
    array: Any,
    path: PathLike,
    affine: Any,
    dtype: Any = np.float32,
    compresslevel: int = 4,
) -> Path:
    """Write a 3D volume as NIfTI-1 with the given voxel-to-RAS affine, atomically.

    The affine is stored in both the sform and the qform (code 1, scanner), and the voxel
    size in mm is set from the affine's column norms, so the spacing of the source volume is
    preserved. ``.nii.gz`` files are gzip-compressed deterministically (same array and affine
    give identical bytes).

    Args:
        array: numpy array or torch tensor (MONAI MetaTensor accepted) of shape ``(H, W, D)``.
            Images are written as float32 by default; pass ``dtype=np.uint8`` or
            ``np.int16`` for label maps (values are rounded before an integer cast).
        path: destination ending in ``.nii`` or ``.nii.gz``; parent folders are created.
        affine: ``(4, 4)`` voxel-to-world (RAS, mm) matrix, numpy or torch.
        dtype: on-disk data type.
        compresslevel: gzip level 1-9 for ``.nii.gz``.

    Returns:
        The written path.

    Shape:
        array ``(H, W, D)``; affine ``(4, 4)``.

    Raises:
        ValueError: bad array rank, non-finite or singular affine, unsupported suffix, or
            values that do not fit an integer ``dtype``.
    """
    import nibabel as nib

    path = Path(path).expanduser()
    if not is_nifti(path):
        raise ValueError(f"path must end with .nii or .nii.gz, got {str(path)!r}.")
    arr = _as_numpy(array)
    if arr.ndim != 3:
        raise ValueError(f"array must have shape (H, W, D), got shape {tuple(arr.shape)}.")
    aff = _as_numpy(affine).astype(np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got shape {tuple(aff.shape)}.")
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be finite and invertible, got\n{aff}.")
    if not 1 <= int(compresslevel) <= 9:
        raise ValueError(f"compresslevel must be in [1, 9], got {compresslevel}.")
    np_dtype = np.dtype(dtype)
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        if arr.size and (np.nanmin(arr) < info.min or np.nanmax(arr) > info.max):
            raise ValueError(
                f"array values [{np.nanmin(arr)}, {np.nanmax(arr)}] do not fit dtype {np_dtype}."
            )
        arr = np.rint(arr) if np.issubdtype(arr.dtype, np.floating) else arr
    data = np.asarray(arr, dtype=np_dtype)

    img = nib.Nifti1Image(data, aff)
    img.header.set_data_dtype(np_dtype)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units("mm", "sec")
    payload = img.to_bytes()
    if str(path).lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=int(compresslevel), mtime=0)
        suffix = ".nii.gz"
    else:
        suffix = ".nii"
    atomic_write_bytes(payload, path, suffix=suffix)
    logger.debug("wrote %s %s %s", path, data.shape, np_dtype)
    return path
