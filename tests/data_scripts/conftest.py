"""Helpers of the data_scripts tests: load a script by path, write tiny NIfTI files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "data_scripts"


def _load(name: str) -> ModuleType:
    key = f"volattack_data_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, SCRIPTS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """``load_script("prepare_btcv")`` -> the module of data_scripts/prepare_btcv.py."""
    return _load


@pytest.fixture(scope="session")
def nii() -> Callable[..., Path]:
    """``nii(path, shape=(8, 8, 8), value=0, dtype=np.float32, spacing=1.0)`` writes a tiny NIfTI."""
    from volattack.data.io import write_nifti

    def write(path: Path, shape=(8, 8, 8), value=0, dtype=np.float32, spacing: float = 1.0) -> Path:
        arr = np.full(shape, value, dtype=dtype)
        return write_nifti(arr, path, np.diag([spacing, spacing, spacing, 1.0]), dtype=dtype)

    return write
