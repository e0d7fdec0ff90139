"""MONAI bundles as deployed: the bundle's own ``inference.json`` pipeline as one differentiable
function on the scan's own grid (``space: source``).

A MONAI model-zoo bundle (https://docs.monai.io/en/stable/mb_specification.html) deploys its
network with the transforms of its ``preprocessing`` entry, the inferer of its ``inferer`` entry
and the transforms of its ``postprocessing`` entry. :class:`BundleDeployment` parses those
entries with ``monai.bundle.ConfigParser`` (references and ``$`` expressions resolved, so
**only for a trusted bundle**: the parser runs the bundle's code), maps each preprocessing
transform acting on the image to a differentiable :class:`~volattack.inference.steps.Step`
fitted to the scan, and builds a :class:`~volattack.inference.deployed.DeployedPipeline`:

==============================  ==============================================================
bundle transform                step
==============================  ==============================================================
``LoadImaged``                  none (the scan is read by volattack: same array and affine as
                                MONAI's ``NibabelReader``)
``EnsureChannelFirstd``,        none (channel first already; the pipeline runs in float32)
``EnsureTyped``, ``ToTensord``,
``CastToTyped`` (float32)
``Orientationd``                :class:`~volattack.inference.steps.Orient` (MONAI's axis choice)
``Spacingd`` (bilinear,         :meth:`Resample.like_monai_spacing <volattack.inference.steps.Resample.like_monai_spacing>`
border, no align_corners)
``ScaleIntensityRanged``        :class:`~volattack.inference.steps.Intensity` of a
                                ``WindowIntensity`` (``clip=True``); :class:`LinearIntensity`
                                (``clip=False``)
``ScaleIntensityRange-          ``Intensity`` of a ``PercentileIntensity`` (not relative, not
Percentilesd``                  channel-wise)
``NormalizeIntensityd``         ``Intensity`` of a ``ZScoreIntensity`` (fixed subtrahend and
                                divisor), else :class:`ImageZScore` (the image's own statistics,
                                ``nonzero``, ``channel_wise``)
``ScaleIntensityd``             :class:`ImageMinMax` (the image's own min and max), or, when
                                ``minv`` and ``maxv`` are ``None``, ``x * (1 + factor)`` as a
                                :class:`LinearIntensity` (no step without a factor)
``CropForegroundd``             :class:`~volattack.inference.steps.Crop` (or :class:`PadCrop` when
                                the box leaves the grid or the postprocessing has ``Invertd``) to
                                the box the bundle's own ``CropForeground`` computes on the clean
                                scan, then fixed
``SpatialPadd``,                :class:`PadCrop` with MONAI's own pad widths (constant mode)
``DivisiblePadd``
==============================  ==============================================================

The head is the network through the bundle's inferer (``SlidingWindowInferer`` ->
:meth:`WindowedInferer.from_monai <volattack.inference.sliding.WindowedInferer.from_monai>`, exact
window-by-window gradient; ``SimpleInferer`` -> the whole input) and a softmax; the
postprocessing may hold ``Activationsd(softmax=True)``, ``AsDiscreted(argmax=True)``,
``Invertd`` (the steps' inverses bring the probabilities back to the scan's grid) and writers.
Any other transform is an error naming the bundle and the transform's class: the attacked
function would not be the deployed one.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from volattack.inference.deployed import DeployedPipeline, SoftmaxHead
from volattack.inference.steps import Crop, Intensity, Orient, Resample, Step
from volattack.models.sources.bundle_steps import ImageMinMax, ImageZScore, LinearIntensity, PadCrop, factor_step

logger = logging.getLogger(__name__)

#: Transforms that change nothing volattack's pipeline sees (loading, channel and type handling).
NO_OPS: tuple[str, ...] = ("LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "CastToType", "Identity",
                           "AddChannel")

#: Postprocessing transforms compatible with "softmax, invert to the source grid, argmax".
POST_OK: tuple[str, ...] = ("Activations", "AsDiscrete", "Invert", "SaveImage", "EnsureType", "ToTensor",
                            "CopyItems", "DeleteItems", "Identity")


def _base(name: str) -> str:
    """Class name without MONAI's dictionary suffix ``d``/``D``/``Dict`` (``Spacingd`` -> ``Spacing``)."""
    for suffix in ("Dict", "d", "D"):
        if name.endswith(suffix) and name[: -len(suffix)] in _KNOWN_BASES:
            return name[: -len(suffix)]
    return name


_KNOWN_BASES = set(NO_OPS + POST_OK) | {"Orientation", "Spacing", "ScaleIntensityRange", "ScaleIntensityRangePercentiles",
                                        "NormalizeIntensity", "ScaleIntensity", "CropForeground", "SpatialPad",
                                        "DivisiblePad", "Compose"}


class _Transform:
    """One bundle transform: its class, its resolved arguments (MONAI's defaults filled in) and
    the config component (to instantiate it when the step needs the bundle's own code)."""

    def __init__(self, config_id: str, component: Any) -> None:
        self.id = config_id
        self.component = component
        self.module = component.resolve_module_name() or ""
        self.name = self.module.rsplit(".", 1)[-1] if self.module else str(component.get_config().get("_target_"))
        # only MONAI's own classes are mapped: a bundle's own class of the same name is unknown
        self.base = _base(self.name) if self.module.startswith("monai.") else f"{self.module or self.name} (not MONAI)"
        args = dict(component.resolve_args())
        try:
            target = _import(self.module) if self.module else None
            params = inspect.signature(target).parameters if target is not None else {}
        except (TypeError, ValueError):
            params = {}
        self.args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        self.args.update(args)

    def keys(self) -> tuple[str, ...]:
        k = self.args.get("keys", ())
        return (k,) if isinstance(k, str) else tuple(k or ())

    def acts_on(self, key: str) -> bool:
        """Whether the transform changes ``key`` (array transforms, without ``keys``, act on the image)."""
        return "keys" not in self.args or key in self.keys()

    def per_key(self, name: str, key: str) -> Any:
        """An argument given per key (MONAI's ``mode=[...]`` aligned with ``keys``), for ``key``."""
        v = self.args.get(name)
        if isinstance(v, (list, tuple)) and len(v) == len(self.keys()) and not isinstance(v, str):
            return v[self.keys().index(key)]
        return v


def _import(module_path: str) -> Any:
    import importlib

    mod, _, name = module_path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


class BundleDeployment:
    """The deployed pipeline of a MONAI bundle (``scan -> DeployedPipeline``), from its
    ``inference.json`` (see the module docstring).

    Args:
        bundle: the bundle directory.
        config: its inference config.
        network: the bundle's network (built by :func:`~volattack.models.sources.monai_bundle.load_bundle`).
        trust_bundle: must be True (parsing the config runs the bundle's code).
        image_key: the data key of the image (the first input of ``metadata.json``, else ``"image"``).
        modality: ``"CT"`` gives ``units="HU"``; anything else ``"intensity"`` (``None``: from the
            intensity transform: a HU window for ``ScaleIntensityRanged``).

    Raises:
        ValueError: ``trust_bundle`` is False; no ``preprocessing`` Compose with a transform list
            or no ``inferer`` in the config; a transform or inferer without a differentiable
            equivalent, or with options that have none (the message names the bundle, the
            transform's class and its config id).
    """

    def __init__(self, bundle: Path, config: Path, network: torch.nn.Module, *, trust_bundle: bool = False,
                 image_key: str = "image", modality: Optional[str] = None) -> None:
        if not trust_bundle:
            from volattack.models.sources.monai_bundle import TRUST_MESSAGE

            raise ValueError(f"trust_bundle is False for bundle {str(bundle)!r}: {TRUST_MESSAGE}")
        from monai.bundle import ConfigParser

        self.bundle, self.config, self.network = Path(bundle), Path(config), network
        self.image_key, self.modality = image_key, modality
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(bundle)
        self.transforms = self._transforms(parser, "preprocessing", required=True)
        for t in self.transforms:
            if t.acts_on(self.image_key):
                self._check(t)
        post = self._transforms(parser, "postprocessing", required=False)
        self._check_post(post)
        self.invertd = any(t.base == "Invert" for t in post)
        self.inferer = self._inferer(parser)

    # ------------------------------------------------------------------ parsing
    def _where(self, t: Optional[_Transform] = None) -> str:
        return f"bundle {str(self.bundle)!r}" + (f": transform {t.name} ({t.id})" if t is not None else "")

    def _transforms(self, parser: Any, key: str, required: bool) -> list[_Transform]:
        if key not in parser.get():
            if required:
                raise ValueError(f"{self._where()} has no {key!r} entry in {str(self.config)!r}.")
            return []
        raw = parser.get(key)
        if not isinstance(raw, dict) or "transforms" not in raw or not isinstance(raw["transforms"], list):
            raise ValueError(f"{self._where()}: {key!r} must be a Compose with a 'transforms' list to be translated, "
                             f"got {str(raw)[:120]!r}.")
        return self._flatten(parser, key, raw["transforms"])

    def _flatten(self, parser: Any, prefix: str, items: list) -> list[_Transform]:
        out: list[_Transform] = []
        for i, item in enumerate(items):
            cid = f"{prefix}#transforms#{i}"
            if isinstance(item, dict) and str(item.get("_target_", "")).rsplit(".", 1)[-1] == "Compose":
                out += self._flatten(parser, cid, item.get("transforms", []))
                continue
            try:
                comp = parser.get_parsed_content(cid, instantiate=False)
            except Exception as e:  # the bundle's own expressions
                raise ValueError(f"{self._where()}: cannot resolve {cid}: {type(e).__name__}: {e}") from e
            if not hasattr(comp, "resolve_args"):
                raise ValueError(f"{self._where()}: {cid} must be a transform with a '_target_', got {str(item)[:80]!r}.")
            if comp.is_disabled():
                continue
            out.append(_Transform(cid, comp))
        return out

    def _check(self, t: _Transform) -> None:
        """Raise for transforms and options without a differentiable equivalent."""
        a = t.args
        bad: dict[str, Any] = {}
        if t.base == "LoadImage":
            bad = {k: a.get(k) for k in ("as_closest_canonical",) if a.get(k)}
        elif t.base in NO_OPS:
            if t.base == "CastToType" and np.dtype(t.per_key("dtype", self.image_key) or np.float32) != np.float32:
                bad["dtype"] = t.per_key("dtype", self.image_key)
        elif t.base == "Orientation":
            if a.get("labels") not in (None, (("L", "R"), ("P", "A"), ("I", "S"))):
                bad["labels"] = a.get("labels")
            if not a.get("axcodes") and not a.get("as_closest_canonical"):
                bad["axcodes"] = a.get("axcodes")
        elif t.base == "Spacing":
            want = {"mode": "bilinear", "padding_mode": "border", "align_corners": False}
            bad = {k: t.per_key(k, self.image_key) for k, v in want.items() if str(t.per_key(k, self.image_key)) != str(v)}
            bad.update({k: a.get(k) for k in ("diagonal", "scale_extent", "recompute_affine") if a.get(k)})
            bad.update({k: a.get(k) for k in ("min_pixdim", "max_pixdim") if a.get(k) is not None})
        elif t.base == "ScaleIntensityRange":
            if a.get("clip") and (a.get("b_min") is None) != (a.get("b_max") is None):
                bad["b_min/b_max"] = (a.get("b_min"), a.get("b_max"))
        elif t.base == "ScaleIntensityRangePercentiles":
            bad = {k: a.get(k) for k in ("relative", "channel_wise") if a.get(k)}
            bad.update({k: None for k in ("b_min", "b_max") if a.get(k) is None})
        elif t.base == "ScaleIntensity":
            pass  # every form: min-max (ImageMinMax) or, with minv and maxv None, x * (1 + factor) (factor_step)
        elif t.base in ("SpatialPad", "DivisiblePad"):
            if str(t.per_key("mode", self.image_key)) not in ("constant", "PytorchPadMode.CONSTANT", "NumpyPadMode.CONSTANT"):
                bad["mode"] = t.per_key("mode", self.image_key)
        elif t.base == "CropForeground":
            if a.get("source_key") != self.image_key:
                bad["source_key"] = a.get("source_key")
            if str(t.per_key("mode", self.image_key)) not in ("constant", "None", "PytorchPadMode.CONSTANT"):
                bad["mode"] = t.per_key("mode", self.image_key)
        elif t.base != "NormalizeIntensity":
            raise ValueError(f"{self._where(t)} ({t.module}) has no differentiable equivalent in volattack; supported: "
                             f"{sorted(_KNOWN_BASES - set(POST_OK) - {'Compose'})} (and their dictionary forms).")
        if bad:
            raise ValueError(f"{self._where(t)}: options {bad} have no differentiable equivalent in volattack.")

    def _check_post(self, post: list[_Transform]) -> None:
        for t in post:
            a = t.args
            if t.base not in POST_OK:
                raise ValueError(f"{self._where(t)} in the postprocessing changes the segmentation after the argmax; "
                                 f"volattack cannot reproduce it (supported: {sorted(POST_OK)}).")
            if t.base == "Activations" and (a.get("sigmoid") is True or a.get("other") is not None):
                raise ValueError(f"{self._where(t)}: only softmax activations (one label per voxel) are supported, "
                                 f"got sigmoid={a.get('sigmoid')!r}, other={a.get('other')!r}.")
            if t.base == "AsDiscrete" and (a.get("threshold") is not None or a.get("argmax") is False):
                raise ValueError(f"{self._where(t)}: only argmax discretisation is supported, got "
                                 f"argmax={a.get('argmax')!r}, threshold={a.get('threshold')!r}.")

    def _inferer(self, parser: Any) -> Any:
        from monai.inferers import SimpleInferer, SlidingWindowInferer

        from volattack.inference.sliding import WindowedInferer

        if "inferer" not in parser.get():
            raise ValueError(f"{self._where()} has no 'inferer' entry in {str(self.config)!r}.")
        try:
            inferer = parser.get_parsed_content("inferer")
        except Exception as e:  # the bundle's own code
            raise ValueError(f"{self._where()}: cannot build its inferer: {type(e).__name__}: {e}") from e
        if type(inferer) is SlidingWindowInferer:  # subclasses (SliceInferer, ...) infer differently
            try:
                return WindowedInferer.from_monai(inferer)
            except ValueError as e:
                raise ValueError(f"{self._where()}: its SlidingWindowInferer: {e}") from e
        if type(inferer) is SimpleInferer:
            return None
        raise ValueError(f"{self._where()}: inferer {type(inferer).__name__} has no differentiable equivalent in "
                         f"volattack; supported: SlidingWindowInferer, SimpleInferer.")

    # ------------------------------------------------------------------ fitting to a scan
    def __call__(self, scan: Any) -> DeployedPipeline:
        """The bundle's deployed pipeline fitted to ``scan`` (a :class:`~volattack.data.source.SourceScan`).

        Raises:
            ValueError: a sheared affine for ``Spacingd``; an empty foreground for ``CropForegroundd``.
        """
        from volattack.models.deploy import source_bounds

        steps: list[Step] = []
        affine, shape = scan.affine, scan.shape
        intensity_units: Optional[str] = None
        for t in self.transforms:
            if not t.acts_on(self.image_key) or t.base in NO_OPS or t.base == "LoadImage":
                continue
            step = self._step(t, steps, affine, shape, scan)
            if step is None:
                continue
            steps.append(step)
            if isinstance(step, Intensity):
                intensity_units = intensity_units or getattr(step.model, "units", None)
            affine = step.out_affine if step.out_affine is not None else affine
            shape = step.out_shape if step.out_shape is not None else shape
        units = self._units(intensity_units)
        desc = {"pipeline": "monai_bundle", "bundle": str(self.bundle), "config": str(self.config),
                "transforms": [t.name for t in self.transforms], "inferer": repr(self.inferer),
                "scan": scan.describe()}
        return DeployedPipeline(steps, SoftmaxHead(self.network, self.inferer), bounds=source_bounds(scan),
                                units=units, describe=desc)

    def _units(self, intensity_units: Optional[str]) -> str:
        if self.modality is not None:
            return "HU" if "CT" in self.modality.upper() else "intensity"
        return "HU" if intensity_units == "HU" else "intensity"

    def _step(self, t: _Transform, steps: list[Step], affine: np.ndarray, shape: tuple, scan: Any) -> Optional[Step]:
        """The step of one transform on the grid ``(affine, shape)`` (``None``: the identity)."""
        a = t.args
        if t.base == "Orientation":
            o = Orient.to_codes(affine, shape, a.get("axcodes") or "RAS")
            return None if o.is_identity else o
        if t.base == "Spacing":
            return Resample.like_monai_spacing(affine, shape, _pixdim(a["pixdim"], affine))
        if t.base in ("ScaleIntensityRange", "ScaleIntensityRangePercentiles", "NormalizeIntensity"):
            return _intensity_step(t, self.modality)
        if t.base == "ScaleIntensity" and a.get("minv") is None and a.get("maxv") is None:
            return factor_step(a.get("factor"))
        if t.base == "ScaleIntensity":
            return ImageMinMax(a.get("minv"), a.get("maxv"), channel_wise=bool(a.get("channel_wise")))
        if t.base == "CropForeground":
            return self._crop(t, steps, affine, shape, scan)
        if t.base in ("SpatialPad", "DivisiblePad"):
            return _pad_step(t, affine, shape)
        raise AssertionError(t.name)  # pragma: no cover - _check rejected it

    def _crop(self, t: _Transform, steps: list[Step], affine: np.ndarray, shape: tuple, scan: Any) -> Optional[Step]:
        """The bundle's own ``CropForeground`` box on the clean scan after ``steps``, fixed."""
        x = torch.as_tensor(scan.array, dtype=torch.float32)[None]
        with torch.no_grad():
            for s in steps:
                x = s(x)
        cropper = t.component.instantiate().cropper  # the bundle's select_fn, margin, k_divisible
        start, end = (np.asarray(v).astype(int).tolist() for v in cropper.compute_bounding_box(x[0]))
        if any(e <= s for s, e in zip(start, end)):
            raise ValueError(f"{self._where(t)}: the scan {str(scan.path)!r} has no foreground to crop to "
                             f"(box {start}..{end}).")
        if start == [0, 0, 0] and list(end) == list(shape):
            return None
        inside = all(0 <= s for s in start) and all(e <= n for e, n in zip(end, shape))
        if inside and not self.invertd:
            return Crop(start, end, shape, affine)
        pad_value = float(t.args.get("value", 0.0) or 0.0)
        return PadCrop(start, end, shape, affine, value=pad_value, fill="zero" if self.invertd else "background")


def _pad_step(t: _Transform, affine: np.ndarray, shape: tuple) -> Optional[Step]:
    """``SpatialPad(d)``/``DivisiblePad(d)`` (constant mode) as a crop-and-pad box, the widths
    computed by MONAI's own ``compute_pad_width``."""
    from monai.transforms import DivisiblePad, SpatialPad

    a = t.args
    method = a.get("method", "symmetric")
    padder = SpatialPad(a["spatial_size"], method=method) if t.base == "SpatialPad" else DivisiblePad(a["k"], method=method)
    widths = [tuple(int(v) for v in w) for w in padder.compute_pad_width(tuple(shape))[1:]]
    if not any(b or e for b, e in widths):
        return None
    start = [-b for b, _ in widths]
    end = [n + e for n, (_, e) in zip(shape, widths)]
    return PadCrop(start, end, shape, affine, value=float(a.get("value", 0.0) or 0.0))


def _pixdim(pixdim: Any, affine: np.ndarray) -> list[float]:
    """MONAI's pixdim rules: a number for all axes, a short list padded with its last value, and
    non-positive entries keeping the grid's own spacing."""
    vals = [float(v) for v in (np.atleast_1d(np.asarray(pixdim, dtype=np.float64)).tolist())]
    vals = (vals + [vals[-1]] * 3)[:3]
    own = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return [v if v > 0 else float(own[d]) for d, v in enumerate(vals)]


def _intensity_step(t: _Transform, modality: Optional[str]) -> Step:
    """The intensity step of ``ScaleIntensityRange(d)``, ``ScaleIntensityRangePercentiles(d)`` or
    ``NormalizeIntensity(d)`` with the transform's resolved arguments."""
    from volattack.data.intensity import PercentileIntensity, WindowIntensity, ZScoreIntensity

    a = t.args
    ct = modality is None or "CT" in modality.upper()
    if t.base == "ScaleIntensityRange":
        b_min, b_max = a.get("b_min"), a.get("b_max")
        if b_min is None and b_max is None:
            b_min, b_max = 0.0, 1.0
        if a.get("clip"):
            return Intensity(WindowIntensity(float(a["a_min"]), float(a["a_max"]), float(b_min), float(b_max),
                                             units="HU" if ct else "a.u."))
        return LinearIntensity(float(a["a_min"]), float(a["a_max"]), float(b_min), float(b_max))
    if t.base == "ScaleIntensityRangePercentiles":
        return Intensity(PercentileIntensity(float(a["lower"]), float(a["upper"]), float(a["b_min"]),
                                             float(a["b_max"]), clip=bool(a.get("clip"))))
    sub, div = a.get("subtrahend"), a.get("divisor")
    if _scalar(sub) and _scalar(div) and not a.get("nonzero") and not a.get("channel_wise") and float(div) != 0:
        return Intensity(ZScoreIntensity(mean=float(sub), std=float(div), units="HU" if ct else "a.u."))
    if (sub is not None and not _scalar(sub)) or (div is not None and not _scalar(div)):
        raise ValueError(f"transform {t.name} ({t.id}): per-channel subtrahend/divisor arrays are not supported, "
                         f"got subtrahend={sub!r}, divisor={div!r}.")
    return ImageZScore(subtrahend=None if sub is None else float(sub), divisor=None if div is None else float(div),
                       nonzero=bool(a.get("nonzero")), channel_wise=bool(a.get("channel_wise")))


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def bundle_deploy(bundle: Path, config: Path, network: torch.nn.Module, meta: dict[str, Any], *,
                  trust_bundle: bool) -> Callable[[Any], DeployedPipeline]:
    """``LoadedModel.deploy`` of a bundle: parsed on first use (so a bundle whose transforms have
    no equivalent still loads for ``space: model``; ``space: source`` then fails naming them).

    Args:
        bundle: the bundle directory. config: its inference config. network: its network.
        meta: its ``metadata.json`` (image key and modality of the first input).
        trust_bundle: the caller's trust (the loader only gets here when True).
    """
    fmt = meta.get("network_data_format") if isinstance(meta.get("network_data_format"), dict) else {}
    inputs = fmt.get("inputs") if isinstance(fmt.get("inputs"), dict) else {}
    key = next(iter(inputs), "image")
    modality = inputs.get(key, {}).get("modality") if isinstance(inputs.get(key), dict) else None
    cache: list[BundleDeployment] = []

    def deploy(scan: Any) -> DeployedPipeline:
        if not cache:
            cache.append(BundleDeployment(bundle, config, network, trust_bundle=trust_bundle, image_key=key,
                                          modality=modality if isinstance(modality, str) else None))
        return cache[0](scan)

    return deploy


__all__ = ["BundleDeployment", "NO_OPS", "POST_OK", "bundle_deploy"]
