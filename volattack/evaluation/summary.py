"""Dataset-level summary of per-case records: one :class:`~volattack.evaluation.records.Row` per
attack configuration and for the clean predictions, every value from the schema's aggregation
(:data:`volattack.evaluation.columns.COLUMNS`), each mean with its 95% percentile-bootstrap
interval over cases (:func:`volattack.metrics.statistics.bootstrap_ci`; ``<key>_ci`` = [lo, hi]
and ``<key>_n`` = the cases behind it), and the Dice drops stratified by organ size
(:func:`organ_size_strata`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

from volattack.evaluation import columns as schema
from volattack.evaluation.records import ROW_LABELS, CaseRecord, Row, Scores, Summary


#: organ-size bins of :func:`organ_size_strata`: a class of a case is small below the first
#: ground-truth volume (mL), large from the second on, medium in between
SIZE_BINS_ML = (10.0, 100.0)
SIZE_NAMES = ("small", "medium", "large")


def _per_class_mean(values: Sequence[Any]) -> list[Any]:
    lists = [v for v in values if isinstance(v, (list, tuple))]
    k = max((len(v) for v in lists), default=0)
    return [schema.nanmean([v[j] for v in lists if j < len(v)]) for j in range(k)]


def _numbers(values: Sequence[Any]) -> list[float]:
    return [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan for v in values]


def _interval(values: Sequence[Any]) -> tuple[list[float], int]:
    """``([lo, hi], n)`` of the mean of ``values`` (NaN skipped)."""
    from volattack.metrics.statistics import bootstrap_ci

    est = bootstrap_ci(_numbers(values))
    return [est.lo, est.hi], est.n


def _per_class_intervals(values: Sequence[Any]) -> tuple[list[list[float]], list[int]]:
    lists = [v for v in values if isinstance(v, (list, tuple))]
    k = max((len(v) for v in lists), default=0)
    out = [_interval([v[j] if j < len(v) else None for v in lists]) for j in range(k)]
    return [ci for ci, _ in out], [n for _, n in out]


def _add_interval(out: dict[str, Any], col: schema.Column, agg: schema.Aggregate) -> None:
    """``<key>_ci`` and ``<key>_n`` of ``col`` in ``out`` (mean columns and those with ``samples``)."""
    if col.per_class:
        if col.aggregate is None:
            out[col.key + schema.CI_SUFFIX], out[col.key + schema.N_SUFFIX] = _per_class_intervals(agg.values(col.key))
        return
    if not col.has_interval:
        return
    samples = col.samples(agg) if col.samples is not None else agg.values(col.key)
    if not any(isinstance(v, (int, float)) for v in samples):
        return  # the column is missing (e.g. no unit scale): no interval either
    out[col.key + schema.CI_SUFFIX], out[col.key + schema.N_SUFFIX] = _interval(samples)


def aggregate_row(scores: Sequence[Scores], clean: Sequence[Scores], threshold: float, *,
                  clean_row: bool = False) -> dict[str, Any]:
    """Column key -> row value over ``scores`` (the clean row keeps only the columns with ``clean``),
    with ``<key>_ci`` ([lo, hi], 95% bootstrap over cases) and ``<key>_n`` for every mean column.

    Args:
        scores: per-case scores of the row.
        clean: the clean scores of the same cases (same order).
        threshold: fooling-rate threshold.
        clean_row: the row of clean predictions.
    """
    agg = schema.Aggregate(scores=scores, clean=clean, fooling_threshold=threshold)
    out: dict[str, Any] = {}
    for col in schema.COLUMNS:
        if clean_row and not col.clean:
            continue
        if col.aggregate is not None:
            out[col.key] = col.aggregate(agg)
        elif col.per_class:
            out[col.key] = _per_class_mean(agg.values(col.key))
        else:
            out[col.key] = schema.nanmean(agg.values(col.key))
        _add_interval(out, col, agg)
    return out


def _info_means(scores: Sequence[Scores]) -> dict[str, Any]:
    keys = list(dict.fromkeys(k for s in scores for k in s.info))
    out = {}
    for k in keys:
        m = schema.nanmean([s.info.get(k) for s in scores])
        if m is not None:
            out[k] = m
    return out


def summarize(cases: Sequence[Union[CaseRecord, Mapping[str, Any]]], labels: Sequence[str],
              threshold: float) -> Summary:
    """The summary of ``cases``: the clean row, one row per attack label (in the order of
    ``labels``), and the undefended clean row when the cases have one.

    Every mean skips NaN values (e.g. HD95 of a class absent from both maps).

    Args:
        cases: per-case records (or their ``to_dict`` form).
        labels: attack labels, in table order.
        threshold: fooling-rate threshold (``evaluate.fooling_threshold``).
    """
    recs = [c if isinstance(c, CaseRecord) else CaseRecord.from_dict(c) for c in cases]
    clean = [c.clean for c in recs]
    summary = Summary(
        n_cases=len(recs),
        clean=Row(label=ROW_LABELS["clean"], kind="clean", values=aggregate_row(clean, clean, threshold, clean_row=True)),
    )
    if recs:
        for lbl in labels:
            rows = [c.attacks[lbl] for c in recs]
            summary.attacks[lbl] = Row(label=lbl, kind="attack", values=aggregate_row(rows, clean, threshold),
                                       info=_info_means(rows))
    bare = [c.clean_undefended for c in recs if c.clean_undefended is not None]
    if bare:
        summary.clean_undefended = Row(label=ROW_LABELS["clean_undefended"], kind="clean_undefended",
                                       values=aggregate_row(bare, bare, threshold, clean_row=True))
    return summary


def size_bin(volume_ml: float) -> Optional[str]:
    """The organ-size bin of a ground-truth volume in mL (``None`` for an absent class, 0 mL)."""
    if not isinstance(volume_ml, (int, float)) or math.isnan(volume_ml) or volume_ml <= 0:
        return None
    return SIZE_NAMES[sum(volume_ml >= t for t in SIZE_BINS_ML)]


def organ_size_strata(cases: Sequence[Union[CaseRecord, Mapping[str, Any]]],
                      labels: Sequence[str]) -> list[dict[str, Any]]:
    """Dice drops stratified by organ size: one entry per attack label x size bin.

    Every (case, foreground class) pair whose class is present in the ground truth is put in the
    bin of its ground-truth volume (``gt_volume_ml_per_class`` of the clean scores; bins
    :data:`SIZE_BINS_ML`, in mL). Size bias (Halmosi et al., ECCV 2024: small objects fall more
    easily) shows as larger drops in the small bin.

    Returns:
        ``{"attack", "size", "n" (pairs), "clean_dice", "adv_dice", "drop", "drop_ci" [lo, hi]}``
        per label and non-empty bin; intervals bootstrap the pairs (cases x classes), so classes
        of one case count as separate draws.
    """
    from volattack.metrics.statistics import bootstrap_ci

    recs = [c if isinstance(c, CaseRecord) else CaseRecord.from_dict(c) for c in cases]
    out: list[dict[str, Any]] = []
    for lbl in labels:
        pairs: dict[str, list[tuple[float, float]]] = {n: [] for n in SIZE_NAMES}
        for rec in recs:
            vols = rec.clean.get("gt_volume_ml_per_class") or []
            clean = rec.clean.get("dice_per_class") or []
            adv = (rec.attacks.get(lbl).get("dice_per_class") if lbl in rec.attacks else None) or []
            for v, c, a in zip(vols, clean, adv):
                b = size_bin(v)
                if b is not None and isinstance(c, (int, float)) and isinstance(a, (int, float)):
                    pairs[b].append((float(c), float(a)))
        for name in SIZE_NAMES:
            if not pairs[name]:
                continue
            c, a = zip(*pairs[name])
            drop = bootstrap_ci([x - y for x, y in pairs[name]])
            out.append({"attack": lbl, "size": name, "n": drop.n, "clean_dice": schema.nanmean(list(c)),
                        "adv_dice": schema.nanmean(list(a)), "drop": drop.value, "drop_ci": [drop.lo, drop.hi]})
    return out
