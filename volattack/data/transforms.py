"""MONAI preprocessing built from a ``PreprocessConfig`` and an intensity model, and datasets.

Pipeline for dict samples ``{"image": path, "label": path}`` (label optional in eval mode)::

    load (nibabel for NIfTI, SimpleITK for NRRD/MHA/MHD) -> EnsureChannelFirstd
    -> Orientationd(cfg.orientation) -> Spacingd(cfg.spacing; bilinear / nearest)
    -> ApplyIntensityd(intensity model; default the window [a_min, a_max] -> [b_min, b_max], clip)
    -> CropForegroundd(image > lower bound)                 (cfg.crop_foreground)
    train: SpatialPadd(roi_size) -> RandCropByPosNegLabeld(roi_size, pos, neg, num_samples)
    -> image float32, label int64

The image stays a MONAI ``MetaTensor`` whose ``affine`` follows every spatial step, so a
prediction or an adversarial image can be written back with ``volattack.data.io.write_nifti``
and the right geometry. An unreadable or truncated file raises ``ValueError`` naming the file
(a missing one ``FileNotFoundError``), also through ``build_dataset``.

NRRD/MHA: MONAI's ``ITKReader`` needs the ``itk`` package, which volattack does not depend on;
``SimpleITKReader`` (below) reads the same formats through SimpleITK with the same RAS
convention, and is used for ``reader="ITKReader"`` when ``itk`` is not installed.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, ImageReader, NibabelReader
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImage,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    Spacingd,
    SpatialPadd,
)
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from volattack.data.config import PreprocessConfig
from volattack.data.intensity import IntensityModel, intensity_from_preprocess
from volattack.data.io import NIFTI_SUFFIXES, SITK_SUFFIXES, sitk_image_to_ras

logger = logging.getLogger(__name__)

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor, float)

MODES: tuple[str, ...] = ("train", "eval")


# --------------------------------------------------------------------------- errors


class ImageReadError(ValueError):
    """A volume file exists but cannot be read (corrupt, truncated, unsupported)."""


class ImageMissingError(FileNotFoundError):
    """A volume file named in a sample does not exist."""


class SampleKeyError(ValueError):
    """A sample lacks a key the pipeline needs (e.g. ``"label"`` in train mode)."""


_SURFACED = (ImageReadError, ImageMissingError, SampleKeyError)


def _find_load_error(exc: BaseException) -> Optional[BaseException]:
    """The first ``ImageReadError``/``ImageMissingError`` in an exception's cause chain."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, _SURFACED):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _reraise_load_error(exc: BaseException) -> None:
    """Re-raise the load error hidden under MONAI's ``RuntimeError("applying transform ...")``."""
    found = _find_load_error(exc)
    if found is not None and found is not exc:
        raise found.with_traceback(found.__traceback__) from None


# --------------------------------------------------------------------------- reader


class SimpleITKReader(ImageReader):
    """MONAI image reader backed by SimpleITK (NRRD, MHA/MHD, NIfTI, ...).

    Produces the same array order and metadata as MONAI's ``ITKReader`` with
    ``affine_lps_to_ras=True``: arrays indexed ``(x, y, z)`` (channels last for vector
    pixels), ``affine``/``original_affine`` voxel-to-RAS in mm, ``spatial_shape``,
    ``original_channel_dim`` and ``spacing``. Several files are stacked as channels.

    Args:
        suffixes: file suffixes this reader claims when MONAI picks readers by suffix
            (default: NRRD/MHA/MHD, leaving NIfTI to nibabel).
    """

    def __init__(self, suffixes: Sequence[str] = SITK_SUFFIXES) -> None:
        super().__init__()
        self.suffixes = tuple(s.lower() for s in suffixes)

    def verify_suffix(self, filename: Union[Sequence[Any], Any]) -> bool:
        """Whether every file name ends with one of ``self.suffixes`` (case-insensitive)."""
        return all(str(f).lower().endswith(self.suffixes) for f in ensure_tuple(filename))

    def read(self, data: Union[Sequence[Any], Any], **kwargs: Any) -> Any:
        """Read one file (a ``SimpleITK.Image``) or several (a list of them)."""
        import SimpleITK as sitk

        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        images = [sitk.ReadImage(str(f)) for f in names]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """Array ``(X, Y, Z[, C])`` (or ``(N, X, Y, Z)`` for N files) and its metadata dict."""
        arrays, meta = [], {}
        for image in img if isinstance(img, (list, tuple)) else [img]:  # an Image iterates pixels
            arr, affine, spacing = sitk_image_to_ras(image)
            ndim = image.GetDimension()
            header = {
                "spacing": np.asarray(spacing),
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.SPATIAL_SHAPE: np.asarray(arr.shape[:ndim]),
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if arr.ndim == ndim else -1,
            }
            if meta and not np.allclose(meta[MetaKeys.AFFINE], affine):
                raise ValueError("files stacked as channels must share one affine.")
            meta = meta or header
            arrays.append(arr)
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta


def _make_loader(reader: Optional[str]) -> LoadImage:
    """A ``LoadImage`` (float32, image only) for a ``PreprocessConfig.reader`` name."""
    if reader is None:
        loader = LoadImage(reader=None, image_only=True, dtype=np.float32)
        loader.register(SimpleITKReader())  # picked by suffix for NRRD/MHA; NIfTI stays nibabel
        return loader
    if reader == "NibabelReader":
        return LoadImage(reader=NibabelReader(), image_only=True, dtype=np.float32)
    if reader == "ITKReader":
        try:
            import itk  # noqa: F401

            return LoadImage(reader="ITKReader", image_only=True, dtype=np.float32)
        except ImportError:
            logger.info("itk is not installed; reading with SimpleITK instead of ITKReader.")
    all_suffixes = SITK_SUFFIXES + NIFTI_SUFFIXES
    return LoadImage(reader=SimpleITKReader(all_suffixes), image_only=True, dtype=np.float32)


class LoadVolumed(MapTransform):
    """Load the files of a sample into ``MetaTensor``s, with errors that name the file.

    Wraps ``monai.transforms.LoadImage``: missing file -> ``FileNotFoundError``; any reader
    failure (corrupt, truncated, unsupported) -> ``ValueError("Cannot read image '...': ...")``;
    a missing sample key (unless allowed) -> ``ValueError`` naming it.

    Args:
        keys: sample keys holding file paths.
        reader: ``None`` (by suffix), ``"NibabelReader"``, ``"ITKReader"`` or ``"SimpleITKReader"``.
        allow_missing_keys: skip keys absent from a sample.
    """

    def __init__(self, keys: Sequence[str], reader: Optional[str] = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.reader = reader
        self._loader = _make_loader(reader)

    def __call__(self, data: dict) -> dict:
        """Replace each path under ``keys`` by the loaded ``MetaTensor`` (float32)."""
        from pathlib import Path

        d = dict(data)
        if not self.allow_missing_keys:
            missing = [k for k in self.keys if k not in d]
            if missing:
                raise SampleKeyError(
                    f"sample must have the keys {list(self.keys)}, missing {missing} "
                    f"(got keys {sorted(d)})."
                )
        for key in self.key_iterator(d):
            path = d[key]
            paths = list(path) if isinstance(path, (list, tuple)) and path else [path]  # channel files: stacked
            for p in paths:
                if not isinstance(p, (str, Path)):
                    raise ValueError(f"sample[{key!r}] must be a file path or a list of them (one per channel), "
                                     f"got {path!r}.")
                if not Path(p).expanduser().exists():
                    raise ImageMissingError(f"Image file for key {key!r} not found: {str(p)!r}.")
            try:
                d[key] = self._loader(paths if len(paths) > 1 else paths[0])
            except Exception as e:  # readers raise RuntimeError, EOFError, zlib.error, OSError ...
                root = e
                while root.__cause__ is not None:
                    root = root.__cause__
                first = str(root).strip().splitlines()[0] if str(root).strip() else ""
                raise ImageReadError(
                    f"Cannot read image {str(path)!r}: {type(root).__name__}: {first}"
                ) from e
        return d


# --------------------------------------------------------------------------- pipeline


class _AboveThreshold:
    """Picklable ``select_fn`` for ``CropForegroundd``: ``x > threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: Any) -> Any:
        return x > self.threshold

    def __repr__(self) -> str:
        return f"_AboveThreshold({self.threshold})"


class VolCompose(Compose):
    """``monai.transforms.Compose`` that surfaces file errors as themselves.

    MONAI wraps every transform error into ``RuntimeError("applying transform ...")``; a
    file that is missing or unreadable is re-raised as the ``FileNotFoundError`` /
    ``ValueError`` of ``LoadVolumed`` instead, so the user sees which file is broken.
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as e:
            _reraise_load_error(e)
            raise


class ApplyIntensityd(MapTransform):
    """Source intensities -> model inputs with an :class:`~volattack.data.intensity.IntensityModel`
    (its :meth:`~volattack.data.intensity.IntensityModel.from_source`; a window gives exactly
    MONAI's ``ScaleIntensityRanged(clip=True)``). The ``MetaTensor`` metadata is kept.

    Args:
        keys: sample keys of the images.
        intensity: the intensity model.
    """

    def __init__(self, keys: Sequence[str], intensity: IntensityModel) -> None:
        super().__init__(keys)
        if not isinstance(intensity, IntensityModel):
            raise ValueError(f"intensity must be an IntensityModel, got {type(intensity).__name__}.")
        self.intensity = intensity

    def __call__(self, data: dict) -> dict:
        """Map every image under ``keys`` (float32 in, float32 out)."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.intensity.from_source(d[key])
        return d


def _check_build_args(cfg: PreprocessConfig, mode: str, seed: Any, intensity: Any) -> IntensityModel:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    if not isinstance(cfg, PreprocessConfig):
        raise ValueError(f"cfg must be a PreprocessConfig, got {type(cfg).__name__}.")
    cfg.validate()  # a config changed after construction is checked again
    if intensity is None:
        return intensity_from_preprocess(cfg)
    if not isinstance(intensity, IntensityModel):
        raise ValueError(f"intensity must be None or an IntensityModel, got {type(intensity).__name__}.")
    return intensity


def _spatial_transforms(cfg: PreprocessConfig, keys: list[str], missing_ok: bool) -> list[Any]:
    """Loading, channel first, reorientation and (optionally) resampling."""
    xforms: list[Any] = [
        LoadVolumed(keys, reader=cfg.reader, allow_missing_keys=missing_ok),
        EnsureChannelFirstd(keys, allow_missing_keys=missing_ok),
        Orientationd(keys, axcodes=cfg.orientation, labels=None, allow_missing_keys=missing_ok),
    ]
    if cfg.spacing is not None:
        xforms.append(
            Spacingd(
                keys,
                pixdim=[float(s) for s in cfg.spacing],
                mode=("bilinear", "nearest"),
                allow_missing_keys=missing_ok,
            )
        )
    return xforms


def _crop_transforms(cfg: PreprocessConfig, keys: list[str], pad: float) -> list[Any]:
    """Train mode: pad to ``roi_size`` and draw ``num_samples`` foreground/background crops."""
    roi = [int(r) for r in cfg.roi_size]
    return [
        SpatialPadd("image", spatial_size=roi, mode="constant", value=pad),
        SpatialPadd("label", spatial_size=roi, mode="constant", value=0),
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=roi,
            pos=cfg.pos,
            neg=cfg.neg,
            num_samples=cfg.num_samples,
            image_key="image",
            image_threshold=pad,
        ),
    ]


def build_transforms(
    cfg: PreprocessConfig, mode: str = "eval", seed: int = 0, *, intensity: Optional[IntensityModel] = None
) -> Compose:
    """Build the preprocessing pipeline of a ``PreprocessConfig``.

    Intensity: ``intensity`` (default :func:`~volattack.data.intensity.intensity_from_preprocess`
    of ``cfg``: the window ``[a_min, a_max]`` in source units mapped linearly to ``[b_min,
    b_max]`` and clipped, bit-identical to MONAI's ``ScaleIntensityRanged``); a model's own
    intensity model (a z-score, percentiles) can be passed instead. Geometry: reorientation to
    ``cfg.orientation``, resampling to ``cfg.spacing`` mm (bilinear image, nearest label), crop
    to the body (``image > lo``, ``lo`` the lower input bound). Train mode pads to ``roi_size``
    with ``intensity.pad_value`` and draws ``num_samples`` crops centred on
    foreground/background with ratio ``pos:neg`` (``RandCropByPosNegLabeld``; negatives only
    inside the body), so one sample becomes a list of ``num_samples`` dicts. Random transforms
    are seeded with ``Compose.set_random_state(seed)``.

    Args:
        cfg: preprocessing settings (validated again here).
        mode: ``"train"`` (random crops, label required) or ``"eval"`` (whole volume, label
            optional).
        seed: seed of the random crops.
        intensity: the intensity model (``None``: the window of ``cfg``).

    Returns:
        A ``Compose`` mapping ``{"image": path, "label": path}`` to ``{"image": MetaTensor,
        "label": MetaTensor}`` (a list of those in train mode).

    Shape:
        image ``(1, H, W, D)`` float32 in ``intensity.bounds``; label ``(1, H, W, D)`` int64;
        ``(H, W, D) == roi_size`` in train mode.

    Raises:
        ValueError: bad ``mode``, ``seed``, ``intensity`` or config value (named).
    """
    model = _check_build_args(cfg, mode, seed, intensity)
    keys = ["image", "label"]
    missing_ok = mode == "eval"
    xforms = _spatial_transforms(cfg, keys, missing_ok)
    xforms.append(ApplyIntensityd(["image"], model))
    if cfg.crop_foreground:
        xforms.append(
            CropForegroundd(
                keys,
                source_key="image",
                select_fn=_AboveThreshold(model.bounds[0]),
                start_coord_key=None,
                end_coord_key=None,
                allow_missing_keys=missing_ok,
            )
        )
    if mode == "train":
        xforms += _crop_transforms(cfg, keys, model.pad_value)
    xforms.append(
        CastToTyped(keys, dtype=(torch.float32, torch.int64), allow_missing_keys=missing_ok)
    )
    pipeline = VolCompose(xforms)
    pipeline.set_random_state(seed=int(seed))
    return pipeline


# --------------------------------------------------------------------------- datasets


class VolDataset(Dataset):
    """``monai.data.Dataset`` whose file errors surface as ``FileNotFoundError``/``ValueError``."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except RuntimeError as e:
            _reraise_load_error(e)
            raise


class VolCacheDataset(CacheDataset):
    """``monai.data.CacheDataset`` whose file errors surface as ``FileNotFoundError``/``ValueError``."""

    def _load_cache_item(self, idx: int) -> Any:
        try:
            return super()._load_cache_item(idx)
        except RuntimeError as e:
            _reraise_load_error(e)
            raise

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except RuntimeError as e:
            _reraise_load_error(e)
            raise


def build_dataset(
    datalist: Iterable[dict],
    transforms: Compose,
    cache: bool = False,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    progress: bool = True,
) -> Dataset:
    """Wrap a datalist and its transforms into a MONAI dataset.

    With ``cache=True`` the deterministic prefix of the pipeline (loading, resampling,
    windowing, cropping to the body) runs once per case at construction
    (``monai.data.CacheDataset``); the random crops still run on every access.

    Args:
        datalist: cases as returned by ``load_datalist``.
        transforms: the pipeline of ``build_transforms``.
        cache: cache deterministic results in memory.
        cache_rate: fraction of cases to cache, in ``(0, 1]`` (only with ``cache``).
        num_workers: threads used to fill the cache (0: in the calling thread).
        progress: show a progress bar while caching (8 or more cases).

    Returns:
        A ``Dataset`` (or ``CacheDataset``) whose items are the transformed samples.

    Raises:
        ValueError: empty datalist or bad ``cache_rate``/``num_workers``; also an unreadable
            file while caching (named).
        FileNotFoundError: a missing file while caching.
    """
    data = list(datalist)
    if not data:
        raise ValueError("datalist must hold at least one case, got an empty list.")
    if not 0.0 < float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be in (0, 1], got {cache_rate}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
    if not cache:
        return VolDataset(data=data, transform=transforms)
    return VolCacheDataset(
        data=data,
        transform=transforms,
        cache_rate=float(cache_rate),
        num_workers=num_workers or None,
        progress=bool(progress) and len(data) >= 8,
    )


# --------------------------------------------------------------------------- intensity


def hu_per_unit(cfg: PreprocessConfig) -> float:
    """Deprecated: ``intensity_from_preprocess(cfg).unit_scale`` (source units per input unit)."""
    return float(intensity_from_preprocess(cfg).unit_scale)  # type: ignore[arg-type]


def to_source_units(x: ArrayT, cfg: PreprocessConfig) -> ArrayT:
    """Deprecated: ``intensity_from_preprocess(cfg).to_source(x)`` (model inputs -> source units)."""
    return intensity_from_preprocess(cfg).to_source(x)
