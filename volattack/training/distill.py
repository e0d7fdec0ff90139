"""Defensive distillation and the training objective of ``volattack train``.

Defensive distillation (Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a Defense to
Adversarial Perturbations against Deep Neural Networks", IEEE S&P 2016), per voxel:

1. a *teacher* is trained at softmax temperature T (``train.temperature: T``): the
   cross-entropy term of the training loss sees ``softmax(z / T)`` of its logits ``z``,
   ``L = Dice(softmax(z), y) + CE(softmax(z / T), y)``. The soft Dice term stays at T = 1:
   soft Dice on ``softmax(z / T)`` is degenerate at high T (near-uniform probabilities put the
   mass of every small class over the whole volume, and the loss is lowered by suppressing the
   small classes): on the phantom task, Dice-CE entirely at T = 20, fine-tuned from a model of
   validation Dice 0.9, fell to 0.23 in 12 epochs. Cross-entropy at T keeps the argmax and
   makes the logits about T times larger (Papernot et al. train with cross-entropy only);
2. a *student* (``train.distill``) is trained on the teacher's softened outputs
   ``q = softmax(z_teacher / T)`` at the same T: the cross-entropy
   ``-(1/N) sum_voxels sum_k q_k log softmax(z_student / T)_k``, optionally mixed with the hard
   labels (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015):

       L = alpha * s * CE(q, softmax(z_s / T)) + (1 - alpha) * DiceCE(z_s, y),    s = T^2 or 1;

   the hard-label term is the usual training loss at T = 1 (Hinton et al.); ``s = T^2``
   (``t2_scaling``, the default) keeps the soft term's gradient w.r.t. the logits,
   ``s * (softmax(z_s / T) - q) / T``, of the same order as the hard term's as T grows (Hinton
   et al., Sec. 2). ``alpha = 1`` is Papernot et al.'s recipe (soft labels only). The
   cross-entropy includes the constant teacher entropy ``H(q)``: it differs from
   ``KL(q || p)`` by a constant, with the same gradients;
3. the student is *deployed at T = 1*: its checkpoint is a normal volattack checkpoint whose
   logits are used as they are. Training at a high T makes the logits about T times larger, so
   the deployed softmax saturates: Carlini & Wagner ("Defensive Distillation is Not Robust to
   Adversarial Examples", 2016) showed that the robustness this buys against gradient attacks
   comes from vanishing softmax gradients, not from a more robust decision function; attacks on
   scale-invariant losses (``sea``'s margin-free losses, ``reliable``) or black-box queries
   (``square``) are the honest test.

:class:`TrainObjective` is what :func:`volattack.training.train` minimises: Dice-CE (at
``train.temperature``), the distillation loss (``train.distill``), and the input sanitiser of
the hybrid defence (``train.defense``, :mod:`volattack.defenses.hybrid`) in front of the model
and of the adversary. :func:`volattack.training.step.train_epoch` hands it each batch.

Light at import (no torch): :class:`DistillConfig` is part of the ``train`` configuration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from volattack.checks import check_bool, is_finite_number
from volattack.yaml_config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from volattack.defenses.config import AdversaryConfig
    from volattack.models.config import ModelConfig
    from volattack.training.config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """The ``train.distill`` section: train this model as a defensively distilled student.

    Attributes:
        teacher: path of the teacher's volattack checkpoint (trained with ``train.temperature``
            equal to ``temperature``; any zoo architecture with the same channels). Checked to
            exist when training starts (not when the config is read, so a study can train the
            teacher first).
        temperature: softmax temperature T of the soft targets and of the student's soft term
            (finite, > 0; Papernot et al. use T = 20 to 100).
        alpha: weight of the soft-target term in [0, 1]; ``1 - alpha`` weighs the hard-label
            Dice-CE at T = 1 (1: soft labels only, Papernot et al.).
        t2_scaling: multiply the soft term by T^2 (Hinton et al. 2015), see the module docstring.

    Raises:
        ConfigError: a ``ValueError`` naming ``train.distill.<field>`` and the bad value.
    """

    teacher: str = ""
    temperature: float = 20.0
    alpha: float = 1.0
    t2_scaling: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (see the class docstring)."""
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ConfigError(
                f"train.distill.teacher must be the path of the teacher's checkpoint, got {self.teacher!r}."
            )
        if not is_finite_number(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"train.distill.temperature must be a finite number > 0, got {self.temperature!r}.")
        if not is_finite_number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"train.distill.alpha must be in [0, 1], got {self.alpha!r}.")
        try:
            check_bool("train.distill.t2_scaling", self.t2_scaling)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def teacher_path(self) -> Path:
        """The teacher checkpoint's path, which must exist.

        Raises:
            FileNotFoundError: naming ``train.distill.teacher`` and the path.
        """
        path = Path(self.teacher).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"train.distill.teacher: no teacher checkpoint at {self.teacher!r} (train the teacher first, "
                f"with train.temperature: {self.temperature:g})."
            )
        return path


def check_objective(cfg: "TrainConfig") -> None:
    """Check ``train.temperature``, ``train.distill`` and ``train.defense`` and how they combine
    (called by :meth:`TrainConfig.validate`); mappings become their dataclasses.

    Raises:
        ValueError: naming the field and the bad value: a temperature that is not a finite number
            > 0; ``distill`` with ``temperature`` other than 1 (the student's T is
            ``distill.temperature``) or with an adversary (not supported); ``defense`` or
            ``distill`` of the wrong type.
    """
    from volattack.defenses.config import DefenseConfig

    if not is_finite_number(cfg.temperature) or cfg.temperature <= 0:
        raise ValueError(f"train.temperature must be a finite number > 0, got {cfg.temperature!r}.")
    if isinstance(cfg.distill, dict):
        cfg.distill = DistillConfig(**cfg.distill)
    if isinstance(cfg.defense, dict):
        cfg.defense = DefenseConfig(**cfg.defense)
    if cfg.defense is not None and not isinstance(cfg.defense, DefenseConfig):
        raise ValueError(f"train.defense must be a DefenseConfig, a mapping or None, got {cfg.defense!r}.")
    if cfg.distill is None:
        return
    if not isinstance(cfg.distill, DistillConfig):
        raise ValueError(f"train.distill must be a DistillConfig, a mapping or None, got {cfg.distill!r}.")
    cfg.distill.validate()
    if cfg.temperature != 1:
        raise ValueError(
            f"train.temperature must be 1 with train.distill (the student's temperature is "
            f"train.distill.temperature), got {cfg.temperature!r}."
        )
    if cfg.adversary.name != "none":
        raise ValueError(
            f"train.distill cannot be combined with train.adversary (name {cfg.adversary.name!r}); "
            f"set train.adversary.name: none."
        )


# ---------------------------------------------------------------------- losses


def soft_target_loss(student_logits: "torch.Tensor", teacher_logits: "torch.Tensor", temperature: float, *,
                     t2_scaling: bool = True) -> "torch.Tensor":
    """Cross-entropy of the student's softened outputs to the teacher's, per voxel (Papernot et
    al. 2016; Hinton et al. 2015):
    ``s * mean_{b, voxels} ( - sum_k softmax(t / T)_k * log_softmax(z / T)_k )``, ``s = T^2`` with
    ``t2_scaling`` else 1. Computed in float32.

    Args:
        student_logits: ``(B, K, *spatial)`` (differentiable).
        teacher_logits: ``(B, K, *spatial)`` (treated as constant targets).
        temperature: T > 0.
        t2_scaling: multiply by T^2.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: a temperature that is not a finite number > 0, or shapes that differ.
    """
    import torch

    if not is_finite_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            f"must have the same shape."
        )
    t = float(temperature)
    q = torch.softmax(teacher_logits.detach().float() / t, dim=1)
    log_p = torch.log_softmax(student_logits.float() / t, dim=1)
    ce = -(q * log_p).sum(dim=1).mean()
    return ce * (t * t) if t2_scaling else ce


def distillation_loss(student_logits: "torch.Tensor", teacher_logits: "torch.Tensor", label: "torch.Tensor",
                      hard_loss: Any, cfg: DistillConfig) -> "torch.Tensor":
    """``alpha * soft_target_loss(z_s, z_t, T) + (1 - alpha) * hard_loss(z_s, label)`` (the
    hard-label term at T = 1; a zero weight skips its term).

    Args:
        student_logits: ``(B, K, *spatial)``.
        teacher_logits: ``(B, K, *spatial)``.
        label: ``(B, 1, *spatial)`` class indices.
        hard_loss: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        cfg: temperature, alpha and scaling.

    Returns:
        A scalar tensor.
    """
    total = None
    if cfg.alpha > 0:
        total = cfg.alpha * soft_target_loss(student_logits, teacher_logits, cfg.temperature,
                                             t2_scaling=cfg.t2_scaling)
    if cfg.alpha < 1:
        hard = (1.0 - cfg.alpha) * hard_loss(student_logits, label)
        total = hard if total is None else total + hard
    assert total is not None
    return total


def load_teacher(cfg: DistillConfig, model_cfg: "ModelConfig", device: "torch.device") -> "nn.Module":
    """The frozen teacher: rebuilt from its checkpoint, on ``device``, in eval mode, without
    gradients (it is never updated and its batch-norm statistics never move).

    Raises:
        FileNotFoundError: the checkpoint does not exist (naming ``train.distill.teacher``).
        ValueError: a checkpoint that does not load, or channels that differ from ``model``'s.
    """
    from volattack.models.checkpoint import load_checkpoint

    path = cfg.teacher_path()
    teacher, info = load_checkpoint(path, map_location=device)
    m = info.get("model", {})
    have = (int(m.get("in_channels", -1)), int(m.get("out_channels", -1)))
    want = (int(model_cfg.in_channels), int(model_cfg.out_channels))
    if have != want:
        raise ValueError(
            f"train.distill.teacher {str(path)!r} has (in, out) channels {have}, the student {want}."
        )
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    logger.info("Distilling from teacher %s at T=%g (alpha %g).", path, cfg.temperature, cfg.alpha)
    return teacher


# ---------------------------------------------------------------------- the objective


class TrainObjective:
    """The loss of a training step (see the module docstring); callable as a segmentation loss
    ``objective(logits, label)``: ``seg_loss(logits, label)`` at T = 1; at ``T = train.temperature``
    != 1 the Dice term on ``logits`` and the cross-entropy term on ``logits / T`` (a MONAI
    ``DiceCELoss``; any other loss gets ``logits / T``).

    Args:
        seg_loss: the segmentation loss on logits, e.g. MONAI ``DiceCELoss``.
        temperature: ``train.temperature`` (> 0).
        teacher: the frozen teacher (``train.distill``), or None.
        distill: its settings (required with ``teacher``).
        sanitiser: a :class:`~volattack.defenses.hybrid.Sanitiser` (``train.defense``), or None.
        attack_model: what the adversary differentiates: the network, or the sanitised adaptive
            model of the hybrid defence.
    """

    def __init__(self, seg_loss: Any, *, temperature: float = 1.0, teacher: Optional["nn.Module"] = None,
                 distill: Optional[DistillConfig] = None, sanitiser: Optional[Any] = None,
                 attack_model: Optional["nn.Module"] = None) -> None:
        if not is_finite_number(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
        if teacher is not None and distill is None:
            raise ValueError("distill (train.distill) is required with a teacher.")
        self.seg_loss = seg_loss
        self.temperature = float(temperature)
        self.teacher = teacher
        self.distill = distill
        self.sanitiser = sanitiser
        self.attack_model = attack_model

    def __call__(self, logits: "torch.Tensor", label: "torch.Tensor") -> "torch.Tensor":
        """``seg_loss(logits, label)``; at T != 1 ``lambda_dice * Dice(logits) + lambda_ce * CE(logits / T)``.

        Shape:
            logits ``(B, K, *spatial)``, label ``(B, 1, *spatial)`` -> scalar.
        """
        if self.temperature == 1:
            return self.seg_loss(logits, label)
        loss = self.seg_loss
        if all(hasattr(loss, k) for k in ("dice", "ce", "lambda_dice", "lambda_ce")):  # MONAI DiceCELoss
            return loss.lambda_dice * loss.dice(logits, label) + loss.lambda_ce * loss.ce(logits / self.temperature,
                                                                                          label)
        return loss(logits / self.temperature, label)

    def batch_loss(self, model: "nn.Module", image: "torch.Tensor", label: "torch.Tensor", attack: Optional[Any],
                   adv_cfg: Optional["AdversaryConfig"], amp_dtype: Optional["torch.dtype"], step_seed: int,
                   ids: list[int], device: "torch.device") -> "torch.Tensor":
        """The loss of one batch: clean (sanitised with ``train.defense``), distilled, or
        adversarial (the examples crafted through the sanitiser, then sanitised and scored).

        Args:
            model: the network being trained (or its DDP wrapper), in train mode.
            image: crops ``(B, C, *spatial)``; label ``(B, 1, *spatial)``.
            attack: the adversary (built on :attr:`attack_model`), or None.
            adv_cfg: ``train.adversary``.
            amp_dtype: autocast dtype of the training passes (None: full precision).
            step_seed: the step's seed (attack and randomised sanitisers draw from it).
            ids: the crops' sample ids.
            device: where the batch lives.

        Returns:
            The scalar loss, differentiable w.r.t. ``model``'s parameters.
        """
        import torch

        from volattack.defenses.adversarial import adversarial_loss

        net = model if self.sanitiser is None else self.sanitiser.wrap(model, step_seed)
        if attack is not None:
            loss, _terms = adversarial_loss(net, image, label, attack, adv_cfg, self, seed=step_seed,
                                            sample_ids=ids, amp_dtype=amp_dtype)
            return loss
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            if self.teacher is None:
                return self(net(image), label)
            x_in = image if self.sanitiser is None else net.transform(image)
            with torch.no_grad():
                teacher_logits = self.teacher(x_in)
            return distillation_loss(model(x_in), teacher_logits, label, self.seg_loss, self.distill)


def build_objective(cfg: "TrainConfig", model_cfg: "ModelConfig", net: "nn.Module", device: "torch.device", *,
                    seed: int = 0) -> TrainObjective:
    """The objective of a run: Dice-CE at ``train.temperature``, the teacher of ``train.distill``
    (loaded and checked now, before any data work) and the sanitiser of ``train.defense``.

    Args:
        cfg: the ``train`` section.
        model_cfg: the student's model section (channels must match the teacher's).
        net: the unwrapped network being trained.
        device: the training device.
        seed: the run seed (the adaptive model's EOT generator).

    Raises:
        FileNotFoundError: a missing teacher checkpoint.
        ValueError: a teacher that does not fit, or a sanitiser that cannot be built.
    """
    from monai.losses import DiceCELoss

    from volattack.defenses.hybrid import Sanitiser

    teacher = load_teacher(cfg.distill, model_cfg, device) if cfg.distill is not None else None
    sanitiser = Sanitiser(cfg.defense) if cfg.defense is not None else None
    attack_model = net if sanitiser is None else sanitiser.attack_model(net, seed=seed)
    return TrainObjective(DiceCELoss(to_onehot_y=True, softmax=True), temperature=cfg.temperature,
                          teacher=teacher, distill=cfg.distill, sanitiser=sanitiser, attack_model=attack_model)


__all__ = [
    "DistillConfig",
    "TrainObjective",
    "build_objective",
    "check_objective",
    "distillation_loss",
    "load_teacher",
    "soft_target_loss",
]
