"""Input-transform defences and their adaptive evaluation (BPDA and EOT).

A defence is a list of transforms placed in front of a segmenter:
``DefendedModel(model, [t_1, ..., t_n])`` maps ``x -> model(t_n(... t_1(x)))``.

Transforms (all ``nn.Module``; images ``(B, C, H, W, D)`` in input units, shape preserved):

- :class:`GaussianSmoothing` (sigma in voxels; differentiable, linear),
- :class:`MedianFilter` (odd cubic window; piecewise: its autograd gradient reaches only the
  voxel that is each window's median),
- :class:`DCTLowPass` (zero blockwise DCT coefficients above an index-sum cutoff; linear),
- :class:`DCTQuantization` (3D JPEG-like hard quantisation of blockwise DCT coefficients;
  its autograd gradient is exactly zero),
- :class:`RandomNoise` (additive Gaussian noise; randomised, for EOT).

Adaptive evaluation (Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018):

- **BPDA** (Backward Pass Differentiable Approximation): every non-differentiable transform has
  a ``bpda`` option. ``"none"``: plain autograd (a non-adaptive attack, which the defence may
  mask); ``"identity"``: forward = the transform, backward = identity; ``"smooth"``: forward =
  the transform, backward = the gradient of a smooth approximation (window mean for the median,
  AdvDrop soft rounding :func:`~volattack.attacks.spectral.soft_round` for the quantisation).
  Straight-through pattern: ``y = approx(x) + (transform(x) - approx(x)).detach()``.
- **EOT** (Expectation over Transformation): :class:`EOTModel` averages the logits of
  ``samples`` draws of the randomised transforms in one forward pass, so the attack's gradient
  is the average gradient too.
- :func:`adaptive_wrapper` returns the model an attack should use against a defended model and
  a :meth:`AdaptiveModel.describe` string naming the adaptive attack (for reports).

Randomness: only local ``torch.Generator`` objects (CPU, seeded explicitly), never the global
RNG. See :class:`RandomNoise` and :class:`EOTModel` for how draws are made and replayed.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import nn

from volattack.checks import check_block_size, check_number
from volattack.ops import first_head, straight_through
from volattack.attacks.spectral import block_merge, block_split, dct3, idct3, soft_round

logger = logging.getLogger(__name__)

#: BPDA modes of the non-differentiable transforms and of :func:`adaptive_wrapper`
BPDA_MODES: tuple[str, ...] = ("none", "identity", "smooth")


# ------------------------------------------------------------------------------ helpers
def _check_bpda(bpda: Any) -> str:
    if bpda is None:
        return "none"
    if not isinstance(bpda, str) or bpda not in BPDA_MODES:
        from volattack.registry import suggest

        raise ValueError(
            f"bpda must be one of {', '.join(BPDA_MODES)}, got {bpda!r}.{suggest(str(bpda), BPDA_MODES)}"
        )
    return bpda



def _check_images(x: Any, spatial_dims: Optional[int] = 3) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}.")
    if spatial_dims is not None and x.ndim != 2 + spatial_dims:
        raise ValueError(f"images must be {2 + spatial_dims}-D (B, C, H, W, D), got shape {tuple(x.shape)}.")
    if x.ndim < 3:
        raise ValueError(f"images must be (B, C, *spatial), got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"images must be floating point, got dtype {x.dtype}.")
    return x


def _index_sum(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``i + j + k`` for every coefficient of a DCT block of ``shape`` ``(b1, b2, b3)``."""
    a, b, c = (torch.arange(n, device=device) for n in shape)
    return a.view(-1, 1, 1) + b.view(1, -1, 1) + c.view(1, 1, -1)


def _to_blocks(x: torch.Tensor, block_size: Optional[int]) -> torch.Tensor:
    """DCT coefficients: whole volume ``(B, C, H, W, D)`` or blockwise ``(B, C, n.., b, b, b)``."""
    return dct3(x) if block_size is None else dct3(block_split(x, block_size))


def _from_blocks(coeffs: torch.Tensor, shape: torch.Size, block_size: Optional[int]) -> torch.Tensor:
    return idct3(coeffs) if block_size is None else block_merge(idct3(coeffs), shape)


class InputTransform(nn.Module):
    """Base class of the input transforms (shape-preserving maps of images).

    Class attributes:
        differentiable: False when autograd through the transform is useless or misleading for
            an attacker (zero or sparse gradients); such transforms have a ``bpda`` mode.
        randomized: True when the output is random; its ``forward`` then accepts a
            ``generator`` keyword (see :class:`RandomNoise`).

    Shape:
        ``(B, C, H, W, D)`` -> ``(B, C, H, W, D)``.
    """

    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False

    def describe(self) -> str:
        """``Name(arguments)``, e.g. ``MedianFilter(kernel_size=3, bpda='identity')``."""
        return f"{type(self).__name__}({self.extra_repr()})"


class _BPDAMixin:
    """Shared BPDA plumbing: ``bpda`` attribute, :meth:`with_bpda` and the straight-through forward."""

    bpda: str

    def with_bpda(self, bpda: str) -> "InputTransform":
        """A copy of this transform with BPDA mode ``bpda`` (``"none"``, ``"identity"``, ``"smooth"``)."""
        new = copy.deepcopy(self)
        new.bpda = _check_bpda(bpda)
        return new  # type: ignore[return-value]

    def _apply_bpda(self, x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        if self.bpda == "none":
            return exact
        if self.bpda == "identity":
            return straight_through(exact, x)
        return straight_through(exact, self.smooth_approximation(x))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- transforms
class GaussianSmoothing(InputTransform):
    """Gaussian smoothing of each channel (a classic denoising defence; linear, differentiable).

    Separable MONAI filtering (``separable_filtering`` with ``gaussian_1d`` "erf" kernels
    truncated at ``truncated * sigma``, each normalised to sum 1) with **replicate** padding,
    so a constant volume is preserved exactly (up to float round-off), borders included.
    ``sigma = 0`` on an axis leaves that axis unfiltered.

    Args:
        sigma: standard deviation in **voxels** (not mm), one value or one per spatial axis, >= 0.
        truncated: kernel half-width in units of sigma, > 0.

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    def __init__(self, sigma: Union[float, Sequence[float]] = 1.0, truncated: float = 4.0) -> None:
        super().__init__()
        sig = [sigma] if isinstance(sigma, (int, float)) else list(sigma) if isinstance(sigma, (list, tuple)) else None
        if not sig:
            raise ValueError(f"sigma must be a number or a sequence of numbers, got {sigma!r}.")
        for s in sig:
            check_number("sigma", s, low=0)
        check_number("truncated", truncated, low=0, low_open=True)
        self.sigma = tuple(float(s) for s in sig)
        self.truncated = float(truncated)

    def extra_repr(self) -> str:
        s = self.sigma[0] if len(self.sigma) == 1 else self.sigma
        return f"sigma={s}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Smoothed images.

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        from monai.networks.layers import separable_filtering
        from monai.networks.layers.convutils import gaussian_1d

        x = _check_images(x, None)
        nd = x.ndim - 2
        sig = self.sigma * nd if len(self.sigma) == 1 else self.sigma
        if len(sig) != nd:
            raise ValueError(f"sigma must have 1 or {nd} values for {nd} spatial dims, got {len(sig)}.")
        if all(s == 0 for s in sig):
            return x
        one = torch.ones(1, dtype=x.dtype, device=x.device)
        kernels = [
            gaussian_1d(torch.tensor(s), truncated=self.truncated, approx="erf", normalize=True).to(x)
            if s > 0 else one
            for s in sig
        ]
        return separable_filtering(x, kernels, mode="replicate")


class MedianFilter(_BPDAMixin, InputTransform):
    """Median filter over a cubic window (Xu et al., "Feature Squeezing", NDSS 2018, in 3D).

    MONAI's ``median_filter`` (replicate padding at the borders). Its autograd gradient is the
    selection of each window's median voxel: sparse, and zero for voxels that are never a
    median (an isolated spike), hence ``differentiable = False`` and the ``bpda`` option.

    Args:
        kernel_size: odd window side in voxels (>= 1; 1 is the identity).
        bpda: ``"none"`` (autograd of the median), ``"identity"`` (backward = identity) or
            ``"smooth"`` (backward = gradient of the mean over the same window, the L2
            counterpart of the window median).

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    differentiable = False

    def __init__(self, kernel_size: int = 3, bpda: Optional[str] = "none") -> None:
        super().__init__()
        check_number("kernel_size", kernel_size, low=1, integer=True)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
        self.kernel_size = int(kernel_size)
        self.bpda = _check_bpda(bpda)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, bpda={self.bpda!r}"

    def median(self, x: torch.Tensor) -> torch.Tensor:
        """The exact median filter (autograd as torch provides it).

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        from monai.networks.layers import median_filter

        if self.kernel_size == 1:
            return x
        nd = x.ndim - 2
        return median_filter(x, kernel_size=[self.kernel_size] * nd, spatial_dims=nd)

    def smooth_approximation(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the same window (replicate padding): the BPDA ``"smooth"`` surrogate.

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        from monai.networks.layers import separable_filtering

        k = self.kernel_size
        box = torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device)
        return separable_filtering(x, [box] * (x.ndim - 2), mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Median-filtered images, with the backward pass chosen by ``bpda``.

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        x = _check_images(x, None)
        return self._apply_bpda(x, self.median(x))


class DCTLowPass(InputTransform):
    """Blockwise DCT low-pass filter: keep coefficients with ``i + j + k <= keep``.

    Each non-overlapping ``b^3`` block (:func:`~volattack.attacks.spectral.block_split`,
    replicate padding of sides that are not multiples of b, cropped after the merge) is
    transformed with the orthonormal 3D DCT; coefficients whose index sum exceeds ``keep`` are
    zeroed; the block is transformed back. Linear, hence differentiable. ``keep=0`` replaces
    each block by its mean; ``keep=None`` (or ``>= 3 (b - 1)``) keeps everything (identity up
    to round-off).

    Args:
        block_size: block side b in voxels (>= 1), or None for the whole volume (index sums
            then run over the volume's own coefficient grid).
        keep: largest kept index sum ``i + j + k`` (>= 0), or None / ``"all"`` to keep all.

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    def __init__(self, block_size: Optional[int] = 8, keep: Union[int, str, None] = None) -> None:
        super().__init__()
        self.block_size = check_block_size(block_size)
        if keep == "all":
            keep = None
        if keep is not None:
            check_number("keep", keep, low=0, integer=True)
        self.keep = keep

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, keep={'all' if self.keep is None else self.keep}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Low-passed images.

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        x = _check_images(x)
        coeffs = _to_blocks(x, self.block_size)
        if self.keep is not None:
            coeffs = coeffs * (_index_sum(coeffs.shape[-3:], x.device) <= self.keep).to(coeffs.dtype)
        return _from_blocks(coeffs, x.shape, self.block_size)


class DCTQuantization(_BPDAMixin, InputTransform):
    """3D JPEG-like compression: hard quantisation of blockwise DCT coefficients (cf. Das et al.,
    "Keeping the Bad Guys Out", 2017, and Guo et al., ICLR 2018, for JPEG as a defence).

    On the quantisation scale ``v = intensity_scale * x`` (255: input [0, 1] -> 0..255, like
    VAFA), each ``b^3`` block's orthonormal DCT coefficients ``c`` become
    ``round(c / Q) * Q`` with the table ``Q[i, j, k] = q * (1 + growth * (i + j + k))``
    growing with frequency (``growth = 0``: a flat table); then the inverse DCT and
    ``/ intensity_scale``. No clamping. Rounding is hard (``torch.round``, half to even), so
    the autograd gradient is exactly zero: ``differentiable = False``, see ``bpda``.
    With an orthonormal DCT each coefficient moves by at most ``Q / 2``.

    Args:
        block_size: block side b (>= 1, JPEG: 8) or None for the whole volume.
        q: base quantisation step (the DC step) on the quantisation scale, > 0.
        growth: relative step growth per unit of index sum, >= 0.
        intensity_scale: quantisation-scale units per input unit, > 0.
        bpda: ``"none"``, ``"identity"`` or ``"smooth"`` (backward = gradient of the same
            quantisation with AdvDrop soft rounding of softness ``soft_round_a``).
        soft_round_a: softness in (0, 1) of the ``"smooth"`` surrogate (larger is smoother).

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    differentiable = False

    def __init__(
        self,
        block_size: Optional[int] = 8,
        q: float = 10.0,
        *,
        growth: float = 1.0,
        intensity_scale: float = 255.0,
        bpda: Optional[str] = "none",
        soft_round_a: float = 0.5,
    ) -> None:
        super().__init__()
        self.block_size = check_block_size(block_size)
        check_number("q", q, low=0, low_open=True)
        check_number("growth", growth, low=0)
        check_number("intensity_scale", intensity_scale, low=0, low_open=True)
        check_number("soft_round_a", soft_round_a, low=0, high=1, low_open=True, high_open=True)
        self.q = float(q)
        self.growth = float(growth)
        self.intensity_scale = float(intensity_scale)
        self.bpda = _check_bpda(bpda)
        self.soft_round_a = float(soft_round_a)

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, q={self.q}, growth={self.growth}, "
            f"intensity_scale={self.intensity_scale}, bpda={self.bpda!r}"
        )

    def table(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: Optional[torch.device] = None) -> torch.Tensor:
        """Quantisation table ``Q[i, j, k] = q * (1 + growth * (i + j + k))``.

        Shape:
            ``(b1, b2, b3)`` for a block of that shape.
        """
        s = _index_sum(shape, torch.device(device) if device is not None else torch.device("cpu"))
        return (self.q * (1.0 + self.growth * s.to(torch.float64))).to(dtype)

    def _quantize(self, x: torch.Tensor, rounding: str) -> torch.Tensor:
        coeffs = _to_blocks(x * self.intensity_scale, self.block_size)
        t = self.table(coeffs.shape[-3:], coeffs.dtype, x.device)
        v = coeffs / t
        r = torch.round(v) if rounding == "hard" else soft_round(v, self.soft_round_a)
        return _from_blocks(r * t, x.shape, self.block_size) / self.intensity_scale

    def smooth_approximation(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantisation with AdvDrop soft rounding (the BPDA ``"smooth"`` surrogate).

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        return self._quantize(x, "soft")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised images, with the backward pass chosen by ``bpda``.

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        x = _check_images(x)
        return self._apply_bpda(x, self._quantize(x, "hard"))


class RandomNoise(InputTransform):
    """Additive Gaussian noise ``x + sigma * n``, ``n ~ N(0, I)`` (a randomised defence, cf.
    "random self-ensemble", Liu et al., ECCV 2018); evaluate it with EOT (:class:`EOTModel`).

    Draws: each call draws one noise volume of shape ``(C, *spatial)`` in float32 on the CPU
    (so it is identical on every device), moves it to the input's device/dtype and adds it to
    **every sample of the batch** (so a sample's output does not depend on its batch-mates,
    matching the attacks' batch-consistency contract). Consecutive calls advance the generator
    and give new draws.

    Seeding: the generator is the one passed per call (``forward(x, generator=g)``, used by
    :class:`EOTModel`), else the constructor's ``generator``, else a private CPU generator
    seeded with ``seed``. :meth:`reset` restores the constructor generator's initial state, so
    a sequence of calls can be replayed bit for bit.

    Args:
        sigma: noise standard deviation in input units, >= 0 (0 is the identity).
        seed: seed of the private generator (when ``generator`` is None), >= 0.
        generator: an explicit CPU ``torch.Generator`` to draw from.

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    randomized = True

    def __init__(self, sigma: float = 0.05, *, seed: int = 0, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        check_number("sigma", sigma, low=0)
        check_number("seed", seed, low=0, integer=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got device {generator.device}.")
        self.sigma = float(sigma)
        self.seed = int(seed)
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(self.seed)
        self.generator = generator
        self._initial_state = generator.get_state().clone()

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"

    def reset(self) -> None:
        """Restore the constructor generator to its state at construction (replay draws)."""
        self.generator.set_state(self._initial_state)

    def __deepcopy__(self, memo: dict) -> "RandomNoise":
        new = RandomNoise(self.sigma, seed=self.seed)
        new.generator.set_state(self.generator.get_state())
        new._initial_state = self._initial_state.clone()
        return new

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noisy images.

        Args:
            x: images ``(B, C, *spatial)``.
            generator: optional CPU generator for this call (overrides the constructor's).

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        x = _check_images(x, None)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        g = self.generator if generator is None else generator
        noise = torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32)
        if self.sigma == 0:
            return x
        return x + self.sigma * noise.to(device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------- models
class DefendedModel(nn.Module):
    """A segmenter behind input transforms: ``x -> model(t_n(... t_1(x)))``.

    Transforms with ``randomized = True`` receive the ``generator`` given to :meth:`forward`
    (None: their own). The transforms are active in eval mode too (a defence acts at test time).

    Args:
        model: ``nn.Module`` mapping images to logits.
        transforms: the transforms, applied first to last (an empty list is the bare model).

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """

    def __init__(self, model: nn.Module, transforms: Sequence[nn.Module]) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(transforms, nn.Module) or not isinstance(transforms, (list, tuple, nn.ModuleList)):
            raise ValueError(f"transforms must be a list of nn.Module, got {type(transforms).__name__}.")
        for i, t in enumerate(transforms):
            if not isinstance(t, nn.Module):
                raise ValueError(f"transforms[{i}] must be a torch.nn.Module, got {type(t).__name__}.")
        self.model = model
        self.transforms = nn.ModuleList(list(transforms))

    @property
    def randomized(self) -> bool:
        """True when any transform is randomised."""
        return any(getattr(t, "randomized", False) for t in self.transforms)

    def transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``t_n(... t_1(x))`` without the model.

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        for t in self.transforms:
            x = t(x, generator=generator) if getattr(t, "randomized", False) else t(x)
        return x

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits of the defended model.

        Args:
            x: images ``(B, C, H, W, D)``.
            generator: CPU generator passed to the randomised transforms (None: their own).

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, K, H, W, D)``.
        """
        return self.model(self.transform(x, generator))

    def describe(self) -> str:
        """The pipeline, e.g. ``MedianFilter(kernel_size=3, bpda='none') -> model``."""
        names = [t.describe() if hasattr(t, "describe") else type(t).__name__ for t in self.transforms]
        return " -> ".join(names + ["model"])


class EOTModel(nn.Module):
    """Expectation over Transformation (Athalye et al., ICML 2018): mean logits over draws.

    ``forward(x) = (1 / S) * sum_{s=1..S} model(x, generator=g)`` where ``g`` is this module's
    CPU generator (seeded with ``seed``), so the S draws of one call are S consecutive draws of
    ``g`` (draw s of a call differs from draw s - 1; every sample of the batch shares draw s,
    see :class:`RandomNoise`), and the next call continues the stream with new draws. The
    gradient of the output is the mean of the per-draw gradients. :meth:`reset` re-seeds ``g``
    so an attack (a sequence of calls) replays bit for bit. Memory grows with ``samples``: the
    graphs of all draws are kept until the backward pass.

    ``model`` should be a :class:`DefendedModel` (it receives ``generator``); any other module
    is called as ``model(x)`` S times and its own randomness is used.

    Args:
        model: the (randomised) model.
        samples: number of draws S per forward pass, >= 1.
        seed: seed of the generator, >= 0.

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """

    def __init__(self, model: nn.Module, samples: int, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_number("samples", samples, low=1, integer=True)
        check_number("seed", seed, low=0, integer=True)
        self.model = model
        self.samples = int(samples)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def reset(self) -> None:
        """Re-seed the generator with ``seed`` (replay the same sequence of draws)."""
        self.generator.manual_seed(self.seed)

    def __deepcopy__(self, memo: dict) -> "EOTModel":
        new = EOTModel(copy.deepcopy(self.model, memo), self.samples, self.seed)
        new.generator.set_state(self.generator.get_state())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean logits over ``samples`` draws.

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, K, H, W, D)``.
        """
        pass_gen = isinstance(self.model, DefendedModel)
        total: Optional[torch.Tensor] = None
        for _ in range(self.samples):
            out = first_head(self.model(x, generator=self.generator) if pass_gen else self.model(x))
            total = out if total is None else total + out
        assert total is not None
        return total / self.samples

    def describe(self) -> str:
        """``EOT over S draws (seed s)``."""
        return f"EOT over {self.samples} draw{'s' if self.samples != 1 else ''} (seed {self.seed})"


class AdaptiveModel(nn.Module):
    """The model an adaptive attack differentiates (built by :func:`adaptive_wrapper`).

    Args:
        model: the BPDA-configured :class:`DefendedModel`, possibly inside an :class:`EOTModel`.
        description: the sentence returned by :meth:`describe`.
        bpda: the BPDA mode used.
        eot_samples: draws per forward pass (1 without randomised transforms).

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """

    def __init__(self, model: nn.Module, description: str, bpda: str, eot_samples: int) -> None:
        super().__init__()
        self.model = model
        self.description = description
        self.bpda = bpda
        self.eot_samples = eot_samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (averaged over EOT draws when the defence is randomised).

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, K, H, W, D)``.
        """
        return first_head(self.model(x))

    def reset(self) -> None:
        """Replay the random draws from the start (EOT generator and transform generators)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset"):
                m.reset()

    def describe(self) -> str:
        """Which adaptive attack the wrapper implements (printed by reports)."""
        return self.description


def adaptive_wrapper(
    defended_model: DefendedModel,
    bpda: str = "identity",
    eot_samples: int = 1,
    *,
    seed: int = 0,
) -> AdaptiveModel:
    """The model an attack should use to evaluate ``defended_model`` adaptively.

    Every non-differentiable transform (``differentiable = False``: median, quantisation) is
    replaced by a copy with BPDA mode ``bpda`` (the original defended model is not modified;
    the segmenter itself is shared, not copied). When a transform is randomised the result is
    wrapped in :class:`EOTModel` with ``eot_samples`` draws seeded by ``seed``. ``bpda="none"``
    gives the non-adaptive baseline (plain autograd), to show how much the defence masks.

    Args:
        defended_model: a :class:`DefendedModel`.
        bpda: ``"identity"`` (default), ``"smooth"`` or ``"none"``.
        eot_samples: EOT draws per forward pass, >= 1 (a warning when > 1 without any
            randomised transform: the draws would all be equal, so no EOT is applied).
        seed: EOT generator seed, >= 0.

    Returns:
        An :class:`AdaptiveModel`; pass it as the ``model`` of ``volattack.create_attack`` and
        print its :meth:`~AdaptiveModel.describe` in the report.

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """
    if not isinstance(defended_model, DefendedModel):
        raise ValueError(f"defended_model must be a DefendedModel, got {type(defended_model).__name__}.")
    bpda = _check_bpda(bpda)
    check_number("eot_samples", eot_samples, low=1, integer=True)
    check_number("seed", seed, low=0, integer=True)

    transforms: list[nn.Module] = []
    masked: list[str] = []
    exact: list[str] = []
    random_names: list[str] = []
    for t in defended_model.transforms:
        if not getattr(t, "differentiable", True) and hasattr(t, "with_bpda"):
            t = t.with_bpda(bpda)
            masked.append(t.describe())
        elif not getattr(t, "differentiable", True):
            masked.append(type(t).__name__)
        elif getattr(t, "randomized", False):
            random_names.append(t.describe() if hasattr(t, "describe") else type(t).__name__)
        else:
            exact.append(t.describe() if hasattr(t, "describe") else type(t).__name__)
        transforms.append(t)
    inner = DefendedModel(defended_model.model, transforms)

    parts: list[str] = []
    if masked:
        how = {
            "identity": "BPDA with an identity backward pass",
            "smooth": "BPDA with the gradient of a smooth approximation",
            "none": "no BPDA (plain autograd, a non-adaptive attack that the defence may mask)",
        }[bpda]
        parts.append(f"{how} through {', '.join(masked)}")
    else:
        parts.append("no BPDA needed (every transform is differentiable)")
    if exact:
        parts.append(f"exact gradients through {', '.join(exact)}")
    model: nn.Module = inner
    used_samples = 1
    if inner.randomized:
        model = EOTModel(inner, eot_samples, seed)
        used_samples = eot_samples
        parts.append(f"{model.describe()} of {', '.join(random_names) or 'the randomised transforms'}")
    elif eot_samples > 1:
        warnings.warn(
            f"eot_samples={eot_samples} has no effect: the defence has no randomised transform.", stacklevel=2
        )
    description = "Adaptive attack: " + "; ".join(parts) + "."
    logger.info(description)
    return AdaptiveModel(model, description, bpda, used_samples)


__all__ = [
    "BPDA_MODES",
    "AdaptiveModel",
    "DCTLowPass",
    "DCTQuantization",
    "DefendedModel",
    "EOTModel",
    "GaussianSmoothing",
    "InputTransform",
    "MedianFilter",
    "RandomNoise",
    "adaptive_wrapper",
]
