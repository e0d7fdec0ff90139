"""The per-case result cache: ``cases/<case>.json``, keyed on everything that produced the case.

A cached case is reused only when its key equals the key of the case about to be computed.
The key is made of named components, each a digest (stored in every case file, so the log can
say *why* a case is recomputed: ``case 0001_x recomputed: weights changed``):

- ``schema``: :data:`~volattack.evaluation.columns.SCHEMA_VERSION` and the per-case column keys;
- ``weights`` / ``surrogate``: :func:`volattack.ops.module_digest` of the evaluated model and
  of the transfer surrogate (their content, not their path: replacing ``best.pt`` at the same
  path recomputes);
- ``model``: the model description (architecture, format), without its path;
- ``data``: the case's image and label files (SHA-256 of their bytes; a DICOM folder by the
  names, sizes and modification times of its files) and its index in the split;
- ``preprocess``, ``attacks`` (label, name, parameters of every configuration), ``defense``,
  ``evaluate`` (every other ``evaluate`` option), ``seed``, ``num_classes``: every option by
  default, minus the explicit lists :data:`EXCLUDED_OPTIONS` and :data:`EXCLUDED_PREPROCESS`.

The volattack, torch and MONAI versions are recorded in ``results.json`` but are not part of
the key (an upgrade does not recompute a finished evaluation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from volattack.evaluation import columns as schema
from volattack.evaluation.records import CaseRecord
from volattack.utils import atomic_write_json

logger = logging.getLogger(__name__)

#: ``evaluate`` options that are not part of the cache key, and why no per-case number depends on them.
EXCLUDED_OPTIONS: dict[str, str] = {
    "checkpoint": "a path: the model is keyed by its weights digest",
    "surrogate_checkpoint": "a path: the surrogate is keyed by its weights digest",
    "split": "selects the cases: each case is keyed by its own files and index",
    "max_cases": "selects the cases",
    "fooling_threshold": "used only by the summary, which every run recomputes",
    "save_adv": "writes files: a reused case whose requested files are missing is recomputed",
    "save_pred": "writes files: a reused case whose requested files are missing is recomputed",
    "figures": "draws figures: a reused case that should have a panel and has none is recomputed",
    "figure_cases": "draws figures: a reused case that should have a panel and has none is recomputed",
    "device": "changes floating-point rounding only",
}

#: ``data.preprocess`` fields that are not part of the key (no effect on evaluation).
EXCLUDED_PREPROCESS: dict[str, str] = {
    "units": "a label in the reports",
    "num_samples": "training crops only",
    "pos": "training crops only",
    "neg": "training crops only",
}

#: model-description fields that are not part of the key (the weights digest keys the content).
EXCLUDED_MODEL_INFO = ("checkpoint", "path")


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj``'s canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def path_digest(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """Digest of a data file's bytes (SHA-256), or of a folder's file names, sizes and modification
    times (DICOM series), or of the digests of a list of channel files in order; ``"missing"``
    when the path does not exist."""
    if isinstance(path, (list, tuple)):
        return digest([path_digest(q) for q in path])
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    if p.is_dir():
        for q in sorted(p.rglob("*")):
            if q.is_file():
                st = q.stat()
                h.update(f"{q.relative_to(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    return "missing"


@dataclass(frozen=True)
class CacheKey:
    """A cache key: named components, each a digest; :attr:`value` digests them all."""

    parts: Mapping[str, str]

    @property
    def value(self) -> str:
        return digest(dict(self.parts))

    def changed(self, old_parts: Mapping[str, str]) -> list[str]:
        """Names of the components that differ from ``old_parts`` (added or removed ones included)."""
        names = list(self.parts) + [k for k in old_parts if k not in self.parts]
        return [k for k in names if self.parts.get(k) != old_parts.get(k)]


def run_key_parts(*, eval_options: Mapping[str, Any], preprocess: Mapping[str, Any],
                  attacks: Sequence[tuple[str, str, Mapping[str, Any]]], seed: int, num_classes: int,
                  weights: str, model_info: Optional[Mapping[str, Any]] = None,
                  surrogate: Optional[str] = None, surrogate_info: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """The components shared by every case of a run (each a digest).

    Args:
        eval_options: the ``evaluate`` section as plain values (``to_dict``); ``attacks`` and
            ``defense`` get components of their own, :data:`EXCLUDED_OPTIONS` none.
        preprocess: ``data.preprocess`` as plain values (:data:`EXCLUDED_PREPROCESS` dropped).
        attacks: ``(label, name, params)`` of every attack configuration.
        seed: the run seed.
        num_classes: K.
        weights: weights digest of the evaluated model.
        model_info: the model description (its path fields dropped).
        surrogate: weights digest of the transfer surrogate (``None``: white box).
        surrogate_info: the surrogate's description.
    """
    evaluate = {k: v for k, v in eval_options.items()
                if k not in EXCLUDED_OPTIONS and k not in ("attacks", "defense")}
    parts = {
        "schema": digest(schema.schema_fingerprint()),
        "weights": weights,
        "model": digest({k: v for k, v in (model_info or {}).items() if k not in EXCLUDED_MODEL_INFO}),
        "preprocess": digest({k: v for k, v in preprocess.items() if k not in EXCLUDED_PREPROCESS}),
        "attacks": digest([[lbl, name, dict(kw)] for lbl, name, kw in attacks]),
        "defense": digest(eval_options.get("defense")),
        "evaluate": digest(evaluate),
        "seed": digest(seed),
        "num_classes": digest(num_classes),
    }
    if surrogate is not None:
        parts["surrogate"] = digest([surrogate, {k: v for k, v in (surrogate_info or {}).items()
                                                 if k not in EXCLUDED_MODEL_INFO}])
    return parts


def case_key(run_parts: Mapping[str, str], entry: Mapping[str, Any], index: int) -> CacheKey:
    """The key of case ``index`` of the split: the run's components plus its ``data`` component."""
    files = {k: path_digest(v) for k, v in sorted(entry.items()) if k in ("image", "label") and v}
    return CacheKey({**run_parts, "data": digest([index, files])})


class CaseCache:
    """``cases/<case>.json`` of a run directory: lookup with the reason of a miss, atomic store.

    Args:
        folder: the ``cases`` folder (created when needed).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.json"

    def lookup(self, case_id: str, key: CacheKey) -> tuple[Optional[CaseRecord], str]:
        """The cached record of ``case_id`` if its key equals ``key``, else ``None`` and why not
        (``"not computed yet"``, ``"weights changed"``, ``"data, attacks changed"``, ...)."""
        p = self.path(case_id)
        if not p.is_file():
            return None, "not computed yet"
        try:
            raw = json.loads(p.read_text())
            rec = CaseRecord.from_dict(raw)
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"its file {p.name} is unreadable ({type(e).__name__})"
        if rec.key == key.value and rec.key_parts:
            return rec, "reused"
        if not rec.key_parts:
            return None, "written by an earlier volattack (no key components)"
        changed = key.changed(rec.key_parts)
        return None, (", ".join(changed) or "key") + " changed"

    def store(self, record: CaseRecord) -> Path:
        """Write ``record`` atomically (a kill leaves the old file or the new one, never half)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(self.path(record.case), record.to_dict())
