"""Comparison of several evaluations (the variants of a robustness study) under the same attacks.

Rows come from each evaluation's summary (:class:`~volattack.evaluation.records.Summary`), the
columns from the results schema (:mod:`volattack.evaluation.columns`): ``comparison.csv`` holds
every scalar column (each mean with its 95% bootstrap interval, ``<key>_lo``/``<key>_hi``), the
full Markdown table the schema's ``study`` columns, so a new metric column appears here without
touching this module. :func:`paired_differences` gives, for each attack, the difference in Dice
between every two variants on the same cases with a paired bootstrap interval
(:func:`volattack.metrics.statistics.paired_bootstrap_diff`); a difference whose interval
contains 0 is printed ``(n.s.)``: the cases do not separate the two variants.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from volattack.evaluation import columns as schema
from volattack.evaluation.columns import FormatContext
from volattack.evaluation.records import Summary
from volattack.evaluation.report import format_context, units_of
from volattack.utils import atomic_write_bytes


@dataclass
class ComparisonRow:
    """One variant x attack configuration (the clean row included).

    Attributes:
        variant: the variant (evaluation) name.
        attack: ``clean`` or the attack label.
        values: column key -> the summary row's value.
        units: the source unit label of the variant's results.
        bounds: its model-input range (``None``: not recorded, printed as ``[0, 1]``).
    """

    variant: str
    attack: str
    values: dict[str, Any] = field(default_factory=dict)
    units: str = schema.DEFAULT_UNITS
    bounds: Optional[tuple[float, float]] = None

    def get(self, key: str, default: Any = None) -> Any:
        """``variant``, ``attack``, ``intensity_units`` or a column value (``None`` if absent)."""
        if key in ("variant", "attack"):
            return getattr(self, key)
        if key == "intensity_units":
            return self.units
        v = schema.row_value(self.values, key)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return default if v is None else v
        return float(v)

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def to_dict(self) -> dict[str, Any]:
        """The row as plain values, keyed as :func:`comparison_columns`."""
        return {k: self.get(k) for k in comparison_columns()}


def comparison_columns() -> list[str]:
    """Header of ``comparison.csv``: ``variant``, ``attack``, every scalar column of the schema
    (``linf``/``rms`` in input units, ``*_units`` in the source unit; each mean followed by
    ``<key>_lo`` and ``<key>_hi``, its 95% bootstrap interval), ``intensity_units``."""
    return ["variant", "attack", *schema.csv_keys(), "intensity_units"]


def comparison_rows(results: Mapping[str, Mapping[str, Any]]) -> list[ComparisonRow]:
    """One row per variant x attack configuration (the clean row first) from evaluation results.

    Args:
        results: variant name -> the results dict of an evaluation (``results["summary"]``
            as built by :func:`volattack.evaluation.summary.summarize`).

    Returns:
        The rows; values as in the variants' summaries (means over cases; the clean row has the
        schema's ``clean`` columns only, e.g. no drop and no perturbation size).
    """
    rows: list[ComparisonRow] = []
    for variant, res in results.items():
        ctx = format_context(dict(res))
        summ = Summary.from_dict(res["summary"])
        for r in [summ.clean, *summ.attacks.values()]:
            rows.append(ComparisonRow(variant, r.label, dict(r.values), units_of(dict(res)), ctx.bounds))
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _attack_order(rows: Sequence[ComparisonRow]) -> list[str]:
    return list(dict.fromkeys(r.attack for r in rows))


def dice_table(rows: Sequence[ComparisonRow]) -> str:
    """Markdown pivot of :func:`comparison_rows`: one line per variant, one column per attack
    configuration (``clean`` first), mean foreground Dice and its 95% bootstrap interval over
    cases in each cell (``0.541 [0.498, 0.583]``)."""
    attacks = _attack_order(rows)
    variants = list(dict.fromkeys(r.variant for r in rows))
    col = schema.get_column("adv_dice")
    cell = {(r.variant, r.attack): schema.with_interval(col, r.values) for r in rows}
    lines = ["| Variant | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(cell.get((v, a), "–") for a in attacks) + " |")
    return "\n".join(lines)


def full_table(rows: Sequence[ComparisonRow]) -> str:
    """Markdown table of :func:`comparison_rows` with the schema's ``study`` columns (L-inf in
    input units, printed k/255 on a unit-width input range, and in the source unit)."""
    units = next((r.units for r in rows if r.units), schema.DEFAULT_UNITS)
    bounds = next((r.bounds for r in rows if r.bounds), None)
    return schema.markdown_table([[r.variant, r.attack] for r in rows], [r.values for r in rows], "study",
                                 FormatContext(units=units, bounds=bounds), label_headers=("Variant", "Attack"))


def comparison_csv(rows: Sequence[ComparisonRow]) -> str:
    """CSV text of :func:`comparison_rows` (header :func:`comparison_columns`, empty cells for ``None``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = comparison_columns()
    w.writerow(header)
    for r in rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k in header])
    return buf.getvalue()


def comparison_figure(rows: Sequence[ComparisonRow], path: Union[str, "os.PathLike[str]"]) -> Path:
    """Grouped bars of mean foreground Dice: one group per attack configuration (``clean``
    first), one bar per variant; written atomically as PNG.

    Args:
        rows: from :func:`comparison_rows`.
        path: the PNG file to write.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = _attack_order(rows)
    variants = list(dict.fromkeys(r.variant for r in rows))
    cell = {(r.variant, r.attack): r.get("adv_dice") for r in rows}
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(attacks) + 2), 4.2))
    for j, v in enumerate(variants):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(attacks))]
        ys = [cell.get((v, a)) for a in attacks]
        ys = [float("nan") if y is None else y for y in ys]
        bars = ax.bar(xs, ys, width=width * 0.95, label=v)
        ax.bar_label(bars, labels=[_fmt(y, 2) for y in ys], fontsize=6, padding=1)
    ax.set_xticks(range(len(attacks)))
    ax.set_xticklabels(attacks, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean foreground Dice (test cases)")
    ax.set_ylim(0, 1.08)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="variant", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Dice per attack and training variant")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path, suffix=".png")


def _per_case(res: Mapping[str, Any], attack: str) -> dict[str, Any]:
    """Case id -> the case's Dice in row ``attack`` (``clean``: the clean Dice)."""
    out = {}
    for c in res.get("cases") or []:
        row = c.get("clean") if attack == "clean" else (c.get("attacks") or {}).get(attack)
        if row is not None:
            out[str(c["case"])] = row.get("dice", row.get("adv_dice"))
    return out


def paired_differences(results: Mapping[str, Mapping[str, Any]], key: str = "adv_dice") -> list[dict[str, Any]]:
    """For every attack (``clean`` first) and every two variants ``a`` before ``b``: the mean over
    the cases both evaluated of ``Dice_b - Dice_a``, with its paired 95% bootstrap interval.

    Args:
        results: variant name -> results (``cases`` with per-case Dice, as written by the runner).
        key: only ``"adv_dice"`` (the row's Dice; the clean row's is the clean Dice).

    Returns:
        ``{"attack", "a", "b", "diff", "lo", "hi", "n", "significant"}`` per attack x pair;
        ``significant``: the interval excludes 0.
    """
    from volattack.metrics.statistics import paired_bootstrap_diff

    if key != "adv_dice":
        raise ValueError(f"key must be 'adv_dice', got {key!r}.")
    names = list(results)
    attacks = _attack_order(comparison_rows(results))
    out = []
    for attack in attacks:
        per = {n: _per_case(results[n], attack) for n in names}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = [c for c in per[a] if c in per[b]]
                if not common:
                    continue
                d = paired_bootstrap_diff([_num(per[b][c]) for c in common], [_num(per[a][c]) for c in common])
                out.append({"attack": attack, "a": a, "b": b, "diff": d.value, "lo": d.lo, "hi": d.hi, "n": d.n,
                            "significant": d.excludes_zero()})
    return out


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def format_difference(d: Mapping[str, Any]) -> str:
    """``+0.005 [-0.010, 0.021] (n.s.)``: a difference, its interval, and ``(n.s.)`` when the
    interval contains 0 (or cannot be computed: ``(n.s., n=1)``)."""
    if d["diff"] is None or math.isnan(d["diff"]):
        return "–"
    if math.isnan(d["lo"]) or math.isnan(d["hi"]):
        return f"{d['diff']:+.3f} (n.s., n={d['n']})"
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" + ("" if d["significant"] else " (n.s.)")


def differences_table(diffs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one line per attack, one column per variant pair ``b − a``, cells of :func:`format_difference`."""
    pairs = list(dict.fromkeys((d["a"], d["b"]) for d in diffs))
    attacks = list(dict.fromkeys(d["attack"] for d in diffs))
    cell = {(d["attack"], d["a"], d["b"]): d for d in diffs}
    lines = ["| Attack | " + " | ".join(f"{b} − {a}" for a, b in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for at in attacks:
        lines.append(f"| {at} | " + " | ".join(format_difference(cell[(at, a, b)]) if (at, a, b) in cell else "–"
                                                for a, b in pairs) + " |")
    return "\n".join(lines)


def differences_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The study's section of paired differences between variants (empty with one variant)."""
    diffs = paired_differences(results)
    if not diffs:
        return []
    return ["## Differences between variants (paired over the same cases)", "",
            "Each cell: mean over the cases of Dice(b) − Dice(a) for the column's variants b − a, with its paired "
            "95% bootstrap interval (2000 resamples of the cases, the same cases for both variants); `(n.s.)`: the "
            "interval contains 0, so these cases do not separate the two variants.", "",
            differences_table(diffs), ""]


def attacks_table(results: Mapping[str, Any]) -> str:
    """Markdown list of the evaluated attack configurations with all their parameters."""
    from volattack.evaluation.config import format_number

    lines = ["| Label | Attack | Parameters |", "|---|---|---|"]
    for a in results.get("attacks") or []:
        params = ", ".join(f"{k}={format_number(v, k)}" for k, v in (a.get("params") or {}).items())
        lines.append(f"| {a['label']} | {a['name']} | {params or 'defaults'} |")
    return "\n".join(lines)


def sanity_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The study's sanity section: each variant's warnings, or that it has none."""
    sanity = {name: r["sanity"] for name, r in results.items() if r.get("sanity") is not None}
    if not sanity:
        return []
    lines = ["## Sanity checks against gradient masking", ""]
    for name, checks in sanity.items():
        warn = [c for c in checks if c["status"] == "warn"]
        if warn:
            lines += [f"- ⚠ WARNING {name}: {c['check']}: {c['detail']}" for c in warn]
        else:
            lines.append(f"- ✓ {name}: no warnings ({len(checks)} checks, details in {name}/report.md)")
    return lines + [""]


def failed_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The study's failed-cases section (empty when no case failed)."""
    if not any(r.get("failed") for r in results.values()):
        return []
    lines = ["## Failed cases", ""]
    for name, r in results.items():
        lines += [f"- ⚠ {name}: {f['case']}: {f['reason']}" for f in r.get("failed") or []]
    return lines + [""]


__all__ = ["ComparisonRow", "attacks_table", "comparison_columns", "differences_lines", "comparison_csv", "comparison_figure", "comparison_rows",
           "dice_table", "differences_table", "failed_lines", "format_difference", "full_table", "paired_differences",
           "sanity_lines"]
