"""Adaptive attacks against detectors (Carlini and Wagner, AISec 2017): any registered gradient
attack, given a fitted detector and a weight, lowers Dice while keeping the detector's score low.

The glue is a model wrapper plus a registered objective, so the attack layer knows nothing of
detectors:

- :class:`DetectorAware` wraps the whole-volume segmenter; its forward pass returns the logits
  and attaches to them the per-sample penalty ``w * relu(score(x) - target)``, with ``score`` the
  detector's (differentiable) score of the same input and ``target`` the detector's 5%-FPR
  threshold by default (or another level: the adaptive attack of the detection run aims at a
  quantile of the clean fitting scores, see ``quantile`` of :func:`score_target`);
- the objective ``"<base>+detector"`` (registered on first use through
  :func:`volattack.attacks.objectives.register_objective`) is the base objective of those logits
  minus the attached penalty (plus it, for a targeted attack, which descends its objective).

So the attack ascends ``seg_loss - w * relu(score - target)``: Dice falls while the score is
pushed under the target. A detector with ``differentiable = False`` enters through BPDA
(:func:`volattack.ops.straight_through`: its score forward, its surrogate's gradient backward).
Everything the attack contract promises (budget, bounds, input untouched, modes restored,
seeded replay) holds, since the attack itself is unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from volattack.attacks.base import Attack, create_attack
from volattack.attacks.objectives import OBJECTIVES, check_objective, objective_per_sample, register_objective
from volattack.checks import check_number
from volattack.ops import first_head, straight_through
from volattack.threats.detectors import Detector

logger = logging.getLogger(__name__)

#: the attribute of the logits that carries the detector penalty ``(B,)``
PENALTY_ATTR = "_volattack_detector_penalty"
#: suffix of the detector-aware objectives
SUFFIX = "+detector"


def score_target(detector: Detector, quantile: Optional[float] = None) -> float:
    """The score level the adaptive attack pushes under: the detector's 5%-FPR threshold
    (``quantile=None``), or the ``quantile`` of its standardised clean fitting scores (e.g. 0.5:
    the clean median, so that attacked scores end where clean ones are, not just under the
    threshold). The clean fitting scores are recomputed only for a quantile.

    Raises:
        ValueError: ``quantile`` outside [0, 1]. RuntimeError: the detector is not fitted.
    """
    if detector.threshold is None:
        raise RuntimeError(f"detector {detector.name} is not fitted: fit it before attacking it.")
    if quantile is None:
        return float(detector.threshold)
    check_number("quantile", quantile, low=0, high=1)
    scores = detector.fit_info.get("clean_scores")
    if scores is None:
        raise ValueError(f"detector {detector.name} kept no clean fitting scores; pass quantile=None.")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))


class DetectorAware(nn.Module):
    """The segmenter with the detector penalty attached to its logits (module docstring).

    Args:
        model: the whole-volume segmenter (e.g. :class:`~volattack.threats.detectors.WholeVolume`).
        detector: a fitted detector.
        weight: penalty weight w >= 0 (in objective units per standardised score unit).
        target: score level under which the score is not penalised (default: the threshold).

    Shape:
        ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)`` float32 with the penalty ``(B,)`` as
        attribute :data:`PENALTY_ATTR`.
    """

    def __init__(self, model: nn.Module, detector: Detector, weight: float, target: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(detector, Detector):
            raise ValueError(f"detector must be a fitted Detector, got {type(detector).__name__}.")
        check_number("weight", weight, low=0)
        self.model = model
        self.detector = detector
        self.detector_nets = nn.ModuleList(detector.modules())  # their modes follow the attack's
        self.weight = float(weight)
        self.target = score_target(detector) if target is None else float(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = first_head(self.model(x)).float()
        kw = {"logits": logits} if self.detector.uses_logits else {}
        s = self.detector.score(x, self.model, **kw)
        if not self.detector.differentiable:
            s = straight_through(s.detach(), self.detector.surrogate_score(x, self.model, **kw))
        setattr(logits, PENALTY_ATTR, self.weight * torch.relu(s - self.target))
        return logits

    def describe(self) -> str:
        """One sentence naming the adaptive attack (for reports)."""
        how = "exact gradients" if self.detector.differentiable else "BPDA through its surrogate"
        return (f"Adaptive attack against detector {self.detector.name}: objective minus "
                f"{self.weight:g} * relu(score - {self.target:.3g}), {how}.")


def _penalised(logits: torch.Tensor, labels: torch.Tensor, *, step: int = 1, steps: int = 1,
               targeted: bool = False, base: str) -> torch.Tensor:
    pen = getattr(logits, PENALTY_ATTR, None)
    if pen is None:
        raise ValueError(f"objective '{base}{SUFFIX}' needs the logits of a DetectorAware model "
                         "(volattack.threats.adaptive_detect.adaptive_attack builds one).")
    obj = objective_per_sample(logits, labels, base, step=step, steps=steps, targeted=targeted)
    return obj + pen if targeted else obj - pen


def detector_objective(base: str = "dice_ce") -> str:
    """The name of the detector-aware version of objective ``base``, registered on first use.

    Raises:
        ValueError: ``base`` is not a registered objective (with a suggestion).
    """
    if base.endswith(SUFFIX):
        base = base[: -len(SUFFIX)]
    check_objective(base)
    name = base + SUFFIX
    if name not in OBJECTIVES:
        register_objective(name)(functools.partial(_penalised, base=base))
    return name


def adaptive_attack(name: str, model: nn.Module, detector: Detector, weight: float, *,
                    objective: str = "dice_ce", target: Optional[float] = None, **kwargs: Any) -> Attack:
    """Attack ``name`` on ``model`` that also keeps ``detector``'s score under ``target``.

    Args:
        name: a registered attack with an ``objective`` (pgd, apgd, fgsm, vafa, ...).
        model: the whole-volume segmenter the detector was fitted with (no ``inferer``: put the
            sliding window inside, :class:`~volattack.threats.detectors.WholeVolume`).
        detector: the fitted detector.
        weight: penalty weight w >= 0 (0 gives the non-adaptive attack's steps).
        objective: the base objective.
        target: see :class:`DetectorAware`.
        **kwargs: the attack's budget and options (``eps``, ``steps``, ``seed``, ``bounds`` ...).

    Raises:
        ValueError: an ``inferer`` was given, or as :func:`volattack.create_attack`.
    """
    if kwargs.get("inferer") is not None:
        raise ValueError("inferer must be None for an adaptive attack: wrap it in the model "
                         "(WholeVolume(network, inferer)) so the detector sees whole volumes.")
    wrapped = DetectorAware(model, detector, weight, target)
    atk = create_attack(name, wrapped, objective=detector_objective(objective), **kwargs)
    logger.info(wrapped.describe())
    return atk


__all__ = ["DetectorAware", "PENALTY_ATTR", "adaptive_attack", "detector_objective", "score_target"]
