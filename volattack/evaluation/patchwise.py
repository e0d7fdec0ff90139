"""The published ``patch`` threat model: tile the volume, attack each tile, stitch.

The volume is padded (replicate) so that tiles of ``patch_size`` with stride
``round(patch_size * (1 - overlap))`` cover it exactly, cut into tiles by ``unfold``
(no Python loop over tiles), the tiles are attacked as a batch through the bare model
(batch consistency makes this equal to attacking them one by one), and the tile
perturbations are stitched back with ``scatter_add`` and averaged where tiles overlap.
Averaging keeps every voxel inside the L-inf ball and the bounds (both are convex).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from volattack.attacks.base import Attack


def tile_grid(size: int, patch: int, stride: int) -> tuple[int, int]:
    """Number of tiles along one axis and the padded length they cover exactly."""
    if size <= patch:
        return 1, patch
    n = math.ceil((size - patch) / stride) + 1
    return n, (n - 1) * stride + patch


def _tiles(v: torch.Tensor, patch: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """``(1, C, H, W, D)`` padded volume -> ``(T, C, p0, p1, p2)`` tiles (row-major tile order)."""
    t = v
    for dim, (p, s) in enumerate(zip(patch, stride)):
        t = t.unfold(2 + dim, p, s)
    # (1, C, n0, n1, n2, p0, p1, p2) -> (n0*n1*n2, C, p0, p1, p2)
    c = v.shape[1]
    t = t.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, c, *patch)
    return t


def _tile_index(padded: Sequence[int], patch: Sequence[int], stride: Sequence[int], device) -> torch.Tensor:
    """Flat voxel indices of every tile: ``(T, p0*p1*p2)``."""
    idx = torch.arange(int(torch.tensor(padded).prod()), device=device).reshape(1, 1, *padded)
    return _tiles(idx, patch, stride).flatten(1)


def attack_patchwise(
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.0,
    tile_batch: int = 4,
    seed: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Attack ``images`` tile by tile through ``attack.model`` and stitch the perturbations.

    Args:
        attack: an attack built on the bare model (no inferer).
        images: ``(1, C, H, W, D)`` in the attack's bounds.
        labels: ``(1, 1, H, W, D)``.
        patch_size: tile size (3 ints); the published protocol uses 96^3 non-overlapping tiles.
        overlap: fraction of overlap between neighbouring tiles, in [0, 1).
        tile_batch: tiles attacked per call (memory); results do not depend on it.
        seed: seed of the attack calls; tile ``t`` is attacked with ``sample_ids=[t]`` (its draws
            come from ``seed_from(seed, t)``), so the result does not depend on ``tile_batch``.

    Returns:
        adversarial images ``(1, C, H, W, D)`` and ``{"tiles": T, "seconds": ..., "steps_run": ...}``
        (the stitched perturbation's sizes are measured by the caller, once).
    """
    if images.ndim != 5 or images.shape[0] != 1:
        raise ValueError(f"images must have shape (1, C, H, W, D), got {tuple(images.shape)}.")
    if not (0 <= overlap < 1):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be 3 positive integers, got {list(patch_size)}.")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}.")
    spatial = list(images.shape[2:])
    patch = [int(p) for p in patch_size]
    stride = [max(1, int(round(p * (1 - overlap)))) for p in patch]
    grid = [tile_grid(n, p, s) for n, p, s in zip(spatial, patch, stride)]
    padded = [g[1] for g in grid]
    pad = []
    for n, pp in reversed(list(zip(spatial, padded))):
        pad += [0, pp - n]
    x = F.pad(images, pad, mode="replicate")
    y = F.pad(labels.float(), pad, mode="replicate").long()
    xt, yt = _tiles(x, patch, stride), _tiles(y, patch, stride)
    adv_tiles, seconds, steps = [], 0.0, 0
    for start in range(0, xt.shape[0], tile_batch):
        ids = list(range(start, min(start + tile_batch, xt.shape[0])))
        res = attack.run(xt[start:start + tile_batch], yt[start:start + tile_batch], seed=seed, sample_ids=ids)
        adv_tiles.append(res.adv)
        seconds += float(res.info["seconds"])
        steps = max(steps, int(res.info.get("steps_run") or 0))
    delta_t = torch.cat(adv_tiles) - xt  # (T, C, p, p, p)
    idx = _tile_index(padded, patch, stride, images.device)  # (T, P)
    c = images.shape[1]
    flat = torch.zeros(c, x[0, 0].numel(), device=images.device, dtype=images.dtype)
    count = torch.zeros(x[0, 0].numel(), device=images.device, dtype=images.dtype)
    d = delta_t.permute(1, 0, 2, 3, 4).reshape(c, -1)
    flat.scatter_add_(1, idx.reshape(1, -1).expand(c, -1), d)
    count.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1), dtype=images.dtype))
    delta = (flat / count.clamp_min(1)).reshape(1, c, *padded)
    delta = delta[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]
    adv = (images + delta).clamp(*attack.bounds)
    return adv.detach(), {"tiles": int(xt.shape[0]), "seconds": seconds, "steps_run": steps}
