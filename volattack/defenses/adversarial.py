"""Adversarial training steps: PGD-AT (Madry et al., ICLR 2018), fast AT with FGSM and random start
(Wong et al., ICLR 2020), VAFA-AT and VAFT (Hanif et al., MICCAI 2023), SA2-AT, or any registered attack.

Per batch: the attack crafts adversarial copies of the first ``round(share * B)`` samples with the
model in eval mode (the attack contract restores the training mode and writes no parameter
gradient), then the loss is

    clean_weight * L_seg(M(X), Y) + adv_weight * L_seg(M(X'), Y') + fr_weight * L_fr(M(X), M(X'))

with L_seg MONAI's Dice-CE and L_fr VAFT's frequency-consistency loss
(:func:`volattack.defenses.vaft.frequency_consistency_loss`) between the clean and adversarial
logits of the attacked samples. When both ``clean_weight`` and ``fr_weight`` are 0 (PGD-AT and
fast AT by default) the clean forward pass is skipped, so an epoch costs the attack's steps plus
one training pass.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from volattack.defenses.config import AdversaryConfig

logger = logging.getLogger(__name__)

#: adversary names with a special meaning besides the registered attacks
SPECIAL = ("none", "fgsm_rs")


def build_adversary(cfg: AdversaryConfig, model: nn.Module, *, bounds=(0.0, 1.0), seed: int = 0) -> Optional[Any]:
    """The attack that makes training examples, or ``None`` for clean training.

    Raises:
        ValueError: unknown adversary name (with a suggestion) or invalid attack parameters
            (e.g. a negative eps), before any training starts.
    """
    import volattack
    from volattack.checks import parse_number
    from volattack.registry import suggest

    params = {k: parse_number(v, f"adversary.params.{k}") for k, v in cfg.params.items()}
    if cfg.name == "none":
        return None
    if cfg.name == "fgsm_rs":
        eps = params.pop("eps", 4 / 255)
        alpha = params.pop("alpha", 1.25 * eps)
        return volattack.create_attack("bim", model, eps=eps, alpha=alpha, steps=1, random_start=True,
                                       bounds=bounds, seed=seed, measure_ssim=False, **params)
    names = volattack.list_attacks()
    if cfg.name not in names:
        raise ValueError(
            f"Unknown adversary '{cfg.name}'.{suggest(cfg.name, list(SPECIAL) + names)} "
            f"Known: {', '.join(list(SPECIAL) + names)}."
        )
    return volattack.create_attack(cfg.name, model, bounds=bounds, seed=seed, measure_ssim=False, **params)


def adversarial_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: Optional[Any],
    cfg: AdversaryConfig,
    seg_loss: nn.Module,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch (see the module docstring).

    Args:
        model: the segmenter, in train mode.
        images: ``(B, C, H, W, D)``; labels ``(B, 1, H, W, D)``.
        attack: from :func:`build_adversary` (``None``: clean loss only).
        cfg: weights and share.
        seg_loss: e.g. ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``.
        seed: seed of this batch's attack call (vary it per step for fresh random starts).

    Returns:
        the loss (differentiable w.r.t. the parameters) and its terms as floats.
    """
    need_clean = attack is None or cfg.clean_weight > 0 or cfg.fr_weight > 0
    n = int(round(cfg.share * images.shape[0])) if attack is not None else 0
    terms: dict[str, float] = {}
    total = images.new_zeros(())
    logits = None
    if need_clean or n == 0:
        logits = model(images)
        clean = seg_loss(logits, labels)
        terms["clean"] = float(clean.detach())
        if attack is None:
            return clean, terms
        total = cfg.clean_weight * clean
    if n == 0:
        return total, terms
    x_adv = attack.run(images[:n].detach(), labels[:n], seed=seed).adv
    logits_adv = model(x_adv)
    adv = seg_loss(logits_adv, labels[:n])
    terms["adv"] = float(adv.detach())
    total = total + cfg.adv_weight * adv
    if cfg.fr_weight > 0 and logits is not None:
        from volattack.defenses.vaft import frequency_consistency_loss

        fr = frequency_consistency_loss(logits[:n], logits_adv, normalized=cfg.fr_normalized,
                                        block_size=cfg.fr_block_size)
        terms["fr"] = float(fr.detach())
        total = total + cfg.fr_weight * fr
    terms["total"] = float(total.detach())
    return total, terms
