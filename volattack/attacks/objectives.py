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

Adding an objective is one decorated function::

    @register_objective("my_loss")
    def my_loss(logits, labels, *, step, steps, targeted):  # -> (B,)
        ...

and the objective contract test (``tests/attacks/test_objectives.py``) covers it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from volattack.registry import Registry, suggest

#: ``fn(logits (B, K, *spatial), labels (B, 1, *spatial), *, step, steps, targeted) -> (B,)``
ObjectiveFn = Callable[..., torch.Tensor]


class ObjectiveRegistry(Registry[torch.Tensor]):
    """The objective registry; iterating over it yields the sorted names (``", ".join(OBJECTIVES)``)."""

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


OBJECTIVES: ObjectiveRegistry = ObjectiveRegistry("objective")


def register_objective(name: str) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator registering a per-sample objective under ``name`` (a duplicate name is an error).

    The function is called as ``fn(logits, labels, step=t, steps=T, targeted=bool)`` with
    float32 logits ``(B, K, *spatial)`` and long labels ``(B, 1, *spatial)`` (the true labels, or
    the target labels when ``targeted``) and must return one value per sample, shape ``(B,)``,
    never a batch-pooled value. Untargeted attacks ascend it, targeted attacks descend it.
    """
    return OBJECTIVES.register(name)


def list_objectives() -> list[str]:
    """Sorted names of the registered objectives."""
    return OBJECTIVES.names()


def check_objective(kind: str) -> str:
    """Validate an objective name (``ValueError`` naming ``objective``, with a suggestion)."""
    if not isinstance(kind, str) or kind not in OBJECTIVES:
        names = list_objectives()
        raise ValueError(
            f"objective must be one of {', '.join(names)}, got {kind!r}.{suggest(str(kind), names)}"
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


def _voxel_mean(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).mean(dim=1)


@register_objective("ce")
def ce_objective(logits: torch.Tensor, labels: torch.Tensor, *, step: int = 1, steps: int = 1,
                 targeted: bool = False) -> torch.Tensor:
    """Voxel cross-entropy, mean over voxels. Shape: ``(B,)``."""
    return _voxel_mean(voxel_ce(logits, labels))


@register_objective("dice")
def dice_objective(logits: torch.Tensor, labels: torch.Tensor, *, step: int = 1, steps: int = 1,
                   targeted: bool = False) -> torch.Tensor:
    """Soft Dice loss (:func:`soft_dice_loss`). Shape: ``(B,)``."""
    return soft_dice_loss(logits, labels)


@register_objective("dice_ce")
def dice_ce_objective(logits: torch.Tensor, labels: torch.Tensor, *, step: int = 1, steps: int = 1,
                      targeted: bool = False) -> torch.Tensor:
    """Dice + CE with unit weights, per sample (as MONAI ``DiceCELoss``). Shape: ``(B,)``."""
    return soft_dice_loss(logits, labels) + _voxel_mean(voxel_ce(logits, labels))


@register_objective("segpgd")
def segpgd_objective(logits: torch.Tensor, labels: torch.Tensor, *, step: int = 1, steps: int = 1,
                     targeted: bool = False) -> torch.Tensor:
    """SegPGD (Gu et al., ECCV 2022): ``(1 - l_t)`` on correctly classified voxels' CE, ``l_t`` on the
    others (swapped when targeted), mean over all voxels. Shape: ``(B,)``."""
    ce = voxel_ce(logits, labels)
    lam = segpgd_lambda(step, steps)
    with torch.no_grad():
        hit = (logits.argmax(dim=1) == labels[:, 0]).to(ce.dtype)
    w_hit, w_miss = (lam, 1.0 - lam) if targeted else (1.0 - lam, lam)
    return _voxel_mean((hit * w_hit + (1.0 - hit) * w_miss) * ce)


@register_objective("cospgd")
def cospgd_objective(logits: torch.Tensor, labels: torch.Tensor, *, step: int = 1, steps: int = 1,
                     targeted: bool = False) -> torch.Tensor:
    """CosPGD (Agnihotri et al., ICML 2024): CE weighted per voxel by the detached cosine
    (``1 - cos`` when targeted), mean over voxels. Shape: ``(B,)``."""
    w = cosine_weights(logits, labels)
    return _voxel_mean((1.0 - w if targeted else w) * voxel_ce(logits, labels))


def objective_per_sample(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "dice_ce",
    *,
    step: int = 1,
    steps: int = 1,
    targeted: bool = False,
) -> torch.Tensor:
    """The registered objective ``kind`` per sample (to maximise when untargeted, minimise when targeted).

    Args:
        logits: model output ``(B, K, *spatial)``, float32.
        labels: true labels (untargeted) or target labels (targeted), ``(B, 1, *spatial)`` long.
        kind: a name from :func:`list_objectives` (unknown names raise with a suggestion).
        step: 1-based step index t (SegPGD schedule).
        steps: total steps T (SegPGD schedule).
        targeted: whether ``labels`` is a target map (changes the SegPGD/CosPGD weights).

    Shape:
        returns ``(B,)``.
    """
    fn = OBJECTIVES.get(check_objective(kind))
    return fn(logits, labels, step=step, steps=steps, targeted=targeted)


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
