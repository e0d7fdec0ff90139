"""The default deployed pipeline of a loaded model on one scan (:func:`build_pipeline`).

For a model whose deployment volattack knows from its preprocessing (a volattack checkpoint, a
TorchScript file or a bundle network described by ``data.preprocess``), the deployed segmenter is
the evaluation's own preprocessing (:func:`volattack.data.transforms.build_transforms`: MONAI
``Orientation``, ``Spacing`` (bilinear), the intensity model, ``CropForeground``) followed by
sliding-window inference and a softmax, and the inverse steps back to the scan's grid, as one
differentiable :class:`~volattack.inference.deployed.DeployedPipeline`. Sources that deploy
differently (nnU-Net, MONAI bundles with their own transforms) set ``LoadedModel.deploy``;
:func:`pipeline_for` uses it when set.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import torch

from volattack.inference.deployed import DeployedPipeline, SoftmaxHead
from volattack.inference.steps import Crop, Intensity, Orient, Resample, Step

logger = logging.getLogger(__name__)


def source_bounds(scan: Any, override: Optional[tuple[float, float]] = None) -> tuple[float, float]:
    """The source-unit range an attack on ``scan`` may use.

    Default: ``[min, max]`` of the clean scan intersected with what its stored type can hold.
    The adversarial scan then stays inside the intensity range the scan already has (no air
    below the scanner's floor, no value a range check would flag) and survives quantisation to
    the stored type unclipped.

    Args:
        scan: the :class:`~volattack.data.source.SourceScan`.
        override: ``(lo, hi)`` given by the user (``evaluate.source_bounds``; it must contain the
            clean scan's values, the attack's starting point), intersected with the stored type's range.

    Raises:
        ValueError: an override that is not ``lo < hi``, that does not contain the scan's values, or
            that leaves nothing of the type's range.
    """
    tlo, thi = scan.value_range()
    if override is None:
        lo, hi = float(np.min(scan.array)), float(np.max(scan.array))
    else:
        ov = tuple(override) if isinstance(override, (list, tuple)) else ()
        if len(ov) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ov) or not ov[0] < ov[1]:
            raise ValueError(f"source_bounds must be [lo, hi] with lo < hi, got {override!r}.")
        lo, hi = float(ov[0]), float(ov[1])
        smin, smax = float(np.min(scan.array)), float(np.max(scan.array))
        if lo > smin or hi < smax:
            raise ValueError(f"source_bounds {list(override)} must contain the values of {str(scan.path)!r} "
                             f"([{smin:g}, {smax:g}]): the attack starts from the clean scan.")
    lo, hi = max(lo, tlo), min(hi, thi)
    if not lo < hi:
        if override is not None:
            raise ValueError(f"source_bounds {list(override)} leave nothing of the range {scan.dtype} holds "
                             f"([{tlo}, {thi}]) for {str(scan.path)!r}.")
        hi = lo + 1.0  # a constant scan: allow one unit
    return lo, hi


def _preprocess_parts(loaded: Any, preprocess: Any, intensity: Any) -> tuple[Optional[str], Any, Any, bool, Any]:
    """(orientation, spacing, intensity, crop_foreground, roi) from the overrides or the model."""
    mp = loaded.preprocessing
    cfg = preprocess if preprocess is not None else mp.config
    if cfg is not None:
        from volattack.data.intensity import intensity_from_preprocess

        inten = intensity or (mp.intensity if preprocess is None and mp.intensity is not None
                              else intensity_from_preprocess(cfg))
        return cfg.orientation, cfg.spacing, inten, bool(cfg.crop_foreground), cfg.roi_size
    inten = intensity or mp.intensity
    if inten is None:
        raise ValueError(f"model {loaded.info.get('path')!r} has no known intensity preprocessing: pass "
                         "preprocess= (a PreprocessConfig) or intensity= to build its deployed pipeline.")
    return mp.orientation, mp.spacing, inten, False, mp.roi_size


def _foreground_crop(steps: list[Step], scan: Any, lower: float) -> Optional[Crop]:
    """The ``CropForeground(image > lower)`` box of the clean scan after ``steps`` (MONAI's own
    bounding box), fixed; ``None`` when it is the whole grid."""
    from monai.transforms import CropForeground

    x = torch.as_tensor(scan.array)[None]
    with torch.no_grad():
        for s in steps:
            x = s(x)
    cropper = CropForeground(select_fn=lambda v: v > lower, margin=0)
    start, end = cropper.compute_bounding_box(x[0])
    start, end = [int(v) for v in start], [int(v) for v in end]
    shape = tuple(x.shape[2:])
    if any(e <= s for s, e in zip(start, end)):
        logger.warning("scan %s has no foreground above %g: not cropped", scan.path, lower)
        return None
    if start == [0, 0, 0] and tuple(end) == shape:
        return None
    return Crop(start, end, shape, steps[-1].out_affine if steps and steps[-1].out_affine is not None else None)


def build_pipeline(loaded: Any, scan: Any, *, preprocess: Any = None, intensity: Any = None, inferer: Any = None,
                   bounds: Optional[tuple[float, float]] = None) -> DeployedPipeline:
    """The default deployed pipeline of ``loaded`` on ``scan``.

    Steps: :class:`~volattack.inference.steps.Orient` to the model's orientation,
    :class:`~volattack.inference.steps.Resample` as MONAI's ``Spacing(pixdim, mode="bilinear")``
    to its spacing, :class:`~volattack.inference.steps.Intensity` (its intensity model), and,
    with ``crop_foreground``, a :class:`~volattack.inference.steps.Crop` to the body box
    (``image > lower input bound``, MONAI's ``CropForeground``). **The crop box is computed once
    from the clean scan and then fixed**: the attack cannot move it, and the adversarial scan is
    cropped with the clean scan's box (the deployed pipeline would recompute it; the box only
    changes if the perturbation lifts background voxels above the window's floor, which the
    clipping of the window makes rare, and the read-back evaluation scores the file as written).
    Head: ``softmax`` of sliding-window inference (``inferer``, default ``loaded.inference.make()``
    with the intensity model's padding value).

    Args:
        loaded: the :class:`~volattack.models.sources.base.LoadedModel`.
        scan: the :class:`~volattack.data.source.SourceScan`.
        preprocess: a ``PreprocessConfig`` replacing the model's own (``loaded.preprocessing.config``);
            needed for models without one.
        intensity: an intensity model replacing the preprocessing's window.
        inferer: the sliding-window inferer (a ``WindowedInferer``).
        bounds: source-unit bounds (default :func:`source_bounds` of the scan).

    Returns:
        The :class:`~volattack.inference.deployed.DeployedPipeline` (on the CPU; move it with ``.to``).

    Raises:
        ValueError: nothing known about the model's intensity preprocessing; a sheared affine.
    """
    orientation, spacing, inten, crop, roi = _preprocess_parts(loaded, preprocess, intensity)
    steps: list[Step] = []
    affine, shape = scan.affine, scan.shape
    if orientation:
        o = Orient.to_codes(affine, shape, orientation)
        affine, shape = o.out_affine, o.out_shape
        if not o.is_identity:
            steps.append(o)
    if spacing is not None:
        r = Resample.like_monai_spacing(affine, shape, list(spacing))
        affine, shape = r.out_affine, r.out_shape
        steps.append(r)
    steps.append(Intensity(inten))
    if crop:
        c = _foreground_crop(steps, scan, float(inten.bounds[0]))
        if c is not None:
            c.in_affine = affine if c.in_affine is None else c.in_affine
            steps.append(c)
    if inferer is None:
        if roi is None and loaded.inference.roi_size is None:
            raise ValueError(f"model {loaded.info.get('path')!r} has no known window size: pass inferer=.")
        inferer = loaded.inference.make(cval=float(inten.pad_value),
                                        **({} if loaded.inference.roi_size is not None else {"roi_size": tuple(roi)}))
    units = "HU" if getattr(inten, "units", None) == "HU" else "intensity"
    desc = {"pipeline": "volattack", "source": loaded.info.get("source"), "path": loaded.info.get("path"),
            "orientation": orientation, "spacing": None if spacing is None else list(spacing),
            "intensity": inten.describe(), "crop_foreground": crop, "inferer": repr(inferer), "scan": scan.describe()}
    return DeployedPipeline(steps, SoftmaxHead(loaded.module, inferer), bounds=source_bounds(scan, bounds),
                            units=units, describe=desc)


def pipeline_for(loaded: Any, scan: Any, *, bounds: Optional[tuple[float, float]] = None,
                 **defaults: Any) -> DeployedPipeline:
    """``loaded.deploy(scan)`` when the model source deploys its own way (nnU-Net, bundles), else
    :func:`build_pipeline` with ``defaults``; ``bounds`` (``evaluate.source_bounds``) replace the
    pipeline's, intersected with the scan's stored range.

    Raises:
        ValueError: ``loaded.deploy`` returned something other than a ``DeployedPipeline``.
    """
    deploy = getattr(loaded, "deploy", None)
    if deploy is None:
        return build_pipeline(loaded, scan, bounds=bounds, **defaults)
    pipe = deploy(scan)
    if not isinstance(pipe, DeployedPipeline):
        raise ValueError(f"loaded.deploy must return a DeployedPipeline, got {type(pipe).__name__}.")
    if bounds is not None:
        pipe.bounds = source_bounds(scan, bounds)
    return pipe


__all__ = ["build_pipeline", "pipeline_for", "source_bounds"]
