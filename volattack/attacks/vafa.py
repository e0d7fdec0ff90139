"""VAFA: Volumetric Adversarial Frequency Attack (Hanif et al., "Frequency Domain Adversarial
Training for Robust Volumetric Medical Segmentation", MICCAI 2023): learnable quantisation
tables on the 3D DCT of non-overlapping cubic blocks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from volattack.attacks.base import register_attack
from volattack.attacks.spectral import block_merge, block_split, dct3, idct3, soft_round, ste_round
from volattack.attacks.spectral_base import PatchSSIM, SpectralAttack
from volattack.checks import check_bool, check_choice, check_number

__all__ = ["PROTOCOLS", "VAFA", "slice_minmax"]

#: the defaults each ``protocol`` gives (Hanif et al., MICCAI 2023: the paper's text and its
#: published code; the code's per-slice renormalisation is left out of both, see ``slice_renorm``)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "code": {"q_init": "qmax", "q_min": 5.0, "objective": "dice_ce", "center_128": True},
    "paper": {"q_init": "one", "q_min": 1.0, "objective": "dice", "center_128": False},
}


@register_attack("vafa")
class VAFA(SpectralAttack):
    """Volumetric Adversarial Frequency Attack (Hanif et al., MICCAI 2023).

    Each non-overlapping cube ``x_i`` of side ``block_size`` (on the 0..255 scale
    ``255 * x01``, optionally minus 128) is replaced by
    ``x'_i = idct3(round(dct3(x_i) / q_i) * q_i) / 255`` with a learnable table ``q_i`` per
    block and per DCT coefficient. The attack maximises
    ``L_obj(M(X'), Y) - ssim_weight * L_ssim(X, X')`` with ``L_ssim = 1 - mean_i SSIM(x_i, x'_i)``
    (:class:`~volattack.attacks.spectral_base.PatchSSIM`, window 3: the
    published objective, not the reported SSIM) by signed steps ``q <- clip(q + sign(grad_q), q_min, q_max)``.
    Targeted: ``-L_obj(M(X'), T) - ssim_weight * L_ssim``.

    During the steps rounding is differentiable: ``"soft"`` (default, AdvDrop
    :func:`~volattack.attacks.spectral.soft_round` with ``a`` annealed linearly from
    ``soft_round_a`` at the first step to ``soft_round_a / steps`` at the last, i.e. toward 0),
    ``"ste"`` (:func:`~volattack.attacks.spectral.ste_round`), or ``"hard"`` (``torch.round``; the
    gradient then flows only through the outer ``* q``). With ``output="hard"`` (default) **the
    returned image uses hard rounding with the final q**; it is clamped to the bounds. With an orthonormal DCT each
    coefficient moves by at most ``q / 2``, so the RMS change before clamping is at most
    ``q_max / 2`` on the 0..255 scale (q_max 20 -> 10/255 RMS), i.e.
    ``q_max / (2 * intensity_scale) * (hi - lo)`` in input units.

    Two protocols (``protocol``) fix the options on which the paper's text and its published code
    disagree; keyword arguments given explicitly override the protocol's value:

    - ``"code"`` (default): the configuration behind the published numbers, without the
      published code's per-slice renormalisation: ``q_init="qmax"``, ``q_min=5`` (``q_max`` if
      smaller), ``objective="dice_ce"``, ``center_128=True``. On a phantom CT model (clean Dice
      0.74, q_max 20, 20 steps, 8^3 blocks) it reaches Dice 0.42 where the paper's text reaches
      0.72, almost a no-op: the sign of ``dL/dq`` follows the rounding sawtooth, so tables started
      at 1 barely move.
    - ``"paper"``: the paper's text, ``q_init="one"``, ``q_min=1``, ``objective="dice"``,
      ``center_128=False``.

    ``output``: ``"hard"`` (default) returns the hard quantisation with the final tables;
    ``"soft_last"`` returns what the published code returns, the candidate of the last step
    (soft-rounded with that step's softness, built with the tables *before* the final update, so
    the last update is wasted), which lies closer to the input than the hard output.

    Args:
        model: the segmenter.
        q_max: upper bound of the tables (0..255 intensity scale), >= 1.
        q_min: lower bound, in ``[1, q_max]`` (default: the protocol's).
        q_init: ``"one"`` (paper) or ``"qmax"`` (published code) initial tables (default: the protocol's).
        block_size: cube side b in voxels, >= 2 and at most the smallest volume side (sides that
            are not multiples of b are replicate-padded, see ``block_split``).
        steps: signed update steps, >= 0 (0 quantises once with the initial tables).
        objective: ``"dice"`` (paper), ``"dice_ce"`` (code) or any other objective name (default:
            the protocol's).
        rounding: ``"soft"``, ``"ste"`` or ``"hard"`` during the steps.
        soft_round_a: initial AdvDrop softness in (0, 1) (0.1).
        center_128: subtract 128 before the DCT (JPEG style; changes only the DC coefficient;
            default: the protocol's).
        slice_renorm: min-max renormalise every axial slice (last axis) of X' to the unit range
            as the published code does. WARNING: this is an unbounded contrast change that
            q_max does not control (on CT with all-air slices it reaches Dice 0 at SSIM 0.63);
            off by default. Constant slices are left unchanged (no division by zero).
        ssim_weight: weight of ``L_ssim`` (1).
        intensity_scale: the quantisation scale (255: published q values refer to 0..255).
        protocol: ``"code"`` (default) or ``"paper"``: the defaults of ``q_init``, ``q_min``,
            ``objective`` and ``center_128`` (see above).
        output: ``"hard"`` (default) or ``"soft_last"`` (the published code's returned image;
            needs ``steps >= 1``).
        **kwargs: :class:`~volattack.attacks.base.Attack` options.

    Shape:
        images ``(B, C, H, W, D)`` -> same; q ``(B, C, nH, nW, nD, b, b, b)``.

    Info extras: ``q_mean`` and ``q_max_used`` (per sample), ``steps_run``. Deterministic (the
    tables start at a constant), so ``restarts > 1`` is rejected.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        q_max: float = 20.0,
        q_min: Optional[float] = None,
        q_init: Optional[str] = None,
        block_size: int = 8,
        steps: int = 20,
        objective: Optional[str] = None,
        rounding: str = "soft",
        soft_round_a: float = 0.1,
        center_128: Optional[bool] = None,
        slice_renorm: bool = False,
        ssim_weight: float = 1.0,
        intensity_scale: float = 255.0,
        protocol: str = "code",
        output: str = "hard",
        **kwargs: Any,
    ) -> None:
        self.protocol = check_choice("protocol", protocol, tuple(PROTOCOLS))
        preset = PROTOCOLS[self.protocol]
        check_number("q_max", q_max, low=1)
        if q_min is None:
            q_min = min(preset["q_min"], float(q_max))
        q_init = preset["q_init"] if q_init is None else q_init
        objective = preset["objective"] if objective is None else objective
        center_128 = preset["center_128"] if center_128 is None else center_128
        super().__init__(model, steps=steps, objective=objective, **kwargs)
        check_number("q_min", q_min, low=1, high=q_max)
        check_number("block_size", block_size, low=2, integer=True)
        check_number("soft_round_a", soft_round_a, low=0, high=1, low_open=True, high_open=True)
        check_number("ssim_weight", ssim_weight, low=0)
        check_number("intensity_scale", intensity_scale, low=0, low_open=True)
        self.output = check_choice("output", output, ("hard", "soft_last"))
        if self.output == "soft_last" and self.steps == 0:
            raise ValueError("output='soft_last' needs steps >= 1 (it returns the last step's image), got steps=0.")
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

    def _attack(self, x, y, target, mask, rng):
        x01 = self._to_unit(x)
        b = self.block_size
        blocks = x01 * self.intensity_scale
        if self.center_128:
            blocks = blocks - 128.0
        coeffs = dct3(block_split(blocks, b))
        ssim = PatchSSIM(block_split(x01, b))
        init = 1.0 if self.q_init == "one" else self.q_max
        q = torch.full_like(coeffs, init).clamp(self.q_min, self.q_max)

        last: dict[str, torch.Tensor] = {}

        def candidate(p: torch.Tensor, t: int) -> torch.Tensor:
            out = self._from_unit(self._reconstruct(coeffs, p, x.shape, t), x, mask, straight_through=True)
            last["adv"] = out.detach()  # the published code returns the last step's candidate
            return out

        def score(adv: torch.Tensor, logits: torch.Tensor, t: int) -> torch.Tensor:
            l_ssim = 1.0 - ssim(block_split(self._to_unit(adv), b))
            return self.gain(logits, y, target, t + 1) - self.ssim_weight * l_ssim

        def update(p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
            return (p + g.sign()).clamp(self.q_min, self.q_max)

        q, steps_run = self._step_loop(q, candidate, score, update, y, target)
        with torch.no_grad():
            if self.output == "soft_last":
                adv = last["adv"]
            else:
                adv = self._from_unit(self._reconstruct(coeffs, q, x.shape, None), x, mask)
            qf = q.flatten(1)
            extra = {
                "steps_run": steps_run,
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
