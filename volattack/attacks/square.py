"""Square attack (Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020), L-inf, adapted to dense outputs and
volumes: random search over cubic patches, no gradients.

AutoAttack (Croce & Hein, ICML 2020) runs it beside the white-box attacks: a black-box attack that
lowers Dice more than the gradient attacks at the same budget points to gradient masking.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from volattack.attacks.base import Attack, register_attack
from volattack.attacks.objectives import class_argmax, hard_foreground_dice
from volattack.checks import check_choice, check_number

__all__ = ["Square", "square_p", "square_side"]

#: iterations (on a 10 000-query run) after which the patch fraction p halves (Andriushchenko et al.)
P_HALVINGS: tuple[int, ...] = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(query: int, p_init: float, schedule_queries: int) -> float:
    """The published schedule of the patch fraction: ``p_init`` halved after each iteration of
    :data:`P_HALVINGS`, with the query index rescaled to a 10 000-query run,
    ``it = floor(query / schedule_queries * 10000)``.

    Example: ``square_p(60, 0.8, 1000) == 0.05`` (it = 600: four halvings).
    """
    it = int(query / schedule_queries * 10000)
    return p_init / 2 ** sum(it > t for t in P_HALVINGS)


def square_side(p: float, spatial: tuple[int, ...]) -> int:
    """Side of the cubic patch covering a fraction ``p`` of the voxels: ``round((p * N)^(1/d))``
    for ``N`` voxels over ``d`` spatial axes, at least 1 and at most the smallest side minus 1
    (the published rule, for squares ``round(sqrt(p * h * w))``)."""
    n = math.prod(spatial)
    side = int(round((p * n) ** (1.0 / len(spatial))))
    return max(1, min(side, min(spatial) - 1))


@register_attack("square")
class Square(Attack):
    """Square attack, L-inf (Andriushchenko et al., ECCV 2020), with cubic patches, per sample.

    Start: vertical stripes, ``delta = +-eps`` constant along the first spatial axis with a random
    sign per channel and per position on the other axes. Each further query draws, per sample, a
    cube of side :func:`square_side` of ``p`` (the fraction p follows :func:`square_p`) at a
    uniform position and sets ``delta`` inside it to ``+-eps`` (one random sign per channel);
    the candidate ``clamp(x + mask * delta)`` replaces a sample's current point only if its loss
    strictly improves. Runs under ``torch.no_grad``: the model is only queried. Every draw of a
    sample comes from its own seeded stream (stripes first, then one row per query).

    Losses (maximised): ``"margin"``, minus the voxel mean of ``relu(z_y - max_{c != y} z_c)``
    (the published margin loss per voxel; a voxel already misclassified no longer counts);
    ``"dice"``, ``1 - `` the hard foreground Dice (accepted only when the Dice drops, so the Dice
    never increases with the queries).

    Args:
        model: the segmenter.
        eps: L-inf budget in input units (4/255).
        queries: forward passes per sample (>= 1; the first one scores the stripes). AutoAttack: 5000.
        p_init: initial fraction of the voxels in the patch, in (0, 1] (0.05, the published L-inf value).
        loss: ``"margin"`` or ``"dice"``.
        schedule_queries: the query count the p schedule is laid out on (default ``queries``); a run
            with more ``queries`` and the same ``schedule_queries`` continues a shorter one exactly.
        **kwargs: :class:`~volattack.attacks.base.Attack` options; ``targeted`` and ``early_stop``
            are rejected.

    Shape:
        images ``(B, C, *spatial)`` -> same.

    Info extras: ``queries`` (int, forward passes per sample), ``square_loss`` (per sample, the
    final loss value), ``accepted`` (per sample, accepted queries after the start).
    """

    linf_budget = True

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 4 / 255,
        queries: int = 1000,
        p_init: float = 0.05,
        loss: str = "margin",
        schedule_queries: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("targeted", False) is not False:
            raise ValueError("square takes no 'targeted': it is untargeted (its losses are against the true labels).")
        super().__init__(model, **kwargs)
        check_number("eps", eps, low=0)
        check_number("queries", queries, low=1, integer=True)
        check_number("p_init", p_init, low=0, high=1, low_open=True)
        if schedule_queries is not None:
            check_number("schedule_queries", schedule_queries, low=1, integer=True)
        self.eps = float(eps)
        self.queries = int(queries)
        self.p_init = float(p_init)
        self.loss = check_choice("loss", loss, ("margin", "dice"))
        self.schedule_queries = self.queries if schedule_queries is None else int(schedule_queries)

    @property
    def is_random(self) -> bool:
        return self.eps > 0

    def early_stop_problem(self) -> str:
        return "its queries are a fixed budget (use a smaller 'queries')"

    def gain(self, logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], step: int) -> torch.Tensor:
        """The search loss per sample, to maximise (see the class docstring). Shape: ``(B,)``."""
        if self.loss == "dice":
            return 1.0 - hard_foreground_dice(class_argmax(logits, keepdim=True), y, logits.shape[1])
        z_y = logits.gather(1, y)
        other = logits.scatter(1, y, float("-inf")).amax(dim=1, keepdim=True)
        return -(z_y - other).clamp_min(0).flatten(1).mean(dim=1)

    def _window(self, u: torch.Tensor, side: int, spatial: tuple[int, ...]) -> torch.Tensor:
        """Per-sample cube of side ``side`` at positions drawn from ``u`` ``(B, d)`` in [0, 1).

        Shape:
            -> ``(B, 1, *spatial)`` bool.
        """
        d = len(spatial)
        win = None
        for a, n in enumerate(spatial):
            start = (u[:, a] * (n - side + 1)).floor().clamp(0, n - side)
            ar = torch.arange(n, device=u.device, dtype=u.dtype)
            inside = (ar >= start[:, None]) & (ar < start[:, None] + side)  # (B, n)
            shape = [u.shape[0], 1] + [1] * d
            shape[2 + a] = n
            inside = inside.reshape(shape)
            win = inside if win is None else win & inside
        return win

    def _attack(self, x, y, target, mask, rng):
        b, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        d = len(spatial)

        def place(delta: torch.Tensor) -> torch.Tensor:
            if mask is not None:
                delta = delta * mask
            return self.clamp_to_bounds(x + delta)

        with torch.no_grad():
            stripes = rng.noise(torch.empty((b, c, 1) + spatial[1:]), "uniform")
            delta = (torch.where(stripes >= 0, self.eps, -self.eps)).to(x.device, x.dtype).expand_as(x)
            rows = torch.stack([torch.rand((self.queries - 1, d + c), generator=g) for g in rng.generators])
            rows = rows.to(x.device)  # (B, Q - 1, d + C)
            logits = self.forward(place(delta))
            self.check_num_classes(logits, y)
            best = self.gain(logits, y, None, 0)
            accepted = torch.zeros(b, dtype=torch.long, device=x.device)
            for q in range(1, self.queries):
                side = square_side(square_p(q, self.p_init, self.schedule_queries), spatial)
                u = rows[:, q - 1]
                win = self._window(u[:, :d], side, spatial)
                signs = torch.where(u[:, d:] < 0.5, -self.eps, self.eps).to(x.dtype).reshape((b, c) + (1,) * d)
                cand = torch.where(win, signs, delta)
                score = self.gain(self.forward(place(cand)), y, None, q)
                better = score > best
                delta = torch.where(better.reshape((b,) + (1,) * (d + 1)), cand, delta)
                best = torch.where(better, score, best)
                accepted = accepted + better.long()
            adv = place(delta)
        return adv, {"steps_run": 0, "queries": self.queries, "square_loss": best.tolist(),
                     "accepted": accepted.tolist()}
