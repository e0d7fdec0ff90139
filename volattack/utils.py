"""Small shared helpers: atomic writes, versions, device choice, the C allocator (light imports)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional


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


_LIBC: list = []  # [glibc handle or None], looked up once
_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1  # glibc malloc.h


def _glibc() -> Optional[Any]:
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(lib if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def set_mmap_threshold(threshold_bytes: int) -> bool:
    """Have the C library serve every allocation of at least ``threshold_bytes`` from a fresh
    memory mapping that goes back to the operating system when freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), for the rest of the process; returns whether it took effect
    (``False`` off glibc).

    Why: glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so
    afterwards volume-sized tensors come from its heap, and a computation that frees and allocates
    many of them (the window-wise forward and backward of a deployed nnU-Net pipeline) leaves
    freed blocks resident beside the live ones: the peak then exceeds what is live by tens of MiB
    per million voxels (``benchmarks/bench_nnunet.py``). This is what the environment variable
    ``MALLOC_MMAP_THRESHOLD_`` does at start-up. Mapped blocks cost a page fault per 4 KiB page
    when first written.
    """
    lib = _glibc()
    if lib is None:
        return False
    ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    if ok:
        _THRESHOLD[:] = [int(threshold_bytes)]
        # a threshold set by hand also freezes glibc's trim threshold at 128 KiB: the heap would be
        # given back after every window's pass and faulted in again by the next; keep glibc's own
        # ceiling for it (twice the mmap ceiling), a constant, not a per-voxel, amount
        lib.mallopt(_M_TRIM_THRESHOLD, 2 * HEAP_CEILING)
    return ok


_THRESHOLD: list = []  # [bytes]: the mmap threshold set_mmap_threshold last gave glibc
HEAP_CEILING = 32 * 2 ** 20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


@contextlib.contextmanager
def heap_allocations() -> Iterator[None]:
    """Within the block, allocations below 32 MiB come from glibc's heap again (mmap threshold
    32 MiB, glibc's own ceiling); on leaving it, the threshold :func:`set_mmap_threshold` set is
    restored. A no-op when no threshold was set (glibc's defaults are left alone) or off glibc.

    Why: with a low threshold every freed volume-sized block goes back to the OS (the peak follows
    the live tensors), but a network pass over a sliding window then maps, faults in and unmaps
    its activations afresh each time. Run inside this block, a pass reuses the heap's blocks of
    the previous pass; its tensors are window-sized, so the heap does not grow with the volume.
    """
    if not _THRESHOLD or _THRESHOLD[0] >= HEAP_CEILING:
        yield
        return
    lib = _glibc()
    lib.mallopt(_M_MMAP_THRESHOLD, HEAP_CEILING)
    try:
        yield
    finally:
        lib.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD[0])


def resolve_device(name: str = "auto") -> "Any":
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
