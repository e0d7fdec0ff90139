"""Per-sample attack objectives on dense logits, any spatial rank.

Every objective returns one value per sample (shape ``(B,)``), never a batch-pooled
value, so that attacking a batch equals attacking each sample alone. Untargeted
attacks maximise the objective against the true labels; targeted attacks minimise
it against the target labels.

Objectives (``kind``):

- ``"ce"``: voxel cross-entropy, mean over voxels.
- ``"dice"``: soft Dice loss (MONAI ``DiceLoss``, softmax, one-hot labels, background
  included), mean over classes.
- ``"dice_ce"``: ``dice + ce`` (as MONAI ``DiceCELoss`` with unit weights, per sample).
- ``"segpgd"``: SegPGD (Gu et al., ECCV 2022): with ``l_t = (t - 1) / (2T)`` at step
  ``t = 1..T``, ``L_t = (1 - l_t)/N * sum_{correct} CE_i + l_t/N * sum_{wrong} CE_i``, N all
  voxels of the sample. Targeted: "correct" means already predicted as the target, and the
  weights swap so the attack first pushes the voxels not yet at the target.
- ``"cospgd"``: CosPGD (Agnihotri et al., ICML 2024): ``L = 1/N sum_i w_i CE_i`` with the
  per-voxel weight ``w_i = cos(softmax(z_i), onehot(y_i))`` DETACHED (not a scalar);
  targeted uses ``w_i = 1 - cos(softmax(z_i), onehot(t_i))``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

OBJECTIVES: tuple[str, ...] = ("ce", "dice", "dice_ce", "segpgd", "cospgd")


def check_objective(kind: str) -> str:
    """Validate an objective name (``ValueError`` with a suggestion)."""
    if kind not in OBJECTIVES:
        from volattack.registry import suggest

        raise ValueError(
            f"objective must be one of {', '.join(OBJECTIVES)}, got {kind!r}.{suggest(str(kind), OBJECTIVES)}"
        )
    return kind


def segpgd_lambda(step: int, steps: int) -> float:
    """SegPGD weight ``l_t = (t - 1) / (2T)`` for 1-based ``step`` t of ``steps`` T (0 at the first step)."""
    return (step - 1) / (2.0 * steps)


def voxel_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-voxel cross-entropy.

    Shape:
        logits ``(B, K, *spatial)``, labels ``(B, 1, *spatial)`` -> ``(B, *spatial)``.
    """
    return F.cross_entropy(logits, labels[:, 0], reduction="none")


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample soft Dice loss (MONAI ``DiceLoss``: softmax, one-hot, background included,
    smooth 1e-5), averaged over classes.

    Shape:
        logits ``(B, K, *spatial)``, labels ``(B, 1, *spatial)`` -> ``(B,)``.
    """
    from monai.losses import DiceLoss

    loss = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")(logits, labels)
    return loss.flatten(1).mean(dim=1)


def cosine_weights(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CosPGD weight per voxel: cosine similarity of ``softmax(logits)`` and ``onehot(labels)``, detached.

    Shape:
        logits ``(B, K, *spatial)``, labels ``(B, 1, *spatial)`` -> ``(B, *spatial)`` in [0, 1].
    """
    with torch.no_grad():
        p = logits.softmax(dim=1)
        p_y = p.gather(1, labels)[:, 0]  # <p, onehot(y)>
        return p_y / p.norm(dim=1).clamp_min(1e-12)  # ||onehot|| = 1


def objective_per_sample(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "dice_ce",
    *,
    step: int = 1,
    steps: int = 1,
    targeted: bool = False,
) -> torch.Tensor:
    """The attack objective per sample (to maximise when untargeted, minimise when targeted).

    Args:
        logits: model output ``(B, K, *spatial)``, float32.
        labels: true labels (untargeted) or target labels (targeted), ``(B, 1, *spatial)`` long.
        kind: one of :data:`OBJECTIVES`.
        step: 1-based step index t (SegPGD schedule).
        steps: total steps T (SegPGD schedule).
        targeted: whether ``labels`` is a target map (changes the SegPGD/CosPGD weights).

    Shape:
        returns ``(B,)``.
    """
    if kind == "ce":
        return voxel_ce(logits, labels).flatten(1).mean(dim=1)
    if kind == "dice":
        return soft_dice_loss(logits, labels)
    if kind == "dice_ce":
        return soft_dice_loss(logits, labels) + voxel_ce(logits, labels).flatten(1).mean(dim=1)
    if kind == "segpgd":
        ce = voxel_ce(logits, labels)
        lam = segpgd_lambda(step, steps)
        with torch.no_grad():
            hit = (logits.argmax(dim=1) == labels[:, 0]).to(ce.dtype)
        w_hit, w_miss = (lam, 1.0 - lam) if targeted else (1.0 - lam, lam)
        w = hit * w_hit + (1.0 - hit) * w_miss
        return (w * ce).flatten(1).mean(dim=1)
    if kind == "cospgd":
        ce = voxel_ce(logits, labels)
        w = cosine_weights(logits, labels)
        if targeted:
            w = 1.0 - w
        return (w * ce).flatten(1).mean(dim=1)
    check_objective(kind)
    raise AssertionError  # pragma: no cover


def hard_foreground_dice(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean foreground Dice per sample of hard predictions, for early stopping (classes absent from
    both maps are skipped; 1.0 when no foreground anywhere).

    Shape:
        pred, labels ``(B, 1, *spatial)`` long -> ``(B,)``.
    """
    p = F.one_hot(pred[:, 0], num_classes).flatten(1, -2)[..., 1:].float()
    t = F.one_hot(labels[:, 0], num_classes).flatten(1, -2)[..., 1:].float()
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    present = denom > 0
    dice = torch.where(present, 2 * inter / denom.clamp_min(1), torch.zeros_like(denom))
    n = present.sum(1)
    return torch.where(n > 0, dice.sum(1) / n.clamp_min(1), torch.ones_like(n, dtype=dice.dtype))


def attack_success(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target: Optional[torch.Tensor],
    threshold: float,
) -> torch.Tensor:
    """Per-sample success for early stopping: untargeted, foreground Dice of the prediction against
    the labels <= ``threshold``; targeted, Dice against the target >= ``1 - threshold``.

    Shape:
        returns ``(B,)`` bool.
    """
    pred = logits.argmax(dim=1, keepdim=True)
    k = logits.shape[1]
    if target is None:
        return hard_foreground_dice(pred, labels, k) <= threshold
    return hard_foreground_dice(pred, target, k) >= 1.0 - threshold
