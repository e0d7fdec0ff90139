"""Configuration of adversarial training (light: no torch/MONAI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class AdversaryConfig:
    """The ``train.adversary`` section: which attack makes the training examples and how they count.

    Attributes:
        name: ``"none"`` (clean training), ``"pgd"``, ``"fgsm_rs"`` (FGSM with random start and step
            1.25 eps: fast adversarial training, Wong et al. 2020), ``"vafa"``, ``"sa2"``, or any
            registered attack name.
        params: keyword arguments of the attack (``eps``, ``steps``, ``q_max`` ...; fractions like
            ``"4/255"`` are accepted).
        share: fraction of each batch (first samples) that also gets an adversarial copy, in [0, 1].
        clean_weight: weight of the segmentation loss on the clean batch. ``None`` (default) follows
            the published recipes: 0 for an adversary with ``fr_weight`` 0 and ``share`` 1 (PGD-AT, Madry et al.
            2018, and fast AT, Wong et al. 2020, train on the adversarial examples only, so an epoch
            costs ``steps + 1`` passes), otherwise 1 (VAFT keeps ``L_dice(M(X), Y)``; with a partial
            share the clean term is what makes the unattacked samples count). Resolved to a number
            when the config is built, so saved configs show the value used.
        adv_weight: weight of the segmentation loss on the adversarial samples.
        fr_weight: weight of VAFT's frequency-consistency loss between clean and adversarial logits
            (0 turns it off; 1 with ``name: vafa`` is VAFT).
        fr_normalized: the published code's form of L_fr (divided by sum |DCT(M(X))|); False is the
            paper's plain L1 sum.
        fr_block_size: blockwise DCT of the logits for L_fr (None: whole volume).
    """

    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    share: float = 1.0
    clean_weight: Optional[float] = None
    adv_weight: float = 1.0
    fr_weight: float = 0.0
    fr_normalized: bool = True
    fr_block_size: Optional[int] = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.share <= 1.0):
            raise ValueError(f"adversary.share must be in [0, 1], got {self.share}.")
        if self.clean_weight is None:
            adv_only = self.name != "none" and self.fr_weight == 0 and self.share == 1
            self.clean_weight = 0.0 if adv_only else 1.0
        for k in ("clean_weight", "adv_weight", "fr_weight"):
            v = getattr(self, k)
            if v < 0:
                raise ValueError(f"adversary.{k} must be >= 0, got {v}.")
        if self.name != "none" and self.clean_weight == 0 and self.adv_weight == 0:
            raise ValueError("adversary: clean_weight and adv_weight cannot both be 0.")
