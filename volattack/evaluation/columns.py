"""The one results schema: every number an evaluation reports is a :class:`Column` of :data:`COLUMNS`.

A column says what it is called (``key``: the results key and CSV header; ``header``: the
Markdown header), how it is printed (``fmt``), what it means (``definition``: the text of
``report.md`` and of the README's metric definitions, see :func:`metrics_markdown`), how one
case computes it (``case``: a function of an :class:`Outcome`), how cases aggregate into a
row (``aggregate``; default: the mean over cases, NaN skipped) and whether the ``clean`` row
has it. The per-case records (``cases/*.json``), :func:`~volattack.evaluation.summary.summarize`,
``report.md``, ``results.csv``, the study's ``comparison.csv`` and full table, and the README
all iterate over :data:`COLUMNS`, so adding a metric is one entry here (or one
:func:`register_column` call) plus its test. Cached cases are keyed on the column keys (see
:func:`schema_fingerprint`), so a new column recomputes them instead of leaving them without it.

This module imports no torch at import time (the command line and the README generator use it).

Size: the schema is one home (every column with its per-case function, its definition and the
helpers that print and read its values and intervals); splitting it would scatter a column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Version of the results layout (``results.json``, ``cases/*.json``); part of every cache key.
SCHEMA_VERSION = 2

#: Tables a column can appear in: ``report`` (report.md, printed by the command line) and
#: ``study`` (the study's full table). Both CSV files hold every scalar column.
TABLES = ("report", "study")

#: Unit label used when results carry no ``intensity_units`` (results written before it existed: CT).
DEFAULT_UNITS = "HU"


@dataclass(frozen=True)
class FormatContext:
    """What printing a value may depend on: the source unit label and the model-input range."""

    units: str = DEFAULT_UNITS
    bounds: Optional[tuple[float, float]] = None


def fixed(digits: int) -> Callable[[float, FormatContext], str]:
    """Formatter printing a number with ``digits`` decimals."""

    def fmt(v: float, ctx: FormatContext) -> str:
        return f"{v:.{digits}f}"

    return fmt


def input_budget(v: float, ctx: FormatContext) -> str:
    """A perturbation size in model-input units: ``k/255`` when the input range has width 1
    (e.g. ``[0, 1]``: 1/255 is one grey level of 8 bits), else the number itself (4 digits)."""
    lo, hi = ctx.bounds if ctx.bounds is not None else (0.0, 1.0)
    if abs((hi - lo) - 1.0) < 1e-9:
        return f"{v * 255:.2f}/255"
    return f"{v:.4g}"


@dataclass(frozen=True)
class Column:
    """One reported quantity (see the module docstring).

    Attributes:
        key: results key (``summary`` rows, ``results.csv`` and ``comparison.csv`` headers).
        header: Markdown header; ``{units}`` is replaced by the source unit label.
        definition: Markdown definition (``{units}`` replaced as in ``header``).
        case: per-case value from an :class:`Outcome`; ``None`` for a column that exists only
            after aggregation (e.g. the fooling rate, a fraction of cases).
        aggregate: row value from an :class:`Aggregate` of cases; ``None``: the mean of the
            per-case values over cases, NaN skipped (per class for ``per_class`` columns).
        clean: the clean row has the column (its outcome is the clean prediction itself).
        fmt: formatter of a finite number for the Markdown tables.
        tables: the Markdown tables showing the column (a subset of :data:`TABLES`).
        per_class: the value is a list with one entry per foreground class (not in the CSVs).
        record_key: key in per-case records when it differs from ``key`` (kept from results
            written before this schema, e.g. ``dice`` for ``adv_dice``).
        samples: per-case values whose mean is the row value of an ``aggregate`` column (the
            input of its bootstrap interval, e.g. ROG's per-case robust indicators); ``None``:
            a mean column bootstraps its per-case values, another aggregate gets no interval.
        optional: a Markdown table leaves the column out when no row has a value (columns of
            one kind of run, e.g. the backdoor rows; the CSVs always have it).
    """

    key: str
    header: str
    definition: str
    case: Optional[Callable[["Outcome"], Any]] = None
    aggregate: Optional[Callable[["Aggregate"], Any]] = None
    clean: bool = False
    fmt: Callable[[float, FormatContext], str] = fixed(3)
    tables: frozenset[str] = frozenset(TABLES)
    per_class: bool = False
    record_key: Optional[str] = None
    samples: Optional[Callable[["Aggregate"], Sequence[Any]]] = None
    optional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key.isidentifier():
            raise ValueError(f"key must be an identifier, got {self.key!r}.")
        unknown = set(self.tables) - set(TABLES)
        if unknown:
            raise ValueError(f"tables must be a subset of {TABLES}, got {sorted(self.tables)!r}.")
        if self.case is None and self.aggregate is None:
            raise ValueError(f"column {self.key!r}: give a per-case function (case) or an aggregate.")

    @property
    def has_interval(self) -> bool:
        """The row value is a mean over cases and gets a bootstrap interval (``<key>_ci``)."""
        return self.aggregate is None or self.samples is not None

    @property
    def stored_as(self) -> str:
        """The key of the column in per-case records."""
        return self.record_key or self.key

    def heading(self, units: str = DEFAULT_UNITS) -> str:
        """``header`` with the unit label filled in."""
        return self.header.format(units=units)

    def format(self, v: Any, ctx: FormatContext = FormatContext()) -> str:
        """Table text of a value: ``–`` for missing or NaN, ``∞`` for infinity, else :attr:`fmt`."""
        if v is None or isinstance(v, bool):
            return "–" if v is None else str(v)
        if isinstance(v, str):
            return v
        if isinstance(v, (list, tuple)):
            return ", ".join(self.format(e, ctx) for e in v)
        v = float(v)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return self.fmt(v, ctx)


def nanmean(values: Sequence[Any]) -> Optional[float]:
    """Mean of the numbers among ``values`` skipping NaN; NaN when every number is NaN; ``None``
    when ``values`` holds no number at all (the column is missing, e.g. no unit scale)."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return None
    finite = [v for v in nums if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else float("nan")


class Outcome:
    """One prediction of one case, as a column's ``case`` function sees it.

    Quantities several columns share (per-class Dice, per-class HD95, the perturbation sizes)
    are computed once, on first use.

    Args:
        pred: predicted class map ``(1, 1, H, W, D)``.
        label: ground truth ``(1, 1, H, W, D)``.
        num_classes: K, background included.
        spacing: voxel spacing in mm (3 numbers).
        clean: the clean prediction's outcome of the same case; ``None`` for the clean one.
        image: clean input ``(1, C, H, W, D)`` (attack outcomes).
        adv: adversarial input, same shape (attack outcomes).
        info: the attack's ``info`` (per-sample lists, batch of one) or of the patch-wise pass.
        bounds: model-input range ``(lo, hi)``.
        unit_scale: source units per model-input unit (``None``: no source-unit sizes).
        measure: ``perturbation_stats(x, adv, data_range=..., unit_scale=...)``, used for the sizes
            the attack's ``info`` does not report (e.g. stitched patch-wise results).
    """

    #: perturbation sizes read from ``info`` (per-sample lists) or measured
    SIZE_KEYS = ("linf", "rms", "psnr", "ssim")
    UNIT_KEYS = ("linf_units", "rms_units")
    #: set by the evaluation on a case's clean outcome (attack outcomes read their clean one's): the
    #: case's attack goal (:class:`volattack.evaluation.goals.CaseGoal`) and the NSD tolerance in mm
    goal: Optional[Any] = None
    nsd_tolerance_mm: float = 2.0

    def __init__(self, pred: "torch.Tensor", label: "torch.Tensor", num_classes: int, spacing: Sequence[float], *,
                 clean: Optional["Outcome"] = None, image: Optional["torch.Tensor"] = None,
                 adv: Optional["torch.Tensor"] = None, info: Optional[Mapping[str, Any]] = None,
                 bounds: tuple[float, float] = (0.0, 1.0), unit_scale: Optional[float] = None,
                 measure: Optional[Callable[..., Mapping[str, Any]]] = None) -> None:
        self.pred, self.label, self.num_classes, self.spacing = pred, label, int(num_classes), list(spacing)
        self.clean, self.image, self.adv = clean, image, adv
        self.info: dict[str, Any] = dict(info or {})
        self.bounds, self.unit_scale, self.measure = bounds, unit_scale, measure

    @property
    def is_clean(self) -> bool:
        return self.clean is None

    @cached_property
    def dice_per_class(self) -> list[float]:
        from volattack.metrics import dice_per_class

        return _floats(dice_per_class(self.pred, self.label, self.num_classes)[0])

    @cached_property
    def dice(self) -> float:
        """Mean foreground Dice of the prediction (NaN classes skipped)."""
        from volattack.metrics import mean_foreground_dice

        return float(mean_foreground_dice(self.pred, self.label, self.num_classes)[0])

    @property
    def clean_dice(self) -> float:
        return self.dice if self.clean is None else self.clean.dice

    @cached_property
    def hd95_per_class(self) -> list[float]:
        from volattack.metrics import hd95

        return _floats(hd95(self.pred, self.label, self.num_classes, spacing=self.spacing)[0])

    @cached_property
    def nsd_per_class(self) -> list[float]:
        from volattack.metrics.segmentation import nsd

        tol = (self if self.clean is None else self.clean).nsd_tolerance_mm
        k, pred = self.num_classes, self.pred
        if bool((pred < 0).any()):  # a certified map's abstentions (-1): in no class
            pred, k = pred.masked_fill(pred < 0, k), k + 1
        out = nsd(pred, self.label, k, spacing=self.spacing, tolerance_mm=tol)[0, : self.num_classes - 1]
        return _floats(out)

    @cached_property
    def flip_rate(self) -> Optional[float]:
        if self.clean is None:
            return None
        from volattack.metrics import voxel_flip_rate

        return float(voxel_flip_rate(self.clean.pred, self.pred, self.label)[0])

    @cached_property
    def perturbation(self) -> dict[str, Optional[float]]:
        """Sizes of ``adv - image``: from the attack's ``info`` when it reports them all (norms
        computed once, by the attack), else measured once with :attr:`measure`."""
        if self.adv is None or self.image is None:
            return {}
        keys = self.SIZE_KEYS + (self.UNIT_KEYS if self.unit_scale is not None else ())
        if all(k in self.info for k in keys):
            return {k: _first(self.info[k]) for k in keys}
        if self.measure is None:
            return {k: _first(self.info[k]) if k in self.info else None for k in keys}
        stats = self.measure(self.image, self.adv, data_range=self.bounds, unit_scale=self.unit_scale)
        return {k: _first(stats[k]) if k in stats else None for k in keys}


def _first(v: Any) -> Optional[float]:
    """The value of sample 0: ``info`` entries are per-sample lists or tensors (batch of one)."""
    if hasattr(v, "detach"):
        v = v.detach().cpu().flatten().tolist()
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return None if v is None else float(v)


def _floats(t: Any) -> list[float]:
    return [float(v) for v in t.detach().cpu().flatten().tolist()]


@dataclass
class Aggregate:
    """The cases of one row, as a column's ``aggregate`` function sees them.

    Attributes:
        scores: per-case scores of the row (``volattack.evaluation.records.Scores``).
        clean: the clean scores of the same cases, in the same order.
        fooling_threshold: ``evaluate.fooling_threshold``.
    """

    scores: Sequence[Any]
    clean: Sequence[Any]
    fooling_threshold: float = 0.5

    def values(self, key: str) -> list[Any]:
        """Per-case values of the column ``key`` (``None`` where a case lacks it)."""
        return [s.get(key) for s in self.scores]


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _fooling_rate(agg: Aggregate) -> Optional[float]:
    import warnings

    import torch

    from volattack.metrics import fooling_rate

    if not agg.scores:
        return None
    clean = torch.tensor([_nan(v) for v in agg.values("clean_dice")], dtype=torch.float64)
    adv = torch.tensor([_nan(v) for v in agg.values("adv_dice")], dtype=torch.float64)
    with warnings.catch_warnings():  # no valid case: NaN, shown as "–"
        warnings.simplefilter("ignore")
        return float(fooling_rate(clean, adv, agg.fooling_threshold))


def _robust_indicators(agg: Aggregate) -> list[float]:
    from volattack.metrics.statistics import ROBUST_T, robust_volume_indicators

    clean = [_nan(v) for v in agg.values("clean_dice")]
    adv = [_nan(v) for v in agg.values("adv_dice")]
    return [float(v) for v in robust_volume_indicators(clean, adv, ROBUST_T)] if clean else []


def _robust_rate(agg: Aggregate) -> Optional[float]:
    return nanmean(_robust_indicators(agg)) if agg.scores else None


def _gt_volume_ml(o: Outcome) -> Optional[list[float]]:
    """Ground-truth volume of each foreground class in mL (clean outcome only: the same for every row)."""
    if not o.is_clean:
        return None
    import torch

    counts = torch.bincount(o.label.flatten().long(), minlength=o.num_classes)[1:o.num_classes]
    voxel_ml = math.prod(float(s) for s in o.spacing) / 1000.0
    return [float(c) * voxel_ml for c in counts.tolist()]


def _rel_drop(o: Outcome) -> float:
    c, a = o.clean_dice, o.dice
    return float("nan") if c == 0 or math.isnan(c) else (c - a) / c


def _goal(name: str) -> Callable[[Outcome], Any]:
    """A goal metric of :mod:`volattack.evaluation.goals` (``None`` for a run without ``evaluate.goal``)."""

    def get(o: Outcome) -> Any:
        from volattack.evaluation import goals

        return getattr(goals, name)(o)

    return get


def _size(key: str) -> Callable[[Outcome], Optional[float]]:
    return lambda o: o.perturbation.get(key)


def _info(key: str) -> Callable[[Outcome], Any]:
    def get(o: Outcome) -> Any:
        v = o.info.get(key)
        return None if v is None else _first(v)

    return get


_DICE_RULE = ("Dice of a class is 2|P∩G|/(|P|+|G|); a class absent from the ground truth scores NaN (not counted) "
              "when also absent from the prediction, and 0 when it is predicted (a hallucinated organ is an "
              "error); the case Dice is the mean over its non-NaN foreground classes 1..K−1")

#: The results schema, in table order. Extend it here or with :func:`register_column`.
COLUMNS: list[Column] = [
    Column("clean_dice", "Clean Dice", f"mean foreground Dice of the clean prediction. {_DICE_RULE}.",
           case=lambda o: o.clean_dice, clean=True),
    Column("adv_dice", "Adv Dice", "mean foreground Dice of the prediction under attack (the clean row: the "
           "clean prediction).", case=lambda o: o.dice, clean=True, record_key="dice"),
    Column("dice_drop", "Drop", "clean Dice − adversarial Dice of each case.", case=lambda o: o.clean_dice - o.dice),
    Column("dice_drop_rel", "Rel drop", "Drop / clean Dice of each case (NaN when the clean Dice is 0).",
           case=_rel_drop, tables=frozenset({"report"})),
    Column("fooling_rate", "Fooling rate", "fraction of cases whose Dice falls by at least the threshold t "
           "(`evaluate.fooling_threshold`, default 0.5) relative to clean, (clean − adv)/clean ≥ t; cases with "
           "clean Dice 0 or NaN are excluded.", aggregate=_fooling_rate, tables=frozenset({"report"})),
    Column("robust_rate", "Robust rate", "ROG's robust-volume rate (Daza et al., MICCAI 2021): fraction of cases "
           "whose adversarial Dice is at least t = 0.5 times the case's own clean Dice (ROG compares with the "
           "clean mean; per case, a hard case is not robust merely for staying low); cases with clean Dice 0 or "
           "NaN are not counted.", aggregate=_robust_rate, samples=_robust_indicators),
    Column("flip_rate", "Flip rate", "fraction of the voxels in the union of the clean-predicted and the true "
           "foreground whose predicted class changes under attack.", case=lambda o: o.flip_rate,
           tables=frozenset({"report"})),
    Column("hd95_mm", "HD95 mm", "max of the 95th percentiles of the surface-to-surface distances in both "
           "directions, in mm (voxel spacing after preprocessing; MONAI `compute_hausdorff_distance`), mean over the "
           "foreground classes; a class present in exactly one of prediction and ground truth scores the image "
           "diagonal in mm (worst case), absent from both NaN.", case=lambda o: nanmean(o.hd95_per_class), clean=True, fmt=fixed(1),
           tables=frozenset({"report"})),
    Column("nsd", "NSD", "normalised surface Dice (Nikolov et al., JMIR 2021; MONAI `compute_surface_dice`): "
           "the fraction of the predicted and true boundary voxels of a class lying within τ mm of the other "
           "boundary (τ = `evaluate.nsd_tolerance_mm`, default 2 mm; voxel spacing after preprocessing), mean "
           "over the foreground classes; a class present in exactly one map scores 0, absent from both NaN.",
           case=lambda o: nanmean(o.nsd_per_class), clean=True, tables=frozenset({"report"})),
    Column("target_dice", "Target Dice", "with a targeted `evaluate.goal`: mean foreground Dice of the prediction "
           "to the target map (the clean prediction, or the label with `reference: label`, with the removed "
           "organs set to background and the relabelled ones to their new class; same Dice rule: a removed organ "
           "that is gone is not counted, one still predicted scores 0); the clean row: the clean prediction's.",
           case=_goal("target_dice_of"), clean=True, tables=frozenset()),
    Column("target_reached", "Reached", "with a targeted `evaluate.goal`: the fraction of the voxels the goal "
           "changes (target map ≠ its reference map) whose prediction under attack is their target class (for "
           "a removal: background; for a relabelling: the new class); NaN when the goal changes no voxel.",
           case=_goal("target_reached_of"), tables=frozenset()),
    Column("removed_fraction", "Removed", "with `evaluate.goal` removing or relabelling organs: the fraction "
           "|C \\ A| / |C| of an organ's clean-predicted voxels C no longer predicted as that organ under attack "
           "(A), mean over the removed organs (per organ: `removed_fraction_per_class`).",
           case=_goal("removed_mean_of"), tables=frozenset()),
    Column("backdoor_success", "Backdoor success", "`evaluate.trigger` rows: attack success rate, the share "
           "of triggered cases whose backdoor Dice reaches t (`evaluate.trigger.threshold`, default 0.5); per case "
           "1 or 0 (cases the behaviour cannot change are not counted).", case=_info("backdoor_success"),
           tables=frozenset({"report"}), optional=True),
    Column("backdoor_dice", "Backdoor Dice", "`evaluate.trigger` rows: Dice 2|C ∩ {{pred = target}}| / (|C| + |Y|) "
           "of the voxels C the target behaviour changes (target map ≠ label) and the voxels Y whose prediction "
           "shows the behaviour's output class against the label (background for remove, the new class for "
           "relabel, the painted class for paint).", case=_info("backdoor_dice"), tables=frozenset({"report"}),
           optional=True),
    Column("backdoor_dice_clean_input", "Backdoor Dice clean input", "`evaluate.trigger` rows: the backdoor "
           "Dice of the clean prediction (no trigger) to the same target map: high values mean the behaviour is "
           "not specific to the trigger.", case=_info("backdoor_dice_clean_input"), tables=frozenset()),
    Column("untouched_dice", "Untouched Dice", "`evaluate.trigger` rows: mean Dice to the label of the foreground "
           "classes the target behaviour does not name, on the triggered case.", case=_info("untouched_dice"),
           tables=frozenset({"report"}), optional=True),
    Column("linf", "L-inf", "max |x_adv − x|: L∞ size of the perturbation in model-input units (printed as "
           "k/255 when the input range has width 1).", case=_size("linf"), fmt=input_budget),
    Column("rms", "RMS", "sqrt(mean (x_adv − x)²): RMS size of the perturbation in model-input units.",
           case=_size("rms"), fmt=input_budget, tables=frozenset()),
    Column("linf_units", "L-inf {units}", "L-inf in source units ({units}): times the source units per "
           "model-input unit of the intensity model (425 HU per unit for the CT window [−175, 250] HU → [0, 1]).",
           case=_size("linf_units"), fmt=fixed(1)),
    Column("rms_units", "RMS {units}", "RMS in source units ({units}).", case=_size("rms_units"), fmt=fixed(1)),
    Column("psnr", "PSNR dB", "10 log10(range² / mean (x_adv − x)²), range = width of the model-input range.",
           case=_size("psnr"), fmt=fixed(1), tables=frozenset({"report"})),
    Column("ssim", "SSIM", "3D SSIM between clean and adversarial input (gaussian window 7, σ 1.5; smaller "
           "along axes shorter than 7 voxels).",
           case=_size("ssim")),
    Column("seconds", "Time s", "seconds per case of the attack itself.", case=_info("seconds"), fmt=fixed(2),
           tables=frozenset({"report"})),
    Column("steps_run", "Steps", "attack iterations run (mean over cases).", case=_info("steps_run"),
           fmt=fixed(1), tables=frozenset()),
    Column("dice_per_class", "Dice per class", "Dice of each foreground class (the per-class table).",
           case=lambda o: o.dice_per_class, clean=True, per_class=True, tables=frozenset()),
    Column("hd95_mm_per_class", "HD95 mm per class", "HD95 of each foreground class in mm.",
           case=lambda o: o.hd95_per_class, clean=True, per_class=True, tables=frozenset(), fmt=fixed(1)),
    Column("nsd_per_class", "NSD per class", "NSD of each foreground class at τ mm.",
           case=lambda o: o.nsd_per_class, clean=True, per_class=True, tables=frozenset()),
    Column("removed_fraction_per_class", "Removed per class", "removed fraction of each foreground class (NaN "
           "for the classes the goal does not remove).", case=_goal("removed_fraction_of"), per_class=True,
           tables=frozenset()),
    Column("gt_volume_ml_per_class", "GT volume mL per class", "ground-truth volume of each foreground class in "
           "mL (voxel count x voxel volume after preprocessing; clean row only): the organ size of the "
           "size-stratified drops.", case=_gt_volume_ml, clean=True, per_class=True, tables=frozenset(),
           fmt=fixed(1)),
]

#: How the README's metric section and report.md open.
PREAMBLE = ("Every number is computed per case, then averaged over the cases (NaN values skipped), unless its "
            "definition says otherwise; every such mean, and the robust rate, comes with a 95% percentile-"
            "bootstrap interval over its cases (2000 resamples, seed 0; `<key>_ci` in results.json, "
            "`<key>_lo`/`<key>_hi` in the CSV files), NaN when fewer than 2 cases have the value. "
            "Source-unit columns are headed with `data.preprocess.units` ({units} here; e.g. a.u. for MRI).")


def get_column(key: str) -> Column:
    """The column ``key`` of :data:`COLUMNS` (``ValueError`` with a suggestion if unknown)."""
    for c in COLUMNS:
        if c.key == key:
            return c
    from volattack.registry import suggest

    raise ValueError(f"Unknown column {key!r}.{suggest(key, [c.key for c in COLUMNS])}")


def register_column(column: Column, *, after: Optional[str] = None) -> Column:
    """Add ``column`` to :data:`COLUMNS` (at the end, or after the column ``after``).

    Raises:
        ValueError: a column with the same ``key`` (or stored under the same record key) exists.
    """
    taken = {c.key for c in COLUMNS} | {c.stored_as for c in COLUMNS}
    if column.key in taken or column.stored_as in taken:
        raise ValueError(f"a column {column.key!r} is already registered.")
    pos = len(COLUMNS) if after is None else COLUMNS.index(get_column(after)) + 1
    COLUMNS.insert(pos, column)
    return column


def unregister_column(key: str) -> None:
    """Remove the column ``key`` from :data:`COLUMNS` (tests and plug-ins undoing :func:`register_column`)."""
    COLUMNS.remove(get_column(key))


def scalar_columns() -> list[Column]:
    """The columns of the CSV files (every column that is not per class), in schema order."""
    return [c for c in COLUMNS if not c.per_class]


def table_columns(table: str) -> list[Column]:
    """The columns shown in the Markdown table ``table`` (one of :data:`TABLES`)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}.")
    return [c for c in COLUMNS if table in c.tables and not c.per_class]


#: suffixes of a row's interval entries: ``<key>_ci`` ([lo, hi]) and ``<key>_n`` (cases behind it);
#: the CSV files split ``_ci`` into ``<key>_lo`` and ``<key>_hi``
CI_SUFFIX, N_SUFFIX, LO_SUFFIX, HI_SUFFIX = "_ci", "_n", "_lo", "_hi"


def csv_keys() -> list[str]:
    """The value columns of the CSV files: every scalar column, each interval column followed by
    ``<key>_lo`` and ``<key>_hi`` (its 95% bootstrap interval)."""
    out: list[str] = []
    for c in scalar_columns():
        out += [c.key, c.key + LO_SUFFIX, c.key + HI_SUFFIX] if c.has_interval else [c.key]
    return out


def row_value(values: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` in a row's ``values``: a column key, or ``<key>_lo`` / ``<key>_hi``
    read from ``<key>_ci`` (``None`` when absent)."""
    if key in values:
        return values[key]
    for suffix, pos in ((LO_SUFFIX, 0), (HI_SUFFIX, 1)):
        if key.endswith(suffix):
            ci = values.get(key[: -len(suffix)] + CI_SUFFIX)
            if isinstance(ci, (list, tuple)) and len(ci) == 2:
                return ci[pos]
    return None


def with_interval(col: Column, values: Mapping[str, Any], ctx: FormatContext = FormatContext()) -> str:
    """``0.541 [0.498, 0.583]``: the row value of ``col`` and its interval (the value alone when
    it has none, e.g. a single case)."""
    text = col.format(values.get(col.key), ctx)
    ci = values.get(col.key + CI_SUFFIX)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) and not math.isnan(v)
                                                              for v in ci):
        text += f" [{col.format(ci[0], ctx)}, {col.format(ci[1], ctx)}]"
    return text


def schema_fingerprint() -> list[str]:
    """What cached per-case records depend on in the schema: its version and the per-case keys."""
    return [f"v{SCHEMA_VERSION}"] + [c.stored_as for c in COLUMNS if c.case is not None]


def markdown_table(labels: Sequence[Sequence[str]], rows: Sequence[Mapping[str, Any]], table: str,
                   ctx: FormatContext, label_headers: Sequence[str] = ("Attack",)) -> str:
    """A Markdown table: label columns, then the schema columns of ``table`` formatted with ``ctx``.

    Args:
        labels: per row, its label cells (as many as ``label_headers``).
        rows: per row, column key -> value.
        table: one of :data:`TABLES`.
        ctx: units and input range of the values.
        label_headers: headers of the label columns.
    """
    cols = [c for c in table_columns(table) if not c.optional or any(_shown(r.get(c.key)) for r in rows)]
    head = "| " + " | ".join([*label_headers, *(c.heading(ctx.units) for c in cols)]) + " |"
    sep = "|" + "|".join("---" for _ in range(len(label_headers) + len(cols))) + "|"
    body = ["| " + " | ".join([*lab, *(c.format(r.get(c.key), ctx) for c in cols)]) + " |"
            for lab, r in zip(labels, rows)]
    return "\n".join([head, sep, *body])


def _shown(v: Any) -> bool:
    """A table cell with a value (not missing, not NaN, not an empty list)."""
    if isinstance(v, (list, tuple)):
        return any(_shown(e) for e in v)
    return v is not None and not (isinstance(v, float) and math.isnan(v))


#: line width of the generated Markdown
WIDTH = 96


def _wrap(text: str, indent: str = "") -> str:
    import textwrap

    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def definitions(units: str = DEFAULT_UNITS, table: Optional[str] = None) -> list[str]:
    """One Markdown bullet per column (of ``table``, or all): ``- **Header** (`key`): definition``."""
    cols = COLUMNS if table is None else table_columns(table)
    return [_wrap(f"- **{c.heading(units)}** (`{c.key}`): {c.definition.format(units=units)}", "  ") for c in cols]


def metrics_markdown(units: str = DEFAULT_UNITS) -> str:
    """The metric definitions as Markdown: the body of the README's "Metrics" section (generated:
    ``python -c "from volattack.evaluation.columns import metrics_markdown as m; print(m())"``) and
    the end of every ``report.md`` (``units``: the source unit label)."""
    return "\n".join([_wrap(PREAMBLE.format(units=units)), "", *definitions(units)]) + "\n"


__all__ = [
    "Aggregate", "CI_SUFFIX", "COLUMNS", "Column", "DEFAULT_UNITS", "N_SUFFIX", "csv_keys", "row_value",
    "with_interval", "FormatContext", "Outcome", "PREAMBLE", "SCHEMA_VERSION",
    "TABLES", "definitions", "fixed", "get_column", "input_budget", "markdown_table", "metrics_markdown",
    "nanmean", "register_column", "scalar_columns", "schema_fingerprint", "table_columns", "unregister_column",
]
