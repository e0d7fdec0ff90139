"""SEA (the ``reliable`` preset) against the strongest single attack at the same eps and the same
number of forward/backward passes, on every model of the robustness study (issue 11 target).

Reads the finished runs of ``volattack study configs/robustness_study.yaml`` (nothing is run):
per model (variant x training seed), the mean foreground Dice over the test cases under each of
pgd, apgd, segpgd and cospgd (L-inf 4/255, k steps = k forward/backward passes each) and under
``reliable`` (SEA: APGD on four losses with progressive radius reduction, best iterate by lowest
case Dice; its ``info["passes"]`` counted per case). Printed per model: the passes, each Dice, the
lowest single attack and SEA minus it, paired over the cases with a 95% bootstrap interval
(``paired_bootstrap_diff``), and SEA minus the per-case worst of the four singles (an ensemble of
the singles, a stronger bar that costs four times the passes); per variant, the same difference
pooled over the seeds with the pigeonhole bootstrap over seeds x cases
(``volattack.study_seeds.two_way_bootstrap``).

Target: SEA's Dice no higher than the lowest single attack's on every model, and clearly lower
(interval excluding 0) on at least one adversarially trained model.

Usage:
    python benchmarks/bench_sea_vs_single.py [--study configs/robustness_study.yaml] [--write]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

SINGLES = ("pgd", "apgd", "segpgd", "cospgd")


def _labels(results: dict[str, Any]) -> dict[str, str]:
    """Attack name (``sea`` for the reliable preset) -> its row label, for the five compared attacks."""
    out = {}
    for a in results["attacks"]:
        if a["name"] in (*SINGLES, "sea") and a["name"] not in out:
            out[a["name"]] = a["label"]
    return out


def _passes(results: dict[str, Any], label: str, name: str) -> float:
    vals = []
    for c in results["cases"]:
        row = c["attacks"][label]
        vals.append((row.get("info") or {}).get("passes") if name == "sea" else row.get("steps_run"))
    vals = [float(v) for v in vals if isinstance(v, (int, float))]
    return float(np.mean(vals)) if vals else float("nan")


def model_rows(plan: Any, results: dict[int, dict[str, Any]]) -> tuple[list[str], dict[str, list[np.ndarray]], list[Any]]:
    """Markdown lines per model, per variant the per-seed arrays (sea - lowest single) over cases,
    and per model the paired estimate of SEA - lowest single."""
    from volattack.metrics.statistics import bootstrap_ci, paired_bootstrap_diff
    from volattack.study_seeds import seed_case_table

    lines = ["| Variant | Seed | Passes (single / SEA) | pgd | apgd | segpgd | cospgd | SEA | SEA − lowest single "
             "| SEA − per-case worst single |", "|---|---|---|---|---|---|---|---|---|---|"]
    pooled: dict[str, list[np.ndarray]] = {}
    diffs = []
    for s, per in results.items():
        for v, res in per.items():
            labels = _labels(res)
            dice = {n: seed_case_table({s: res}, labels[n])[0][0] for n in (*SINGLES, "sea")}
            means = {n: bootstrap_ci(d) for n, d in dice.items()}
            low = min(SINGLES, key=lambda n: means[n].value)
            d_low = paired_bootstrap_diff(dice["sea"], dice[low])
            diffs.append(d_low)
            worst = np.nanmin(np.stack([dice[n] for n in SINGLES]), axis=0)
            d_worst = paired_bootstrap_diff(dice["sea"], worst)
            pooled.setdefault(v, []).append(dice["sea"] - dice[low])
            passes = f"{_passes(res, labels['pgd'], 'pgd'):.0f} / {_passes(res, labels['sea'], 'sea'):.0f}"
            cells = " | ".join(f"{means[n].value:.3f}" + (" (lowest)" if n == low else "") for n in SINGLES)
            lines.append(f"| {v} | {s} | {passes} | {cells} | {means['sea'].value:.3f} | {_diff(d_low)} | "
                         f"{_diff(d_worst)} |")
    return lines, pooled, diffs


def _diff(d: Any) -> str:
    ns = "" if d.excludes_zero() else " (n.s.)"
    return f"{d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]{ns}"


def main() -> None:
    from benchmarks_results import add_results_args, emit
    from volattack.study import load_study
    from volattack.study_seeds import load_seed_results, two_way_bootstrap

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="configs/robustness_study.yaml")
    add_results_args(ap)
    args = ap.parse_args()
    plan = load_study(args.study)
    results = load_seed_results(plan)
    if not results:
        ap.error(f"no finished study run under {plan.out_dir}: run `volattack study {args.study}` first.")
    lines, pooled, diffs = model_rows(plan, results)
    n_cases = next(iter(next(iter(results.values())).values()))["summary"]["n_cases"]
    out = ["## SEA vs the strongest single attack at equal eps and passes (every model of the study)", "",
           f"Study {plan.out_dir}: {sum(len(p) for p in results.values())} models (variants x seeds), {n_cases} test "
           "phantoms each, L-inf 4/255. Dice: mean foreground Dice over the cases; differences paired over the "
           "cases with 95% bootstrap intervals, `(n.s.)` when the interval contains 0. Written by "
           "`python benchmarks/bench_sea_vs_single.py`.", "", *lines, "",
           "Pooled over the seeds (pigeonhole bootstrap over seeds x cases, the lowest single chosen per model):", "",
           "| Variant | Seeds | SEA − lowest single |", "|---|---|---|"]
    verdicts = []
    for v, arrays in pooled.items():
        width = max(a.size for a in arrays)
        table = np.full((len(arrays), width), np.nan)
        for i, a in enumerate(arrays):
            table[i, :a.size] = a
        est = two_way_bootstrap(table)
        out.append(f"| {v} | {len(arrays)} | {_diff(est)} |")
        verdicts.append((v, est))
    lower = sum(d.value <= 0 for d in diffs)
    higher = sum(d.lo > 0 for d in diffs)
    clearly = [v for v, e in verdicts if v != "clean" and e.hi < 0]
    out += ["", f"Target (issue 11): SEA's mean Dice is no higher than the lowest single attack's on {lower} of "
            f"{len(diffs)} models; significantly higher (interval above 0) on {higher}; pooled over seeds clearly "
            f"lower on an adversarially trained variant: {', '.join(clearly) if clearly else 'none'}.", ""]
    emit("SEA vs the strongest single attack", out, args)


if __name__ == "__main__":
    main()
