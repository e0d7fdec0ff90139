"""Voxel-domain attacks: GN, FGSM, BIM, PGD (L-inf and L2), SegPGD, CosPGD and APGD.

All work on any spatial rank with per-sample norms and per-sample objectives
(``volattack.attacks.objectives``), take the input gradient with
``torch.autograd.grad`` with respect to the perturbation only, and do no host-device
synchronisation inside the step loop (unless per-sample early stopping is asked for,
which needs one check per step).

References:
    FGSM: Goodfellow et al., ICLR 2015. BIM: Kurakin et al., 2017. PGD: Madry et al., ICLR 2018.
    SegPGD: Gu et al., ECCV 2022. CosPGD: Agnihotri et al., ICML 2024.
    APGD: Croce & Hein, ICML 2020 (AutoAttack).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from volattack.attacks.base import Attack, register_attack
from volattack.checks import check_number
from volattack.ops import l2_norm, per_sample_view
from volattack.attacks.objectives import (
    attack_success,
    check_objective,
    objective_per_sample,
)


@register_attack("gn")
class GaussianNoise(Attack):
    """Gaussian noise baseline: ``x' = clip(x + N(0, eps^2))``, seeded (REFERENCE: GN).

    Args:
        model: the segmenter (only used for the contract; noise ignores gradients).
        eps: noise standard deviation in input units (e.g. 8/255).
        **kwargs: :class:`~volattack.attacks.base.Attack` options.

    Shape:
        images ``(B, C, *spatial)`` -> same.
    """

    def __init__(self, model: nn.Module, *, eps: float = 8 / 255, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        check_number("eps", eps, low=0)
        self.eps = float(eps)

    def _attack(self, x, y, target, mask, seed):
        noise = self.sample_noise(x, seed, "normal") * self.eps
        if mask is not None:
            noise = noise * mask
        return self.clamp_to_bounds(x + noise), {"steps_run": 0}


class IterativeAttack(Attack):
    """Shared gradient loop of FGSM/BIM/PGD/PGD-L2/SegPGD/CosPGD.

    Each step: ``delta <- P(delta + alpha * s * dir(grad_delta L(x + delta)))`` with ``s = +1``
    untargeted (maximise L vs the labels) and ``-1`` targeted (minimise L vs the target),
    ``dir`` the sign (L-inf) or the per-sample unit L2 direction, ``P`` the projection onto
    the eps-ball, the mask and the bounds.

    Args:
        model: the segmenter.
        eps: budget radius (L-inf, or L2 for ``norm="l2"``) in input units, >= 0.
        alpha: step size (default ``eps / 4``).
        steps: number of gradient steps, >= 0.
        objective: one of ``ce``, ``dice``, ``dice_ce``, ``segpgd``, ``cospgd``.
        random_start: start from a uniform draw in the eps-ball (per sample, seeded).
        restarts: number of random restarts; the per-sample best (highest untargeted /
            lowest targeted objective) is kept. Each extra restart costs one extra forward.
        early_stop: if set, a sample stops once its foreground Dice is <= this value
            (targeted: its Dice to the target is >= 1 - this value). Costs one sync per step.
        **kwargs: :class:`~volattack.attacks.base.Attack` options (bounds, seed, targeted,
            target_labels, mask, inferer, unit_scale, amp_dtype, ...).

    Shape:
        images ``(B, C, *spatial)`` -> same.
    """

    norm: str = "linf"
    default_random_start: bool = True
    linf_budget = True

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 4 / 255,
        alpha: Optional[float] = None,
        steps: int = 20,
        objective: str = "dice_ce",
        random_start: Optional[bool] = None,
        restarts: int = 1,
        early_stop: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        check_number("eps", eps, low=0)
        check_number("steps", steps, low=0, integer=True)
        alpha = eps / 4 if alpha is None else alpha
        check_number("alpha", alpha, low=0)
        check_number("restarts", restarts, low=1, integer=True)
        if early_stop is not None:
            check_number("early_stop", early_stop, low=0, high=1)
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.objective = check_objective(objective)
        self.random_start = self.default_random_start if random_start is None else bool(random_start)
        self.restarts = int(restarts)
        self.early_stop = early_stop
        self.linf_budget = self.norm == "linf"

    # ---------------------------------------------------------------- pieces
    def _project(self, x: torch.Tensor, delta: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = l2_norm(delta)
            factor = torch.where(n > self.eps, self.eps / n.clamp_min(1e-12), torch.ones_like(n))
            delta = delta * per_sample_view(factor, delta)
        if mask is not None:
            delta = delta * mask
        return self.clamp_to_bounds(x + delta) - x

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return g.sign()
        return g / per_sample_view(l2_norm(g).clamp_min(1e-12), g)

    def _init_delta(self, x: torch.Tensor, seed: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.random_start or self.eps == 0:
            return torch.zeros_like(x)
        u = self.sample_noise(x, seed, "uniform" if self.norm == "linf" else "normal")
        if self.norm == "linf":
            delta = u * self.eps
        else:  # uniform direction, radius eps * r with r ~ U(0, 1) from the same seed
            r = torch.rand((), generator=self.generator(seed + 7919)).item()
            delta = u / per_sample_view(l2_norm(u).clamp_min(1e-12), u) * (self.eps * r)
        return self._project(x, delta, mask)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], step: int) -> torch.Tensor:
        """Per-sample objective, oriented so that the attack always ascends it."""
        if target is None:
            return objective_per_sample(logits, y, self.objective, step=step, steps=max(self.steps, 1))
        return -objective_per_sample(
            logits, target, self.objective, step=step, steps=max(self.steps, 1), targeted=True
        )

    def _grad_scale(self, x: torch.Tensor) -> float:
        """Loss scale for the backward pass: the voxel count under fp16 autocast, so per-voxel
        gradients of a mean over 10^6 voxels do not underflow (harmless for sign/unit steps)."""
        return float(x[0].numel()) if self.amp_dtype == torch.float16 else 1.0

    def _attack(self, x, y, target, mask, seed):
        best_adv: Optional[torch.Tensor] = None
        best_loss: Optional[torch.Tensor] = None
        steps_run = 0
        scale = self._grad_scale(x)
        for r in range(self.restarts):
            delta = self._init_delta(x, seed + r, mask)
            active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            for t in range(1, self.steps + 1):
                delta.requires_grad_(True)
                logits = self.forward(x + delta)
                if t == 1 and r == 0:
                    self.check_num_classes(logits, y, target)
                loss = self._loss(logits, y, target, t)
                (g,) = torch.autograd.grad(loss.sum() * scale, delta)
                delta = delta.detach()
                new = self._project(x, delta + self.alpha * self._direction(g), mask)
                if self.early_stop is not None:
                    active = active & ~attack_success(logits.detach(), y, target, self.early_stop)
                    delta = torch.where(per_sample_view(active, x), new, delta)
                    steps_run = max(steps_run, t)
                    if not bool(active.any()):
                        break
                else:
                    delta = new
                    steps_run = max(steps_run, t)
            adv = x + delta
            if self.restarts == 1:
                return adv, {"steps_run": steps_run, "restarts": 1}
            with torch.no_grad():
                final = self._loss(self.forward(adv), y, target, self.steps)
            if best_adv is None:
                best_adv, best_loss = adv, final
            else:
                better = final > best_loss
                best_adv = torch.where(per_sample_view(better, x), adv, best_adv)
                best_loss = torch.where(better, final, best_loss)
        return best_adv, {"steps_run": steps_run, "restarts": self.restarts}


@register_attack("pgd")
class PGD(IterativeAttack):
    """PGD with L-inf budget and uniform random start (Madry et al., ICLR 2018).

    Defaults: eps 4/255, alpha eps/4, 20 steps, Dice-CE objective.
    """


@register_attack("bim")
class BIM(IterativeAttack):
    """Basic iterative method (Kurakin et al., 2017): PGD-L-inf without random start.

    REFERENCE defaults: alpha 0.01, 20 steps.
    """

    default_random_start = False

    def __init__(self, model: nn.Module, *, alpha: Optional[float] = 0.01, **kwargs: Any) -> None:
        super().__init__(model, alpha=alpha, **kwargs)


@register_attack("fgsm")
class FGSM(IterativeAttack):
    """Fast gradient sign method (Goodfellow et al., ICLR 2015): one step of size eps, no random start.

    Args:
        eps: L-inf budget in input units (default 4/255).
    """

    default_random_start = False

    def __init__(self, model: nn.Module, *, eps: float = 4 / 255, **kwargs: Any) -> None:
        for k in ("alpha", "steps"):
            if k in kwargs:
                raise ValueError(f"fgsm takes no {k!r}: it is one step of size eps (use 'bim' or 'pgd').")
        super().__init__(model, eps=eps, alpha=eps, steps=1, **kwargs)


@register_attack("pgd_l2")
class PGDL2(IterativeAttack):
    """PGD with a per-sample L2 budget: steps ``alpha * g / ||g||_2``, projection onto the L2 ball.

    Defaults: eps 0.5 (L2 in input units over the whole sample), alpha eps/4, 20 steps.
    """

    norm = "l2"

    def __init__(self, model: nn.Module, *, eps: float = 0.5, **kwargs: Any) -> None:
        super().__init__(model, eps=eps, **kwargs)

    def _check_result(self, x: torch.Tensor, adv: torch.Tensor) -> None:
        super()._check_result(x, adv)
        n = float(l2_norm(adv.float() - x.float()).max())
        if n > self.eps * (1 + 1e-4) + 1e-6:
            raise RuntimeError(f"pgd_l2: L2 {n:.6g} exceeds eps {self.eps:.6g}.")


@register_attack("segpgd")
class SegPGD(IterativeAttack):
    """PGD-L-inf with the SegPGD objective (Gu et al., ECCV 2022); see ``objectives``."""

    def __init__(self, model: nn.Module, *, objective: str = "segpgd", **kwargs: Any) -> None:
        super().__init__(model, objective=objective, **kwargs)


@register_attack("cospgd")
class CosPGD(IterativeAttack):
    """PGD-L-inf with the CosPGD objective (Agnihotri et al., ICML 2024); see ``objectives``."""

    def __init__(self, model: nn.Module, *, objective: str = "cospgd", **kwargs: Any) -> None:
        super().__init__(model, objective=objective, **kwargs)


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD step-size checkpoints ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein 2020), strictly increasing, < steps."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ws = sorted({math.ceil(v * steps - 1e-9) for v in p if math.ceil(v * steps - 1e-9) < steps})
    return [w for w in ws if w > 0]


@register_attack("apgd")
class APGD(IterativeAttack):
    """Auto-PGD, L-inf (Croce & Hein, ICML 2020) for dense outputs, per sample.

    Step size starts at ``2 * eps``; a momentum step with ``alpha_m = 0.75``; at each checkpoint
    ``w_j`` the step of a sample halves (and it restarts from its best iterate) if fewer than
    ``rho * (w_j - w_{j-1})`` of its steps since the last checkpoint increased the objective, or
    if its step size and best objective are both unchanged since the last checkpoint. The best
    iterate (highest objective) is returned. All bookkeeping stays on the device.

    Args:
        eps: L-inf budget. steps: iterations (>= 0). rho: 0.75. momentum: 0.75.
        objective: per-sample objective (default Dice-CE). random_start: default False
            (start at x, as AutoAttack's first run does not need one for a deterministic model).

    Shape:
        images ``(B, C, *spatial)`` -> same.
    """

    default_random_start = False

    def __init__(self, model: nn.Module, *, rho: float = 0.75, momentum: float = 0.75, **kwargs: Any) -> None:
        if "alpha" in kwargs:
            raise ValueError("apgd takes no 'alpha': its step size is adapted from 2 * eps.")
        super().__init__(model, **kwargs)
        check_number("rho", rho, low=0, high=1)
        check_number("momentum", momentum, low=0, high=1)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.alpha = 2 * self.eps

    def _attack(self, x, y, target, mask, seed):
        if self.restarts != 1 or self.early_stop is not None:
            raise ValueError("apgd supports restarts=1 and early_stop=None only.")
        B = x.shape[0]
        scale = self._grad_scale(x)
        checkpoints = set(apgd_checkpoints(self.steps))
        delta = self._init_delta(x, seed, mask)

        def loss_grad(d: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
            d = d.detach().requires_grad_(True)
            logits = self.forward(x + d)
            if t == 0:
                self.check_num_classes(logits, y, target)
            loss = self._loss(logits, y, target, t + 1)
            (g,) = torch.autograd.grad(loss.sum() * scale, d)
            return loss.detach(), g

        if self.steps == 0:
            return x + delta, {"steps_run": 0}
        eta = torch.full((B,), 2 * self.eps, device=x.device, dtype=x.dtype)
        loss, g = loss_grad(delta, 0)
        best_delta, best_loss = delta, loss
        prev = delta
        # first step without momentum
        delta = self._project(x, delta + per_sample_view(eta, x) * g.sign(), mask)
        n_incr = torch.zeros(B, device=x.device)
        last_w, eta_at_last, best_at_last = 0, eta.clone(), best_loss.clone()
        prev_loss = loss
        for k in range(1, self.steps):
            loss, g = loss_grad(delta, k)
            improved = loss > best_loss
            best_delta = torch.where(per_sample_view(improved, x), delta, best_delta)
            best_loss = torch.where(improved, loss, best_loss)
            n_incr = n_incr + (loss > prev_loss).float()
            prev_loss = loss
            z = self._project(x, delta + per_sample_view(eta, x) * g.sign(), mask)
            a = self.momentum
            nxt = self._project(x, delta + a * (z - delta) + (1 - a) * (delta - prev), mask)
            prev, delta = delta, nxt
            if k in checkpoints:
                cond1 = n_incr < self.rho * (k - last_w)
                cond2 = (eta == eta_at_last) & (best_loss == best_at_last)
                halve = cond1 | cond2
                eta = torch.where(halve, eta / 2, eta)
                delta = torch.where(per_sample_view(halve, x), best_delta, delta)
                prev = torch.where(per_sample_view(halve, x), best_delta, prev)
                n_incr = torch.zeros_like(n_incr)
                last_w, eta_at_last, best_at_last = k, eta.clone(), best_loss.clone()
        # evaluate the last iterate too
        with torch.no_grad():
            final = self._loss(self.forward(x + delta), y, target, self.steps)
        improved = final > best_loss
        best_delta = torch.where(per_sample_view(improved, x), delta, best_delta)
        return x + best_delta, {"steps_run": self.steps}
