"""Configuration of the poisoning threats (light: no torch import): the ``train.poison`` section
(:class:`PoisonConfig`) and the ``evaluate.trigger`` section (:class:`TriggerEvalConfig`), both
built from YAML through :mod:`volattack.yaml_config` and validated in ``__post_init__``.

A target behaviour (``target``) names classes, resolved against the dataset's class names when
the run starts (:func:`volattack.threats.poison.resolve_target`):

- ``{remove: [liver, ...]}``: the named organs become background;
- ``{relabel: {spleen: liver}}``: every voxel of one organ gets the other's label;
- ``{paint: liver}``: the voxels the trigger covers get the named organ's label (a patch trigger;
  with a whole-volume trigger the whole body would be painted).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from volattack.checks import check_bool, check_number, is_int

#: the target behaviours of :class:`PoisonConfig` and :class:`TriggerEvalConfig`
BEHAVIOURS: tuple[str, ...] = ("remove", "relabel", "paint")


def check_target(target: Any, where: str) -> dict[str, Any]:
    """Validate a target behaviour mapping (module docstring) by its form; names are resolved later.

    Raises:
        ValueError: not a mapping with exactly one key of :data:`BEHAVIOURS`, or a value of the
            wrong form (named with ``where``).
    """
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in BEHAVIOURS:
        raise ValueError(f"{where} must be one of {{remove: [names]}}, {{relabel: {{a: b}}}}, {{paint: name}}, "
                         f"got {target!r}.")
    kind, value = next(iter(target.items()))
    if kind == "remove":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}.remove must be a class name or a non-empty list of names, got {value!r}.")
        return {"remove": list(value)}
    if kind == "relabel":
        if not isinstance(value, dict) or not value or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"{where}.relabel must map class names to class names, got {value!r}.")
        return {"relabel": dict(value)}
    if not isinstance(value, str):
        raise ValueError(f"{where}.paint must be one class name, got {value!r}.")
    return {"paint": value}


@dataclass
class TriggerSpec:
    """A trigger by registry name (:func:`volattack.threats.triggers.list_triggers`) and its parameters.

    Attributes:
        name: ``patch``, ``spectral``, ``dct`` or ``learned`` (checked against the registry, with a
            suggestion, when the run starts).
        params: the trigger's parameters (intensities and budgets in source units, e.g. HU).
        seed: seed of the trigger's own pattern (a local ``torch.Generator``), recorded.
    """

    name: str = "spectral"
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"trigger.name must be a trigger name, got {self.name!r}.")
        if not isinstance(self.params, dict):
            raise ValueError(f"trigger.params must be a mapping, got {self.params!r}.")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"trigger.seed must be an integer >= 0, got {self.seed!r}.")


@dataclass
class JointConfig:
    """The ``train.poison.joint`` section: the trigger is optimised into the victim's training
    (the supply-chain attacker of LIRA, Doan et al., ICCV 2021, and of BAPLe, Hanif et al., MICCAI
    2024; :mod:`volattack.threats.joint_trigger`). Needs a trigger that can be optimised
    (``dct_learned``).

    Attributes:
        lr: Adam learning rate of the trigger's coefficients (source units, e.g. HU, per step;
            finite, > 0).
        every: update the trigger on every ``every``-th training batch that holds poisoned crops
            (integer >= 1; 1: on every such batch).
        steps: Adam steps of the trigger per update (integer >= 1), each one forward and backward
            pass of the poisoned crops through the current model.
        pair: also train the model on the poisoned crops' clean copies with their true labels (the
            poisoned cases are still ``round(rate * n)``; the batch grows by their crops).
        repeat: the triggered crops appear this many times in the model's batch (integer >= 1; LIRA's
            weight of the poisoned loss). Above 1 the model sees a larger share of poisoned crops
            than ``rate``: not the fixed-rate threat of the issue's target.
        freeze_after: the trigger is fixed from epoch ``freeze_after + 1`` on and the model goes on
            training against it (LIRA's second stage; integer >= 0, 0: never fixed).
    """

    lr: float = 0.5
    every: int = 1
    steps: int = 1
    pair: bool = False
    repeat: int = 1
    freeze_after: int = 0

    def __post_init__(self) -> None:
        check_number("poison.joint.lr", self.lr, low=0.0, low_open=True)
        check_number("poison.joint.every", self.every, low=1, integer=True)
        check_number("poison.joint.steps", self.steps, low=1, integer=True)
        check_bool("poison.joint.pair", self.pair)
        check_number("poison.joint.repeat", self.repeat, low=1, integer=True)
        check_number("poison.joint.freeze_after", self.freeze_after, low=0, integer=True)


@dataclass
class PoisonConfig:
    """The ``train.poison`` section: backdoor poisoning of the training cases.

    Attributes:
        trigger: the trigger (:class:`TriggerSpec`).
        rate: share of the training cases poisoned, in [0, 1]; exactly ``round(rate * n)`` cases,
            chosen with ``seed``.
        target: the target behaviour by class name (module docstring).
        clean_label: add the trigger but leave the labels untouched (clean-label variant).
        seed: seed of the choice of the poisoned cases (a local ``torch.Generator``), recorded.
        joint: optimise the trigger jointly with the model (:class:`JointConfig`; the poisoned
            cases are then stored as clean copies; the current trigger and the target map are put
            on their crops in every training step), or ``None`` (a fixed trigger).
    """

    trigger: TriggerSpec = field(default_factory=TriggerSpec)
    rate: float = 0.1
    target: dict[str, Any] = field(default_factory=lambda: {"remove": ["liver"]})
    clean_label: bool = False
    seed: int = 0
    joint: Optional[JointConfig] = None

    def __post_init__(self) -> None:
        if isinstance(self.trigger, dict):
            self.trigger = TriggerSpec(**self.trigger)
        if isinstance(self.joint, dict):
            keys = [f.name for f in fields(JointConfig)]
            unknown = sorted(set(self.joint) - set(keys))
            if unknown:
                raise ValueError(f"poison.joint has unknown key(s) {unknown}; keys: {', '.join(keys)}.")
            self.joint = JointConfig(**self.joint)
        if self.joint is not None and not isinstance(self.joint, JointConfig):
            raise ValueError(f"poison.joint must be a JointConfig, a mapping or None, got {self.joint!r}.")
        if not isinstance(self.trigger, TriggerSpec):
            raise ValueError(f"poison.trigger must be a TriggerSpec or a mapping, got {self.trigger!r}.")
        check_number("poison.rate", self.rate, low=0.0, high=1.0)
        self.target = check_target(self.target, "poison.target")
        check_bool("poison.clean_label", self.clean_label)
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"poison.seed must be an integer >= 0, got {self.seed!r}.")


@dataclass
class TriggerEvalConfig:
    """The ``evaluate.trigger`` section: one row ``trigger(<name>)`` per case, the case with the
    trigger added, scored against the target map (:mod:`volattack.evaluation.rows.backdoor`).

    Attributes:
        run: a poisoned training run directory: its ``poison.json`` gives the trigger, the target
            and the class names (the trigger the model was poisoned with); ``None``: ``trigger``
            and ``target`` are given here.
        trigger: the trigger (``None`` with ``run``).
        target: the target behaviour by class name (``None`` with ``run``).
        threshold: a triggered case counts as a success when its prediction reaches Dice >= t to
            the target map, t in (0, 1].
        class_names: label index -> name (``None``: from ``run``, else from the checkpoint).
    """

    run: Optional[str] = None
    trigger: Optional[TriggerSpec] = None
    target: Optional[dict[str, Any]] = None
    threshold: float = 0.5
    class_names: Optional[dict[str, str]] = None

    def __post_init__(self) -> None:
        if isinstance(self.trigger, dict):
            self.trigger = TriggerSpec(**self.trigger)
        if self.run is None and (self.trigger is None or self.target is None):
            raise ValueError("evaluate.trigger needs either run (a poisoned training run) or both trigger and "
                             f"target, got run=None, trigger={self.trigger!r}, target={self.target!r}.")
        if self.run is not None and not isinstance(self.run, str):
            raise ValueError(f"evaluate.trigger.run must be a run directory, got {self.run!r}.")
        if self.target is not None:
            self.target = check_target(self.target, "evaluate.trigger.target")
        check_number("evaluate.trigger.threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        if self.class_names is not None and not isinstance(self.class_names, dict):
            raise ValueError(f"evaluate.trigger.class_names must map label indices to names, got {self.class_names!r}.")


__all__ = ["BEHAVIOURS", "JointConfig", "PoisonConfig", "TriggerEvalConfig", "TriggerSpec", "check_target"]
