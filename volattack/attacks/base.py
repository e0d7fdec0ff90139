"""The attack contract: ``Attack``, ``AttackResult``, ``eval_mode`` and the attack registry.

Every attack in volattack is a subclass of :class:`Attack` registered with
:func:`register_attack`. The base class owns everything the contract promises, so
subclasses only implement :meth:`Attack._attack`:

- inputs are validated (rank, finite values, label shape and range, target and mask
  shapes) with ``ValueError`` naming the parameter and the value;
- the model runs in eval mode and each submodule's mode is restored afterwards,
  also when the attack raises; gradients are taken with ``torch.autograd.grad``
  with respect to the perturbation only, so no parameter ``.grad`` is written;
- inputs are never modified in place; the result is detached and keeps shape,
  dtype and device;
- every random draw of sample b comes from its own generator seeded with
  ``volattack.ops.seed_from(seed, sample_ids[b])``
  (:class:`~volattack.attacks.streams.RandomStreams`), so a seeded call replays bit for bit
  on CPU, a batch equals its samples attacked alone with their ids, and two samples of one
  batch never share a random start;
- ``restarts`` (attacks that draw random numbers) keep the per-sample best result by the
  attack's objective; options an attack cannot honour (``early_stop`` on an attack without
  it, restarts of a deterministic attack) are rejected when it is constructed, with the
  reason;
- the result is checked against the bounds (and the budget, for attacks that
  have one) and its measured budget (:func:`volattack.measure.perturbation_stats`: L-inf, L2,
  RMS in input units and in source units such as HU, PSNR, the one 3D SSIM) is reported per
  sample in ``AttackResult.info``.

Adding an attack is one decorated subclass implementing :meth:`Attack._attack`; the
contract test (``tests/attacks/test_contract.py``) covers it through the registry.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from volattack.attacks.inputs import check_images, check_labels, check_mask, parse_amp_dtype
from volattack.attacks.box_objective import boxed_objective, constant_outside
from volattack.attacks.objectives import objective_per_sample
from volattack.attacks.streams import RandomStreams, check_sample_ids
from volattack.checks import check_number
from volattack.inference.sliding import WindowedInferer
from volattack.measure import perturbation_stats
from volattack.ops import first_head, per_sample_view
from volattack.registry import Registry

logger = logging.getLogger(__name__)

ATTACKS: Registry["Attack"] = Registry("attack")

TargetSpec = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


def register_attack(name: str) -> Callable[[type], type]:
    """Class decorator registering an :class:`Attack` subclass under ``name`` (sets ``cls.name``)."""

    return ATTACKS.register_class(name)


def list_attacks() -> list[str]:
    """Sorted names of all registered attacks."""
    return ATTACKS.names()


def create_attack(name: str, model: nn.Module, **kwargs: Any) -> "Attack":
    """Build the attack registered as ``name`` on ``model``.

    Args:
        name: a name from :func:`list_attacks` (unknown names raise with a suggestion).
        model: any ``nn.Module`` mapping images ``(B, C, *spatial)`` to logits ``(B, K, *spatial)``.
        **kwargs: the attack's budget and options (``eps``, ``alpha``, ``steps``, ``seed``,
            ``bounds``, ``objective`` ...); invalid values raise ``ValueError`` naming them.
    """
    return ATTACKS.create(name, model, **kwargs)


@dataclass
class AttackResult:
    """Output of :meth:`Attack.run`.

    Attributes:
        adv: adversarial images, same shape/dtype/device as the input, detached.
        info: measured budget and bookkeeping. Per-sample lists of floats, exactly
            :func:`volattack.measure.perturbation_stats` of (input, result): ``linf``, ``l2``
            and ``rms`` (input units), ``linf_units`` and ``rms_units`` (source units such as
            HU, when ``unit_scale`` was given), ``psnr`` (dB), ``ssim`` (the one 3D SSIM);
            ``sample_ids`` (list of ints); scalars: ``steps_run``, ``restarts``, ``seconds``,
            ``seed``, ``attack``, ``targeted``; attack-specific extras (e.g. VAFA's ``q_mean``).
    """

    adv: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode; restore each one's mode on exit (also on error)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a subclass ``__init__`` so that :meth:`Attack.check_options` runs once, after the
    outermost constructor of the instance has finished (so every subclass attribute is set)."""

    @functools.wraps(init)
    def __init__(self: "Attack", *args: Any, **kwargs: Any) -> None:
        outer = not self.__dict__.get("_constructing", False)
        self.__dict__["_constructing"] = True
        try:
            init(self, *args, **kwargs)
        finally:
            if outer:
                del self.__dict__["_constructing"]
        if outer:
            self.check_options()

    return __init__


class Attack:
    """Base class of all attacks (see the module docstring for the contract).

    Args:
        model: ``nn.Module`` mapping images ``(B, C, *spatial)`` to logits ``(B, K, *spatial)``.
        bounds: ``(lo, hi)`` valid input range; adversarial images are clamped into it.
        seed: base seed of the per-sample random streams (recorded in ``info["seed"]``).
        targeted: minimise the objective toward ``target_labels`` instead of maximising it.
        target_labels: target label map ``(B, 1, *spatial)`` or a function ``labels -> target``
            (e.g. relabel organ k as background); may also be given per call to :meth:`run`.
        mask: optional perturbation mask broadcastable to the images, nonzero where the
            perturbation may act (e.g. an organ's neighbourhood); may also be given per call.
        inferer: optional callable ``inferer(images, model) -> logits`` (e.g. MONAI's
            ``SlidingWindowInferer``) used instead of ``model(images)`` for whole volumes.
        spatial_dims: number of spatial dimensions (3 for volumes); images must have
            ``2 + spatial_dims`` dimensions.
        unit_scale: source units per input unit (e.g. 425 HU per unit for the HU window
            [-175, 250] mapped to [0, 1]); enables ``linf_units``/``rms_units`` in ``info``.
        amp_dtype: run the model under ``torch.autocast`` with this dtype (``torch.float16``,
            ``torch.bfloat16`` or the strings ``"float16"``/``"bfloat16"``); losses are float32.
        measure_ssim: compute the 3D SSIM between input and result for ``info``.
        restarts: number of runs with independent random draws (>= 1); the per-sample best
            (highest untargeted / lowest targeted objective at the last step) is kept. Only for
            attacks that draw random numbers (:attr:`is_random`); each extra restart costs the
            attack again plus one forward.
        early_stop: if set (in [0, 1]), a sample stops once its foreground Dice is <= this
            value (targeted: its Dice to the target is >= 1 - this value). Only for attacks
            with :attr:`supports_early_stop`; costs one host sync per step.

    Shape:
        images ``(B, C, *spatial)`` float, labels ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer.
    """

    name: ClassVar[str] = "attack"
    #: attacks with an L-inf budget ``eps`` are checked against it after the attack
    linf_budget: ClassVar[bool] = False
    #: whether the attack honours ``early_stop``
    supports_early_stop: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _checked_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(
        self,
        model: nn.Module,
        *,
        bounds: Sequence[float] = (0.0, 1.0),
        seed: int = 0,
        targeted: bool = False,
        target_labels: TargetSpec = None,
        mask: Optional[torch.Tensor] = None,
        inferer: Optional[Callable[[torch.Tensor, nn.Module], torch.Tensor]] = None,
        spatial_dims: int = 3,
        unit_scale: Optional[float] = None,
        amp_dtype: Union[torch.dtype, str, None] = None,
        measure_ssim: bool = True,
        restarts: int = 1,
        early_stop: Optional[float] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ValueError(f"bounds must be a pair (lo, hi), got {bounds!r}.") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite with lo < hi, got {tuple(bounds)!r}.")
        check_number("seed", seed, low=0, integer=True)
        check_number("spatial_dims", spatial_dims, low=1, integer=True)
        check_number("restarts", restarts, low=1, integer=True)
        if early_stop is not None:
            check_number("early_stop", early_stop, low=0, high=1)
        if unit_scale is not None:
            check_number("unit_scale", unit_scale, low=0, low_open=True)
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted must be True or False, got {targeted!r}.")
        if target_labels is not None and not (callable(target_labels) or torch.is_tensor(target_labels)):
            raise ValueError(
                f"target_labels must be a tensor or a function of the labels, got {type(target_labels).__name__}."
            )
        if mask is not None and not torch.is_tensor(mask):
            raise ValueError(f"mask must be a tensor, got {type(mask).__name__}.")
        self.model = model
        self.bounds = (lo, hi)
        self.seed = seed
        self.targeted = targeted
        self.target_labels = target_labels
        self.mask = mask
        if inferer is not None and type(inferer).__name__ == "SlidingWindowInferer":
            # MONAI's inferer keeps every window's activations for the backward pass; the
            # equivalent WindowedInferer gives the same output and exact input gradient window
            # by window, so memory does not grow with the number of windows.
            try:
                inferer = WindowedInferer.from_monai(inferer)
            except ValueError as e:
                logger.warning("keeping MONAI's full-graph sliding-window inferer: %s", e)
        self.inferer = inferer
        self.spatial_dims = spatial_dims
        self.unit_scale = unit_scale
        self.amp_dtype = parse_amp_dtype(amp_dtype)
        self.measure_ssim = measure_ssim
        self.restarts = int(restarts)
        self.early_stop = None if early_stop is None else float(early_stop)

    # ---------------------------------------------------------- option checks
    @property
    def is_random(self) -> bool:
        """Whether a call draws random numbers (then its result depends on ``seed`` and
        ``sample_ids``); subclasses with random starts or noise override it."""
        return False

    def restart_problem(self) -> Optional[str]:
        """Why ``restarts > 1`` cannot help this attack (None if it can)."""
        if not self.is_random:
            return (
                f"{self.name} draws no random numbers with these options, so every restart would give the "
                "same result"
            )
        return None

    def check_options(self) -> None:
        """Reject option combinations the attack cannot honour (runs after construction).

        Raises:
            ValueError: ``restarts > 1`` on an attack without random draws, or ``early_stop`` on
                an attack that does not support it, with the reason.
        """
        if self.restarts > 1:
            why = self.restart_problem()
            if why:
                raise ValueError(f"restarts={self.restarts} is not supported: {why}; use restarts=1.")
        if self.early_stop is not None and not self.supports_early_stop:
            raise ValueError(
                f"early_stop={self.early_stop} is not supported by {self.name}: {self.early_stop_problem()}."
            )

    def early_stop_problem(self) -> str:
        """Why this attack has no ``early_stop`` (used in the error message)."""
        return "it has no step loop to stop"

    # ------------------------------------------------------------------ public API
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Adversarial images for ``images`` (see :meth:`run`)."""
        return self.run(images, labels, **kwargs).adv

    def run(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        target_labels: TargetSpec = None,
        mask: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        sample_ids: Optional[Sequence[int]] = None,
    ) -> AttackResult:
        """Attack ``images`` whose ground truth is ``labels``.

        Args:
            images: ``(B, C, *spatial)`` float inside ``bounds``; not modified.
            labels: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer class indices in ``[0, K)``.
            target_labels: overrides the constructor's target (targeted attacks only).
            mask: overrides the constructor's perturbation mask.
            seed: overrides the constructor's seed for this call.
            sample_ids: B non-negative ints (default ``0 .. B-1``), e.g. the evaluation's case
                index or the training step's crop index: sample b draws from
                ``seed_from(seed, sample_ids[b])``, so its result does not depend on its batch.

        Returns:
            :class:`AttackResult` with the adversarial images and the measured budget.
        """
        x = self._check_images(images)
        y = self._check_labels(labels, x)
        target = self._target(target_labels, y, x)
        m = self._check_mask(mask if mask is not None else self.mask, x)
        seed = self.seed if seed is None else seed
        check_number("seed", seed, low=0, integer=True)
        ids = check_sample_ids(sample_ids, x.shape[0])
        t0 = time.perf_counter()
        with eval_mode(self.model):
            adv, extra = self._attack_restarts(x, y, target, m, RandomStreams(seed, ids))
        adv = adv.detach()
        if adv.shape != images.shape or adv.dtype != images.dtype or adv.device != images.device:
            raise RuntimeError(f"{self.name}: result does not match the input's shape/dtype/device.")
        seconds = time.perf_counter() - t0
        info = self.measure(images, adv)
        info.update(extra)
        info.update(attack=self.name, seed=seed, seconds=seconds, targeted=self.targeted, sample_ids=list(ids))
        self._check_result(images, adv)
        return AttackResult(adv=adv, info=info)

    def config(self) -> dict[str, Any]:
        """The attack's parameters as plain values (for results files)."""
        out: dict[str, Any] = {"name": self.name}
        for k, v in vars(self).items():
            if k in ("model", "inferer", "mask", "target_labels"):
                continue
            if isinstance(v, (int, float, str, bool, type(None))):
                out[k] = v
            elif isinstance(v, tuple) and all(isinstance(e, (int, float)) for e in v):
                out[k] = list(v)
            elif isinstance(v, torch.dtype):
                out[k] = str(v)
        return out

    # ------------------------------------------------------------ for subclasses
    def _attack(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        target: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        rng: RandomStreams,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return (adversarial images, extra info) of one run. ``x`` must not be modified; every
        random draw comes from ``rng`` (per sample, e.g. :meth:`sample_noise`).

        Shape:
            x ``(B, C, *spatial)``; y and target ``(B, 1, *spatial)`` long; mask broadcastable to x or None.
        """
        raise NotImplementedError

    def gain(self, logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], step: int) -> torch.Tensor:
        """The attack's per-sample objective (``self.objective`` at 1-based ``step`` of ``self.steps``)
        oriented for ascent: the objective against ``y``, or minus it against ``target`` when targeted.

        Shape:
            logits ``(B, K, *spatial)`` -> ``(B,)``.
        """
        steps = max(int(getattr(self, "steps", 1)), 1)
        outside = constant_outside(self.model, self.objective, self.inferer, logits)
        if outside is not None:  # the same objective, computed on the box the output varies in
            value = boxed_objective(logits, y if target is None else target, self.objective, *outside)
            return value if target is None else -value
        if target is None:
            return objective_per_sample(logits, y, self.objective, step=step, steps=steps)
        return -objective_per_sample(logits, target, self.objective, step=step, steps=steps, targeted=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model (through ``inferer`` when set), float32, under autocast if asked."""
        ctx = (
            torch.autocast(device_type=x.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            out = self.inferer(x, self.model) if self.inferer is not None else self.model(x)
        return first_head(out).float()

    def sample_noise(self, x: torch.Tensor, rng: RandomStreams, kind: str = "uniform") -> torch.Tensor:
        """Per-sample noise shaped like ``x`` (``"uniform"`` in [-1, 1) or ``"normal"``): sample b's
        draw comes from its own stream (see :class:`~volattack.attacks.streams.RandomStreams`).

        Shape:
            x ``(B, ...)`` -> same, on x's device and dtype.
        """
        return rng.noise(x, kind)

    def clamp_to_bounds(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp into ``bounds``."""
        return x.clamp(self.bounds[0], self.bounds[1])

    # --------------------------------------------------------------- restarts
    def _attack_restarts(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        target: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        rng: RandomStreams,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`_attack` once, or ``restarts`` times with independent streams keeping, per sample,
        the result with the highest :meth:`gain` at the last step (ties keep the earlier restart).
        Per-sample list extras are taken from each sample's winning restart; ``steps_run`` is the
        maximum; ``restart_best`` holds each sample's winning restart index."""
        if self.restarts == 1:
            adv, extra = self._attack(x, y, target, mask, rng)
            return adv, {"steps_run": 0, **extra, "restarts": 1}
        best_adv, best, extras, winner = None, None, [], None
        for r in range(self.restarts):
            adv, extra = self._attack(x, y, target, mask, rng.for_restart(r))
            extras.append(extra)
            with torch.no_grad():
                score = self.gain(self.forward(adv), y, target, max(int(getattr(self, "steps", 1)), 1))
            if best_adv is None:
                best_adv, best, winner = adv, score, torch.zeros_like(score, dtype=torch.long)
                continue
            better = score > best
            best_adv = torch.where(per_sample_view(better, x), adv, best_adv)
            best = torch.where(better, score, best)
            winner = torch.where(better, torch.full_like(winner, r), winner)
        return best_adv, _merge_restart_info(extras, winner.tolist(), x.shape[0])

    # ----------------------------------------------------------------- checks
    def _target(self, target_labels: TargetSpec, y: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
        spec = target_labels if target_labels is not None else self.target_labels
        if self.targeted and spec is None:
            raise ValueError("targeted=True needs target_labels (a label map or a function of the labels).")
        if not self.targeted and target_labels is not None:
            raise ValueError("target_labels were given but targeted=False; pass targeted=True.")
        if not self.targeted:
            return None
        return self._check_labels(spec(y) if callable(spec) else spec, x, name="target_labels")

    def _check_images(self, images: Any) -> torch.Tensor:
        return check_images(images, spatial_dims=self.spatial_dims, bounds=self.bounds)

    def _check_labels(self, labels: Any, x: torch.Tensor, name: str = "labels") -> torch.Tensor:
        return check_labels(labels, x, name=name)

    def _check_mask(self, mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        return check_mask(mask, x)

    def check_num_classes(self, logits: torch.Tensor, *label_maps: Optional[torch.Tensor]) -> None:
        """Raise if a label map holds a class index >= the number of logit channels."""
        k = logits.shape[1]
        for lab, name in zip(label_maps, ("labels", "target_labels")):
            if lab is not None and bool((lab >= k).any()):
                raise ValueError(
                    f"{name} must be < the model's {k} output classes, got maximum {int(lab.max())}."
                )

    def _check_result(self, x: torch.Tensor, adv: torch.Tensor) -> None:
        lo, hi = self.bounds
        tol = 1e-5 * max(1.0, hi - lo)
        if bool((adv < lo - tol).any()) or bool((adv > hi + tol).any()):
            raise RuntimeError(f"{self.name}: result leaves bounds {self.bounds}.")
        eps = getattr(self, "eps", None)
        if self.linf_budget and eps is not None:
            d = (adv.float() - x.float()).abs().amax()
            if float(d) > eps * (1 + 1e-4) + 1e-6:
                raise RuntimeError(f"{self.name}: L-inf {float(d):.6g} exceeds eps {eps:.6g}.")

    # --------------------------------------------------------------- measuring
    def measure(self, x: torch.Tensor, adv: torch.Tensor) -> dict[str, Any]:
        """Measured budget per sample: :func:`volattack.measure.perturbation_stats` of ``(x, adv)``
        with ``data_range=bounds`` and ``unit_scale`` (``ssim`` only with ``measure_ssim`` and 2 or 3
        spatial dims), as lists, so the evaluation reads these numbers instead of recomputing them.

        Shape:
            x, adv ``(B, C, *spatial)``; each value in the dict is a list of B floats.
        """
        with_ssim = self.measure_ssim and x.ndim in (4, 5)
        stats = perturbation_stats(x, adv, data_range=self.bounds, unit_scale=self.unit_scale, with_ssim=with_ssim)
        return {k: v.tolist() for k, v in stats.items()}


def _merge_restart_info(extras: list[dict[str, Any]], winner: list[int], batch: int) -> dict[str, Any]:
    """Info of a restarted call: per-sample lists (length ``batch``) from each sample's winning
    restart, ``steps_run`` the maximum over restarts, other values from the last restart."""
    out: dict[str, Any] = dict(extras[-1])
    for key, value in extras[-1].items():
        if isinstance(value, list) and len(value) == batch:
            out[key] = [extras[w][key][b] for b, w in enumerate(winner)]
    out["steps_run"] = max(int(e.get("steps_run") or 0) for e in extras)
    out.update(restarts=len(extras), restart_best=winner)
    return out
