"""Models trained elsewhere: TorchScript archives and MONAI bundles.

Three on-disk forms are accepted by :func:`load_any_model`:

- a volattack checkpoint (``.pt``, :func:`volattack.models.checkpoint.load_checkpoint`;
  safe: ``torch.load(weights_only=True)``);
- a TorchScript archive (``.ts``/``.pt`` written by ``torch.jit.save``): a zip file with
  ``<root>/constants.pkl`` and ``<root>/code/`` entries, loaded with ``torch.jit.load``;
- a MONAI bundle directory (``configs/inference.json`` or ``.yaml`` with a ``network_def``
  entry, ``models/model.pt`` weights and/or ``models/model.ts``), see
  https://docs.monai.io/en/stable/mb_specification.html.

Security: a MONAI bundle config is a program. ``monai.bundle.ConfigParser`` instantiates
every ``"_target_"`` it resolves and evaluates ``"$"`` expressions as Python, so loading a
bundle runs code written by the bundle's author. :func:`load_bundle` therefore refuses to
parse a bundle unless the caller passes ``trust_bundle=True`` (``--trust-bundle`` on the
command line). Weights are always read with ``torch.load(weights_only=True)``.

Every loader returns the network in eval mode; the attacks only need an ``nn.Module``
mapping ``(B, C, H, W, D)`` images to ``(B, K, H, W, D)`` logits.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Config file names looked up (in this order) in a bundle's ``configs/`` folder.
BUNDLE_CONFIGS: tuple[str, ...] = ("inference.json", "inference.yaml", "inference.yml")

#: Keys under which bundle ``model.pt`` files sometimes wrap their state dict.
_WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "network", "net")

_TRUST_MESSAGE = (
    "loading a MONAI bundle runs code from its config (ConfigParser instantiates '_target_' "
    "entries and evaluates '$' expressions as Python); pass trust_bundle=True (command line: "
    "--trust-bundle) only for a bundle from a source you trust, or load its models/model.ts "
    "directly as a TorchScript file."
)


def is_torchscript_archive(path: PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive written by ``torch.jit.save``.

    A TorchScript archive is a zip file whose entries live under one root folder and include
    ``<root>/constants.pkl`` and ``<root>/code/...``; a ``torch.save`` checkpoint is also a
    zip file but has neither.

    Args:
        path: a file.

    Returns:
        True for a TorchScript archive; False for anything else (including missing files).
    """
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    has_constants = any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names)
    has_code = any(n.split("/", 2)[1:2] == ["code"] for n in names if n.count("/") >= 2)
    return has_constants and has_code


def load_torchscript(path: PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a TorchScript segmentation network (``torch.jit.load``) in eval mode.

    Args:
        path: an archive written by ``torch.jit.save`` (``.ts`` or ``.pt``).
        map_location: device of the loaded parameters (``torch.jit.load`` semantics).

    Returns:
        The scripted module in eval mode.

    Shape:
        Whatever the scripted network maps; for volattack ``(B, C, H, W, D)`` images to
        ``(B, K, H, W, D)`` logits.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, or not a readable TorchScript archive (corrupt,
            truncated, or a plain ``torch.save`` file); the message names the path.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"TorchScript file not found: {str(p)!r}.")
    if p.is_dir():
        raise ValueError(f"path must be a TorchScript file, got the directory {str(p)!r}.")
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates TorchScript; loading an existing archive is still the user's ask.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(p), map_location=map_location)
    except Exception as e:  # RuntimeError from the zip reader, ValueError, ...: all mean "unreadable"
        hint = ""
        if zipfile.is_zipfile(p) and not is_torchscript_archive(p):
            hint = " It is a zip archive without constants.pkl/code/: a torch.save checkpoint, not TorchScript."
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"Cannot load TorchScript file {str(p)!r} (corrupt, truncated or not TorchScript): "
            f"{type(e).__name__}: {first}{hint}"
        ) from e
    module.eval()
    logger.info("Loaded TorchScript model from %s", p)
    return module


def _find_config(bundle: Path) -> Optional[Path]:
    for name in BUNDLE_CONFIGS:
        c = bundle / "configs" / name
        if c.is_file():
            return c
    return None


def _unwrap_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict inside a bundle weights file (plain, or wrapped under one known key)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    keys = list(obj)[:10] if isinstance(obj, Mapping) else None
    raise ValueError(
        f"Bundle weights {str(path)!r} hold no state dict: expected a mapping of parameter names to "
        f"tensors, or one under a key in {list(_WRAPPER_KEYS)}; got {type(obj).__name__}"
        + (f" with keys {keys}." if keys is not None else ".")
    )


def _load_state(path: Path, map_location: Any) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"Bundle weights {str(path)!r} cannot be loaded safely (torch.load with weights_only=True): "
            f"they contain Python objects other than tensors and containers."
        ) from e
    except Exception as e:
        raise ValueError(
            f"Bundle weights {str(path)!r} are not a readable torch file (truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from e
    return _unwrap_state_dict(obj, path)


def _strict_load(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with an error naming the file and the key differences."""
    from volattack.models.checkpoint import state_dict_mismatch

    problems = state_dict_mismatch(model, state, source="file")
    if problems:
        raise ValueError(
            f"Bundle weights {str(path)!r} do not fit the network {type(model).__name__} built from "
            f"network_def: {problems}."
        )
    model.load_state_dict(state, strict=True)


def _read_metadata(bundle: Path) -> dict[str, Any]:
    meta_path = bundle / "configs" / "metadata.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        logger.warning("Ignoring unreadable bundle metadata %s: %s", meta_path, e)
        return {}
    return meta if isinstance(meta, dict) else {}


def _check_bundle_dir(bundle_dir: PathLike) -> Path:
    bundle = Path(bundle_dir).expanduser()
    if not bundle.exists():
        raise FileNotFoundError(f"Bundle directory not found: {str(bundle)!r}.")
    if not bundle.is_dir():
        raise ValueError(f"bundle_dir must be a MONAI bundle directory, got the file {str(bundle)!r}.")
    if _find_config(bundle) is None and not (bundle / "models" / "model.ts").is_file():
        raise FileNotFoundError(
            f"{str(bundle)!r} is not a MONAI bundle: none of configs/{', configs/'.join(BUNDLE_CONFIGS)} "
            f"or models/model.ts found."
        )
    return bundle


def load_bundle(
    bundle_dir: PathLike,
    *,
    trust_bundle: bool = False,
    map_location: Any = "cpu",
    network_key: str = "network_def",
) -> nn.Module:
    """Build the network of a MONAI bundle and load its weights, in eval mode.

    Bundle layout (MONAI Bundle specification)::

        bundle_dir/configs/inference.json   (or .yaml) with a "network_def" entry
        bundle_dir/configs/metadata.json    (optional)
        bundle_dir/models/model.pt          state dict (plain, or under "model"/"state_dict")
        bundle_dir/models/model.ts          TorchScript (optional)

    With ``models/model.pt``: ``monai.bundle.ConfigParser`` instantiates ``network_key``
    (only that entry and what it references; ``bundle_root`` is set to ``bundle_dir``), the
    weights are read with ``torch.load(weights_only=True)`` and loaded strictly. With only
    ``models/model.ts``: the TorchScript module is loaded instead, the config is not parsed.

    Args:
        bundle_dir: the bundle directory.
        trust_bundle: must be True: parsing a bundle config runs the code in it.
        map_location: device of the loaded weights; the network is moved there.
        network_key: config entry holding the network definition.

    Returns:
        The network in eval mode.

    Shape:
        The bundle network's own: ``(B, C, H, W, D)`` images to ``(B, K, H, W, D)`` logits for
        3D segmentation bundles.

    Raises:
        FileNotFoundError: the directory, its config or its weights are missing.
        ValueError: ``trust_bundle`` is False (the message explains why and names
            ``--trust-bundle``); ``bundle_dir`` is a file; the config has no ``network_key`` or
            cannot build it; the weights are unreadable, unsafe, or do not fit the network
            (missing/unexpected keys and the path named).
    """
    bundle = _check_bundle_dir(bundle_dir)
    if not trust_bundle:
        raise ValueError(f"trust_bundle is False for bundle {str(bundle)!r}: {_TRUST_MESSAGE}")
    weights_pt = bundle / "models" / "model.pt"
    weights_ts = bundle / "models" / "model.ts"
    if not weights_pt.is_file():
        if weights_ts.is_file():
            logger.info("Bundle %s has no models/model.pt; loading models/model.ts", bundle)
            return load_torchscript(weights_ts, map_location=map_location)
        raise FileNotFoundError(
            f"Bundle {str(bundle)!r} has no weights: expected models/model.pt or models/model.ts."
        )
    config = _find_config(bundle)
    if config is None:
        raise FileNotFoundError(
            f"Bundle {str(bundle)!r} has models/model.pt but no config: expected one of "
            f"configs/{', configs/'.join(BUNDLE_CONFIGS)}."
        )
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(config))
    except Exception as e:
        raise ValueError(f"Cannot read bundle config {str(config)!r}: {type(e).__name__}: {e}") from e
    parser["bundle_root"] = str(bundle)
    if network_key not in parser.get():
        available = sorted(k for k in parser.get() if isinstance(k, str) and not k.startswith("_"))
        raise ValueError(
            f"network_key {network_key!r} not found in bundle config {str(config)!r}; "
            f"available keys: {available}."
        )
    try:
        network = parser.get_parsed_content(network_key, instantiate=True)
    except Exception as e:  # anything the bundle's own code raises
        raise ValueError(
            f"Cannot build {network_key!r} of bundle config {str(config)!r}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(network, nn.Module):
        raise ValueError(
            f"{network_key!r} of bundle config {str(config)!r} must build a torch.nn.Module, "
            f"got {type(network).__name__}."
        )
    state = _load_state(weights_pt, map_location)
    _strict_load(network, state, weights_pt)
    if map_location is not None:
        try:
            network.to(map_location)
        except (TypeError, RuntimeError):  # callable / dict map_location: tensors already placed
            pass
    network.eval()
    logger.info("Loaded bundle %s (%s, weights %s)", bundle, type(network).__name__, weights_pt)
    return network


def load_any_model(
    spec: PathLike,
    *,
    trust_bundle: bool = False,
    map_location: Any = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a segmentation network from a volattack checkpoint, TorchScript file or MONAI bundle.

    Dispatch: a directory is a MONAI bundle (:func:`load_bundle`); a file that is a
    TorchScript archive (see :func:`is_torchscript_archive`) goes to
    :func:`load_torchscript`; any other file is read as a volattack checkpoint
    (:func:`volattack.models.checkpoint.load_checkpoint`, ``weights_only=True``).

    Args:
        spec: path of a ``.pt`` checkpoint, a ``.ts``/``.pt`` TorchScript archive, or a
            bundle directory.
        trust_bundle: allow parsing a bundle config (runs code from it); see :func:`load_bundle`.
        map_location: device of the loaded weights.

    Returns:
        ``(model, info)``: the network in eval mode and a dict with ``"format"``
        (``"volattack-checkpoint"``, ``"torchscript"`` or ``"monai-bundle"``) and ``"path"``;
        for checkpoints also the stored model description, epoch, metrics, ...; for bundles
        the ``"metadata"`` of ``configs/metadata.json`` when present.

    Shape:
        The network maps ``(B, C, H, W, D)`` images to ``(B, K, H, W, D)`` logits.

    Raises:
        FileNotFoundError: ``spec`` does not exist (or a bundle lacks its files).
        ValueError: unreadable/unsafe files, untrusted bundles, weights that do not fit
            (messages name the path).
    """
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"Model not found: {str(p)!r} (expected a volattack checkpoint, a TorchScript file or a "
            f"MONAI bundle directory)."
        )
    if p.is_dir():
        model = load_bundle(p, trust_bundle=trust_bundle, map_location=map_location)
        info: dict[str, Any] = {"format": "monai-bundle", "path": str(p)}
        meta = _read_metadata(p)
        if meta:
            info["metadata"] = meta
        return model, info
    if is_torchscript_archive(p):
        return load_torchscript(p, map_location=map_location), {"format": "torchscript", "path": str(p)}
    from volattack.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(p, map_location=map_location)
    info = dict(info)
    info.setdefault("format", "volattack-checkpoint")
    return model, info
