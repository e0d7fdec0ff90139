"""Configuration dataclasses of the data layer (light: no torch/MONAI import)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

#: Reader names accepted by ``PreprocessConfig.reader`` (``None``: chosen by file suffix).
READERS: tuple[str, ...] = ("NibabelReader", "ITKReader", "SimpleITKReader")

_AXIS_PAIRS = ("LR", "AP", "SI")

#: Longest accepted units label (``PreprocessConfig.units``; it is printed in table headers).
MAX_UNITS_LENGTH = 16


def check_units(units: object) -> str:
    """A source-units label: non-empty, at most :data:`MAX_UNITS_LENGTH` printable characters,
    no surrounding spaces, no ``|`` or backtick (it goes into Markdown tables); else
    ``ValueError`` naming ``units``."""
    u = units
    if (
        not isinstance(u, str)
        or not u.strip()
        or u != u.strip()
        or len(u) > MAX_UNITS_LENGTH
        or any(not c.isprintable() or c in "|`" for c in u)
    ):
        raise ValueError(
            f"units must be a non-empty label of at most {MAX_UNITS_LENGTH} printable characters "
            f"without surrounding spaces, '|' or '`' (e.g. 'HU', 'a.u.'), got {u!r}."
        )
    return u


@dataclass
class PreprocessConfig:
    """How volumes are turned into model inputs (MONAI transforms built from this).

    ``a_min``/``a_max`` is the intensity window in source units (HU for CT), mapped
    linearly to ``[b_min, b_max]`` and clipped. ``spacing`` is the target voxel spacing
    in mm (``None`` keeps the source spacing). ``roi_size`` is the training crop and the
    sliding-window size; ``num_samples`` crops per volume with ``pos``/``neg`` ratio.
    ``units`` names the source intensity unit (``"HU"`` for CT; MRI has no absolute unit, so
    MRI configs say e.g. ``"a.u."``): reports, CSV headers and figures print perturbation sizes
    in it (``L-inf {units}``). It is a label only and changes no computation.
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
    reader: Optional[str] = None  # None: by suffix; or "NibabelReader" / "ITKReader" / "SimpleITKReader"
    units: str = "HU"  # source intensity unit, a label for reports ("HU" for CT, e.g. "a.u." for MRI)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "PreprocessConfig":
        """Check every field; raise ``ValueError`` naming the field and the bad value.

        Runs at construction (``__post_init__``, like every config dataclass); call it again only
        after changing fields of an existing object.

        Returns:
            ``self``, for chaining.
        """
        if self.spacing is not None:
            sp = list(self.spacing)
            if len(sp) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in sp
            ):
                raise ValueError(f"spacing must be None or 3 positive numbers (mm), got {self.spacing!r}.")
        codes = str(self.orientation)
        if (
            len(codes) != 3
            or not codes.isupper()
            or sorted(next((i for i, p in enumerate(_AXIS_PAIRS) if c in p), -1) for c in codes) != [0, 1, 2]
        ):
            raise ValueError(
                f"orientation must be 3 axis codes, one of each of L/R, A/P, S/I (e.g. 'RAS'), "
                f"got {self.orientation!r}."
            )
        for name in ("a_min", "a_max", "b_min", "b_max", "pos", "neg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}.")
        if not self.a_max > self.a_min:
            raise ValueError(f"a_max must be > a_min, got a_min={self.a_min}, a_max={self.a_max}.")
        if not self.b_max > self.b_min:
            raise ValueError(f"b_max must be > b_min, got b_min={self.b_min}, b_max={self.b_max}.")
        roi = list(self.roi_size)
        if len(roi) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in roi):
            raise ValueError(f"roi_size must be 3 positive integers, got {self.roi_size!r}.")
        n = self.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {self.num_samples!r}.")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg <= 0:
            raise ValueError(
                f"pos and neg must be >= 0 and not both 0, got pos={self.pos}, neg={self.neg}."
            )
        if self.reader is not None and self.reader not in READERS:
            raise ValueError(f"reader must be None or one of {list(READERS)}, got {self.reader!r}.")
        check_units(self.units)
        return self


@dataclass
class PhantomConfig:
    """Synthetic abdominal-CT phantoms (see ``volattack.data.phantoms``)."""

    out: str = "data/phantoms"
    n: int = 16
    n_test: int = 4
    n_val: int = 2
    size: list[int] = field(default_factory=lambda: [64, 64, 48])
    seed: int = 0
    spacing: Optional[list[float]] = None  # None: about 1.5 x 1.5 x 3.0 mm jittered per case
    phantom_kwargs: dict = field(default_factory=dict)  # generate_phantom keywords (noise_hu, ...)


@dataclass
class DataConfig:
    """Where the cases are: an MSD-style datalist JSON and the keys of its splits."""

    datalist: str = ""
    base_dir: Optional[str] = None
    train_key: str = "training"
    val_key: str = "validation"
    test_key: str = "test"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
