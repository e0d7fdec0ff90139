"""Configuration of adversarial training (:class:`AdversaryConfig`), of input-transform
defences (:class:`TransformSpec`, :class:`DefenseConfig`) and of certification by randomized
smoothing (:class:`CertifyConfig`); light: no torch/MONAI import."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union


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


# ---------------------------------------------------------------------- certification

#: how an abstained voxel enters the certified Dice (see ``volattack.defenses.smoothing.certified_dice``)
ABSTAIN_RULES: tuple[str, ...] = ("miss", "worst")


def check_certify_params(sigma: Any, n0: Any, n: Any, alpha: Any, tau: Any, batch: Any = 1,
                         prefix: str = "") -> None:
    """Check the parameters of randomized-smoothing certification (SegCertify, Fischer, Baader &
    Vechev, ICML 2021) before any work: ``sigma > 0`` (input units), ``n0, n >= 1`` noise samples,
    ``alpha`` in (0, 1) (family-wise error rate), ``tau`` in (0.5, 1) (the probability a class must
    exceed; the radius ``sigma * Phi^-1(tau)`` is positive only above 0.5), ``batch >= 1``.

    Args:
        sigma, n0, n, alpha, tau, batch: as in ``volattack.certify``.
        prefix: prepended to the parameter names in the messages (``"certify."`` for the config).

    Raises:
        ValueError: naming the parameter and the bad value, e.g. ``"tau must be in (0.5, 1), got 1.0."``.
    """
    def real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not real(sigma) or sigma <= 0:
        raise ValueError(f"{prefix}sigma must be a number > 0 (noise std in input units), got {sigma!r}.")
    for name, v in (("n0", n0), ("n", n), ("batch", batch)):
        if not count(v):
            raise ValueError(f"{prefix}{name} must be an integer >= 1, got {v!r}.")
    if not real(alpha) or not 0 < alpha < 1:
        raise ValueError(f"{prefix}alpha must be in (0, 1), got {alpha!r}.")
    if not real(tau) or not 0.5 < tau < 1:
        raise ValueError(f"{prefix}tau must be in (0.5, 1), got {tau!r}.")


@dataclass
class CertifyConfig:
    """The ``evaluate.certify`` section: certified Dice by randomized smoothing (SegCertify,
    Fischer, Baader & Vechev, ICML 2021), one row ``certified(sigma=s)`` per case and noise level.

    Attributes:
        sigma: noise standard deviation(s) in model-input units (one number or a list; fractions
            such as ``"8/255"`` accepted), each > 0; every value gives one row.
        n0: noise samples that select each voxel's class (>= 1).
        n: further samples that estimate its probability (>= 1); a case costs ``n0 + n``
            sliding-window passes per sigma.
        alpha: family-wise error rate of the Holm-corrected binomial tests over the voxels, in (0, 1).
        tau: probability threshold in (0.5, 1); the certified L2 radius is ``sigma * Phi^-1(tau)``.
        batch: noisy copies per inference call (>= 1; memory grows with it).
        abstain: how abstained voxels enter the certified Dice: ``"miss"`` (a false negative of
            their true class) or ``"worst"`` (also a false positive of every other foreground class:
            a lower bound on the Dice of any labelling of them).

    Raises:
        ValueError: a bad value, naming ``certify.<field>`` and the value.
    """

    sigma: Union[float, list[float]] = field(default_factory=lambda: [0.06, 0.12, 0.25])
    n0: int = 100
    n: int = 1000
    alpha: float = 1e-4
    tau: float = 0.75
    batch: int = 8
    abstain: str = "miss"

    def __post_init__(self) -> None:
        from volattack.checks import check_choice, parse_number

        sig = self.sigma if isinstance(self.sigma, (list, tuple)) else [self.sigma]
        sig = [parse_number(s, "certify.sigma") for s in sig]
        if not sig:
            raise ValueError("certify.sigma must list at least one noise level, got [].")
        if len(set(sig)) != len(sig):
            raise ValueError(f"certify.sigma must not repeat a value, got {sig!r}.")
        for s in sig:
            check_certify_params(s, self.n0, self.n, self.alpha, self.tau, self.batch, prefix="certify.")
        self.sigma = [float(s) for s in sig]
        check_choice("certify.abstain", self.abstain, ABSTAIN_RULES)
