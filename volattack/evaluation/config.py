"""Configuration of evaluation runs and of the whole pipeline (light: no torch/MONAI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from volattack.checks import parse_number
from volattack.registry import suggest

#: parameters whose values are intensity budgets (printed as ``k/255`` when they are multiples)
BUDGET_KEYS = ("eps", "alpha", "sigma")


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


@dataclass
class AttackSpec:
    """One attack and its parameters; ``sweep`` lists values of one or more parameters, each value
    giving one evaluated configuration (e.g. ``sweep: {eps: [2/255, 4/255, 8/255]}``).

    Numbers may be written as fractions (``"8/255"``). Parameters are validated by the attack.
    """

    name: str = "pgd"
    params: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        if not shown:
            return self.name
        inner = ", ".join(f"{k}={format_number(v, k)}" for k, v in shown.items())
        return f"{self.name}({inner})"

#: Input-transform defences accepted by ``evaluate.defense.transforms[].name`` (see
#: :mod:`volattack.defenses.input_transforms`): ``gaussian`` -> ``GaussianSmoothing``,
#: ``median`` -> ``MedianFilter``, ``dct_lowpass`` -> ``DCTLowPass``, ``dct_quant`` ->
#: ``DCTQuantization``, ``noise`` -> ``RandomNoise``.
DEFENSE_TRANSFORMS: tuple[str, ...] = ("gaussian", "median", "dct_lowpass", "dct_quant", "noise")

#: Backward passes of the adaptive attack through non-differentiable transforms (the BPDA modes
#: of ``volattack.defenses.input_transforms``, repeated here to keep this module free of torch).
DEFENSE_BPDA: tuple[str, ...] = ("none", "identity", "smooth")

#: Keys of a transform's ``params`` that are set elsewhere (``bpda`` by ``defense.bpda``).
_RESERVED_TRANSFORM_PARAMS = ("bpda", "generator")


@dataclass
class TransformSpec:
    """One input transform of a defence: ``{name: dct_quant, params: {q: 10, block_size: 8}}``.

    Attributes:
        name: one of :data:`DEFENSE_TRANSFORMS`.
        params: keyword arguments of the transform's constructor (numbers may be fractions such
            as ``"2/255"``); they are validated by the constructor when the pipeline starts
            (before any data work). ``gaussian``: ``sigma`` (voxels), ``truncated``; ``median``:
            ``kernel_size`` (odd, voxels); ``dct_lowpass``: ``block_size``, ``keep``;
            ``dct_quant``: ``block_size``, ``q``, ``growth``, ``intensity_scale``,
            ``soft_round_a``; ``noise``: ``sigma`` (input units), ``seed``.

    Raises:
        ValueError: unknown ``name`` (with a suggestion), ``params`` not a mapping, or a
            ``bpda``/``generator`` entry in ``params``.
    """

    name: str = "gaussian"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in DEFENSE_TRANSFORMS:
            raise ValueError(
                f"name must be one of {', '.join(DEFENSE_TRANSFORMS)}, got {self.name!r}."
                f"{suggest(str(self.name), DEFENSE_TRANSFORMS)}"
            )
        if not isinstance(self.params, dict):
            raise ValueError(f"params of transform {self.name!r} must be a mapping, got {self.params!r}.")
        for k in _RESERVED_TRANSFORM_PARAMS:
            if k in self.params:
                hint = " set evaluate.defense.bpda instead" if k == "bpda" else " it is not configurable"
                raise ValueError(
                    f"params.{k} of transform {self.name!r} is not allowed ({k}={self.params[k]!r}):{hint}."
                )
        self.params = {k: parse_number(v, f"params.{k}") for k, v in self.params.items()}

    def label(self) -> str:
        """Short label, e.g. ``dct_quant(q=10, block_size=8)``."""
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{k}={format_number(v, k)}' for k, v in self.params.items())})"


@dataclass
class DefenseConfig:
    """The ``evaluate.defense`` section: input transforms in front of the model, and the adaptive attack.

    The evaluated model becomes ``model(t_n(... t_1(x)))`` (``DefendedModel``): its clean Dice
    is the report's clean row, and every attack is scored on it. The attacks differentiate the
    adaptive model of ``adaptive_wrapper`` (Athalye, Carlini & Wagner, "Obfuscated Gradients
    Give a False Sense of Security", ICML 2018): BPDA through the non-differentiable transforms
    (``median``, ``dct_quant``) and EOT over the randomised ones (``noise``).

    Attributes:
        transforms: the transforms, applied first to last (at least one).
        bpda: backward pass through the non-differentiable transforms: ``"identity"``
            (straight-through, the default), ``"smooth"`` (gradient of a smooth approximation)
            or ``"none"`` (plain autograd: a non-adaptive attack that the defence may mask,
            shown by the zero-gradient sanity check).
        eot_samples: draws averaged per forward pass when a transform is randomised (>= 1);
            ignored (with a warning) otherwise.

    Raises:
        ValueError: empty ``transforms``, unknown ``bpda`` (with a suggestion) or
            ``eot_samples`` not an integer >= 1.
    """

    transforms: list[TransformSpec] = field(default_factory=list)
    bpda: str = "identity"
    eot_samples: int = 1

    def __post_init__(self) -> None:
        self.transforms = [TransformSpec(**t) if isinstance(t, dict) else t for t in self.transforms]
        if not self.transforms:
            raise ValueError(
                "transforms must list at least one transform (or remove the defense section), got []."
            )
        for i, t in enumerate(self.transforms):
            if not isinstance(t, TransformSpec):
                raise ValueError(f"transforms[{i}] must be a TransformSpec or a mapping, got {t!r}.")
        if not isinstance(self.bpda, str) or self.bpda not in DEFENSE_BPDA:
            raise ValueError(
                f"bpda must be one of {', '.join(DEFENSE_BPDA)}, got {self.bpda!r}."
                f"{suggest(str(self.bpda), DEFENSE_BPDA)}"
            )
        n = self.eot_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"eot_samples must be an integer >= 1, got {n!r}.")


THREAT_MODELS = ("volume", "patch")


@dataclass
class EvalConfig:
    """What to evaluate: the attacks, the split, sliding-window inference, outputs.

    Attributes:
        checkpoint: the target model (volattack checkpoint; TorchScript or MONAI bundle, see
            ``volattack.models.external``).
        surrogate_checkpoint: if set, attacks are crafted on this model and evaluated on the
            target (transfer); ``None`` attacks the target itself (white box).
        threat_model: ``"volume"``: the attack runs end to end through the same sliding-window
            inference that scores it (exact gradient); ``"patch"``: the published protocol, the
            volume is cut into tiles of ``patch_size`` (overlap ``patch_overlap``), each tile is
            attacked through the bare model, and the perturbations are stitched (averaged where
            tiles overlap) before sliding-window scoring.
        sanity_checks: gradient-masking checks in every report (Dice non-increasing with the
            budget, unbounded PGD, attacks versus noise, zero-gradient fraction).
        sanity_unbounded_steps: steps of the unbounded PGD check (0 skips that check).
        figures: write PNG figures (Dice versus budget, triplanar panels).
        figure_cases: number of cases that get a triplanar panel.
        defense: input-transform defence in front of the model and the adaptive attack against
            it (:class:`DefenseConfig`); ``None``: the bare model.
    """

    checkpoint: Optional[str] = None
    surrogate_checkpoint: Optional[str] = None
    split: str = "test"
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
    figures: bool = True
    figure_cases: int = 1
    device: str = "auto"
    defense: Optional[DefenseConfig] = None

    def __post_init__(self) -> None:
        if isinstance(self.defense, dict):
            self.defense = DefenseConfig(**self.defense)
        if self.defense is not None and not isinstance(self.defense, DefenseConfig):
            raise ValueError(f"defense must be a DefenseConfig, a mapping or None, got {self.defense!r}.")
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {self.threat_model!r}.")
        if not (0 <= self.patch_overlap < 1):
            raise ValueError(f"patch_overlap must be in [0, 1), got {self.patch_overlap}.")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be 3 positive integers, got {self.patch_size}.")
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
