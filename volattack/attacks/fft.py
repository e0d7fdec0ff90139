"""The 3D FFT attack: an additive perturbation parameterised in the real-FFT domain of the whole
volume (or of blocks), optionally band / radius limited and projected to an L-inf or L2 voxel
budget; ``mode="amplitude"`` scales the FFT amplitudes and keeps the phase.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from volattack import ops
from volattack.attacks.base import register_attack
from volattack.attacks.spectral import check_band, check_block, block_merge, block_split, irfft3, rfft3, rfft_mask
from volattack.attacks.spectral_base import SpectralAttack
from volattack.checks import check_bool, check_choice, check_number
from volattack.ops import l2_norm, per_sample_view

__all__ = ["FFTAttack"]


@register_attack("fft")
class FFTAttack(SpectralAttack):
    """Spectral perturbation in the real-FFT domain of the volume (or of blocks), additive or
    amplitude-only (README, attack table): volattack's own attack in the line of frequency-
    constrained perturbations such as Guo et al., "Low Frequency Adversarial Perturbation",
    UAI 2019.

    ``mode="additive"`` (default): the perturbation is ``delta = irfft3(M * Z)`` with a complex
    spectrum ``Z`` over the whole volume (or over each block when ``block_size`` is set) and a
    frequency mask ``M`` (``band`` and/or ``radius``, :func:`~volattack.attacks.spectral.rfft_mask`).
    The model sees ``clip(x + mask * P(delta))`` with ``P`` the projection onto the L-inf (default)
    or L2 eps-ball. Each step is a signed gradient step in the spectrum (``sign`` of the real and
    imaginary parts for L-inf; the raw gradient for L2; no Adam), rescaled per sample so that its
    voxel-domain image has L-inf (resp. L2) norm ``alpha``; afterwards ``Z`` is reset to the masked
    spectrum of the projected, bounds-clamped delta. The random start is band-limited seeded noise
    (one draw per sample, ``Attack.sample_noise``) scaled to norm ``eps / 2``. The returned image is
    always projected into the eps-ball (so with L-inf clipping the band limit holds only
    approximately).

    ``mode="amplitude"``: ``x' = irfft3(rfft3(x) * s)`` with real factors ``s`` in
    ``[1 - rho, 1 + rho]`` per frequency inside ``M`` (``s = 1`` outside; the DC bin is kept by
    default), i.e. the amplitudes are scaled and the phase kept; ``s`` starts uniform (seeded) and
    ascends by ``s <- clip(s + beta * sign(grad_s), 1 - rho, 1 + rho)``. If ``eps`` is given the
    change is also projected into the eps-ball.

    Args:
        model: the segmenter.
        eps: voxel budget in input units (L-inf or L2 per sample). Default 4/255 in additive mode,
            none in amplitude mode.
        alpha: voxel-domain norm of one additive step (default ``eps / 4``).
        steps: update steps, >= 0.
        norm: ``"linf"`` or ``"l2"``.
        mode: ``"additive"`` or ``"amplitude"``.
        band: ``"all"``, ``"low"`` (radius < 1/3 Nyquist), ``"middle"`` or ``"high"`` (>= 2/3).
        radius: optional ``(r_min, r_max)`` in Nyquist units (see ``rfft_radius``).
        block_size: None (whole volume) or a block side for a per-block spectrum.
        random_start: start from seeded noise (additive) / seeded factors (amplitude).
        rho: amplitude-mode factor range, in [0, 1).
        beta: amplitude-mode step, > 0.
        exclude_dc: keep the DC bin unperturbed (default: False additive, True amplitude).
        objective: per-sample objective (default ``"dice_ce"``).
        **kwargs: :class:`~volattack.attacks.base.Attack` options.

    Shape:
        images ``(B, C, H, W, D)`` -> same; Z ``(B, C, H, W, D // 2 + 1)`` complex (per block:
        ``(B, C, nH, nW, nD, b, b, b // 2 + 1)``).
    """

    linf_budget = True  # every result is projected into the eps-ball (the L2 ball lies inside the L-inf ball)

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: Optional[float] = None,
        alpha: Optional[float] = None,
        steps: int = 20,
        norm: str = "linf",
        mode: str = "additive",
        band: str = "all",
        radius: Optional[tuple[float, float]] = None,
        block_size: Optional[int] = None,
        random_start: bool = True,
        rho: float = 0.2,
        beta: float = 0.1,
        exclude_dc: Optional[bool] = None,
        objective: str = "dice_ce",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, steps=steps, objective=objective, **kwargs)
        self.mode = check_choice("mode", mode, ("additive", "amplitude"))
        self.norm = check_choice("norm", norm, ("linf", "l2"))
        if eps is None and self.mode == "additive":
            eps = 4 / 255
        if eps is not None:
            check_number("eps", eps, low=0)
        alpha = (eps / 4 if eps is not None else 0.0) if alpha is None else alpha
        check_number("alpha", alpha, low=0)
        check_number("rho", rho, low=0, high=1, high_open=True)
        check_number("beta", beta, low=0, low_open=True)
        if block_size is not None:
            check_number("block_size", block_size, low=2, integer=True)
        if radius is not None:
            ok = isinstance(radius, (tuple, list)) and len(radius) == 2
            if ok:
                check_number("radius[0]", radius[0], low=0)
                check_number("radius[1]", radius[1], low=radius[0])
            else:
                raise ValueError(f"radius must be a pair (r_min, r_max), got {radius!r}.")
            radius = (float(radius[0]), float(radius[1]))
        self.eps = None if eps is None else float(eps)
        self.alpha = float(alpha)
        self.band = check_band(band)
        self.radius = radius
        self.block_size = None if block_size is None else int(block_size)
        self.random_start = check_bool("random_start", random_start)
        self.rho = float(rho)
        self.beta = float(beta)
        self.exclude_dc = (self.mode == "amplitude") if exclude_dc is None else check_bool("exclude_dc", exclude_dc)

    @property
    def is_random(self) -> bool:
        if not self.random_start:
            return False
        return self.rho > 0 if self.mode == "amplitude" else self.eps != 0

    def restart_problem(self) -> Optional[str]:
        if not self.random_start:
            return "fft with random_start=False is deterministic, so every restart would be identical"
        return super().restart_problem()

    # --------------------------------------------------------------- transforms
    def _freq_mask(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.block_size,) * 3 if self.block_size is not None else tuple(x.shape[2:])
        if self.block_size is not None:
            check_block(self.block_size, x.shape[2:], x.shape)
        m = rfft_mask(size, self.band, radius=self.radius, exclude_dc=self.exclude_dc, device=x.device)
        if not bool(m.any()):
            raise ValueError(
                f"band={self.band!r} with radius={self.radius!r} selects no frequency of a {size} spectrum."
            )
        return m

    def _spec(self, v: torch.Tensor) -> torch.Tensor:
        """Spectrum of a volume: ``rfft3`` of the whole volume or of its blocks (complex)."""
        return rfft3(block_split(v, self.block_size) if self.block_size is not None else v)

    def _vol(self, spec: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`_spec` (complex spectrum -> real volume of ``shape``)."""
        if self.block_size is None:
            return irfft3(spec, shape[2:])
        return block_merge(irfft3(spec, (self.block_size,) * 3), shape)

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        if self.eps is None:
            return delta
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        n = l2_norm(delta)
        factor = torch.where(n > self.eps, self.eps / n.clamp_min(1e-12), torch.ones_like(n))
        return delta * per_sample_view(factor, delta)

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        return v.flatten(1).abs().amax(dim=1) if self.norm == "linf" else l2_norm(v)

    def _apply(
        self, x: torch.Tensor, delta: torch.Tensor, mask: Optional[torch.Tensor], straight_through: bool = False
    ) -> torch.Tensor:
        """``clip(x + mask * P(delta))``; with ``straight_through`` the gradient passes the eps
        projection and the bounds clamp as the identity (see :meth:`SpectralAttack._clamp`).

        Shape:
            x, delta ``(B, C, H, W, D)`` -> same.
        """
        proj = self._project(delta)
        if mask is not None:
            delta, proj = delta * mask, proj * mask
        out = self.clamp_to_bounds(x + proj)
        return ops.straight_through(out, x + delta) if straight_through else out

    # ------------------------------------------------------------------- attack
    def _attack(self, x, y, target, mask, rng):
        m = self._freq_mask(x)
        wd = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(wd)
        if self.mode == "amplitude":
            return self._amplitude(x, xw, y, target, mask, rng, m)
        if self.eps == 0:
            return x.clone(), {"steps_run": 0}
        mr = m.unsqueeze(-1).to(wd)  # mask on the real view (..., 2)

        def to_delta(z: torch.Tensor) -> torch.Tensor:
            return self._vol(torch.view_as_complex(z * mr), x.shape)

        def to_param(delta: torch.Tensor) -> torch.Tensor:
            return torch.view_as_real(self._spec(delta)) * mr

        if self.random_start:
            noise = to_delta(to_param(self.sample_noise(xw, rng, "uniform" if self.norm == "linf" else "normal")))
            n = self._norm(noise).clamp_min(1e-12)
            delta0 = noise * per_sample_view(0.5 * self.eps / n, noise)
        else:
            delta0 = torch.zeros_like(xw)
        z = to_param(self._apply(xw, delta0, mask) - xw)

        def candidate(p: torch.Tensor, t: int, straight_through: bool = True) -> torch.Tensor:
            return self._apply(xw, to_delta(p), mask, straight_through).to(x.dtype)

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            return self.gain(logits, y, target, t + 1)

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            d = g.sign() if self.norm == "linf" else g
            n = self._norm(to_delta(d)).clamp_min(1e-12)
            p = p + d * per_sample_view(self.alpha / n, d)
            return to_param(self._apply(xw, to_delta(p), mask) - xw)

        z, steps_run = self._step_loop(z, candidate, score, update, y, target)
        with torch.no_grad():
            adv = candidate(z, self.steps, straight_through=False)
        return adv, {"steps_run": steps_run, "mode": self.mode, "norm": self.norm}

    def _amplitude(self, x, xw, y, target, mask, rng, m):
        if self.rho == 0:
            return x.clone(), {"steps_run": 0, "mode": self.mode, "norm": self.norm}
        spec = self._spec(xw)
        shape = spec.shape
        lo, hi = 1.0 - self.rho, 1.0 + self.rho
        ones = torch.ones(shape, dtype=xw.dtype, device=x.device)
        if self.random_start:
            s = 1.0 + self.rho * self.sample_noise(ones, rng, "uniform")
        else:
            s = ones
        s = torch.where(m, s, ones)

        def candidate(p: torch.Tensor, t: int, straight_through: bool = True) -> torch.Tensor:
            return self._apply(xw, self._vol(spec * p, x.shape) - xw, mask, straight_through).to(x.dtype)

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            return self.gain(logits, y, target, t + 1)

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            p = (p + self.beta * g.sign()).clamp(lo, hi)
            return torch.where(m, p, ones)

        s, steps_run = self._step_loop(s, candidate, score, update, y, target)
        with torch.no_grad():
            adv = candidate(s, self.steps, straight_through=False)
        return adv, {"steps_run": steps_run, "mode": self.mode, "norm": self.norm}
