"""One pass of optimisation steps over a loader: :func:`train_epoch` (the loop body of
:func:`volattack.training.train`, also under DDP; benchmarks time it directly)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from volattack.defenses.config import AdversaryConfig
from volattack.training.data import as_tensor

#: the attack call of step ``it`` of an epoch with base seed ``s`` uses seed ``s * STEP_SEED_STRIDE + it``
STEP_SEED_STRIDE = 100_003

#: third entry of ``seed_from(step seed, crop id, NOISE_STREAM)``: the noise-augmentation stream of a
#: crop, distinct from the attack's (``seed_from(step seed, crop id)``, restarts ``(..., r)`` with small r)
NOISE_STREAM = 0x6E6F697365


def crop_sample_ids(first: int, n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Global indices of crops ``first .. first + n - 1`` of one rank in an epoch.

    Crop ``k`` (counted from the start of the epoch) of rank ``r`` gets ``k * world_size + r``:
    distinct for every crop of every rank, and ``first + b`` in a single process. The attack
    draws sample ``b``'s random start from ``seed_from(seed, ids[b])``, so crops of one batch
    (and of different ranks) never share a draw, and a resumed epoch replays the same draws.

    Args:
        first: crops of this rank already seen in the epoch (>= 0).
        n: crops in the batch (>= 0).
        rank: this rank, in [0, world_size).
        world_size: number of ranks (>= 1).

    Returns:
        ``n`` non-negative ints.
    """
    return [(first + b) * world_size + rank for b in range(n)]


def noise_crops(image: torch.Tensor, sigma: float, seed: int, sample_ids: Sequence[int],
                bounds: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Gaussian noise augmentation of training crops (Cohen, Rosenfeld & Kolter, ICML 2019): crop
    ``b`` becomes ``clamp(x_b + sigma * e_b, lo, hi)``, ``e_b ~ N(0, I)`` drawn on the CPU from
    ``seed_from(seed, sample_ids[b], NOISE_STREAM)``, so a crop's noise depends on the step seed
    and its id only (not on its batch, rank or device) and a resumed epoch replays it.

    Args:
        image: crops ``(B, C, *spatial)`` in model-input units.
        sigma: noise standard deviation in input units (0 returns ``image`` itself).
        seed: the step's seed (``seed * STEP_SEED_STRIDE + it`` of :func:`train_epoch`).
        sample_ids: B crop ids (:func:`crop_sample_ids`).
        bounds: ``(lo, hi)`` intensity range to clamp into (``None``: no clamping).

    Returns:
        The noisy crops, shape, dtype and device of ``image``.
    """
    from volattack.ops import seed_from

    if sigma == 0:
        return image
    if len(sample_ids) != image.shape[0]:
        raise ValueError(f"sample_ids must have one id per crop ({image.shape[0]}), got {len(sample_ids)}.")
    draws = []
    for i in sample_ids:
        g = torch.Generator(device="cpu")
        g.manual_seed(seed_from(seed, int(i), NOISE_STREAM))
        draws.append(torch.randn(tuple(image.shape[1:]), generator=g, dtype=torch.float32))
    noisy = image + sigma * torch.stack(draws).to(device=image.device, dtype=image.dtype)
    return noisy if bounds is None else noisy.clamp(float(bounds[0]), float(bounds[1]))


def train_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    attack: Optional[Any] = None,
    adv_cfg: Optional[AdversaryConfig] = None,
    lr_at: Optional[Callable[[int], float]] = None,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[Any] = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    noise_sigma: float = 0.0,
    bounds: Optional[tuple[float, float]] = None,
    poison_hook: Optional[Callable[..., torch.Tensor]] = None,
) -> list[float]:
    """One pass over ``loader``: per batch, the clean loss (``attack`` None) or
    :func:`~volattack.defenses.adversarial.adversarial_loss` (PGD-AT, fast AT, VAFT ...), backward
    and an optimiser step.

    Under AMP the training forward passes run in ``amp_dtype`` autocast; the attack runs outside
    any autocast, at the precision it was built with (``build_adversary(..., amp_dtype=...)``),
    so under float16 it scales its own loss and its input gradients do not underflow.

    Args:
        model: the segmenter (or its DDP wrapper), in train mode.
        loader: yields ``{"image": (B, C, H, W, D), "label": (B, 1, H, W, D)}`` batches.
        optimizer: updates ``model``'s parameters.
        loss_fn: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        device: where batches are moved.
        attack: the adversary from ``build_adversary`` (None: clean training); it must hold the
            unwrapped module.
        adv_cfg: ``train.adversary`` (weights and share), required with ``attack``.
        lr_at: learning rate of the ``it``-th step of this epoch (None keeps the optimiser's).
        amp_dtype: autocast dtype of the training passes (None: no autocast).
        scaler: a ``torch.amp.GradScaler`` (None: plain backward and step).
        seed: base seed of this epoch's attack calls and noise: step ``it`` uses
            ``seed * STEP_SEED_STRIDE + it`` and its crops the ids of :func:`crop_sample_ids`.
        rank: this rank (DDP), in [0, world_size).
        world_size: number of ranks (1 in a single process).
        noise_sigma: ``train.noise_sigma``: Gaussian noise of this std (input units) on every crop
            before the model or the adversary sees it (:func:`noise_crops`); 0: none.
        bounds: ``(b_min, b_max)`` the noisy crops are clamped into (``None``: no clamping).
        poison_hook: ``train.poison.joint`` (:class:`~volattack.threats.joint_trigger.JointPoisoning`):
            ``hook(model, batch, image, label)`` updates the trigger, returns the poisoned batch.

    Returns:
        The loss of every step, as floats.

    Raises:
        ValueError: ``attack`` without ``adv_cfg``; ``noise_sigma`` negative or not finite.
    """
    if attack is not None and adv_cfg is None:
        raise ValueError("adv_cfg (train.adversary) is required when an attack is given.")
    if not (isinstance(noise_sigma, (int, float)) and 0 <= noise_sigma < float("inf")):
        raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}.")
    losses: list[float] = []
    crops_seen = 0
    for it, batch in enumerate(loader):
        if lr_at is not None:
            lr_now = lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
        image = as_tensor(batch["image"]).to(device)
        label = as_tensor(batch["label"]).to(device).long()
        if poison_hook is not None:
            image, label = poison_hook(model, batch, image, label)
        ids = crop_sample_ids(crops_seen, image.shape[0], rank, world_size)
        step_seed = seed * STEP_SEED_STRIDE + it
        image = noise_crops(image, noise_sigma, step_seed, ids, bounds)
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_loss(model, image, label, loss_fn, attack, adv_cfg, amp_dtype, step_seed, ids, device)
        crops_seen += image.shape[0]
        _backward_step(loss, optimizer, scaler)
        losses.append(float(loss.detach()))
    return losses


def _backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Optional[Any]) -> None:
    """Backward pass and optimiser step, through the ``GradScaler`` when one is given (float16 AMP)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def _batch_loss(model: nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: nn.Module,
                attack: Optional[Any], adv_cfg: Optional[AdversaryConfig], amp_dtype: Optional[torch.dtype],
                step_seed: int, ids: list[int], device: torch.device) -> torch.Tensor:
    """The training loss of one batch: clean, or adversarial (examples crafted in eval mode, outside
    autocast; the attack restores train mode)."""
    from volattack.defenses.adversarial import adversarial_loss

    if hasattr(loss_fn, "batch_loss"):  # train.temperature / distill / defense (volattack.training.distill)
        return loss_fn.batch_loss(model, image, label, attack, adv_cfg, amp_dtype, step_seed, ids, device)
    if attack is None:
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            return loss_fn(model(image), label)
    loss, _terms = adversarial_loss(model, image, label, attack, adv_cfg, loss_fn, seed=step_seed, sample_ids=ids,
                                    amp_dtype=amp_dtype)
    return loss
