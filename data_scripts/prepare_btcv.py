#!/usr/bin/env python
"""Prepare BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen) as a volattack datalist.

Input: the Synapse download you already have, in one of these layouts (searched in order)::

    ROOT/RawData/Training/img/img0001.nii.gz  +  ROOT/RawData/Training/label/label0001.nii.gz
    ROOT/Abdomen/RawData/Training/{img,label}/...
    ROOT/Training/{img,label}/...
    ROOT/{img,label}/...                        (flat copies, e.g. "SABS" folders)

Images ``img<ID>`` are paired with labels ``label<ID>``; one scan per subject, so the subject
is ``<ID>``. The 13 organ labels are named (Landman et al., MICCAI 2015 BTCV challenge):
1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
8 aorta, 9 inferior vena cava, 10 portal and splenic vein, 11 pancreas, 12 right adrenal
gland, 13 left adrenal gland. The official test images (``Testing/img``, no labels) are
listed under ``"unlabeled"``; volattack's ``"test"`` split is held-out labelled subjects.

Output: ``dataset.json`` in ``--out`` (default ROOT) with paths relative to that folder
(``--absolute`` for absolute paths). Nothing is downloaded or copied::

    python data_scripts/prepare_btcv.py /data/BTCV --val-fraction 0.1 --test-fraction 0.2 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

logger = logging.getLogger("prepare_btcv")

#: BTCV label index -> organ name.
BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_and_splenic_vein",
    11: "pancreas",
    12: "adrenal_gland_right",
    13: "adrenal_gland_left",
}

_LAYOUTS: tuple[str, ...] = ("RawData/Training", "Abdomen/RawData/Training", "Training", ".")
_ID = re.compile(r"^(?:img|label)(\d+)$", re.IGNORECASE)


def find_training_dirs(root: Path) -> tuple[Path, Path]:
    """Locate the ``img`` and ``label`` folders of the BTCV training set under ``root``.

    Args:
        root: the dataset folder.

    Returns:
        ``(img_dir, label_dir)``.

    Raises:
        FileNotFoundError: no known layout found (the searched folders are listed).
    """
    for rel in _LAYOUTS:
        base = root / rel
        if (base / "img").is_dir() and (base / "label").is_dir():
            return base / "img", base / "label"
    tried = ", ".join(str(root / rel / "{img,label}") for rel in _LAYOUTS)
    raise FileNotFoundError(
        f"No BTCV training folders under {str(root)!r}: expected img/ and label/ folders in one of {tried}."
    )


def _ids(files: list[Path], kind: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        m = _ID.match(_common.nifti_stem(f))
        if not m or not _common.nifti_stem(f).lower().startswith(kind):
            logger.warning("Ignoring %s: not named %s<ID>.nii.gz", f, kind)
            continue
        out[m.group(1)] = f
    return out


def prepare(
    root: Path,
    out: Optional[Path] = None,
    *,
    name: str = "dataset.json",
    absolute: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    check: bool = True,
) -> Path:
    """Write the BTCV datalist.

    Args:
        root: the raw BTCV folder (see the module docstring for layouts).
        out: folder of the JSON (default ``root``).
        name: JSON file name.
        absolute: absolute paths instead of paths relative to ``out``.
        val_fraction: fraction of labelled subjects for validation.
        test_fraction: fraction of labelled subjects for test.
        seed: split seed.
        check: compare image and label grids from the NIfTI headers.

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: ``root`` or its img/label folders are missing.
        ValueError: no pairs, labels without images, grid mismatches, bad fractions.
    """
    root = _common.require_dir(root, "BTCV root")
    _common.check_fractions(val_fraction, test_fraction)
    img_dir, lbl_dir = find_training_dirs(root)
    images = _ids(_common.list_nifti(img_dir), "img")
    labels = _ids(_common.list_nifti(lbl_dir), "label")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise _common.PrepareError(
            f"labels without images in {str(lbl_dir)!r}: IDs {orphans} have no img<ID>.nii.gz in {str(img_dir)!r}."
        )
    unlabeled_ids = sorted(set(images) - set(labels))
    for i in unlabeled_ids:
        logger.warning("img%s has no label in %s: listed under 'unlabeled'", i, lbl_dir)
    subjects = sorted(set(images) & set(labels))
    if not subjects:
        raise _common.PrepareError(f"no image/label pairs found in {str(img_dir)!r} and {str(lbl_dir)!r}.")
    if check:
        for s in subjects:
            _common.check_same_grid(images[s], labels[s])

    out_dir = Path(out).expanduser() if out is not None else root
    split = _common.split_subjects(subjects, val_fraction, test_fraction, seed)
    cases = {
        k: [
            {"image": _common.entry_path(images[s], out_dir, absolute),
             "label": _common.entry_path(labels[s], out_dir, absolute), "subject": s}
            for s in subs
        ]
        for k, subs in split.items()
    }
    unlabeled = [{"image": _common.entry_path(images[s], out_dir, absolute), "subject": s} for s in unlabeled_ids]
    test_dir = img_dir.parent.parent / "Testing" / "img"
    if img_dir.parent.name == "Training" and test_dir.is_dir():
        unlabeled += [
            {"image": _common.entry_path(f, out_dir, absolute), "subject": _common.nifti_stem(f)[3:]}
            for f in _common.list_nifti(test_dir)
        ]
    meta = _common.assemble(
        name="BTCV",
        description=(
            "Multi-Atlas Labeling Beyond the Cranial Vault, abdomen CT (portal venous phase), "
            f"13 organs. Source: {img_dir} and {lbl_dir}. One scan per subject (subject = img ID). "
            "'unlabeled' lists images without labels (official test set)."
        ),
        labels=BTCV_LABELS,
        cases_by_split=cases,
        absolute=absolute,
        seed=seed,
        split_note=f"seeded permutation of {len(subjects)} labelled subjects: "
                   f"val_fraction={val_fraction}, test_fraction={test_fraction}",
        extra={"modality": {"0": "CT"},
               "reference": "Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault",
               "unlabeled": unlabeled},
    )
    path = _common.write_datalist(out_dir / name, meta)
    logger.info("BTCV: %s", meta["split"]["counts"])
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("root", help="BTCV folder (containing RawData/Training/img and .../label)")
    _common.add_common_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments and write the datalist; 0 on success, 1 on missing/malformed input."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    return _common.run("prepare_btcv", lambda: prepare(
        Path(args.root), None if args.out is None else Path(args.out), name=args.name, absolute=args.absolute,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, check=not args.no_check,
    ))


if __name__ == "__main__":
    sys.exit(main())
