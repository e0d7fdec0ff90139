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

try:  # frequency-domain attacks (vafa, sa2, fft)
    from volattack.attacks import frequency  # noqa: F401
except ImportError as _e:  # pragma: no cover - only while the module is being written
    if "volattack.attacks.frequency" not in str(_e) and "frequency" not in str(_e):
        raise

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "create_attack",
    "eval_mode",
    "list_attacks",
    "register_attack",
]
