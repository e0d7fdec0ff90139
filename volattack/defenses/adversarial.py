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

Mixed precision: the training forward passes run under ``amp_dtype`` autocast; the attack always
runs outside any autocast active in the caller, at the precision it was built with
(``build_adversary(..., amp_dtype=...)``). Under float16 the attack then scales its own loss, so
small input gradients do not underflow to zero steps (an outer float16 autocast would run the
attack's backward passes in float16 without that scaling).

Random starts: sample ``b`` of a batch is attacked with ``sample_ids[b]`` (the crop's index in the
epoch, :func:`volattack.training.step.crop_sample_ids`), so crops of a batch get different random
starts and noise, derived from the step's seed and the crop's index.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from volattack.defenses.config import AdversaryConfig

logger = logging.getLogger(__name__)

#: adversary names with a special meaning besides the registered attacks
SPECIAL = ("none", "fgsm_rs")


def build_adversary(
    cfg: AdversaryConfig,
    model: nn.Module,
    *,
    bounds: Sequence[float] = (0.0, 1.0),
    seed: int = 0,
    amp_dtype: Optional[Union[torch.dtype, str]] = None,
) -> Optional[Any]:
    """The attack that makes training examples, or ``None`` for clean training.

    Args:
        cfg: the ``train.adversary`` section.
        model: the unwrapped network being trained (not a DDP wrapper).
        bounds: ``(lo, hi)`` model-input range (``b_min``, ``b_max``).
        seed: the attack's default seed (training passes a seed per step).
        amp_dtype: the attack's own autocast dtype (float16 or bfloat16) under mixed-precision
            training; an ``amp_dtype`` in ``cfg.params`` takes precedence.

    Raises:
        ValueError: unknown adversary name (with a suggestion) or invalid attack parameters
            (e.g. a negative eps), before any training starts.
    """
    from volattack.attacks import create_attack, list_attacks
    from volattack.checks import parse_number
    from volattack.registry import suggest

    params = {k: parse_number(v, f"adversary.params.{k}") for k, v in cfg.params.items()}
    if cfg.name == "none":
        return None
    if amp_dtype is not None:
        params.setdefault("amp_dtype", amp_dtype)
    if cfg.name == "fgsm_rs":
        eps = params.pop("eps", 4 / 255)
        alpha = params.pop("alpha", 1.25 * eps)
        return create_attack("bim", model, eps=eps, alpha=alpha, steps=1, random_start=True,
                             bounds=bounds, seed=seed, measure_ssim=False, **params)
    names = list_attacks()
    if cfg.name not in names:
        raise ValueError(
            f"Unknown adversary '{cfg.name}'.{suggest(cfg.name, list(SPECIAL) + names)} "
            f"Known: {', '.join(list(SPECIAL) + names)}."
        )
    return create_attack(cfg.name, model, bounds=bounds, seed=seed, measure_ssim=False, **params)


def _accepts_sample_ids(attack: Any) -> bool:
    """Whether ``attack.run`` takes ``sample_ids`` (per-sample random draws)."""
    try:
        return "sample_ids" in inspect.signature(attack.run).parameters
    except (TypeError, ValueError):
        return False


def craft_adversarial(
    attack: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int,
    sample_ids: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Adversarial copies of ``images``, crafted outside any autocast active in the caller.

    Args:
        attack: a volattack attack (from :func:`build_adversary`).
        images: ``(n, C, H, W, D)``; labels ``(n, 1, H, W, D)``.
        seed: seed of this call.
        sample_ids: one non-negative id per sample (its random draws come from the seed and
            the id), passed when the attack supports them.

    Returns:
        The detached adversarial images, same shape and dtype as ``images``.

    Raises:
        ValueError: ``sample_ids`` not of length ``n``.
    """
    kwargs: dict[str, Any] = {"seed": seed}
    if sample_ids is not None:
        ids = [int(i) for i in sample_ids]
        if len(ids) != images.shape[0]:
            raise ValueError(f"sample_ids must hold one id per sample ({images.shape[0]}), got {len(ids)}.")
        if _accepts_sample_ids(attack):
            kwargs["sample_ids"] = ids
    with torch.autocast(images.device.type, enabled=False):
        return attack.run(images.detach(), labels, **kwargs).adv


def _autocast(device_type: str, amp_dtype: Optional[torch.dtype]) -> Any:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype)


def adversarial_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: Optional[Any],
    cfg: AdversaryConfig,
    seg_loss: nn.Module,
    *,
    seed: int = 0,
    sample_ids: Optional[Sequence[int]] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch (see the module docstring).

    Args:
        model: the segmenter, in train mode.
        images: ``(B, C, H, W, D)``; labels ``(B, 1, H, W, D)``.
        attack: from :func:`build_adversary` (``None``: clean loss only).
        cfg: weights and share.
        seg_loss: e.g. ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``.
        seed: seed of this batch's attack call (vary it per step for fresh random starts).
        sample_ids: ``B`` non-negative ids, one per sample (default ``range(B)`` in the attack):
            the attacked samples ``b < n`` draw their random start from ``(seed, sample_ids[b])``.
        amp_dtype: autocast dtype of the training forward passes (None: full precision). The
            attack never runs under it (see the module docstring).

    Returns:
        the loss (differentiable w.r.t. the parameters) and its terms as floats.

    Raises:
        ValueError: ``sample_ids`` not of length ``B``.
    """
    if sample_ids is not None and len(sample_ids) != images.shape[0]:
        raise ValueError(f"sample_ids must hold one id per sample ({images.shape[0]}), got {len(sample_ids)}.")
    amp = _autocast(images.device.type, amp_dtype)
    need_clean = attack is None or cfg.clean_weight > 0 or cfg.fr_weight > 0
    n = int(round(cfg.share * images.shape[0])) if attack is not None else 0
    terms: dict[str, float] = {}
    total = images.new_zeros(())
    logits = None
    if need_clean or n == 0:
        with amp:
            logits = model(images)
            clean = seg_loss(logits, labels)
        terms["clean"] = float(clean.detach())
        if attack is None:
            return clean, terms
        total = cfg.clean_weight * clean
    if n == 0:
        return total, terms
    x_adv = craft_adversarial(attack, images[:n], labels[:n], seed=seed,
                              sample_ids=list(sample_ids)[:n] if sample_ids is not None else None)
    with amp:
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
