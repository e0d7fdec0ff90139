"""Robustness studies over training seeds: every variant trained and evaluated once per seed,
means over seeds x cases with intervals that count both sources of variation.

A study config with ``seeds: [0, 1, 2]`` (see :mod:`volattack.study`) runs the single-seed study
once per seed, with the config's ``seed`` replaced by that seed (model initialisation, crops,
shuffling, attack random starts; the data, including the phantoms' own seed, stay the same),
into ``<out>/seed_<k>/<variant>/`` (``<out>/seed_<k>/comparison.md`` is that seed's own
comparison), and writes the aggregated comparison into ``<out>/``: ``comparison.{csv,md,png}``
and ``study.json``, in the same columns as a single-seed study.

Each row value (variant x attack configuration) is the mean over the seeds of the seed's row
value (itself a mean over the test cases). Its 95% interval comes from
:func:`two_way_bootstrap`, the pigeonhole bootstrap of Owen ("The pigeonhole bootstrap", Annals
of Applied Statistics 1(2), 2007) for a crossed design: every model of every seed is evaluated
on the *same* test cases, so seeds and cases are two crossed random factors of a seed x case
table of per-case values. Each resample draws the seeds with replacement and, independently,
the cases with replacement *once for all seeds*, and recomputes the mean over the resampled
table. Why this one:

- the percentile bootstrap of the cases alone (all seeds kept, each case a cluster of its
  seeds' values) treats the seeds as fixed and gives an interval for these three trained models,
  not for the training recipe;
- a nested (hierarchical) bootstrap that resamples the cases independently within each seed
  treats case ``c`` under seed 0 and under seed 1 as independent draws; averaging ``S``
  independent case resamples divides the case variance by ``S`` and makes the interval too
  narrow when, as here, a hard case is hard for every seed;
- the pigeonhole bootstrap keeps the case pairing across seeds; its variance is that of the
  two-way random-effects mean up to the interaction term, which it counts once more (Owen 2007:
  mildly conservative). For an additive table ``x[s, c] = a_s + b_c`` the bootstrap variance
  of the mean is ``var(a) / S + var(b) / C`` (population variances), the test's hand check.

With 3 seeds the seed draw has only 10 distinct multisets, so the seed part of the interval is
coarse: read the interval as an honest rough range, not a precise one. Paired differences
between two variants (:func:`seed_differences`) bootstrap the table of per-(seed, case)
differences ``Dice_b - Dice_a`` the same way (same seeds, same cases for both); a difference
whose interval contains 0 is printed ``(n.s.)``. Every random choice comes from a local
:class:`numpy.random.Generator` seeded with ``seed`` (default 0), so intervals are reproducible.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from volattack.config import ConfigError, dump_yaml, to_dict
from volattack.evaluation import columns as schema
from volattack.evaluation.comparison import (
    ComparisonRow,
    attacks_table,
    comparison_csv,
    comparison_figure,
    dice_table,
    differences_table,
    full_table,
)
from volattack.evaluation.records import CaseRecord, Summary
from volattack.evaluation.report import format_context, units_of
from volattack.metrics.statistics import DEFAULT_LEVEL, DEFAULT_N_BOOT, Estimate
from volattack.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

#: the key of the seeds list in a study config
SEEDS_KEY = "seeds"
#: resampled cells computed per block (bounds the memory of the index arrays)
_BLOCK = 1 << 22

__all__ = ["SEEDS_KEY", "aggregate_rows", "aggregated_results", "load_seed_results", "parse_seeds", "run_seeded_study", "seed_case_table", "seed_dir",
           "seed_differences", "two_way_bootstrap", "two_way_replicates", "write_seed_comparison"]


def parse_seeds(value: Any) -> Optional[list[int]]:
    """The ``seeds`` entry of a study config: ``None`` (absent: one run with ``seed``) or a
    non-empty list of distinct integers >= 0.

    Raises:
        ConfigError: not a list, empty, a non-integer or negative entry, or a repeated seed
            (the same training run twice would count as two independent seeds).
    """
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{SEEDS_KEY} must be a list of training seeds (e.g. [0, 1, 2]), got {value!r}.")
    if not value:
        raise ConfigError(f"{SEEDS_KEY} must list at least one seed, got an empty list.")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{SEEDS_KEY} entries must be integers >= 0, got {s!r} in {list(value)!r}.")
    dup = sorted({s for s in value if list(value).count(s) > 1})
    if dup:
        raise ConfigError(f"{SEEDS_KEY} must not repeat a seed, got {list(value)!r} (repeated: {dup}).")
    return [int(s) for s in value]


def seed_dir(out_dir: Path, seed: int) -> Path:
    """The folder of one seed's single-seed study: ``<out>/seed_<seed>``."""
    return Path(out_dir) / f"seed_{seed}"


def _table_means(x: np.ndarray) -> np.ndarray:
    """Mean over seeds of the per-seed means over cases, NaN skipped. Shape ``(..., S, C) -> (...)``."""
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=-1)
    per_seed = np.where(cnt > 0, np.where(ok, x, 0.0).sum(axis=-1) / np.maximum(cnt, 1), np.nan)
    has = ~np.isnan(per_seed)
    n = has.sum(axis=-1)
    return np.where(n > 0, np.where(has, per_seed, 0.0).sum(axis=-1) / np.maximum(n, 1), np.nan)


def two_way_replicates(values: Any, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> np.ndarray:
    """The ``n_boot`` resampled means of :func:`two_way_bootstrap` (NaN: a resample without a value).

    Args:
        values: ``(S, C)`` seed x case table (NaN skipped).
        n_boot: resamples; seed: seed of the generator.

    Returns:
        ``(n_boot,)`` float64: per resample, S seeds and C cases drawn with replacement
        (independently; the same cases for every drawn seed) and :func:`_table_means` of the table.
    """
    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    s, c = x.shape
    means = np.empty(n_boot)
    per_block = max(1, _BLOCK // (s * c))
    for start in range(0, n_boot, per_block):
        b = min(n_boot, start + per_block) - start
        i_s = rng.integers(0, s, size=(b, s))
        i_c = rng.integers(0, c, size=(b, c))
        means[start:start + b] = _table_means(x[i_s[:, :, None], i_c[:, None, :]])
    return means


def two_way_bootstrap(values: Any, *, n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                      seed: int = 0) -> Estimate:
    """Mean of a seed x case table and its pigeonhole-bootstrap interval (Owen 2007; module docstring).

    Args:
        values: ``(S, C)`` per-case values, one row per training seed, one column per test case
            (the same cases for every seed); NaN entries (a failed or missing case) are skipped.
        n_boot: resamples (each draws S seeds and, independently, C cases with replacement).
        level: coverage in (0, 1).
        seed: seed of the resampling generator.

    Returns:
        ``(mean, lo, hi)`` as an :class:`~volattack.metrics.statistics.Estimate`: the mean over
        seeds of the per-seed means over cases, the percentile interval, ``.n`` the finite
        (seed, case) cells. The interval is NaN (``.reason`` says why) with fewer than 2 finite
        cells, infinite values, or a table of one seed and one case.

    Raises:
        ValueError: ``values`` not two-dimensional, ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}.")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"values must be a (seeds, cases) table, got shape {x.shape}.")
    n = int((~np.isnan(x)).sum())
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "no case has a value")
    value = float(_table_means(x))
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, "one value: no interval")
    if np.isinf(x).any():
        return Estimate(value, math.nan, math.nan, n, "infinite values: no interval")
    means = two_way_replicates(x, n_boot=n_boot, seed=seed)
    means = means[~np.isnan(means)]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return Estimate(value, float(lo), float(hi), n)


def _records(res: Mapping[str, Any]) -> dict[str, CaseRecord]:
    return {str(c["case"]): CaseRecord.from_dict(c) for c in res.get("cases") or []}


def _row_scores(rec: CaseRecord, label: str) -> Any:
    return rec.clean if label == "clean" else rec.attacks.get(label)


def seed_case_table(results_by_seed: Mapping[int, Mapping[str, Any]], label: str,
                    key: str = "adv_dice") -> tuple[np.ndarray, list[int], list[str]]:
    """Per-case values of column ``key`` in row ``label`` of one variant, as a seed x case table.

    Args:
        results_by_seed: seed -> that seed's evaluation results of the variant (``cases``).
        label: ``clean`` or a row label.
        key: a column key (``adv_dice``: the row's Dice; the clean row's is the clean Dice).

    Returns:
        ``(table (S, C), seeds, cases)``: cases in the order first seen; NaN where a seed lacks
        the case, the row or the value.
    """
    recs = {s: _records(r) for s, r in results_by_seed.items()}
    seeds = list(recs)
    cases = list(dict.fromkeys(c for r in recs.values() for c in r))
    x = np.full((len(seeds), len(cases)), np.nan)
    for i, s in enumerate(seeds):
        for j, c in enumerate(cases):
            scores = _row_scores(recs[s][c], label) if c in recs[s] else None
            v = scores.get(key) if scores is not None else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                x[i, j] = float(v)
    return x, seeds, cases


def _column_samples(col: schema.Column, recs: Sequence[CaseRecord], label: str) -> list[Any]:
    """Per-case samples whose mean is ``col``'s row value (as the single-run summary bootstraps)."""
    pairs = [(_row_scores(r, label), r.clean) for r in recs]
    pairs = [(s, c) for s, c in pairs if s is not None]
    agg = schema.Aggregate(scores=[s for s, _ in pairs], clean=[c for _, c in pairs])
    return list(col.samples(agg) if col.samples is not None else agg.values(col.key))


def _mean(values: Sequence[Any]) -> Optional[float]:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    nums = [v for v in nums if not math.isnan(v)]
    return sum(nums) / len(nums) if nums else None


def _aggregate_values(per_seed: Mapping[int, Mapping[str, Any]], rows: Mapping[int, Mapping[str, Any]],
                      label: str) -> dict[str, Any]:
    """Column key -> mean over seeds of the seeds' row values, each mean column with its
    two-way interval (``<key>_ci``) and the (seed, case) cells behind it (``<key>_n``)."""
    recs = {s: list(_records(r).values()) for s, r in per_seed.items()}
    out: dict[str, Any] = {}
    for col in schema.scalar_columns():
        vals = [rows[s].get(col.key) for s in rows]
        if not any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            continue
        out[col.key] = _mean(vals)
        if not col.has_interval:
            continue
        cases = list(dict.fromkeys(str(r.case) for rs in recs.values() for r in rs))
        table = np.full((len(recs), len(cases)), np.nan)
        for i, rs in enumerate(recs.values()):
            kept = [r for r in rs if _row_scores(r, label) is not None]
            samples = _column_samples(col, kept, label)
            if len(samples) != len(kept):  # not one sample per case: no interval from this seed
                continue
            for r, v in zip(kept, samples):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    table[i, cases.index(str(r.case))] = float(v)
        est = two_way_bootstrap(table)
        out[col.key + schema.CI_SUFFIX], out[col.key + schema.N_SUFFIX] = [est.lo, est.hi], est.n
    return out


def _labels(results: Mapping[str, Any]) -> list[str]:
    return ["clean", *Summary.from_dict(results["summary"]).attacks]


def aggregate_rows(results_by_seed: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> list[ComparisonRow]:
    """One :class:`~volattack.evaluation.comparison.ComparisonRow` per variant x row label: the
    mean over seeds of every scalar column, intervals from :func:`two_way_bootstrap`.

    Args:
        results_by_seed: seed -> variant name -> that run's evaluation results; a variant or a
            row missing from some seed is averaged over the seeds that have it.

    Returns:
        The rows in the order of the first seed's variants and rows (``clean`` first).
    """
    variants = list(dict.fromkeys(v for per in results_by_seed.values() for v in per))
    out: list[ComparisonRow] = []
    for v in variants:
        per_seed = {s: per[v] for s, per in results_by_seed.items() if v in per}
        first = next(iter(per_seed.values()))
        ctx = format_context(dict(first))
        for label in _labels(first):
            rows = {}
            for s, res in per_seed.items():
                summ = Summary.from_dict(res["summary"])
                row = summ.clean if label == "clean" else summ.attacks.get(label)
                if row is not None:
                    rows[s] = row.values
            out.append(ComparisonRow(v, label, _aggregate_values(per_seed, rows, label), units_of(dict(first)),
                                     ctx.bounds))
    return out


def seed_differences(results_by_seed: Mapping[int, Mapping[str, Mapping[str, Any]]],
                     key: str = "adv_dice") -> list[dict[str, Any]]:
    """For every row label (``clean`` first) and every two variants ``a`` before ``b``: the mean
    over the (seed, case) cells both have of ``Dice_b - Dice_a``, with its two-way interval.

    Returns:
        ``{"attack", "a", "b", "diff", "lo", "hi", "n", "seeds", "significant"}`` per row x pair,
        the keys of :func:`volattack.evaluation.comparison.paired_differences` plus ``seeds``.
    """
    variants = list(dict.fromkeys(v for per in results_by_seed.values() for v in per))
    first = next((per[variants[0]] for per in results_by_seed.values() if variants and variants[0] in per), None)
    if first is None:
        return []
    out = []
    for label in _labels(first):
        tables = {}
        for v in variants:
            per = {s: r[v] for s, r in results_by_seed.items() if v in r}
            tables[v] = seed_case_table(per, label, key)
        for i, a in enumerate(variants):
            for b in variants[i + 1:]:
                xa, sa, ca = tables[a]
                xb, sb, cb = tables[b]
                seeds = [s for s in sa if s in sb]
                cases = [c for c in ca if c in cb]
                if not seeds or not cases:
                    continue
                d = (xb[np.ix_([sb.index(s) for s in seeds], [cb.index(c) for c in cases])]
                     - xa[np.ix_([sa.index(s) for s in seeds], [ca.index(c) for c in cases])])
                est = two_way_bootstrap(d)
                out.append({"attack": label, "a": a, "b": b, "diff": est.value, "lo": est.lo, "hi": est.hi,
                            "n": est.n, "seeds": len(seeds), "significant": est.excludes_zero()})
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _runs_table(plan: Any, results_by_seed: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The trained models: one line per variant x seed (adversary, validation Dice, times)."""
    from volattack.study import _adversary_text, _eval_seconds, _train_info

    lines = ["| Variant | Seed | Adversary | Epochs | Best val Dice | Train time s | Eval time s | Report |",
             "|---|---|---|---|---|---|---|---|"]
    for s, per in results_by_seed.items():
        for name, res in per.items():
            cfg = plan.variants[name]
            d = _train_info(seed_dir(plan.out_dir, s) / name)
            rel = f"seed_{s}/{name}/report.md"
            lines.append(f"| {name} | {s} | {_adversary_text(cfg)} | {cfg.train.epochs if cfg.train else '–'} | "
                         f"{_fmt(d['best_val_dice'])} | {_fmt(d['train_seconds'], 0)} | "
                         f"{_fmt(_eval_seconds(res), 0)} | [{rel}]({rel}) |")
    return lines


def _markdown(plan: Any, rows: Sequence[ComparisonRow], diffs: Sequence[Mapping[str, Any]],
              results_by_seed: Mapping[int, Mapping[str, Any]]) -> str:
    """``comparison.md`` of a seeded study: runs, Dice pivot, differences, attacks, full table."""
    first = next(iter(next(iter(results_by_seed.values())).values()))
    units = rows[0].units if rows else schema.DEFAULT_UNITS
    lines = [
        "# volattack robustness study over training seeds", "",
        f"- study folder: {plan.out_dir}; runs finished: {sum(len(p) for p in results_by_seed.values())}/"
        f"{len(plan.seeds) * len(plan.variants)} (seeds {', '.join(str(s) for s in results_by_seed)} of "
        f"{len(plan.seeds)}; variants {', '.join(plan.variants)})",
        f"- {first['summary']['n_cases']} test cases per model, the same for every seed and variant; threat "
        f"model `{first['threat_model']}`; model {plan.base.model.name} {plan.base.model.kwargs or ''}".rstrip(),
        "- every value: the mean over seeds of the per-seed mean over cases; every interval: 95% pigeonhole "
        "bootstrap over seeds x cases (seeds and cases resampled independently, 2000 resamples; "
        "`volattack.study_seeds.two_way_bootstrap`); with 3 seeds its seed part is coarse.", "",
        "## Trained models", "", *_runs_table(plan, results_by_seed), "",
        "## Dice under attack (mean foreground Dice over seeds x cases)", "", dice_table(rows), "",
        "![comparison](comparison.png)", "",
    ]
    if diffs:
        lines += ["## Differences between variants (paired over the same seeds and cases)", "",
                  "Each cell: mean over (seed, case) of Dice(b) − Dice(a), with its 95% pigeonhole bootstrap "
                  "interval over seeds x cases; `(n.s.)`: the interval contains 0, so these seeds and cases do not "
                  "separate the two variants.", "", differences_table(diffs), ""]
    lines += ["## Attacks", "", attacks_table(first), "", "## Full table", "", full_table(rows), "",
              *schema.definitions(units, table="study"), "",
              "Per-seed comparisons (intervals over that seed's cases only): "
              + ", ".join(f"[seed {s}](seed_{s}/comparison.md)" for s in results_by_seed), ""]
    return "\n".join(lines)


def write_seed_comparison(plan: Any, results_by_seed: Mapping[int, Mapping[str, Mapping[str, Any]]],
                          seconds: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """Write the aggregated ``comparison.{csv,md,png}`` and ``study.json`` into ``plan.out_dir``.

    Args:
        plan: the study (:class:`volattack.study.StudyPlan` with ``seeds``).
        results_by_seed: finished seeds so far: seed -> variant name -> evaluation results.
        seconds: wall-clock seconds per ``"seed_<k>/<variant>"`` in this process.

    Returns:
        The summary written to ``study.json``: ``rows`` (:func:`aggregate_rows`), ``differences``
        (:func:`seed_differences`), ``seeds``, ``runs`` (run folder per seed and variant), ``files``.
    """
    out = Path(plan.out_dir)
    rows = aggregate_rows(results_by_seed)
    diffs = seed_differences(results_by_seed)
    files = {k: str(out / f"comparison.{k}") for k in ("csv", "md", "png")}
    atomic_write_text(files["csv"], comparison_csv(rows))
    atomic_write_text(files["md"], _markdown(plan, rows, diffs, results_by_seed))
    comparison_figure(rows, files["png"])
    runs = {f"seed_{s}/{v}": str(seed_dir(out, s) / v) for s, per in results_by_seed.items() for v in per}
    summary = {"out_dir": str(out), "seeds": list(plan.seeds), "finished_seeds": list(results_by_seed),
               "planned": list(plan.variants), "runs": runs, "seconds": dict(seconds or {}),
               "adversaries": {n: to_dict(c.train.adversary) if c.train else None for n, c in plan.variants.items()},
               "rows": [r.to_dict() for r in rows], "differences": diffs, "files": files}
    atomic_write_json(out / "study.json", summary)
    return summary


def run_seeded_study(plan: Any, *, trust_bundle: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run ``plan`` once per seed of ``plan.seeds`` (module docstring), then the aggregated comparison.

    Every seed's study is validated before any training starts; each seed runs
    :func:`volattack.study.run_study` into ``<out>/seed_<k>`` (resumable: finished training
    runs and cases are reused), and the aggregated comparison is rewritten after each seed.

    Returns:
        The summary of :func:`write_seed_comparison` plus ``"results_by_seed"`` (seed -> variant ->
        results) and ``"results"`` (variant -> :func:`aggregated_results`, what the command line prints).
    """
    from volattack.study import VARIANTS_KEY, load_study, run_study

    base = {k: v for k, v in plan.raw.items() if k != SEEDS_KEY}
    configs = {s: {**base, "seed": s} for s in plan.seeds}
    for s, raw in configs.items():  # validate every seed's study first
        load_study(raw, seed_dir(plan.out_dir, s))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.out_dir / "study.yaml", dump_yaml(plan.raw))
    logger.info("seeded study in %s: seeds %s, %s %s", plan.out_dir, plan.seeds, VARIANTS_KEY, ", ".join(plan.variants))
    results: dict[int, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    summary: dict[str, Any] = {}
    for s, raw in configs.items():
        t0 = time.perf_counter()
        out = run_study(raw, seed_dir(plan.out_dir, s), trust_bundle=trust_bundle, progress=progress)
        results[s] = out["results"]
        seconds[f"seed_{s}"] = round(time.perf_counter() - t0, 1)
        logger.info("seed %d finished in %.0f s", s, seconds[f"seed_{s}"])
        summary = write_seed_comparison(plan, results, seconds)
    return {**summary, "results": aggregated_results(results), "results_by_seed": results}


def aggregated_results(results_by_seed: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Variant -> a results-shaped dict whose ``summary`` rows are :func:`aggregate_rows` (means
    over seeds, two-way intervals) and whose context (units, bounds, attacks) is the first seed's,
    so single-run readers of results (``comparison_rows``, the command line's Dice pivot) show
    the aggregated numbers. ``cases`` is empty: the per-case records stay in the seeds' runs."""
    firsts = {}
    for per in results_by_seed.values():
        for v, res in per.items():
            firsts.setdefault(v, res)
    out: dict[str, dict[str, Any]] = {}
    for row in aggregate_rows(results_by_seed):
        first = firsts[row.variant]
        entry = out.setdefault(row.variant, {
            **{k: first[k] for k in ("intensity_units", "bounds", "intensity", "threat_model", "attacks") if k in first},
            "summary": {"n_cases": first["summary"]["n_cases"], "clean": {}, "attacks": {}}, "cases": []})
        if row.attack == "clean":
            entry["summary"]["clean"] = row.values
        else:
            entry["summary"]["attacks"][row.attack] = row.values
    return out


def load_seed_results(plan: Any) -> dict[int, dict[str, Any]]:
    """The finished runs of a seeded study read from ``<out>/seed_<k>/<variant>/results.json``
    (nothing is run): seed -> variant -> results, only the seeds and variants that have one."""
    out: dict[int, dict[str, Any]] = {}
    for s in plan.seeds:
        per = {}
        for v in plan.variants:
            path = seed_dir(plan.out_dir, s) / v / "results.json"
            if path.is_file():
                per[v] = json.loads(path.read_text())
        if per:
            out[s] = per
    return out
