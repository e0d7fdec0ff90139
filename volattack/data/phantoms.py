"""Synthetic abdominal-CT phantoms with organ labels (numpy, written as NIfTI).

Each phantom is an axial stack through the upper abdomen in Hounsfield units (HU):

- air (-1000 HU) outside an elliptical body cross-section whose size varies along z;
- subcutaneous fat (about -100 HU), an abdominal-wall / retroperitoneal muscle layer
  (about 40 HU), and a visceral cavity filled with a bowel-and-mesentery texture (soft tissue
  around 25 HU, fat blobs, a few gas pockets), so that no single intensity threshold
  separates organs from the rest;
- a lumbar spine (vertebral bodies with cortical shell, intervertebral discs, spinal canal,
  posterior arch and spinous process; 250-700 HU), paraspinal and psoas muscles, aorta and
  inferior vena cava as context;
- four labelled organs built as smoothly deformed ellipsoids (random rotation and a
  low-order radial-harmonic perturbation of the surface, plus one global smooth displacement
  field): 1 liver (right upper quadrant, two lobes, about 60 HU), 2 spleen (left, posterior,
  about 45 HU), 3 left and 4 right kidney (paravertebral, cortex about 30 HU with a slightly
  darker medulla, wrapped in perirenal fat). Both kidneys share one intensity, so a model
  must use position to tell them apart; liver and spleen means differ by less than the
  noise.

The HU image is then textured (smooth correlated noise), blurred (partial-volume effect,
``scipy.ndimage.gaussian_filter``) and corrupted by white noise. Voxel spacing is
anisotropic (about 1.5 x 1.5 x 3.0 mm, jittered per case) and stored in a RAS affine.

Geometry is defined in normalised coordinates (in-plane: the half field of view; z: the half
stack height), so any grid size gives a complete abdomen; the physical size follows from the
spacing. Axis convention (RAS+): array axis 0 increases toward the patient's right, axis 1
toward anterior, axis 2 toward superior.

Everything is vectorised numpy (broadcast meshgrids), deterministic for a given seed
(``numpy.random.default_rng(seed)``); a 64 x 64 x 48 case takes well under a second. The
shapes and painting steps live in :mod:`volattack.data.anatomy`; this module validates, orders
the random draws and writes datasets.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from volattack.data.anatomy import (  # noqa: F401  (HU_MEANS is re-exported)
    HU_MEANS,
    case_intensities,
    paint_body,
    paint_organs,
    paint_spine,
    texture_blur_noise,
    warped_grid,
)
from volattack.data.io import atomic_write_bytes, write_nifti

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Label index -> organ name (MSD/BTCV-like).
CLASS_NAMES: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
}

#: Default voxel spacing in mm (x, y, z) before per-case jitter.
DEFAULT_SPACING: tuple[float, float, float] = (1.5, 1.5, 3.0)

GENERATOR_VERSION = 1


@dataclass
class Phantom:
    """One synthetic CT case.

    Attributes:
        image: ``(H, W, D)`` float32 intensities in HU.
        label: ``(H, W, D)`` uint8 class indices (see ``CLASS_NAMES``).
        affine: ``(4, 4)`` float64 voxel-to-world matrix, RAS+, mm.
        spacing: voxel spacing in mm per axis.
        seed: the seed it was generated from.
        params: the sampled case parameters (HU means, body size, noise levels) for replay
            and tests.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _check_size(size: Sequence[int], name: str = "size") -> tuple[int, int, int]:
    try:
        vals = tuple(int(s) for s in size)
        ok = len(vals) == 3 and all(float(a) == float(b) for a, b in zip(size, vals))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be 3 integers (H, W, D), got {size!r}.")
    if min(vals) < 16:
        raise ValueError(f"{name} must be >= 16 along every axis, got {tuple(size)}.")
    return vals  # type: ignore[return-value]


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        vals = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing!r}.")
    return vals  # type: ignore[return-value]


def _check_seed(seed: int, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _check_nonneg(name: str, value: float) -> float:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


# --------------------------------------------------------------------------- geometry


def phantom_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world affine of a phantom grid, centred on the world origin.

    Args:
        size: grid size ``(H, W, D)`` in voxels.
        spacing: voxel spacing in mm.

    Returns:
        ``(4, 4)`` float64 matrix ``diag(spacing)`` with translation ``-(size - 1) / 2 * spacing``.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    aff = np.diag(np.append(sp, 1.0))
    aff[:3, 3] = -(np.asarray(size, dtype=np.float64) - 1.0) / 2.0 * sp
    return aff


# --------------------------------------------------------------------------- generator


def generate_phantom(
    seed: int,
    size: Sequence[int] = (64, 64, 48),
    spacing: Optional[Sequence[float]] = None,
    *,
    noise_hu: float = 20.0,
    texture_hu: float = 10.0,
    texture_sigma: float = 1.5,
    blur_sigma: float = 0.7,
    hu_jitter: float = 6.0,
    size_jitter: float = 0.12,
    position_jitter: float = 0.05,
    rotation_jitter_deg: float = 12.0,
    shape_jitter: float = 0.12,
    warp: float = 0.04,
    visceral_fat: float = 0.3,
    gas: float = 0.02,
    perirenal_fat: bool = True,
    properitoneal_fat: bool = True,
) -> Phantom:
    """Generate one synthetic abdominal CT volume with liver/spleen/kidney labels.

    Every random choice comes from ``numpy.random.default_rng(seed)`` in a fixed order (the
    spacing jitter is drawn even for a given ``spacing``: a seed's anatomy ignores the spacing).

    Args:
        seed: non-negative integer seed.
        size: grid size ``(H, W, D)`` in voxels, each >= 16 (axes: right, anterior, superior).
        spacing: voxel spacing in mm; ``None`` samples about ``(1.5, 1.5, 3.0)`` jittered by
            +-10 % in-plane (same for x and y) and +-15 % along z, rounded to 0.01 mm.
        noise_hu: standard deviation (HU) of the white noise, scaled per case by U(0.75, 1.25).
        texture_hu: standard deviation (HU) of the smooth correlated texture inside the body.
        texture_sigma: correlation length of the texture in voxels (Gaussian sigma).
        blur_sigma: partial-volume Gaussian blur in voxels applied before the white noise.
        hu_jitter: standard deviation (HU) of the per-case organ mean intensities (clipped
            at +-2 standard deviations); both kidneys always share one mean.
        size_jitter, position_jitter, rotation_jitter_deg: uniform +- jitter of organ semi-axes
            (relative), centres (normalised units) and orientations (degrees).
        shape_jitter: amplitude of the radial-harmonic surface perturbation (relative radius).
        warp: amplitude (normalised units) of the global smooth displacement field.
        visceral_fat: fraction (0-1) of the visceral cavity that is mesenteric fat.
        gas: fraction (0-1) of the visceral cavity that is bowel gas.
        perirenal_fat: wrap the kidneys in a fat capsule (anatomical context).
        properitoneal_fat: a thin fat plane inside the muscular wall (organs touching it show a border).

    Returns:
        A ``Phantom`` with image (HU, float32), label (uint8), RAS affine and spacing (mm).

    Shape:
        image and label ``(H, W, D)`` = ``size``; affine ``(4, 4)``.

    Raises:
        ValueError: a bad ``seed``, ``size``, ``spacing`` or generator parameter (named).
    """
    seed = _check_seed(seed)
    shape = _check_size(size)
    jitter = dict(size_jitter=size_jitter, position_jitter=position_jitter,
                  rotation_jitter_deg=rotation_jitter_deg, shape_jitter=shape_jitter)
    _check_generator_params(noise_hu=noise_hu, texture_hu=texture_hu, texture_sigma=texture_sigma,
                            blur_sigma=blur_sigma, hu_jitter=hu_jitter, warp=warp, visceral_fat=visceral_fat,
                            gas=gas, **jitter)
    rng = np.random.default_rng(seed)  # the draws below happen in this fixed order
    sp = _case_spacing(rng, spacing)
    grid = warped_grid(rng, shape, sp, warp)
    hu, noise_case, texture_case = case_intensities(rng, hu_jitter, noise_hu, texture_hu)
    image, geom = paint_body(rng, grid, hu, visceral_fat=visceral_fat, gas=gas,
                             properitoneal_fat=properitoneal_fat)
    blocked = paint_spine(rng, image, grid, hu, geom)
    label = paint_organs(rng, image, grid, hu, geom, geom["cavity"] & ~blocked, perirenal_fat=perirenal_fat,
                         **jitter)
    image = texture_blur_noise(rng, image, geom["body"], texture_case=texture_case, texture_sigma=texture_sigma,
                               blur_sigma=blur_sigma, noise_case=noise_case)
    params = {
        "generator_version": GENERATOR_VERSION,
        "hu_means": {k: hu[k] for k in ("fat", "muscle", "bowel", "liver", "spleen", "kidney")},
        "noise_hu": noise_case, "texture_hu": texture_case,
        "body_semi_axes": (float(geom["ax0"]), float(geom["ay0"])),
    }
    return Phantom(image=image.astype(np.float32, copy=False), label=label, affine=phantom_affine(shape, sp),
                   spacing=tuple(float(s) for s in sp), seed=seed, params=params)  # type: ignore[arg-type]


def _check_generator_params(**values: float) -> None:
    """The numeric keywords of :func:`generate_phantom` (``ValueError`` naming the bad one)."""
    for name, val in values.items():
        _check_nonneg(name, val)
    for name in ("size_jitter", "shape_jitter"):
        if values[name] >= 0.5:
            raise ValueError(f"{name} must be in [0, 0.5), got {values[name]}.")
    for name in ("visceral_fat", "gas"):
        if not values[name] <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {values[name]}.")
    if values["visceral_fat"] + values["gas"] > 1.0:
        raise ValueError(f"visceral_fat + gas must be <= 1, got {values['visceral_fat']} + {values['gas']}.")


def _case_spacing(rng: np.random.Generator, spacing: Optional[Sequence[float]]) -> tuple[float, float, float]:
    """``spacing`` checked, or the default jittered (the jitter is drawn either way)."""
    jit_xy, jit_z = rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)
    if spacing is not None:
        return _check_spacing(spacing)
    return (
        round(DEFAULT_SPACING[0] * jit_xy, 2),
        round(DEFAULT_SPACING[1] * jit_xy, 2),
        round(DEFAULT_SPACING[2] * jit_z, 2),
    )


# --------------------------------------------------------------------------- dataset


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset generated with ``seed``.

    Derived with ``numpy.random.SeedSequence((seed, index))`` so that cases of one dataset
    differ and datasets with different seeds share no case.

    Args:
        seed: the dataset seed (>= 0).
        index: the case index (>= 0; training cases first, then validation, then test).

    Returns:
        A 32-bit non-negative integer seed.
    """
    return int(np.random.SeedSequence((_check_seed(seed), _check_seed(index, "index"))).generate_state(1)[0])


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def make_phantom_dataset(
    out_dir: PathLike,
    n: int,
    size: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    n_val: int = 2,
    n_test: int = 4,
    spacing: Optional[Sequence[float]] = None,
    phantom_kwargs: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> Path:
    """Write a phantom dataset (NIfTI volumes and an MSD-style ``dataset.json``).

    Files: ``out_dir/imagesTr/case_000.nii.gz`` (float32 HU) and
    ``out_dir/labelsTr/case_000.nii.gz`` (uint8), cases ``0 .. n-1`` for training, the next
    ``n_val`` for validation and the next ``n_test`` for testing (all with labels). Case ``i``
    uses ``case_seed(seed, i)``. The JSON lists ``training``/``validation``/``test`` entries
    ``{"image": "imagesTr/...", "label": "labelsTr/..."}`` relative to ``out_dir``, plus
    ``name``, ``description``, ``modality``, ``labels``, ``numTraining`` and the generator
    settings. Re-running with the same arguments reproduces byte-identical files; every file
    is written atomically.

    Args:
        out_dir: output folder (created).
        n: number of training cases (>= 1).
        size: grid size ``(H, W, D)``, each >= 16.
        seed: dataset seed (>= 0).
        n_val: number of validation cases (>= 0).
        n_test: number of test cases (>= 0).
        spacing: fixed voxel spacing in mm, or ``None`` for the per-case jittered default.
        phantom_kwargs: extra keyword arguments of ``generate_phantom`` (``noise_hu``,
            ``blur_sigma``, ...), recorded in the JSON.

    Returns:
        Path of ``dataset.json``.

    Raises:
        ValueError: a bad ``n``, ``n_val``, ``n_test``, ``size``, ``seed``, ``spacing`` or
            phantom keyword (named).
    """
    from tqdm.auto import tqdm

    n, n_val, n_test = _check_count("n", n, 1), _check_count("n_val", n_val, 0), _check_count("n_test", n_test, 0)
    size = _check_size(size)
    seed = _check_seed(seed)
    if spacing is not None:
        spacing = _check_spacing(spacing)
    kwargs = _check_phantom_kwargs(phantom_kwargs, spacing)

    out = Path(out_dir).expanduser()
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    total = n + n_val + n_test
    width = max(3, len(str(total - 1)))
    entries: list[dict[str, str]] = []
    for i in tqdm(range(total), desc="phantoms", unit="case", disable=not progress or total < 4, leave=False):
        ph = generate_phantom(case_seed(seed, i), size, spacing, **kwargs)
        name = f"case_{i:0{width}d}.nii.gz"
        write_nifti(ph.image, out / "imagesTr" / name, ph.affine, dtype=np.float32)
        write_nifti(ph.label, out / "labelsTr" / name, ph.affine, dtype=np.uint8)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})

    generator = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": list(size),
        "spacing": None if spacing is None else list(spacing),
        "phantom_kwargs": kwargs,
    }
    meta = _dataset_json(entries, n, n_val, n_test, generator)
    path = out / "dataset.json"
    atomic_write_bytes((json.dumps(meta, indent=2) + "\n").encode("utf-8"), path, suffix=".json")
    logger.info("wrote %d phantom cases (%d/%d/%d) to %s", total, n, n_val, n_test, out)
    return path


def _check_phantom_kwargs(phantom_kwargs: Optional[Mapping[str, Any]], spacing: Any) -> dict[str, Any]:
    """Known :func:`generate_phantom` keywords, validated once on a tiny grid before any write."""
    kwargs = dict(phantom_kwargs or {})
    bad = sorted(set(kwargs) - set(_PHANTOM_KEYWORDS))
    if bad:
        raise ValueError(
            f"phantom_kwargs has unknown keys {bad}; valid keys: {', '.join(_PHANTOM_KEYWORDS)}."
        )
    if kwargs:
        generate_phantom(0, (16, 16, 16), spacing, **kwargs)
    return kwargs


def _dataset_json(
    entries: list[dict[str, str]], n: int, n_val: int, n_test: int, generator: dict[str, Any]
) -> dict[str, Any]:
    """The MSD-style ``dataset.json`` of a phantom dataset (splits in order: train, val, test)."""
    return {
        "name": "volattack-phantoms",
        "description": "Synthetic abdominal CT phantoms (HU) with liver, spleen and kidney labels.",
        "reference": "volattack.data.phantoms.generate_phantom",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in CLASS_NAMES.items()},
        "numTraining": n,
        "numValidation": n_val,
        "numTest": n_test,
        "generator": generator,
        "training": entries[:n],
        "validation": entries[n : n + n_val],
        "test": entries[n + n_val :],
    }


_PHANTOM_KEYWORDS: tuple[str, ...] = (
    "noise_hu",
    "texture_hu",
    "texture_sigma",
    "blur_sigma",
    "hu_jitter",
    "size_jitter",
    "position_jitter",
    "rotation_jitter_deg",
    "shape_jitter",
    "warp",
    "visceral_fat",
    "gas",
    "perirenal_fat",
    "properitoneal_fat",
)
