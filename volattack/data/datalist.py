"""MSD-style datalists: a JSON object whose split keys hold lists of cases.

Format (Medical Segmentation Decathlon ``dataset.json``)::

    {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [...],
     "test": ["imagesTs/b.nii.gz", ...]}          # plain strings: image only

Relative paths are resolved against ``base_dir`` (default: the JSON's folder). This module
only uses the standard library (no torch/MONAI import).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_PATH_KEYS: tuple[str, ...] = ("image", "label")


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def load_datalist(
    path: PathLike,
    key: str = "training",
    base_dir: Optional[PathLike] = None,
    require_label: bool = True,
    check_files: bool = True,
) -> list[dict[str, str]]:
    """Load one split of an MSD-style datalist JSON with resolved, checked paths.

    Follows the Medical Segmentation Decathlon ``dataset.json`` convention (Antonelli et
    al., 2022), as read by ``monai.data.load_decathlon_datalist``, with stricter errors.

    Args:
        path: the JSON file.
        key: the split to read (``"training"``, ``"validation"``, ``"test"``, ...).
        base_dir: folder that relative paths are relative to; default the JSON's folder.
        require_label: every entry must have a ``"label"``; when False, entries may also be
            plain strings (image paths) or dicts without a label.
        check_files: raise if a referenced image or label file does not exist.

    Returns:
        One dict per case with absolute ``"image"`` (and ``"label"`` when present) paths;
        other string fields of an entry are kept as they are.

    Raises:
        FileNotFoundError: the JSON file, or a referenced file (the message names the key,
            the entry index and the missing path).
        ValueError: invalid JSON, a missing key (the available keys are listed), a split that
            is not a list, or an entry without ``"image"``/``"label"`` or with a non-string
            path (the entry index is named).
    """
    json_path = Path(path).expanduser()
    items = _read_split(json_path, key)
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else json_path.resolve().parent
    if not items:
        warnings.warn(f"key {key!r} of datalist {str(json_path)!r} is empty.", stacklevel=2)
    where = f"of {key!r} in {str(json_path)!r}"
    out = [_case(entry, f"entry {i} {where}", base, require_label, check_files) for i, entry in enumerate(items)]
    logger.debug("loaded %d cases from %s[%r]", len(out), json_path, key)
    return out


def _read_split(json_path: Path, key: str) -> list[Any]:
    """The list under ``key`` of a datalist JSON (errors name the file and the available keys)."""
    if not json_path.is_file():
        raise FileNotFoundError(f"Datalist JSON not found: {str(json_path)!r}.")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Datalist {str(json_path)!r} is not valid JSON: {e}.") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"Datalist {str(json_path)!r} must hold a JSON object, got {type(data).__name__}."
        )
    if key not in data:
        available = sorted(k for k, v in data.items() if isinstance(v, list))
        raise ValueError(
            f"key {key!r} not found in datalist {str(json_path)!r}; "
            f"available list keys: {available}."
        )
    items = data[key]
    if not isinstance(items, list):
        raise ValueError(
            f"key {key!r} of datalist {str(json_path)!r} must be a list of cases, "
            f"got {type(items).__name__}."
        )
    return items


def _case(entry: Any, where: str, base: Path, require_label: bool, check_files: bool) -> dict[str, Any]:
    """One datalist entry with resolved (and optionally checked) paths; ``where`` names it in errors."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object or a path string, got {type(entry).__name__}: {entry!r}.")
    for k in _PATH_KEYS if require_label else ("image",):
        if k not in entry:
            raise ValueError(f"{where} has no {k!r} field: {entry!r}.")
    case: dict[str, Any] = dict(entry)
    for k in _PATH_KEYS:
        if k not in case:
            continue
        channels = k == "image" and isinstance(case[k], list)  # one file per channel (nnU-Net's raw layout)
        paths = case[k] if channels else [case[k]]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            kind = "a non-empty path string" + (" or a non-empty list of them (one file per channel)" if k == "image" else "")
            raise ValueError(f"{where}: {k!r} must be {kind}, got {case[k]!r}.")
        paths = [_resolve(p, base) for p in paths]
        for p in paths:
            if check_files and not Path(p).exists():
                raise FileNotFoundError(f"{where}: {k} file not found: {p!r}.")
        case[k] = paths if channels else paths[0]
    return case


def datalist_class_names(datalist: Union[str, "os.PathLike[str]"]) -> dict[int, str]:
    """The ``labels`` of a datalist JSON (index -> name, as MSD's ``dataset.json`` has them);
    empty when the file has none or cannot be read."""
    try:
        labels = json.loads(Path(datalist).read_text(encoding="utf-8")).get("labels", {})
        return {int(k): str(v) for k, v in labels.items()}
    except (OSError, ValueError, AttributeError):
        return {}

