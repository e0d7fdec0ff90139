"""Configuration of adversarial training (:class:`AdversaryConfig`) and of input-transform
defences (:class:`TransformSpec`, :class:`DefenseConfig`); light: no torch/MONAI import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class AdversaryConfig:
    """The ``train.adversary`` section: which attack makes the training examples and how they count.

    Attributes:
        name: ``"none"`` (clean training), ``"pgd"``, ``"fgsm_rs"`` (FGSM with random start and step
            1.25 eps: fast adversarial training, Wong et al. 2020), ``"vafa"``, ``"sa2"``, or any
            registered attack name.
        params: keyword arguments of the attack (``eps``, ``steps``, ``q_max`` ...; fractions like
            ``"4/255"`` are accepted).
        share: fraction of each batch (first samples) that also gets an adversarial copy, in [0, 1].
        clean_weight: weight of the segmentation loss on the clean batch. ``None`` (default) follows
            the published recipes: 0 for an adversary with ``fr_weight`` 0 and ``share`` 1 (PGD-AT, Madry et al.
            2018, and fast AT, Wong et al. 2020, train on the adversarial examples only, so an epoch
            costs ``steps + 1`` passes), otherwise 1 (VAFT keeps ``L_dice(M(X), Y)``; with a partial
            share the clean term is what makes the unattacked samples count). Resolved to a number
            when the config is built, so saved configs show the value used.
        adv_weight: weight of the segmentation loss on the adversarial samples.
        fr_weight: weight of VAFT's frequency-consistency loss between clean and adversarial logits
            (0 turns it off; 1 with ``name: vafa`` is VAFT).
        fr_normalized: the published code's form of L_fr (divided by sum |DCT(M(X))|); False is the
            paper's plain L1 sum.
        fr_block_size: blockwise DCT of the logits for L_fr (None: whole volume).
    """

    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    share: float = 1.0
    clean_weight: Optional[float] = None
    adv_weight: float = 1.0
    fr_weight: float = 0.0
    fr_normalized: bool = True
    fr_block_size: Optional[int] = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.share <= 1.0):
            raise ValueError(f"adversary.share must be in [0, 1], got {self.share}.")
        if self.clean_weight is None:
            adv_only = self.name != "none" and self.fr_weight == 0 and self.share == 1
            self.clean_weight = 0.0 if adv_only else 1.0
        for k in ("clean_weight", "adv_weight", "fr_weight"):
            v = getattr(self, k)
            if v < 0:
                raise ValueError(f"adversary.{k} must be >= 0, got {v}.")
        if self.name != "none" and self.clean_weight == 0 and self.adv_weight == 0:
            raise ValueError("adversary: clean_weight and adv_weight cannot both be 0.")


# ---------------------------------------------------------------------- input-transform defences

#: Backward passes of the adaptive attack through non-differentiable transforms (the BPDA modes
#: of :mod:`volattack.defenses.transforms`, which take them from here).
DEFENSE_BPDA: tuple[str, ...] = ("none", "identity", "smooth")


def __getattr__(name: str) -> Any:
    if name == "DEFENSE_TRANSFORMS":  # the registered names (imports the transforms, hence torch)
        from volattack.defenses.registry import list_defenses

        return tuple(list_defenses())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _short(v: Any) -> str:
    """A parameter value for labels: multiples of 1/255 as ``k/255``, other floats with 4 digits."""
    if isinstance(v, float):
        k = v * 255
        return f"{int(round(k))}/255" if v != 0 and abs(k - round(k)) < 1e-6 else f"{v:.4g}"
    return str(v)


@dataclass
class TransformSpec:
    """One input transform of a defence: ``{name: dct_quant, params: {q: 10, block_size: 8}}``.

    Attributes:
        name: a registered defence (``volattack.defenses.registry.list_defenses()``: ``gaussian``,
            ``median``, ``dct_lowpass``, ``dct_quant``, ``noise`` and any ``@register_defense``).
        params: keyword arguments of the transform's constructor (numbers may be fractions such
            as ``"2/255"``); they are validated by the constructor when the pipeline starts
            (before any data work). ``gaussian``: ``sigma`` (voxels), ``truncated``; ``median``:
            ``kernel_size`` (odd, voxels); ``dct_lowpass``: ``block_size``, ``keep``;
            ``dct_quant``: ``block_size``, ``q``, ``growth``, ``intensity_scale``,
            ``soft_round_a``; ``noise``: ``sigma`` (input units), ``seed``.

    The name is checked against the registry, imported on first use (this imports torch; the
    command line's ``--help`` builds no config).

    Raises:
        ValueError: unknown ``name`` (with a suggestion), ``params`` not a mapping, or a
            ``bpda``/``generator`` entry in ``params``.
    """

    name: str = "gaussian"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from volattack.checks import check_choice, parse_number
        from volattack.defenses.registry import RESERVED_PARAMS, list_defenses

        check_choice("name", self.name, list_defenses())
        if not isinstance(self.params, dict):
            raise ValueError(f"params of transform {self.name!r} must be a mapping, got {self.params!r}.")
        for k in RESERVED_PARAMS:
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
        return f"{self.name}({', '.join(f'{k}={_short(v)}' for k, v in self.params.items())})"


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
        from volattack.checks import check_choice

        self.transforms = [TransformSpec(**t) if isinstance(t, dict) else t for t in self.transforms]
        if not self.transforms:
            raise ValueError(
                "transforms must list at least one transform (or remove the defense section), got []."
            )
        for i, t in enumerate(self.transforms):
            if not isinstance(t, TransformSpec):
                raise ValueError(f"transforms[{i}] must be a TransformSpec or a mapping, got {t!r}.")
        check_choice("bpda", self.bpda, DEFENSE_BPDA)
        n = self.eot_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"eot_samples must be an integer >= 1, got {n!r}.")
