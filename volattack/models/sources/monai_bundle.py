"""MONAI bundles (https://docs.monai.io/en/stable/mb_specification.html): the ``monai_bundle``
model source.

Layout::

    bundle_dir/configs/inference.json   (or .yaml/.yml) with a "network_def" entry
    bundle_dir/configs/metadata.json    (optional: channels and class names)
    bundle_dir/models/model.pt          state dict (plain, or under "model"/"state_dict")
    bundle_dir/models/model.ts          TorchScript (optional)

Security: a MONAI bundle config is a program. ``monai.bundle.ConfigParser`` instantiates
every ``"_target_"`` it resolves and evaluates ``"$"`` expressions as Python, so building a
bundle's network runs code written by the bundle's author: :func:`load_bundle` refuses unless
the caller passes ``trust_bundle=True`` (``--trust-bundle`` on the command line). Weights are
always read with ``torch.load(weights_only=True)``. The deployment (intensity transform,
orientation, spacing, sliding-window inferer) is read from the config's plain values without
instantiating anything (:func:`bundle_deployment`). ``LoadedModel.deploy`` (``space: source``)
is the bundle's own ``inference.json`` pipeline, parsed with ``ConfigParser`` on first use
(:mod:`volattack.models.sources.bundle_deploy`).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from volattack.ops import place_for_inference
from volattack.models.sources.base import (
    InferenceSpec,
    LoadedModel,
    ModelPreprocessing,
    ModelSource,
    check_options,
    register_source,
)
from volattack.models.sources.torchscript import load_torchscript

logger = logging.getLogger(__name__)

#: Config file names looked up (in this order) in a bundle's ``configs/`` folder.
BUNDLE_CONFIGS: tuple[str, ...] = ("inference.json", "inference.yaml", "inference.yml")

#: Keys under which bundle ``model.pt`` files sometimes wrap their state dict.
_WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "network", "net")

TRUST_MESSAGE = (
    "loading a MONAI bundle runs code from its config (ConfigParser instantiates '_target_' "
    "entries and evaluates '$' expressions as Python); pass trust_bundle=True (command line: "
    "--trust-bundle) only for a bundle from a source you trust, or load its models/model.ts "
    "directly as a TorchScript file."
)


def find_config(bundle: Path) -> Optional[Path]:
    """The bundle's inference config (first of :data:`BUNDLE_CONFIGS`), or None."""
    for name in BUNDLE_CONFIGS:
        c = bundle / "configs" / name
        if c.is_file():
            return c
    return None


def _unwrap_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict inside a bundle weights file (plain, or wrapped under one known key)."""
    def is_state(o: Any) -> bool:
        return isinstance(o, Mapping) and bool(o) and all(isinstance(v, torch.Tensor) for v in o.values())

    if is_state(obj):
        return obj
    for key in _WRAPPER_KEYS if isinstance(obj, Mapping) else ():
        if is_state(obj.get(key)):
            return obj[key]
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


def read_metadata(bundle: Path) -> dict[str, Any]:
    """``configs/metadata.json`` as a dict (``{}`` when absent or unreadable, with a warning)."""
    meta_path = bundle / "configs" / "metadata.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        logger.warning("Ignoring unreadable bundle metadata %s: %s", meta_path, e)
        return {}
    return meta if isinstance(meta, dict) else {}


def _check_bundle_dir(bundle_dir: Union[str, Path]) -> Path:
    bundle = Path(bundle_dir).expanduser()
    if not bundle.exists():
        raise FileNotFoundError(f"Bundle directory not found: {str(bundle)!r}.")
    if not bundle.is_dir():
        raise ValueError(f"bundle_dir must be a MONAI bundle directory, got the file {str(bundle)!r}.")
    if find_config(bundle) is None and not (bundle / "models" / "model.ts").is_file():
        raise FileNotFoundError(
            f"{str(bundle)!r} is not a MONAI bundle: none of configs/{', configs/'.join(BUNDLE_CONFIGS)} "
            f"or models/model.ts found."
        )
    return bundle


def _build_network(bundle: Path, config: Path, network_key: str) -> nn.Module:
    """Instantiate ``network_key`` of a bundle config with ``monai.bundle.ConfigParser`` (runs its code)."""
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
    return network


def load_bundle(
    bundle_dir: Union[str, Path],
    *,
    trust_bundle: bool = False,
    map_location: Any = "cpu",
    network_key: str = "network_def",
) -> nn.Module:
    """Build the network of a MONAI bundle and load its weights, in eval mode.

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
            cannot build it; the weights are unreadable, unsafe, or do not fit the network.
    """
    bundle = _check_bundle_dir(bundle_dir)
    if not trust_bundle:
        raise ValueError(f"trust_bundle is False for bundle {str(bundle)!r}: {TRUST_MESSAGE}")
    weights_pt, weights_ts = bundle / "models" / "model.pt", bundle / "models" / "model.ts"
    if not weights_pt.is_file():
        if weights_ts.is_file():
            logger.info("Bundle %s has no models/model.pt; loading models/model.ts", bundle)
            return load_torchscript(weights_ts, map_location=map_location)
        raise FileNotFoundError(f"Bundle {str(bundle)!r} has no weights: expected models/model.pt or models/model.ts.")
    config = find_config(bundle)
    if config is None:
        raise FileNotFoundError(
            f"Bundle {str(bundle)!r} has models/model.pt but no config: expected one of "
            f"configs/{', configs/'.join(BUNDLE_CONFIGS)}."
        )
    network = _build_network(bundle, config, network_key)
    _strict_load(network, _load_state(weights_pt, map_location), weights_pt)
    place_for_inference(network, map_location)
    logger.info("Loaded bundle %s (%s, weights %s)", bundle, type(network).__name__, weights_pt)
    return network


# ------------------------------------------------------------------ deployment from plain values


def _raw_config(path: Path) -> dict[str, Any]:
    import yaml

    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return data if isinstance(data, dict) else {}


def _value(raw: Mapping[str, Any], v: Any, depth: int = 0) -> Any:
    """A plain value: ``"@id"`` references (``::``/``#`` separated) to plain values are followed;
    expressions (``"$..."``, ``"%..."``) and anything unresolvable are ``None`` (never evaluated)."""
    if isinstance(v, str) and v.startswith("@"):
        node: Any = raw
        for part in re.split(r"::|#", v[1:]):
            if isinstance(node, Mapping):
                node = node.get(part)
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return _value(raw, node, depth + 1) if depth < 8 else None
    if isinstance(v, str) and v.startswith(("$", "%")):
        return None
    if isinstance(v, list):
        items = [_value(raw, x, depth) for x in v]
        return None if any(x is None for x in items) else items
    return v


def _targets(node: Any) -> list[dict[str, Any]]:
    """Every mapping with a ``_target_`` inside ``node``, depth first, in order."""
    if isinstance(node, Mapping):
        found = [dict(node)] if isinstance(node.get("_target_"), str) else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _intensity(name: str, t: dict[str, Any], get: Any) -> Any:
    """The intensity model of one MONAI intensity transform (None when not plain values)."""
    from volattack.data.intensity import PercentileIntensity, WindowIntensity, ZScoreIntensity

    try:
        if name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            return WindowIntensity(get("a_min"), get("a_max"), get("b_min", 0.0), get("b_max", 1.0))
        if name in ("ScaleIntensityRangePercentilesd", "ScaleIntensityRangePercentiles"):
            return PercentileIntensity(get("lower"), get("upper"), get("b_min", 0.0), get("b_max", 1.0),
                                       clip=bool(get("clip", False)))
        if name in ("NormalizeIntensityd", "NormalizeIntensity") and get("subtrahend") is not None:
            return ZScoreIntensity(mean=get("subtrahend"), std=get("divisor", 1.0))
    except (TypeError, ValueError) as e:
        logger.info("Bundle intensity transform %s not understood (%s); intensity unknown", name, e)
    return None


def bundle_deployment(config: Path) -> tuple[ModelPreprocessing, InferenceSpec, list[str]]:
    """Intensity model, orientation, spacing and sliding-window inference of a bundle config,
    from plain values only (safe without ``trust_bundle``: nothing is instantiated).

    Returns:
        ``(preprocessing, inference, notes)``; fields not given as plain values stay unknown
        (``None`` / defaults) and ``notes`` says which.
    """
    raw = _raw_config(config)
    fields: dict[str, Any] = {}
    notes: list[str] = []
    for t in _targets(raw.get("preprocessing", raw)):
        name = t["_target_"].rsplit(".", 1)[-1]

        def get(key: str, default: Any = None, t: dict[str, Any] = t) -> Any:
            v = _value(raw, t.get(key, default))
            return default if v is None else v

        if "intensity" not in fields and (m := _intensity(name, t, get)) is not None:
            fields["intensity"] = m
        elif name in ("Orientationd", "Orientation") and isinstance(get("axcodes"), str):
            fields.setdefault("orientation", get("axcodes"))
        elif name in ("Spacingd", "Spacing") and isinstance(get("pixdim"), list):
            fields.setdefault("spacing", tuple(get("pixdim")))
    inferer = next((t for t in _targets(raw.get("inferer", {})) if "SlidingWindow" in t["_target_"]), None)
    spec: dict[str, Any] = {}
    if inferer is not None:
        for key in ("roi_size", "overlap", "sw_batch_size", "mode"):
            v = _value(raw, inferer.get(key))
            if v is not None:
                spec[key] = tuple(v) if key == "roi_size" else v
    if "intensity" not in fields:
        notes.append("intensity transform not found as plain values")
    if inferer is None:
        notes.append("no SlidingWindowInferer")
    pre = ModelPreprocessing(roi_size=spec.get("roi_size"), **fields)
    if pre.intensity is not None:
        spec["cval"] = pre.intensity.pad_value
    return pre, InferenceSpec(**spec), notes


def _channels(meta: Mapping[str, Any]) -> tuple[Optional[int], Optional[int], dict[int, str]]:
    """``(in_channels, num_classes, class_names)`` from ``network_data_format`` of metadata.json."""
    fmt = meta.get("network_data_format") if isinstance(meta.get("network_data_format"), Mapping) else {}
    inputs = next(iter((fmt.get("inputs") or {}).values()), {}) if isinstance(fmt.get("inputs"), Mapping) else {}
    outputs = next(iter((fmt.get("outputs") or {}).values()), {}) if isinstance(fmt.get("outputs"), Mapping) else {}

    def count(d: Any) -> Optional[int]:
        n = d.get("num_channels") if isinstance(d, Mapping) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None

    names = outputs.get("channel_def") if isinstance(outputs, Mapping) else None
    class_names = {int(k): str(v) for k, v in names.items() if str(k).isdigit()} if isinstance(names, Mapping) else {}
    return count(inputs), count(outputs), class_names


@register_source("monai_bundle")
class MonaiBundleSource(ModelSource):
    """MONAI bundle directories (needs ``trust_bundle=True``). Options: ``network_key``."""

    priority = 10

    def can_open(self, path: Path) -> tuple[bool, str]:
        if not path.is_dir():
            return False, "not a directory"
        if find_config(path) is None and not (path / "models" / "model.ts").is_file():
            return False, f"no configs/{'|'.join(BUNDLE_CONFIGS)} and no models/model.ts"
        return True, "a MONAI bundle directory"

    def load(self, path: Path, *, map_location: Any = "cpu", trust_bundle: bool = False,
             **options: Any) -> LoadedModel:
        check_options(self.name, options, ("network_key",))
        module = load_bundle(path, trust_bundle=trust_bundle, map_location=map_location, **options)
        meta = read_metadata(path)
        config = find_config(path)
        pre, inference, notes = bundle_deployment(config) if config is not None else (None, None, ["no config"])
        in_channels, num_classes, class_names = _channels(meta)
        info: dict[str, Any] = {"metadata": meta} if meta else {}
        if notes:
            info["notes"] = notes
        loaded = LoadedModel.build(module, source=self.name, path=path, fmt="monai-bundle", num_classes=num_classes,
                                   in_channels=in_channels, class_names=class_names, preprocessing=pre,
                                   inference=inference, **info)
        if config is not None:  # space: source runs the bundle's own inference.json pipeline
            from volattack.models.sources.bundle_deploy import bundle_deploy

            loaded.deploy = bundle_deploy(path, config, loaded.module, meta, trust_bundle=trust_bundle)
        return loaded
