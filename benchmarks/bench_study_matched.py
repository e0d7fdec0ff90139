"""The robustness study's attacks at a matched measured budget (``evaluate.match``) on the models of
one training seed: every attack of configs/robustness_study.yaml calibrated per case, by bisection
on its strength parameter (eps, VAFA's q_max, SA2's rho), until its measured RMS change is the
target in HU, so that Dice is compared at equal measured budget rather than at nominal
parameters (:mod:`volattack.evaluation.rows.matching`).

Runs ``volattack``'s evaluation of each trained variant of ``runs/robustness_study/seed_<k>/``
(its own ``config.yaml`` and ``train/best.pt``) with ``evaluate.match`` added, into
``--out/<variant>`` (resumable), and prints per variant the matched rows' Dice with 95% bootstrap
intervals over the cases and the paired differences between variants (``n.s.`` when the interval
contains 0). The study itself leaves matching out for compute (see the config's comments).

Usage (after the study has trained its models):
    python benchmarks/bench_study_matched.py [--seed 0] [--target 4] [--cases 12] [--out runs/G2_matched] [--write]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def evaluate_variant(run: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate one trained variant with ``evaluate.match`` (its own config otherwise)."""
    from volattack.config import RunConfig, from_dict, load_yaml
    from volattack.pipeline import run_evaluate

    raw = load_yaml(run / "config.yaml")
    ev = dict(raw["evaluate"])
    for key in ("certify", "corruptions"):  # rows that do not depend on the attack budget
        ev.pop(key, None)
    ev.update(max_cases=args.cases, sanity_checks=False, figures=False,
              match={"measure": "rms_hu", "target": [args.target], "per": "case", "tolerance": args.tolerance,
                     "max_runs": args.max_runs})
    raw["evaluate"], raw["train"] = ev, None
    return run_evaluate(from_dict(RunConfig, raw), out, checkpoint=str(run / "train" / "best.pt"), progress=False)


def main() -> None:
    from benchmarks_results import add_results_args, emit
    from volattack.evaluation.comparison import comparison_rows, dice_table, differences_table, paired_differences
    from volattack.study import load_study

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="configs/robustness_study.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=4.0, help="RMS change in HU")
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--max-runs", type=int, default=3)
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--out", default="runs/G2_matched")
    add_results_args(ap)
    args = ap.parse_args()
    plan = load_study(args.study)
    base = plan.out_dir / f"seed_{args.seed}"
    results = {v: evaluate_variant(base / v, Path(args.out) / v, args) for v in plan.variants}
    tag = f"@ rms_hu={args.target:g}"
    matched = {v: {**r, "summary": {**r["summary"], "attacks": {k: a for k, a in r["summary"]["attacks"].items()
                                                                 if k.endswith(tag)}}}
               for v, r in results.items()}
    rows = comparison_rows(matched)
    diffs = [d for d in paired_differences(results) if d["attack"].endswith(tag) or d["attack"] == "clean"]
    n = next(iter(results.values()))["summary"]["n_cases"]
    lines = [f"## The study's attacks at a matched RMS of {args.target:g} HU (seed {args.seed})", "",
             f"Models: {base}/<variant>; {n} test phantoms; every attack calibrated per case to a measured RMS of "
             f"{args.target:g} HU (tolerance {args.tolerance:.0%}, at most {args.max_runs} runs per attack and case). "
             "Mean foreground Dice with 95% bootstrap intervals over the cases. Written by "
             "`python benchmarks/bench_study_matched.py`.", "", dice_table(rows), "",
             "Paired differences between variants (same cases):", "", differences_table(diffs), ""]
    emit("The study's attacks at a matched RMS", lines, args)


if __name__ == "__main__":
    main()
