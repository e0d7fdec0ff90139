"""volattack checkpoints (:func:`volattack.models.save_checkpoint` files): the ``checkpoint``
model source. The model carries the ``data.preprocess`` section it was trained with (stored in
the checkpoint, or for older checkpoints read from the ``config.yaml`` beside it)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Optional

from volattack.models.checkpoint import FORMAT, checkpoint_preprocess, load_checkpoint
from volattack.models.sources.base import LoadedModel, ModelPreprocessing, ModelSource, check_options, register_source


def _data_pickle(path: Path) -> Optional[bytes]:
    """The pickled object of a ``torch.save`` zip (tensors live in other entries, so it is small)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(n.split("/", 2)[1:2] == ["code"] for n in names if n.count("/") >= 2):
                return None  # TorchScript
            data = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            return z.read(data[0]) if data else None
    except (zipfile.BadZipFile, OSError, KeyError):
        return None


@register_source("checkpoint")
class CheckpointSource(ModelSource):
    """``.pt`` files written by ``save_checkpoint`` (read with ``weights_only=True``). Options: none."""

    priority = 10

    def can_open(self, path: Path) -> tuple[bool, str]:
        if path.is_dir():
            return False, "a directory, not a file"
        if not zipfile.is_zipfile(path):
            return False, "not a zip archive written by torch.save (truncated, legacy or not a torch file)"
        pickled = _data_pickle(path)
        if pickled is None:
            return False, "a zip archive without the data.pkl of torch.save (or a TorchScript archive)"
        if b"state_dict" not in pickled:
            return False, ("a torch.save file without a 'state_dict' entry: not a volattack checkpoint (a bare "
                           "state_dict? build the network and use volattack.models.checkpoint.load_weights_into)")
        return True, "a volattack checkpoint" if FORMAT.encode() in pickled else "a torch.save model dictionary"

    def load(self, path: Path, *, map_location: Any = "cpu", trust_bundle: bool = False,
             **options: Any) -> LoadedModel:
        check_options(self.name, options)
        module, meta = load_checkpoint(path, map_location=map_location)
        cfg, origin = checkpoint_preprocess(meta, path)
        pre = ModelPreprocessing.from_config(cfg) if cfg is not None else ModelPreprocessing()
        desc = meta.get("model", {})
        names = meta.get("class_names") or {}
        info = {k: v for k, v in meta.items() if k not in ("format", "path", "class_names", "preprocess")}
        return LoadedModel.build(
            module, source=self.name, path=path, fmt=FORMAT, num_classes=int(desc["out_channels"]),
            in_channels=int(desc["in_channels"]), class_names=dict(names), preprocessing=pre,
            architecture=str(desc.get("name")), preprocessing_from=origin, **info,
        )
