"""Checks against gradient masking, run on every evaluation and shown in every report.

A failed check is a warning in the report, never hidden (Athalye et al., ICML 2018;
Carlini et al., "On Evaluating Adversarial Robustness", 2019):

1. ``monotone``: within each swept attack, Dice is non-increasing as the budget grows
   (tolerance 0.01).
2. ``unbounded``: PGD with an unbounded budget (eps = the whole input range) drives the
   foreground Dice near zero (mean <= 0.1).
3. ``beats_noise``: for each Gaussian-noise entry, the strongest other attack whose measured
   RMS is no larger than the noise's lowers Dice more than the noise. RMS, not L-inf: the L-inf
   of Gaussian noise is its largest draw, about 4.5 sigma on a volume, so an L-inf comparison
   would pit the noise against attacks 4.5 times its typical size and pass almost always.
4. ``zero_gradients``: the fraction of input voxels with an exactly-zero loss gradient at the
   clean input is small (<= 0.05); a large fraction signals masked gradients.
5. ``blackbox``: each black-box ``square`` entry (Andriushchenko et al., ECCV 2020; added at the
   strongest white-box L-inf eps by ``evaluate.sanity_blackbox_queries``, or configured) against
   the best white-box L-inf attack at the same eps: a gradient-free attack that lowers Dice more
   than every gradient-based one at the same budget means the gradients mislead, i.e. likely
   gradient masking (the AutoAttack check, Croce and Hein, ICML 2020). The detail gives the
   paired difference of the case Dice with its 95% bootstrap interval.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from volattack.evaluation.columns import FormatContext, get_column
from volattack.evaluation.config import AttackSpec, format_number
from volattack.evaluation.records import CaseRecord, Summary

MONOTONE_TOL = 0.01
UNBOUNDED_MAX_DICE = 0.1
ZERO_GRAD_MAX = 0.05
#: query-based (gradient-free) attacks of the black-box check
BLACKBOX_ATTACKS = ("square",)
#: attacks that are neither white- nor black-box optimisers (random noise)
NOISE_ATTACKS = ("gn",)
#: relative tolerance of "the same eps"
EPS_RTOL = 1e-6


def _mean(vals: list[Any]) -> float:
    v = [float(x) for x in vals if isinstance(x, (int, float)) and not math.isnan(float(x))]
    return sum(v) / len(v) if v else float("nan")


def _num(v: Any, default: float) -> float:
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else default


def _monotone(summ: Summary, specs: Sequence[AttackSpec]) -> list[dict[str, str]]:
    out = []
    for spec in specs:
        if len(spec.sweep) != 1:
            continue
        (param, values), = spec.sweep.items()
        entries = spec.expand()
        if not all(isinstance(v, (int, float)) for v in values) or len(entries) < 2:
            continue
        pairs = sorted((v, summ.attacks[lbl].get("adv_dice")) for v, (lbl, _) in zip(values, entries)
                       if lbl in summ.attacks)
        bad = [(a, b) for a, b in zip(pairs, pairs[1:]) if b[1] > a[1] + MONOTONE_TOL]
        text = ", ".join(f"{format_number(v)}: {d:.3f}" for v, d in pairs)
        out.append({
            "check": "monotone",
            "status": "warn" if bad else "ok",
            "detail": f"{spec.name} Dice over {param} ({text})"
            + (" increases with the budget" if bad else " is non-increasing"),
        })
    return out


def _beats_noise(summ: Summary, names: dict[str, str], ctx: FormatContext) -> list[dict[str, str]]:
    """Each ``gn`` entry against the strongest other attack of no larger measured RMS."""
    rms = get_column("rms")
    noise = [lbl for lbl, n in names.items() if n == "gn" and lbl in summ.attacks]
    if not noise:
        return [{"check": "beats_noise", "status": "n/a", "detail": "no 'gn' entry in evaluate.attacks to compare with"}]
    out = []
    for g in noise:
        rg, dg = _num(summ.attacks[g].get("rms"), math.nan), summ.attacks[g].get("adv_dice")
        rivals = [(summ.attacks[lbl].get("adv_dice"), lbl) for lbl, n in names.items()
                  if n != "gn" and lbl in summ.attacks and _num(summ.attacks[lbl].get("rms"), math.inf) <= rg * (1 + 1e-6)]
        if not rivals:
            out.append({"check": "beats_noise", "status": "n/a",
                        "detail": f"no attack with RMS <= that of {g} ({rms.format(rg, ctx)})"})
            continue
        best = min(rivals)
        out.append({
            "check": "beats_noise",
            "status": "ok" if best[0] < dg else "warn",
            "detail": f"strongest attack within the RMS of {g} ({rms.format(rg, ctx)}): {best[1]} Dice {best[0]:.3f} "
                      f"(RMS {rms.format(summ.attacks[best[1]].get('rms'), ctx)}) vs {g} Dice {dg:.3f}",
        })
    return out


def _same_eps(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= EPS_RTOL * max(abs(a), abs(b), 1e-12)


def whitebox_linf(attacks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The white-box L-inf entries of ``results["attacks"]``: an L-inf budget, not black-box, not noise."""
    return [a for a in attacks if a.get("linf_budget") and a["name"] not in BLACKBOX_ATTACKS + NOISE_ATTACKS]


def _case_dice(cases: Sequence[CaseRecord], label: str) -> list[Any]:
    return [c.attacks[label].get("adv_dice") if label in c.attacks else None for c in cases]


def _blackbox(summ: Summary, results: dict[str, Any], cases: Sequence[CaseRecord]) -> list[dict[str, str]]:
    """Each black-box entry against the best white-box L-inf attack at the same eps (check 5)."""
    attacks = [a for a in results.get("attacks") or [] if a["label"] in summ.attacks]
    boxes = [a for a in attacks if a["name"] in BLACKBOX_ATTACKS]
    if not boxes:
        return [{"check": "blackbox", "status": "n/a", "detail": "no black-box attack (set evaluate."
                 "sanity_blackbox_queries > 0, or add a 'square' entry at the eps of a white-box attack)"}]
    from volattack.metrics.statistics import paired_bootstrap_diff

    out = []
    for b in boxes:
        eps = (b.get("params") or {}).get("eps")
        rivals = [(summ.attacks[a["label"]].get("adv_dice"), a["label"]) for a in whitebox_linf(attacks)
                  if _same_eps((a.get("params") or {}).get("eps"), eps)]
        rivals = [r for r in rivals if isinstance(r[0], (int, float)) and not math.isnan(r[0])]
        if not rivals:
            out.append({"check": "blackbox", "status": "n/a",
                        "detail": f"no white-box L-inf attack at the eps of {b['label']} ({format_number(eps, 'eps')})"})
            continue
        best_dice, best = min(rivals)
        dice = _num(summ.attacks[b["label"]].get("adv_dice"), math.nan)
        d = paired_bootstrap_diff(_case_dice(cases, b["label"]), _case_dice(cases, best))
        masked = dice < best_dice
        verdict = ("lowers Dice more than every white-box attack at that budget: likely gradient masking"
                   if masked else "lowers Dice no more than the best white-box attack: no sign of gradient masking")
        out.append({
            "check": "blackbox",
            "status": "warn" if masked else "ok",
            "detail": f"{b['label']} Dice {dice:.3f} vs the best white-box attack at eps {format_number(eps, 'eps')}, "
                      f"{best} Dice {best_dice:.3f} (black − white {d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], "
                      f"n={d.n}): the black-box attack {verdict}",
        })
    return out


def sanity_checks(results: dict[str, Any], specs: Sequence[AttackSpec]) -> list[dict[str, str]]:
    """Evaluate the five checks on ``results`` (as built by the runner: ``summary``, ``cases``,
    ``attacks``, and ``bounds`` for printing sizes).

    Returns:
        a list of ``{"check", "status" ("ok" | "warn" | "n/a"), "detail"}``.
    """
    summ = Summary.from_dict(results["summary"])
    cases = [CaseRecord.from_dict(c) for c in results.get("cases") or []]
    bounds = results.get("bounds")
    ctx = FormatContext(bounds=tuple(bounds) if bounds else None)
    out = _monotone(summ, specs)
    ub = [c.sanity.unbounded_pgd_dice for c in cases if c.sanity.unbounded_pgd_dice is not None]
    if ub:
        m = _mean(ub)
        out.append({
            "check": "unbounded",
            "status": "ok" if m <= UNBOUNDED_MAX_DICE else "warn",
            "detail": f"unbounded PGD mean Dice {m:.3f} (expected <= {UNBOUNDED_MAX_DICE})",
        })
    else:
        out.append({"check": "unbounded", "status": "n/a", "detail": "not run (sanity_unbounded_steps: 0)"})
    names = {a["label"]: a["name"] for a in results.get("attacks", [])}
    out += _beats_noise(summ, names, ctx)
    zg = [c.sanity.zero_grad_fraction for c in cases if c.sanity.zero_grad_fraction is not None]
    if zg:
        m = _mean(zg)
        out.append({
            "check": "zero_gradients",
            "status": "ok" if m <= ZERO_GRAD_MAX else "warn",
            "detail": f"mean fraction of exactly-zero input gradients {m:.4f} (expected <= {ZERO_GRAD_MAX})",
        })
    return out + _blackbox(summ, results, cases)
