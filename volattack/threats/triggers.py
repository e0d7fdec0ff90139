"""Backdoor triggers for volumes: a registry (one decorator each) of patterns added to a
preprocessed model input.

A trigger acts on the model input ``x`` of shape ``(1, C, H, W, D)`` in model-input units (the
grid and affine after preprocessing, as the attacks do); its intensities and budgets are given
in source units (HU for CT) and mapped to model units by the intensity model's ``unit_scale``
(source units per model-input unit; ``None``: the parameters are taken in model units). The
result is clamped to the model-input bounds. Every random choice (the fixed pattern, the learned
trigger's start) comes from a local ``torch.Generator`` seeded by ``seed``, which is recorded.

Triggers:

- ``patch``: a cube of ``size`` voxels at a relative position or a world position in mm, whose
  voxels get ``intensity`` source units added.
- ``spectral``: FIBA (Feng et al., CVPR 2022) in 3D: the amplitude of the 3D FFT of the volume
  (or of each block of ``block_size``) is blended with that of a fixed seeded pattern inside the
  centred low-frequency cube of half-width ``floor(beta * min(shape))``,
  ``A <- (1 - alpha) A + alpha A_pattern``; the phase is kept (Xu et al., ICDM 2023, put such a
  frequency trigger into 3D grey-image segmentation). ``keep_dc`` leaves the mean out of the blend.
- ``dct``: a fixed seeded +-1 pattern in one band of the block 3D DCT (the DCT ops of the
  frequency attacks, :mod:`volattack.attacks.spectral`), scaled to a spatial RMS of ``rms``
  source units, the same in every block.
- ``learned``: an imperceptible tile-periodic pattern ``delta`` with ``||delta||_inf <= eps``
  (source units) optimised against a surrogate model so that it produces the target map
  (BAPLe, Hanif et al., MICCAI 2024, learns such a noise trigger).
- ``dct_learned`` (:mod:`volattack.threats.joint_trigger`): learned block-DCT coefficients of one
  band under an RMS budget, optimised into the victim's training (``train.poison.joint``, LIRA).

Each trigger reports its perceptibility like an attack (:meth:`Trigger.perceptibility`: L-inf
and RMS in model and source units, PSNR, SSIM, through :func:`volattack.measure.perturbation_stats`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from volattack.checks import check_number
from volattack.registry import Registry

TRIGGERS: Registry = Registry("trigger")


def register_trigger(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`Trigger` subclass as ``name``."""

    return TRIGGERS.register_class(name)


def list_triggers() -> list[str]:
    """Registered trigger names."""
    return TRIGGERS.names()


def create_trigger(name: str, *, bounds: Sequence[float] = (0.0, 1.0), unit_scale: Optional[float] = None,
                   seed: int = 0, **params: Any) -> "Trigger":
    """Build the trigger ``name`` (unknown names raise with a suggestion).

    Args:
        name: a registered trigger (:func:`list_triggers`).
        bounds: model-input range ``(lo, hi)`` the triggered volume is clamped to.
        unit_scale: source units per model-input unit (``None``: parameters in model units).
        seed: seed of the trigger's pattern.
        **params: the trigger's parameters.

    Raises:
        ValueError: unknown name or bad parameter (named).
    """
    cls = TRIGGERS.get(name)
    try:
        return cls(bounds=bounds, unit_scale=unit_scale, seed=seed, **params)
    except TypeError as e:
        raise ValueError(f"trigger {name!r}: {e}") from None


def _triple(name: str, v: Any) -> list[float]:
    vals = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if not isinstance(vals, (list, tuple)) or len(vals) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers, got {v!r}.")
    for x in vals:
        check_number(name, x)
    return [float(x) for x in vals]


class Trigger:
    """A trigger (see the module docstring).

    Args:
        bounds: model-input range ``(lo, hi)``.
        unit_scale: source units per model-input unit, or ``None``.
        seed: seed of the pattern (integer >= 0).
    """

    name: ClassVar[str] = ""

    def __init__(self, *, bounds: Sequence[float] = (0.0, 1.0), unit_scale: Optional[float] = None,
                 seed: int = 0) -> None:
        lo, hi = (float(b) for b in bounds)
        if not hi > lo:
            raise ValueError(f"bounds must be (lo, hi) with lo < hi, got {tuple(bounds)}.")
        if unit_scale is not None:
            check_number("unit_scale", unit_scale, low=0.0, low_open=True)
        check_number("seed", seed, low=0, integer=True)
        self.bounds, self.unit_scale, self.seed = (lo, hi), unit_scale, int(seed)
        self.params: dict[str, Any] = {}

    def units(self, v: float) -> float:
        """Source units -> model-input units (identity without a unit scale)."""
        return float(v) / self.unit_scale if self.unit_scale else float(v)

    def generator(self) -> torch.Generator:
        """A fresh local generator seeded by :attr:`seed` (the same pattern on every call)."""
        return torch.Generator().manual_seed(self.seed)

    def check_fits(self, shape: Sequence[int], affine: Any = None) -> None:
        """Raise ``ValueError`` when the trigger does not fit a volume of spatial ``shape``."""

    def delta(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        """The additive change (before clamping), same shape as ``x``."""
        raise NotImplementedError

    def mask(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        """``(1, 1, H, W, D)`` bool: the voxels the trigger covers (all for whole-volume triggers)."""
        return torch.ones((1, 1, *x.shape[2:]), dtype=torch.bool, device=x.device)

    def apply(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        """The triggered input ``clamp(x + delta, lo, hi)``, same shape, dtype and device, detached.

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, C, H, W, D)`` (one pattern for every sample).
        """
        if x.ndim != 5:
            raise ValueError(f"x must have shape (B, C, H, W, D), got {tuple(x.shape)}.")
        self.check_fits(x.shape[2:], affine)
        with torch.no_grad():
            return (x + self.delta(x, affine).to(x.dtype)).clamp(*self.bounds).detach()

    __call__ = apply

    def perceptibility(self, x: torch.Tensor, x_t: torch.Tensor) -> dict[str, float]:
        """Size of the trigger on one input, as an attack reports it (sample 0): ``linf``, ``rms``,
        ``psnr``, ``ssim`` in model units and ``linf_units``, ``rms_units`` in source units."""
        from volattack.measure import perturbation_stats

        stats = perturbation_stats(x, x_t, data_range=self.bounds, unit_scale=self.unit_scale)
        return {k: float(v.flatten()[0]) for k, v in stats.items()}

    def describe(self) -> dict[str, Any]:
        """``{"name", "params", "seed", "bounds", "unit_scale"}`` (plain values)."""
        return {"name": self.name, "params": dict(self.params), "seed": self.seed, "bounds": list(self.bounds),
                "unit_scale": self.unit_scale}


@register_trigger("patch")
class PatchTrigger(Trigger):
    """A cube of voxels whose intensity is changed.

    Args:
        size: side(s) in voxels (1 or 3 positive integers).
        position: centre as a fraction of each side in [0, 1] (default the centre of the volume).
        position_mm: centre in world mm (RAS, through the affine); overrides ``position``.
        intensity: source units added to the cube's voxels (0: identity).
    """

    def __init__(self, *, size: Any = 4, position: Any = (0.5, 0.5, 0.5), position_mm: Any = None,
                 intensity: float = 200.0, **kw: Any) -> None:
        super().__init__(**kw)
        sz = [int(s) for s in _triple("size", size)]
        if min(sz) < 1 or any(s != v for s, v in zip(sz, _triple("size", size))):
            raise ValueError(f"size must be positive integers (voxels), got {size!r}.")
        pos = _triple("position", position)
        if any(not 0 <= p <= 1 for p in pos):
            raise ValueError(f"position must be fractions in [0, 1], got {position!r}.")
        check_number("intensity", intensity)
        self.size, self.position, self.intensity = sz, pos, float(intensity)
        self.position_mm = None if position_mm is None else _triple("position_mm", position_mm)
        self.params = {"size": sz, "position": pos, "position_mm": self.position_mm, "intensity": self.intensity}

    def box(self, shape: Sequence[int], affine: Any = None) -> list[tuple[int, int]]:
        """``[(start, stop)] * 3`` voxel ranges of the cube in a volume of spatial ``shape``."""
        if self.position_mm is not None:
            if affine is None:
                raise ValueError("position_mm needs the volume's affine (world mm), got affine=None.")
            aff = torch.as_tensor(affine, dtype=torch.float64)
            ijk = torch.linalg.solve(aff, torch.tensor([*self.position_mm, 1.0], dtype=torch.float64))[:3]
            centre = [float(c) for c in ijk]
        else:
            centre = [p * (n - 1) for p, n in zip(self.position, shape)]
        return [(int(round(c - s / 2.0)), int(round(c - s / 2.0)) + s) for c, s in zip(centre, self.size)]

    def check_fits(self, shape: Sequence[int], affine: Any = None) -> None:
        box = self.box(shape, affine)
        if any(a < 0 or b > n for (a, b), n in zip(box, shape)):
            raise ValueError(f"the patch trigger (size={self.size}, voxels {box}) does not fit in the volume of "
                             f"shape {list(shape)}; choose a smaller size or another position.")

    def mask(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        m = torch.zeros((1, 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
        (a0, b0), (a1, b1), (a2, b2) = self.box(x.shape[2:], affine)
        m[..., a0:b0, a1:b1, a2:b2] = True
        return m

    def delta(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        return self.mask(x, affine).to(x.dtype).expand_as(x) * self.units(self.intensity)


def uniform_pattern(g: torch.Generator, size: int, bounds: tuple[float, float]) -> torch.Tensor:
    """A fixed pattern ``(size, size, size)`` uniform in ``bounds`` drawn from ``g``."""
    lo, hi = bounds
    return torch.rand((size, size, size), generator=g, dtype=torch.float64) * (hi - lo) + lo


def low_frequency_cube(shape: Sequence[int], beta: float, device: Any = None) -> torch.Tensor:
    """Bool mask of the centred (fftshifted) low-frequency cube of half-width
    ``floor(beta * min(shape))`` of a 3D spectrum of ``shape`` (FIBA's square, in 3D)."""
    half = int(math.floor(beta * min(shape)))
    axes = [(torch.arange(n, device=device) - n // 2).abs() <= half for n in shape]
    return axes[0].view(-1, 1, 1) & axes[1].view(1, -1, 1) & axes[2].view(1, 1, -1)


@register_trigger("spectral")
class SpectralTrigger(Trigger):
    """FIBA's amplitude blend in 3D (module docstring).

    Args:
        alpha: blend weight in [0, 1] (FIBA's default 0.15; 0: identity).
        beta: band: the low-frequency cube's half-width is ``floor(beta * min(side))``, beta in [0, 0.5].
        block_size: blend each cube of this side separately (``None``: the whole volume).
        pattern_size: side of the fixed seeded pattern (resized trilinearly to the volume or block).
        keep_dc: leave the zero-frequency coefficient (the mean of the volume or block) out of the
            blend (FIBA blends it: ``False``), so the budget goes to texture, not brightness.
    """

    def __init__(self, *, alpha: float = 0.15, beta: float = 0.1, block_size: Optional[int] = None,
                 pattern_size: int = 32, keep_dc: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        check_number("alpha", alpha, low=0.0, high=1.0)
        check_number("beta", beta, low=0.0, high=0.5)
        if block_size is not None:
            check_number("block_size", block_size, low=2, integer=True)
        check_number("pattern_size", pattern_size, low=2, integer=True)
        self.alpha, self.beta, self.block_size, self.pattern_size = float(alpha), float(beta), block_size, pattern_size
        if not isinstance(keep_dc, bool):
            raise ValueError(f"keep_dc must be True or False, got {keep_dc!r}.")
        self.keep_dc = keep_dc
        self.params = {"alpha": self.alpha, "beta": self.beta, "block_size": block_size, "pattern_size": pattern_size,
                       "keep_dc": keep_dc}
        self._pattern = uniform_pattern(self.generator(), pattern_size, self.bounds)

    def check_fits(self, shape: Sequence[int], affine: Any = None) -> None:
        if self.block_size is not None and self.block_size > min(shape):
            raise ValueError(f"the spectral trigger's block_size={self.block_size} does not fit in the volume of "
                             f"shape {list(shape)}.")

    def pattern(self, shape: Sequence[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
        """The fixed pattern resized to ``shape`` (trilinear, align_corners)."""
        p = self._pattern.to(device=device, dtype=torch.float64)[None, None]
        p = F.interpolate(p, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)
        return p[0, 0].to(dtype)

    def blend(self, v: torch.Tensor) -> torch.Tensor:
        """The amplitude blend of volumes ``v`` (``(..., H, W, D)``, float64) with the pattern."""
        shape = v.shape[-3:]
        spec = torch.fft.fftshift(torch.fft.fftn(v, dim=(-3, -2, -1)), dim=(-3, -2, -1))
        pat = torch.fft.fftshift(torch.fft.fftn(self.pattern(shape, v.dtype, v.device)), dim=(-3, -2, -1)).abs()
        amp, phase = spec.abs(), torch.angle(spec)
        m = low_frequency_cube(shape, self.beta, v.device)
        if self.keep_dc:
            m = m.clone()
            m[tuple(n // 2 for n in shape)] = False
        amp = torch.where(m, (1 - self.alpha) * amp + self.alpha * pat, amp)
        out = torch.polar(amp, phase)
        return torch.fft.ifftn(torch.fft.ifftshift(out, dim=(-3, -2, -1)), dim=(-3, -2, -1)).real

    def delta(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        from volattack.attacks.spectral import block_merge, block_split

        v = x.double()
        if self.alpha == 0:
            return torch.zeros_like(x)
        if self.block_size is None:
            return (self.blend(v) - v).to(x.dtype)
        blocks = block_split(v, int(self.block_size))
        return (block_merge(self.blend(blocks), v.shape) - v).to(x.dtype)


@register_trigger("dct")
class DCTTrigger(Trigger):
    """A fixed +-1 pattern in one band of the block 3D DCT (module docstring).

    Args:
        rms: spatial RMS of the added pattern in source units (0: identity).
        block_size: DCT block side (8 as in VAFA's blocks).
        band: ``"low"``, ``"middle"``, ``"high"`` or ``"all"`` (SA^2's bands, ``band_mask``).
    """

    def __init__(self, *, rms: float = 4.0, block_size: int = 8, band: str = "middle", **kw: Any) -> None:
        from volattack.attacks.spectral import band_mask

        super().__init__(**kw)
        check_number("rms", rms, low=0.0)
        check_number("block_size", block_size, low=2, integer=True)
        self.rms, self.block_size, self.band = float(rms), int(block_size), band
        mask = band_mask(self.block_size, band, exclude_dc=True).double()
        if mask.sum() == 0:
            raise ValueError(f"band {band!r} of block_size={block_size} holds no DCT coefficient.")
        signs = torch.randint(0, 2, mask.shape, generator=self.generator(), dtype=torch.int64).double() * 2 - 1
        self._coeffs = signs * mask * math.sqrt(self.block_size ** 3 / float(mask.sum()))  # unit spatial RMS
        self.params = {"rms": self.rms, "block_size": self.block_size, "band": band}

    def check_fits(self, shape: Sequence[int], affine: Any = None) -> None:
        if self.block_size > min(shape):
            raise ValueError(f"the dct trigger's block_size={self.block_size} does not fit in the volume of "
                             f"shape {list(shape)}.")

    def delta(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        from volattack.attacks.spectral import block_merge, block_split, idct3

        tile = idct3(self._coeffs.to(x.device)) * self.units(self.rms)
        blocks = block_split(torch.zeros_like(x, dtype=torch.float64), self.block_size)
        return block_merge(blocks + tile, x.shape).to(x.dtype)


def tile_to(pattern: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Repeat a ``(C, t1, t2, t3)`` pattern from the volume's origin and crop it to ``(C, *shape)``."""
    reps = [1] + [math.ceil(int(s) / t) for s, t in zip(shape, pattern.shape[1:])]
    return pattern.repeat(*reps)[(slice(None),) + tuple(slice(0, int(s)) for s in shape)]


@register_trigger("learned")
class LearnedTrigger(Trigger):
    """A tile-periodic pattern with ``||delta||_inf <= eps`` optimised against a surrogate (module docstring).

    Until :meth:`fit` (or a ``pattern`` file) sets it, the pattern is its seeded start, uniform
    in ``[-eps, eps]``.

    Args:
        eps: L-inf budget in source units (0: identity).
        tile: side of the periodic tile in voxels.
        channels: input channels C of the pattern.
        steps: sign-gradient steps of :meth:`fit`; step size ``eps / 4``.
        pattern: a file written by :meth:`save` (``torch.save`` of the pattern) to load instead.
    """

    def __init__(self, *, eps: float = 8.0, tile: int = 16, channels: int = 1, steps: int = 20,
                 pattern: Optional[str] = None, **kw: Any) -> None:
        super().__init__(**kw)
        check_number("eps", eps, low=0.0)
        check_number("tile", tile, low=1, integer=True)
        check_number("channels", channels, low=1, integer=True)
        check_number("steps", steps, low=0, integer=True)
        self.eps, self.tile, self.steps = float(eps), int(tile), int(steps)
        e = self.units(self.eps)
        self.pattern = (torch.rand((channels, tile, tile, tile), generator=self.generator(), dtype=torch.float64)
                        * 2 - 1) * e
        if pattern is not None:
            if not Path(pattern).is_file():
                raise FileNotFoundError(f"learned trigger pattern file not found: {pattern!r}.")
            loaded = torch.load(pattern, map_location="cpu", weights_only=True).double()
            if loaded.abs().max() > e * (1 + 1e-6):
                raise ValueError(f"the pattern in {pattern!r} exceeds eps={self.eps} source units.")
            self.pattern = loaded
        self.params = {"eps": self.eps, "tile": self.tile, "channels": channels, "steps": self.steps,
                       "pattern": pattern}

    def check_fits(self, shape: Sequence[int], affine: Any = None) -> None:
        if self.tile > min(shape):
            raise ValueError(f"the learned trigger's tile={self.tile} does not fit in the volume of shape {list(shape)}.")

    def delta(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        return tile_to(self.pattern.to(x.device), x.shape[2:]).unsqueeze(0).to(x.dtype)

    def fit(self, forward: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor],
            targets: Sequence[torch.Tensor]) -> "LearnedTrigger":
        """Optimise the pattern so that ``forward(clamp(x + delta))`` predicts the target maps.

        Sign-gradient descent (PGD, Madry et al., ICLR 2018) on the summed cross-entropy to the
        targets over ``images``, step ``eps / 4``, projected onto ``||delta||_inf <= eps`` after
        every step; deterministic given the seed and the inputs.

        Args:
            forward: the surrogate's logits of a model input ``(1, C, H, W, D)`` (e.g. its
                sliding-window inference); differentiable in the input.
            images: model inputs ``(1, C, H, W, D)``.
            targets: target maps ``(1, 1, H, W, D)`` long, one per image.
        """
        if len(images) != len(targets) or not images:
            raise ValueError(f"fit needs as many targets as images (>= 1), got {len(images)} and {len(targets)}.")
        e, step = self.units(self.eps), self.units(self.eps) / 4.0
        p = self.pattern.clone()
        for _ in range(self.steps):
            p.requires_grad_(True)
            loss = p.new_zeros(())
            for x, t in zip(images, targets):
                self.check_fits(x.shape[2:])
                xt = (x.double() + tile_to(p, x.shape[2:]).unsqueeze(0)).clamp(*self.bounds)
                loss = loss + F.cross_entropy(forward(xt.to(x.dtype)).double(), t[:, 0])
            (g,) = torch.autograd.grad(loss, p)
            p = (p.detach() - step * g.sign()).clamp(-e, e)
        self.pattern = p.detach().as_subclass(torch.Tensor)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the pattern (``torch.save``, atomically); load it again with ``pattern=path``."""
        import io

        from volattack.utils import atomic_write_bytes

        buf = io.BytesIO()
        torch.save(self.pattern.double().as_subclass(torch.Tensor).clone(), buf)
        return atomic_write_bytes(buf.getvalue(), path)


from volattack.threats import joint_trigger  # noqa: E402,F401  (registers dct_learned, optimised in training)

__all__ = ["DCTTrigger", "LearnedTrigger", "PatchTrigger", "SpectralTrigger", "TRIGGERS", "Trigger",
           "create_trigger", "list_triggers", "low_frequency_cube", "register_trigger", "tile_to"]
