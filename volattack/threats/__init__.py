"""Threats beyond evasion: backdoor poisoning of segmenters (triggers in a registry, poisoned
training and fine-tuning, backdoor defences) and detection of adversarial volumes.

Modules:

- :mod:`~volattack.threats.config`: the ``train.poison`` and ``evaluate.trigger`` sections (light);
- :mod:`~volattack.threats.triggers`: the trigger registry (patch, spectral/FIBA, DCT band, learned);
- :mod:`~volattack.threats.joint_trigger`: ``dct_learned``, a block-DCT trigger optimised into the
  victim's training (``train.poison.joint``, LIRA's supply-chain setting);
- :mod:`~volattack.threats.poison`: target behaviours by class name, the choice of the poisoned
  cases and the poisoning of a training split;
- :mod:`~volattack.threats.backdoor`: attack success, spectral signatures and fine-pruning;
- :mod:`~volattack.threats.detectors` (with :mod:`~volattack.threats.detector_kinds`): detectors of
  adversarial volumes (a registry); :mod:`~volattack.threats.adaptive_detect`: adaptive attacks
  that keep a detector's score under its threshold.

Names are loaded lazily on first access, so importing this package stays light.
"""

from __future__ import annotations

from volattack.registry import lazy_exports

_LAZY = {
    "JointConfig": "volattack.threats.config",
    "PoisonConfig": "volattack.threats.config",
    "TriggerEvalConfig": "volattack.threats.config",
    "TriggerSpec": "volattack.threats.config",
    "TRIGGERS": "volattack.threats.triggers",
    "Trigger": "volattack.threats.triggers",
    "create_trigger": "volattack.threats.triggers",
    "list_triggers": "volattack.threats.triggers",
    "register_trigger": "volattack.threats.triggers",
    "JointPoisoning": "volattack.threats.joint_trigger",
    "LearnedDCTTrigger": "volattack.threats.joint_trigger",
    "Poisoner": "volattack.threats.poison",
    "choose_poisoned": "volattack.threats.poison",
    "poison_training_cases": "volattack.threats.poison",
    "resolve_target": "volattack.threats.poison",
    "target_map": "volattack.threats.poison",
    "FeatureHook": "volattack.threats.backdoor",
    "backdoor_scores": "volattack.threats.backdoor",
    "fine_prune": "volattack.threats.backdoor",
    "precision_recall": "volattack.threats.backdoor",
    "spectral_signature_scores": "volattack.threats.backdoor",
    "spectral_signatures": "volattack.threats.backdoor",
    "DETECTORS": "volattack.threats.detectors",
    "Detector": "volattack.threats.detectors",
    "auroc": "volattack.threats.detectors",
    "create_detector": "volattack.threats.detectors",
    "list_detectors": "volattack.threats.detectors",
    "register_detector": "volattack.threats.detectors",
    "tpr_at_fpr": "volattack.threats.detectors",
    "adaptive_attack": "volattack.threats.adaptive_detect",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
