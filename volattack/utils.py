"""Small shared helpers: atomic writes, versions, device choice (light imports)."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(data: bytes, path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    A failure leaves any earlier file intact and no temp file behind.

    Args:
        data: the bytes to write.
        path: destination; its parent folders are created.
        suffix: suffix of the temporary file (e.g. ``".nii.gz"`` so tools recognise it).
    """
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic UTF-8 text write (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(text.encode("utf-8"), path)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write; NaN becomes ``null`` and infinities the strings ``"inf"``/``"-inf"``."""
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def versions() -> dict[str, str]:
    """Versions of Python, volattack and the main dependencies (for results files)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        out["volattack"] = version("volattack")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        out["volattack"] = "unknown"
    for mod in ("torch", "monai", "numpy", "nibabel", "SimpleITK", "scipy"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", getattr(m, "Version", lambda: "?")()))
        except Exception:  # pragma: no cover - optional
            out[mod] = "unavailable"
    return out


def resolve_device(name: str = "auto") -> "Any":
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
