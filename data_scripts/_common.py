"""Shared helpers of the dataset preparation scripts in ``data_scripts/``.

Every ``prepare_*.py`` script turns a raw download the user already has into volattack's
MSD-style datalist (see ``volattack.data.datalist``)::

    {"name": ..., "labels": {"0": "background", ...},
     "training": [{"image": rel, "label": rel, "subject": ...}, ...],
     "validation": [...], "test": [...]}

with paths relative to the JSON's folder (default) or absolute (``--absolute``), and a
train/validation/test split made **by subject** with a seeded ``numpy.random.Generator``,
so that no subject appears in two splits. Nothing here downloads anything; only numpy and
nibabel (headers) are imported, never torch or MONAI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SPLITS: tuple[str, ...] = ("training", "validation", "test")


class PrepareError(ValueError):
    """The raw dataset folder does not look as expected (message says what is missing)."""


# --------------------------------------------------------------------------- file names


def nifti_stem(path: PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (other suffixes: without the last suffix).

    Args:
        path: a file name.

    Returns:
        The stem, e.g. ``"img0001"`` for ``".../img0001.nii.gz"``.
    """
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def list_nifti(folder: Path) -> list[Path]:
    """Sorted NIfTI files of ``folder`` (not recursive), ignoring hidden and macOS ``._`` files.

    Args:
        folder: an existing directory.

    Returns:
        The ``.nii``/``.nii.gz`` files, sorted by name.
    """
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith((".nii", ".nii.gz"))
    )


def require_dir(path: PathLike, what: str) -> Path:
    """Return ``path`` as a ``Path`` if it is an existing directory.

    Args:
        path: the folder.
        what: what the folder should hold, for the message (e.g. ``"BTCV root"``).

    Raises:
        FileNotFoundError: the folder does not exist (message names ``what`` and the path).
        PrepareError: ``path`` is a file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {str(p)!r}.")
    if not p.is_dir():
        raise PrepareError(f"{what} must be a folder, got the file {str(p)!r}.")
    return p


def entry_path(path: PathLike, base: Path, absolute: bool) -> str:
    """How a file is written into a datalist: relative to ``base`` (POSIX) or absolute.

    Args:
        path: the file.
        base: the folder of the datalist JSON.
        absolute: write the absolute path instead.

    Returns:
        The path string (``os.path.relpath`` may contain ``..`` when the data lies outside
        ``base``; ``volattack.data.datalist.load_datalist`` resolves it against ``base``).
    """
    p = Path(path).expanduser().resolve()
    if absolute:
        return p.as_posix()
    return Path(os.path.relpath(p, Path(base).expanduser().resolve())).as_posix()


def check_same_grid(image: PathLike, label: PathLike) -> None:
    """Check from the NIfTI headers (no voxel data read) that image and label share a grid.

    The image may have extra trailing axes (channels of a 4D multi-modal image).

    Args:
        image: image file.
        label: label file.

    Raises:
        PrepareError: unreadable header, or spatial shapes that differ (both paths named).
    """
    import nibabel as nib

    try:
        ishape = tuple(nib.load(str(image)).shape)
        lshape = tuple(nib.load(str(label)).shape)
    except Exception as e:  # nibabel raises many types for bad files
        raise PrepareError(f"Cannot read the NIfTI header of {str(image)!r} or {str(label)!r}: {e}") from e
    if ishape[:3] != lshape[:3]:
        raise PrepareError(
            f"image {str(image)!r} has spatial shape {ishape[:3]} but label {str(label)!r} has "
            f"{lshape[:3]}."
        )


# --------------------------------------------------------------------------- splitting


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validate split fractions.

    Args:
        val_fraction: fraction of subjects for validation, in ``[0, 1)``.
        test_fraction: fraction of subjects for testing, in ``[0, 1)``.

    Raises:
        ValueError: a fraction outside ``[0, 1)`` or a sum ``>= 1`` (values named).
    """
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v < 1):
            raise ValueError(f"{name} must be in [0, 1), got {v!r}.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (some subjects must train), got "
            f"{val_fraction} + {test_fraction}."
        )


def _count(fraction: float, n: int) -> int:
    k = int(round(fraction * n))
    return 1 if fraction > 0 and k == 0 and n >= 3 else k


def split_subjects(
    subjects: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Optional[Mapping[str, str]] = None,
) -> dict[str, list[str]]:
    """Split subject identifiers into training/validation/test, seeded and disjoint.

    The subjects are sorted first, so the split does not depend on the order in which the
    files were found. A ``numpy.random.default_rng(seed)`` permutation orders them; with
    ``groups`` (e.g. the ACDC pathology group), subjects are permuted within each group and
    the groups are interleaved round-robin, so every split gets a near-even mix (stratified).
    The first ``round(test_fraction * n)`` go to test, the next ``round(val_fraction * n)`` to
    validation (at least one each when the fraction is positive and ``n >= 3``), the rest to
    training.

    Args:
        subjects: unique subject identifiers.
        val_fraction: fraction for validation, in ``[0, 1)``.
        test_fraction: fraction for test, in ``[0, 1)``.
        seed: split seed (>= 0).
        groups: optional subject -> stratum.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each sorted.

    Raises:
        ValueError: bad fractions or seed, duplicate subjects, or too few subjects to leave
            at least one for training.
    """
    check_fractions(val_fraction, test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    subs = sorted(subjects)
    if len(set(subs)) != len(subs):
        dup = sorted({s for s in subs if subs.count(s) > 1})
        raise ValueError(f"subjects must be unique, got duplicates {dup}.")
    n = len(subs)
    n_test, n_val = _count(test_fraction, n), _count(val_fraction, n)
    if n - n_test - n_val < 1:
        raise ValueError(
            f"{n} subject(s) cannot be split with val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: no subject would be left for training."
        )
    rng = np.random.default_rng(seed)
    if groups:
        strata: dict[str, list[str]] = {}
        for s in subs:
            strata.setdefault(str(groups.get(s, "")), []).append(s)
        queues = [list(np.asarray(strata[g])[rng.permutation(len(strata[g]))]) for g in sorted(strata)]
        order: list[str] = []
        while any(queues):
            for q in queues:
                if q:
                    order.append(str(q.pop(0)))
    else:
        order = [subs[i] for i in rng.permutation(n)]
    return {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test:n_test + n_val]),
        "training": sorted(order[n_test + n_val:]),
    }


# --------------------------------------------------------------------------- writing


def write_datalist(path: PathLike, meta: Mapping[str, Any]) -> Path:
    """Write the datalist JSON atomically (temp file + rename), creating parent folders.

    Args:
        path: destination ``.json``.
        meta: the datalist object.

    Returns:
        The path written.
    """
    from volattack.data.io import atomic_write_bytes

    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_bytes(text.encode("utf-8"), Path(path).expanduser(), suffix=".json")


def assemble(
    *,
    name: str,
    description: str,
    labels: Mapping[int, str],
    cases_by_split: Mapping[str, list[dict[str, Any]]],
    absolute: bool,
    seed: int,
    split_note: str,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The datalist object: metadata, labels, the three splits and how they were made.

    Args:
        name: dataset name.
        description: free text (source layout, what a case is).
        labels: class index -> name (0 is background).
        cases_by_split: split name -> list of case dicts (image/label paths already written
            with :func:`entry_path`).
        absolute: whether the paths are absolute (recorded in ``"paths"``).
        seed: split seed.
        split_note: how the split was made, in words.
        extra: more top-level fields (reference, modality, channels, ...).

    Returns:
        A JSON-serialisable dict.
    """
    meta: dict[str, Any] = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "labels": {str(int(k)): v for k, v in sorted(labels.items())},
        "paths": "absolute" if absolute else "relative to the folder of this file",
        "split": {"by": "subject", "seed": int(seed), "method": split_note,
                  "counts": {k: len(cases_by_split.get(k, [])) for k in SPLITS}},
    }
    if extra:
        meta.update(extra)
    for k in SPLITS:
        meta[k] = list(cases_by_split.get(k, []))
    meta["numTraining"] = len(meta["training"])
    return meta


def subjects_by_split(meta: Mapping[str, Any]) -> dict[str, set[str]]:
    """Subjects of each split of a datalist written by these scripts (for checks and tests).

    Args:
        meta: a datalist object whose cases carry a ``"subject"`` field.

    Returns:
        Split name -> set of subjects.
    """
    return {k: {str(c["subject"]) for c in meta.get(k, [])} for k in SPLITS}


# --------------------------------------------------------------------------- command line


def add_common_args(p: argparse.ArgumentParser, *, default_val: float = 0.1, default_test: float = 0.2) -> None:
    """Options shared by the scripts: output, path style, split fractions, seed, verbosity.

    Args:
        p: the parser to extend.
        default_val: default ``--val-fraction``.
        default_test: default ``--test-fraction``.
    """
    p.add_argument("--out", default=None,
                   help="folder for dataset.json (default: the dataset folder itself)")
    p.add_argument("--name", default="dataset.json", help="file name of the datalist")
    p.add_argument("--absolute", action="store_true",
                   help="write absolute paths (default: paths relative to the datalist's folder)")
    p.add_argument("--val-fraction", type=float, default=default_val, help="fraction of subjects for validation")
    p.add_argument("--test-fraction", type=float, default=default_test, help="fraction of subjects for test")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--no-check", action="store_true",
                   help="skip the header check that image and label grids match")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")


def run(prog: str, body: Callable[[], Path]) -> int:
    """Run a script body; print the datalist path (stdout) or a clear error (stderr).

    Args:
        prog: script name used as the error prefix.
        body: returns the written datalist path.

    Returns:
        0 on success, 1 when the input is missing or malformed (``FileNotFoundError``,
        ``ValueError``; the message says what to fix).
    """
    try:
        path = body()
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def setup_logging(verbose: bool) -> None:
    """INFO logging to stderr with ``-v``, warnings only otherwise."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
