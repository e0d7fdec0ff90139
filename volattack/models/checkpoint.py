"""Model checkpoints: atomic save, safe strict load.

A volattack checkpoint is a ``torch.save`` of a plain dictionary::

    {"format": "volattack-checkpoint", "version": 1,
     "model": {"name": ..., "in_channels": ..., "out_channels": ..., "kwargs": {...}},
     "preprocess": {...},            # the data.preprocess section it was trained with (optional)
     "class_names": {0: "background", ...},                                   # (optional)
     "state_dict": {...}, **extra}   # extra: epoch, metrics, optimizer state, seed, ...

Checkpoints written before ``preprocess`` was stored fall back to the ``config.yaml`` that
``volattack train`` writes beside them (:func:`checkpoint_preprocess`).

It is read back with ``torch.load(weights_only=True)``, so a file that holds arbitrary
Python objects is refused instead of executed, and the network is rebuilt from the
stored model description with :func:`volattack.models.zoo.create_model` and loaded
strictly: a checkpoint whose weights do not fit raises, it never yields a partly random
model.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from volattack.ops import place_for_inference
from volattack.data.config import PreprocessConfig
from volattack.models.config import ModelConfig
from volattack.utils import atomic_write_bytes
from volattack.models.zoo import create_model

logger = logging.getLogger(__name__)

FORMAT = "volattack-checkpoint"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


def _model_dict(model_cfg: ModelConfig) -> dict[str, Any]:
    """The stored model description: name, channels and constructor keyword arguments."""
    return {
        "name": str(model_cfg.name),
        "in_channels": int(model_cfg.in_channels),
        "out_channels": int(model_cfg.out_channels),
        "kwargs": dict(model_cfg.kwargs),
    }


def _describe(model_info: Mapping[str, Any]) -> str:
    kw = model_info.get("kwargs") or {}
    kw_txt = "".join(f", {k}={v!r}" for k, v in kw.items())
    return (
        f"'{model_info.get('name')}' (in_channels={model_info.get('in_channels')}, "
        f"out_channels={model_info.get('out_channels')}{kw_txt})"
    )


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    model_cfg: ModelConfig,
    *,
    preprocess: Optional[Union[PreprocessConfig, Mapping[str, Any]]] = None,
    class_names: Optional[Mapping[int, str]] = None,
    **extra: Any,
) -> Path:
    """Save ``model``'s weights and the description needed to rebuild it, atomically.

    The file is written to a temporary file in the destination folder and moved into
    place (:func:`volattack.utils.atomic_write_bytes`), so an interrupted save never leaves a
    truncated checkpoint under ``path``. Parent folders are created.

    Args:
        path: destination file (``.pt`` by convention).
        model: the network whose ``state_dict()`` is stored (moved to CPU tensors).
        model_cfg: registry name, channels and keyword arguments that rebuild ``model``
            with :func:`create_model`.
        preprocess: the ``data.preprocess`` section the model was trained with (a
            ``PreprocessConfig`` or its mapping); stored so that the model carries its
            intensity window, orientation, spacing and window size.
        class_names: label index -> name.
        **extra: anything else loadable with ``weights_only=True`` (numbers, strings,
            lists, dicts, tensors): epoch, metrics, optimizer state, seed, RNG state.

    Returns:
        The path written.

    Raises:
        ValueError: ``extra`` uses a reserved key (``format``, ``version``, ``model``,
            ``state_dict``), or a bad ``preprocess``/``class_names``.
    """
    reserved = {"format", "version", "model", "state_dict"} & set(extra)
    if reserved:
        raise ValueError(f"extra keys {sorted(reserved)} are reserved by the checkpoint format.")
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "model": _model_dict(model_cfg), "state_dict": state, **extra}
    if preprocess is not None:
        payload["preprocess"] = _preprocess_dict(preprocess)
    if class_names is not None:
        if not isinstance(class_names, Mapping):
            raise ValueError(f"class_names must be a mapping of label index to name, got {class_names!r}.")
        payload["class_names"] = {int(k): str(v) for k, v in class_names.items()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(buf.getvalue(), path)
    logger.debug("Saved checkpoint %s", path)
    return path


def _preprocess_dict(preprocess: Any) -> dict[str, Any]:
    """The stored (plain) form of a preprocess section, validated."""
    if isinstance(preprocess, Mapping):
        try:
            preprocess = PreprocessConfig(**dict(preprocess))
        except TypeError as e:
            raise ValueError(f"preprocess: {e}") from e
    if not isinstance(preprocess, PreprocessConfig):
        raise ValueError(f"preprocess must be a PreprocessConfig or a mapping, got {type(preprocess).__name__}.")
    return dataclasses.asdict(preprocess)


def checkpoint_preprocess(ckpt: Mapping[str, Any], path: PathLike) -> tuple[Optional[PreprocessConfig], str]:
    """The ``PreprocessConfig`` a checkpoint's model was trained with, and where it came from.

    Looks at the checkpoint's ``preprocess`` entry, then (older checkpoints) at
    ``data.preprocess`` of the ``config.yaml`` beside the file; an unreadable entry is logged
    and skipped.

    Returns:
        ``(config, "checkpoint" | "config.yaml")``, or ``(None, "unknown")``.
    """
    from volattack.yaml_config import from_dict, load_yaml

    stored = ckpt.get("preprocess")
    if isinstance(stored, Mapping):
        try:
            return from_dict(PreprocessConfig, stored, "preprocess"), "checkpoint"
        except ValueError as e:
            logger.warning("Checkpoint %s: ignoring its stored preprocess section: %s", path, e)
    beside = Path(path).parent / "config.yaml"
    if beside.is_file():
        try:
            raw = load_yaml(beside)
            section = (raw.get("data") or {}).get("preprocess") or {}
            return from_dict(PreprocessConfig, section, "data.preprocess"), "config.yaml"
        except (ValueError, AttributeError) as e:
            logger.warning("Checkpoint %s: ignoring %s: %s", path, beside, e)
    return None, "unknown"


def _read(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {str(path)!r}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Weights only" in msg:
            detail = ""
            if "WeightsUnpickler error:" in msg:
                tail = msg.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
                detail = f" (WeightsUnpickler: {tail[0].strip()})" if tail else ""
            raise ValueError(
                f"Checkpoint {str(path)!r} cannot be loaded safely (torch.load with "
                f"weights_only=True): it is not a torch checkpoint, or it contains Python "
                f"objects other than tensors, numbers, strings, lists and dicts{detail}."
            ) from e
        raise ValueError(f"Checkpoint {str(path)!r} is not a readable torch file: {msg}") from e
    except Exception as e:  # zip errors, EOF, magic number, ... : all mean "unreadable"
        raise ValueError(
            f"Checkpoint {str(path)!r} is not a readable torch file (truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from e


def _check_format(ckpt: Any, path: PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``ckpt`` is a volattack checkpoint."""
    path = str(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(
            f"Checkpoint {path!r} is not a volattack checkpoint: it holds a {type(ckpt).__name__}, "
            f"not a dict."
        )
    missing = [k for k in ("model", "state_dict") if k not in ckpt]
    if missing:
        hint = ""
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = " It looks like a bare state_dict; load it with load_weights_into(model, path)."
        raise ValueError(
            f"Checkpoint {path!r} is not a volattack checkpoint: missing key(s) {missing}.{hint}"
        )
    fmt = ckpt.get("format", FORMAT)
    if fmt != FORMAT:
        raise ValueError(f"Checkpoint {path!r} has format {fmt!r}, expected {FORMAT!r}.")
    version = ckpt.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(
            f"Checkpoint {path!r} has version {version!r}; this volattack reads versions <= {VERSION}."
        )
    info = ckpt["model"]
    if not isinstance(info, Mapping) or "name" not in info:
        raise ValueError(f"Checkpoint {path!r} has an invalid 'model' entry: {info!r}.")
    if not isinstance(ckpt["state_dict"], Mapping):
        raise ValueError(f"Checkpoint {path!r} has an invalid 'state_dict' entry (not a mapping).")


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> str:
    """Human-readable differences between ``model.state_dict()`` and ``state`` ('' if none):
    missing and unexpected keys and shape mismatches (``source`` names the other side)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []

    def _cut(items: list[str]) -> str:
        more = f", ... ({len(items) - 10} more)" if len(items) > 10 else ""
        return ", ".join(items[:10]) + more

    if missing:
        parts.append(f"missing keys: {_cut(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_cut(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_cut(shapes)}")
    return "; ".join(parts)


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and check a volattack checkpoint dictionary without building the model.

    Safe: ``torch.load(weights_only=True)``.

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: device for the loaded tensors.

    Returns:
        The whole checkpoint dictionary (``format``, ``version``, ``model``,
        ``state_dict`` and the extra entries).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable, unsafe or not a volattack checkpoint (message names ``path``).
    """
    ckpt = _read(path, map_location)
    _check_format(ckpt, path)
    return dict(ckpt)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a volattack checkpoint and load its weights strictly.

    Uses ``torch.load(weights_only=True)``: a file holding arbitrary Python objects is
    refused. The model is rebuilt with :func:`create_model` from the stored name,
    channels and keyword arguments, loaded with ``strict=True`` and put in eval mode.

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: device for the loaded tensors (``torch.load`` semantics).

    Returns:
        ``(model, info)``: the network in eval mode and the checkpoint dictionary without
        its ``state_dict`` (``model`` description, epoch, metrics, seed, optimizer, ...),
        plus ``info["path"]``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: (message names ``path``) not a torch file, truncated or corrupt;
            refused by the safe loader; not a volattack checkpoint; unknown model; or
            weights that do not fit the rebuilt model (missing / unexpected keys and
            shape mismatches listed).
    """
    ckpt = read_checkpoint(path, map_location)
    info = dict(ckpt["model"])
    kwargs = info.get("kwargs") or {}
    try:
        model = create_model(info["name"], int(info["in_channels"]), int(info["out_channels"]), **kwargs)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Checkpoint {str(path)!r}: cannot rebuild model {_describe(info)}: {e}") from e
    problems = state_dict_mismatch(model, ckpt["state_dict"])
    if problems:
        raise ValueError(
            f"Checkpoint {str(path)!r}: stored weights do not match model {_describe(info)}: {problems}."
        )
    model.load_state_dict(ckpt["state_dict"], strict=True)
    place_for_inference(model, map_location)
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    meta["path"] = str(path)
    logger.info("Loaded %s model from %s", info["name"], path)
    return model, meta


def load_weights_into(model: nn.Module, path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load the weights of a checkpoint into an existing model, strictly.

    Used for fine-tuning (``TrainConfig.init_checkpoint``). Accepts a volattack
    checkpoint or a bare ``state_dict`` file; the model's train/eval mode is unchanged.

    Args:
        model: the network to receive the weights (modified in place).
        path: a volattack checkpoint or a ``torch.save``'d state dict.
        map_location: device for the loaded tensors.

    Returns:
        The checkpoint dictionary without ``state_dict`` (``{}`` plus ``path`` for a bare
        state dict).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable or unsafe file, or weights that do not fit ``model``
            (message names the path, the stored architecture and the model's class, and
            lists missing / unexpected keys and shape mismatches).
    """
    ckpt = _read(path, map_location)
    if isinstance(ckpt, Mapping) and "state_dict" not in ckpt and ckpt and all(
        isinstance(v, torch.Tensor) for v in ckpt.values()
    ):
        state, meta, stored = ckpt, {}, "a bare state_dict"
    else:
        _check_format(ckpt, path)
        state = ckpt["state_dict"]
        meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        stored = f"model {_describe(ckpt['model'])}"
    problems = state_dict_mismatch(model, state)
    if problems:
        raise ValueError(
            f"Checkpoint {str(path)!r} holds {stored}, which does not fit the expected "
            f"architecture {type(model).__name__}: {problems}."
        )
    model.load_state_dict(state, strict=True)
    meta["path"] = str(path)
    logger.info("Loaded weights into %s from %s", type(model).__name__, path)
    return meta
