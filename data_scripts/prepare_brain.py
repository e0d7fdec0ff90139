#!/usr/bin/env python
"""Real brain MRI segmentation tasks from packaged atlases, fully offline.

Sources (nothing is downloaded; files are read where the packages put them):

- Debian's ``mricron-data`` (``apt-get install mricron-data``; BSD-3-clause, Chris Rorden),
  in ``/usr/share/mricron/templates``: ``ch2.nii.gz`` (Colin27: one person scanned 27 times
  and averaged, Holmes et al., JCAT 1998; T1, 1 mm, skull on), ``ch2bet.nii.gz`` (the same
  brain extracted with FSL BET), ``aal.nii.gz`` + ``aal.nii.txt`` (AAL, 116 regions drawn on
  Colin27, Tzourio-Mazoyer et al., NeuroImage 2002).
- Optional, a second head: the MNI152 NLin6Asym T1 template (average of 152 adults, skull
  on, Fonov/Grabner et al.) and its brain mask, shipped inside PyPI's ``nimare`` wheel
  (``nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_{T1w,desc-brain_mask}.nii.gz``).
  Found automatically when ``nimare`` is installed, or with ``--nimare PATH`` (a wheel from
  ``pip download --no-deps nimare``, an installed package folder, or a folder holding the two
  files). volattack does not depend on nimare.

Tasks (each written under ``OUT/<task>/`` with its own ``dataset.json``):

``brain_extraction``: T1 head -> brain mask (1 brain). Training and validation cases are
    Colin27, the first unaugmented, the rest randomly augmented (below). Test cases are the
    MNI152 head (unaugmented, then augmented) when it is available: a different head the model
    never saw. Without it, the test cases are further augmentations of Colin27 - the SAME head,
    so the test then measures robustness to the augmentations, not generalisation to new
    subjects (``dataset.json`` says which). The Colin27 mask is ``ch2bet > 0``, largest
    connected component, holes filled.

``brain_parcellation``: T1 -> grey-matter lobes of one hemisphere (AAL regions merged, see
    ``LOBES``; white matter, CSF and skull are background). One asymmetric subject, split by
    hemisphere: training and validation crops hold the LEFT hemisphere of Colin27, test crops
    the RIGHT hemisphere, mirrored across the mid-sagittal plane (``--no-mirror`` keeps it
    unmirrored) so it is stored like a left hemisphere: the test anatomy (gyri, sizes) was never
    seen in training. The label map is defined per hemisphere (voxels of the other
    hemisphere's regions are background). The mid-sagittal plane is the x plane that best
    separates the AAL ``_L`` and ``_R`` regions.

Augmentation (TorchIO-style: values sampled from a seeded ``numpy.random.Generator`` and
recorded per case under ``"case_info"`` of ``dataset.json``; case entries themselves hold only
``image``, ``label``, ``subject`` (and ``hemisphere``) so they collate in a data loader): the
output voxel at world point ``p`` (mm) samples the source at ``c + R S (p - c) + t`` (rotation ``R`` about each axis, per-axis scale ``S``,
translation ``t``, centre ``c`` of the crop), then a smooth multiplicative bias field
``exp(sum_i b_i m_i(x, y, z))`` over linear and quadratic monomials, a gamma
``100 (I / 100) ** g`` and Gaussian noise. All resampling is one interpolation from the 1 mm
source (Gaussian anti-aliasing, linear for images and the brain mask, nearest for lobes) onto an
axis-aligned RAS grid of ``--spacing`` mm (default 3 mm) so CPU training takes minutes.
Intensities are rescaled per source so that the 99.5th percentile of head voxels is 100 (a
window of ``[0, 100]`` suits every case).

Output goes under ``OUT`` only (licensed data never enters the repository; ``data/`` is
git-ignored)::

    python data_scripts/prepare_brain.py data/brain                      # both tasks
    python data_scripts/prepare_brain.py data/brain --task parcellation --spacing 4
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

logger = logging.getLogger("prepare_brain")

MRICRON_DIR = Path("/usr/share/mricron/templates")
INSTALL_HINT = "run `apt-get install mricron-data` (Debian/Ubuntu) or pass --mricron-dir"
COLIN_FILES = {"t1": "ch2.nii.gz", "bet": "ch2bet.nii.gz", "aal": "aal.nii.gz", "aal_names": "aal.nii.txt"}
MNI_FILES = {"t1": "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz", "mask": "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"}
TASKS: tuple[str, ...] = ("extraction", "parcellation")

#: Coarse classes of the parcellation task (per hemisphere).
PARCELLATION_LABELS: dict[int, str] = {
    0: "background",
    1: "frontal",
    2: "parietal",
    3: "temporal",
    4: "occipital",
    5: "limbic_insula",
    6: "deep_grey",
    7: "cerebellum",
}

#: AAL region-name prefixes of each class (this script's grouping of the 116 AAL regions:
#: precentral and paracentral with the frontal lobe, postcentral with the parietal lobe,
#: fusiform and Heschl with the temporal lobe, vermis with the cerebellum).
LOBES: dict[int, tuple[str, ...]] = {
    1: ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus", "Paracentral_Lobule"),
    2: ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus"),
    3: ("Heschl", "Temporal_", "Fusiform"),
    4: ("Calcarine", "Cuneus", "Lingual", "Occipital_"),
    5: ("Insula", "Cingulum_", "Hippocampus", "ParaHippocampal", "Amygdala"),
    6: ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    7: ("Cerebelum_", "Cerebellum_", "Vermis"),
}

#: Default augmentation ranges per task: rotation (degrees, +-), scale (+-), translation
#: (mm, +-), bias-field coefficient (+-), gamma range, noise sd (fraction of 100).
AUG_RANGES: dict[str, dict[str, Any]] = {
    "extraction": {"rotation": 10.0, "scale": 0.1, "translation": 6.0, "bias": 0.2,
                   "gamma": (0.8, 1.25), "noise": 0.03},
    "parcellation": {"rotation": 5.0, "scale": 0.06, "translation": 3.0, "bias": 0.15,
                     "gamma": (0.85, 1.18), "noise": 0.02},
}


# --------------------------------------------------------------------------- sources


@dataclass
class Volume:
    """A voxel array and its voxel-to-RAS affine (mm), axes closest to RAS order."""

    data: np.ndarray
    affine: np.ndarray
    source: str


def _from_image(img: Any, source: str) -> Volume:
    import nibabel as nib

    img = nib.as_closest_canonical(img)
    return Volume(np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64), source)


def read_volume(path: Path) -> Volume:
    """Read a NIfTI file reoriented to closest RAS (nibabel).

    Args:
        path: the file.

    Returns:
        The volume (array in its stored dtype).

    Raises:
        FileNotFoundError: missing file.
        ValueError: unreadable file (path named).
    """
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"Atlas file not found: {str(path)!r}.")
    try:
        return _from_image(nib.load(str(path)), str(path))
    except Exception as e:
        raise _common.PrepareError(f"Cannot read {str(path)!r}: {type(e).__name__}: {e}") from e


def read_aal_names(path: Path) -> dict[int, str]:
    """Parse ``aal.nii.txt`` (lines ``index name [code]``).

    Args:
        path: the label text file.

    Returns:
        AAL index -> region name.

    Raises:
        FileNotFoundError: missing file.
        ValueError: no parsable line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"AAL label names not found: {str(path)!r}.")
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    if not names:
        raise _common.PrepareError(f"{str(path)!r} holds no 'index name' lines.")
    return names


def lobe_of(name: str) -> int:
    """Parcellation class of an AAL region name (see ``LOBES``).

    Args:
        name: AAL name, e.g. ``"Frontal_Sup_L"``.

    Returns:
        Class index in 1..7.

    Raises:
        ValueError: a name that no ``LOBES`` prefix matches.
    """
    for k, prefixes in LOBES.items():
        if name.startswith(prefixes):
            return k
    raise ValueError(f"AAL region name {name!r} matches no lobe of LOBES; extend LOBES.")


def hemisphere_of(name: str) -> str:
    """``"L"``, ``"R"`` or ``""`` (midline, e.g. vermis) from an AAL name suffix."""
    return name[-1] if name.endswith(("_L", "_R")) else ""


def find_midline(left: np.ndarray, right: np.ndarray) -> int:
    """Index of the x plane (axis 0) that best separates left from right voxels.

    Minimises (right voxels before the plane) + (left voxels at or after it), computed with
    cumulative sums of per-slice counts. Axis 0 must increase toward the subject's right (RAS).

    Args:
        left: boolean mask of left-hemisphere voxels.
        right: boolean mask of right-hemisphere voxels.

    Returns:
        ``i`` such that slices ``< i`` are left and ``>= i`` right.

    Shape:
        ``left``, ``right``: ``(X, Y, Z)``.

    Raises:
        ValueError: either mask is empty or the masks are ordered right-to-left.
    """
    cl = left.reshape(left.shape[0], -1).sum(1).astype(np.int64)
    cr = right.reshape(right.shape[0], -1).sum(1).astype(np.int64)
    if cl.sum() == 0 or cr.sum() == 0:
        raise ValueError(f"left and right masks must be non-empty, got {cl.sum()} and {cr.sum()} voxels.")
    right_before = np.concatenate([[0], np.cumsum(cr)])
    left_after = cl.sum() - np.concatenate([[0], np.cumsum(cl)])
    cost = right_before + left_after
    i = int(np.argmin(cost))
    if cost[i] > 0.5 * min(cl.sum(), cr.sum()):
        raise ValueError("left voxels do not lie at lower x than right voxels: the atlas is not in RAS order.")
    return i


def hemisphere_lobes(aal: np.ndarray, names: dict[int, str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-hemisphere lobe maps from an AAL label volume.

    Args:
        aal: AAL index volume in RAS axis order.
        names: AAL index -> name.

    Returns:
        ``(left_lobes, right_lobes, midline)``: uint8 class maps (0 outside that hemisphere)
        and the mid-sagittal plane index (midline regions such as the vermis are split there).

    Shape:
        ``aal``, maps: ``(X, Y, Z)``.

    Raises:
        ValueError: a region name without a lobe, or indices in the volume without a name.
    """
    present = np.unique(aal)
    unnamed = sorted(int(v) for v in present if v != 0 and int(v) not in names)
    if unnamed:
        raise _common.PrepareError(f"AAL volume holds indices without a name: {unnamed[:10]}.")
    size = max(int(present.max()), max(names)) + 1
    lobe_lut = np.zeros(size, dtype=np.uint8)
    hemi_lut = np.zeros(size, dtype=np.uint8)  # 1 left, 2 right, 3 midline
    for idx, name in names.items():
        lobe_lut[idx] = lobe_of(name)
        hemi_lut[idx] = {"L": 1, "R": 2}.get(hemisphere_of(name), 3)
    lobes = lobe_lut[aal]
    hemi = hemi_lut[aal]
    mid = find_midline(hemi == 1, hemi == 2)
    x = np.arange(aal.shape[0])[:, None, None]
    left = np.where((hemi == 1) | ((hemi == 3) & (x < mid)), lobes, 0).astype(np.uint8)
    right = np.where((hemi == 2) | ((hemi == 3) & (x >= mid)), lobes, 0).astype(np.uint8)
    return left, right, mid


def brain_mask_from_bet(bet: np.ndarray) -> np.ndarray:
    """Brain mask of a BET-extracted image: ``> 0``, largest connected component, holes filled.

    Args:
        bet: brain-extracted image (zero outside the brain).

    Returns:
        Boolean mask.

    Shape:
        ``(X, Y, Z)`` -> ``(X, Y, Z)``.
    """
    from scipy import ndimage

    mask = bet > 0
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def normalise_intensity(t1: np.ndarray) -> tuple[np.ndarray, float]:
    """Rescale a T1 image so the 99.5th percentile of head voxels is 100.

    Head voxels are those above 10 % of the 99th percentile of positive voxels.

    Args:
        t1: the image (any numeric dtype, scanner units).

    Returns:
        ``(image, scale)``: float32 image in percent of the robust maximum, and the factor
        applied.

    Raises:
        ValueError: an image with no positive voxel.
    """
    a = np.asarray(t1, dtype=np.float32)
    pos = a[a > 0]
    if pos.size == 0:
        raise _common.PrepareError("T1 image has no positive voxel.")
    head = pos[pos > 0.1 * np.percentile(pos, 99)]
    scale = 100.0 / float(np.percentile(head, 99.5))
    return np.clip(a * scale, 0, None).astype(np.float32), scale


def _mni_from_dir(folder: Path) -> Optional[dict[str, Path]]:
    for cand in (folder, folder / "resources" / "templates", folder / "nimare" / "resources" / "templates"):
        files = {k: cand / v for k, v in MNI_FILES.items()}
        if all(p.is_file() for p in files.values()):
            return files
    return None


def load_mni(nimare: Optional[Path]) -> Optional[tuple[Volume, Volume]]:
    """MNI152 T1 and brain mask from nimare's templates, or None when unavailable.

    Args:
        nimare: a ``nimare-*.whl``, an installed ``nimare`` folder, a site-packages folder, or
            a folder holding the two template files; None: look for an installed ``nimare``
            (``importlib.util.find_spec``, nimare itself is not imported).

    Returns:
        ``(t1, mask)`` or None.

    Raises:
        FileNotFoundError: ``nimare`` was given but holds no templates.
    """
    import nibabel as nib

    if nimare is None:
        spec = importlib.util.find_spec("nimare")
        if spec is None or not spec.submodule_search_locations:
            return None
        files = _mni_from_dir(Path(list(spec.submodule_search_locations)[0]))
        if files is None:
            logger.warning("nimare is installed but ships no MNI152 templates; using Colin27 only")
            return None
        return read_volume(files["t1"]), read_volume(files["mask"])
    nimare = nimare.expanduser()
    if nimare.is_file() and zipfile.is_zipfile(nimare):
        with zipfile.ZipFile(nimare) as z:
            names = z.namelist()
            vols = []
            for key in ("t1", "mask"):
                member = next((n for n in names if n.endswith("templates/" + MNI_FILES[key])), None)
                if member is None:
                    raise FileNotFoundError(f"{str(nimare)!r} holds no {MNI_FILES[key]}.")
                raw = z.read(member)
                img = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
                vols.append(_from_image(img, f"{nimare}:{member}"))
        return vols[0], vols[1]
    if nimare.is_dir():
        files = _mni_from_dir(nimare)
        if files is not None:
            return read_volume(files["t1"]), read_volume(files["mask"])
    raise FileNotFoundError(
        f"--nimare {str(nimare)!r} holds no MNI152 templates ({', '.join(MNI_FILES.values())}); give a "
        f"nimare wheel, its package folder, or a folder with those files."
    )


def load_colin(mricron_dir: Path) -> dict[str, Any]:
    """Colin27 T1, brain mask and AAL per-hemisphere lobe maps from ``mricron-data``.

    Args:
        mricron_dir: folder with ``ch2.nii.gz``, ``ch2bet.nii.gz``, ``aal.nii.gz``, ``aal.nii.txt``.

    Returns:
        Dict with ``t1`` (normalised Volume), ``mask`` (uint8 Volume), ``lobes_left``,
        ``lobes_right`` (uint8 Volumes on the AAL grid), ``midline_x`` (mm) and ``scale``.

    Raises:
        FileNotFoundError: a file is missing (message says to install mricron-data).
    """
    missing = [n for n in COLIN_FILES.values() if not (mricron_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"mricron-data atlas files {missing} not found in {str(mricron_dir)!r}: {INSTALL_HINT}."
        )
    t1 = read_volume(mricron_dir / COLIN_FILES["t1"])
    bet = read_volume(mricron_dir / COLIN_FILES["bet"])
    aal = read_volume(mricron_dir / COLIN_FILES["aal"])
    names = read_aal_names(mricron_dir / COLIN_FILES["aal_names"])
    data, scale = normalise_intensity(t1.data)
    left, right, mid = hemisphere_lobes(np.asarray(aal.data).astype(np.int64), names)
    midline_x = float((aal.affine @ np.array([mid - 0.5, 0, 0, 1.0]))[0])
    return {
        "t1": Volume(data, t1.affine, t1.source),
        "mask": Volume(brain_mask_from_bet(bet.data).astype(np.uint8), bet.affine, bet.source),
        "lobes_left": Volume(left, aal.affine, aal.source),
        "lobes_right": Volume(right, aal.affine, aal.source),
        "midline_x": midline_x,
        "scale": scale,
    }


# --------------------------------------------------------------------------- geometry


def world_bbox(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-space (mm) bounding box of a mask's voxel centres (corners transformed).

    Args:
        mask: boolean array.
        affine: its voxel-to-world matrix.

    Returns:
        ``(lo, hi)``, each of shape ``(3,)``.

    Raises:
        ValueError: empty mask.
    """
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        raise _common.PrepareError("cannot take the bounding box of an empty mask.")
    lo_i = np.array([i.min() for i in idx], dtype=np.float64)
    hi_i = np.array([i.max() for i in idx], dtype=np.float64)
    corners = np.array(np.meshgrid(*zip(lo_i, hi_i), indexing="ij")).reshape(3, -1)
    w = affine[:3, :3] @ corners + affine[:3, 3:4]
    return w.min(1), w.max(1)


def grid(lo: np.ndarray, hi: np.ndarray, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Axis-aligned RAS grid of ``spacing`` mm covering the box ``[lo, hi]`` (mm).

    Args:
        lo: lower corner (mm).
        hi: upper corner (mm).
        spacing: voxel size (mm).

    Returns:
        ``(shape, affine)``.
    """
    shape = tuple(int(np.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi))
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    origin = centre - spacing * (np.asarray(shape) - 1) / 2
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return shape, aff  # type: ignore[return-value]


def _rotation(deg: Sequence[float]) -> np.ndarray:
    rx, ry, rz = np.deg2rad(np.asarray(deg, dtype=np.float64))
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def sample_augmentation(rng: np.random.Generator, ranges: dict[str, Any]) -> dict[str, Any]:
    """Draw explicit augmentation values (recorded in the datalist, replayable).

    Args:
        rng: the case's generator.
        ranges: one entry of ``AUG_RANGES``.

    Returns:
        ``rotation_deg`` (3), ``scale`` (3), ``translation_mm`` (3), ``bias`` (9 coefficients of
        x, y, z, x^2, y^2, z^2, xy, xz, yz on the crop normalised to [-1, 1]), ``gamma``,
        ``noise_sd`` (intensity units, image scaled to 100) and ``noise_seed``.
    """
    r = ranges
    return {
        "rotation_deg": [round(float(v), 4) for v in rng.uniform(-r["rotation"], r["rotation"], 3)],
        "scale": [round(float(v), 4) for v in rng.uniform(1 - r["scale"], 1 + r["scale"], 3)],
        "translation_mm": [round(float(v), 4) for v in rng.uniform(-r["translation"], r["translation"], 3)],
        "bias": [round(float(v), 4) for v in rng.uniform(-r["bias"], r["bias"], 9)],
        "gamma": round(float(np.exp(rng.uniform(np.log(r["gamma"][0]), np.log(r["gamma"][1])))), 4),
        "noise_sd": round(float(rng.uniform(0, r["noise"] * 100)), 4),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def sampling_map(aug: Optional[dict[str, Any]], centre: np.ndarray, mirror_x: Optional[float]) -> np.ndarray:
    """4x4 map from output world points to source world points (mm).

    ``p -> c + R S (p - c) + t`` for an augmentation (identity without), preceded by the
    reflection ``x -> 2 m - x`` across the plane ``x = m`` when ``mirror_x`` is given.

    Args:
        aug: values of :func:`sample_augmentation` or None.
        centre: rotation centre ``c`` (mm), in output space.
        mirror_x: x of the mirror plane (mm) or None.

    Returns:
        The homogeneous ``(4, 4)`` matrix.
    """
    m = np.eye(4)
    if aug is not None:
        rs = _rotation(aug["rotation_deg"]) @ np.diag(aug["scale"])
        m[:3, :3] = rs
        m[:3, 3] = centre - rs @ centre + np.asarray(aug["translation_mm"])
    if mirror_x is not None:
        mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
        mirror[0, 3] = 2 * mirror_x
        m = mirror @ m
    return m


def antialias(vol: Volume, spacing: float) -> Volume:
    """Gaussian-smooth a float copy of ``vol`` before downsampling it to ``spacing`` mm.

    ``sigma = (factor - 1) / 2`` voxels per axis, ``factor`` = output / source spacing (no
    smoothing when upsampling).

    Args:
        vol: the source volume (image, or a binary mask to be interpolated linearly).
        spacing: output spacing (mm).

    Returns:
        A float32 volume on the same grid.
    """
    from scipy import ndimage

    zooms = np.linalg.norm(vol.affine[:3, :3], axis=0)
    sigma = np.maximum(spacing / zooms - 1, 0) / 2
    data = np.asarray(vol.data, dtype=np.float32)
    if np.any(sigma > 0):
        data = ndimage.gaussian_filter(data, sigma)
    return Volume(data, vol.affine, vol.source)


def resample(
    vol: Volume, shape: Sequence[int], out_affine: np.ndarray, world_map: np.ndarray, order: int
) -> np.ndarray:
    """Sample ``vol`` on an output grid through a world-space map, in one interpolation.

    Output voxel ``v`` takes the value of ``vol`` at voxel ``inv(A_src) W A_out v``
    (``scipy.ndimage.affine_transform``, zero outside the source). Smooth images with
    :func:`antialias` first when downsampling.

    Args:
        vol: the source volume.
        shape: output shape.
        out_affine: output voxel-to-world matrix.
        world_map: output world -> source world ``(4, 4)`` (see :func:`sampling_map`).
        order: spline order (0 nearest for labels, 1 linear).

    Returns:
        The sampled array (source dtype).

    Shape:
        ``vol.data`` ``(X, Y, Z)`` -> ``shape``.
    """
    from scipy import ndimage

    m = np.linalg.inv(vol.affine) @ world_map @ out_affine
    return ndimage.affine_transform(np.asarray(vol.data), m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape),
                                    order=order, mode="constant", cval=0)


def apply_intensity(img: np.ndarray, aug: dict[str, Any]) -> np.ndarray:
    """Bias field, gamma and Gaussian noise of an augmentation (image in percent units).

    Args:
        img: resampled image, 99.5th head percentile about 100.
        aug: values of :func:`sample_augmentation`.

    Returns:
        float32 image, clipped at 0.

    Shape:
        ``(X, Y, Z)`` -> ``(X, Y, Z)``.
    """
    axes = [np.linspace(-1, 1, n) for n in img.shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    log_field = sum(c * t for c, t in zip(aug["bias"], terms))
    out = np.clip(img, 0, None) * np.exp(log_field)
    out = 100.0 * (out / 100.0) ** aug["gamma"]
    noise = np.random.default_rng(aug["noise_seed"]).standard_normal(img.shape)
    return np.clip(out + aug["noise_sd"] * noise, 0, None).astype(np.float32)


# --------------------------------------------------------------------------- tasks


@dataclass
class CaseSpec:
    """One output case: which source, which grid, which transform."""

    name: str
    split: str
    subject: str
    augment: bool
    mirror_x: Optional[float] = None
    note: str = ""


def _write_case(
    out: Path, spec: CaseSpec, image_vol: Volume, label_vol: Volume, label_order: int, shape: Sequence[int],
    affine: np.ndarray, aug: Optional[dict[str, Any]], absolute: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resample, augment and write one case; return its datalist entry and its ``case_info``."""
    from volattack.data.io import write_nifti

    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    wmap = sampling_map(aug, centre, spec.mirror_x)
    img = resample(image_vol, shape, affine, wmap, order=1)
    if label_order == 0:
        lbl = resample(label_vol, shape, affine, wmap, order=0)
    else:  # binary mask, already smoothed by antialias(): linear, threshold 0.5
        lbl = resample(label_vol, shape, affine, wmap, order=1) >= 0.5
    img = apply_intensity(img, aug) if aug is not None else np.clip(img, 0, None).astype(np.float32)
    ipath = write_nifti(img, out / "images" / f"{spec.name}.nii.gz", affine)
    lpath = write_nifti(np.asarray(lbl, dtype=np.uint8), out / "labels" / f"{spec.name}.nii.gz", affine, dtype=np.uint8)
    entry = {
        "image": _common.entry_path(ipath, out, absolute),
        "label": _common.entry_path(lpath, out, absolute),
        "subject": spec.subject,
    }
    info = {"split": spec.split, "subject": spec.subject, "source": Path(image_vol.source).name,
            "mirrored": spec.mirror_x is not None, "augmentation": aug}
    if spec.note:
        info["note"] = spec.note
    return entry, info


def _rng(seed: int, task: str, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASKS.index(task), ("training", "validation", "test").index(split), i])


def _check_counts(n_train: int, n_val: int, n_test: int) -> None:
    for name, v, lo in (("n_train", n_train, 1), ("n_val", n_val, 0), ("n_test", n_test, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")


def make_extraction(
    out: Path, colin: dict[str, Any], mni: Optional[tuple[Volume, Volume]], *, spacing: float, seed: int,
    n_train: int, n_val: int, n_test: int, absolute: bool,
) -> Path:
    """Write the brain-extraction task (T1 head -> brain mask) and its datalist.

    Args:
        out: task folder (``images/``, ``labels/``, ``dataset.json``).
        colin: :func:`load_colin` output.
        mni: :func:`load_mni` output or None.
        spacing: output voxel size (mm).
        seed: augmentation seed.
        n_train: training cases (Colin27: 1 unaugmented + augmented).
        n_val: validation cases (augmented Colin27).
        n_test: test cases (MNI152: 1 unaugmented + augmented; else augmented Colin27).
        absolute: absolute datalist paths.

    Returns:
        The datalist path.
    """
    heads: dict[str, tuple[Volume, Volume]] = {"colin27": (colin["t1"], colin["mask"])}
    mni_info = None
    if mni is not None:
        t1, mask = mni
        data, scale = normalise_intensity(t1.data)
        binary = (np.asarray(mask.data) > 0).astype(np.uint8)
        heads["mni152"] = (Volume(data, t1.affine, t1.source), Volume(binary, mask.affine, mask.source))
        mni_info = {"t1": t1.source, "mask": mask.source, "intensity_scale": scale}
    specs = [CaseSpec(f"colin27_train{i:03d}", "training", "colin27", augment=i > 0) for i in range(n_train)]
    specs += [CaseSpec(f"colin27_val{i:03d}", "validation", "colin27", augment=True,
                       note="same head as training (model selection only)") for i in range(n_val)]
    if mni is not None:
        specs += [CaseSpec(f"mni152_test{i:03d}", "test", "mni152", augment=i > 0) for i in range(n_test)]
        test_note = "test = MNI152 NLin6Asym template head (from nimare), never seen in training"
    else:
        specs += [CaseSpec(f"colin27_test{i:03d}", "test", "colin27", augment=True,
                           note="same head as training: robustness to augmentation, not a new subject")
                  for i in range(n_test)]
        test_note = ("test = further augmentations of the Colin27 training head (MNI152 not available: "
                     "install nimare or pass --nimare): NOT an independent subject")
    cases: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    counters = {"training": 0, "validation": 0, "test": 0}
    case_info: dict[str, dict[str, Any]] = {}
    grids = {}
    for name, (t1, mask) in heads.items():
        lo, hi = world_bbox(t1.data > 10.0, t1.affine)
        grids[name] = grid(lo - 8.0, hi + 8.0, spacing)
    smoothed = {name: (antialias(t1, spacing), antialias(mask, spacing)) for name, (t1, mask) in heads.items()}
    for spec in _progress(specs, "brain_extraction"):
        i = counters[spec.split]
        counters[spec.split] += 1
        aug = None
        if spec.augment:
            aug = sample_augmentation(_rng(seed, "extraction", spec.split, i), AUG_RANGES["extraction"])
        t1, mask = smoothed[spec.subject]
        shape, aff = grids[spec.subject]
        entry, case_info[spec.name] = _write_case(out, spec, t1, mask, 1, shape, aff, aug, absolute)
        cases[spec.split].append(entry)
    meta = _common.assemble(
        name="brain_extraction",
        description=("T1-weighted head MRI -> brain mask. Training/validation: Colin27 (mricron-data ch2, mask "
                     "from ch2bet), case 0 unaugmented, others augmented (values in 'case_info'). "
                     + test_note + ". Intensities: 99.5th percentile of head voxels = 100."),
        labels={0: "background", 1: "brain"},
        cases_by_split=cases,
        absolute=absolute,
        seed=seed,
        split_note=test_note + "; validation shares the training head",
        extra={"modality": {"0": "T1w MRI"}, "spacing_mm": [spacing] * 3, "case_info": case_info,
               "intensity": {"unit": "percent of the 99.5th percentile of head voxels", "suggested_window": [0, 100]},
               "sources": {"colin27": {"t1": colin["t1"].source, "mask": colin["mask"].source,
                                       "intensity_scale": colin["scale"]}, "mni152": mni_info},
               "reference": "Holmes et al., JCAT 22(2), 1998 (Colin27); Fonov et al., NeuroImage 2011 / FSL (MNI152)",
               "licence": "mricron-data: BSD-3-clause (Debian package copyright); see nimare for MNI152 terms"},
    )
    return _common.write_datalist(out / "dataset.json", meta)


def make_parcellation(
    out: Path, colin: dict[str, Any], *, spacing: float, seed: int, n_train: int, n_val: int, n_test: int,
    absolute: bool, mirror: bool = True,
) -> Path:
    """Write the hemisphere-split lobe parcellation task and its datalist.

    Args:
        out: task folder.
        colin: :func:`load_colin` output.
        spacing: output voxel size (mm).
        seed: augmentation seed.
        n_train: left-hemisphere training crops (1 unaugmented + augmented).
        n_val: left-hemisphere validation crops (augmented).
        n_test: right-hemisphere test crops (1 unaugmented + augmented).
        absolute: absolute datalist paths.
        mirror: mirror the right hemisphere across the mid-sagittal plane.

    Returns:
        The datalist path.
    """
    mid = colin["midline_x"]
    left, right = colin["lobes_left"], colin["lobes_right"]
    brain = (left.data > 0) | (right.data > 0)
    lo, hi = world_bbox(brain, left.affine)
    margin = 6.0
    lo_l, hi_l = lo - margin, hi + margin
    # Left crop: x in [lo, mid]; right crop: x in [mid, hi], mirrored into [2 mid - hi, mid].
    width = max(mid - lo_l[0], hi_l[0] - mid)
    box_lo = np.array([mid - width, lo_l[1], lo_l[2]])
    box_hi = np.array([mid, hi_l[1], hi_l[2]])
    left_grid = grid(box_lo, box_hi, spacing)
    if mirror:
        right_grid = left_grid
    else:
        right_grid = grid(np.array([mid, lo_l[1], lo_l[2]]), np.array([mid + width, hi_l[1], hi_l[2]]), spacing)
    specs = [CaseSpec(f"colin27_left_train{i:03d}", "training", "colin27_left", augment=i > 0) for i in range(n_train)]
    specs += [CaseSpec(f"colin27_left_val{i:03d}", "validation", "colin27_left", augment=True,
                       note="same hemisphere as training (model selection only)") for i in range(n_val)]
    tag = "right_mirrored" if mirror else "right"
    specs += [CaseSpec(f"colin27_{tag}_test{i:03d}", "test", "colin27_right", augment=i > 0,
                       mirror_x=mid if mirror else None) for i in range(n_test)]
    cases: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    counters = {"training": 0, "validation": 0, "test": 0}
    case_info: dict[str, dict[str, Any]] = {}
    t1 = antialias(colin["t1"], spacing)
    for spec in _progress(specs, "brain_parcellation"):
        i = counters[spec.split]
        counters[spec.split] += 1
        aug = None
        if spec.augment:
            aug = sample_augmentation(_rng(seed, "parcellation", spec.split, i), AUG_RANGES["parcellation"])
        lobes = right if spec.subject == "colin27_right" else left
        shape, aff = right_grid if spec.subject == "colin27_right" else left_grid
        entry, case_info[spec.name] = _write_case(out, spec, t1, lobes, 0, shape, aff, aug, absolute)
        entry["hemisphere"] = "right" if spec.subject == "colin27_right" else "left"
        cases[spec.split].append(entry)
    split_note = ("by hemisphere of one subject: training/validation = left hemisphere of Colin27, test = right "
                  "hemisphere" + (f" mirrored across the mid-sagittal plane x = {mid:.1f} mm" if mirror else ""))
    meta = _common.assemble(
        name="brain_parcellation",
        description=("Colin27 T1 (mricron-data ch2, skull on) -> grey-matter lobes of one hemisphere, from the AAL "
                     "atlas merged into 7 classes (white matter, CSF and skull are background). " + split_note
                     + ". Validation shares the training hemisphere. Intensities: 99.5th percentile of "
                     "head voxels = 100."),
        labels=PARCELLATION_LABELS,
        cases_by_split=cases,
        absolute=absolute,
        seed=seed,
        split_note=split_note,
        extra={"modality": {"0": "T1w MRI"}, "spacing_mm": [spacing] * 3, "midline_x_mm": mid, "case_info": case_info,
               "lobes": {PARCELLATION_LABELS[k]: list(v) for k, v in LOBES.items()},
               "intensity": {"unit": "percent of the 99.5th percentile of head voxels", "suggested_window": [0, 100]},
               "reference": "Tzourio-Mazoyer et al., NeuroImage 15(1), 2002 (AAL); Holmes et al., JCAT 1998 (Colin27)",
               "licence": "mricron-data: BSD-3-clause (Debian package copyright)"},
    )
    return _common.write_datalist(out / "dataset.json", meta)


def _progress(items: list[CaseSpec], desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a volattack dependency
        return items
    return tqdm(items, desc=desc, disable=not logger.isEnabledFor(logging.INFO), leave=False)


def _inside_repository(out: Path) -> bool:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return False
    o = out.expanduser().resolve()
    return (o == repo or repo in o.parents) and not (o == repo / "data" or (repo / "data") in o.parents)


def prepare(
    out: Path,
    *,
    tasks: Sequence[str] = TASKS,
    mricron_dir: Path = MRICRON_DIR,
    nimare: Optional[Path] = None,
    spacing: float = 3.0,
    seed: int = 0,
    n_train: int = 8,
    n_val: int = 2,
    n_test: int = 4,
    absolute: bool = False,
    mirror: bool = True,
    use_mni: bool = True,
) -> list[Path]:
    """Write the requested brain tasks under ``out``.

    Args:
        out: output folder (``out/brain_extraction``, ``out/brain_parcellation``).
        tasks: subset of ``("extraction", "parcellation")``.
        mricron_dir: the ``mricron-data`` templates folder.
        nimare: where to find the MNI152 templates (see :func:`load_mni`); None: installed nimare.
        spacing: output voxel size in mm, in ``[1, 8]``.
        seed: augmentation seed.
        n_train: training cases per task.
        n_val: validation cases per task.
        n_test: test cases per task.
        absolute: absolute datalist paths.
        mirror: mirror right-hemisphere test crops (parcellation).
        use_mni: look for the MNI152 head at all.

    Returns:
        The datalist paths written.

    Raises:
        FileNotFoundError: atlas files missing (install mricron-data) or a bad ``--nimare``.
        ValueError: bad arguments (named) or an output folder inside the repository.
    """
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}.")
    if not (isinstance(spacing, (int, float)) and 1.0 <= spacing <= 8.0):
        raise ValueError(f"spacing must be in [1, 8] mm, got {spacing!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    _check_counts(n_train, n_val, n_test)
    if _inside_repository(out):
        raise ValueError(
            f"out {str(out)!r} is inside the volattack repository: atlas data must not be committed; "
            f"write under data/ (git-ignored) or outside the repository."
        )
    mricron_dir = Path(mricron_dir).expanduser()
    if not mricron_dir.is_dir():
        raise FileNotFoundError(f"mricron-data templates folder {str(mricron_dir)!r} not found: {INSTALL_HINT}.")
    colin = load_colin(mricron_dir)
    paths = []
    if "extraction" in tasks:
        mni = load_mni(nimare) if use_mni else None
        logger.info("brain extraction: test head %s", "MNI152" if mni else "Colin27 (augmented)")
        paths.append(make_extraction(Path(out) / "brain_extraction", colin, mni, spacing=float(spacing), seed=seed,
                                     n_train=n_train, n_val=n_val, n_test=n_test, absolute=absolute))
    if "parcellation" in tasks:
        paths.append(make_parcellation(Path(out) / "brain_parcellation", colin, spacing=float(spacing), seed=seed,
                                       n_train=n_train, n_val=n_val, n_test=n_test, absolute=absolute, mirror=mirror))
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", help="output folder (e.g. data/brain): OUT/brain_extraction, OUT/brain_parcellation")
    p.add_argument("--task", choices=[*TASKS, "both"], default="both", help="which task(s) to write")
    p.add_argument("--mricron-dir", default=str(MRICRON_DIR), help="mricron-data templates folder")
    p.add_argument("--nimare", default=None,
                   help="nimare wheel / package folder / folder with the MNI152 templates (default: installed nimare)")
    p.add_argument("--no-mni", action="store_true", help="do not use the MNI152 head even if available")
    p.add_argument("--spacing", type=float, default=3.0, help="output voxel size in mm")
    p.add_argument("--n-train", type=int, default=8, help="training cases per task")
    p.add_argument("--n-val", type=int, default=2, help="validation cases per task")
    p.add_argument("--n-test", type=int, default=4, help="test cases per task")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed")
    p.add_argument("--no-mirror", action="store_true", help="keep right-hemisphere test crops unmirrored")
    p.add_argument("--absolute", action="store_true", help="absolute paths in the datalists")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments and write the tasks; 0 on success, 1 when atlas files are missing or input is bad."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    tasks = TASKS if args.task == "both" else (args.task,)
    try:
        paths = prepare(
            Path(args.out), tasks=tasks, mricron_dir=Path(args.mricron_dir),
            nimare=None if args.nimare is None else Path(args.nimare), spacing=args.spacing, seed=args.seed,
            n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, absolute=args.absolute,
            mirror=not args.no_mirror, use_mni=not args.no_mni,
        )
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"prepare_brain: error: {e}\n")
        return 1
    for p in paths:
        sys.stdout.write(f"{p}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
