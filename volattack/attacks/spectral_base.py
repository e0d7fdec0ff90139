"""Shared plumbing of the frequency-domain attacks (VAFA, SA^2, FFT): :class:`SpectralAttack`
and the per-block SSIM *objective* :class:`PatchSSIM` of VAFA and SA^2.

The attacks work on bounds-normalised intensities ``x01 = (x - lo) / (hi - lo)``, use per-sample
objectives (``volattack.attacks.objectives``), take gradients with ``torch.autograd.grad`` with
respect to their own parameters (q, xi, the spectrum) only, and do no host-device
synchronisation inside the step loop (unless ``early_stop`` is set: one check per step). A
perturbation mask acts as ``x' = x + mask * (x_f - x)``; the result is clamped to the bounds.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from volattack import ops
from volattack.attacks.base import Attack
from volattack.attacks.objectives import attack_success, check_objective
from volattack.checks import check_number
from volattack.measure import ssim_from_stats, ssim_window, valid_filter, window_taps
from volattack.ops import per_sample_view

__all__ = ["PatchSSIM", "SpectralAttack"]

logger = logging.getLogger(__name__)


class PatchSSIM:
    """VAFA's / SA^2's SSIM objective: the per-sample mean over blocks of the SSIM of each block pair,
    against a fixed reference whose local statistics are computed once (differentiable).

    This is the attacks' *objective* term ``1 - L_ssim`` as published (Hanif et al., MICCAI 2023:
    3D SSIM with window 3 over each patch, data range 1), not the reported SSIM: the number every
    attack reports is :func:`volattack.measure.ssim3d` of the whole volume (window 7). Both use
    the same window (:func:`~volattack.measure.window_taps`, shrunk by
    :func:`~volattack.measure.ssim_window`), the same separable valid filter
    (:func:`~volattack.measure.valid_filter`) and the same formula
    (:func:`~volattack.measure.ssim_from_stats`); here windows stay inside each block (no window
    crosses a block edge). Equal to ``ssim3d`` of each block with window 3, averaged over the
    blocks (tested).

    Args:
        ref_blocks: reference blocks ``(B, C, nH, nW, nD, b, b, b)`` (constant, no gradient needed).
        win_size: SSIM window side (VAFA: 3), shrunk to fit the block side.
        data_range: intensity range (1 for bounds-normalised images).
        sigma: gaussian window sigma (1.5, Wang et al. 2004).

    Shape:
        ``__call__``: blocks ``(B, C, nH, nW, nD, b, b, b)`` -> ``(B,)``.
    """

    def __init__(self, ref_blocks: torch.Tensor, *, win_size: int = 3, data_range: float = 1.0,
                 sigma: float = 1.5) -> None:
        ref = ref_blocks.detach().float()
        self.taps = [window_taps(w, sigma, device=ref.device, dtype=ref.dtype)
                     for w in ssim_window(ref.shape[-3:], win_size)]
        self.ref = ref
        self.mu_x = valid_filter(ref, self.taps)
        self.var_x = valid_filter(ref * ref, self.taps) - self.mu_x * self.mu_x
        self.data_range = float(data_range)

    def __call__(self, y_blocks: torch.Tensor) -> torch.Tensor:
        y = y_blocks.float()
        st = valid_filter(torch.stack([y, y * y, y * self.ref]), self.taps)
        mu_y = st[0]
        var_y = st[1] - mu_y * mu_y
        cov = st[2] - self.mu_x * mu_y
        s = ssim_from_stats(self.mu_x, mu_y, self.var_x, var_y, cov, self.data_range)
        return s.flatten(1).mean(dim=1)


class SpectralAttack(Attack):
    """Shared plumbing of the frequency-domain attacks (not registered).

    Args:
        model: the segmenter.
        steps: number of signed update steps, >= 0.
        objective: a registered per-sample objective (``objectives.list_objectives()``: ``"dice"``,
            ``"dice_ce"``, ``"ce"``, ``"segpgd"``, ``"cospgd"``, ...).
        **kwargs: :class:`~volattack.attacks.base.Attack` options (bounds, seed, targeted,
            target_labels, mask, inferer, unit_scale, amp_dtype, restarts (attacks with a random
            start), early_stop (a sample's parameter freezes once it succeeds), ...).

    Shape:
        images ``(B, C, H, W, D)`` -> same.
    """

    supports_early_stop = True

    def __init__(self, model: nn.Module, *, steps: int, objective: str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if self.spatial_dims != 3:
            raise ValueError(f"spatial_dims must be 3 for the frequency attacks, got {self.spatial_dims}.")
        check_number("steps", steps, low=0, integer=True)
        self.steps = int(steps)
        self.objective = check_objective(objective)

    # ------------------------------------------------------------------ helpers
    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Bounds-normalised intensities ``(x - lo) / (hi - lo)`` in a float32-or-wider dtype."""
        lo, hi = self.bounds
        wd = torch.promote_types(x.dtype, torch.float32)
        return (x.to(wd) - lo) / (hi - lo)

    def _clamp(self, v: torch.Tensor, straight_through: bool) -> torch.Tensor:
        """Clamp to the bounds; with ``straight_through`` the gradient passes the clamp as the
        identity (PGD semantics: the gradient at the clamped point moves the parameter). Inside
        the step loop this keeps the gradient of voxels that sit exactly on a bound (windowed CT
        air, or after a projection) from depending on float round-off, so a batch replays each
        sample alone.

        Shape:
            any -> same.
        """
        out = self.clamp_to_bounds(v)
        return ops.straight_through(out, v) if straight_through else out

    def _from_unit(
        self, x01: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], straight_through: bool = False
    ) -> torch.Tensor:
        """Map a unit-range candidate back to input units, apply ``x + mask * (x_f - x)`` and clamp
        (see :meth:`_clamp`).

        Shape:
            x01 and x ``(B, C, H, W, D)`` -> ``(B, C, H, W, D)`` in x's dtype.
        """
        lo, hi = self.bounds
        xf = (lo + (hi - lo) * x01).to(x.dtype)
        if mask is not None:
            xf = x + mask * (xf - x)
        return self._clamp(xf, straight_through)

    def _ascent_grad(self, total: torch.Tensor, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``d total / d param`` by ``torch.autograd.grad``; under fp16 autocast the loss is first
        multiplied by the voxel count so gradients do not underflow (signed steps ignore the scale)."""
        if self.amp_dtype == torch.float16:
            total = total * float(x[0].numel())
        (g,) = torch.autograd.grad(total, param)
        return g

    def _step_loop(
        self,
        param: torch.Tensor,
        candidate: Callable[[torch.Tensor, int], torch.Tensor],
        score: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
        update: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
        y: torch.Tensor,
        target: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, int]:
        """Run ``steps`` ascent steps: ``adv = candidate(p, t)``, ``J = score(adv, logits, t)``
        (per sample, to maximise), ``p <- update(p, dJ/dp, t)``. With ``early_stop`` a sample's
        parameter stops changing once its candidate succeeds (one host sync per step), and the
        loop ends when every sample has.

        Returns:
            the final parameter (detached) and the number of steps run.
        """
        active: Optional[torch.Tensor] = None
        steps_run = 0
        for t in range(self.steps):
            p = param.detach().requires_grad_(True)
            adv = candidate(p, t)
            logits = self.forward(adv)
            if t == 0:
                self.check_num_classes(logits, y, target)
            g = self._ascent_grad(score(adv, logits, t).sum(), p, adv)
            new = update(param.detach(), g, t)
            steps_run = t + 1
            if self.early_stop is None:
                param = new
                continue
            done = attack_success(logits.detach(), y, target, self.early_stop)
            active = ~done if active is None else active & ~done
            param = torch.where(per_sample_view(active, new), new, param.detach())
            if not bool(active.any()):
                break
        return param.detach(), steps_run
