"""Human-readable reports of evaluation results: Markdown table and CSV.

``report.md`` holds the robustness table (one row per attack configuration; the ``report``
columns of the results schema, :mod:`volattack.evaluation.columns`), a second table with the
Dice columns and the robust rate as ``0.541 [0.498, 0.583]`` (mean and 95% bootstrap interval
over cases, with the number of cases behind each; kept apart so that the main table stays
readable), per-class Dice with intervals, the drops stratified by organ size, and the
definition of every column, so the report can be read on its own; ``results.csv`` holds every
scalar column as raw numbers, each mean followed by ``<key>_lo`` and ``<key>_hi``. Every
evaluation also writes its robustness card ``robustness.json``
(:mod:`volattack.evaluation.card`). Sizes in model-input units print as ``k/255`` only when the input
range (``results["bounds"]``) has width 1.
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

from volattack.evaluation import columns as schema
from volattack.evaluation.columns import DEFAULT_UNITS, FormatContext
from volattack.evaluation.goal_config import goal_text
from volattack.evaluation.records import Row, Summary
from volattack.utils import atomic_write_text


#: how every interval is computed, as the reports state it
BOOT_TEXT = "2000 resamples, seed 0"


def units_of(results: dict[str, Any]) -> str:
    """The source intensity unit of ``results`` (``"intensity_units"``; :data:`DEFAULT_UNITS` if absent)."""
    u = results.get("intensity_units")
    return u if isinstance(u, str) and u else DEFAULT_UNITS


def format_context(results: dict[str, Any]) -> FormatContext:
    """How the values of ``results`` print: its unit label and model-input range (``bounds``;
    ``[0, 1]`` for results written before it was recorded)."""
    b = results.get("bounds")
    return FormatContext(units=units_of(results), bounds=(float(b[0]), float(b[1])) if b else None)


def table_rows(results: dict[str, Any]) -> list[Row]:
    """The rows of the robustness table: the clean row (with a defence preceded by the bare
    model's ``clean, no defence`` row, so the table shows what the defence costs), then one row
    per attack configuration."""
    return Summary.from_dict(results["summary"]).rows()


def markdown_table(results: dict[str, Any]) -> str:
    """The robustness table as Markdown: the schema's ``report`` columns."""
    rows = table_rows(results)
    return schema.markdown_table([[r.label] for r in rows], [r.values for r in rows], "report",
                                 format_context(results))


#: the columns of the interval table (:func:`interval_table`)
INTERVAL_KEYS = ("clean_dice", "adv_dice", "dice_drop", "robust_rate")


def interval_table(results: dict[str, Any]) -> str:
    """The Dice columns and the robust rate of every row as ``mean [lo, hi]`` (95% percentile
    bootstrap over cases), with ``n``, the cases behind the adversarial Dice's interval (a cell
    resting on another number of cases says ``(n=k)``)."""
    rows = table_rows(results)
    ctx = format_context(results)
    cols = [schema.get_column(k) for k in INTERVAL_KEYS]
    lines = ["| Attack | n | " + " | ".join(c.heading(ctx.units) for c in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        n = r.get("adv_dice" + schema.N_SUFFIX)
        cells = []
        for c in cols:
            if c.key not in r.values:
                cells.append("–")
                continue
            text = schema.with_interval(c, r.values, ctx)
            cn = r.get(c.key + schema.N_SUFFIX)
            cells.append(text + (f" (n={cn})" if cn is not None and cn != n else ""))
        lines.append(f"| {r.label} | {'–' if n is None else n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_heads(results: dict[str, Any], k: int) -> list[str]:
    """The names of foreground classes 1..k (``results["class_names"]``; ``class c`` without a name)."""
    names = results.get("class_names") or {}
    return [names.get(str(c), f"class {c}") for c in range(1, k + 1)]


def per_class_table(results: dict[str, Any], key: str = "dice_per_class", classes: Optional[list[int]] = None) -> str:
    """The mean per foreground class of the per-class column ``key`` (default Dice), clean and per
    attack, as Markdown headed by class name (with the 95% bootstrap interval over cases when the
    results have one); ``classes``: only these class indices (default all)."""
    summ = Summary.from_dict(results["summary"])
    col = schema.get_column(key)
    rows = [r for r in [summ.clean, *summ.attacks.values()] if r.get(key) is not None]
    k = max((len(r.get(key) or []) for r in rows), default=0)
    keep = [c for c in (classes or range(1, k + 1)) if 1 <= c <= k]
    heads = class_heads(results, k)
    lines = ["| Attack | " + " | ".join(heads[c - 1] for c in keep) + " |", "|" + "---|" * (len(keep) + 1)]
    for r in rows:
        vals, cis = r.get(key) or [], r.get(key + schema.CI_SUFFIX) or []
        cells = [schema.with_interval(col, {col.key: vals[c - 1] if c - 1 < len(vals) else None,
                                            col.key + schema.CI_SUFFIX: cis[c - 1] if c - 1 < len(cis) else None})
                 for c in keep]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nsd_lines(results: dict[str, Any]) -> list[str]:
    """The per-class NSD table of the report (empty for results written before NSD existed)."""
    if results["summary"]["clean"].get("nsd_per_class") is None:
        return []
    return [f"NSD per class (tolerance {results.get('nsd_tolerance_mm', 2.0):g} mm):", "",
            per_class_table(results, "nsd_per_class"), ""]


def goal_lines(results: dict[str, Any]) -> list[str]:
    """The report section of ``evaluate.goal`` (empty without one): the goal by class name, the
    target Dice, the reached and the removed fraction per row, the removed fraction per removed
    organ by name."""
    goal = results.get("goal")
    if not goal:
        return []
    names = {v: int(k) for k, v in (results.get("class_names") or {}).items()}
    lines = ["## Attack goal", "", f"- goal: {goal_text(goal, units_of(results))}", ""]
    summ = Summary.from_dict(results["summary"])
    cols = [schema.get_column(k) for k in ("target_dice", "target_reached", "removed_fraction")]
    lines += ["| Attack | " + " | ".join(c.header for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in [summ.clean, *summ.attacks.values()]:
        lines.append(f"| {r.label} | " + " | ".join(schema.with_interval(c, r.values) for c in cols) + " |")
    removed = [*(goal.get("remove") or []), *(goal.get("relabel") or {})]
    idx = [names[n] if n in names else int(str(n).split()[-1]) for n in removed
           if n in names or str(n).split()[-1].isdigit()]
    if idx:
        lines += ["", "Removed fraction per removed organ (of its clean-predicted voxels):", "",
                  per_class_table(results, "removed_fraction_per_class", idx)]
    return lines + [""]


def size_table(results: dict[str, Any]) -> list[str]:
    """The report section of the drops stratified by organ size (empty without ground-truth volumes)."""
    from volattack.evaluation.summary import SIZE_BINS_ML, organ_size_strata

    strata = organ_size_strata(results.get("cases") or [], list(results["summary"].get("attacks") or {}))
    if not strata:
        return []
    lo, hi = SIZE_BINS_ML
    d = schema.get_column("dice_drop")
    lines = ["## Dice drop by organ size", "",
             f"Each (case, class) pair with the class present is binned by the class's ground-truth volume in that "
             f"case: small < {lo:g} mL, medium {lo:g}–{hi:g} mL, large ≥ {hi:g} mL. Drop: mean over the pairs "
             "of clean − adversarial class Dice with its 95% bootstrap interval over the pairs; n: pairs.", "",
             "| Attack | Size | n | Clean Dice | Adv Dice | Drop |", "|---|---|---|---|---|---|"]
    for s in strata:
        drop = schema.with_interval(d, {"dice_drop": s["drop"], "dice_drop_ci": s["drop_ci"]})
        lines.append(f"| {s['attack']} | {s['size']} | {s['n']} | {d.format(s['clean_dice'])} | "
                     f"{d.format(s['adv_dice'])} | {drop} |")
    return lines + [""]


def _num(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.4g}"


def certify_lines(results: dict[str, Any]) -> list[str]:
    """The report section of the certified rows (``evaluate.certify``): per sigma the test's settings,
    the certified L2 radius in input and source units, its RMS equivalent, the abstention rate and
    the passes spent (means over cases); empty without certified rows."""
    rows = [(name, a["info"]) for name, a in (results["summary"].get("attacks") or {}).items()
            if isinstance(a.get("info"), dict) and "certified_radius" in a["info"]]
    if not rows:
        return []
    units = units_of(results)
    lines = ["## Certification (randomized smoothing)", "",
             "SegCertify (Fischer et al., ICML 2021): a voxel gets the class of the smoothed model when a one-sided "
             "binomial test over n noisy passes, Holm-corrected over the voxels, rejects p <= tau at level alpha; "
             "otherwise it abstains, and abstentions count as errors in the Dice columns above. Certified radius "
             "R = sigma * Phi^-1(tau) (L2); its RMS equivalent R / sqrt(voxels) is the RMS change of an L2 "
             "perturbation of norm R spread over the whole volume (tiny for a whole volume). Means over cases.", "",
             f"| Row | sigma | n0 | n | alpha | tau | L2 radius | L2 radius ({units}) | RMS equivalent ({units}) | "
             "Abstention rate | Passes per case |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, i in rows:
        lines.append(f"| {name} | {_num(i.get('sigma'))} | {_num(i.get('n0'))} | {_num(i.get('n'))} | "
                     f"{_num(i.get('alpha'))} | {_num(i.get('tau'))} | {_num(i.get('certified_radius'))} | "
                     f"{_num(i.get('certified_radius_units'))} | {_num(i.get('certified_radius_rms_units'))} | "
                     f"{_num(i.get('abstain_rate'))} | {_num(i.get('passes'))} |")
    return lines + [""]


def csv_text(results: dict[str, Any]) -> str:
    """The robustness table as CSV (raw numbers).

    Header: ``attack``, the key of every scalar column of the schema (stable for scripts;
    ``linf``/``rms`` in input units, ``linf_units``/``rms_units`` in source units), each mean
    followed by ``<key>_lo`` and ``<key>_hi`` (:func:`~volattack.evaluation.columns.csv_keys`), then
    ``intensity_units``, whose value on every row names those source units (e.g. ``HU``, ``a.u.``).
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    units = units_of(results)
    keys = schema.csv_keys()
    w.writerow(["attack", *keys, "intensity_units"])
    for r in table_rows(results):
        vals = [schema.row_value(r.values, k) for k in keys]
        w.writerow([r.label, *("" if v is None else v for v in vals), units])
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
            dice = schema.get_column("clean_dice")
            lines.append(f"- defence cost: clean Dice {dice.format(bare['dice'])} without the defence, "
                         f"{dice.format(clean)} with it ({change})")
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
        f"- cases: {results['summary']['n_cases']}; seed {results['seed']} (the random draws of case i come "
        "from the seed and i)",
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
        "## Intervals (95% bootstrap over cases)",
        "",
        f"Mean [lo, hi]: percentile bootstrap over the cases ({BOOT_TEXT}); n: cases behind each interval. "
        "With so few cases an interval is wide: two rows whose intervals overlap are not shown to differ.",
        "",
        interval_table(results),
        "",
        "## Dice per class",
        "",
        per_class_table(results),
        "",
        *nsd_lines(results),
        *goal_lines(results),
        *size_table(results),
        *certify_lines(results),
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
    lines += ["## Definitions", "", schema.metrics_markdown(units_of(results))]
    atomic_write_text(out / "results.csv", csv_text(results))
    from volattack.evaluation.card import write_card

    write_card(results, out)
    return atomic_write_text(out / "report.md", "\n".join(lines))
