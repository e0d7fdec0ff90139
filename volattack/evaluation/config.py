"""Configuration of evaluation runs and of the whole pipeline (light: no torch/MONAI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from volattack.checks import parse_number
from volattack.defenses.config import DEFENSE_BPDA, DefenseConfig, TransformSpec  # noqa: F401  (moved)
from volattack.defenses.config import CertifyConfig  # evaluate.certify
from volattack.evaluation.extra_config import CorruptionConfig, MatchConfig  # evaluate.corruptions, match
from volattack.evaluation.goal_config import GoalConfig  # evaluate.goal
from volattack.threats.config import TriggerEvalConfig  # evaluate.trigger

#: parameters whose values are intensity budgets (printed as ``k/255`` when they are multiples)
BUDGET_KEYS = ("eps", "alpha", "sigma")

_TARGETS = ("set by evaluate.goal.target (by class name: {remove: [liver]} or {relabel: {spleen: liver}}; "
            "command line: --target remove=liver); from Python, any label map: volattack.create_attack(..., "
            "targeted=True).run(images, labels, target_labels=...)")

#: attack parameters a config cannot set, and why (rejected when the config is loaded)
RESERVED_ATTACK_PARAMS: dict[str, str] = {
    "targeted": _TARGETS,
    "target_labels": _TARGETS,
    "mask": ("set by evaluate.goal.mask (body, {near: organ, mm: 10} or {box: [x0, y0, z0, x1, y1, z1]} in "
             "world mm; command line: --mask near=organ:10); from Python, any mask tensor: "
             "Attack.run(images, labels, mask=...)"),
    "inferer": ("Python-only: the evaluation runs every attack through its own sliding-window inference "
                "(evaluate.sw_batch_size, sw_overlap, threat_model)"),
    "bounds": "set by the evaluation from the model's intensity model (data.preprocess)",
    "unit_scale": "set by the evaluation from the model's intensity model (data.preprocess)",
    "seed": "set by the evaluation from the run's seed (case i uses sample id i)",
    "sample_ids": "set by the evaluation (case i uses sample id i)",
}


def _check_attack_param(name: str, where: str, value: Any) -> None:
    """Reject a parameter of :data:`RESERVED_ATTACK_PARAMS` (``targeted: false`` is allowed)."""
    if name in RESERVED_ATTACK_PARAMS and not (name == "targeted" and value is False):
        raise ValueError(f"{where}.{name}={value!r} cannot be set in a config: {RESERVED_ATTACK_PARAMS[name]}.")


def format_number(v: Any, key: Optional[str] = None) -> str:
    """Short label: intensity budgets that are multiples of 1/255 print as ``k/255``; with ``key``
    given, only the budget parameters of ``BUDGET_KEYS`` do (``rho=0.4``, not ``rho=102/255``)."""
    if isinstance(v, float):
        if key is not None and key not in BUDGET_KEYS:
            return f"{v:.4g}"
        k = v * 255
        if abs(k - round(k)) < 1e-6 and v != 0:
            return f"{int(round(k))}/255"
        return f"{v:.4g}"
    return str(v)


#: attack presets: a preset name in ``evaluate.attacks`` expands at load to an attack with these
#: settings (the config's own params override them), and its rows keep the preset's name.
#: ``reliable``: SEA (Croce, Singh, Hein, ECCV 2024) as published: APGD on each of its four losses
#: (masked CE, class-balanced masked CE, Jensen-Shannon divergence, masked spherical), 300
#: iterations per loss with progressive radius reduction, L-inf, worst case per case over the losses.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "reliable": ("sea", {"norm": "linf", "steps": 300,
                         "losses": ["masked_ce", "balanced_masked_ce", "jsd", "masked_spherical"]}),
}


@dataclass
class AttackSpec:
    """One attack and its parameters; ``sweep`` lists values of one or more parameters, each value
    giving one evaluated configuration (e.g. ``sweep: {eps: [2/255, 4/255, 8/255]}``).

    Numbers may be written as fractions (``"8/255"``). Parameters are validated by the attack;
    those of :data:`RESERVED_ATTACK_PARAMS` (target labels, masks, inferers: Python-only; bounds,
    unit scale, seeds: set by the evaluation) are rejected here, with the reason.

    A name of :data:`PRESETS` expands here: ``{name: reliable, params: {eps: 4/255}}`` becomes the
    ``sea`` attack with the preset's settings plus ``eps``, ``preset`` keeps ``"reliable"``, and the
    label shows the preset and the parameters that differ from its settings: ``reliable(eps=4/255)``.
    """

    name: str = "pgd"
    params: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    preset: Optional[str] = None

    def __post_init__(self) -> None:
        if self.name in PRESETS:
            self.preset = self.name
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}.")
            self.name, defaults = PRESETS[self.preset]
            self.params = {**self.params, **{k: v for k, v in defaults.items() if k not in self.params}}
        for k, v in self.params.items():
            _check_attack_param(k, "params", v)
        for k, v in self.sweep.items():
            _check_attack_param(k, "sweep", v)
        self.params = {k: parse_number(v, f"params.{k}") for k, v in self.params.items()}
        lengths = set()
        for k, vals in self.sweep.items():
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"sweep.{k} must be a non-empty list, got {vals!r}.")
            self.sweep[k] = [parse_number(v, f"sweep.{k}") for v in vals]
            lengths.add(len(vals))
        if len(lengths) > 1:
            raise ValueError(f"sweep lists must have equal lengths, got {sorted(lengths)}.")

    def expand(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(label, kwargs), ...]``: one entry per sweep position (one entry without a sweep)."""
        if not self.sweep:
            return [(self.label(self.params), dict(self.params))]
        n = len(next(iter(self.sweep.values())))
        out = []
        for i in range(n):
            kw = dict(self.params)
            kw.update({k: v[i] for k, v in self.sweep.items()})
            out.append((self.label({k: v[i] for k, v in self.sweep.items()}), kw))
        return out

    def label(self, shown: dict[str, Any]) -> str:
        """``name(k=v, ...)`` of the parameters ``shown``; a preset's label names the preset and
        omits the parameters equal to its settings."""
        name = self.name
        if self.preset is not None:
            name, defaults = self.preset, PRESETS[self.preset][1]
            shown = {k: v for k, v in shown.items() if not (k in defaults and defaults[k] == v)}
        if not shown:
            return name
        inner = ", ".join(f"{k}={format_number(v, k)}" for k, v in shown.items())
        return f"{name}({inner})"

THREAT_MODELS = ("volume", "patch")

#: where the perturbation lives: ``model`` (the preprocessed tensor) or ``source`` (the scan's own grid)
SPACES = ("model", "source")


def _check_space(cfg: "EvalConfig") -> None:
    """``evaluate.space`` and ``evaluate.source_bounds``; ``space: source`` runs the volume threat
    model on the bare deployed pipeline (the other options are model-space passes)."""
    if cfg.space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {cfg.space!r}.")
    b = cfg.source_bounds
    if b is not None:
        vals = [parse_number(v, "source_bounds") for v in b] if isinstance(b, (list, tuple)) else None
        if (vals is None or len(vals) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and abs(v) != float("inf") and v == v for v in vals)
                or not vals[0] < vals[1]):
            raise ValueError(f"source_bounds must be None or [lo, hi] in source units with lo < hi, got {b!r}.")
        cfg.source_bounds = [float(v) for v in vals]
        if cfg.space != "source":
            raise ValueError(f"source_bounds={cfg.source_bounds} needs space: source, got space={cfg.space!r}.")
    if cfg.space == "source":
        unsupported = {"threat_model": cfg.threat_model != "volume", "surrogate_checkpoint": cfg.surrogate_checkpoint,
                       "defense": cfg.defense, "certify": cfg.certify, "corruptions": cfg.corruptions,
                       "match": cfg.match, "trigger": getattr(cfg, "trigger", None)}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"space: source attacks the deployed pipeline itself (threat_model: volume, white box, "
                             f"no row passes); it cannot be combined with {', '.join(bad)}.")

#: the default of ``data.test_key`` (``volattack.data.config.DataConfig``)
DEFAULT_TEST_KEY = "test"


def evaluation_split(split: Optional[str], test_key: str) -> str:
    """The datalist key an evaluation reads: ``evaluate.split`` when given, else ``data.test_key``.

    Args:
        split: ``evaluate.split`` (``None``: not given).
        test_key: ``data.test_key``.

    Raises:
        ValueError: both are given with different values (``data.test_key`` other than its default
            ``"test"`` and ``evaluate.split`` another key): the config names two test splits.
    """
    if split is None:
        return test_key
    if test_key != DEFAULT_TEST_KEY and split != test_key:
        raise ValueError(
            f"evaluate.split={split!r} and data.test_key={test_key!r} name different splits; set one of them "
            "(evaluate.split defaults to data.test_key)."
        )
    return split


@dataclass
class EvalConfig:
    """What to evaluate: the attacks, the split, sliding-window inference, outputs.

    Attributes:
        checkpoint: the target model (volattack checkpoint; TorchScript or MONAI bundle, see
            ``volattack.models.external``).
        surrogate_checkpoint: if set, attacks are crafted on this model and evaluated on the
            target (transfer); ``None`` attacks the target itself (white box).
        model_options: options of the target's model source, passed to
            :func:`volattack.models.sources.load_model` (nnU-Net: ``folds``, ``checkpoint``,
            ``configuration``, ``use_mirroring``, ``tile_step_size``, ``fp16_accumulation``,
            ``keep_activations_mb``; a MONAI bundle: ``network_key``); a source refuses options it
            does not take, naming the ones it does. Part of the cache key.
        split: the datalist key of the evaluated cases; ``None`` (default): ``data.test_key``.
            Setting both to different values is an error (:func:`evaluation_split`), unless
            ``data.test_key`` keeps its default.
        threat_model: ``"volume"``: the attack runs end to end through the same sliding-window
            inference that scores it (exact gradient); ``"patch"``: the published protocol, the
            volume is cut into tiles of ``patch_size`` (overlap ``patch_overlap``), each tile is
            attacked through the bare model, and the perturbations are stitched (averaged where
            tiles overlap) before sliding-window scoring.
        sanity_checks: gradient-masking checks in every report (Dice non-increasing with the
            budget, unbounded PGD, attacks versus noise, zero-gradient fraction).
        sanity_unbounded_steps: steps of the unbounded PGD check (0 skips that check).
        sanity_blackbox_queries: queries of the black-box check (0, default: off, runs stay fast):
            a ``square`` attack (Andriushchenko et al., ECCV 2020) at the strongest white-box L-inf
            eps of ``attacks`` is added to the attacks; the report flags likely gradient masking
            when it lowers Dice more than the best white-box attack at that eps (a ``square``
            entry of ``attacks`` at a white-box eps is checked the same way without this option).
        figures: write PNG figures (Dice versus budget, triplanar panels).
        figure_cases: number of cases that get a triplanar panel.
        defense: input-transform defence in front of the model and the adaptive attack against
            it (:class:`DefenseConfig`); ``None``: the bare model.
        goal: the clinical goal of every attack, by class name (targeted organ removal or
            relabelling, a perturbation mask; :class:`~volattack.evaluation.goal_config.GoalConfig`);
            ``None``: untargeted, everywhere. Needs ``threat_model: volume``.
        nsd_tolerance_mm: the tolerance of the normalised surface Dice columns, in mm.
        space: ``"model"`` (default; the published protocols): the perturbation is on the
            preprocessed model input, budgets in model-input units; ``"source"``: on the scan's own
            grid in its own units (``eps: 8`` is 8 HU), through the model's differentiable deployed
            pipeline, the adversarial scan written with the source's shape, affine and dtype and
            scored as read back from disk (:mod:`volattack.evaluation.source_passes`).
        source_bounds: ``[lo, hi]`` in source units the adversarial scan may take (``space: source``;
            default: the clean scan's own ``[min, max]``, within its stored type's range).
        trigger: backdoor evaluation: one row per case with the trigger added, scored against the
            target map (:class:`~volattack.threats.config.TriggerEvalConfig`; the row pass
            :mod:`volattack.evaluation.rows.backdoor`), or ``None``.
    """

    checkpoint: Optional[str] = None
    surrogate_checkpoint: Optional[str] = None
    model_options: dict[str, Any] = field(default_factory=dict)
    split: Optional[str] = None
    max_cases: Optional[int] = None
    attacks: list[AttackSpec] = field(default_factory=list)
    fooling_threshold: float = 0.5
    threat_model: str = "volume"
    patch_size: Optional[list[int]] = None
    patch_overlap: float = 0.0
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    save_adv: bool = False
    save_pred: bool = False
    sanity_checks: bool = True
    sanity_unbounded_steps: int = 10
    sanity_blackbox_queries: int = 0
    figures: bool = True
    figure_cases: int = 1
    device: str = "auto"
    space: str = "model"
    source_bounds: Optional[list[float]] = None
    defense: Optional[DefenseConfig] = None
    certify: Optional[CertifyConfig] = None
    corruptions: Optional[CorruptionConfig] = None
    match: Optional[MatchConfig] = None
    goal: Optional[GoalConfig] = None
    nsd_tolerance_mm: float = 2.0
    trigger: Optional[TriggerEvalConfig] = None

    def __post_init__(self) -> None:
        if self.model_options is None:
            self.model_options = {}
        if not isinstance(self.model_options, dict) or not all(isinstance(k, str) for k in self.model_options):
            raise ValueError(f"model_options must be a mapping of option names to values, got {self.model_options!r}.")
        if isinstance(self.defense, dict):
            self.defense = DefenseConfig(**self.defense)
        if isinstance(self.certify, dict):
            self.certify = CertifyConfig(**self.certify)
        if isinstance(self.corruptions, dict):
            self.corruptions = CorruptionConfig(**self.corruptions)
        if isinstance(self.match, dict):
            self.match = MatchConfig(**self.match)
        if self.defense is not None and not isinstance(self.defense, DefenseConfig):
            raise ValueError(f"defense must be a DefenseConfig, a mapping or None, got {self.defense!r}.")
        if isinstance(self.goal, dict):
            self.goal = GoalConfig(**self.goal)
        if isinstance(self.trigger, dict):
            self.trigger = TriggerEvalConfig(**self.trigger)
        if self.goal is not None and self.threat_model != "volume":
            raise ValueError(f"goal needs threat_model 'volume' (the patch protocol attacks tiles without the "
                             f"goal's target map and mask), got threat_model={self.threat_model!r}.")
        if self.goal is not None and self.goal.target is not None and self.sanity_blackbox_queries > 0:
            raise ValueError("sanity_blackbox_queries > 0 adds the untargeted square attack, which a targeted goal "
                             f"cannot use; set sanity_blackbox_queries: 0 (got {self.sanity_blackbox_queries}).")
        if not (isinstance(self.nsd_tolerance_mm, (int, float)) and 0 <= self.nsd_tolerance_mm < float("inf")):
            raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0 (mm), got {self.nsd_tolerance_mm!r}.")
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {self.threat_model!r}.")
        if not (0 <= self.patch_overlap < 1):
            raise ValueError(f"patch_overlap must be in [0, 1), got {self.patch_overlap}.")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be 3 positive integers, got {self.patch_size}.")
        if self.sanity_blackbox_queries < 0:
            raise ValueError(f"sanity_blackbox_queries must be >= 0, got {self.sanity_blackbox_queries}.")
        if self.sanity_unbounded_steps < 0:
            raise ValueError(f"sanity_unbounded_steps must be >= 0, got {self.sanity_unbounded_steps}.")
        if self.figure_cases < 0:
            raise ValueError(f"figure_cases must be >= 0, got {self.figure_cases}.")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}.")
        if not (0 < self.fooling_threshold <= 1):
            raise ValueError(f"fooling_threshold must be in (0, 1], got {self.fooling_threshold}.")
        if not (0 <= self.sw_overlap < 1):
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap}.")
        if self.max_cases is not None and self.max_cases < 1:
            raise ValueError(f"max_cases must be >= 1, got {self.max_cases}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}.")
        _check_space(self)
