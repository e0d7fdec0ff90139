"""Frequency-domain attacks: VAFA, SA^2 and the additive / amplitude 3D FFT attack.

- ``vafa``: Volumetric Adversarial Frequency Attack (Hanif et al., MICCAI 2023): learnable
  quantisation tables on the 3D DCT of non-overlapping cubic blocks.
- ``sa2``: Spectrum Adversarial Attack (Hanif et al., ISBI 2025): multiplicative noise in
  ``[1 - rho, 1 + rho]`` on the 3D DCT coefficients of each block.
- ``fft``: an additive perturbation parameterised in the real-FFT domain of the whole volume
  (or of blocks), optionally band / radius limited and projected to an L-inf or L2 voxel
  budget; ``mode="amplitude"`` scales the FFT amplitudes and keeps the phase.

All three work on bounds-normalised intensities ``x01 = (x - lo) / (hi - lo)``, use per-sample
objectives (``volattack.attacks.objectives``) and a per-sample differentiable SSIM, take
gradients with ``torch.autograd.grad`` with respect to their own parameters (q, xi, the
spectrum) only, and do no host-device synchronisation inside the step loop. A perturbation
mask acts as ``x' = x + mask * (x_f - x)``; the result is clamped to the bounds.
See REFERENCE.md (VAFA, SA^2, "Additive spectral perturbation") for the published settings.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from volattack.attacks.base import (
    Attack, _gaussian_taps, _ssim_map, _valid_filter3, register_attack,
)
from volattack.attacks.objectives import check_objective, objective_per_sample
from volattack.attacks.spectral import (
    _check_band,
    _check_block,
    band_mask,
    block_merge,
    block_split,
    dct3,
    idct3,
    irfft3,
    rfft3,
    rfft_mask,
    soft_round,
    ste_round,
)
from volattack import ops
from volattack.ops import l2_norm, per_sample_view
from volattack.checks import check_bool, check_block_size, check_choice, check_number

logger = logging.getLogger(__name__)



def patch_ssim(
    x_blocks: torch.Tensor, y_blocks: torch.Tensor, *, win_size: int = 3, data_range: float = 1.0
) -> torch.Tensor:
    """Per-sample mean over blocks of the 3D SSIM of each block pair (differentiable).

    VAFA's ``1 - L_ssim``: SSIM (Wang et al. 2004, k1 0.01, k2 0.03) with a gaussian window of
    side ``min(win_size, b)`` (sigma 1.5) computed inside each block only ("valid" windows, no
    window crosses a block edge), via MONAI's ``compute_ssim_and_cs`` on all blocks at once
    (blocks folded into the batch, no Python loop over patches). Using only windows that fit
    inside a block (no padding) is the documented equivalent of "SSIM over each patch" here.
    Channels, blocks and window positions are averaged.

    Args:
        x_blocks: reference blocks, e.g. ``block_split(x01, b)``.
        y_blocks: distorted blocks of the same shape.
        win_size: SSIM window side (VAFA: 3).
        data_range: intensity range of the blocks (1 for bounds-normalised images).

    Shape:
        ``(B, C, nH, nW, nD, b, b, b)`` twice -> ``(B,)``.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    bsz, c = x_blocks.shape[:2]
    bs = x_blocks.shape[-3:]
    w = max(1, min(win_size, *bs))

    def fold(t: torch.Tensor) -> torch.Tensor:  # (B, C, n.., b, b, b) -> (B * N, C, b, b, b)
        return t.flatten(2, -4).transpose(1, 2).reshape(-1, c, *bs)

    s, _ = compute_ssim_and_cs(
        fold(y_blocks), fold(x_blocks), spatial_dims=3, kernel_size=[w] * 3, kernel_sigma=[1.5] * 3,
        data_range=float(data_range), kernel_type="gaussian",
    )
    return s.reshape(bsz, -1).mean(dim=1)


class PatchSSIM:
    """:func:`patch_ssim` against a fixed reference, with the reference's local statistics cached.

    The attacks compare every candidate with the same clean blocks, so ``mu_x`` and ``sigma_x^2``
    are computed once; each call filters only ``y``, ``y^2`` and ``x * y``, with the separable
    gaussian window applied as one ``einsum`` with a banded matrix per axis. Same value and gradient as
    :func:`patch_ssim` (MONAI ``compute_ssim_and_cs``) to float precision (tested); it exists
    because it makes the per-step SSIM about 40% cheaper (benchmarks/bench_overhead.py).

    Args:
        ref_blocks: reference blocks ``(B, C, nH, nW, nD, b, b, b)`` (constant, no gradient needed).
        win_size: SSIM window side (VAFA: 3), clipped to the block side.
        data_range: intensity range (1 for bounds-normalised images).
        sigma: gaussian window sigma (1.5, Wang et al. 2004).

    Shape:
        ``__call__``: blocks ``(B, C, nH, nW, nD, b, b, b)`` -> ``(B,)``.
    """

    def __init__(self, ref_blocks: torch.Tensor, *, win_size: int = 3, data_range: float = 1.0,
                 sigma: float = 1.5) -> None:
        ref = ref_blocks.detach().float()
        w = max(1, min(win_size, *ref.shape[-3:]))
        self.taps = _gaussian_taps(w, sigma, ref.device, ref.dtype)
        self.ref = ref
        self.mu_x = _valid_filter3(ref, self.taps)
        self.var_x = _valid_filter3(ref * ref, self.taps) - self.mu_x * self.mu_x
        self.data_range = float(data_range)

    def __call__(self, y_blocks: torch.Tensor) -> torch.Tensor:
        y = y_blocks.float()
        st = _valid_filter3(torch.stack([y, y * y, y * self.ref]), self.taps)
        mu_y = st[0]
        var_y = st[1] - mu_y * mu_y
        cov = st[2] - self.mu_x * mu_y
        s = _ssim_map(self.mu_x, mu_y, self.var_x, var_y, cov, self.data_range)
        return s.flatten(1).mean(dim=1)


class SpectralAttack(Attack):
    """Shared plumbing of the frequency-domain attacks (not registered).

    Args:
        model: the segmenter.
        steps: number of signed update steps, >= 0.
        objective: per-sample objective, one of ``objectives.OBJECTIVES`` (``"dice"``, ``"dice_ce"``,
            ``"ce"``, ``"segpgd"``, ``"cospgd"``).
        **kwargs: :class:`~volattack.attacks.base.Attack` options (bounds, seed, targeted,
            target_labels, mask, inferer, unit_scale, amp_dtype, ...).

    Shape:
        images ``(B, C, H, W, D)`` -> same.
    """

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

    def _gain(self, logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], step: int) -> torch.Tensor:
        """Per-sample objective oriented for ascent (negated toward the target when targeted).

        Shape:
            logits ``(B, K, H, W, D)`` -> ``(B,)``.
        """
        steps = max(self.steps, 1)
        if target is None:
            return objective_per_sample(logits, y, self.objective, step=step, steps=steps)
        return -objective_per_sample(logits, target, self.objective, step=step, steps=steps, targeted=True)

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
    ) -> torch.Tensor:
        """Run ``steps`` ascent steps: ``adv = candidate(p, t)``, ``J = score(adv, logits, t)``
        (per sample, to maximise), ``p <- update(p, dJ/dp, t)``. Returns the final parameter."""
        for t in range(self.steps):
            p = param.detach().requires_grad_(True)
            adv = candidate(p, t)
            logits = self.forward(adv)
            if t == 0:
                self.check_num_classes(logits, y, target)
            g = self._ascent_grad(score(adv, logits, t).sum(), p, adv)
            param = update(param.detach(), g, t)
        return param.detach()


# =================================================================================== VAFA
@register_attack("vafa")
class VAFA(SpectralAttack):
    """Volumetric Adversarial Frequency Attack (Hanif et al., MICCAI 2023).

    Each non-overlapping cube ``x_i`` of side ``block_size`` (on the 0..255 scale
    ``255 * x01``, optionally minus 128) is replaced by
    ``x'_i = idct3(round(dct3(x_i) / q_i) * q_i) / 255`` with a learnable table ``q_i`` per
    block and per DCT coefficient. The attack maximises
    ``L_obj(M(X'), Y) - ssim_weight * L_ssim(X, X')`` with ``L_ssim = 1 - mean_i SSIM(x_i, x'_i)``
    (:func:`patch_ssim`, window 3) by signed steps ``q <- clip(q + sign(grad_q), q_min, q_max)``.
    Targeted: ``-L_obj(M(X'), T) - ssim_weight * L_ssim``.

    During the steps rounding is differentiable: ``"soft"`` (default, AdvDrop
    :func:`~volattack.attacks.spectral.soft_round` with ``a`` annealed linearly from
    ``soft_round_a`` at the first step to ``soft_round_a / steps`` at the last, i.e. toward 0),
    ``"ste"`` (:func:`~volattack.attacks.spectral.ste_round`), or ``"hard"`` (``torch.round``; the
    gradient then flows only through the outer ``* q``). **The returned image always uses hard
    rounding with the final q** and is clamped to the bounds. With an orthonormal DCT each
    coefficient moves by at most ``q / 2``, so the RMS change before clamping is at most
    ``q_max / 2`` on the 0..255 scale (q_max 20 -> 10/255 RMS), i.e.
    ``q_max / (2 * intensity_scale) * (hi - lo)`` in input units.

    Paper defaults: q init 1, q_min 1, q_max 20, 8^3 blocks, 20 steps, Dice loss, soft rounding.
    The published code's departures are options: ``q_init="qmax"`` with ``q_min=5``,
    ``objective="dice_ce"``, ``center_128=True``, ``slice_renorm=True``.

    Args:
        model: the segmenter.
        q_max: upper bound of the tables (0..255 intensity scale), >= 1.
        q_min: lower bound, in ``[1, q_max]``.
        q_init: ``"one"`` (paper) or ``"qmax"`` (published code) initial tables.
        block_size: cube side b in voxels, >= 2 and at most the smallest volume side (sides that
            are not multiples of b are replicate-padded, see ``block_split``).
        steps: signed update steps, >= 0 (0 quantises once with the initial tables).
        objective: ``"dice"`` (paper), ``"dice_ce"`` (code) or any other objective name.
        rounding: ``"soft"``, ``"ste"`` or ``"hard"`` during the steps.
        soft_round_a: initial AdvDrop softness in (0, 1) (0.1).
        center_128: subtract 128 before the DCT (JPEG style; changes only the DC coefficient).
        slice_renorm: min-max renormalise every axial slice (last axis) of X' to the unit range
            as the published code does. WARNING: this is an unbounded contrast change that
            q_max does not control (on CT with all-air slices it reaches Dice 0 at SSIM 0.63);
            off by default. Constant slices are left unchanged (no division by zero).
        ssim_weight: weight of ``L_ssim`` (1).
        intensity_scale: the quantisation scale (255: published q values refer to 0..255).
        **kwargs: :class:`~volattack.attacks.base.Attack` options.

    Shape:
        images ``(B, C, H, W, D)`` -> same; q ``(B, C, nH, nW, nD, b, b, b)``.

    Info extras: ``q_mean`` and ``q_max_used`` (per sample), ``steps_run``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        q_max: float = 20.0,
        q_min: float = 1.0,
        q_init: str = "one",
        block_size: int = 8,
        steps: int = 20,
        objective: str = "dice",
        rounding: str = "soft",
        soft_round_a: float = 0.1,
        center_128: bool = False,
        slice_renorm: bool = False,
        ssim_weight: float = 1.0,
        intensity_scale: float = 255.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, steps=steps, objective=objective, **kwargs)
        check_number("q_max", q_max, low=1)
        check_number("q_min", q_min, low=1, high=q_max)
        check_number("block_size", block_size, low=2, integer=True)
        check_number("soft_round_a", soft_round_a, low=0, high=1, low_open=True, high_open=True)
        check_number("ssim_weight", ssim_weight, low=0)
        check_number("intensity_scale", intensity_scale, low=0, low_open=True)
        self.q_max = float(q_max)
        self.q_min = float(q_min)
        self.q_init = check_choice("q_init", q_init, ("one", "qmax"))
        self.block_size = int(block_size)
        self.rounding = check_choice("rounding", rounding, ("soft", "ste", "hard"))
        self.soft_round_a = float(soft_round_a)
        self.center_128 = check_bool("center_128", center_128)
        self.slice_renorm = check_bool("slice_renorm", slice_renorm)
        self.ssim_weight = float(ssim_weight)
        self.intensity_scale = float(intensity_scale)

    def _round(self, v: torch.Tensor, t: Optional[int]) -> torch.Tensor:
        if t is None or self.rounding == "hard":
            return torch.round(v)
        if self.rounding == "ste":
            return ste_round(v)
        return soft_round(v, self.soft_round_a * (1.0 - t / self.steps))

    def _reconstruct(self, coeffs: torch.Tensor, q: torch.Tensor, shape: torch.Size, t: Optional[int]) -> torch.Tensor:
        """Quantise the block coefficients with q and return the unit-range volume.

        Shape:
            coeffs, q ``(B, C, nH, nW, nD, b, b, b)`` -> ``shape``.
        """
        blocks = idct3(self._round(coeffs / q, t) * q)
        if self.center_128:
            blocks = blocks + 128.0
        x01 = block_merge(blocks, shape) / self.intensity_scale
        if self.slice_renorm:
            x01 = slice_minmax(x01)
        return x01

    def _attack(self, x, y, target, mask, seed):
        x01 = self._to_unit(x)
        b = self.block_size
        blocks = x01 * self.intensity_scale
        if self.center_128:
            blocks = blocks - 128.0
        coeffs = dct3(block_split(blocks, b))
        ssim = PatchSSIM(block_split(x01, b))
        init = 1.0 if self.q_init == "one" else self.q_max
        q = torch.full_like(coeffs, init).clamp(self.q_min, self.q_max)

        def candidate(p: torch.Tensor, t: int) -> torch.Tensor:
            return self._from_unit(self._reconstruct(coeffs, p, x.shape, t), x, mask, straight_through=True)

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            l_ssim = 1.0 - ssim(block_split(self._to_unit(adv), b))
            return self._gain(logits, y, target, t + 1) - self.ssim_weight * l_ssim

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            return (p + g.sign()).clamp(self.q_min, self.q_max)

        q = self._step_loop(q, candidate, score, update, y, target)
        with torch.no_grad():
            adv = self._from_unit(self._reconstruct(coeffs, q, x.shape, None), x, mask)
            qf = q.flatten(1)
            extra = {
                "steps_run": self.steps,
                "q_mean": qf.mean(dim=1).tolist(),
                "q_max_used": qf.amax(dim=1).tolist(),
            }
        return adv, extra


def slice_minmax(x01: torch.Tensor) -> torch.Tensor:
    """Min-max renormalise each axial slice (last spatial axis) to [0, 1], as the published VAFA
    code does; constant slices are returned unchanged instead of dividing by zero.

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """
    lo = x01.amin(dim=(2, 3), keepdim=True)
    hi = x01.amax(dim=(2, 3), keepdim=True)
    rng = hi - lo
    ok = rng > 1e-12
    return torch.where(ok, (x01 - lo) / torch.where(ok, rng, torch.ones_like(rng)), x01)


# ==================================================================================== SA2
@register_attack("sa2")
class SA2(SpectralAttack):
    """Spectrum Adversarial Attack, multiplicative spectral noise (Hanif et al., ISBI 2025).

    Per block of side b (centred at 0.5 by default, as in the code):
    ``x'_i = idct3(dct3(x_i - 0.5) * xi_i) + 0.5`` with ``xi_i`` in ``[1 - rho, 1 + rho]``
    per coefficient; the DC coefficient is never perturbed and ``xi = 1`` outside ``band``
    (:func:`~volattack.attacks.spectral.band_mask`). ``xi`` starts uniform in
    ``[1 - rho, 1 + rho)`` (seeded, the same draw for every sample, ``Attack.sample_noise``) and
    ascends ``l_dc * L_obj(M(X'), Y) - l_ssim * L_ssim(X, X')`` (``L_ssim`` as in VAFA,
    :func:`patch_ssim`) by ``xi <- clip(xi + beta * sign(grad_xi), 1 - rho, 1 + rho)``.
    Targeted: ``-l_dc * L_obj(M(X'), T) - l_ssim * L_ssim``.
    Budget (Parseval): per block ``||x'_i - x_i||_2 <= rho * ||x_i - mean(x_i)||_2`` before
    clamping, in bounds-normalised units.

    Defaults are the published code's (rho 0.2, 20 steps, l_dc 0.01, l_ssim 1, 8^3 blocks,
    beta 0.1); the published run used rho 0.4, 10 steps, 16^3 blocks, l_dc 0.2, l_ssim 0.75.

    Args:
        model: the segmenter.
        rho: multiplicative budget in [0, 1); 0 returns the input exactly.
        steps: signed steps, >= 0 (0 returns the random start).
        beta: step of xi, > 0.
        l_dc: weight of the segmentation objective, >= 0.
        l_ssim: weight of ``L_ssim``, >= 0.
        block_size: cube side b, >= 2 and at most the smallest volume side.
        band: ``"all"``, ``"low"``, ``"middle"`` or ``"high"``.
        center: subtract 0.5 before the DCT (changes only the DC coefficient, which is kept).
        objective: ``"dice"`` (paper's L_dice) or any other objective name.
        **kwargs: :class:`~volattack.attacks.base.Attack` options.

    Shape:
        images ``(B, C, H, W, D)`` -> same; xi ``(B, C, nH, nW, nD, b, b, b)``.

    Info extras: ``xi_mean_abs_dev`` (per sample mean ``|xi - 1|`` over the band), ``steps_run``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rho: float = 0.2,
        steps: int = 20,
        beta: float = 0.1,
        l_dc: float = 0.01,
        l_ssim: float = 1.0,
        block_size: int = 8,
        band: str = "all",
        center: bool = True,
        objective: str = "dice",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, steps=steps, objective=objective, **kwargs)
        check_number("rho", rho, low=0, high=1, high_open=True)
        check_number("beta", beta, low=0, low_open=True)
        check_number("l_dc", l_dc, low=0)
        check_number("l_ssim", l_ssim, low=0)
        check_number("block_size", block_size, low=2, integer=True)
        self.rho = float(rho)
        self.beta = float(beta)
        self.l_dc = float(l_dc)
        self.l_ssim = float(l_ssim)
        self.block_size = int(block_size)
        self.band = _check_band(band)
        self.center = check_bool("center", center)

    def _attack(self, x, y, target, mask, seed):
        if self.rho == 0:
            return x.clone(), {"steps_run": 0, "xi_mean_abs_dev": [0.0] * x.shape[0]}
        b = self.block_size
        off = 0.5 if self.center else 0.0
        x01 = self._to_unit(x)
        ref_blocks = block_split(x01, b)
        coeffs = dct3(ref_blocks - off)
        ssim = PatchSSIM(ref_blocks)
        band = band_mask(b, self.band, exclude_dc=True, device=x.device)
        lo, hi = 1.0 - self.rho, 1.0 + self.rho
        xi = 1.0 + self.rho * self.sample_noise(coeffs, seed, "uniform")
        xi = torch.where(band, xi, torch.ones_like(xi))

        def candidate(p: torch.Tensor, t: int, straight_through: bool = True) -> torch.Tensor:
            return self._from_unit(block_merge(idct3(coeffs * p) + off, x.shape), x, mask, straight_through)

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            l_ssim = 1.0 - ssim(block_split(self._to_unit(adv), b))
            return self.l_dc * self._gain(logits, y, target, t + 1) - self.l_ssim * l_ssim

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            p = (p + self.beta * g.sign()).clamp(lo, hi)
            return torch.where(band, p, torch.ones_like(p))

        xi = self._step_loop(xi, candidate, score, update, y, target)
        with torch.no_grad():
            adv = candidate(xi, self.steps, straight_through=False)
            dev = (xi - 1.0).abs()[..., band].flatten(1).mean(dim=1)
        return adv, {"steps_run": self.steps, "xi_mean_abs_dev": dev.tolist()}


# ==================================================================================== FFT
@register_attack("fft")
class FFTAttack(SpectralAttack):
    """Spectral perturbation in the real-FFT domain (REFERENCE: "Additive spectral perturbation").

    ``mode="additive"`` (default): the perturbation is ``delta = irfft3(M * Z)`` with a complex
    spectrum ``Z`` over the whole volume (or over each block when ``block_size`` is set) and a
    frequency mask ``M`` (``band`` and/or ``radius``, :func:`~volattack.attacks.spectral.rfft_mask`).
    The model sees ``clip(x + mask * P(delta))`` with ``P`` the projection onto the L-inf (default)
    or L2 eps-ball. Each step is a signed gradient step in the spectrum (``sign`` of the real and
    imaginary parts for L-inf; the raw gradient for L2; no Adam), rescaled per sample so that its
    voxel-domain image has L-inf (resp. L2) norm ``alpha``; afterwards ``Z`` is reset to the masked
    spectrum of the projected, bounds-clamped delta. The random start is band-limited seeded noise
    (``Attack.sample_noise``) scaled to norm ``eps / 2``. The returned image is always projected
    into the eps-ball (so with L-inf clipping the band limit holds only approximately).

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
        self.band = _check_band(band)
        self.radius = radius
        self.block_size = None if block_size is None else int(block_size)
        self.random_start = check_bool("random_start", random_start)
        self.rho = float(rho)
        self.beta = float(beta)
        self.exclude_dc = (self.mode == "amplitude") if exclude_dc is None else check_bool("exclude_dc", exclude_dc)

    # --------------------------------------------------------------- transforms
    def _freq_mask(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.block_size,) * 3 if self.block_size is not None else tuple(x.shape[2:])
        if self.block_size is not None:
            _check_block(self.block_size, x.shape[2:], x.shape)
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
    def _attack(self, x, y, target, mask, seed):
        m = self._freq_mask(x)
        wd = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(wd)
        if self.mode == "amplitude":
            return self._amplitude(x, xw, y, target, mask, seed, m)
        if self.eps == 0:
            return x.clone(), {"steps_run": 0}
        mr = m.unsqueeze(-1).to(wd)  # mask on the real view (..., 2)

        def to_delta(z: torch.Tensor) -> torch.Tensor:
            return self._vol(torch.view_as_complex(z * mr), x.shape)

        def to_param(delta: torch.Tensor) -> torch.Tensor:
            return torch.view_as_real(self._spec(delta)) * mr

        if self.random_start:
            noise = to_delta(to_param(self.sample_noise(xw, seed, "uniform" if self.norm == "linf" else "normal")))
            n = self._norm(noise).clamp_min(1e-12)
            delta0 = noise * per_sample_view(0.5 * self.eps / n, noise)
        else:
            delta0 = torch.zeros_like(xw)
        z = to_param(self._apply(xw, delta0, mask) - xw)

        def candidate(p: torch.Tensor, t: int, straight_through: bool = True) -> torch.Tensor:
            return self._apply(xw, to_delta(p), mask, straight_through).to(x.dtype)

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            return self._gain(logits, y, target, t + 1)

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            d = g.sign() if self.norm == "linf" else g
            n = self._norm(to_delta(d)).clamp_min(1e-12)
            p = p + d * per_sample_view(self.alpha / n, d)
            return to_param(self._apply(xw, to_delta(p), mask) - xw)

        z = self._step_loop(z, candidate, score, update, y, target)
        with torch.no_grad():
            adv = candidate(z, self.steps, straight_through=False)
        return adv, {"steps_run": self.steps, "mode": self.mode, "norm": self.norm}

    def _amplitude(self, x, xw, y, target, mask, seed, m):
        if self.rho == 0:
            return x.clone(), {"steps_run": 0, "mode": self.mode, "norm": self.norm}
        spec = self._spec(xw)
        shape = spec.shape
        lo, hi = 1.0 - self.rho, 1.0 + self.rho
        ones = torch.ones(shape, dtype=xw.dtype, device=x.device)
        if self.random_start:
            s = 1.0 + self.rho * self.sample_noise(ones, seed, "uniform")
        else:
            s = ones
        s = torch.where(m, s, ones)

        def candidate(p: torch.Tensor, t: int, straight_through: bool = True) -> torch.Tensor:
            return self._apply(xw, self._vol(spec * p, x.shape) - xw, mask, straight_through).to(x.dtype)

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            return self._gain(logits, y, target, t + 1)

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            p = (p + self.beta * g.sign()).clamp(lo, hi)
            return torch.where(m, p, ones)

        s = self._step_loop(s, candidate, score, update, y, target)
        with torch.no_grad():
            adv = candidate(s, self.steps, straight_through=False)
        return adv, {"steps_run": self.steps, "mode": self.mode, "norm": self.norm}


__all__ = ["FFTAttack", "PatchSSIM", "SA2", "SpectralAttack", "VAFA", "patch_ssim", "slice_minmax"]
