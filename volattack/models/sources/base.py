"""What a model source returns (:class:`LoadedModel`), the source protocol and the registry.

A source is a class with two methods, registered with one decorator::

    @register_source("my_format")
    class MyFormat(ModelSource):
        def can_open(self, path):            # cheap: look at names and headers, load nothing
            return path.suffix == ".my", "not a .my file"
        def load(self, path, *, map_location="cpu", trust_bundle=False, **options):
            module = ...
            return LoadedModel.build(module, source=self.name, path=path, num_classes=3, ...)

:func:`load_model` asks every registered source whether it can open the path and loads it
with the first that can (highest ``priority`` first, then by name); when none can, the error
names the path and, per source, why it declined.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence, Union

import torch.nn as nn

from volattack.checks import check_number, is_int
from volattack.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from volattack.data.config import PreprocessConfig
    from volattack.data.intensity import IntensityModel
    from volattack.inference.sliding import WindowedInferer

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: blending modes of the sliding-window inferer
BLEND_MODES: tuple[str, ...] = ("gaussian", "constant")


def _check_size3(name: str, value: Any, integer: bool) -> Optional[tuple]:
    if value is None:
        return None
    vals = tuple(value) if isinstance(value, (list, tuple)) else None
    ok = vals is not None and len(vals) == 3 and all(
        (is_int(v) if integer else isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        and v > 0 for v in vals)
    if not ok:
        kind = "integers" if integer else "numbers"
        raise ValueError(f"{name} must be None or 3 positive {kind}, got {value!r}.")
    return tuple(int(v) for v in vals) if integer else tuple(float(v) for v in vals)  # type: ignore[union-attr]


@dataclass(frozen=True)
class ModelPreprocessing:
    """How a model expects its input to be prepared (``None``: not known from the model's files).

    Attributes:
        intensity: source intensities -> model inputs (:mod:`volattack.data.intensity`).
        orientation: axis codes of the model's input (e.g. ``"RAS"``).
        spacing: voxel spacing in mm the model was trained at.
        roi_size: the window / crop size in voxels.
        config: the volattack ``PreprocessConfig`` the model was trained with, when it is known
            (volattack checkpoints).
    """

    intensity: Optional["IntensityModel"] = None
    orientation: Optional[str] = None
    spacing: Optional[tuple[float, float, float]] = None
    roi_size: Optional[tuple[int, int, int]] = None
    config: Optional["PreprocessConfig"] = None

    def __post_init__(self) -> None:
        from volattack.data.intensity import IntensityModel

        if self.intensity is not None and not isinstance(self.intensity, IntensityModel):
            raise ValueError(f"intensity must be None or an IntensityModel, got {type(self.intensity).__name__}.")
        if self.orientation is not None and (not isinstance(self.orientation, str) or len(self.orientation) != 3):
            raise ValueError(f"orientation must be None or 3 axis codes such as 'RAS', got {self.orientation!r}.")
        object.__setattr__(self, "spacing", _check_size3("spacing", self.spacing, integer=False))
        object.__setattr__(self, "roi_size", _check_size3("roi_size", self.roi_size, integer=True))

    @classmethod
    def from_config(cls, cfg: "PreprocessConfig") -> "ModelPreprocessing":
        """Everything a ``data.preprocess`` section says (intensity window, orientation, spacing, roi)."""
        from volattack.data.intensity import intensity_from_preprocess

        return cls(intensity=intensity_from_preprocess(cfg), orientation=cfg.orientation,
                   spacing=None if cfg.spacing is None else tuple(cfg.spacing),  # type: ignore[arg-type]
                   roi_size=tuple(cfg.roi_size), config=cfg)  # type: ignore[arg-type]


@dataclass(frozen=True)
class InferenceSpec:
    """The sliding-window inference a model is deployed with.

    Attributes:
        roi_size: window size in voxels (``None``: unknown, give it to :meth:`make`).
        overlap: window overlap in [0, 1).
        mode: blending, ``"gaussian"`` or ``"constant"``.
        sw_batch_size: windows per forward pass (>= 1).
        cval: model-input value padding a volume smaller than the window (the intensity
            model's ``pad_value``: air for CT).
    """

    roi_size: Optional[tuple[int, int, int]] = None
    overlap: float = 0.25
    mode: str = "gaussian"
    sw_batch_size: int = 4
    cval: float = 0.0

    def __post_init__(self) -> None:
        from volattack.checks import check_choice

        object.__setattr__(self, "roi_size", _check_size3("roi_size", self.roi_size, integer=True))
        check_number("overlap", self.overlap, low=0, high=1, high_open=True)
        check_choice("mode", self.mode, BLEND_MODES)
        check_number("sw_batch_size", self.sw_batch_size, low=1, integer=True)
        check_number("cval", self.cval)

    def make(self, **overrides: Any) -> "WindowedInferer":
        """The :class:`~volattack.inference.sliding.WindowedInferer` of this spec; ``overrides``
        replace fields (``roi_size=``, ``overlap=``, ``sw_batch_size=``, ``mode=``, ``cval=``).

        Raises:
            ValueError: unknown override, or no ``roi_size`` (neither known nor given).
        """
        from dataclasses import replace

        from volattack.inference.sliding import WindowedInferer

        unknown = sorted(set(overrides) - {"roi_size", "overlap", "mode", "sw_batch_size", "cval"})
        if unknown:
            raise ValueError(f"unknown InferenceSpec.make overrides {unknown}.")
        spec = replace(self, **overrides) if overrides else self
        if spec.roi_size is None:
            raise ValueError("roi_size is None: the model's window size is unknown; pass make(roi_size=[...]).")
        return WindowedInferer(roi_size=list(spec.roi_size), sw_batch_size=spec.sw_batch_size, overlap=spec.overlap,
                               mode=spec.mode, cval=float(spec.cval))


@dataclass
class LoadedModel:
    """A segmentation network with everything known about how it is deployed.

    Attributes:
        module: the network in eval mode, ``(B, C, H, W, D)`` images -> ``(B, K, H, W, D)`` logits.
        num_classes: K including background (``None``: unknown).
        in_channels: C (``None``: unknown).
        class_names: label index -> name (empty when unknown).
        preprocessing: its :class:`ModelPreprocessing`.
        inference: its :class:`InferenceSpec`.
        info: ``source`` (registry name), ``path``, ``format``, ``architecture`` and whatever
            the source knows (checkpoint epoch and metrics, bundle metadata, ...).
        digest: SHA-256 of the weights (:func:`volattack.ops.module_digest`), what cached
            results are keyed on.
        deploy: ``scan -> DeployedPipeline`` (:mod:`volattack.inference.deployed`): how the source
            runs the model on a scan's own grid (its own preprocessing and inference); ``None``:
            the default pipeline of ``preprocessing`` and ``inference``
            (:func:`volattack.models.deploy.build_pipeline`).
    """

    module: nn.Module
    num_classes: Optional[int]
    in_channels: Optional[int]
    class_names: dict[int, str]
    preprocessing: ModelPreprocessing
    inference: InferenceSpec
    info: dict[str, Any]
    digest: str
    deploy: Optional[Callable[[Any], Any]] = None

    @classmethod
    def build(cls, module: nn.Module, *, source: str, path: Path, fmt: str, num_classes: Optional[int] = None,
              in_channels: Optional[int] = None, class_names: Optional[dict[int, str]] = None,
              preprocessing: Optional[ModelPreprocessing] = None, inference: Optional[InferenceSpec] = None,
              **info: Any) -> "LoadedModel":
        """A LoadedModel of ``module`` (put in eval mode, digest computed); ``info`` gets
        ``source``, ``path``, ``format`` and ``architecture`` (the class name unless given)."""
        from volattack.ops import module_digest

        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if v is not None:
                check_number(name, v, low=1, integer=True)
        pre = preprocessing if preprocessing is not None else ModelPreprocessing()
        if inference is None:
            cval = pre.intensity.pad_value if pre.intensity is not None else 0.0
            inference = InferenceSpec(roi_size=pre.roi_size, cval=cval)
        meta = {"source": source, "path": str(path), "format": fmt,
                "architecture": getattr(module, "original_name", None) or type(module).__name__}
        meta.update(info)
        return cls(module=module.eval(), num_classes=num_classes, in_channels=in_channels,
                   class_names={int(k): str(v) for k, v in (class_names or {}).items()}, preprocessing=pre,
                   inference=inference, info=meta, digest=module_digest(module))


class ModelSource:
    """A way to open models (a file format, a folder layout). Subclasses set nothing but the two
    methods; :func:`register_source` sets ``name``. ``priority``: sources that can open the same
    path are tried highest first."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    def can_open(self, path: Path) -> tuple[bool, str]:
        """``(True, what it is)`` or ``(False, why not)``, from names and headers only."""
        raise NotImplementedError

    def load(self, path: Path, *, map_location: Any = "cpu", trust_bundle: bool = False,
             **options: Any) -> LoadedModel:
        """Load the model at ``path`` (which :meth:`can_open` accepted)."""
        raise NotImplementedError


SOURCES: Registry[ModelSource] = Registry("model source")


def register_source(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`ModelSource` subclass as ``name``.

    Raises:
        ValueError: a name taken by another class, or a class that is not a ``ModelSource``
            overriding ``can_open`` and ``load``.
    """

    def deco(cls: type) -> type:
        if isinstance(cls, type) and issubclass(cls, ModelSource) and (
                cls.can_open is ModelSource.can_open or cls.load is ModelSource.load):
            raise ValueError(f"model source {name!r} ({cls.__name__}) must define can_open(path) and load(path, ...).")
        return SOURCES.register_class(name, ModelSource)(cls)

    return deco


def list_sources() -> list[str]:
    """Registered model source names, in the order :func:`load_model` asks them."""
    _builtins()
    return [s.name for s in _ordered()]


def _builtins() -> None:
    import volattack.models.sources  # noqa: F401  (imports and so registers every source module)


def _ordered() -> list[type]:
    classes = [SOURCES.get(n) for n in SOURCES.names()]
    return sorted(classes, key=lambda c: (-c.priority, c.name))  # type: ignore[attr-defined]


def load_model(path: PathLike, *, trust_bundle: bool = False, map_location: Any = "cpu",
               **options: Any) -> LoadedModel:
    """Load a segmentation model from any registered source (volattack checkpoint, TorchScript,
    MONAI bundle, ...).

    Args:
        path: a model file or folder.
        trust_bundle: allow sources that run code from the model's files (a MONAI bundle config).
        map_location: device of the loaded weights.
        **options: source-specific options (e.g. ``network_key`` of a bundle); a source rejects
            options it does not know.

    Returns:
        A :class:`LoadedModel` (network in eval mode, classes, preprocessing, inference, digest).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no source can open ``path`` (the message lists why each declined), or the
            chosen source's error (unsafe or unreadable files, untrusted bundles, misfit weights).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"Model not found: {str(p)!r} (expected one of the model sources: {', '.join(list_sources())})."
        )
    _builtins()
    reasons = []
    for cls in _ordered():
        ok, why = cls().can_open(p)
        if ok:
            logger.info("Loading %s with model source %r (%s)", p, cls.name, why)
            return cls().load(p, map_location=map_location, trust_bundle=trust_bundle, **options)
        reasons.append(f"{cls.name}: {why}")
    raise ValueError(f"No model source can open {str(p)!r}: " + "; ".join(reasons) + ".")


def check_options(source: str, options: dict[str, Any], allowed: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming ``source`` for options it does not take (with a suggestion)."""
    from volattack.registry import suggest

    bad = [k for k in options if k not in allowed]
    if bad:
        valid = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"model source {source!r} has no option {bad[0]!r}.{suggest(bad[0], allowed)} "
                         f"Its options: {valid}.")
