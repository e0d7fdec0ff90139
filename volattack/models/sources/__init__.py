"""Model sources: every way volattack opens a segmentation model, behind one function.

``load_model(path)`` asks each registered source whether it can open ``path`` and returns a
:class:`LoadedModel`: the network (eval mode), its classes and channels, class names, its
preprocessing (intensity model, orientation, spacing, window size), the sliding-window
inference it is deployed with, and the SHA-256 digest of its weights.

Built-in sources (one module each): ``checkpoint`` (volattack checkpoints,
:mod:`~volattack.models.sources.checkpoint`), ``torchscript``
(:mod:`~volattack.models.sources.torchscript`), ``monai_bundle``
(:mod:`~volattack.models.sources.monai_bundle`), ``nnunet`` (nnU-Net v2 model folders,
:mod:`~volattack.models.sources.nnunet`). Every module of this package is imported
here, so a new source is one new file with one ``@register_source(name)`` class (and its test);
a source defined elsewhere registers when its module is imported.
"""

from __future__ import annotations

from volattack.registry import import_submodules

from volattack.models.sources.base import (
    InferenceSpec,
    LoadedModel,
    ModelPreprocessing,
    ModelSource,
    list_sources,
    load_model,
    register_source,
)

import_submodules(__name__, __path__)  # every file registers its extensions on import

__all__ = [
    "InferenceSpec",
    "LoadedModel",
    "ModelPreprocessing",
    "ModelSource",
    "list_sources",
    "load_model",
    "register_source",
]
