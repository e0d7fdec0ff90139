"""The hybrid defence: adversarial training through an input sanitiser.

The deployed system is ``model(t_n(... t_1(x)))`` (an ``evaluate.defense`` input-transform
defence). Training it with ``train.adversary`` *and* ``train.defense`` (the same
:class:`~volattack.defenses.config.DefenseConfig` as ``evaluate.defense``) crafts every training
example against the whole system, adaptively (BPDA through the non-differentiable transforms, EOT
over the randomised ones: Athalye, Carlini & Wagner, ICML 2018), and scores the model on the
sanitised adversarial example ``model(t(x'))``; the clean term, when weighted, also sees
``t(x)``. Adversarial training of the model behind a fixed pre-processing stage is PGD-AT
(Madry et al., ICLR 2018) of the composed map. Without ``train.defense`` the model is
adversarially trained on raw inputs and only put behind the sanitiser at evaluation (the
weaker, non-adaptive form of the hybrid).

Randomness: a randomised transform (``noise``) draws from its own generator, restarted every
training step from ``seed_from(step_seed, its seed, position, 1)``
(:func:`~volattack.defenses.registry.reseed_defense`), and the adversary's EOT generator from
the step seed, so a resumed run replays the same draws.
"""

from __future__ import annotations

import logging
from torch import nn

from volattack.defenses.adaptive import AdaptiveModel, DefendedModel, adaptive_wrapper
from volattack.defenses.config import DefenseConfig
from volattack.defenses.registry import build_defense, describe_defense, reseed_defense

logger = logging.getLogger(__name__)


class Sanitiser:
    """The input transforms of ``train.defense``, built once and shared by the training passes
    and the adversary.

    Args:
        cfg: a :class:`~volattack.defenses.config.DefenseConfig` (transforms, ``bpda``,
            ``eot_samples``).

    Raises:
        ValueError: ``cfg`` is not a ``DefenseConfig``, or a transform cannot be built (the
            message names ``train.defense.transforms[i]``).
    """

    def __init__(self, cfg: DefenseConfig) -> None:
        if not isinstance(cfg, DefenseConfig):
            raise ValueError(f"train.defense must be a DefenseConfig, got {type(cfg).__name__}.")
        try:
            self.transforms = list(build_defense(nn.Identity(), cfg).transforms)
        except ValueError as e:
            raise ValueError(f"train.defense.{e}") from e
        self.cfg = cfg
        self._attacker: list[nn.Module] = []

    def wrap(self, model: nn.Module, step_seed: int) -> DefendedModel:
        """``model`` behind the transforms, with the randomised draws restarted for this step.

        Args:
            model: the network being trained (or its DDP wrapper).
            step_seed: the training step's seed.

        Returns:
            A :class:`~volattack.defenses.adaptive.DefendedModel` sharing ``model`` and the
            transforms (exact forward pass).

        Shape:
            images ``(B, C, *spatial)`` -> logits ``(B, K, *spatial)``.
        """
        defended = DefendedModel(model, self.transforms)
        reseed_defense(defended, self._attacker, int(step_seed))
        return defended

    def attack_model(self, net: nn.Module, *, seed: int = 0) -> AdaptiveModel:
        """The model the training adversary differentiates: the adaptive wrapper of
        ``net`` behind the transforms (``cfg.bpda``, ``cfg.eot_samples``), as ``evaluate.defense``
        builds for the evaluation's attacks.

        Args:
            net: the unwrapped network being trained.
            seed: the EOT generator's seed (restarted from the step seed at every step).
        """
        adaptive = adaptive_wrapper(DefendedModel(net, self.transforms), self.cfg.bpda, self.cfg.eot_samples,
                                    seed=int(seed))
        self._attacker.append(adaptive)
        logger.info("Training behind %s; adversary: %s", self.describe(), adaptive.describe())
        return adaptive

    def describe(self) -> str:
        """The transforms, e.g. ``DCTQuantization(block_size=8, ...) -> model``."""
        return describe_defense(DefendedModel(nn.Identity(), self.transforms))

    def __repr__(self) -> str:
        return f"Sanitiser({self.describe()})"


__all__ = ["Sanitiser"]
