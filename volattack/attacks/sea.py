"""SEA, the segmentation ensemble attack of Croce, Singh and Hein, "Towards Reliable Evaluation and
Fast Training of Robust Semantic Segmentation Models", ECCV 2024, made volumetric.

APGD (Croce & Hein, ICML 2020; :meth:`volattack.attacks.apgd.APGD.apgd_loop`, the same loop as
the ``apgd`` attack) runs once per loss with progressive radius reduction, the best iterate of
each loss is the one with the lowest hard foreground Dice, and each sample's result is its worst
case over the losses.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

import torch
from torch import nn

from volattack.attacks.apgd import APGD
from volattack.attacks.base import register_attack
from volattack.attacks.objectives import OBJECTIVES, class_argmax, hard_foreground_dice, objective_per_sample
from volattack.attacks.streams import RandomStreams
from volattack.checks import check_choice
from volattack.ops import l2_norm, per_sample_view, seed_from
from volattack.registry import suggest

__all__ = ["SEA", "SEA_LOSSES", "sea_stages"]

#: SEA's losses (Croce et al., ECCV 2024; the spherical loss from the 2023 preprint)
SEA_LOSSES: tuple[str, ...] = ("masked_ce", "balanced_masked_ce", "jsd", "masked_spherical")

#: progressive radius reduction: (fraction of the iterations, radius factor) per stage
SEA_STAGES: tuple[tuple[float, float], ...] = ((0.3, 2.0), (0.3, 1.5), (0.4, 1.0))


def sea_stages(steps: int) -> list[tuple[int, float]]:
    """Iterations and radius factor of each stage of SEA's progressive radius reduction: 30% of
    ``steps`` at ``2 eps``, 30% at ``1.5 eps``, the rest (at least 40%) at ``eps``; the first two
    use ``floor(0.3 * steps)`` so the last stage, the only one inside the budget, is never short.

    Example: ``sea_stages(10) == [(3, 2.0), (3, 1.5), (4, 1.0)]``; ``sea_stages(2)`` runs both
    iterations at ``eps``.
    """
    first = [(int(frac * steps + 1e-9), factor) for frac, factor in SEA_STAGES[:-1]]
    return first + [(steps - sum(s for s, _ in first), SEA_STAGES[-1][1])]


def _loss_key(loss: str) -> int:
    """A stable integer of a loss name: each loss draws its random start from its own streams, so a
    loss's run does not depend on which other losses are in the list."""
    return zlib.crc32(loss.encode("utf-8"))


class _LowestDice:
    """Keeps, per sample, the observed iterate with the lowest hard foreground Dice (ties: the
    later iterate, which has run longer on the loss), all on the device; counts the forwards."""

    def __init__(self, y: torch.Tensor) -> None:
        self.y = y
        self.delta: Optional[torch.Tensor] = None
        self.dice: Optional[torch.Tensor] = None
        self.passes = 0

    def __call__(self, delta: torch.Tensor, logits: torch.Tensor) -> None:
        self.passes += 1
        dice = hard_foreground_dice(class_argmax(logits, keepdim=True), self.y, logits.shape[1])
        if self.delta is None:
            self.delta, self.dice = delta.detach(), dice
            return
        better = dice <= self.dice
        self.delta = torch.where(per_sample_view(better, delta), delta.detach(), self.delta)
        self.dice = torch.where(better, dice, self.dice)


@register_attack("sea")
class SEA(APGD):
    """SEA (Croce, Singh and Hein, ECCV 2024) for volumes, per sample, L-inf or L2.

    For each loss in ``losses`` (default all four of SEA: ``masked_ce``, ``balanced_masked_ce``,
    ``jsd``, ``masked_spherical``; see ``volattack.attacks.objectives``), APGD (momentum 0.75,
    initial step ``2 r``, step halving at the checkpoints) runs ``steps`` iterations split by
    :func:`sea_stages`: 30% inside the ball of radius ``r = 2 eps``, 30% at ``1.5 eps`` and 40% at
    ``eps``, each stage a fresh APGD schedule started from the previous stage's best-loss iterate
    re-projected onto the current ball (the first from a uniform random start in its ball). The
    loss's result is its iterate of the last stage (the only one inside the budget) with the
    **lowest hard foreground Dice** (:func:`~volattack.attacks.objectives.hard_foreground_dice` of
    ``argmax`` against the labels, per sample; ties keep the later iterate), not the highest loss;
    the Dice comes from the logits each step computes anyway, at no extra pass. Each sample's
    result is its worst case over the losses (lowest Dice; ties keep the earlier loss), so a
    sample's SEA Dice is exactly the minimum of the Dice of the single-loss runs
    (``losses=[name]``, same seed: each loss draws from its own streams).

    What the worst case covers: the per-case mean Dice is a mean over cases, so choosing each case's
    worst loss minimises it; a **pooled** Dice (intersections and sums added over all cases before
    dividing) does not decompose over cases, and SEA's greedy swap of per-image choices for such
    measures is not implemented here.

    Args:
        model: the segmenter.
        eps: budget: L-inf radius (default 4/255) or, with ``norm="l2"``, the per-sample L2 radius
            over the whole sample (default 0.5), in input units.
        steps: APGD iterations per loss (the paper: 300), >= 0.
        norm: ``"linf"`` or ``"l2"`` (unit-L2 steps and L2 projection).
        losses: non-empty list of distinct registered objective names.
        random_start: default True (SEA starts APGD from a random point); ``False`` makes the
            attack deterministic (then ``restarts > 1`` is rejected).
        rho, momentum: APGD's condition-1 threshold and momentum (0.75 each).
        **kwargs: :class:`~volattack.attacks.base.Attack` options (bounds, seed, mask, inferer,
            unit_scale, amp_dtype, restarts: each restart runs every loss again and keeps the
            per-sample lowest Dice). ``targeted``, ``objective``, ``alpha`` and ``early_stop`` are
            rejected.

    Shape:
        images ``(B, C, *spatial)`` -> same.

    Info extras: ``passes`` (int, model forward passes per sample, the same for every sample of
    the call: ``len(losses) * steps`` with a backward, in ``grad_passes``, plus one forward of the
    last iterate of every stage that ran; per restart), ``loss_chosen`` (per sample, the name of
    the loss that gave the result), ``dice_by_loss`` (per sample, ``{loss: Dice}``), ``sea_dice``
    (per sample, the Dice of the result).
    """

    default_random_start = True

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: Optional[float] = None,
        steps: int = 100,
        norm: str = "linf",
        losses: Sequence[str] = SEA_LOSSES,
        **kwargs: Any,
    ) -> None:
        for key, why in (("objective", "it runs every loss of 'losses'"), ("alpha", "APGD adapts its step size"),
                         ("targeted", "its losses and its Dice selection are against the true labels")):
            if key in kwargs and not (key == "targeted" and kwargs[key] is False):
                raise ValueError(f"sea takes no {key!r}: {why}.")
        self.norm = check_choice("norm", norm, ("linf", "l2"))
        if eps is None:
            eps = 4 / 255 if self.norm == "linf" else 0.5
        super().__init__(model, eps=eps, steps=steps, **kwargs)
        self.losses = _check_losses(losses)
        self.objective = None  # no single objective: see ``losses``

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["losses"] = list(self.losses)
        return out

    def gain(self, logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], step: int) -> torch.Tensor:
        """Minus the hard foreground Dice per sample: restarts keep the lowest Dice. Shape: ``(B,)``."""
        return -hard_foreground_dice(class_argmax(logits, keepdim=True), y, logits.shape[1])

    def _check_result(self, x: torch.Tensor, adv: torch.Tensor) -> None:
        super()._check_result(x, adv)
        if self.norm == "l2":
            n = float(l2_norm(adv.float() - x.float()).max())
            if n > self.eps * (1 + 1e-4) + 1e-6:
                raise RuntimeError(f"sea: L2 {n:.6g} exceeds eps {self.eps:.6g}.")

    def _run_loss(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor], rng: RandomStreams,
                  loss: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One loss: the staged APGD runs. Returns the lowest-Dice perturbation of the last stage,
        its Dice ``(B,)`` and the forward passes spent."""
        def gain(logits: torch.Tensor, t: int) -> torch.Tensor:
            return objective_per_sample(logits, y, loss, step=t, steps=max(self.steps, 1))

        stages = [(s, f) for i, (s, f) in enumerate(sea_stages(self.steps)) if s > 0 or i == len(SEA_STAGES) - 1]
        delta = self._init_delta(x, rng, mask, self.eps * stages[0][1])
        passes = 0
        for s, factor in stages:
            radius = self.eps * factor
            delta = self._project(x, delta, mask, radius)
            track = _LowestDice(y)
            delta = self.apgd_loop(x, y, None, mask, delta, steps=s, eps=radius, gain=gain, observe=track)
            passes += track.passes
        return track.delta, track.dice, passes

    def _attack(self, x, y, target, mask, rng):
        best: Optional[torch.Tensor] = None
        best_dice = chosen = None
        per_loss: list[list[float]] = []
        passes = 0
        for j, loss in enumerate(self.losses):
            streams = RandomStreams(seed_from(rng.seed, _loss_key(loss)), rng.sample_ids, rng.restart)
            delta, dice, n = self._run_loss(x, y, mask, streams, loss)
            passes += n
            per_loss.append(dice.tolist())
            if best is None:
                best, best_dice, chosen = delta, dice, torch.zeros_like(dice, dtype=torch.long)
                continue
            better = dice < best_dice
            best = torch.where(per_sample_view(better, x), delta, best)
            best_dice = torch.where(better, dice, best_dice)
            chosen = torch.where(better, torch.full_like(chosen, j), chosen)
        extra = {
            "steps_run": self.steps,
            "passes": passes,
            "grad_passes": self.steps * len(self.losses),
            "loss_chosen": [self.losses[j] for j in chosen.tolist()],
            "dice_by_loss": [{loss: per_loss[j][b] for j, loss in enumerate(self.losses)} for b in range(x.shape[0])],
            "sea_dice": best_dice.tolist(),
        }
        return x + best, extra


def _check_losses(losses: Any) -> tuple[str, ...]:
    """Validate ``losses``: a non-empty list of distinct registered objective names."""
    if isinstance(losses, str) or not isinstance(losses, (list, tuple)) or not losses:
        raise ValueError(f"losses must be a non-empty list of objective names, got {losses!r}.")
    names = OBJECTIVES.names()
    for loss in losses:
        if not isinstance(loss, str) or loss not in OBJECTIVES:
            raise ValueError(f"losses must hold objective names ({', '.join(names)}), got {loss!r}."
                             f"{suggest(str(loss), names)}")
    if len(set(losses)) != len(losses):
        raise ValueError(f"losses must not repeat a name, got {list(losses)!r}.")
    return tuple(losses)
