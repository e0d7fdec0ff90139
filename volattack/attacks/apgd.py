"""Auto-PGD (APGD, L-inf) of Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020, for dense outputs, per sample.

The step-size schedule is factored into pure pieces so it can be checked on hand-built loss
traces: :func:`apgd_checkpoints` (the checkpoints ``w_j``), :func:`apgd_halve` (the decision
at one checkpoint) and :class:`APGDSchedule` (the per-sample bookkeeping between checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from volattack.attacks.base import register_attack
from volattack.attacks.voxel import IterativeAttack
from volattack.checks import check_number
from volattack.ops import per_sample_view

__all__ = ["APGD", "APGDSchedule", "apgd_checkpoints", "apgd_halve"]

#: ``gain(logits (B, K, *spatial), step) -> (B,)``, ascended by :meth:`APGD.apgd_loop`
GainFn = Callable[[torch.Tensor, int], torch.Tensor]
#: ``observe(delta (B, C, *spatial), logits (B, K, *spatial))``, called for every evaluated iterate
ObserveFn = Callable[[torch.Tensor, torch.Tensor], None]


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD step-size checkpoints ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein 2020, Sec. 3.2), strictly
    increasing, each in ``(0, steps)``.

    Example: ``apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ws = sorted({math.ceil(v * steps - 1e-9) for v in p if math.ceil(v * steps - 1e-9) < steps})
    return [w for w in ws if w > 0]


def apgd_halve(
    n_increase: torch.Tensor,
    interval: int,
    eta_prev_ckpt: torch.Tensor,
    eta_now: torch.Tensor,
    best_prev_ckpt: torch.Tensor,
    best_now: torch.Tensor,
    rho: float = 0.75,
) -> torch.Tensor:
    """Whether each sample halves its step size (and restarts from its best point) at checkpoint
    ``w_j`` (Croce & Hein 2020, Sec. 3.2):

    - condition 1: ``n_increase <= rho * interval``, with ``n_increase`` the number of steps
      ``i = w_{j-1} .. w_j - 1`` where the objective increased, ``f(x^(i+1)) > f(x^(i))``, and
      ``interval = w_j - w_{j-1}``. The paper writes the comparison with ``<``; the authors'
      AutoAttack implementation uses ``<=`` (a sample with exactly ``rho * interval`` increases
      halves), and volattack follows the implementation;
    - condition 2: ``eta^(w_{j-1}) == eta^(w_j)`` and ``f_max^(w_{j-1}) == f_max^(w_j)``: the step
      size *in use* at the previous checkpoint (before any halving decided there) equals the
      current one, and the best objective has not improved since. A halving at the previous
      checkpoint makes the two step sizes differ, so condition 2 cannot fire twice in a row.

    Args:
        n_increase: ``(B,)`` count of increasing steps since the previous checkpoint.
        interval: ``w_j - w_{j-1}`` (> 0).
        eta_prev_ckpt: ``(B,)`` step size in use at the previous checkpoint (``w_0 = 0``: the
            initial step size).
        eta_now: ``(B,)`` current step size.
        best_prev_ckpt: ``(B,)`` best objective at the previous checkpoint.
        best_now: ``(B,)`` best objective now.
        rho: fraction threshold of condition 1 (0.75).

    Shape:
        returns ``(B,)`` bool.
    """
    cond1 = n_increase <= rho * interval
    cond2 = (eta_prev_ckpt == eta_now) & (best_prev_ckpt == best_now)
    return cond1 | cond2


class APGDSchedule:
    """Per-sample APGD bookkeeping: the best objective, the count of increasing steps and the step
    size, updated with the objective of every iterate; at each checkpoint :func:`apgd_halve`
    decides, per sample, whether the step size halves.

    Args:
        steps: total iterations N (sets the checkpoints, :func:`apgd_checkpoints`).
        eta0: ``(B,)`` initial step size (APGD: ``2 * eps``).
        loss0: ``(B,)`` objective of the starting point ``x^(0)``.
        rho: condition-1 threshold (0.75).

    Attributes:
        eta: ``(B,)`` current step size. best: ``(B,)`` best objective so far.
    """

    def __init__(self, steps: int, eta0: torch.Tensor, loss0: torch.Tensor, rho: float = 0.75) -> None:
        self.checkpoints = set(apgd_checkpoints(steps))
        self.rho = float(rho)
        self.eta = eta0.clone()
        self.best = loss0.clone()
        self._prev_loss = loss0.clone()
        self._n_increase = torch.zeros_like(loss0)
        self._last_w = 0
        self._eta_prev_ckpt = eta0.clone()
        self._best_prev_ckpt = loss0.clone()

    def update(self, k: int, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the objective ``f(x^(k))`` of iterate ``k >= 1``.

        Returns:
            ``(improved, halve)``, both ``(B,)`` bool: ``improved`` where ``x^(k)`` is the new best
            point; ``halve`` where the step size was just halved (only at a checkpoint ``k``),
            so the caller restarts those samples from their best point.
        """
        improved = loss > self.best
        self.best = torch.where(improved, loss, self.best)
        self._n_increase = self._n_increase + (loss > self._prev_loss).to(self._n_increase.dtype)
        self._prev_loss = loss
        if k not in self.checkpoints:
            return improved, torch.zeros_like(improved)
        halve = apgd_halve(
            self._n_increase, k - self._last_w, self._eta_prev_ckpt, self.eta,
            self._best_prev_ckpt, self.best, self.rho,
        )
        self._eta_prev_ckpt = self.eta.clone()  # the step size in use at this checkpoint, before halving
        self._best_prev_ckpt = self.best.clone()
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self._n_increase = torch.zeros_like(self._n_increase)
        self._last_w = k
        return improved, halve


@register_attack("apgd")
class APGD(IterativeAttack):
    """Auto-PGD, L-inf (Croce & Hein, ICML 2020) for dense outputs, per sample.

    Step size starts at ``2 * eps``; a momentum step with ``alpha_m = 0.75``; at each checkpoint
    the step of a sample halves and it restarts from its best iterate when :func:`apgd_halve`
    says so (:class:`APGDSchedule`). The best iterate (highest objective) is returned. All
    bookkeeping stays on the device.

    Args:
        eps: L-inf budget. steps: iterations (>= 0). rho: 0.75. momentum: 0.75.
        objective: per-sample objective (default Dice-CE). random_start: default False
            (start at x, as AutoAttack's first run does not need one for a deterministic model);
            ``restarts > 1`` needs ``random_start=True``.
        **kwargs: :class:`~volattack.attacks.base.Attack` options; ``early_stop`` is rejected.

    Shape:
        images ``(B, C, *spatial)`` -> same.
    """

    default_random_start = False
    supports_early_stop = False

    def __init__(self, model: nn.Module, *, rho: float = 0.75, momentum: float = 0.75, **kwargs: Any) -> None:
        if "alpha" in kwargs:
            raise ValueError("apgd takes no 'alpha': its step size is adapted from 2 * eps.")
        super().__init__(model, **kwargs)
        check_number("rho", rho, low=0, high=1)
        check_number("momentum", momentum, low=0, high=1)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.alpha = 2 * self.eps

    def early_stop_problem(self) -> str:
        return "its step-size schedule counts every step of every sample (use pgd with early_stop)"

    def _loss_grad(self, x: torch.Tensor, d: torch.Tensor, t: int, gain: GainFn,
                   check: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = d.detach().requires_grad_(True)
        logits = self.forward(x + d)
        if t == 0:
            check(logits)
        loss = gain(logits, t + 1)
        (g,) = torch.autograd.grad(loss.sum() * self._grad_scale(x), d)
        return loss.detach(), g, logits.detach()

    def _attack(self, x, y, target, mask, rng):
        delta = self._init_delta(x, rng, mask)
        if self.steps == 0:
            return x + delta, {"steps_run": 0}
        return x + self.apgd_loop(x, y, target, mask, delta, steps=self.steps), {"steps_run": self.steps}

    def apgd_loop(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        target: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        delta: torch.Tensor,
        *,
        steps: int,
        eps: Optional[float] = None,
        gain: Optional[GainFn] = None,
        observe: Optional[ObserveFn] = None,
    ) -> torch.Tensor:
        """One APGD run (the schedule of :class:`APGDSchedule`) of ``steps`` iterations from
        ``delta``, inside the ball of radius ``eps`` (default ``self.eps``; initial step ``2 eps``),
        with this attack's norm (sign steps for L-inf, unit-L2 steps for L2). Used by ``apgd`` and,
        once per loss and radius stage, by ``sea``.

        Args:
            x, y, target, mask: as in :meth:`_attack`.
            delta: starting perturbation ``(B, C, *spatial)``, inside the ball.
            steps: iterations (>= 0): ``steps`` forward/backward passes plus one forward of the
                last iterate (``steps = 0``: that forward only).
            gain: ``gain(logits, step) -> (B,)`` to ascend, ``step`` 1-based (default
                :meth:`~volattack.attacks.base.Attack.gain` against ``y`` / ``target``).
            observe: called as ``observe(delta_k, logits_k)`` (logits detached) for every evaluated
                iterate, ``k = 0 .. steps`` in order, so a caller can keep its own best iterate
                (``sea``: lowest Dice) at no extra pass.

        Returns:
            the perturbation with the highest gain among the evaluated iterates (detached).
        """
        eps = self.eps if eps is None else float(eps)
        if gain is None:
            gain = lambda logits, t: self.gain(logits, y, target, t)  # noqa: E731
        check = lambda logits: self.check_num_classes(logits, y, target)  # noqa: E731
        if steps == 0:
            with torch.no_grad():
                logits = self.forward(x + delta)
                check(logits)
            if observe is not None:
                observe(delta, logits)
            return delta.detach()
        eta0 = torch.full((x.shape[0],), 2 * eps, device=x.device, dtype=x.dtype)
        loss, g, logits = self._loss_grad(x, delta, 0, gain, check)
        if observe is not None:
            observe(delta, logits)
        sched = APGDSchedule(steps, eta0, loss, self.rho)
        best_delta, prev = delta, delta
        delta = self._project(x, delta + per_sample_view(sched.eta, x) * self._direction(g), mask, eps)
        a = self.momentum
        for k in range(1, steps):
            loss, g, logits = self._loss_grad(x, delta, k, gain, check)
            if observe is not None:
                observe(delta, logits)
            eta = sched.eta  # the step from x^(k) uses the step size in use at k
            improved, halve = sched.update(k, loss)
            best_delta = torch.where(per_sample_view(improved, x), delta, best_delta)
            z = self._project(x, delta + per_sample_view(eta, x) * self._direction(g), mask, eps)
            nxt = self._project(x, delta + a * (z - delta) + (1 - a) * (delta - prev), mask, eps)
            prev, delta = delta, nxt
            if k in sched.checkpoints:
                delta = torch.where(per_sample_view(halve, x), best_delta, delta)
                prev = torch.where(per_sample_view(halve, x), best_delta, prev)
        with torch.no_grad():  # the last iterate is a candidate too
            logits = self.forward(x + delta)
            final = gain(logits, steps)
        if observe is not None:
            observe(delta, logits)
        return torch.where(per_sample_view(final > sched.best, x), delta, best_delta).detach()
