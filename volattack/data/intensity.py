"""Intensity models: how scan intensities (source units: HU for CT, arbitrary units for MRI)
become model inputs, and back.

An :class:`IntensityModel` is the one place that knows a model's intensity preprocessing:

- :attr:`~IntensityModel.bounds`: the range ``(lo, hi)`` of the model input (what attacks clamp
  to);
- :attr:`~IntensityModel.unit_scale`: source units per model-input unit (converts a budget in
  model units to HU, ``None`` when it differs from image to image);
- :attr:`~IntensityModel.units`: the source unit's label (``"HU"``, ``"a.u."``);
- :meth:`~IntensityModel.from_source` / :meth:`~IntensityModel.to_source`: the mapping and its
  inverse, elementwise, for numpy arrays, torch tensors (differentiable torch operations) and
  floats.

Three models cover the deployed pipelines:

- :class:`WindowIntensity`: a linear window ``[a_min, a_max] -> [b_min, b_max]`` with clipping
  (MONAI ``ScaleIntensityRange(clip=True)``, the usual CT preprocessing);
- :class:`ZScoreIntensity`: optional clipping to ``[lo, hi]`` then ``(v - mean) / std`` with a
  fixed mean and standard deviation (nnU-Net's CT normalisation: Isensee et al., "nnU-Net: a
  self-configuring method for deep learning-based biomedical image segmentation", Nature
  Methods 2021, clips to the 0.5 and 99.5 foreground percentiles and z-scores with the
  foreground mean and standard deviation of the training set);
- :class:`PercentileIntensity`: each image's own ``lower``/``upper`` percentiles mapped to
  ``[b_min, b_max]`` (MONAI ``ScaleIntensityRangePercentiles``, common for MRI).

This module imports neither torch nor MONAI (torch tensors are recognised when torch is
already loaded), so reports and configs can use it cheaply.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, TypeVar

import numpy as np

from volattack.checks import check_number
from volattack.data.config import check_units

if TYPE_CHECKING:  # pragma: no cover
    from volattack.data.config import PreprocessConfig
ArrayT = TypeVar("ArrayT")

def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_input(x: Any, name: str = "x", cast_int: bool = False) -> Any:
    """Accept torch tensors, numpy arrays (floating; integer ones cast to float32 when
    ``cast_int``, e.g. int16 CT scans) and real numbers; ``ValueError`` otherwise."""
    if _is_tensor(x):
        if x.is_floating_point():
            return x
        if cast_int and not x.is_complex() and x.dtype != sys.modules["torch"].bool:
            return x.float()
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.floating):
            return x
        if cast_int and np.issubdtype(x.dtype, np.integer):
            return x.astype(np.float32)
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}.")
    if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool):
        return float(x)
    raise ValueError(f"{name} must be a torch.Tensor, a numpy array or a number, got {type(x).__name__}.")


def _clip(x: Any, lo: float, hi: float) -> Any:
    if _is_tensor(x):
        return x.clamp(lo, hi)
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi)
    return min(max(x, lo), hi)


class IntensityModel(ABC):
    """Source intensities <-> model inputs (abstract; see the module docstring).

    Subclasses are frozen dataclasses validated at construction; ``kind`` names them in
    :meth:`describe`.
    """

    kind: ClassVar[str] = ""
    units: str

    @property
    @abstractmethod
    def bounds(self) -> tuple[float, float]:
        """``(lo, hi)``: the range of the model input (``-inf``/``inf`` when unbounded)."""

    @property
    @abstractmethod
    def unit_scale(self) -> Optional[float]:
        """Source units per model-input unit (``None``: it depends on the image)."""

    @abstractmethod
    def from_source(self, v: ArrayT) -> ArrayT:
        """Model input of source intensities ``v`` (same type and shape, integer scans become
        float32; differentiable for tensors).

        Shape:
            any; elementwise (per image statistics for :class:`PercentileIntensity`).
        """

    @abstractmethod
    def to_source(self, x: ArrayT) -> ArrayT:
        """Source intensities of model inputs ``x`` (the inverse of :meth:`from_source` inside
        :attr:`bounds`; clipped source values come back at the clip limits).

        Shape:
            any; elementwise.
        """

    def _params(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)  # type: ignore[call-overload]

    def describe(self) -> dict[str, Any]:
        """Plain description: ``kind``, the parameters, ``units``, ``bounds`` and ``unit_scale``
        (plain Python values; what reports and cache keys record)."""
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._params().items()}
        return {"kind": self.kind, **params, "bounds": list(self.bounds), "unit_scale": self.unit_scale}

    @property
    def pad_value(self) -> float:
        """The model-input value of padding: ``bounds[0]`` (air for CT), or 0 when unbounded."""
        lo = self.bounds[0]
        return float(lo) if math.isfinite(lo) else 0.0


@dataclass(frozen=True)
class WindowIntensity(IntensityModel):
    """Linear window: source ``[a_min, a_max]`` -> ``[b_min, b_max]``, clipped.

    ``from_source(v) = clip((v - a_min) / (a_max - a_min) * (b_max - b_min) + b_min, b_min, b_max)``
    (the operations of MONAI's ``ScaleIntensityRange(clip=True)``, in the same order, so the
    results are bit-identical), ``to_source(x) = (x - b_min) * unit_scale + a_min``.

    Args:
        a_min, a_max: the window in source units (HU for CT), ``a_max > a_min``.
        b_min, b_max: the model-input range, ``b_max > b_min``.
        units: the source unit label.

    Example:
        The default CT window ``[-175, 250] HU -> [0, 1]`` has ``unit_scale = 425`` HU per unit,
        so a budget of ``8/255`` is 13.3 HU and ``to_source(0.5) = 37.5`` HU.
    """

    kind: ClassVar[str] = "window"
    a_min: float = -175.0
    a_max: float = 250.0
    b_min: float = 0.0
    b_max: float = 1.0
    units: str = "HU"

    def __post_init__(self) -> None:
        for name in ("a_min", "a_max", "b_min", "b_max"):
            check_number(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        if not self.a_max > self.a_min:
            raise ValueError(f"a_max must be > a_min, got a_min={self.a_min}, a_max={self.a_max}.")
        if not self.b_max > self.b_min:
            raise ValueError(f"b_max must be > b_min, got b_min={self.b_min}, b_max={self.b_max}.")
        check_units(self.units)

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.b_min, self.b_max)

    @property
    def unit_scale(self) -> float:
        return (self.a_max - self.a_min) / (self.b_max - self.b_min)

    def from_source(self, v: ArrayT) -> ArrayT:
        v = _check_input(v, "v", cast_int=True)
        x = (v - self.a_min) / (self.a_max - self.a_min)
        x = x * (self.b_max - self.b_min) + self.b_min
        return _clip(x, self.b_min, self.b_max)

    def to_source(self, x: ArrayT) -> ArrayT:
        x = _check_input(x)
        return (x - self.b_min) * self.unit_scale + self.a_min


@dataclass(frozen=True)
class ZScoreIntensity(IntensityModel):
    """Z-score with fixed statistics, after optional clipping: ``(clip(v, lo, hi) - mean) / std``
    (nnU-Net's CT normalisation, Isensee et al., Nature Methods 2021).

    Args:
        mean: mean of the source intensities (e.g. the training foreground's), finite.
        std: their standard deviation, > 0; it is :attr:`unit_scale`.
        clip: ``(lo, hi)`` source limits applied first (``lo < hi``), or ``None`` (then
            :attr:`bounds` is ``(-inf, inf)``).
        units: the source unit label.
    """

    kind: ClassVar[str] = "zscore"
    mean: float = 0.0
    std: float = 1.0
    clip: Optional[tuple[float, float]] = None
    units: str = "HU"

    def __post_init__(self) -> None:
        check_number("mean", self.mean)
        check_number("std", self.std, low=0, low_open=True)
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))
        if self.clip is not None:
            c = self.clip
            if isinstance(c, (str, bytes)) or not hasattr(c, "__len__") or len(c) != 2:
                raise ValueError(f"clip must be None or (lo, hi), got {c!r}.")
            check_number("clip[0]", c[0])
            check_number("clip[1]", c[1])
            if not c[1] > c[0]:
                raise ValueError(f"clip must have lo < hi, got {tuple(c)!r}.")
            object.__setattr__(self, "clip", (float(c[0]), float(c[1])))
        check_units(self.units)

    @property
    def bounds(self) -> tuple[float, float]:
        if self.clip is None:
            return (-math.inf, math.inf)
        return ((self.clip[0] - self.mean) / self.std, (self.clip[1] - self.mean) / self.std)

    @property
    def unit_scale(self) -> float:
        return self.std

    def from_source(self, v: ArrayT) -> ArrayT:
        v = _check_input(v, "v", cast_int=True)
        if self.clip is not None:
            v = _clip(v, *self.clip)
        return (v - self.mean) / self.std

    def to_source(self, x: ArrayT) -> ArrayT:
        x = _check_input(x)
        return x * self.std + self.mean


def _quantiles(v: Any, q: tuple[float, float]) -> tuple[Any, Any]:
    """``q`` percentiles (0-100, linear interpolation as ``numpy.percentile``) of each sample.

    A 5-D tensor/array is a batch ``(B, C, H, W, D)``: one pair per sample, shaped to broadcast;
    anything else is one image. Torch: ``kthvalue`` (no size limit, differentiable).
    """
    batched = getattr(v, "ndim", 0) == 5
    if not _is_tensor(v):
        arr = np.asarray(v)
        if not batched:
            lo, hi = np.percentile(arr, q)
            return float(lo), float(hi)  # Python floats keep the array's dtype
        lo, hi = np.percentile(arr.reshape(arr.shape[0], -1), q, axis=1)
        return lo.astype(arr.dtype).reshape(-1, 1, 1, 1, 1), hi.astype(arr.dtype).reshape(-1, 1, 1, 1, 1)
    flat = v.reshape(v.shape[0], -1) if batched else v.reshape(1, -1)
    n = flat.shape[1]
    out = []
    for p in q:
        pos = p / 100.0 * (n - 1)
        k0 = int(math.floor(pos))
        k1 = min(k0 + 1, n - 1)
        a = flat.kthvalue(k0 + 1, dim=1).values
        b = flat.kthvalue(k1 + 1, dim=1).values if k1 != k0 else a
        val = a + (b - a) * (pos - k0)
        out.append(val.reshape(-1, 1, 1, 1, 1) if batched else val.reshape(()))
    return out[0], out[1]


@dataclass(frozen=True)
class PercentileIntensity(IntensityModel):
    """Each image's percentiles ``[P_lower, P_upper]`` -> ``[b_min, b_max]`` (clipped when ``clip``),
    as MONAI's ``ScaleIntensityRangePercentiles`` (percentiles with linear interpolation).

    The scale differs from image to image, so :attr:`unit_scale` is ``None`` and
    :meth:`to_source` needs the ``reference`` source image that fixed the mapping
    (:meth:`fit` gives the equivalent :class:`WindowIntensity` of one image). A 5-D input is a
    batch ``(B, C, H, W, D)`` with percentiles per sample; any other input is one image. An
    image with ``P_lower == P_upper`` maps to ``b_min``.

    Args:
        lower, upper: percentiles in ``[0, 100]``, ``lower < upper``.
        b_min, b_max: the model-input range, ``b_max > b_min``.
        clip: clip to ``[b_min, b_max]`` (else :attr:`bounds` is ``(-inf, inf)``).
        units: the source unit label (``"a.u."`` for MRI).
    """

    kind: ClassVar[str] = "percentile"
    lower: float = 0.5
    upper: float = 99.5
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    units: str = "a.u."

    def __post_init__(self) -> None:
        for name in ("lower", "upper"):
            check_number(name, getattr(self, name), low=0, high=100)
        if not self.upper > self.lower:
            raise ValueError(f"upper must be > lower, got lower={self.lower}, upper={self.upper}.")
        for name in ("b_min", "b_max"):
            check_number(name, getattr(self, name))
        if not self.b_max > self.b_min:
            raise ValueError(f"b_max must be > b_min, got b_min={self.b_min}, b_max={self.b_max}.")
        if not isinstance(self.clip, bool):
            raise ValueError(f"clip must be True or False, got {self.clip!r}.")
        for name in ("lower", "upper", "b_min", "b_max"):
            object.__setattr__(self, name, float(getattr(self, name)))
        check_units(self.units)

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.b_min, self.b_max) if self.clip else (-math.inf, math.inf)

    @property
    def unit_scale(self) -> None:
        return None

    def source_window(self, v: Any) -> tuple[Any, Any]:
        """``(P_lower, P_upper)`` of ``v`` (per sample for a 5-D batch), in source units."""
        v = _check_input(v, "v", cast_int=True)
        if isinstance(v, float):
            return v, v
        return _quantiles(v, (self.lower, self.upper))

    def fit(self, v: Any) -> WindowIntensity:
        """The :class:`WindowIntensity` this model applies to one image ``v`` (its percentiles as
        the window). Raises ``ValueError`` for a constant image (no window)."""
        lo, hi = (float(t) for t in self.source_window(v))
        if not hi > lo:
            raise ValueError(f"v is constant between its percentiles ({lo}); it has no intensity window.")
        return WindowIntensity(lo, hi, self.b_min, self.b_max, units=self.units)

    def from_source(self, v: ArrayT) -> ArrayT:
        v = _check_input(v, "v", cast_int=True)
        lo, hi = self.source_window(v)
        den = hi - lo
        if _is_tensor(den):
            den = den.masked_fill(den == 0, 1.0)
        elif isinstance(den, np.ndarray):
            den = np.where(den == 0, 1.0, den).astype(den.dtype)
        elif den == 0:
            den = 1.0
        x = (v - lo) / den * (self.b_max - self.b_min) + self.b_min
        return _clip(x, self.b_min, self.b_max) if self.clip else x

    def to_source(self, x: ArrayT, reference: Any = None) -> ArrayT:
        """Source intensities of ``x`` under the mapping fixed by the source image ``reference``.

        Raises:
            ValueError: ``reference`` is missing (the scale of a percentile mapping is the image's own).
        """
        x = _check_input(x)
        if reference is None:
            raise ValueError(
                "reference is None: a percentile mapping depends on the image; pass the source image "
                "(to_source(x, reference=scan)) or use fit(scan).to_source(x)."
            )
        lo, hi = self.source_window(reference)
        return (x - self.b_min) * ((hi - lo) / (self.b_max - self.b_min)) + lo


def intensity_from_preprocess(cfg: "PreprocessConfig") -> IntensityModel:
    """The intensity model of a ``data.preprocess`` section: its window ``[a_min, a_max] ->
    [b_min, b_max]`` in ``units``.

    Args:
        cfg: a :class:`~volattack.data.config.PreprocessConfig`.

    Returns:
        A :class:`WindowIntensity`.
    """
    for name in ("a_min", "a_max", "b_min", "b_max", "units"):
        if not hasattr(cfg, name):
            raise ValueError(f"cfg must be a PreprocessConfig (with {name}), got {type(cfg).__name__}.")
    return WindowIntensity(cfg.a_min, cfg.a_max, cfg.b_min, cfg.b_max, units=cfg.units)


__all__ = [
    "IntensityModel",
    "PercentileIntensity",
    "WindowIntensity",
    "ZScoreIntensity",
    "intensity_from_preprocess",
]
