"""Voxel-domain attacks: GN, FGSM, BIM, PGD (L-inf and L2), SegPGD and CosPGD (APGD: ``apgd``).

All work on any spatial rank with per-sample norms and per-sample objectives
(``volattack.attacks.objectives``), take the input gradient with
``torch.autograd.grad`` with respect to the perturbation only, and do no host-device
synchronisation inside the step loop (unless per-sample early stopping is asked for,
which needs one check per step).

References:
    FGSM: Goodfellow et al., ICLR 2015. BIM: Kurakin et al., 2017. PGD: Madry et al., ICLR 2018.
    SegPGD: Gu et al., ECCV 2022. CosPGD: Agnihotri et al., ICML 2024.
    GN: the noise baseline of Hanif et al., MICCAI 2023.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from volattack.attacks.base import Attack, register_attack
from volattack.checks import check_number
from volattack.ops import l2_norm, per_sample_view
from volattack.attacks.objectives import attack_success, check_objective
from volattack.attacks.streams import RandomStreams


@register_attack("gn")
class GaussianNoise(Attack):
    """Gaussian noise baseline: ``x' = clip(x + N(0, eps^2))``, seeded per sample (the GN baseline of
    Hanif et al., MICCAI 2023; sigma 4/255 or 8/255 there).

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

    @property
    def is_random(self) -> bool:
        return self.eps > 0

    def restart_problem(self) -> Optional[str]:
        return "gn has no objective to choose the best of several noise draws (use another seed instead)"

    def _attack(self, x, y, target, mask, rng):
        noise = self.sample_noise(x, rng, "normal") * self.eps
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
        objective: a registered objective (``volattack.attacks.objectives.list_objectives()``:
            ``ce``, ``dice``, ``dice_ce``, ``segpgd``, ``cospgd``, ...).
        random_start: start from a uniform draw in the eps-ball (per sample, seeded).
        **kwargs: :class:`~volattack.attacks.base.Attack` options (bounds, seed, targeted,
            target_labels, mask, inferer, unit_scale, amp_dtype, restarts (needs a random
            start), early_stop, ...).

    Shape:
        images ``(B, C, *spatial)`` -> same.
    """

    norm: str = "linf"
    default_random_start: bool = True
    linf_budget = True
    supports_early_stop = True

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 4 / 255,
        alpha: Optional[float] = None,
        steps: int = 20,
        objective: str = "dice_ce",
        random_start: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        check_number("eps", eps, low=0)
        check_number("steps", steps, low=0, integer=True)
        alpha = eps / 4 if alpha is None else alpha
        check_number("alpha", alpha, low=0)
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.steps = int(steps)
        self.objective = check_objective(objective)
        self.random_start = self.default_random_start if random_start is None else bool(random_start)
        self.linf_budget = self.norm == "linf"

    @property
    def is_random(self) -> bool:
        return self.random_start and self.eps > 0

    def restart_problem(self) -> Optional[str]:
        if not self.random_start:
            return (
                f"{self.name} has no random start (random_start=False), so every restart would be identical; "
                "pass random_start=True for random restarts"
            )
        return super().restart_problem()

    # ---------------------------------------------------------------- pieces
    def _project(self, x: torch.Tensor, delta: torch.Tensor, mask: Optional[torch.Tensor],
                 eps: Optional[float] = None) -> torch.Tensor:
        """Project ``delta`` onto the ball of radius ``eps`` (default ``self.eps``; SEA's larger
        stage radii pass their own), the mask and the bounds."""
        eps = self.eps if eps is None else float(eps)
        if self.norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            n = l2_norm(delta)
            factor = torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
            delta = delta * per_sample_view(factor, delta)
        if mask is not None:
            delta = delta * mask
        return self.clamp_to_bounds(x + delta) - x

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return g.sign()
        return g / per_sample_view(l2_norm(g).clamp_min(1e-12), g)

    def _init_delta(self, x: torch.Tensor, rng: RandomStreams, mask: Optional[torch.Tensor],
                    eps: Optional[float] = None) -> torch.Tensor:
        """Random start per sample: uniform in the L-inf ball of radius ``eps`` (default
        ``self.eps``), or (L2) a uniform direction with radius ``eps * r``, ``r ~ U(0, 1)`` drawn
        next from the same stream; zeros without one."""
        eps = self.eps if eps is None else float(eps)
        if not self.random_start or eps == 0:
            return torch.zeros_like(x)
        u = self.sample_noise(x, rng, "uniform" if self.norm == "linf" else "normal")
        if self.norm == "linf":
            delta = u * eps
        else:
            r = rng.uniform(x)
            delta = u / per_sample_view(l2_norm(u).clamp_min(1e-12), u) * per_sample_view(eps * r, u)
        return self._project(x, delta, mask, eps)

    def _grad_scale(self, x: torch.Tensor) -> float:
        """Loss scale for the backward pass: the voxel count under fp16 autocast, so per-voxel
        gradients of a mean over 10^6 voxels do not underflow (harmless for sign/unit steps)."""
        return float(x[0].numel()) if self.amp_dtype == torch.float16 else 1.0

    def _attack(self, x, y, target, mask, rng):
        scale = self._grad_scale(x)
        delta = self._init_delta(x, rng, mask)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        steps_run = 0
        for t in range(1, self.steps + 1):
            delta.requires_grad_(True)
            logits = self.forward(x + delta)
            if t == 1:
                self.check_num_classes(logits, y, target)
            (g,) = torch.autograd.grad(self.gain(logits, y, target, t).sum() * scale, delta)
            delta = delta.detach()
            new = self._project(x, delta + self.alpha * self._direction(g), mask)
            steps_run = t
            if self.early_stop is None:
                delta = new
                continue
            active = active & ~attack_success(logits.detach(), y, target, self.early_stop)
            delta = torch.where(per_sample_view(active, x), new, delta)
            if not bool(active.any()):
                break
        return x + delta, {"steps_run": steps_run}


@register_attack("pgd")
class PGD(IterativeAttack):
    """PGD with L-inf budget and uniform random start (Madry et al., ICLR 2018).

    Defaults: eps 4/255, alpha eps/4, 20 steps, Dice-CE objective.
    """


@register_attack("bim")
class BIM(IterativeAttack):
    """Basic iterative method (Kurakin et al., 2017): PGD-L-inf without random start.

    Defaults as in the volumetric attack papers (e.g. Hanif et al., MICCAI 2023): alpha 0.01, 20 steps.
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
