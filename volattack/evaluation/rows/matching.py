"""True budget matching: every configured attack calibrated to equal measured budgets.

``evaluate.match: {measure: rms_hu, target: [2, 4, 8], per: case, tolerance: 0.05}`` adds, for
every attack of ``evaluate.attacks`` (one per configuration without its strength parameter: a
sweep over ``eps`` gives one matched attack) and every target t, a row
``<attack> @ <measure>=<t>`` (e.g. ``pgd @ rms_hu=4``). Its strength parameter
(:data:`STRENGTH`: ``eps`` for the voxel attacks and ``fft``, ``q_max`` for ``vafa``, ``rho`` for
``sa2``) is calibrated until the *measured* budget of the attack's own output hits t within
the tolerance, so Dice is compared at equal measured budgets rather than at nominal
parameters (a VAFA ``q_max`` or an SA^2 ``rho`` says nothing about the voxel change; Hanif et
al., MICCAI 2023 and ISBI 2025, compare at nominal parameters).

Measures (:func:`volattack.measure.perturbation_stats`, the one definition of every size):
``rms_hu`` = RMS change in source units (HU for CT), ``linf_hu`` = L-inf change in source
units, ``ssim`` = 3D SSIM to the clean input. Calibration works on the increasing *size*
m(p): the measure, or 1 - SSIM.

Calibration (:class:`Calibration`), per case (``per: case``) or once per attack and target on
the mean size over the evaluated cases (``per: dataset``): the ends of the parameter range
(:func:`param_range`) are run first (a zero ``eps``/``rho`` changes nothing: size 0 without a
run); a target outside the sizes they reach is an error naming the reachable range
(:class:`BudgetError`, raised on the first case that cannot reach it, before any result is
written); then bisection on the bracketing pair of tried parameters, the split point by
interpolation of the size, linear or, once both ends have a positive size, in
log-log (exact for a power law size ~ p^k; the Illinois rule halves a retained end's weight each
further time it is kept), until a run's size is within ``tolerance * t`` of t or ``max_runs``
runs of that attack on that case (shared by all its targets) are spent; then the closest run
is reported with ``info.match_ok = 0``. Each run is the attack's ordinary run (same seed and
sample id as the attack rows), so size is a deterministic function of the parameter.

A row's ``info`` holds ``match_param`` (the calibrated value), ``match_measured`` (the
measured budget), ``match_target``, ``match_runs`` and ``match_ok``. After the last case,
:meth:`MatchPass.describe` writes ``figures/dice_vs_matched_budget.png``: mean Dice against
mean measured RMS in source units, one line per attack through its targets (with
``evaluate.figures``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from volattack.evaluation.rows import RowPass, register_row_pass

if TYPE_CHECKING:  # pragma: no cover
    from volattack.evaluation.cases import CaseData, Outcome
    from volattack.evaluation.config import EvalConfig
    from volattack.evaluation.records import Scores

logger = logging.getLogger(__name__)

#: attack -> its strength parameter (``fft`` in ``mode: amplitude`` without ``eps``: ``rho``)
STRENGTH: dict[str, str] = {
    "apgd": "eps", "bim": "eps", "cospgd": "eps", "fft": "eps", "fgsm": "eps", "gn": "eps", "pgd": "eps",
    "pgd_l2": "eps", "sea": "eps", "segpgd": "eps", "square": "eps", "sa2": "rho", "vafa": "q_max",
}
#: measure -> its key in :func:`volattack.measure.perturbation_stats`
MEASURE_KEYS = {"rms_hu": "rms_units", "linf_hu": "linf_units", "ssim": "ssim"}
#: the largest ``rho`` tried (1 would allow zeroing coefficients; the attacks need rho < 1)
RHO_MAX = 0.99
#: the largest ``q_max`` tried (0..255 intensity scale of VAFA)
Q_MAX = 255.0
FIGURE = "figures/dice_vs_matched_budget.png"


class BudgetError(RuntimeError):
    """A match target that no parameter in the attack's range reaches. Not a ``ValueError``: the
    runner records a ``ValueError`` as one failed case and goes on; this stops the evaluation
    before ``results.json`` is written."""


def strength(name: str, kw: dict[str, Any]) -> str:
    """The strength parameter of attack ``name`` with parameters ``kw`` (:data:`STRENGTH`)."""
    if name == "fft" and kw.get("mode") == "amplitude" and "eps" not in kw:
        return "rho"
    if name not in STRENGTH:
        raise ValueError(f"evaluate.match: attack {name!r} has no strength parameter to calibrate; matchable "
                         f"attacks: {sorted(STRENGTH)}.")
    return STRENGTH[name]


def param_range(name: str, param: str, kw: dict[str, Any], bounds: tuple[float, float],
                numel: int) -> tuple[float, float]:
    """``(lo, hi)`` of the strength parameter: ``eps`` in [0, hi - lo] (L-inf, noise std) or
    [0, (hi - lo) sqrt(N)] (L2, N input elements), ``rho`` in [0, 0.99], ``q_max`` in [q_min, 255]
    (q_min 1 unless configured)."""
    width = float(bounds[1]) - float(bounds[0])
    if param == "eps":
        l2 = name == "pgd_l2" or kw.get("norm") == "l2"
        return 0.0, width * math.sqrt(numel) if l2 else width
    if param == "rho":
        return 0.0, RHO_MAX
    q_min = kw.get("q_min")  # without one, VAFA's bound follows q_max down to 1 (min(preset, q_max))
    return (1.0 if q_min is None else float(q_min)), Q_MAX


class Calibration:
    """Sizes of one attack at the parameters tried so far, and the bisection over them.

    Args:
        run: parameter -> measured size (increasing in the parameter, approximately).
        lo, hi: the parameter range.
        max_runs: calls of ``run`` at most.
        zero_at_lo: size 0 at ``lo`` without a run (a zero ``eps`` or ``rho``).
    """

    def __init__(self, run: Callable[[float], float], lo: float, hi: float, max_runs: int,
                 zero_at_lo: bool = False) -> None:
        self.run, self.lo, self.hi, self.max_runs = run, float(lo), float(hi), int(max_runs)
        self.points: dict[float, float] = {self.lo: 0.0} if zero_at_lo else {}
        self.runs = 0

    def size(self, p: float) -> float:
        if p not in self.points:
            self.runs += 1
            self.points[p] = float(self.run(p))
        return self.points[p]

    def reachable(self) -> tuple[float, float]:
        """Sizes at the two ends of the range (runs them once)."""
        return self.size(self.lo), self.size(self.hi)

    def solve(self, t: float, tol: float) -> tuple[float, float, bool]:
        """``(parameter, size, within tolerance)`` of the run closest to size ``t``.

        Raises:
            ValueError: ``t`` outside the sizes the range reaches (message with that range).
        """
        f_lo, f_hi = self.reachable()
        if f_lo > t * (1 + tol) or f_hi < t * (1 - tol):
            raise ValueError(f"reachable sizes [{f_lo:.4g}, {f_hi:.4g}]")
        streak, last = 0, 0
        while True:
            p_best = min(self.points, key=lambda q: (abs(self.points[q] - t), q))
            if abs(self.points[p_best] - t) <= tol * t or self.runs >= self.max_runs:
                return p_best, self.points[p_best], abs(self.points[p_best] - t) <= tol * t
            a = max(q for q, f in self.points.items() if f < t)
            b = min(q for q, f in self.points.items() if f > t and q > a)
            logs = a > 0 and self.points[a] > 0  # power law size ~ p^k: exact in log-log
            fx = math.log if logs else (lambda v: v)
            ga, gb = fx(self.points[a]) - fx(t), fx(self.points[b]) - fx(t)
            if streak >= 2:  # Illinois: an end kept k times in a row counts 2^-(k-1) as much
                w = 0.5 ** (streak - 1)
                ga, gb = (ga * w, gb) if last > 0 else (ga, gb * w)
            xa, xb = fx(a), fx(b)
            x = xa - ga * (xb - xa) / (gb - ga)
            p = math.exp(x) if logs else x
            if not (a < p < b):
                p = 0.5 * (a + b)
            if p in self.points:  # the bracket cannot be split further in floating point
                return p_best, self.points[p_best], False
            side = 1 if self.size(p) > t else -1
            streak, last = (streak + 1 if side == last else 1), side


@register_row_pass("match")
class MatchPass(RowPass):
    """Rows ``<attack> @ <measure>=<t>`` of ``evaluate.match`` (module docstring)."""

    @classmethod
    def enabled(cls, eval_cfg: "EvalConfig") -> bool:
        return getattr(eval_cfg, "match", None) is not None

    def __init__(self, passes: Any) -> None:
        super().__init__(passes)
        self.mc = passes.cfg.match
        if self.mc.measure != "ssim" and passes.unit_scale is None:
            raise ValueError(f"evaluate.match.measure={self.mc.measure!r} needs source units, but the intensity "
                             "model has no unit scale; use measure: ssim.")
        self.items: list[tuple[str, str, str, dict[str, Any]]] = []  # (base label, attack, param, kwargs)
        for spec in passes.cfg.attacks:
            for _lbl, kw in spec.expand():
                param = strength(spec.name, kw)
                base = spec.label({k: kw[k] for k in spec.sweep if k != param})
                if base not in [it[0] for it in self.items]:
                    self.items.append((base, spec.name, param, {k: v for k, v in kw.items() if k != param}))
        first = next(iter(passes.attacks.values()), None)
        self.crafting = getattr(first, "model", passes.grad_model)
        self.dataset_params: Optional[dict[tuple[str, float], tuple[float, float, bool, int]]] = None
        self.ranges: dict[str, list[float]] = {}  # base label -> the parameter range of the first case

    def label(self, base: str, t: float) -> str:
        return f"{base} @ {self.mc.measure}={t:g}"

    def labels(self) -> list[str]:
        return [self.label(base, t) for base, *_ in self.items for t in self.mc.target]

    def _run(self, name: str, param: str, kw: dict[str, Any], p: float, data: "CaseData", index: int,
             case_seed: int) -> tuple[float, torch.Tensor, dict[str, Any]]:
        """One attack run at strength ``p``: (measured value, adversarial image, info)."""
        from volattack.measure import perturbation_stats

        atk = self.passes._create(name, self.crafting, **{**kw, param: p})
        self.passes.reseed(case_seed)
        adv, info = self.passes.attack(atk, data, index)
        stats = perturbation_stats(data.image, adv, data_range=self.passes.bounds, unit_scale=self.passes.unit_scale,
                                   with_ssim=self.mc.measure == "ssim")
        return float(stats[MEASURE_KEYS[self.mc.measure]].flatten()[0]), adv, info

    def _calibration(self, base: str, name: str, param: str, kw: dict[str, Any], data: "CaseData",
                     run: Callable[[float], float]) -> Calibration:
        lo, hi = param_range(name, param, kw, self.passes.bounds, data.image[0].numel())
        self.ranges.setdefault(base, [lo, hi])
        return Calibration(run, lo, hi, self.mc.max_runs, zero_at_lo=(lo == 0.0))

    def _solve(self, cal: Calibration, base: str, param: str, t: float, where: str) -> tuple[float, float, bool]:
        try:
            return cal.solve(self.mc.size(t), self.mc.tolerance)
        except ValueError:
            lo_m, hi_m = (self.mc.size(v) for v in cal.reachable())  # size -> measure (its own inverse)
            raise BudgetError(
                f"evaluate.match.target={t:g}: {base} cannot reach {self.mc.measure}={t:g} {where}; with {param} in "
                f"[{cal.lo:g}, {cal.hi:g}] it reaches {self.mc.measure} in [{min(lo_m, hi_m):.4g}, "
                f"{max(lo_m, hi_m):.4g}]. Choose targets in that range.") from None

    def rows(self, data: "CaseData", index: int, case_seed: int, clean: "Outcome") -> dict[str, "Scores"]:
        from volattack.evaluation.cases import attack_outcome, score

        p = self.passes
        if self.mc.per == "dataset" and self.dataset_params is None:
            self.dataset_params = self._calibrate_dataset(data)
        out: dict[str, Any] = {}
        for base, name, param, kw in self.items:
            memo: dict[float, tuple[float, torch.Tensor, dict[str, Any]]] = {}

            def run(v: float, name=name, param=param, kw=kw, memo=memo) -> float:
                memo[v] = self._run(name, param, kw, v, data, index, case_seed)
                return self.mc.size(memo[v][0])

            cal = self._calibration(base, name, param, kw, data, run)
            for t in self.mc.target:
                if self.dataset_params is not None:
                    v, _, ok, _ = self.dataset_params[(base, t)]
                    cal.size(v)
                else:
                    v, _, ok = self._solve(cal, base, param, t, f"on case {index}")
                measured, adv, info = memo[v]
                info = {**info, "match_param": v, "match_measured": measured, "match_target": t,
                        "match_runs": cal.runs, "match_ok": float(ok)}
                out[self.label(base, t)] = score(attack_outcome(p.predict(adv), adv, info, data, clean,
                                                                bounds=p.bounds, unit_scale=p.unit_scale))
        return out

    def _calibrate_dataset(self, data: "CaseData") -> dict[tuple[str, float], tuple[float, float, bool, int]]:
        """``per: dataset``: one parameter per attack and target from the mean size over the
        evaluated cases (``passes.cases``: their datalist entries, in order)."""
        from volattack.evaluation.cases import CaseData as CD
        from volattack.evaluation.cases import load_case

        entries = getattr(self.passes, "cases", None)
        if not entries:
            raise BudgetError("evaluate.match.per='dataset' needs the evaluated cases before the first case runs "
                              "(CasePasses.cases, set by the runner); use per: case.")
        cases = [CD(*load_case(e, self.passes.transforms)).to(self.passes.device) for e in entries]
        found = {}
        for base, name, param, kw in self.items:
            def run(v: float, name=name, param=param, kw=kw) -> float:
                sizes = [self.mc.size(self._run(name, param, kw, v, c, i, self.passes.seed + i)[0])
                         for i, c in enumerate(cases)]
                return sum(sizes) / len(sizes)

            cal = self._calibration(base, name, param, kw, data, run)
            for t in self.mc.target:
                v, m, ok = self._solve(cal, base, param, t, "on the mean over the cases")
                found[(base, t)] = (v, m, ok, cal.runs)
        return found

    def describe(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "name": self.name, "measure": self.mc.measure, "targets": list(self.mc.target), "per": self.mc.per,
            "tolerance": self.mc.tolerance, "max_runs": self.mc.max_runs,
            "attacks": [{"label": b, "attack": n, "parameter": prm, "range": self.ranges.get(b)}
                        for b, n, prm, _ in self.items],
        }
        if self.dataset_params is not None:
            desc["dataset_parameters"] = {self.label(b, t): v[0] for (b, t), v in self.dataset_params.items()}
        if self.passes.cfg.figures:
            fig = matched_figure(self.passes.out, [(b, [self.label(b, t) for t in self.mc.target])
                                                   for b, *_ in self.items], self.passes.pre.units)
            if fig:
                desc["figure"] = fig
        return desc


def _case_means(out: Path, labels: list[str]) -> dict[str, tuple[float, float]]:
    """Label -> (mean RMS in source units, mean Dice) over ``out/cases/*.json`` that have the label."""
    acc: dict[str, list[tuple[float, float]]] = {lbl: [] for lbl in labels}
    acc["clean"] = []
    for f in sorted((out / "cases").glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        rows = rec.get("attacks", {})
        if not all(lbl in rows for lbl in labels):
            continue
        acc["clean"].append((0.0, float(rec.get("clean", {}).get("dice", float("nan")))))
        for lbl in labels:
            acc[lbl].append((float(rows[lbl].get("rms_units") or float("nan")), float(rows[lbl].get("dice"))))
    return {k: (sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals))
            for k, vals in acc.items() if vals}


def matched_figure(out: Path, lines: list[tuple[str, list[str]]], units: str) -> Optional[str]:
    """Write ``figures/dice_vs_matched_budget.png`` (Dice against measured RMS in ``units``, one
    line per attack from the clean Dice at 0 through its matched rows); its path relative to
    ``out``, or ``None`` (no finished case, rank > 0, or no matplotlib)."""
    import io

    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    means = _case_means(out, [lbl for _, lbls in lines for lbl in lbls])
    if "clean" not in means:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        logger.warning("no figure: %s", e)
        return None
    from volattack.utils import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 4))
    for base, lbls in lines:
        pts = [means["clean"]] + [means[lbl] for lbl in lbls if lbl in means]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=base)
    ax.set_xlabel(f"measured RMS change ({units})")
    ax.set_ylabel("mean foreground Dice")
    ax.set_title("Dice at matched measured budgets")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), out / FIGURE)
    return FIGURE


__all__ = ["BudgetError", "Calibration", "MEASURE_KEYS", "MatchPass", "STRENGTH", "matched_figure", "param_range",
           "strength"]
