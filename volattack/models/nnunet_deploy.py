"""An nnU-Net v2 model as deployed, on one scan: the :class:`DeployedPipeline` of the ``nnunet`` source.

The steps are nnU-Net's preprocessing in its order (``DefaultPreprocessor.run_case``): its
reader's axis order (SimpleITK and nibabel readers give the stored ``(i, j, k)`` array reversed,
``(k, j, i)``; ``NibabelIOWithReorient`` reorients to RAS first) followed by the plans'
``transpose_forward``, as one :class:`~volattack.inference.steps.Orient`; the crop to the
non-zero box (nnU-Net's ``create_nonzero_mask`` and ``get_bbox_from_mask`` on the clean scan,
then a fixed :class:`~volattack.inference.steps.Crop`); its normalisation
(:class:`~volattack.inference.nnunet_steps.NnunetNormalize`). The head
(:class:`~volattack.inference.nnunet_head.NnunetHead`) resamples to the configuration's spacing,
runs the gaussian sliding window with mirroring over the folds, resamples the logits back and
applies the softmax; the steps' inverses uncrop (background probability 1) and transpose back.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from volattack.inference.deployed import DeployedPipeline
from volattack.inference.nnunet_head import NnunetHead
from volattack.inference.nnunet_steps import NnunetNormalize, NnunetResize
from volattack.inference.steps import Crop, Orient, Step

logger = logging.getLogger(__name__)

#: nnU-Net image readers whose axis order volattack reproduces.
READERS: tuple[str, ...] = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")


def reader_steps(reader: str, transpose_forward: Any, shape: tuple, affine: np.ndarray,
                 spacing: tuple) -> tuple[list[Step], tuple, np.ndarray, list[float]]:
    """The orientation steps of nnU-Net's reader and ``transpose_forward``, the grid after them
    and the spacing nnU-Net uses (``properties['spacing']`` transposed).

    Raises:
        ValueError: a reader volattack does not reproduce (named, with the supported ones).
    """
    if reader not in READERS:
        raise ValueError(f"image_reader_writer {reader!r} of the plans is not supported; volattack reproduces "
                         f"{', '.join(READERS)}.")
    steps: list[Step] = []
    sp = list(spacing)
    if reader == "NibabelIOWithReorient":
        o = Orient.to_codes(affine, shape, "RAS")
        if not o.is_identity:
            steps.append(o)
            sp = [sp[int(np.flatnonzero(o.ornt[:, 0] == k)[0])] for k in range(3)]  # input axis -> axis k
            shape, affine = o.out_shape, o.out_affine
    perm = [2 - int(t) for t in transpose_forward]  # nnU-Net axis k <- scan axis perm[k]
    ornt = np.zeros((3, 2))
    for k, a in enumerate(perm):
        ornt[a] = (k, 1)
    o2 = Orient(ornt, shape, affine)
    if not o2.is_identity:
        steps.append(o2)
    return steps, o2.out_shape, o2.out_affine, [float(sp[a]) for a in perm]


def nonzero_box(array: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """nnU-Net's crop box (``crop_to_nonzero``): start, end and the filled non-zero mask inside it.

    Shape:
        ``array`` ``(C, X, Y, Z)`` -> mask ``(X', Y', Z')`` bool.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    mask = create_nonzero_mask(array)
    bbox = get_bbox_from_mask(mask)
    return [int(b[0]) for b in bbox], [int(b[1]) for b in bbox], mask[bounding_box_to_slice(bbox)]


_HEAP_SET: list = []  # the threshold (bytes) this process was given, once


def _limit_heap(mb: float) -> None:
    """``mmap_threshold_mb`` > 0: glibc maps allocations of at least that size
    (:func:`~volattack.utils.set_mmap_threshold`), once per process and value, logged."""
    from volattack.utils import set_mmap_threshold

    nbytes = int(float(mb) * 2 ** 20)
    if nbytes <= 0 or nbytes in _HEAP_SET:
        return
    if set_mmap_threshold(nbytes):
        _HEAP_SET[:] = [nbytes]
        logger.info("nnunet: allocations of %s MiB and more are now mapped and returned to the OS when freed "
                    "(glibc mmap threshold, for this process; option mmap_threshold_mb); the window passes stay on "
                    "the heap", mb)


def build_nnunet_pipeline(model: Any, opts: Any, scan: Any) -> DeployedPipeline:
    """The deployed pipeline of ``model`` (:class:`~volattack.models.sources.nnunet.NnunetModel`)
    with ``opts`` (``NnunetOptions``) on ``scan`` (a :class:`~volattack.data.source.SourceScan`).

    Raises:
        ValueError: a channel count that differs from the model's, an unsupported reader.
    """
    import torch

    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    from volattack.models.deploy import source_bounds

    arr = np.asarray(scan.array, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[0] != model.in_channels:
        raise ValueError(f"scan {str(scan.path)!r} has {arr.shape[0] if arr.ndim == 4 else '?'} channel(s); the nnU-Net "
                         f"model expects {model.in_channels} ({model.dataset_json.get('channel_names')}).")
    pm, cm = model.plans_manager, model.configuration_manager
    steps, shape, affine, spacing = reader_steps(pm.plans.get("image_reader_writer", "SimpleITKIO"),
                                                 pm.transpose_forward, tuple(scan.shape), np.asarray(scan.affine),
                                                 tuple(scan.spacing))
    with torch.no_grad():
        x = torch.from_numpy(arr)[None]
        for s in steps:
            x = s(x)
    start, end, mask = nonzero_box(x[0].numpy())
    crop = Crop(start, end, shape, affine)
    props = pm.foreground_intensity_properties_per_channel
    norm = NnunetNormalize(cm.normalization_schemes, [props.get(str(c)) for c in range(model.in_channels)],
                           cm.use_mask_for_norm, mask)
    crop_shape = tuple(crop.out_shape)
    target = [float(v) for v in cm.spacing]
    new_shape = tuple(int(v) for v in compute_new_shape(crop_shape, spacing, target))
    kd = cm.configuration.get("resampling_fn_data_kwargs", {})
    kp = cm.configuration.get("resampling_fn_probabilities_kwargs", {})
    resize_in = NnunetResize.plan(crop_shape, new_shape, spacing, target, **_kwargs(kd))
    resize_out = NnunetResize.plan(new_shape, crop_shape, target, spacing, **_kwargs(kp))
    head = NnunetHead(model.networks, cm.patch_size, opts.tile_step_size,
                      model.mirror_axes if opts.use_mirroring else None, resize_in, resize_out,
                      fp16_accumulation=opts.fp16_accumulation, keep_activations_mb=opts.keep_activations_mb)
    ct = all(s == "CTNormalization" for s in cm.normalization_schemes)
    describe = {"model": "nnunet", "folder": str(model.folder), "configuration": model.configuration,
                "folds": list(model.folds), "spacing": spacing, "target_spacing": target,
                "crop": [start, end], "head": head.describe(), "normalize": norm.describe()}
    pipe = DeployedPipeline([*steps, crop, norm], head, bounds=source_bounds(scan), units="HU" if ct else "intensity",
                            describe=describe)
    _limit_heap(getattr(opts, "mmap_threshold_mb", 0.0))  # a process-wide setting: only once the inputs passed
    return pipe


def _kwargs(kw: dict) -> dict:
    return {"order": int(kw.get("order", 3)), "order_z": int(kw.get("order_z", 0)),
            "force_separate_z": kw.get("force_separate_z"), "is_seg": bool(kw.get("is_seg", False))}


def make_deploy(model: Any, opts: Any) -> Callable[[Any], DeployedPipeline]:
    """``scan -> DeployedPipeline`` for ``LoadedModel.deploy``."""

    def deploy(scan: Any) -> DeployedPipeline:
        return build_nnunet_pipeline(model, opts, scan)

    return deploy


__all__ = ["READERS", "build_nnunet_pipeline", "make_deploy", "nonzero_box", "reader_steps"]
