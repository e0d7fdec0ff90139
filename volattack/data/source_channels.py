"""Scans read from several channel files (nnU-Net's raw layout for multi-modal images:
``case_0000.nii.gz``, ``case_0001.nii.gz``, ...) written back the same way, one file per channel,
each with its own file's type and header (:func:`volattack.data.source.read_scan` of a list keeps
one single-channel :class:`~volattack.data.source.SourceScan` per file in ``parts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from volattack.data.io import PathLike
from volattack.data.source import SourceScan, _check_array, scan_suffix, write_scan


def channel_file_names(stem: str, scan: SourceScan) -> list[str]:
    """File names for writing ``scan``'s channels one file each, nnU-Net's raw-data naming:
    ``{stem}_0000{suffix}``, ``{stem}_0001{suffix}``, ... with each channel file's own suffix."""
    return [f"{stem}_{c:04d}{scan_suffix(p)}" for c, p in enumerate(scan.paths)]


def write_scan_channels(scan: SourceScan, array: Any, paths: Sequence[PathLike], *,
                        description: str = "volattack adversarial") -> list[Path]:
    """Write a scan read from several channel files back as one file per channel, each with its
    own file's shape, affine, header and data type (:func:`write_scan` per channel), atomically
    per file.

    Args:
        scan: a scan read by :func:`read_scan` from a list of files (``scan.parts`` set).
        array: ``(C, I, J, K)`` or ``(1, C, I, J, K)`` source units, finite.
        paths: one destination per channel, in channel order.
        description: as in :func:`write_scan`.

    Returns:
        The written paths.

    Raises:
        ValueError: a scan not read from channel files, a number of paths other than C, a shape
            other than the scan's, non-finite values, or what :func:`write_scan` refuses.
    """
    if not scan.parts:
        raise ValueError(f"scan was read from one file ({str(scan.path)!r}); use write_scan.")
    paths = list(paths)
    if len(paths) != len(scan.parts):
        raise ValueError(f"paths must name one file per channel ({len(scan.parts)}), got {len(paths)}.")
    a = _check_array(scan, array)
    return [write_scan(part, a[c:c + 1], p, description=description) for c, (part, p) in
            enumerate(zip(scan.parts, paths))]


__all__ = ["channel_file_names", "write_scan_channels"]
