"""The whole pipeline's configuration (:class:`RunConfig`: phantoms, data, model, training,
evaluation) and, re-exported for convenience, the YAML machinery of
:mod:`volattack.yaml_config` (``yaml.safe_load`` into typed dataclasses, unknown keys rejected
with a suggestion, ``--set a.b=c`` overrides, never evaluated)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from volattack.data.config import DataConfig, PhantomConfig
from volattack.evaluation.config import EvalConfig
from volattack.models.config import ModelConfig
from volattack.training.config import TrainConfig
from volattack.yaml_config import (  # noqa: F401  (re-exported)
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
)

__all__ = ["RunConfig", "ConfigError", "apply_overrides", "dump_yaml", "from_dict", "load_yaml",
           "parse_override", "to_dict"]


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
