"""Checks against gradient masking, run on every evaluation and shown in every report.

A failed check is a warning in the report, never hidden (Athalye et al., ICML 2018;
Carlini et al., "On Evaluating Adversarial Robustness", 2019):

1. ``monotone``: within each swept attack, Dice is non-increasing as the budget grows
   (tolerance 0.01).
2. ``unbounded``: PGD with an unbounded budget (eps = the whole input range) drives the
   foreground Dice near zero (mean <= 0.1).
3. ``beats_noise``: for each Gaussian-noise entry, the strongest other attack whose measured
   L-inf is no larger than the noise's lowers Dice more than the noise.
4. ``zero_gradients``: the fraction of input voxels with an exactly-zero loss gradient at the
   clean input is small (<= 0.05); a large fraction signals masked gradients.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from volattack.evaluation.config import AttackSpec, format_number

MONOTONE_TOL = 0.01
UNBOUNDED_MAX_DICE = 0.1
ZERO_GRAD_MAX = 0.05


def _mean(vals: list[Any]) -> float:
    v = [float(x) for x in vals if isinstance(x, (int, float)) and not math.isnan(float(x))]
    return sum(v) / len(v) if v else float("nan")


def sanity_checks(results: dict[str, Any], specs: Sequence[AttackSpec]) -> list[dict[str, str]]:
    """Evaluate the four checks on ``results`` (as built by the runner).

    Returns:
        a list of ``{"check", "status" ("ok" | "warn" | "n/a"), "detail"}``.
    """
    out: list[dict[str, str]] = []
    summ = results["summary"]["attacks"]
    # 1. monotone in the budget
    for spec in specs:
        if len(spec.sweep) != 1:
            continue
        (param, values), = spec.sweep.items()
        entries = spec.expand()
        if not all(isinstance(v, (int, float)) for v in values) or len(entries) < 2:
            continue
        pairs = sorted(((v, summ[lbl]["adv_dice"]) for v, (lbl, _) in zip(values, entries) if lbl in summ))
        bad = [(a, b) for a, b in zip(pairs, pairs[1:]) if b[1] > a[1] + MONOTONE_TOL]
        text = ", ".join(f"{format_number(v)}: {d:.3f}" for v, d in pairs)
        out.append({
            "check": "monotone",
            "status": "warn" if bad else "ok",
            "detail": f"{spec.name} Dice over {param} ({text})"
            + (" increases with the budget" if bad else " is non-increasing"),
        })
    # 2. unbounded PGD
    ub = [c.get("sanity", {}).get("unbounded_pgd_dice") for c in results["cases"]]
    ub = [v for v in ub if v is not None]
    if ub:
        m = _mean(ub)
        out.append({
            "check": "unbounded",
            "status": "ok" if m <= UNBOUNDED_MAX_DICE else "warn",
            "detail": f"unbounded PGD mean Dice {m:.3f} (expected <= {UNBOUNDED_MAX_DICE})",
        })
    else:
        out.append({"check": "unbounded", "status": "n/a", "detail": "not run (sanity_unbounded_steps: 0)"})
    # 3. attacks versus noise at no larger measured L-inf
    names = {a["label"]: a["name"] for a in results.get("attacks", [])}
    noise = [lbl for lbl, n in names.items() if n == "gn" and lbl in summ]
    if not noise:
        out.append({"check": "beats_noise", "status": "n/a",
                    "detail": "no 'gn' entry in evaluate.attacks to compare with"})
    for g in noise:
        lg, dg = summ[g].get("linf", float("nan")), summ[g]["adv_dice"]
        rivals = [(summ[l]["adv_dice"], l) for l, n in names.items()
                  if n != "gn" and l in summ and summ[l].get("linf", math.inf) <= lg * (1 + 1e-6)]
        if not rivals:
            out.append({"check": "beats_noise", "status": "n/a",
                        "detail": f"no attack with L-inf <= that of {g} ({lg * 255:.2f}/255)"})
            continue
        best = min(rivals)
        out.append({
            "check": "beats_noise",
            "status": "ok" if best[0] < dg else "warn",
            "detail": f"strongest attack within L-inf {lg * 255:.2f}/255: {best[1]} Dice {best[0]:.3f} "
                      f"vs {g} Dice {dg:.3f}",
        })
    # 4. exactly-zero gradients
    zg = [c.get("sanity", {}).get("zero_grad_fraction") for c in results["cases"]]
    zg = [v for v in zg if v is not None]
    if zg:
        m = _mean(zg)
        out.append({
            "check": "zero_gradients",
            "status": "ok" if m <= ZERO_GRAD_MAX else "warn",
            "detail": f"mean fraction of exactly-zero input gradients {m:.4f} (expected <= {ZERO_GRAD_MAX})",
        })
    return out
