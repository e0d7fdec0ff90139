"""Configuration dataclasses of the data layer (light: no torch/MONAI import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class PreprocessConfig:
    """How volumes are turned into model inputs (MONAI transforms built from this).

    ``a_min``/``a_max`` is the intensity window in source units (HU for CT), mapped
    linearly to ``[b_min, b_max]`` and clipped. ``spacing`` is the target voxel spacing
    in mm (``None`` keeps the source spacing). ``roi_size`` is the training crop and the
    sliding-window size; ``num_samples`` crops per volume with ``pos``/``neg`` ratio.
    """

    spacing: Optional[list[float]] = None
    orientation: str = "RAS"
    a_min: float = -175.0
    a_max: float = 250.0
    b_min: float = 0.0
    b_max: float = 1.0
    crop_foreground: bool = True
    roi_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    num_samples: int = 2
    pos: float = 1.0
    neg: float = 1.0
    reader: Optional[str] = None  # None: MONAI picks; or "NibabelReader" / "ITKReader"


@dataclass
class PhantomConfig:
    """Synthetic abdominal-CT phantoms (see ``volattack.data.phantoms``)."""

    out: str = "data/phantoms"
    n: int = 16
    n_test: int = 4
    n_val: int = 2
    size: list[int] = field(default_factory=lambda: [64, 64, 48])
    seed: int = 0


@dataclass
class DataConfig:
    """Where the cases are: an MSD-style datalist JSON and the keys of its splits."""

    datalist: str = ""
    base_dir: Optional[str] = None
    train_key: str = "training"
    val_key: str = "validation"
    test_key: str = "test"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
