"""nnU-Net v2 trained model folders: the ``nnunet`` model source.

A model folder as nnU-Net writes it (``nnUNet_results/DatasetNNN_Name/Trainer__Plans__config/``):
``dataset.json``, ``plans.json`` and ``fold_k/checkpoint_final.pth`` per trained fold; the
dataset folder above it is accepted too when it holds one such folder (or the ``configuration``
option picks one). The network is rebuilt with nnunetv2's own plans machinery
(``PlansManager``, ``get_network_from_plans``, deep supervision off) and loaded with strict keys;
nnU-Net's trainer lookup is not used (it imports optional packages by searching for the trainer
class by name), so a folder trained with a trainer subclass that only changes the training
loads the same way.

Loading is safe: ``torch.load(weights_only=True)`` with exactly the globals an nnU-Net
checkpoint pickles besides tensors (:data:`ALLOWED_GLOBALS`: numpy scalars and their dtypes) allowed
for that one call; a checkpoint needing any other global is refused with its path and the
global's name, never unpickled with ``weights_only=False``.

Options (defaults are ``nnUNetPredictor``'s): ``folds`` (default: every ``fold_<int>`` folder
holding the checkpoint, like the predictor's auto-detection; ``"all"`` for ``fold_all``),
``checkpoint`` (``checkpoint_final.pth``), ``configuration`` (the checkpoint's), ``use_mirroring``
(``True``: the checkpoint's ``inference_allowed_mirroring_axes``), ``tile_step_size`` (0.5),
``fp16_accumulation`` (``True``: nnU-Net's float16 buffers, exact agreement), and volattack's own
``keep_activations_mb`` (1024: MiB of network-pass graphs kept from the forward to the backward
pass, so that those passes are not recomputed; 0: every pass recomputed, one window's activations
alive; the gradient is the same) and ``mmap_threshold_mb`` (1: when a pipeline is deployed,
glibc is told to map allocations of 1 MiB and more and to return them to the OS when freed, for
the rest of the process, :func:`volattack.utils.set_mmap_threshold`, while each window's network
passes run on its heap, :func:`volattack.utils.heap_allocations`: the volume-sized buffers no longer
pile up on the heap, 53-124 instead of 132-234 bytes per extra source voxel in
``benchmarks/bench_nnunet.py``, at no cost to the passes; other models run in the same process
afterwards see the 1 MiB threshold on their own passes (1.16-1.22x slower for the quickstart
model, measured before the trim threshold was kept; not re-measured); 0: the C
allocator is left alone; results do not
depend on it). ``LoadedModel.deploy``
builds the deployed pipeline on a scan (:mod:`volattack.models.nnunet_deploy`).

Needs ``pip install 'volattack[nnunet]'`` (nnunetv2).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from volattack.checks import check_bool, check_number
from volattack.models.sources.base import (
    InferenceSpec,
    LoadedModel,
    ModelPreprocessing,
    ModelSource,
    check_options,
    register_source,
)

logger = logging.getLogger(__name__)

#: options of the ``nnunet`` source
OPTIONS: tuple[str, ...] = ("folds", "checkpoint", "configuration", "use_mirroring", "tile_step_size",
                            "fp16_accumulation", "keep_activations_mb", "mmap_threshold_mb")

#: globals an nnU-Net checkpoint needs besides tensors (its logging and init args hold numpy
#: scalars); the numpy-1 spelling of the scalar reconstructor is accepted too.
ALLOWED_GLOBALS: tuple[str, ...] = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype",
                                    "numpy.dtypes.Float32DType", "numpy.dtypes.Float64DType")

_MISSING_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _allowed() -> list[Any]:
    import numpy as np
    from numpy import dtypes

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
    return [(core.scalar, "numpy._core.multiarray.scalar"), (core.scalar, "numpy.core.multiarray.scalar"),
            np.dtype, dtypes.Float32DType, dtypes.Float64DType]


def safe_load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with :data:`ALLOWED_GLOBALS` allowed for this call.

    Raises:
        ValueError: the checkpoint needs a global outside the allow-list (path and global named),
            or is not a dictionary with ``network_weights``.
    """
    import pickle

    import torch

    with torch.serialization.safe_globals(_allowed()):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = _MISSING_GLOBAL.search(str(e))
            name = found.group(1) if found else "unknown"
            raise ValueError(f"checkpoint {str(path)!r} needs the global {name!r}, which is not in the allow-list "
                             f"{list(ALLOWED_GLOBALS)}; refusing to unpickle it (volattack never loads with "
                             f"weights_only=False).") from e
    if not isinstance(ck, dict) or "network_weights" not in ck:
        raise ValueError(f"checkpoint {str(path)!r} is not an nnU-Net checkpoint (no 'network_weights' entry).")
    return ck


@dataclass
class NnunetOptions:
    """The ``nnunet`` source's options (validated; see the module docstring)."""

    folds: Any = None
    checkpoint: str = "checkpoint_final.pth"
    configuration: Optional[str] = None
    use_mirroring: bool = True
    tile_step_size: float = 0.5
    fp16_accumulation: bool = True
    keep_activations_mb: float = 1024.0
    mmap_threshold_mb: float = 1.0

    def __post_init__(self) -> None:
        self.folds = _parse_folds(self.folds)
        if not isinstance(self.checkpoint, str) or not self.checkpoint or "/" in self.checkpoint:
            raise ValueError(f"checkpoint must be a file name such as 'checkpoint_final.pth', got {self.checkpoint!r}.")
        if self.configuration is not None and (not isinstance(self.configuration, str) or not self.configuration):
            raise ValueError(f"configuration must be None or a configuration name, got {self.configuration!r}.")
        self.use_mirroring = check_bool("use_mirroring", _bool(self.use_mirroring))
        self.fp16_accumulation = check_bool("fp16_accumulation", _bool(self.fp16_accumulation))
        check_number("tile_step_size", _num(self.tile_step_size), low=0, high=1, low_open=True)
        self.tile_step_size = float(_num(self.tile_step_size))
        check_number("keep_activations_mb", _num(self.keep_activations_mb), low=0)
        self.keep_activations_mb = float(_num(self.keep_activations_mb))
        check_number("mmap_threshold_mb", _num(self.mmap_threshold_mb), low=0, high=32)
        self.mmap_threshold_mb = float(_num(self.mmap_threshold_mb))


def _bool(v: Any) -> Any:
    return {"true": True, "false": False}.get(v.strip().lower(), v) if isinstance(v, str) else v


def _num(v: Any) -> Any:
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


def _parse_folds(folds: Any) -> Optional[list[Union[int, str]]]:
    """``None`` | ``"all"`` | an int | ``"0,1"`` | a list of ints / ``"all"`` -> ``None`` or a list."""
    if folds is None:
        return None
    items = folds.split(",") if isinstance(folds, str) else folds if isinstance(folds, (list, tuple)) else [folds]
    out: list[Union[int, str]] = []
    for f in items:
        s = str(f).strip()
        if s == "all":
            out.append("all")
        elif s.isdigit() and not isinstance(f, bool):
            out.append(int(s))
        else:
            raise ValueError(f"folds must be None, 'all', a fold number or a list of them, got {folds!r}.")
    if not out or len(set(out)) != len(out):
        raise ValueError(f"folds must be non-empty without repeats, got {folds!r}.")
    return out


def _fold_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.glob("fold_*") if d.is_dir())


def resolve_folder(path: Path, configuration: Optional[str] = None) -> Path:
    """The model folder of ``path``: itself, or its one ``Trainer__Plans__config`` sub-folder
    (the one of ``configuration`` when given).

    Raises:
        ValueError: several model folders below ``path`` and no ``configuration`` to choose (listed).
    """
    if (path / "plans.json").exists() or (path / "dataset.json").exists() or _fold_dirs(path):
        return path
    subs = [d for d in sorted(path.iterdir()) if d.is_dir() and d.name.count("__") == 2 and (d / "plans.json").is_file()]
    if configuration is not None:
        subs = [d for d in subs if d.name.split("__")[2] == configuration] or subs
    if len(subs) > 1:
        raise ValueError(f"{str(path)!r} holds several nnU-Net model folders {[d.name for d in subs]}: pass one of "
                         f"them (or the configuration option).")
    return subs[0] if subs else path


def select_folds(folder: Path, folds: Optional[list], checkpoint: str) -> list[Union[int, str]]:
    """The folds to use: the requested ones (each must hold ``checkpoint``), or every
    ``fold_<int>`` holding it (``nnUNetPredictor.auto_detect_available_folds``; ``fold_all``
    when it is the only one).

    Raises:
        ValueError: a requested fold (or its checkpoint) is missing; no fold at all.
    """
    if folds is None:
        found = [d for d in _fold_dirs(folder) if (d / checkpoint).is_file()]
        ints = sorted(int(d.name[5:]) for d in found if d.name[5:].isdigit())
        if ints:
            return list(ints)
        if (folder / "fold_all" / checkpoint).is_file():
            return ["all"]
        raise ValueError(f"model folder {str(folder)!r} has no fold_k/{checkpoint} (folds found: "
                         f"{[d.name for d in _fold_dirs(folder)] or 'none'}).")
    for f in folds:
        if not (folder / f"fold_{f}" / checkpoint).is_file():
            have = [d.name for d in _fold_dirs(folder) if (d / checkpoint).is_file()]
            raise ValueError(f"fold {f!r} requested but {str(folder / f'fold_{f}' / checkpoint)!r} does not exist "
                             f"(folds with {checkpoint}: {have or 'none'}).")
    return list(folds)


def _read_json(folder: Path, name: str) -> dict:
    p = folder / name
    if not p.is_file():
        raise ValueError(f"nnU-Net model folder {str(folder)!r} has no {name} (expected dataset.json, plans.json "
                         f"and fold_k/checkpoint_final.pth).")
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(p)!r} is not valid JSON: {e}.") from e


@dataclass
class NnunetModel:
    """A loaded model folder: plans, configuration, one network per fold, mirroring axes."""

    folder: Path
    plans: dict
    dataset_json: dict
    plans_manager: Any
    configuration_manager: Any
    configuration: str
    networks: list
    folds: list
    mirror_axes: Optional[tuple[int, ...]]
    trainer_name: str
    num_classes: int
    in_channels: int


def _configuration(plans: dict, requested: Optional[str], ck: dict, folder: Path) -> str:
    available = sorted(plans.get("configurations", {}))
    name = requested or (ck.get("init_args") or {}).get("configuration") or folder.name.split("__")[-1]
    if name not in available:
        raise ValueError(f"configuration {name!r} does not exist in {str(folder / 'plans.json')!r}; available: "
                         f"{', '.join(available)}.")
    return str(name)


def _check_configuration(cm: Any, name: str) -> None:
    from volattack.inference.nnunet_steps import check_scheme

    if len(cm.patch_size) != 3:
        raise ValueError(f"configuration {name!r} is {len(cm.patch_size)}-D; volattack deploys 3-D configurations only.")
    if cm.previous_stage_name is not None:
        raise ValueError(f"configuration {name!r} is a cascade stage (needs {cm.previous_stage_name!r}); not supported.")
    for s in cm.normalization_schemes:
        check_scheme(s)
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if cm.configuration.get(key) != "resample_data_or_seg_to_shape":
            raise ValueError(f"{key} {cm.configuration.get(key)!r} of configuration {name!r} is not supported "
                             f"(volattack implements 'resample_data_or_seg_to_shape').")


def _build_network(pm: Any, cm: Any, dataset_json: dict) -> tuple[Any, int, int]:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    lm = pm.get_label_manager(dataset_json)
    if lm.has_regions:
        raise ValueError("region-based nnU-Net models (sigmoid outputs) are not supported.")
    c_in = determine_num_input_channels(pm, cm, dataset_json)
    k = lm.num_segmentation_heads
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, c_in, k, allow_init=False,
                                 deep_supervision=False)
    return net, int(c_in), int(k)


def open_model_folder(folder: Path, opts: NnunetOptions) -> NnunetModel:
    """Validate and load a model folder (see the module docstring).

    Raises:
        ValueError: a missing dataset.json / plans.json / fold / checkpoint, a disallowed global,
            an unknown configuration (available listed), an unsupported configuration
            (2-D, cascade, normalisation scheme, resampling function), weights that do not fit.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from volattack.models.checkpoint import state_dict_mismatch

    dataset_json = _read_json(folder, "dataset.json")
    plans = _read_json(folder, "plans.json")
    folds = select_folds(folder, opts.folds, opts.checkpoint)
    ckpts = [safe_load_checkpoint(folder / f"fold_{f}" / opts.checkpoint) for f in folds]
    name = _configuration(plans, opts.configuration, ckpts[0], folder)
    pm = PlansManager(plans)
    cm = pm.get_configuration(name)
    _check_configuration(cm, name)
    base, c_in, k = _build_network(pm, cm, dataset_json)
    networks = []
    for f, ck in zip(folds, ckpts):
        net = copy.deepcopy(base)
        bad = state_dict_mismatch(net, ck["network_weights"], source=f"fold_{f}/{opts.checkpoint}")
        if bad:
            raise ValueError(f"weights of {str(folder / f'fold_{f}' / opts.checkpoint)!r} do not fit the network of "
                             f"plans.json ({cm.network_arch_class_name}): {bad}.")
        net.load_state_dict(ck["network_weights"], strict=True)
        networks.append(net.eval())
    axes = ckpts[0].get("inference_allowed_mirroring_axes")
    return NnunetModel(folder=folder, plans=plans, dataset_json=dataset_json, plans_manager=pm,
                       configuration_manager=cm, configuration=name, networks=networks, folds=folds,
                       mirror_axes=None if axes is None else tuple(int(a) for a in axes),
                       trainer_name=str(ckpts[0].get("trainer_name", "")), num_classes=k, in_channels=c_in)


def _source_order(values: Any, transpose_forward: Any) -> tuple:
    """nnU-Net-ordered per-axis values (reader axes reversed, then ``transpose_forward``) in the
    scan's own (i, j, k) order."""
    out: list = [None] * 3
    for k, t in enumerate(transpose_forward):
        out[2 - int(t)] = values[k]
    return tuple(out)


def _digest(model: NnunetModel, opts: NnunetOptions) -> str:
    from volattack.ops import module_digest

    h = hashlib.sha256()
    for net in model.networks:
        h.update(module_digest(net).encode())
    h.update(json.dumps({"configuration": model.configuration, "folds": model.folds, "mirror": opts.use_mirroring,
                         "step": opts.tile_step_size, "fp16": opts.fp16_accumulation}, sort_keys=True).encode())
    return h.hexdigest()


@register_source("nnunet")
class NnunetSource(ModelSource):
    """nnU-Net v2 model folders (``dataset.json``, ``plans.json``, ``fold_k/checkpoint_final.pth``)."""

    priority = 5

    def can_open(self, path: Path) -> tuple[bool, str]:
        if not path.is_dir():
            return False, "not a directory"
        if (path / "plans.json").exists() or (path / "dataset.json").exists() or _fold_dirs(path):
            return True, "an nnU-Net v2 model folder"
        if any(d.is_dir() and d.name.count("__") == 2 and (d / "plans.json").is_file() for d in path.iterdir()):
            return True, "an nnU-Net v2 dataset results folder"
        return False, "no dataset.json, plans.json or fold_k/ (not an nnU-Net model folder)"

    def load(self, path: Path, *, map_location: Any = "cpu", trust_bundle: bool = False,
             **options: Any) -> LoadedModel:
        check_options(self.name, options, OPTIONS)
        try:
            import nnunetv2  # noqa: F401
        except ImportError as e:
            raise ValueError(f"{str(path)!r} is an nnU-Net model folder; opening it needs nnunetv2 "
                             f"(pip install 'volattack[nnunet]').") from e
        from volattack.models.nnunet_deploy import make_deploy

        opts = NnunetOptions(**options)
        model = open_model_folder(resolve_folder(path, opts.configuration), opts)
        cm, tf = model.configuration_manager, model.plans_manager.transpose_forward
        labels = model.dataset_json.get("labels", {})
        names = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
        patch = _source_order(cm.patch_size, tf)
        pre = ModelPreprocessing(spacing=_source_order(cm.spacing, tf), roi_size=patch)
        inference = InferenceSpec(roi_size=patch, overlap=min(1.0 - opts.tile_step_size, 0.99), mode="gaussian",
                                  sw_batch_size=1, cval=0.0)
        for net in model.networks:
            net.to(map_location)
        loaded = LoadedModel.build(
            model.networks[0], source=self.name, path=model.folder, fmt="nnunetv2", num_classes=model.num_classes,
            in_channels=model.in_channels, class_names=names, preprocessing=pre, inference=inference,
            configuration=model.configuration, folds=list(model.folds), trainer=model.trainer_name,
            checkpoint=opts.checkpoint, mirror_axes=None if model.mirror_axes is None else list(model.mirror_axes),
            use_mirroring=opts.use_mirroring, tile_step_size=opts.tile_step_size,
            fp16_accumulation=opts.fp16_accumulation, keep_activations_mb=opts.keep_activations_mb,
            mmap_threshold_mb=opts.mmap_threshold_mb, plans_name=model.plans.get("plans_name"),
            normalization=list(cm.normalization_schemes),
        )
        loaded.digest = _digest(model, opts)
        loaded.deploy = make_deploy(model, opts)
        return loaded


__all__ = ["ALLOWED_GLOBALS", "NnunetModel", "NnunetOptions", "NnunetSource", "OPTIONS", "open_model_folder",
           "resolve_folder", "safe_load_checkpoint", "select_folds"]
