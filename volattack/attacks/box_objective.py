"""Exact objectives for model outputs that are constant outside a box.

A deployed pipeline in ``space: source`` (:class:`~volattack.inference.deployed.DeployedPipeline`)
scores the whole scan grid, but outside the box it cropped its model input to, its output does not
depend on the input: every voxel there holds the same logit vector ``c`` (background log-probability
``log 1``, the other classes ``log MIN_PROB``). The cross-entropy and soft Dice objectives are sums
over voxels, so their value on the full grid is the sum over the box plus terms that only need the
number of voxels of each label class outside the box:

- CE (mean over the N voxels): ``(sum_box ce(z, y) + sum_k n_k * (-log_softmax(c)_k)) / N``;
- soft Dice of class k (MONAI ``DiceLoss``: softmax, one-hot labels, background included,
  ``smooth_nr = smooth_dr = 1e-5``): ``1 - (2 I_k + 1e-5) / (G_k + P_k + 1e-5)`` with
  ``I_k = sum_box p_k [y = k] + q_k n_k``, ``G_k = sum [y = k]``, ``P_k = sum_box p_k + q_k N_out``,
  ``q = softmax(c)``, ``n_k`` the voxels of class k outside the box, averaged over the classes
  (Milletari et al. 2016, V-Net, as implemented by MONAI).

The gradient is the same (the outside terms are constants), the values agree with the full-grid
objectives to float32 summation round-off, and the softmax, one-hot maps and log-softmax run on the
box only: for the quickstart phantoms about 58% of the scan's voxels (``benchmarks/bench_source_space.py``).
Objectives that are not such sums (SegPGD's and CosPGD's voxel weights, SEA's masked losses) are
computed on the full grid by the attacks.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch

#: objectives :func:`boxed_objective` computes exactly from the box and the outside counts.
BOX_OBJECTIVES = frozenset({"ce", "dice", "dice_ce"})

_SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr


def _class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxels of each class per sample, ``(B, 1, *spatial)`` long -> ``(B, K)`` float32 (a
    ``scatter_add`` of integers into a fixed-size buffer: unlike ``bincount``, no host sync on
    CUDA)."""
    flat = labels.reshape(labels.shape[0], -1)
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat)).float()  # counted exactly, then float


_last_counts: list = []  # [(weakref to labels, labels._version, box, K), (ground, outside)]: one entry


def _label_counts(labels: torch.Tensor, box: tuple[slice, ...], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ground, outside)``: the voxels of each class ``(B, K)`` in ``labels`` and outside ``box``.
    An attack passes the same label tensor at every step, so the last answer is kept, keyed on that
    tensor itself (a weak reference, so a new tensor at a reused address is never taken for it) and
    its version counter (an in-place change invalidates it)."""
    key = (labels._version, box, k)
    if _last_counts and _last_counts[0][0]() is labels and _last_counts[0][1:] == key:
        return _last_counts[1]
    ground = _class_counts(labels, k)
    outside = ground - _class_counts(labels[(slice(None), slice(None)) + box], k)
    _last_counts[:] = [(weakref.ref(labels),) + key, (ground, outside)]
    return ground, outside


def boxed_objective(logits: torch.Tensor, labels: torch.Tensor, kind: str, box: Sequence[slice],
                    const: torch.Tensor, log_probs: bool = False) -> torch.Tensor:
    """The objective ``kind`` (``"ce"``, ``"dice"`` or ``"dice_ce"``) of the full grid, computed from
    the box and the constant logits outside it (module docstring).

    Args:
        logits: ``(B, K, *spatial)`` float32, equal to ``const`` at every voxel outside ``box``.
        labels: ``(B, 1, *spatial)`` long, on the full grid.
        kind: one of :data:`BOX_OBJECTIVES`.
        box: three slices (steps 1) of the spatial grid.
        const: ``(K,)`` the logits outside the box.
        log_probs: the logits are already log-probabilities (``log_softmax`` output, as a deployed
            pipeline without probability-space inverse steps gives): the objective's own
            ``log_softmax`` is then skipped (it is the identity on them up to round-off, and so is
            its gradient, composed with the pipeline's).

    Shape:
        returns ``(B,)``, as :func:`~volattack.attacks.objectives.objective_per_sample`.
    """
    if kind not in BOX_OBJECTIVES:
        raise ValueError(f"kind must be one of {sorted(BOX_OBJECTIVES)}, got {kind!r}.")
    b, k = logits.shape[:2]
    box = tuple(box)
    sl = (slice(None), slice(None)) + box
    zb, yb = logits[sl], labels[sl]
    n_full = labels[0, 0].numel()
    n_box = yb[0, 0].numel()
    ground, outside = _label_counts(labels, box, k)  # (B, K); outside: label voxels outside the box
    logq = torch.log_softmax(const.float().to(logits.device), dim=0)
    lsm = zb if log_probs else torch.log_softmax(zb, dim=1)
    lsm_y = lsm.gather(1, yb).flatten(1)  # (B, N_box) log-probability of each voxel's label
    out = logits.new_zeros(b)
    if kind in ("ce", "dice_ce"):
        out = out + (-lsm_y.sum(dim=1) + (outside * -logq).sum(dim=1)) / n_full
    if kind in ("dice", "dice_ce"):
        p = lsm.exp()
        q = logq.exp()
        inter_box = torch.zeros(b, k, dtype=p.dtype, device=p.device).scatter_add(1, yb.flatten(1), lsm_y.exp())
        inter = inter_box + q * outside
        pred = p.flatten(2).sum(dim=2) + q * float(n_full - n_box)
        dice = 1.0 - (2.0 * inter + _SMOOTH) / (ground + pred + _SMOOTH)
        out = out + dice.mean(dim=1)
    return out


def constant_outside(model: Any, objective: Any, inferer: Any,
                     logits: torch.Tensor) -> Optional[tuple[tuple[slice, ...], torch.Tensor, bool]]:
    """``(box, const, log_probs)`` from ``model.constant_outside()`` (a deployed pipeline in ``space: source``)
    when ``objective`` is one that :func:`boxed_objective` computes exactly and ``logits`` came
    straight from ``model`` (no ``inferer``) on that grid; else ``None`` (the attack then uses the
    full-grid objective). ``log_probs``: ``model.log_softmax_output()``, the arguments of
    :func:`boxed_objective`."""
    if not isinstance(objective, str) or objective not in BOX_OBJECTIVES or inferer is not None:
        return None
    fn = getattr(model, "constant_outside", None)
    info = fn() if callable(fn) else None
    if info is None or tuple(logits.shape[2:]) != tuple(info[2]):
        return None
    normalised = getattr(model, "log_softmax_output", None)
    return info[0], info[1], bool(normalised()) if callable(normalised) else False


__all__ = ["BOX_OBJECTIVES", "boxed_objective", "constant_outside"]
