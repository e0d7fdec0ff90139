"""The registry of input-transform defences, and a defence built from its configuration.

One decorator registers a transform class under the name that ``evaluate.defense.transforms[]``
uses::

    from volattack.defenses.registry import register_defense
    from volattack.defenses.transforms.base import InputTransform

    @register_defense("clip")
    class Clip(InputTransform):
        def __init__(self, lo: float = 0.0, hi: float = 1.0) -> None: ...
        def forward(self, x): ...

The class says whether it is randomised (``randomized``; then it overrides ``reseed(seed)``),
whether autograd through it is honest (``differentiable``; else it has a ``bpda`` mode) and how
it describes itself (``describe(with_bpda=...)``); :func:`build_defense`,
:func:`describe_defense` and :func:`reseed_defense` need nothing else. The built-in
transforms live in :mod:`volattack.defenses.transforms` (imported on first use, so importing
this module stays light).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Sequence

from volattack.registry import Registry, suggest

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from volattack.defenses.adaptive import DefendedModel
    from volattack.defenses.config import DefenseConfig

_DEFENSES: Registry[Any] = Registry("defense")

#: constructor arguments that a configuration may not set (``bpda`` comes from ``defense.bpda``)
RESERVED_PARAMS: tuple[str, ...] = ("bpda", "generator")


def register_defense(name: str) -> Callable[[type], type]:
    """Class decorator: register an :class:`~volattack.defenses.transforms.base.InputTransform`
    subclass as the defence ``name``.

    Raises:
        ValueError: ``name`` is not a non-empty identifier-like string, is taken by another class,
            the class is not an ``InputTransform``, or it is ``randomized`` without its own ``reseed``.
    """
    if not isinstance(name, str) or not name or not name.replace("_", "a").isalnum():
        raise ValueError(f"name must be a non-empty string of letters, digits and '_', got {name!r}.")

    def deco(cls: type) -> type:
        from volattack.defenses.transforms.base import InputTransform

        if not (isinstance(cls, type) and issubclass(cls, InputTransform)):
            raise ValueError(f"defense {name!r} must be an InputTransform subclass, got {cls!r}.")
        if cls.randomized and cls.reseed is InputTransform.reseed:
            raise ValueError(f"defense {name!r} ({cls.__name__}) is randomized but does not define reseed(seed).")
        _DEFENSES.register(name)(cls)
        cls.defense_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _builtins() -> None:
    import volattack.defenses.transforms  # noqa: F401  (registers the built-in transforms)


def list_defenses() -> list[str]:
    """Sorted names of the registered input-transform defences."""
    _builtins()
    return _DEFENSES.names()


def get_defense(name: str) -> type:
    """The transform class registered as ``name`` (unknown names raise with a suggestion)."""
    _builtins()
    return _DEFENSES.get(name)


def defense_parameters(cls: type) -> list[str]:
    """The constructor keywords a configuration may set (``bpda``/``generator`` excluded)."""
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and n not in RESERVED_PARAMS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def build_defense(model: "nn.Module", defense_cfg: "DefenseConfig") -> "DefendedModel":
    """The defended model of an ``evaluate.defense`` section: ``model(t_n(... t_1(x)))``.

    Transforms are built from ``defense_cfg.transforms`` (registered names, constructor keywords
    from ``params``) with their exact forward pass (``bpda="none"``); the adaptive attack's BPDA
    mode is applied by :func:`~volattack.defenses.adaptive.adaptive_wrapper`, not here.

    Args:
        model: segmenter mapping images to logits (shared, not copied).
        defense_cfg: a :class:`~volattack.defenses.config.DefenseConfig`.

    Returns:
        A :class:`~volattack.defenses.adaptive.DefendedModel`.

    Raises:
        ValueError: an unknown transform or parameter (with a suggestion), or a value the
            transform rejects; the message names ``transforms[i]`` and the transform.

    Shape:
        images ``(B, C, H, W, D)`` (input units) -> logits ``(B, K, H, W, D)``.
    """
    from volattack.defenses.adaptive import DefendedModel

    transforms = []
    for i, spec in enumerate(defense_cfg.transforms):
        try:
            cls = get_defense(spec.name)
        except ValueError as e:
            raise ValueError(f"transforms[{i}]: {e}") from e
        allowed = defense_parameters(cls)
        for key in spec.params:
            if key not in allowed:
                raise ValueError(
                    f"transforms[{i}] ({spec.name}): unknown parameter {key!r}.{suggest(str(key), allowed)} "
                    f"Valid parameters: {', '.join(allowed)}."
                )
        try:
            transforms.append(cls(**spec.params))
        except (ValueError, TypeError) as e:
            raise ValueError(f"transforms[{i}] ({spec.name}): {e}") from e
    return DefendedModel(model, transforms)


def describe_defense(defended: "DefendedModel") -> str:
    """One line naming the transforms of a defended model, without their BPDA modes (the
    defence's forward pass does not depend on them; the adaptive attack is described by
    ``AdaptiveModel.describe``).

    Returns:
        e.g. ``"DCTQuantization(block_size=8, q=10.0, growth=1.0, intensity_scale=255.0) -> model"``.
    """
    names = [t.describe(with_bpda=False) if _has_describe(t) else type(t).__name__ for t in defended.transforms]
    return " -> ".join(names + ["model"])


def _has_describe(t: Any) -> bool:
    try:
        return "with_bpda" in inspect.signature(t.describe).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def reseed_defense(defended: "DefendedModel", attacker_models: Sequence["nn.Module"], case_seed: int) -> None:
    """Reseed the randomised transforms and the EOT generators for one case (order-free replay).

    The defender's draws (scoring): every randomised transform ``m`` at position ``j`` of
    ``defended.modules()`` restarts from ``seed_from(case_seed, m.seed, j, 1)`` (``m.seed``: 0
    when the transform has none), an independent stream per transform that the attacker never
    sees, the same for the clean and the adversarial predictions of a case. The attacker's draws:
    every :class:`~volattack.defenses.adaptive.EOTModel` inside ``attacker_models`` restarts from
    ``case_seed`` (the seed the attacks use for the case).

    Args:
        defended: the defended model that is scored.
        attacker_models: the adaptive models the attacks differentiate (repeats are harmless).
        case_seed: the case's seed (run seed + case index).
    """
    from volattack.defenses.adaptive import EOTModel
    from volattack.defenses.transforms.base import InputTransform
    from volattack.ops import seed_from

    for j, m in enumerate(defended.modules()):
        if isinstance(m, InputTransform) and m.randomized:
            m.reseed(seed_from(case_seed, getattr(m, "seed", 0), j, 1))
    for root in attacker_models:
        for m in root.modules():
            if isinstance(m, EOTModel):
                m.reseed(case_seed)


__all__ = [
    "build_defense",
    "defense_parameters",
    "describe_defense",
    "get_defense",
    "list_defenses",
    "register_defense",
    "reseed_defense",
]
