"""Clinical attack goals of an evaluation (``evaluate.goal``), by class name (light: no torch import).

A goal says what the attacker wants (``target``) and where the perturbation may act (``mask``)::

    evaluate:
      goal:
        target: {remove: [liver]}            # targeted organ removal: liver -> background
        # target: {relabel: {spleen: liver}} # relabelling: spleen -> liver
        mask: {near: kidney_left, mm: 10}    # or: body | {body: -500} | {box: [x0, y0, z0, x1, y1, z1]}
        reference: prediction                # the map target and near-mask derive from: prediction | label

Classes are named as in the dataset's ``dataset.json`` ``labels`` (or the model's class names),
or by index. :class:`GoalConfig` checks the structure when the config is loaded;
:func:`bind_goal` maps the names to class indices (:class:`BoundGoal`) once the names are known,
before any model runs, and fails with the names the dataset has and a suggestion. The per-case
target map and mask are built by :mod:`volattack.evaluation.goals`. The command line's
``--target remove=liver`` / ``relabel=spleen:liver`` and ``--mask body`` / ``near=kidney_left:10``
/ ``box=x0,y0,z0,x1,y1,z1`` are parsed into the same YAML form by :func:`parse_target_arg` and
:func:`parse_mask_arg`.

Why the clean prediction is the default ``reference``: at deployment the attacker does not have
the ground truth, only the model's own output; the target "the clean prediction without the
liver" is what a removal attack is judged against (success = the prediction becomes it), and it
is reachable by construction. ``reference: label`` builds both from the ground truth instead
(the published protocols' white-box oracle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from volattack.registry import suggest
from volattack.yaml_config import ConfigError, from_dict

REFERENCES = ("prediction", "label")
MASK_KINDS = ("body", "near", "box")
#: default ``mask: body`` threshold in HU: voxels above it (and inside the preprocessing's
#: foreground) are the body, enclosed holes (lungs, bowel gas) filled slice by slice
BODY_HU = -500.0

ClassRef = Union[str, int]


def _check_class_ref(v: Any, where: str) -> ClassRef:
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"{where} must name a class (its name or index), got {v!r}.")
    return v.strip() if isinstance(v, str) else v


@dataclass
class TargetGoal:
    """``evaluate.goal.target``: the target map is the reference map with ``remove`` classes set to
    background and each ``relabel`` key class set to its value class."""

    remove: list[Any] = field(default_factory=list)
    relabel: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.remove, (str, int)) and not isinstance(self.remove, bool):
            self.remove = [self.remove]
        self.remove = [_check_class_ref(v, "target.remove") for v in self.remove]
        self.relabel = {_check_class_ref(k, "target.relabel"): _check_class_ref(v, f"target.relabel.{k}")
                        for k, v in dict(self.relabel).items()}
        if not self.remove and not self.relabel:
            raise ValueError("target needs remove: [class, ...] or relabel: {class: class}, got neither.")
        if len(set(map(str, self.remove))) != len(self.remove):
            raise ValueError(f"target.remove has duplicates, got {self.remove!r}.")


@dataclass
class MaskGoal:
    """``evaluate.goal.mask``: exactly one of ``body`` (``true`` or a threshold in source units),
    ``near`` (a class) with ``mm`` (distance in mm), ``box`` (world mm, RAS: x0, y0, z0, x1, y1, z1)."""

    body: Any = None
    near: Any = None
    mm: Optional[float] = None
    box: Optional[list[float]] = None

    def __post_init__(self) -> None:
        given = [k for k in MASK_KINDS if getattr(self, k) is not None and getattr(self, k) is not False]
        if len(given) != 1:
            raise ValueError(f"mask needs exactly one of {', '.join(MASK_KINDS)}, got {given or 'none'}.")
        if self.body is not None and self.body is not True:
            if isinstance(self.body, bool) or not isinstance(self.body, (int, float)) or not math.isfinite(self.body):
                raise ValueError(f"mask.body must be true or a finite threshold in source units, got {self.body!r}.")
            self.body = float(self.body)
        if self.near is not None:
            self.near = _check_class_ref(self.near, "mask.near")
            if isinstance(self.mm, bool) or not isinstance(self.mm, (int, float)) or not (
                    math.isfinite(self.mm) and self.mm > 0):
                raise ValueError(f"mask.mm must be a distance > 0 in mm with mask.near, got {self.mm!r}.")
            self.mm = float(self.mm)
        elif self.mm is not None:
            raise ValueError(f"mask.mm={self.mm!r} is only meaningful with mask.near.")
        if self.box is not None:
            b = list(self.box) if isinstance(self.box, (list, tuple)) else [self.box]
            if len(b) != 6 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                      for v in b):
                raise ValueError(f"mask.box must be 6 finite numbers [x0, y0, z0, x1, y1, z1] in mm, got {self.box!r}.")
            if not all(b[i] < b[i + 3] for i in range(3)):
                raise ValueError(f"mask.box must have x0 < x1, y0 < y1, z0 < z1 (world mm, RAS), got {b}.")
            self.box = [float(v) for v in b]

    @property
    def kind(self) -> str:
        """``"body"``, ``"near"`` or ``"box"``."""
        return next(k for k in MASK_KINDS if getattr(self, k) is not None)


@dataclass
class GoalConfig:
    """``evaluate.goal``: the clinical goal of every configured attack (module docstring).

    Attributes:
        target: the target map (targeted attacks); ``None``: untargeted.
        mask: where the perturbation may act: ``"body"`` or a :class:`MaskGoal` mapping;
            ``None``: everywhere.
        reference: ``prediction`` (default: the clean prediction, the attacker's knowledge) or
            ``label`` (the ground truth): the map the target and the ``near`` mask derive from.
    """

    target: Optional[TargetGoal] = None
    mask: Any = None
    reference: str = "prediction"

    def __post_init__(self) -> None:
        if isinstance(self.target, Mapping):
            self.target = from_dict(TargetGoal, self.target, "evaluate.goal.target")
        if isinstance(self.mask, str):
            if self.mask != "body":
                raise ValueError(f"mask must be 'body' or a mapping ({{near: organ, mm: 10}}, {{box: [...]}}, "
                                 f"{{body: threshold}}), got {self.mask!r}.{suggest(self.mask, ['body'])}")
            self.mask = MaskGoal(body=True)
        elif isinstance(self.mask, Mapping):
            self.mask = from_dict(MaskGoal, self.mask, "evaluate.goal.mask")
        elif self.mask is not None and not isinstance(self.mask, MaskGoal):
            raise ValueError(f"mask must be 'body' or a mapping, got {self.mask!r}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}."
                             f"{suggest(str(self.reference), REFERENCES)}")
        if self.target is None and self.mask is None:
            raise ValueError("goal needs a target, a mask or both.")


@dataclass(frozen=True)
class BoundGoal:
    """A :class:`GoalConfig` with class indices (:func:`bind_goal`).

    Attributes:
        remove: classes set to background in the target map.
        relabel: ``(from, to)`` class pairs.
        mask: the mask section (``None``: everywhere); ``near_class`` its class index.
        reference: ``prediction`` or ``label``.
        names: class index -> name (for messages and reports).
    """

    remove: tuple[int, ...] = ()
    relabel: tuple[tuple[int, int], ...] = ()
    mask: Optional[MaskGoal] = None
    near_class: Optional[int] = None
    reference: str = "prediction"
    names: tuple[tuple[int, str], ...] = ()

    @property
    def targeted(self) -> bool:
        return bool(self.remove or self.relabel)

    @property
    def removed(self) -> tuple[int, ...]:
        """Classes that must disappear from the prediction: the removed ones and the relabelled sources."""
        return self.remove + tuple(a for a, _ in self.relabel)

    def name(self, c: int) -> str:
        return dict(self.names).get(c, f"class {c}")

    def describe(self) -> dict[str, Any]:
        """The goal by class name, for ``results.json`` and the report."""
        out: dict[str, Any] = {"reference": self.reference}
        if self.remove:
            out["remove"] = [self.name(c) for c in self.remove]
        if self.relabel:
            out["relabel"] = {self.name(a): self.name(b) for a, b in self.relabel}
        if self.mask is not None:
            m = self.mask
            out["mask"] = {"body": {"body": m.body}, "box": {"box": m.box},
                           "near": {"near": self.name(self.near_class or 0), "mm": m.mm}}[m.kind]
        return out


def goal_text(described: Mapping[str, Any], units: str = "HU") -> str:
    """One line of Markdown for a goal as :meth:`BoundGoal.describe` gives it (``results["goal"]``)."""
    parts = []
    if described.get("remove"):
        parts.append("remove " + ", ".join(f"`{c}`" for c in described["remove"]))
    if described.get("relabel"):
        parts.append("relabel " + ", ".join(f"`{a}` → `{b}`" for a, b in described["relabel"].items()))
    m = described.get("mask") or {}
    if "near" in m:
        parts.append(f"perturbation within {m['mm']:g} mm of `{m['near']}`")
    elif "box" in m:
        parts.append(f"perturbation inside the world box {m['box']} mm (RAS)")
    elif "body" in m:
        thr = f"above {m['body']:g} {units}" if m["body"] is not True else (
            f"above {BODY_HU:g} HU" if units == "HU" else "above the input's lower bound")
        parts.append(f"perturbation inside the body ({thr}, holes filled)")
    ref = "the label" if described.get("reference") == "label" else "the clean prediction"
    if described.get("remove") or described.get("relabel") or "near" in m:
        parts.append(f"target map{' and organ' if 'near' in m else ''} from {ref}")
    return "; ".join(parts)


def class_index(ref: ClassRef, names: Mapping[int, str], num_classes: int, where: str, *,
                background: bool = False) -> int:
    """The index of the class ``ref`` (a name of ``names`` or an index in ``1..num_classes-1``;
    ``background``: also the background, index 0).

    Raises:
        ConfigError: an unknown name (listing the names the dataset has, with a suggestion), an
            index out of range, or the background class.
    """
    by_name = {str(v): int(k) for k, v in names.items()}
    if isinstance(ref, str) and ref in by_name:
        idx = by_name[ref]
    elif isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        idx = int(ref)
        if not 0 <= idx < num_classes:
            raise ConfigError(f"{where}: class index {idx} is outside 0..{num_classes - 1} (the model's classes).")
    else:
        fg = [v for k, v in sorted(names.items()) if int(k) != 0]
        if not names:
            raise ConfigError(f"{where}: no class {ref!r}: the dataset (dataset.json 'labels') and the model name "
                              f"no classes; name classes by index 1..{num_classes - 1}.")
        ci = {n.lower(): n for n in by_name}
        hint = f" Did you mean '{ci[ref.lower()]}'?" if ref.lower() in ci else suggest(ref, by_name)
        raise ConfigError(f"{where}: the dataset has no class {ref!r}; its classes are {', '.join(fg)}.{hint}")
    if idx == 0 and not background:
        raise ConfigError(f"{where}: class {ref!r} is the background (index 0); name a foreground class.")
    if idx >= num_classes:
        raise ConfigError(f"{where}: class {ref!r} has index {idx}, but the model has {num_classes} classes.")
    return idx


def bind_goal(goal: Optional[GoalConfig], names: Optional[Mapping[int, str]], num_classes: int) -> Optional[BoundGoal]:
    """``goal`` with class indices, checked against the dataset's class names (``None`` stays ``None``).

    Args:
        goal: ``evaluate.goal``.
        names: class index -> name (``dataset.json`` ``labels``, else the model's class names).
        num_classes: K, background included.

    Raises:
        ConfigError: a class the dataset does not have (its names listed, with a suggestion), a
            class both removed and relabelled, or relabelled to itself.
    """
    if goal is None:
        return None
    names = {int(k): str(v) for k, v in (names or {}).items()}
    remove: tuple[int, ...] = ()
    relabel: list[tuple[int, int]] = []
    if goal.target is not None:
        remove = tuple(class_index(r, names, num_classes, "evaluate.goal.target.remove") for r in goal.target.remove)
        for a, b in goal.target.relabel.items():
            ia = class_index(a, names, num_classes, "evaluate.goal.target.relabel")
            ib = class_index(b, names, num_classes, f"evaluate.goal.target.relabel.{a}",
                             background=True) if not (b == "background" and 0 not in names) else 0
            if ia == ib:
                raise ConfigError(f"evaluate.goal.target.relabel: {a!r} -> {b!r} relabels a class to itself.")
            if ia in remove:
                raise ConfigError(f"evaluate.goal.target: class {a!r} is both removed and relabelled.")
            relabel.append((ia, ib))
        if len({a for a, _ in relabel}) != len(relabel):
            raise ConfigError(f"evaluate.goal.target.relabel names a class twice: {goal.target.relabel!r}.")
    near = None
    if goal.mask is not None and goal.mask.kind == "near":
        near = class_index(goal.mask.near, names, num_classes, "evaluate.goal.mask.near")
    return BoundGoal(remove=remove, relabel=tuple(relabel), mask=goal.mask, near_class=near,
                     reference=goal.reference, names=tuple(sorted(names.items())))


# ----------------------------------------------------------------------- command line


def _split_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise ConfigError(f"{what}: empty entry in {text!r}.")
    return items


def parse_target_arg(items: list[str]) -> Optional[dict[str, Any]]:
    """``--target`` values (``remove=liver[,spleen]``, ``relabel=spleen:liver[,a:b]``, repeatable)
    -> the YAML form ``{remove: [...], relabel: {...}}`` (``None`` without any).

    Raises:
        ConfigError: a value of another form (named).
    """
    out: dict[str, Any] = {}
    for item in items:
        kind, sep, rest = item.partition("=")
        if not sep or kind not in ("remove", "relabel") or not rest.strip():
            raise ConfigError(f"--target expects remove=CLASS[,CLASS] or relabel=FROM:TO[,FROM:TO], got {item!r}."
                              f"{suggest(kind, ['remove', 'relabel'])}")
        if kind == "remove":
            out.setdefault("remove", []).extend(_split_list(rest, "--target remove"))
            continue
        for pair in _split_list(rest, "--target relabel"):
            a, colon, b = pair.partition(":")
            if not colon or not a.strip() or not b.strip():
                raise ConfigError(f"--target relabel expects FROM:TO pairs, got {pair!r}.")
            out.setdefault("relabel", {})[a.strip()] = b.strip()
    return out or None


def parse_mask_arg(text: Optional[str]) -> Any:
    """``--mask`` (``body``, ``body=-300``, ``near=kidney_left:10``, ``box=x0,y0,z0,x1,y1,z1``) -> the
    YAML form of ``evaluate.goal.mask`` (``None`` without one).

    Raises:
        ConfigError: a value of another form, or a number that does not parse (named).
    """
    if text is None:
        return None
    kind, sep, rest = text.partition("=")
    try:
        if kind == "body":
            return "body" if not sep else {"body": float(rest)}
        if kind == "near" and sep:
            organ, colon, mm = rest.rpartition(":")
            if colon and organ.strip():
                return {"near": organ.strip(), "mm": float(mm)}
        if kind == "box" and sep:
            return {"box": [float(v) for v in _split_list(rest, "--mask box")]}
    except ValueError:
        raise ConfigError(f"--mask {text!r}: a number does not parse.") from None
    raise ConfigError(f"--mask expects body, body=THRESHOLD, near=CLASS:MM or box=x0,y0,z0,x1,y1,z1 (world mm), "
                      f"got {text!r}.{suggest(kind, MASK_KINDS)}")


__all__ = ["BODY_HU", "BoundGoal", "GoalConfig", "MASK_KINDS", "MaskGoal", "REFERENCES", "TargetGoal",
           "bind_goal", "class_index", "goal_text", "parse_mask_arg", "parse_target_arg"]
