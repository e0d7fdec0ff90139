"""The black-box check (issue 11 target) on a properly trained model: the robustness study's clean
model evaluated twice on the same test phantoms, undefended and behind ``dct_quant`` with
``bpda: none`` (a non-adaptive evaluation of a piecewise-constant transform: its gradient is zero
almost everywhere, so white-box attacks see no signal). Each run has PGD-L-inf at 4/255 (the
white-box attack) and ``evaluate.sanity_blackbox_queries`` adds the query-based ``square`` attack
(Andriushchenko et al., ECCV 2020) at the same eps; the report's sanity section flags likely
gradient masking when ``square`` lowers Dice more than every white-box attack at that eps
(AutoAttack's logic, Croce & Hein, ICML 2020).

Target: the check flags ``dct_quant`` with ``bpda: none`` and does not flag the undefended model.
Printed: per run, clean Dice, PGD and square Dice with 95% bootstrap intervals over the cases, the
paired difference square - PGD with its interval, and the check's verdict.

Usage (after ``volattack study configs/robustness_study.yaml`` has trained its models):
    python benchmarks/bench_blackbox_check.py [--run runs/robustness_study/seed_0/clean] [--cases 12]
        [--queries 300] [--q 10] [--out runs/G2_blackbox] [--write]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _config(run: Path, cases: int, queries: int, defense: Any) -> Any:
    from volattack.config import RunConfig, from_dict, load_yaml

    raw = load_yaml(run / "config.yaml")
    raw["evaluate"] = {
        "split": "test", "max_cases": cases, "threat_model": "volume",
        "attacks": [{"name": "pgd", "params": {"eps": "4/255", "steps": 10, "objective": "dice_ce"}}],
        "sanity_checks": True, "sanity_unbounded_steps": 5, "sanity_blackbox_queries": queries,
        "figures": False, "sw_batch_size": 4, "sw_overlap": 0.25, "defense": defense,
    }
    raw["train"] = None  # evaluation only: the checkpoint below
    return from_dict(RunConfig, raw)


def _row(results: dict[str, Any], name: str) -> tuple[str, list[float]]:
    label = next(a["label"] for a in results["attacks"] if a["name"] == name)
    return label, [c["attacks"][label]["dice"] for c in results["cases"]]


def evaluate_pair(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the undefended and the ``dct_quant``/``bpda: none`` evaluations; one summary dict each."""
    from volattack.metrics.statistics import bootstrap_ci, paired_bootstrap_diff
    from volattack.pipeline import run_evaluate

    run = Path(args.run)
    ckpt = str(run / "train" / "best.pt")
    defenses = {"undefended": None,
                f"dct_quant q={args.q}, bpda none": {"transforms": [{"name": "dct_quant", "params": {"q": args.q}}],
                                                     "bpda": "none"}}
    out = []
    for name, defense in defenses.items():
        cfg = _config(run, args.cases, args.queries, defense)
        res = run_evaluate(cfg, Path(args.out) / name.split(",")[0].replace(" ", "_"), checkpoint=ckpt,
                           progress=False)
        clean = [c["clean"]["dice"] for c in res["cases"]]
        pgd_label, pgd = _row(res, "pgd")
        sq_label, sq = _row(res, "square")
        check = next(c for c in res["sanity"] if c["check"] == "blackbox")
        out.append({"run": name, "n": len(clean), "clean": bootstrap_ci(clean), "pgd": bootstrap_ci(pgd),
                    "square": bootstrap_ci(sq), "diff": paired_bootstrap_diff(sq, pgd), "status": check["status"],
                    "detail": check["detail"], "labels": (pgd_label, sq_label)})
    return out


def _ci(e: Any) -> str:
    return f"{e.value:.3f} [{e.lo:.3f}, {e.hi:.3f}]"


def main() -> None:
    from benchmarks_results import add_results_args, emit
    from bench_overhead import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/robustness_study/seed_0/clean")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--q", type=float, default=10.0)
    ap.add_argument("--out", default="runs/G2_blackbox")
    add_results_args(ap)
    args = ap.parse_args()
    rows = evaluate_pair(args)
    lines = [
        "## Black-box check on a trained model (square vs PGD, undefended vs dct_quant with bpda none)", "",
        f"Machine: {machine()}. Model: the robustness study's clean model ({args.run}); "
        f"{rows[0]['n']} test phantoms; PGD-L-inf 4/255 (10 steps, Dice-CE) as the white-box attack and square "
        f"({args.queries} queries, same eps) as the black-box one. Means with 95% bootstrap intervals over the "
        "cases; square − PGD paired over the same cases. Written by `python benchmarks/bench_blackbox_check.py`.", "",
        "| Run | Clean Dice | PGD 4/255 | square 4/255 | square − PGD | Check |", "|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["diff"]
        ns = "" if d.excludes_zero() else " (n.s.)"
        flag = "flagged (likely gradient masking)" if r["status"] == "warn" else f"not flagged ({r['status']})"
        lines.append(f"| {r['run']} | {_ci(r['clean'])} | {_ci(r['pgd'])} | {_ci(r['square'])} | "
                     f"{d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]{ns} | {flag} |")
    ok = rows[0]["status"] != "warn" and rows[1]["status"] == "warn"
    lines += ["", f"Target (issue 11): flags dct_quant with bpda none, not the undefended model: "
              f"{'met' if ok else 'NOT met'}.", "", *[f"- {r['run']}: {r['detail']}" for r in rows], ""]
    emit("Black-box check on a trained model", lines, args)


if __name__ == "__main__":
    main()
