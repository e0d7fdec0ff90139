"""Shapes and intensities of the synthetic abdominal-CT phantoms (numpy only).

The building blocks of :func:`volattack.data.phantoms.generate_phantom`: deformed ellipsoids
(:class:`Blob`), smooth noise, the normalised coordinate grid with its global warp, and the
painting steps (body wall and visceral cavity, spine and retroperitoneum, organs, texture and
noise). Each step draws from the caller's ``numpy.random.Generator`` in a fixed order; the
order is part of the phantoms' reproducibility (a seed gives byte-identical volumes), so a
change here must keep it or bump ``GENERATOR_VERSION``.

Coordinates are normalised (in-plane by the half field of view, z by the half stack height);
axes follow RAS+ (axis 0 toward the patient's right, 1 anterior, 2 superior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

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

Grid = tuple[np.ndarray, np.ndarray, np.ndarray]


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
class Blob:
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


def make_blob(
    rng: np.random.Generator,
    center: Sequence[float],
    semi: Sequence[float],
    angles_deg: Sequence[float],
    size_jitter: float,
    position_jitter: float,
    rotation_jitter_deg: float,
    shape_jitter: float,
    n_harmonics: int = 3,
) -> Blob:
    """A randomly jittered :class:`Blob` around ``center``/``semi``/``angles_deg``."""
    c = np.asarray(center, float) + rng.uniform(-1, 1, 3) * position_jitter * np.array([1, 1, 1.5])
    s = np.asarray(semi, float) * (1.0 + rng.uniform(-1, 1, 3) * size_jitter)
    ang = np.deg2rad(np.asarray(angles_deg, float) + rng.uniform(-1, 1, 3) * rotation_jitter_deg)
    return Blob(
        center=c,
        semi=s,
        rot=_rotation(*ang),
        dirs=_unit_vectors(rng, n_harmonics),
        freqs=rng.uniform(1.5, 3.5, n_harmonics),
        phases=rng.uniform(0, 2 * math.pi, n_harmonics),
        amps=rng.uniform(-1, 1, n_harmonics) * shape_jitter / math.sqrt(n_harmonics),
    )


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
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


def warped_grid(rng: np.random.Generator, shape: tuple[int, int, int], sp: Sequence[float], warp: float) -> Grid:
    """Normalised coordinates ``(px, py, pz)`` of every voxel, displaced by a global smooth warp
    (a sum of low-frequency plane waves per axis, amplitude ``warp``).

    Shape:
        three ``shape`` float32 arrays.
    """
    H, W, D = shape
    half = 0.5 * min(H * sp[0], W * sp[1])
    gx = ((np.arange(H, dtype=np.float32) - (H - 1) / 2.0) * sp[0] / half)[:, None, None]
    gy = ((np.arange(W, dtype=np.float32) - (W - 1) / 2.0) * sp[1] / half)[None, :, None]
    gz = ((np.arange(D, dtype=np.float32) - (D - 1) / 2.0) / ((D - 1) / 2.0))[None, None, :]
    px, py, pz = np.broadcast_arrays(gx, gy, gz)
    disp = []
    for _ in range(3):
        d = np.zeros(shape, np.float32)
        for k_vec, ph in zip(rng.uniform(-2.0, 2.0, (3, 3)), rng.uniform(0, 2 * math.pi, 3)):
            d += np.sin(k_vec[0] * gx + k_vec[1] * gy + k_vec[2] * gz + ph).astype(np.float32)
        disp.append(d * (warp / math.sqrt(3.0)))
    return px + disp[0], py + disp[1], pz + disp[2]


def case_intensities(
    rng: np.random.Generator, hu_jitter: float, noise_hu: float, texture_hu: float
) -> tuple[dict[str, float], float, float]:
    """Per-case HU means (jittered, clipped at +-2 sd; both kidneys share one), and the case's
    white-noise and texture standard deviations (scaled by U(0.75, 1.25))."""

    def jit(mean: float, scale: float = 1.0) -> float:
        return float(mean + np.clip(rng.normal(0.0, 1.0), -2.0, 2.0) * hu_jitter * scale)

    hu = dict(HU_MEANS)
    hu["fat"] = jit(HU_MEANS["fat"], 1.5)
    hu["muscle"] = jit(HU_MEANS["muscle"], 0.7)
    for organ in ("bowel", "liver", "spleen", "kidney"):
        hu[organ] = jit(HU_MEANS[organ])
    noise_case = noise_hu * rng.uniform(0.75, 1.25)
    texture_case = texture_hu * rng.uniform(0.75, 1.25)
    return hu, float(noise_case), float(texture_case)


def paint_body(
    rng: np.random.Generator, grid: Grid, hu: dict[str, float], *, visceral_fat: float, gas: float,
    properitoneal_fat: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Air, the body ellipse (varying along z), subcutaneous fat, the muscular wall, the
    optional properitoneal fat plane and the visceral cavity (bowel with fat blobs and gas).

    Returns:
        The HU image (float32) and the body geometry: masks ``body``, ``inner`` (inside the
        fat), ``cavity``; ``cy`` (body centre y), ``axc``/``ayc`` (cavity semi-axes at mid
        height), ``ax0``/``ay0`` (body semi-axes).
    """
    px, py, pz = grid
    shape = px.shape
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

    image = np.full(shape, HU_MEANS["air"], dtype=np.float32)
    image[body] = hu["fat"]
    image[inner] = hu["muscle"]
    image[lining] = hu["fat"]  # properitoneal fat plane (cavity painted over it below)

    blob = smooth_noise(rng, shape, sigma=max(1.2, min(shape[0], shape[1]) / 28.0))
    image[cavity] = hu["bowel"]
    image[cavity & (blob > _normal_quantile(1.0 - visceral_fat))] = hu["fat"]
    image[cavity & (blob < _normal_quantile(gas)) & (py > cy - 0.3 * ayc)] = HU_MEANS["gas"]
    geom = {"body": body, "inner": inner, "cavity": cavity, "cy": cy, "axc": axc, "ayc": ayc,
            "ax0": ax0, "ay0": ay0}
    return image, geom


def paint_spine(
    rng: np.random.Generator, image: np.ndarray, grid: Grid, hu: dict[str, float], geom: dict[str, Any]
) -> np.ndarray:
    """Lumbar spine (bodies with cortical shell, discs, canal, arch, spinous process), paraspinal
    and psoas muscles, aorta and IVC, painted inside the wall (context, label 0).

    Returns:
        The mask of everything painted here (organs are kept out of it).
    """
    px, py, pz = grid
    cy, ayc = geom["cy"], geom["ayc"]
    sc = 0.5 * (geom["axc"] + ayc)
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
    inside = geom["inner"]
    image[paraspinal & inside] = hu["muscle"] + 8.0
    image[psoas & inside] = hu["muscle"] + 5.0
    image[(aorta | ivc) & inside] = HU_MEANS["vessel"]
    vb = r_vb <= 1.0
    image[arch & inside] = HU_MEANS["bone_posterior"]
    image[spinous & inside] = HU_MEANS["bone_posterior"]
    image[(r_canal <= 1.0) & inside] = HU_MEANS["csf"]
    image[vb & inside] = np.where(disc, HU_MEANS["disc"], HU_MEANS["bone_cancellous"])[vb & inside]
    image[vb & (r_vb > 0.8) & ~disc & inside] = HU_MEANS["bone_cortical"]
    return vb | arch | spinous | (r_canal <= 1.0) | paraspinal | psoas | aorta | ivc


def paint_organs(
    rng: np.random.Generator, image: np.ndarray, grid: Grid, hu: dict[str, float], geom: dict[str, Any],
    allowed: np.ndarray, *, perirenal_fat: bool, **jitter: float,
) -> np.ndarray:
    """Kidneys (3 left, 4 right; cortex and medulla, optional perirenal fat), spleen (2) and liver
    (1, two lobes) as deformed ellipsoids placed in cavity units, each only where ``allowed``
    and nothing is painted yet. ``jitter``: ``size_jitter``, ``position_jitter``,
    ``rotation_jitter_deg``, ``shape_jitter`` of :func:`make_blob`.

    Returns:
        The label volume (uint8).
    """
    px, py, pz = grid
    axc, ayc, cy = geom["axc"], geom["ayc"], geom["cy"]

    def at(u: float, v: float, z: float) -> tuple[float, float, float]:
        return (u * axc, cy + v * ayc, z)

    kid_semi = (0.23 * axc, 0.30 * ayc, 0.36)
    kid_left = make_blob(rng, at(-0.57, -0.50, 0.02), kid_semi, (-12.0, 0.0, -25.0), **jitter)
    kid_right = make_blob(rng, at(0.57, -0.52, -0.12), kid_semi, (-12.0, 0.0, 25.0), **jitter)
    spleen = make_blob(rng, at(-0.64, -0.46, 0.45), (0.24 * axc, 0.46 * ayc, 0.32), (0.0, 0.0, -35.0), **jitter)
    liver_r = make_blob(rng, at(0.45, 0.02, 0.35), (0.52 * axc, 0.80 * ayc, 0.55), (0.0, 0.0, 0.0), **jitter)
    liver_l = make_blob(rng, at(-0.02, 0.45, 0.50), (0.45 * axc, 0.28 * ayc, 0.30), (0.0, 0.0, 15.0), **jitter)

    label = np.zeros(image.shape, dtype=np.uint8)
    lv_left, lv_right = kid_left.level(px, py, pz), kid_right.level(px, py, pz)
    if perirenal_fat:
        image[((lv_left <= 1.35) | (lv_right <= 1.35)) & allowed] = hu["fat"]
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
    return label


def texture_blur_noise(
    rng: np.random.Generator, image: np.ndarray, body: np.ndarray, *, texture_case: float, texture_sigma: float,
    blur_sigma: float, noise_case: float,
) -> np.ndarray:
    """Smooth correlated texture inside the body, partial-volume blur, white noise, and the
    CT range clip ``[-1024, 3071]`` HU. Returns the final float32 image."""
    texture = smooth_noise(rng, image.shape, texture_sigma)  # drawn even at 0 HU: same stream
    image += np.where(body, np.float32(texture_case), np.float32(0.0)) * texture
    if blur_sigma > 0:
        image = ndimage.gaussian_filter(image, sigma=blur_sigma, mode="nearest")
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_case)
    np.clip(image, -1024.0, 3071.0, out=image)
    return image
