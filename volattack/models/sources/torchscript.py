"""TorchScript archives (``torch.jit.save``): the ``torchscript`` model source.

A TorchScript archive is a zip file whose entries live under one root folder and include
``<root>/constants.pkl`` and ``<root>/code/...``; a ``torch.save`` checkpoint is also a zip
file but has neither. An archive carries the network only: its classes, channels and
preprocessing are unknown (``None``) unless the caller knows them.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from volattack.models.sources.base import LoadedModel, ModelSource, check_options, register_source

logger = logging.getLogger(__name__)


def _zip_names(p: Path) -> list[str] | None:
    if not p.is_file() or not zipfile.is_zipfile(p):
        return None
    try:
        with zipfile.ZipFile(p) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def is_torchscript_archive(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a TorchScript archive written by ``torch.jit.save``.

    Args:
        path: a file.

    Returns:
        True for a TorchScript archive; False for anything else (including missing files).
    """
    names = _zip_names(Path(path))
    if names is None:
        return False
    has_constants = any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names)
    has_code = any(n.split("/", 2)[1:2] == ["code"] for n in names if n.count("/") >= 2)
    return has_constants and has_code


def load_torchscript(path: Union[str, Path], map_location: Any = "cpu") -> nn.Module:
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


@register_source("torchscript")
class TorchScriptSource(ModelSource):
    """``torch.jit.save`` archives (any suffix). Options: none."""

    priority = 20  # the most specific test of the file sources

    def can_open(self, path: Path) -> tuple[bool, str]:
        if path.is_dir():
            return False, "a directory, not a file"
        if _zip_names(path) is None:
            return False, "not a zip archive (torch.jit.save writes one)"
        if not is_torchscript_archive(path):
            return False, "a zip archive without <root>/constants.pkl and <root>/code/"
        return True, "a TorchScript archive"

    def load(self, path: Path, *, map_location: Any = "cpu", trust_bundle: bool = False,
             **options: Any) -> LoadedModel:
        check_options(self.name, options)
        module = load_torchscript(path, map_location=map_location)
        return LoadedModel.build(module, source=self.name, path=path, fmt="torchscript")
