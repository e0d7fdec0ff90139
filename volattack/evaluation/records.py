"""Typed records of an evaluation: per-case scores and records, failed cases, summary rows.

The values of a :class:`Scores` or :class:`Row` are keyed by the columns of
:data:`volattack.evaluation.columns.COLUMNS` (the schema decides which exist); everything else
is a typed field. Records serialise to the JSON of ``cases/*.json`` and ``results.json`` with
``to_dict`` / ``from_dict``; the keys of results written before the schema are kept (a case's
Dice is stored as ``dice``, the clean summary row has ``dice``), so existing readers work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from volattack.evaluation import columns as schema


def _json_value(v: Any) -> Any:
    """``v`` if it is JSON-serialisable plain data (numbers, strings, lists of them), else ``None``."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "detach"):  # a tensor
        v = v.detach().cpu().flatten().tolist()
        return v[0] if len(v) == 1 else v
    if isinstance(v, (list, tuple)):
        items = [_json_value(e) for e in v]
        if any(e is None and o is not None for e, o in zip(items, v)):
            return None
        return items[0] if len(items) == 1 else items
    return None


#: ``info`` entries every attack reports that are bookkeeping, not measurements (the per-case
#: record has them already: the case's sample id and seed) or sizes the schema does not report
_NOT_EXTRAS = ("attack", "seed", "sample_ids", "targeted", "restart_best", "l2")


def attack_extras(info: Mapping[str, Any]) -> dict[str, Any]:
    """The attack-specific part of an attack's ``info`` (e.g. VAFA's mean q): every entry that is
    not a column of the schema or bookkeeping, per-sample lists of one sample reduced to the value."""
    taken = {c.key for c in schema.COLUMNS} | {c.stored_as for c in schema.COLUMNS} | set(_NOT_EXTRAS)
    out = {}
    for k, v in info.items():
        if k in taken:
            continue
        jv = _json_value(v)
        if jv is not None:
            out[str(k)] = jv
    return out


@dataclass
class Scores:
    """The scores of one prediction of one case.

    Attributes:
        values: column key -> per-case value (see :data:`~volattack.evaluation.columns.COLUMNS`).
        info: attack-specific extras of the attack's ``info`` (:func:`attack_extras`).
    """

    values: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of column ``key`` (``default`` if the case has none)."""
        return self.values.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def to_dict(self) -> dict[str, Any]:
        by_key = {c.key: c.stored_as for c in schema.COLUMNS}
        out = {by_key.get(k, k): v for k, v in self.values.items()}
        if self.info:
            out["info"] = dict(self.info)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scores":
        by_record = {c.stored_as: c.key for c in schema.COLUMNS}
        values = {by_record.get(k, k): v for k, v in data.items() if k != "info"}
        return cls(values=values, info=dict(data.get("info") or {}))


@dataclass
class SanityRecord:
    """Per-case inputs of the gradient-masking checks (:mod:`volattack.evaluation.sanity`).

    Attributes:
        zero_grad_fraction: fraction of input voxels whose Dice-CE gradient is exactly zero.
        unbounded_pgd_dice: mean foreground Dice under PGD with eps = the whole input range.
    """

    zero_grad_fraction: Optional[float] = None
    unbounded_pgd_dice: Optional[float] = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "SanityRecord":
        data = data or {}
        return cls(**{k: data.get(k) for k in ("zero_grad_fraction", "unbounded_pgd_dice")})


@dataclass
class CaseRecord:
    """Everything one case produced (``cases/<case>.json``).

    Attributes:
        case: case id (``<index>_<image name>``).
        image, label: the datalist paths.
        index: position in the evaluated split (the attacks' sample id).
        seed: the case seed (``seed + index``) of the defence's and sanity checks' draws.
        shape: preprocessed spatial shape; spacing_mm: its voxel spacing.
        clean: scores of the clean prediction.
        attacks: attack label -> scores of its prediction.
        sanity: gradient-masking inputs.
        clean_undefended: scores of the bare model's clean prediction (with a defence).
        figure: triplanar panel path relative to the run directory.
        outputs: files written for the case (``save_adv``/``save_pred``), relative to the run directory.
        seconds: wall-clock seconds of the case.
        key: the cache key; key_parts: its components (each a digest), see
            :mod:`volattack.evaluation.cache`.
        schema_version: :data:`~volattack.evaluation.columns.SCHEMA_VERSION` of the record.
    """

    case: str
    image: str
    label: str
    index: int
    seed: int
    shape: list[int]
    spacing_mm: list[float]
    clean: Scores
    attacks: dict[str, Scores] = field(default_factory=dict)
    sanity: SanityRecord = field(default_factory=SanityRecord)
    clean_undefended: Optional[Scores] = None
    figure: Optional[str] = None
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    key: str = ""
    key_parts: dict[str, str] = field(default_factory=dict)
    schema_version: int = schema.SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case": self.case, "image": self.image, "label": self.label, "index": self.index, "seed": self.seed,
            "shape": list(self.shape), "spacing_mm": list(self.spacing_mm), "clean": self.clean.to_dict(),
            "attacks": {k: v.to_dict() for k, v in self.attacks.items()}, "sanity": self.sanity.to_dict(),
            "seconds": self.seconds, "key": self.key, "key_parts": dict(self.key_parts),
            "schema_version": self.schema_version,
        }
        if self.clean_undefended is not None:
            out["clean_undefended"] = self.clean_undefended.to_dict()
        if self.figure:
            out["figure"] = self.figure
        if self.outputs:
            out["outputs"] = list(self.outputs)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CaseRecord":
        cu = d.get("clean_undefended")
        return cls(
            case=str(d["case"]), image=str(d.get("image")), label=str(d.get("label")),
            index=int(d.get("index", -1)), seed=int(d.get("seed", 0)), shape=list(d.get("shape") or []),
            spacing_mm=list(d.get("spacing_mm") or []), clean=Scores.from_dict(d["clean"]),
            attacks={k: Scores.from_dict(v) for k, v in (d.get("attacks") or {}).items()},
            sanity=SanityRecord.from_dict(d.get("sanity")),
            clean_undefended=Scores.from_dict(cu) if cu is not None else None,
            figure=d.get("figure"), outputs=list(d.get("outputs") or []), seconds=float(d.get("seconds") or 0.0),
            key=str(d.get("key") or ""), key_parts=dict(d.get("key_parts") or {}),
            schema_version=int(d.get("schema_version") or 1),
        )


@dataclass
class FailedCase:
    """A case that could not be evaluated, with the reason."""

    case: str
    image: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"case": self.case, "image": self.image, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FailedCase":
        return cls(case=str(d["case"]), image=str(d.get("image")), reason=str(d.get("reason")))


#: ``Row.kind`` values, in table order
ROW_KINDS = ("clean_undefended", "clean", "attack")
#: table labels of the clean rows
ROW_LABELS = {"clean_undefended": "clean, no defence", "clean": "clean"}


@dataclass
class Row:
    """One row of the robustness table: the clean predictions or one attack configuration.

    Attributes:
        label: ``clean``, ``clean, no defence`` or the attack label.
        kind: one of :data:`ROW_KINDS`.
        values: column key -> aggregated value.
        info: means over cases of the attack's numeric extras (e.g. VAFA's ``mean_q``).
    """

    label: str
    kind: str = "attack"
    values: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.values)
        if self.kind != "attack":  # the key of results written before the schema
            out["dice"] = self.values.get("adv_dice")
        if self.info:
            out["info"] = dict(self.info)
        return out

    @classmethod
    def from_dict(cls, label: str, kind: str, d: Mapping[str, Any]) -> "Row":
        values = {k: v for k, v in d.items() if k not in ("info", "dice")}
        if kind != "attack" and "dice" in d:
            values.setdefault("adv_dice", d["dice"])
            values.setdefault("clean_dice", d["dice"])
        return cls(label=label, kind=kind, values=values, info=dict(d.get("info") or {}))


@dataclass
class Summary:
    """Dataset-level rows (``results["summary"]``)."""

    n_cases: int
    clean: Row
    attacks: dict[str, Row] = field(default_factory=dict)
    clean_undefended: Optional[Row] = None

    def rows(self) -> list[Row]:
        """Table order: the undefended clean row (with a defence), the clean row, the attacks."""
        head = [self.clean_undefended] if self.clean_undefended is not None else []
        return [*head, self.clean, *self.attacks.values()]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_cases": self.n_cases, "clean": self.clean.to_dict(),
                               "attacks": {k: r.to_dict() for k, r in self.attacks.items()}}
        if self.clean_undefended is not None:
            out["clean_undefended"] = self.clean_undefended.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Summary":
        cu = d.get("clean_undefended")
        return cls(
            n_cases=int(d.get("n_cases") or 0),
            clean=Row.from_dict("clean", "clean", d.get("clean") or {}),
            attacks={k: Row.from_dict(k, "attack", v) for k, v in (d.get("attacks") or {}).items()},
            clean_undefended=Row.from_dict(ROW_LABELS["clean_undefended"], "clean_undefended", cu) if cu else None,
        )

