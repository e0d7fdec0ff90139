"""Models trained elsewhere (deprecated module): TorchScript archives and MONAI bundles now are
model sources, :mod:`volattack.models.sources.torchscript` and
:mod:`volattack.models.sources.monai_bundle`; :func:`volattack.models.sources.load_model` opens
any of them. The names below stay importable from here."""

from __future__ import annotations

import os
import warnings
from typing import Any, Union

import torch.nn as nn

from volattack.models.sources import load_model
from volattack.models.sources.monai_bundle import BUNDLE_CONFIGS, load_bundle  # noqa: F401
from volattack.models.sources.torchscript import is_torchscript_archive, load_torchscript  # noqa: F401

PathLike = Union[str, "os.PathLike[str]"]


def load_any_model(spec: PathLike, *, trust_bundle: bool = False,
                   map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Deprecated: ``loaded = load_model(spec, ...)`` and ``(loaded.module, loaded.info)``."""
    warnings.warn("load_any_model is deprecated; use volattack.load_model (a LoadedModel).", DeprecationWarning,
                  stacklevel=2)
    loaded = load_model(spec, trust_bundle=trust_bundle, map_location=map_location)
    return loaded.module, loaded.info


__all__ = ["BUNDLE_CONFIGS", "is_torchscript_archive", "load_any_model", "load_bundle", "load_torchscript"]
