"""The leaderboard: robustness cards of several runs merged into one Markdown and CSV table.

``volattack leaderboard RUN_DIR... [--out FILE.md]`` reads each run's ``robustness.json``
(:mod:`volattack.evaluation.card`) and writes one line per run: the clean Dice and the Dice of
every row any card has (attacks, the ``reliable`` preset, certified Dice, corruptions), each as
``mean [lo, hi]`` (95% bootstrap over cases). Cards are compared only when they describe the
same evaluated dataset (the same datalist digest and split, or the same cases) and the same
label set (class names); otherwise the merge is refused, naming the runs, before anything is
written. Import-light: no torch.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from volattack.evaluation import columns as schema
from volattack.evaluation.card import read_card
from volattack.utils import atomic_write_text

#: CSV header of :func:`leaderboard_csv` (long format: one line per run x row)
CSV_HEADER = ("run", "model", "defense", "row", "kind", "dice", "dice_lo", "dice_hi", "n", "config_digest",
              "dataset_id")


def _run_name(card: Mapping[str, Any]) -> str:
    return str(Path(card["_path"]).parent)


def check_compatible(cards: Sequence[Mapping[str, Any]]) -> None:
    """Refuse cards of different datasets or label sets.

    Raises:
        ValueError: no card; cards whose ``dataset.id`` differ (another datalist, split or case
            set) or whose class names differ; the message names every run with its dataset.
    """
    if not cards:
        raise ValueError("leaderboard: give at least one run directory.")
    for field, what in (("id", "datasets"), ("class_names", "label sets")):
        groups: dict[str, list[str]] = {}
        for c in cards:
            d = c.get("dataset") or {}
            key = repr(d.get(field)) if field != "id" else str(d.get("id"))
            groups.setdefault(key, []).append(_run_name(c))
        if len(groups) > 1:
            desc = "; ".join(
                f"{', '.join(runs)}: " + (f"dataset {k} (datalist {_dataset_of(cards, runs[0])})" if field == "id"
                                          else f"classes {k}")
                for k, runs in groups.items())
            raise ValueError(f"leaderboard: the cards describe different {what} and cannot be compared: {desc}.")


def _dataset_of(cards: Sequence[Mapping[str, Any]], run: str) -> str:
    d = next(c for c in cards if _run_name(c) == run).get("dataset") or {}
    return f"{d.get('datalist') or 'unknown'}, split {d.get('split') or '?'}, {d.get('n_cases')} cases"


def _cells(card: Mapping[str, Any]) -> dict[str, tuple[Any, Any, Any, str]]:
    """Row label -> ``(dice, [lo, hi], n, kind)``; ``clean`` first."""
    cl = card.get("clean") or {}
    out = {"clean": (cl.get("dice"), cl.get("dice_ci"), cl.get("n"), "clean")}
    for r in card.get("rows") or []:
        out[r["label"]] = (r.get("adv_dice"), r.get("adv_dice_ci"), r.get("adv_dice_n"), r.get("kind", "attack"))
    return out


def _labels(cards: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(lbl for c in cards for lbl in _cells(c)))


def leaderboard_markdown(cards: Sequence[Mapping[str, Any]]) -> str:
    """One line per run, one column per row label (union over the cards, ``clean`` first):
    ``dice [lo, hi]``; ``–`` where a run lacks the row."""
    check_compatible(cards)
    labels = _labels(cards)
    col = schema.get_column("adv_dice")
    d = cards[0].get("dataset") or {}
    lines = [f"Dataset: {d.get('datalist') or 'unknown datalist'} (split {d.get('split') or '?'}, "
             f"{d.get('n_cases')} cases, id {d.get('id')}); mean foreground Dice [95% bootstrap interval over cases].",
             "", "| Run | Model | Defence | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 3)]
    for c in cards:
        cells = _cells(c)
        text = []
        for lbl in labels:
            v, ci, _, _ = cells.get(lbl, (None, None, None, ""))
            text.append(schema.with_interval(col, {"adv_dice": v, "adv_dice_ci": ci}))
        model = (c.get("model") or {}).get("name", "?")
        lines.append(f"| {_run_name(c)} | {model} | {c.get('defense') or 'none'} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_csv(cards: Sequence[Mapping[str, Any]]) -> str:
    """Long-format CSV (:data:`CSV_HEADER`): one line per run x row, raw numbers."""
    check_compatible(cards)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for c in cards:
        for lbl, (v, ci, n, kind) in _cells(c).items():
            lo, hi = (ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None))
            vals = [_run_name(c), (c.get("model") or {}).get("name"), c.get("defense") or "", lbl, kind, v, lo, hi, n,
                    c.get("config_digest"), (c.get("dataset") or {}).get("id")]
            w.writerow(["" if x is None else x for x in vals])
    return buf.getvalue()


def build_leaderboard(runs: Sequence[str | Path]) -> tuple[str, str]:
    """``(markdown, csv)`` of the cards of ``runs`` (run directories or card files).

    Raises:
        FileNotFoundError: a run without a card.
        ValueError: cards of different datasets or label sets (:func:`check_compatible`).
    """
    cards = [read_card(r) for r in runs]
    return leaderboard_markdown(cards), leaderboard_csv(cards)


def write_leaderboard(runs: Sequence[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (Markdown) and the CSV beside it (same stem, ``.csv``); every check runs first,
    so a refused merge writes nothing."""
    md, text = build_leaderboard(runs)
    out = Path(out)
    csv_path = out.with_suffix(".csv")
    return atomic_write_text(out, md), atomic_write_text(csv_path, text)


__all__ = ["CSV_HEADER", "build_leaderboard", "check_compatible", "leaderboard_csv", "leaderboard_markdown",
           "write_leaderboard"]
