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
(``numpy.random.default_rng(seed)``); a 64 x 64 x 48 case takes well under a second.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

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

#: Target mean intensities in HU (jittered per case): a portal-venous contrast-enhanced
#: abdominal CT, the phase of BTCV/Synapse (enhanced liver ~110, spleen ~120, renal cortex
#: ~180 with darker medulla, aorta ~160, muscle ~55). Liver and spleen overlap within the
#: noise and both kidneys share one intensity, so a model needs shape and position.
HU_MEANS: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 55.0,
    "bowel": 35.0,
    "gas": -900.0,
    "liver": 110.0,
    "spleen": 120.0,
    "kidney": 180.0,
    "medulla_delta": -40.0,
    "vessel": 160.0,
    "csf": 10.0,
    "disc": 90.0,
    "bone_cancellous": 250.0,
    "bone_cortical": 700.0,
    "bone_posterior": 500.0,
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


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` (angles in radians)."""
    cx, sx = math.cos(rx), math.sin(rx)
    cy, sy = math.cos(ry), math.sin(ry)
    cz, sz = math.cos(rz), math.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclass
class _Blob:
    """A deformed ellipsoid: centre, semi-axes, rotation and radial harmonics."""

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    dirs: np.ndarray
    freqs: np.ndarray
    phases: np.ndarray
    amps: np.ndarray

    def level(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        """Normalised radius divided by the perturbed surface radius (inside where <= 1)."""
        dx, dy, dz = px - self.center[0], py - self.center[1], pz - self.center[2]
        r = self.rot
        qx = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / self.semi[0]
        qy = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / self.semi[1]
        qz = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / self.semi[2]
        rad = np.sqrt(qx * qx + qy * qy + qz * qz)
        inv = 1.0 / np.maximum(rad, 1e-6)
        surf = np.ones_like(rad)
        for d, w, ph, a in zip(self.dirs, self.freqs, self.phases, self.amps):
            surf += a * np.cos(w * (d[0] * qx + d[1] * qy + d[2] * qz) * inv + ph)
        return rad / np.maximum(surf, 0.3)


def _make_blob(
    rng: np.random.Generator,
    center: Sequence[float],
    semi: Sequence[float],
    angles_deg: Sequence[float],
    size_jitter: float,
    position_jitter: float,
    rotation_jitter_deg: float,
    shape_jitter: float,
    n_harmonics: int = 3,
) -> _Blob:
    c = np.asarray(center, float) + rng.uniform(-1, 1, 3) * position_jitter * np.array([1, 1, 1.5])
    s = np.asarray(semi, float) * (1.0 + rng.uniform(-1, 1, 3) * size_jitter)
    ang = np.deg2rad(np.asarray(angles_deg, float) + rng.uniform(-1, 1, 3) * rotation_jitter_deg)
    return _Blob(
        center=c,
        semi=s,
        rot=_rotation(*ang),
        dirs=_unit_vectors(rng, n_harmonics),
        freqs=rng.uniform(1.5, 3.5, n_harmonics),
        phases=rng.uniform(0, 2 * math.pi, n_harmonics),
        amps=rng.uniform(-1, 1, n_harmonics) * shape_jitter / math.sqrt(n_harmonics),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-correlated noise with unit standard deviation (float32)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma, mode="wrap")
    std = float(n.std())
    return n / (std if std > 0 else 1.0)


def _normal_quantile(p: float) -> float:
    """Standard-normal quantile with the end points mapped to -inf / +inf."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return NormalDist().inv_cdf(p)


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

    All random choices come from ``numpy.random.default_rng(seed)`` and are drawn in a fixed
    order (the spacing jitter is drawn even when ``spacing`` is given, so the anatomy of a
    seed does not depend on the spacing).

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
        size_jitter: relative jitter (uniform +-) of organ semi-axes.
        position_jitter: jitter (uniform +-, in normalised units) of organ centres.
        rotation_jitter_deg: jitter (uniform +-, degrees) of organ orientations.
        shape_jitter: amplitude of the radial-harmonic surface perturbation (relative radius).
        warp: amplitude (normalised units) of the global smooth displacement field.
        visceral_fat: fraction (0-1) of the visceral cavity that is mesenteric fat.
        gas: fraction (0-1) of the visceral cavity that is bowel gas.
        perirenal_fat: wrap the kidneys in a fat capsule (anatomical context).
        properitoneal_fat: a thin fat plane between the muscular wall and the visceral
            cavity, so that organs touching the wall have a visible border.

    Returns:
        A ``Phantom`` with image (HU, float32), label (uint8), RAS affine and spacing (mm).

    Shape:
        image and label ``(H, W, D)`` = ``size``; affine ``(4, 4)``.

    Raises:
        ValueError: a bad ``seed``, ``size``, ``spacing`` or generator parameter (named).
    """
    seed = _check_seed(seed)
    H, W, D = _check_size(size)
    for name, val in (
        ("noise_hu", noise_hu),
        ("texture_hu", texture_hu),
        ("texture_sigma", texture_sigma),
        ("blur_sigma", blur_sigma),
        ("hu_jitter", hu_jitter),
        ("size_jitter", size_jitter),
        ("position_jitter", position_jitter),
        ("rotation_jitter_deg", rotation_jitter_deg),
        ("shape_jitter", shape_jitter),
        ("warp", warp),
    ):
        _check_nonneg(name, val)
    if size_jitter >= 0.5:
        raise ValueError(f"size_jitter must be in [0, 0.5), got {size_jitter}.")
    if shape_jitter >= 0.5:
        raise ValueError(f"shape_jitter must be in [0, 0.5), got {shape_jitter}.")
    for name, val in (("visceral_fat", visceral_fat), ("gas", gas)):
        if not (_check_nonneg(name, val) <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {val}.")
    if visceral_fat + gas > 1.0:
        raise ValueError(f"visceral_fat + gas must be <= 1, got {visceral_fat} + {gas}.")

    rng = np.random.default_rng(seed)
    shape = (H, W, D)

    # ---- spacing and affine
    jit_xy, jit_z = rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)
    if spacing is None:
        sp = (
            round(DEFAULT_SPACING[0] * jit_xy, 2),
            round(DEFAULT_SPACING[1] * jit_xy, 2),
            round(DEFAULT_SPACING[2] * jit_z, 2),
        )
    else:
        sp = _check_spacing(spacing)
    affine = phantom_affine(shape, sp)

    # ---- normalised coordinates (in-plane by the half field of view, z by the half height)
    half = 0.5 * min(H * sp[0], W * sp[1])
    gx = ((np.arange(H, dtype=np.float32) - (H - 1) / 2.0) * sp[0] / half)[:, None, None]
    gy = ((np.arange(W, dtype=np.float32) - (W - 1) / 2.0) * sp[1] / half)[None, :, None]
    gz = ((np.arange(D, dtype=np.float32) - (D - 1) / 2.0) / ((D - 1) / 2.0))[None, None, :]
    px, py, pz = np.broadcast_arrays(gx, gy, gz)
    # global smooth warp: a sum of low-frequency plane waves per axis
    disp = []
    for _ in range(3):
        d = np.zeros(shape, np.float32)
        for k_vec, ph in zip(rng.uniform(-2.0, 2.0, (3, 3)), rng.uniform(0, 2 * math.pi, 3)):
            d += np.sin(k_vec[0] * gx + k_vec[1] * gy + k_vec[2] * gz + ph).astype(np.float32)
        disp.append(d * (warp / math.sqrt(3.0)))
    px, py, pz = px + disp[0], py + disp[1], pz + disp[2]

    # ---- per-case intensities
    def jit(mean: float, scale: float = 1.0) -> float:
        return float(mean + np.clip(rng.normal(0.0, 1.0), -2.0, 2.0) * hu_jitter * scale)

    hu = dict(HU_MEANS)
    hu["fat"] = jit(HU_MEANS["fat"], 1.5)
    hu["muscle"] = jit(HU_MEANS["muscle"], 0.7)
    hu["bowel"] = jit(HU_MEANS["bowel"])
    hu["liver"] = jit(HU_MEANS["liver"])
    hu["spleen"] = jit(HU_MEANS["spleen"])
    hu["kidney"] = jit(HU_MEANS["kidney"])
    noise_case = noise_hu * rng.uniform(0.75, 1.25)
    texture_case = texture_hu * rng.uniform(0.75, 1.25)

    # ---- body: ellipse varying along z, subcutaneous fat, muscular wall, visceral cavity
    ax0 = rng.uniform(0.80, 0.93)
    ay0 = ax0 * rng.uniform(0.70, 0.80)
    cy = rng.uniform(-0.06, 0.02)
    zf, zph = rng.uniform(0.5, 1.2, 2), rng.uniform(0, 2 * math.pi, 2)
    ax = ax0 * (1.0 + 0.05 * np.sin(zf[0] * math.pi * pz + zph[0]))
    ay = ay0 * (1.0 + 0.05 * np.sin(zf[1] * math.pi * pz + zph[1]))
    ay_eff = np.where(py < cy, 0.92 * ay, ay)  # flatter back
    t_fat = rng.uniform(0.05, 0.11)
    t_wall = rng.uniform(0.035, 0.055)
    t_pfat = rng.uniform(0.02, 0.035)  # always drawn: the flag must not shift the stream
    t_pfat = t_pfat if properitoneal_fat else 0.0
    yy = py - cy

    def ellipse(shrink: float) -> np.ndarray:
        return (px / (ax - shrink)) ** 2 + (yy / (ay_eff - shrink)) ** 2 <= 1.0

    body = ellipse(0.0)
    inner = ellipse(t_fat)
    lining = ellipse(t_fat + t_wall)  # inside the muscular wall
    cavity = ellipse(t_fat + t_wall + t_pfat)
    axc, ayc = ax0 - t_fat - t_wall - t_pfat, ay0 - t_fat - t_wall - t_pfat  # at mid height
    sc = 0.5 * (axc + ayc)

    image = np.full(shape, HU_MEANS["air"], dtype=np.float32)
    image[body] = hu["fat"]
    image[inner] = hu["muscle"]
    image[lining] = hu["fat"]  # properitoneal fat plane (cavity painted over it below)

    # visceral content: bowel soft tissue with fat blobs and gas pockets
    blob = _smooth_noise(rng, shape, sigma=max(1.2, min(H, W) / 28.0))
    t_fat_q = _normal_quantile(1.0 - visceral_fat)
    t_gas_q = _normal_quantile(gas)
    image[cavity] = hu["bowel"]
    image[cavity & (blob > t_fat_q)] = hu["fat"]
    image[cavity & (blob < t_gas_q) & (py > cy - 0.3 * ayc)] = HU_MEANS["gas"]

    # ---- spine and retroperitoneal muscles (context, label 0)
    rv = sc * rng.uniform(0.20, 0.25)  # vertebral body radius
    vx = rng.uniform(-0.02, 0.02)
    vy = cy - ayc * rng.uniform(0.55, 0.62) + 0.04 * pz**2
    dxs, dys = px - vx, py - vy
    r_vb = np.sqrt((dxs / (1.1 * rv)) ** 2 + (dys / rv) ** 2)
    period, phase = rng.uniform(0.42, 0.55), rng.uniform(0, 1)
    disc = np.mod(pz / period + phase, 1.0) < 0.2
    canal_y = vy - rv - 0.45 * rv
    r_canal = np.sqrt((dxs / (0.45 * rv)) ** 2 + ((py - canal_y) / (0.4 * rv)) ** 2)
    arch = (np.sqrt((dxs / (0.8 * rv)) ** 2 + ((py - canal_y) / (0.75 * rv)) ** 2) <= 1.0) & ~disc
    spinous = ((dxs / (0.18 * rv)) ** 2 + ((py - (canal_y - 1.1 * rv)) / (0.6 * rv)) ** 2 <= 1.0) & ~disc
    paraspinal = (
        ((np.abs(dxs) - 1.0 * rv) / (0.85 * rv)) ** 2 + ((py - (canal_y - 0.7 * rv)) / (0.8 * rv)) ** 2
    ) <= 1.0
    psoas_r = rv * (0.25 + 0.35 * np.clip(0.6 - pz, 0.0, 1.6) / 1.6)
    psoas = ((np.abs(dxs) - 1.35 * rv) ** 2 + (dys - 0.1 * rv) ** 2) <= psoas_r**2
    aorta = ((dxs + 0.55 * rv) ** 2 + (py - (vy + 1.45 * rv)) ** 2) <= (0.42 * rv) ** 2
    ivc = ((dxs - 0.75 * rv) / (0.5 * rv)) ** 2 + ((py - (vy + 1.4 * rv)) / (0.35 * rv)) ** 2 <= 1.0
    inside = inner
    image[paraspinal & inside] = hu["muscle"] + 8.0
    image[psoas & inside] = hu["muscle"] + 5.0
    image[(aorta | ivc) & inside] = HU_MEANS["vessel"]
    vb = r_vb <= 1.0
    image[arch & inside] = HU_MEANS["bone_posterior"]
    image[spinous & inside] = HU_MEANS["bone_posterior"]
    image[(r_canal <= 1.0) & inside] = HU_MEANS["csf"]
    image[vb & inside] = np.where(disc, HU_MEANS["disc"], HU_MEANS["bone_cancellous"])[vb & inside]
    image[vb & (r_vb > 0.8) & ~disc & inside] = HU_MEANS["bone_cortical"]
    blocked = vb | arch | spinous | (r_canal <= 1.0) | paraspinal | psoas | aorta | ivc

    # ---- organs (cavity units: u = x / axc, v = (y - cy) / ayc)
    def at(u: float, v: float, z: float) -> tuple[float, float, float]:
        return (u * axc, cy + v * ayc, z)

    kw = dict(
        size_jitter=size_jitter,
        position_jitter=position_jitter,
        rotation_jitter_deg=rotation_jitter_deg,
        shape_jitter=shape_jitter,
    )
    kid_semi = (0.23 * axc, 0.30 * ayc, 0.36)
    kid_left = _make_blob(rng, at(-0.57, -0.50, 0.02), kid_semi, (-12.0, 0.0, -25.0), **kw)
    kid_right = _make_blob(rng, at(0.57, -0.52, -0.12), kid_semi, (-12.0, 0.0, 25.0), **kw)
    spleen = _make_blob(rng, at(-0.64, -0.46, 0.45), (0.24 * axc, 0.46 * ayc, 0.32), (0.0, 0.0, -35.0), **kw)
    liver_r = _make_blob(rng, at(0.45, 0.02, 0.35), (0.52 * axc, 0.80 * ayc, 0.55), (0.0, 0.0, 0.0), **kw)
    liver_l = _make_blob(rng, at(-0.02, 0.45, 0.50), (0.45 * axc, 0.28 * ayc, 0.30), (0.0, 0.0, 15.0), **kw)

    allowed = cavity & ~blocked
    label = np.zeros(shape, dtype=np.uint8)

    lv_left, lv_right = kid_left.level(px, py, pz), kid_right.level(px, py, pz)
    if perirenal_fat:
        capsule = ((lv_left <= 1.35) | (lv_right <= 1.35)) & allowed
        image[capsule] = hu["fat"]
    # kidneys first, then spleen, then liver; each only where nothing is painted yet
    for lv, cls in ((lv_left, 3), (lv_right, 4)):
        m = (lv <= 1.0) & allowed & (label == 0)
        label[m] = cls
        image[m] = hu["kidney"]
        image[m & (lv <= 0.55)] = hu["kidney"] + HU_MEANS["medulla_delta"]
    m = (spleen.level(px, py, pz) <= 1.0) & allowed & (label == 0)
    label[m] = 2
    image[m] = hu["spleen"]
    m = ((liver_r.level(px, py, pz) <= 1.0) | (liver_l.level(px, py, pz) <= 1.0)) & allowed & (label == 0)
    label[m] = 1
    image[m] = hu["liver"]

    # ---- texture, partial-volume blur, white noise
    texture = _smooth_noise(rng, shape, texture_sigma)  # drawn even at 0 HU: same stream
    image += np.where(body, np.float32(texture_case), np.float32(0.0)) * texture
    if blur_sigma > 0:
        image = ndimage.gaussian_filter(image, sigma=blur_sigma, mode="nearest")
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_case)
    np.clip(image, -1024.0, 3071.0, out=image)

    params = {
        "generator_version": GENERATOR_VERSION,
        "hu_means": {k: hu[k] for k in ("fat", "muscle", "bowel", "liver", "spleen", "kidney")},
        "noise_hu": float(noise_case),
        "texture_hu": float(texture_case),
        "body_semi_axes": (float(ax0), float(ay0)),
    }
    return Phantom(
        image=image.astype(np.float32, copy=False),
        label=label,
        affine=affine,
        spacing=tuple(float(s) for s in sp),  # type: ignore[arg-type]
        seed=seed,
        params=params,
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

    n = _check_count("n", n, 1)
    n_val = _check_count("n_val", n_val, 0)
    n_test = _check_count("n_test", n_test, 0)
    size = _check_size(size)
    seed = _check_seed(seed)
    if spacing is not None:
        spacing = _check_spacing(spacing)
    kwargs = dict(phantom_kwargs or {})
    bad = sorted(set(kwargs) - set(_PHANTOM_KEYWORDS))
    if bad:
        raise ValueError(
            f"phantom_kwargs has unknown keys {bad}; valid keys: {', '.join(_PHANTOM_KEYWORDS)}."
        )
    if kwargs:  # validate once, cheaply, before writing anything
        generate_phantom(0, (16, 16, 16), spacing, **kwargs)

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

    meta = {
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
        "generator": {
            "version": GENERATOR_VERSION,
            "seed": seed,
            "size": list(size),
            "spacing": None if spacing is None else list(spacing),
            "phantom_kwargs": kwargs,
        },
        "training": entries[:n],
        "validation": entries[n : n + n_val],
        "test": entries[n + n_val :],
    }
    path = out / "dataset.json"
    atomic_write_bytes((json.dumps(meta, indent=2) + "\n").encode("utf-8"), path, suffix=".json")
    logger.info("wrote %d phantom cases (%d/%d/%d) to %s", total, n, n_val, n_test, out)
    return path


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
