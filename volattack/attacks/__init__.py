"""Attacks: the contract (``base``), objectives (a registry), voxel-domain attacks (``voxel``,
``apgd``) and frequency-domain attacks (``vafa``, ``sa2``, ``fft`` on ``spectral_base``).

Importing this package registers every attack: every module of the package is imported here,
so a new attack is one new file with one ``@register_attack(name)`` class (and the contract
test covers it; README, "Contributing").
"""

from volattack.registry import import_submodules

from volattack.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    create_attack,
    eval_mode,
    list_attacks,
    register_attack,
)
from volattack.attacks.objectives import list_objectives, register_objective
from volattack.attacks.streams import RandomStreams

import_submodules(__name__, __path__)  # every file registers its extensions on import

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "RandomStreams",
    "create_attack",
    "eval_mode",
    "list_attacks",
    "list_objectives",
    "register_attack",
    "register_objective",
]
