"""Configuration of evaluation runs and of the whole pipeline (light: no torch/MONAI import)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from volattack.data.config import DataConfig, PhantomConfig
from volattack.models.config import ModelConfig, TrainConfig

_FRACTION = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def parse_number(value: Any, name: str = "value") -> Any:
    """Accept numbers and fraction strings such as ``"8/255"`` (parsed, never evaluated).

    Other values are returned unchanged; a malformed fraction raises ``ValueError`` naming ``name``.
    """
    if isinstance(value, str) and "/" in value:
        m = _FRACTION.match(value)
        if not m or float(m.group(2)) == 0:
            raise ValueError(f"{name} must be a number or a fraction like '8/255', got {value!r}.")
        return float(m.group(1)) / float(m.group(2))
    return value


def format_number(v: Any) -> str:
    """Short label for budgets: multiples of 1/255 print as ``k/255``."""
    if isinstance(v, float):
        k = v * 255
        if abs(k - round(k)) < 1e-6 and v != 0:
            return f"{int(round(k))}/255"
        return f"{v:.4g}"
    return str(v)


@dataclass
class AttackSpec:
    """One attack and its parameters; ``sweep`` lists values of one or more parameters, each value
    giving one evaluated configuration (e.g. ``sweep: {eps: [2/255, 4/255, 8/255]}``).

    Numbers may be written as fractions (``"8/255"``). Parameters are validated by the attack.
    """

    name: str = "pgd"
    params: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = {k: parse_number(v, f"params.{k}") for k, v in self.params.items()}
        lengths = set()
        for k, vals in self.sweep.items():
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"sweep.{k} must be a non-empty list, got {vals!r}.")
            self.sweep[k] = [parse_number(v, f"sweep.{k}") for v in vals]
            lengths.add(len(vals))
        if len(lengths) > 1:
            raise ValueError(f"sweep lists must have equal lengths, got {sorted(lengths)}.")

    def expand(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(label, kwargs), ...]``: one entry per sweep position (one entry without a sweep)."""
        if not self.sweep:
            return [(self.label(self.params), dict(self.params))]
        n = len(next(iter(self.sweep.values())))
        out = []
        for i in range(n):
            kw = dict(self.params)
            kw.update({k: v[i] for k, v in self.sweep.items()})
            out.append((self.label({k: v[i] for k, v in self.sweep.items()}), kw))
        return out

    def label(self, shown: dict[str, Any]) -> str:
        if not shown:
            return self.name
        inner = ", ".join(f"{k}={format_number(v)}" for k, v in shown.items())
        return f"{self.name}({inner})"


THREAT_MODELS = ("volume", "patch")


@dataclass
class EvalConfig:
    """What to evaluate: the attacks, the split, sliding-window inference, outputs.

    Attributes:
        checkpoint: the target model (volattack checkpoint; TorchScript or MONAI bundle, see
            ``volattack.models.external``).
        surrogate_checkpoint: if set, attacks are crafted on this model and evaluated on the
            target (transfer); ``None`` attacks the target itself (white box).
        threat_model: ``"volume"``: the attack runs end to end through the same sliding-window
            inference that scores it (exact gradient); ``"patch"``: the published protocol, the
            volume is cut into tiles of ``patch_size`` (overlap ``patch_overlap``), each tile is
            attacked through the bare model, and the perturbations are stitched (averaged where
            tiles overlap) before sliding-window scoring.
        sanity_checks: gradient-masking checks in every report (Dice non-increasing with the
            budget, unbounded PGD, attacks versus noise, zero-gradient fraction).
        sanity_unbounded_steps: steps of the unbounded PGD check (0 skips that check).
        figures: write PNG figures (Dice versus budget, triplanar panels).
        figure_cases: number of cases that get a triplanar panel.
    """

    checkpoint: Optional[str] = None
    surrogate_checkpoint: Optional[str] = None
    split: str = "test"
    max_cases: Optional[int] = None
    attacks: list[AttackSpec] = field(default_factory=list)
    fooling_threshold: float = 0.5
    threat_model: str = "volume"
    patch_size: Optional[list[int]] = None
    patch_overlap: float = 0.0
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    save_adv: bool = False
    save_pred: bool = False
    sanity_checks: bool = True
    sanity_unbounded_steps: int = 10
    figures: bool = True
    figure_cases: int = 1
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {self.threat_model!r}.")
        if not (0 <= self.patch_overlap < 1):
            raise ValueError(f"patch_overlap must be in [0, 1), got {self.patch_overlap}.")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be 3 positive integers, got {self.patch_size}.")
        if self.sanity_unbounded_steps < 0:
            raise ValueError(f"sanity_unbounded_steps must be >= 0, got {self.sanity_unbounded_steps}.")
        if self.figure_cases < 0:
            raise ValueError(f"figure_cases must be >= 0, got {self.figure_cases}.")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}.")
        if not (0 < self.fooling_threshold <= 1):
            raise ValueError(f"fooling_threshold must be in (0, 1], got {self.fooling_threshold}.")
        if not (0 <= self.sw_overlap < 1):
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap}.")
        if self.max_cases is not None and self.max_cases < 1:
            raise ValueError(f"max_cases must be >= 1, got {self.max_cases}.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}.")


@dataclass
class RunConfig:
    """A whole pipeline run (``volattack benchmark``): optional phantoms, training, evaluation.

    ``phantoms`` (when set) generates the dataset first and points ``data.datalist`` at it.
    """

    seed: int = 0
    output_dir: str = "runs/run"
    phantoms: Optional[PhantomConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: Optional[TrainConfig] = None
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")
        self.data.preprocess.validate()


def is_finite_number(v: Any) -> bool:
    """True for finite ints/floats (not bools)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
