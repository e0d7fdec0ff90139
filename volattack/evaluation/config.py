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


@dataclass
class EvalConfig:
    """What to evaluate: the attacks, the split, sliding-window inference, outputs."""

    checkpoint: Optional[str] = None
    split: str = "test"
    max_cases: Optional[int] = None
    attacks: list[AttackSpec] = field(default_factory=list)
    fooling_threshold: float = 0.5
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    save_adv: bool = False
    save_pred: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
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
