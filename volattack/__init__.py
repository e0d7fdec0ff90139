"""volattack: adversarial attacks, defences and Dice-based robustness evaluation for 3D
medical segmentation models.

The public API is loaded lazily so that ``volattack --help`` starts without importing
torch or MONAI::

    import volattack
    volattack.list_attacks()
    model = volattack.create_model("unet", in_channels=1, out_channels=5)
    atk = volattack.create_attack("pgd", model, eps=4/255, alpha=1/255, steps=20, seed=0)
    adv = atk(images, labels)
    loaded = volattack.load_model("best.pt")  # checkpoint, TorchScript or MONAI bundle -> LoadedModel
"""

from __future__ import annotations

from volattack.registry import lazy_exports

__version__ = "0.2.0"

_LAZY = {
    "create_attack": "volattack.attacks",
    "list_attacks": "volattack.attacks",
    "Attack": "volattack.attacks",
    "AttackResult": "volattack.attacks",
    "eval_mode": "volattack.attacks",
    "register_attack": "volattack.attacks",
    "create_model": "volattack.models.zoo",
    "list_models": "volattack.models.zoo",
    "load_checkpoint": "volattack.models.checkpoint",
    "save_checkpoint": "volattack.models.checkpoint",
    "load_model": "volattack.models.sources",
    "LoadedModel": "volattack.models.sources",
    "evaluate": "volattack.evaluation.runner",
    "certify": "volattack.defenses.smoothing",
    "make_phantom_dataset": "volattack.data.phantoms",
    "generate_phantom": "volattack.data.phantoms",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
