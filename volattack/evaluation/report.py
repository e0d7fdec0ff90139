"""Human-readable reports of evaluation results: Markdown table and CSV.

``report.md`` holds the robustness table (one row per attack configuration), per-class
Dice, and the definitions of every figure, so the report can be read on its own.
Perturbation sizes in source units are labelled with ``results["intensity_units"]`` (the
config's ``data.preprocess.units``: ``"HU"`` for CT, e.g. ``"a.u."`` for MRI; ``"HU"`` when
absent, as in results written before the key existed). With an input-transform defence
(``results["defense"]``) every Dice is that of the defended model, and the report says so.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

from volattack.utils import atomic_write_text

#: (results key, Markdown header) of the robustness table; ``{units}`` is filled by :func:`columns`.
COLUMNS = [
    ("attack", "Attack"),
    ("clean_dice", "Clean Dice"),
    ("adv_dice", "Adv Dice"),
    ("dice_drop", "Drop"),
    ("dice_drop_rel", "Rel drop"),
    ("fooling_rate", "Fooling rate"),
    ("flip_rate", "Flip rate"),
    ("hd95_mm", "HD95 mm"),
    ("linf", "L-inf"),
    ("linf_units", "L-inf {units}"),
    ("rms_units", "RMS {units}"),
    ("psnr", "PSNR dB"),
    ("ssim", "SSIM"),
    ("seconds", "Time s"),
]

#: Unit label used when results carry no ``intensity_units`` (results written before it existed: CT).
DEFAULT_UNITS = "HU"

DEFINITIONS = """\
Definitions (per case, then averaged over cases; NaN values are skipped in means):
- Dice: mean over foreground classes of 2|P∩G|/(|P|+|G|); a class absent from the ground truth
  counts as NaN (skipped) when also absent from the prediction, and 0 when predicted.
- Drop: clean Dice − adversarial Dice; Rel drop: Drop / clean Dice.
- Fooling rate (threshold t): fraction of cases whose Dice falls by at least t relative to clean,
  (clean − adv)/clean ≥ t; cases with clean Dice 0 or NaN are excluded.
- Flip rate: fraction of voxels in the union of clean-predicted and true foreground whose predicted
  class changes under attack.
- HD95 mm: 95th-percentile symmetric Hausdorff distance in millimetres (voxel spacing after
  preprocessing); a class missing from exactly one of prediction/ground truth scores the image diagonal.
- L-inf, RMS: size of the perturbation in input units and in {units} (source units: the intensity window's
  {units} per input unit);
  PSNR = 10 log10(range²/MSE); SSIM: 3D SSIM (gaussian window 7, σ 1.5) between clean and adversarial input.
- Time: seconds per case of the attack itself.
"""


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if key in ("linf", "rms"):
        return f"{v * 255:.2f}/255"
    if key in ("linf_units", "rms_units", "hd95_mm", "psnr"):
        return f"{v:.1f}"
    if key == "seconds":
        return f"{v:.2f}"
    return f"{v:.3f}"


def units_of(results: dict[str, Any]) -> str:
    """The source intensity unit of ``results`` (``"intensity_units"``; :data:`DEFAULT_UNITS` if absent)."""
    u = results.get("intensity_units")
    return u if isinstance(u, str) and u else DEFAULT_UNITS


def columns(units: str = DEFAULT_UNITS) -> list[tuple[str, str]]:
    """:data:`COLUMNS` with the source unit in the headers, e.g. ``("linf_units", "L-inf a.u.")``."""
    return [(k, h.format(units=units)) for k, h in COLUMNS]


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per attack configuration plus the clean row, keys as in :data:`COLUMNS`.

    With a defence, the clean row is the defended model's, preceded by a ``clean, no defence``
    row (the bare model's clean Dice) so the table shows what the defence costs.
    """
    summ = results["summary"]
    rows: list[dict[str, Any]] = []
    bare = summ.get("clean_undefended")
    if results.get("defense") and bare:
        rows.append({"attack": "clean, no defence", "clean_dice": bare.get("dice"), "adv_dice": bare.get("dice"),
                     "hd95_mm": bare.get("hd95_mm")})
    rows.append({"attack": "clean", "clean_dice": summ["clean"]["dice"], "adv_dice": summ["clean"]["dice"],
                 "hd95_mm": summ["clean"]["hd95_mm"]})
    for label, s in summ["attacks"].items():
        rows.append({"attack": label, **s})
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """The robustness table as Markdown (source-unit columns headed with :func:`units_of`)."""
    rows = table_rows(results)
    cols = columns(units_of(results))
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), k) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def per_class_table(results: dict[str, Any]) -> str:
    """Mean Dice per foreground class, clean and per attack, as Markdown."""
    summ = results["summary"]
    k = len(summ["clean"]["dice_per_class"])
    names = results.get("class_names") or {}
    heads = [names.get(str(c), f"class {c}") for c in range(1, k + 1)]
    lines = ["| Attack | " + " | ".join(heads) + " |", "|" + "---|" * (k + 1)]
    lines.append("| clean | " + " | ".join(_fmt(v, "dice") for v in summ["clean"]["dice_per_class"]) + " |")
    for label, s in summ["attacks"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(v, "dice") for v in s["dice_per_class"]) + " |")
    return "\n".join(lines)


def csv_text(results: dict[str, Any]) -> str:
    """The robustness table as CSV (raw numbers).

    Header: the results keys of :data:`COLUMNS` (stable for scripts; ``linf``/``rms`` in input
    units, ``linf_units``/``rms_units`` in source units), then ``intensity_units``, whose value
    on every row names those source units (e.g. ``HU``, ``a.u.``).
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    units = units_of(results)
    w.writerow([k for k, _ in COLUMNS] + ["intensity_units"])
    for r in table_rows(results):
        w.writerow(["" if r.get(k) is None else r.get(k) for k, _ in COLUMNS] + [units])
    return buf.getvalue()


def defense_lines(results: dict[str, Any]) -> list[str]:
    """Report bullets of an input-transform defence: the transforms, what the defence costs in clean
    Dice, and the adaptive attack (``results["adaptive"]``); empty without a defence."""
    lines: list[str] = []
    if results.get("defense"):
        lines.append(f"- defence: {results['defense']} — every Dice below (the `clean` row included) is "
                     "that of the defended model")
        bare: Optional[dict[str, Any]] = results["summary"].get("clean_undefended")
        clean = results["summary"]["clean"]["dice"]
        if bare and isinstance(bare.get("dice"), (int, float)) and isinstance(clean, (int, float)):
            diff = clean - bare["dice"]
            change = "–" if math.isnan(diff) else f"{diff:+.3f}"
            lines.append(f"- defence cost: clean Dice {_fmt(bare['dice'], 'dice')} without the defence, "
                         f"{_fmt(clean, 'dice')} with it ({change})")
    if results.get("adaptive"):
        text = str(results["adaptive"])
        if text.lower().startswith("adaptive attack:"):  # AdaptiveModel.describe() names itself
            text = text[len("adaptive attack:"):].strip()
        lines.append(f"- adaptive attack: {text}")
    return lines


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.md`` and ``results.csv`` into ``out_dir``; returns the report path."""
    out = Path(out_dir)
    model = results.get("model") or {}
    tm = results["threat_model"]
    if tm == "patch":
        p = results.get("patch") or {}
        threat = (f"`patch` (published protocol: tiles of {p.get('size')} with overlap {p.get('overlap')}, "
                  "each attacked through the bare model, stitched, then scored by sliding-window inference)")
    else:
        threat = "`volume` (end-to-end attack through the same sliding-window inference that scores it)"
    lines = [
        "# volattack robustness report",
        "",
        f"- model: {model.get('name', '?')} ({model.get('checkpoint', 'in memory')})",
        f"- cases: {results['summary']['n_cases']}; seed {results['seed']} (case i uses seed + i)",
        f"- threat model: {threat}",
    ]
    if results.get("transfer"):
        sur = results["transfer"]["surrogate"]
        lines.append(f"- transfer: attacks crafted on the surrogate {sur.get('name', '?')} "
                     f"({sur.get('checkpoint', 'in memory')}) and scored on the model above")
    lines += defense_lines(results)
    lines += [
        f"- fooling-rate threshold: {results['fooling_threshold']}",
        f"- volattack {results['volattack']}, torch {results['versions'].get('torch')}, "
        f"monai {results['versions'].get('monai')}",
        "",
    ]
    if results.get("failed"):
        lines += ["## Failed cases", ""]
        lines += [f"- ⚠ {f['case']} ({f['image']}): {f['reason']}" for f in results["failed"]]
        lines.append("")
    lines += [
        "## Robustness",
        "",
        markdown_table(results),
        "",
        "## Dice per class",
        "",
        per_class_table(results),
        "",
    ]
    if results.get("sanity") is not None:
        lines += ["## Sanity checks against gradient masking", ""]
        for c in results["sanity"]:
            mark = {"ok": "✓", "warn": "⚠ WARNING", "n/a": "–"}[c["status"]]
            lines.append(f"- {mark} {c['check']}: {c['detail']}")
        lines.append("")
    figs = [results.get("budget_figure")] + [c.get("figure") for c in results["cases"]]
    figs = [f for f in figs if f]
    if figs:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figs] + [""]
    lines.append(DEFINITIONS.format(units=units_of(results)))
    atomic_write_text(out / "results.csv", csv_text(results))
    return atomic_write_text(out / "report.md", "\n".join(lines))
