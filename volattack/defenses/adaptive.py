"""Defended models and their adaptive evaluation: BPDA and EOT (Athalye, Carlini & Wagner,
"Obfuscated Gradients Give a False Sense of Security", ICML 2018).

- :class:`DefendedModel`: ``model(t_n(... t_1(x)))`` for registered input transforms
  (:mod:`volattack.defenses.transforms`);
- :class:`EOTModel`: Expectation over Transformation, the mean logits of ``samples`` draws of
  the randomised transforms in one forward pass (so the attack's gradient is the mean gradient);
- :func:`adaptive_wrapper`: the model an attack should use against a defended model (BPDA copies
  of the non-differentiable transforms, EOT over the randomised ones) and an
  :meth:`AdaptiveModel.describe` sentence naming the adaptive attack (for reports).

Randomness: only local ``torch.Generator`` objects (CPU, seeded explicitly), never the global RNG.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from volattack.checks import check_number
from volattack.defenses.transforms.base import check_bpda
from volattack.ops import first_head

logger = logging.getLogger(__name__)


class DefendedModel(nn.Module):
    """A segmenter behind input transforms: ``x -> model(t_n(... t_1(x)))``.

    Transforms with ``randomized = True`` receive the ``generator`` given to :meth:`forward`
    (None: their own). The transforms are active in eval mode too (a defence acts at test time).

    Args:
        model: ``nn.Module`` mapping images to logits.
        transforms: the transforms, applied first to last (an empty list is the bare model).

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """

    def __init__(self, model: nn.Module, transforms: Sequence[nn.Module]) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(transforms, nn.Module) or not isinstance(transforms, (list, tuple, nn.ModuleList)):
            raise ValueError(f"transforms must be a list of nn.Module, got {type(transforms).__name__}.")
        for i, t in enumerate(transforms):
            if not isinstance(t, nn.Module):
                raise ValueError(f"transforms[{i}] must be a torch.nn.Module, got {type(t).__name__}.")
        self.model = model
        self.transforms = nn.ModuleList(list(transforms))

    @property
    def randomized(self) -> bool:
        """True when any transform is randomised."""
        return any(getattr(t, "randomized", False) for t in self.transforms)

    def transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``t_n(... t_1(x))`` without the model.

        Shape:
            ``(B, C, H, W, D)`` -> same.
        """
        for t in self.transforms:
            x = t(x, generator=generator) if getattr(t, "randomized", False) else t(x)
        return x

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits of the defended model.

        Args:
            x: images ``(B, C, H, W, D)``.
            generator: CPU generator passed to the randomised transforms (None: their own).

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, K, H, W, D)``.
        """
        return self.model(self.transform(x, generator))

    def describe(self) -> str:
        """The pipeline, e.g. ``MedianFilter(kernel_size=3, bpda='none') -> model``."""
        names = [t.describe() if hasattr(t, "describe") else type(t).__name__ for t in self.transforms]
        return " -> ".join(names + ["model"])


class EOTModel(nn.Module):
    """Expectation over Transformation (Athalye et al., ICML 2018): mean logits over draws.

    ``forward(x) = (1 / S) * sum_{s=1..S} model(x, generator=g)`` where ``g`` is this module's
    CPU generator (seeded with ``seed``), so the S draws of one call are S consecutive draws of
    ``g`` (draw s of a call differs from draw s - 1; every sample of the batch shares draw s,
    see :class:`~volattack.defenses.transforms.noise.RandomNoise`), and the next call continues the stream with new draws. The
    gradient of the output is the mean of the per-draw gradients. :meth:`reset` re-seeds ``g``
    so an attack (a sequence of calls) replays bit for bit. Memory grows with ``samples``: the
    graphs of all draws are kept until the backward pass.

    ``model`` should be a :class:`DefendedModel` (it receives ``generator``); any other module
    is called as ``model(x)`` S times and its own randomness is used.

    Args:
        model: the (randomised) model.
        samples: number of draws S per forward pass, >= 1.
        seed: seed of the generator, >= 0.

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """

    def __init__(self, model: nn.Module, samples: int, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_number("samples", samples, low=1, integer=True)
        check_number("seed", seed, low=0, integer=True)
        self.model = model
        self.samples = int(samples)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def reset(self) -> None:
        """Re-seed the generator with ``seed`` (replay the same sequence of draws)."""
        self.generator.manual_seed(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the draws from ``seed`` (``manual_seed``; ``reset`` still returns to ``self.seed``)."""
        self.generator.manual_seed(int(seed))

    def __deepcopy__(self, memo: dict) -> "EOTModel":
        new = EOTModel(copy.deepcopy(self.model, memo), self.samples, self.seed)
        new.generator.set_state(self.generator.get_state())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean logits over ``samples`` draws.

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, K, H, W, D)``.
        """
        pass_gen = isinstance(self.model, DefendedModel)
        total: Optional[torch.Tensor] = None
        for _ in range(self.samples):
            out = first_head(self.model(x, generator=self.generator) if pass_gen else self.model(x))
            total = out if total is None else total + out
        assert total is not None
        return total / self.samples

    def describe(self) -> str:
        """``EOT over S draws (seed s)``."""
        return f"EOT over {self.samples} draw{'s' if self.samples != 1 else ''} (seed {self.seed})"


class AdaptiveModel(nn.Module):
    """The model an adaptive attack differentiates (built by :func:`adaptive_wrapper`).

    Args:
        model: the BPDA-configured :class:`DefendedModel`, possibly inside an :class:`EOTModel`.
        description: the sentence returned by :meth:`describe`.
        bpda: the BPDA mode used.
        eot_samples: draws per forward pass (1 without randomised transforms).

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """

    def __init__(self, model: nn.Module, description: str, bpda: str, eot_samples: int) -> None:
        super().__init__()
        self.model = model
        self.description = description
        self.bpda = bpda
        self.eot_samples = eot_samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (averaged over EOT draws when the defence is randomised).

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, K, H, W, D)``.
        """
        return first_head(self.model(x))

    def reset(self) -> None:
        """Replay the random draws from the start (EOT generator and transform generators)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset"):
                m.reset()

    def describe(self) -> str:
        """Which adaptive attack the wrapper implements (printed by reports)."""
        return self.description


def adaptive_wrapper(
    defended_model: DefendedModel,
    bpda: str = "identity",
    eot_samples: int = 1,
    *,
    seed: int = 0,
) -> AdaptiveModel:
    """The model an attack should use to evaluate ``defended_model`` adaptively.

    Every non-differentiable transform (``differentiable = False``: median, quantisation) is
    replaced by a copy with BPDA mode ``bpda`` (the original defended model is not modified;
    the segmenter itself is shared, not copied). When a transform is randomised the result is
    wrapped in :class:`EOTModel` with ``eot_samples`` draws seeded by ``seed``. ``bpda="none"``
    gives the non-adaptive baseline (plain autograd), to show how much the defence masks.

    Args:
        defended_model: a :class:`DefendedModel`.
        bpda: ``"identity"`` (default), ``"smooth"`` or ``"none"``.
        eot_samples: EOT draws per forward pass, >= 1 (a warning when > 1 without any
            randomised transform: the draws would all be equal, so no EOT is applied).
        seed: EOT generator seed, >= 0.

    Returns:
        An :class:`AdaptiveModel`; pass it as the ``model`` of ``volattack.create_attack`` and
        print its :meth:`~AdaptiveModel.describe` in the report.

    Shape:
        images ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)``.
    """
    if not isinstance(defended_model, DefendedModel):
        raise ValueError(f"defended_model must be a DefendedModel, got {type(defended_model).__name__}.")
    bpda = check_bpda(bpda)
    check_number("eot_samples", eot_samples, low=1, integer=True)
    check_number("seed", seed, low=0, integer=True)

    transforms: list[nn.Module] = []
    masked: list[str] = []
    exact: list[str] = []
    random_names: list[str] = []
    for t in defended_model.transforms:
        if not getattr(t, "differentiable", True) and hasattr(t, "with_bpda"):
            t = t.with_bpda(bpda)
            masked.append(t.describe())
        elif not getattr(t, "differentiable", True):
            masked.append(type(t).__name__)
        elif getattr(t, "randomized", False):
            random_names.append(_name(t))
        else:
            exact.append(_name(t))
        transforms.append(t)
    inner = DefendedModel(defended_model.model, transforms)
    parts = _gradient_parts(bpda, masked, exact)
    model: nn.Module = inner
    used_samples = 1
    if inner.randomized:
        model = EOTModel(inner, eot_samples, seed)
        used_samples = eot_samples
        parts.append(f"{model.describe()} of {', '.join(random_names) or 'the randomised transforms'}")
    elif eot_samples > 1:
        warnings.warn(
            f"eot_samples={eot_samples} has no effect: the defence has no randomised transform.", stacklevel=2
        )
    description = "Adaptive attack: " + "; ".join(parts) + "."
    logger.info(description)
    return AdaptiveModel(model, description, bpda, used_samples)


def _name(t: nn.Module) -> str:
    return t.describe() if hasattr(t, "describe") else type(t).__name__


def _gradient_parts(bpda: str, masked: list[str], exact: list[str]) -> list[str]:
    """The sentences of :meth:`AdaptiveModel.describe` on the backward pass (BPDA, exact gradients)."""
    parts: list[str] = []
    if masked:
        how = {
            "identity": "BPDA with an identity backward pass",
            "smooth": "BPDA with the gradient of a smooth approximation",
            "none": "no BPDA (plain autograd, a non-adaptive attack that the defence may mask)",
        }[bpda]
        parts.append(f"{how} through {', '.join(masked)}")
    else:
        parts.append("no BPDA needed (every transform is differentiable)")
    if exact:
        parts.append(f"exact gradients through {', '.join(exact)}")
    return parts


__all__ = ["AdaptiveModel", "DefendedModel", "EOTModel", "adaptive_wrapper"]
