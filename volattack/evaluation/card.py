"""The robustness card (``robustness.json``): what one evaluation found, in a form that merges.

Every evaluation writes a card beside ``results.json`` (from
:func:`volattack.evaluation.report.write_report`). It holds:

- ``clean``: the clean Dice with its 95% bootstrap interval over cases and the number of cases;
- ``rows``: every other row of the robustness table (each attack configuration, the
  ``reliable`` preset, and the rows of row passes such as certified Dice or corruptions), each
  with its Dice, drop and robust rate, their intervals, its kind (``attack``, ``reliable`` or
  ``row``: a row pass) and the cases behind it;
- ``config_digest``: the digest of the cache's run key (weights, model, preprocessing,
  attacks, defence, every result-affecting option, seed; :mod:`volattack.evaluation.cache`)
  and ``key_parts``, its components;
- ``dataset``: the evaluated dataset's identity: the digest of the datalist file (its
  path read from the run's ``config.yaml``), the evaluated split, the digest of the cases'
  image/label contents, and the class names;
- ``versions``: volattack, Python, torch, MONAI and the other libraries; the defence and the
  threat model; the sanity warnings.

:mod:`volattack.evaluation.leaderboard` merges cards of the same dataset into one table.
Import-light (no torch): the leaderboard command reads cards without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from volattack.evaluation import columns as schema
from volattack.evaluation.cache import digest, path_digest
from volattack.evaluation.records import Summary
from volattack.utils import atomic_write_json

logger = logging.getLogger(__name__)

CARD_FILE = "robustness.json"
#: version of the card layout
CARD_VERSION = 1
#: the columns a card row carries, each with ``<key>_ci`` and ``<key>_n``
CARD_KEYS = ("adv_dice", "dice_drop", "robust_rate")
#: label prefix of the ``reliable`` preset's rows
RELIABLE_PREFIX = "reliable"


def _datalist_of(out_dir: Path) -> tuple[Optional[str], Optional[str]]:
    """``(data.datalist, evaluated split)`` from the run's ``config.yaml`` (``None`` when absent)."""
    p = out_dir / "config.yaml"
    if not p.is_file():
        return None, None
    from volattack.yaml_config import load_yaml

    try:
        raw = load_yaml(p)
    except (OSError, ValueError) as e:
        logger.warning("robustness card: %s unreadable (%s): no datalist digest", p, e)
        return None, None
    data, ev = raw.get("data") or {}, raw.get("evaluate") or {}
    split = ev.get("split") or data.get("test_key")
    return (str(data["datalist"]) if data.get("datalist") else None), (str(split) if split else None)


def dataset_identity(results: Mapping[str, Any], out_dir: Optional[Path] = None) -> dict[str, Any]:
    """The dataset part of a card (see the module docstring); ``id`` digests what must agree for
    two cards to be compared: the datalist file's digest and the split (without a known datalist,
    the cases' contents), and the class names."""
    datalist, split = _datalist_of(out_dir) if out_dir is not None else (None, None)
    cases = results.get("cases") or []
    case_parts = sorted(str((c.get("key_parts") or {}).get("data", c.get("image"))) for c in cases)
    names = {str(k): str(v) for k, v in (results.get("class_names") or {}).items()}
    ident: dict[str, Any] = {
        "datalist": datalist,
        "datalist_digest": path_digest(datalist) if datalist else None,
        "split": split,
        "cases_digest": digest(case_parts),
        "n_cases": len(cases),
        "num_classes": results.get("num_classes"),
        "class_names": names,
    }
    source = [ident["datalist_digest"], split] if ident["datalist_digest"] else [ident["cases_digest"]]
    ident["id"] = digest(source)
    return ident


def _entry(values: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        if k in values:
            out[k] = values.get(k)
            out[k + schema.CI_SUFFIX] = values.get(k + schema.CI_SUFFIX)
            out[k + schema.N_SUFFIX] = values.get(k + schema.N_SUFFIX)
    return out


def _kind(label: str, attack_labels: set[str]) -> str:
    if label.startswith(RELIABLE_PREFIX + "("):
        return "reliable"
    return "attack" if label in attack_labels else "row"


def build_card(results: Mapping[str, Any], out_dir: Optional[Path] = None) -> dict[str, Any]:
    """The card of ``results`` (a ``results.json`` document); ``out_dir``: the run directory
    (its ``config.yaml`` names the datalist)."""
    summ = Summary.from_dict(results["summary"])
    attacks = {a["label"]: a for a in results.get("attacks") or []}
    rows = []
    for r in summ.attacks.values():
        a = attacks.get(r.label) or {}
        rows.append({"label": r.label, "kind": _kind(r.label, set(attacks)), "name": a.get("name"),
                     "params": a.get("params"), **_entry(r.values, CARD_KEYS),
                     "linf": r.get("linf"), "rms_units": r.get("rms_units")})
    cases = results.get("cases") or []
    parts = {k: v for k, v in ((cases[0].get("key_parts") or {}) if cases else {}).items() if k != "data"}
    return {
        "card_version": CARD_VERSION,
        "model": results.get("model") or {},
        "defense": results.get("defense"),
        "threat_model": results.get("threat_model"),
        "config_digest": digest(parts) if parts else None,
        "key_parts": parts,
        "dataset": dataset_identity(results, out_dir),
        "seed": results.get("seed"),
        "intensity_units": results.get("intensity_units"),
        "clean": {"dice": summ.clean.get("clean_dice"), "dice_ci": summ.clean.get("clean_dice" + schema.CI_SUFFIX),
                  "n": summ.clean.get("clean_dice" + schema.N_SUFFIX)},
        "rows": rows,
        "row_passes": results.get("row_passes") or [],
        "sanity_warnings": [f"{c['check']}: {c['detail']}" for c in results.get("sanity") or [] if c["status"] == "warn"],
        "versions": {"volattack": results.get("volattack"), **(results.get("versions") or {})},
    }


def write_card(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``robustness.json`` into ``out_dir`` (atomically); returns its path."""
    out = Path(out_dir)
    return atomic_write_json(out / CARD_FILE, build_card(results, out))


def read_card(run: str | Path) -> dict[str, Any]:
    """The card of a run directory (or the card file itself).

    Raises:
        FileNotFoundError: no ``robustness.json`` there (the message names the path).
        ValueError: the file is not a robustness card.
    """
    import json

    p = Path(run)
    p = p / CARD_FILE if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no robustness card {p} (run the evaluation first: every evaluation writes one).")
    try:
        card = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not a robustness card: {e}") from e
    if not isinstance(card, dict) or "card_version" not in card or "dataset" not in card:
        raise ValueError(f"{p} is not a robustness card (no card_version/dataset).")
    card["_path"] = str(p)
    return card


__all__ = ["CARD_FILE", "CARD_VERSION", "build_card", "dataset_identity", "read_card", "write_card"]
