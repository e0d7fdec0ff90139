"""SA^2: Spectrum Adversarial Attack (Hanif et al., ISBI 2025): multiplicative noise in
``[1 - rho, 1 + rho]`` on the 3D DCT coefficients of each non-overlapping cubic block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from volattack.attacks.base import register_attack
from volattack.attacks.spectral import check_band, band_mask, block_merge, block_split, dct3, idct3
from volattack.attacks.spectral_base import PatchSSIM, SpectralAttack
from volattack.checks import check_bool, check_number

__all__ = ["SA2"]


@register_attack("sa2")
class SA2(SpectralAttack):
    """Spectrum Adversarial Attack, multiplicative spectral noise (Hanif et al., ISBI 2025).

    Per block of side b (centred at 0.5 by default, as in the code):
    ``x'_i = idct3(dct3(x_i - 0.5) * xi_i) + 0.5`` with ``xi_i`` in ``[1 - rho, 1 + rho]``
    per coefficient; the DC coefficient is never perturbed and ``xi = 1`` outside ``band``
    (:func:`~volattack.attacks.spectral.band_mask`). ``xi`` starts uniform in
    ``[1 - rho, 1 + rho)`` (seeded, one draw per sample from its own stream,
    :meth:`~volattack.attacks.base.Attack.sample_noise`) and
    ascends ``l_dc * L_obj(M(X'), Y) - l_ssim * L_ssim(X, X')`` (``L_ssim`` as in VAFA,
    :class:`~volattack.attacks.spectral_base.PatchSSIM`, the published objective) by ``xi <- clip(xi + beta * sign(grad_xi), 1 - rho, 1 + rho)``.
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
        self.band = check_band(band)
        self.center = check_bool("center", center)

    @property
    def is_random(self) -> bool:
        return self.rho > 0

    def _attack(self, x, y, target, mask, rng):
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
        xi = 1.0 + self.rho * self.sample_noise(coeffs, rng, "uniform")
        xi = torch.where(band, xi, torch.ones_like(xi))

        def candidate(p: torch.Tensor, t: int, straight_through: bool = True) -> torch.Tensor:
            return self._from_unit(block_merge(idct3(coeffs * p) + off, x.shape), x, mask, straight_through)

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            l_ssim = 1.0 - ssim(block_split(self._to_unit(adv), b))
            return self.l_dc * self.gain(logits, y, target, t + 1) - self.l_ssim * l_ssim

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            p = (p + self.beta * g.sign()).clamp(lo, hi)
            return torch.where(band, p, torch.ones_like(p))

        xi, steps_run = self._step_loop(xi, candidate, score, update, y, target)
        with torch.no_grad():
            adv = candidate(xi, self.steps, straight_through=False)
            dev = (xi - 1.0).abs()[..., band].flatten(1).mean(dim=1)
        return adv, {"steps_run": steps_run, "xi_mean_abs_dev": dev.tolist()}
