"""VAFT: the frequency-consistency loss and the full training objective of frequency-domain
adversarial training (Hanif et al., "Frequency Domain Adversarial Training for Robust
Volumetric Medical Segmentation", MICCAI 2023).

The paper trains with

    min_theta  L_dice(M(X), Y) + L_dice(M(X'), Y) + L_fr,
    L_fr = || D(M(X)) - D(M(X')) ||_1,

where X' is the VAFA adversarial example of X (regenerated every batch with the model in
eval mode), M(.) are the logits and D is the 3D DCT. The published code divides L_fr by
``sum |D(M(X))|`` and uses Dice-CE for both segmentation terms; all weights are 1.

- :func:`frequency_consistency_loss` computes L_fr per sample (paper sum, or the published
  normalised form, or a per-element mean), on the whole volume or blockwise.
- :class:`VAFTLoss` adds the two segmentation terms (MONAI ``DiceLoss`` / ``DiceCELoss``) and
  returns the total with a dict of detached terms for logging.
- :func:`vaft_objective` runs the model on the clean and adversarial batch and applies a
  :class:`VAFTLoss` (the one call a training loop needs once it has X').

The DCT is the orthonormal DCT-II of :mod:`volattack.attacks.spectral` (``dct3``,
``block_split``): a precomputed matrix applied with einsum, no Python loops over blocks.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import nn

from volattack.checks import check_block_size, check_choice, check_number
from volattack.ops import first_head
from volattack.attacks.spectral import block_split, dct3

logger = logging.getLogger(__name__)

#: reductions accepted by :func:`frequency_consistency_loss`
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
#: L1 aggregations accepted by :func:`frequency_consistency_loss`
L1_MODES: tuple[str, ...] = ("sum", "mean")
#: segmentation losses accepted by :class:`VAFTLoss`
SEG_LOSSES: tuple[str, ...] = ("dice", "dice_ce")




def logits_dct(logits: torch.Tensor, block_size: Optional[int] = None) -> torch.Tensor:
    """Orthonormal 3D DCT-II of each logit channel, whole volume or blockwise.

    With ``block_size=None`` the DCT runs over the whole ``(H, W, D)`` volume of each channel.
    With ``block_size=b`` the volume is cut into non-overlapping ``b^3`` cubes
    (:func:`~volattack.attacks.spectral.block_split`; sides that are not multiples of b are
    replicate-padded at their far end, so the repeated border voxels also enter the result)
    and each cube is transformed on its own.

    Args:
        logits: ``(B, K, H, W, D)`` float logits.
        block_size: cube side b in voxels, or None for the whole volume.

    Shape:
        ``(B, K, H, W, D)`` -> ``(B, K, H, W, D)`` (whole volume) or
        ``(B, K, nH, nW, nD, b, b, b)`` (blockwise).
    """
    block_size = check_block_size(block_size)
    if block_size is None:
        return dct3(logits)
    return dct3(block_split(logits, block_size))


def _check_logits(name: str, t: Any) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.ndim != 5:
        raise ValueError(f"{name} must be 5-D logits (B, K, H, W, D), got shape {tuple(t.shape)}.")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {t.dtype}.")
    return t


def frequency_consistency_loss(
    logits_clean: torch.Tensor,
    logits_adv: torch.Tensor,
    *,
    normalized: bool = False,
    block_size: Optional[int] = None,
    reduction: str = "mean",
    l1: str = "sum",
    eps: float = 1e-8,
) -> torch.Tensor:
    """VAFT frequency-consistency loss ``L_fr`` (Hanif et al., MICCAI 2023).

    Per sample b, with D the orthonormal 3D DCT of every logit channel (:func:`logits_dct`):

    - paper form (``normalized=False``, ``l1="sum"``, the default):
      ``L_fr[b] = sum_{k, p, q, r} | D(M(X))[b, k, p, q, r] - D(M(X'))[b, k, p, q, r] |``,
      i.e. the L1 norm **summed** over all K channels and all DCT coefficients (all blocks when
      ``block_size`` is set). It grows with the volume size and the number of classes.
    - published-code form (``normalized=True``): the same sum divided, **per sample**, by
      ``sum_{k, p, q, r} |D(M(X))[b, k, p, q, r]|`` (clamped below by ``eps``), a scale-free
      relative spectral error. The denominator is not detached (gradients flow through it to
      the clean logits, as in the code).
    - ``l1="mean"`` divides the (possibly normalised) sum by the number of coefficients per
      sample, ``K * H * W * D`` (``K * nH * nW * nD * b^3`` blockwise), to put the unnormalised
      loss on a per-voxel scale. With ``normalized=True`` this only rescales by a constant.

    The DCT is linear, so ``D(M(X)) - D(M(X')) = D(M(X) - M(X'))`` is computed with one
    transform. The loss is 0 exactly when the logits are equal; gradients flow to both
    ``logits_clean`` and ``logits_adv``. Computed in float32 or wider.

    Hand check: for ``(1, 1, 2, 2, 2)`` logits differing by a constant c, only the DC
    coefficient ``8c / sqrt(8) = c * sqrt(8)`` is non-zero, so ``L_fr = |c| * sqrt(8)``.

    Args:
        logits_clean: M(X), ``(B, K, H, W, D)``.
        logits_adv: M(X'), same shape.
        normalized: divide by ``sum |D(M(X))|`` per sample (published code).
        block_size: None (DCT of the whole volume, default) or a cube side b for the blockwise
            DCT used by VAFA (8 in the paper's attack).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for ``(B,)``.
        l1: ``"sum"`` (paper) or ``"mean"`` over the coefficients of a sample.
        eps: lower clamp of the normaliser, > 0.

    Returns:
        A scalar (``"mean"``/``"sum"``) or ``(B,)`` (``"none"``) tensor.

    Shape:
        logits ``(B, K, H, W, D)`` twice -> ``()`` or ``(B,)``.
    """
    _check_logits("logits_clean", logits_clean)
    _check_logits("logits_adv", logits_adv)
    if logits_clean.shape != logits_adv.shape:
        raise ValueError(
            f"logits_adv must have the shape of logits_clean {tuple(logits_clean.shape)}, "
            f"got {tuple(logits_adv.shape)}."
        )
    if not isinstance(normalized, bool):
        raise ValueError(f"normalized must be True or False, got {normalized!r}.")
    block_size = check_block_size(block_size)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("l1", l1, L1_MODES)
    check_number("eps", eps, low=0, low_open=True)

    wd = torch.promote_types(torch.promote_types(logits_clean.dtype, logits_adv.dtype), torch.float32)
    clean = logits_clean.to(wd)
    diff = clean - logits_adv.to(wd)
    coeff_diff = logits_dct(diff, block_size).flatten(1)
    per_sample = coeff_diff.abs().sum(dim=1)
    if normalized:
        denom = logits_dct(clean, block_size).flatten(1).abs().sum(dim=1)
        per_sample = per_sample / denom.clamp_min(eps)
    if l1 == "mean":
        per_sample = per_sample / coeff_diff.shape[1]
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


class VAFTLoss(nn.Module):
    """The VAFT training objective (Hanif et al., MICCAI 2023)::

        total = dice_weight * L_seg(M(X), Y) + adv_weight * L_seg(M(X'), Y) + fr_weight * L_fr

    ``L_seg`` is MONAI ``DiceLoss`` (``seg_loss="dice"``, the paper's L_dice) or ``DiceCELoss``
    (``"dice_ce"``, the published code), both with ``to_onehot_y=True, softmax=True`` and the
    background channel included (MONAI's defaults, as in volattack's training), averaged over
    the batch and classes. ``L_fr`` is :func:`frequency_consistency_loss` with
    ``normalized``, ``block_size`` and ``l1`` (reduction ``"mean"`` over the batch).

    Scale: the paper form of ``L_fr`` (``normalized=False``, ``l1="sum"``) is a sum over all
    ``K * H * W * D`` coefficients and dwarfs the Dice terms on real volumes; the published code
    uses ``normalized=True``. ``l1="mean"`` is the per-coefficient alternative.

    Args:
        dice_weight: weight of the clean segmentation term, >= 0.
        adv_weight: weight of the adversarial segmentation term, >= 0.
        fr_weight: weight of ``L_fr``, >= 0 (0 gives plain adversarial training on X and X').
        normalized: published-code normalisation of ``L_fr`` (see above).
        seg_loss: ``"dice"`` (paper) or ``"dice_ce"`` (published code).
        block_size: None (whole-volume DCT) or the cube side of a blockwise DCT.
        l1: ``"sum"`` (paper) or ``"mean"``; see :func:`frequency_consistency_loss`.

    Shape:
        logits_clean, logits_adv ``(B, K, H, W, D)``; labels ``(B, 1, H, W, D)`` integer class
        indices -> total ``()``.

    Returns (forward):
        ``(total, terms)`` with ``terms`` = ``{"seg_clean", "seg_adv", "fr", "total"}`` as
        Python floats (detached, unweighted except ``total``) for logging.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        adv_weight: float = 1.0,
        fr_weight: float = 1.0,
        normalized: bool = False,
        *,
        seg_loss: str = "dice",
        block_size: Optional[int] = None,
        l1: str = "sum",
    ) -> None:
        super().__init__()
        check_number("dice_weight", dice_weight, low=0)
        check_number("adv_weight", adv_weight, low=0)
        check_number("fr_weight", fr_weight, low=0)
        if not isinstance(normalized, bool):
            raise ValueError(f"normalized must be True or False, got {normalized!r}.")
        self.seg_loss_name = check_choice("seg_loss", seg_loss, SEG_LOSSES)
        self.block_size = check_block_size(block_size)
        self.l1 = check_choice("l1", l1, L1_MODES)
        self.dice_weight = float(dice_weight)
        self.adv_weight = float(adv_weight)
        self.fr_weight = float(fr_weight)
        self.normalized = normalized
        from monai.losses import DiceCELoss, DiceLoss

        if seg_loss == "dice":
            self.seg_loss: nn.Module = DiceLoss(to_onehot_y=True, softmax=True)
        else:
            self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def extra_repr(self) -> str:
        return (
            f"dice_weight={self.dice_weight}, adv_weight={self.adv_weight}, fr_weight={self.fr_weight}, "
            f"normalized={self.normalized}, seg_loss={self.seg_loss_name!r}, block_size={self.block_size}, "
            f"l1={self.l1!r}"
        )

    def forward(
        self, logits_clean: torch.Tensor, logits_adv: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total VAFT loss and its terms.

        Args:
            logits_clean: M(X), ``(B, K, H, W, D)``.
            logits_adv: M(X'), same shape.
            labels: Y, ``(B, 1, H, W, D)`` (or ``(B, H, W, D)``) integer class indices in ``[0, K)``.

        Returns:
            ``(total, terms)``: the differentiable scalar total and a dict of detached floats
            ``seg_clean``, ``seg_adv``, ``fr`` (unweighted) and ``total``.

        Shape:
            see the class docstring.
        """
        _check_logits("logits_clean", logits_clean)
        _check_logits("logits_adv", logits_adv)
        if not torch.is_tensor(labels):
            raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
        if labels.ndim == logits_clean.ndim - 1:
            labels = labels.unsqueeze(1)
        want = (logits_clean.shape[0], 1) + tuple(logits_clean.shape[2:])
        if tuple(labels.shape) != want:
            raise ValueError(f"labels must have shape {want} to match the logits, got {tuple(labels.shape)}.")
        seg_clean = self.seg_loss(logits_clean.float(), labels)
        seg_adv = self.seg_loss(logits_adv.float(), labels)
        fr = frequency_consistency_loss(
            logits_clean, logits_adv, normalized=self.normalized, block_size=self.block_size,
            reduction="mean", l1=self.l1,
        )
        total = self.dice_weight * seg_clean + self.adv_weight * seg_adv + self.fr_weight * fr
        terms = {
            "seg_clean": float(seg_clean.detach()),
            "seg_adv": float(seg_adv.detach()),
            "fr": float(fr.detach()),
            "total": float(total.detach()),
        }
        return total, terms


def vaft_objective(
    model: nn.Module,
    loss: VAFTLoss,
    images: torch.Tensor,
    adv_images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One VAFT training objective: ``loss(model(X), model(X'), Y)``.

    The two batches are run through ``model`` separately (not concatenated), so BatchNorm
    statistics in train mode see clean and adversarial batches apart, as two forward passes
    of the published training loop do. ``X'`` should come from an attack run in eval mode
    (``Attack.__call__`` does that and restores the training mode); it is detached here.
    Deep-supervision models returning a tuple/list use the first head.

    Args:
        model: the segmenter being trained (its mode is left as is).
        loss: a :class:`VAFTLoss`.
        images: X, ``(B, C, H, W, D)``.
        adv_images: X', same shape as ``images``.
        labels: Y, ``(B, 1, H, W, D)`` integer class indices.

    Returns:
        ``(total, terms)`` as :meth:`VAFTLoss.forward`.

    Shape:
        images, adv_images ``(B, C, H, W, D)``; labels ``(B, 1, H, W, D)`` -> total ``()``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(loss, VAFTLoss):
        raise ValueError(f"loss must be a VAFTLoss, got {type(loss).__name__}.")
    if not (torch.is_tensor(images) and torch.is_tensor(adv_images)) or images.shape != adv_images.shape:
        raise ValueError(
            f"adv_images must be a tensor with the shape of images "
            f"{tuple(getattr(images, 'shape', ()))}, got {tuple(getattr(adv_images, 'shape', ()))}."
        )

    def run(x: torch.Tensor) -> torch.Tensor:
        return first_head(model(x))

    return loss(run(images), run(adv_images.detach()), labels)
