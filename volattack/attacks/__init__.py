"""Attacks: the contract (``base``), objectives, voxel-domain and frequency-domain attacks.

Importing this package registers every attack.
"""

from volattack.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    create_attack,
    eval_mode,
    list_attacks,
    register_attack,
)
from volattack.attacks import voxel  # noqa: F401  (registers gn, fgsm, bim, pgd, pgd_l2, segpgd, cospgd, apgd)

from volattack.attacks import frequency  # noqa: F401  (registers vafa, sa2, fft)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "create_attack",
    "eval_mode",
    "list_attacks",
    "register_attack",
]
