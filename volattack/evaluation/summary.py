"""Dataset-level summary of per-case records: one :class:`~volattack.evaluation.records.Row` per
attack configuration and for the clean predictions, every value from the schema's aggregation
(:data:`volattack.evaluation.columns.COLUMNS`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

from volattack.evaluation import columns as schema
from volattack.evaluation.records import ROW_LABELS, CaseRecord, Row, Scores, Summary


def _per_class_mean(values: Sequence[Any]) -> list[Any]:
    lists = [v for v in values if isinstance(v, (list, tuple))]
    k = max((len(v) for v in lists), default=0)
    return [schema.nanmean([v[j] for v in lists if j < len(v)]) for j in range(k)]


def aggregate_row(scores: Sequence[Scores], clean: Sequence[Scores], threshold: float, *,
                  clean_row: bool = False) -> dict[str, Any]:
    """Column key -> row value over ``scores`` (the clean row keeps only the columns with ``clean``).

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
