#!/usr/bin/env python
"""Prepare ACDC (Automated Cardiac Diagnosis Challenge, cine MRI) as a volattack datalist.

Input: the ACDC download you already have (Bernard et al., IEEE TMI 2018)::

    ROOT/training/patient001/Info.cfg                    ED: 1, ES: 12, Group: DCM, ...
    ROOT/training/patient001/patient001_frame01.nii.gz   (+ patient001_frame01_gt.nii.gz)
    ROOT/training/patient001/patient001_frame12.nii.gz   (+ patient001_frame12_gt.nii.gz)
    ROOT/testing/patient101/...                          (same; labels in the public release)

(``ROOT/database/{training,testing}`` is found too.) Each patient gives two cases, the
end-diastolic (ED) and end-systolic (ES) frames named in ``Info.cfg``, each a 3D short-axis
stack with labels 1 RV (right-ventricle cavity), 2 MYO (left-ventricle myocardium), 3 LV
(left-ventricle cavity). The 4D cine files are not used.

Split, always by patient (both frames of a patient stay together): when every testing
patient has labels, the official testing patients are the ``"test"`` split and the training
patients are split into training/validation (``--val-fraction``, stratified by the
pathology ``Group``, seeded); ``--no-official-test`` (or a testing folder without labels)
draws validation and test from the training patients instead (``--test-fraction``).
Testing patients without labels are listed under ``"unlabeled"``. Nothing is downloaded::

    python data_scripts/prepare_acdc.py /data/ACDC --out data/acdc --seed 0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

logger = logging.getLogger("prepare_acdc")

#: ACDC label index -> structure.
ACDC_LABELS: dict[int, str] = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}

PHASES: tuple[str, ...] = ("ED", "ES")


def read_info(path: Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``key: value`` lines).

    Args:
        path: the file.

    Returns:
        Key -> value strings (``ED``, ``ES``, ``Group``, ``Height``, ``NbFrame``, ``Weight``).

    Raises:
        FileNotFoundError: missing file.
        ValueError: no ``ED``/``ES`` integer frame.
    """
    if not path.is_file():
        raise FileNotFoundError(f"ACDC Info.cfg not found: {str(path)!r}.")
    info: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    for key in PHASES:
        try:
            int(float(info[key]))
        except (KeyError, ValueError):
            raise _common.PrepareError(
                f"{str(path)!r} must give an integer {key} frame, got {info.get(key)!r}."
            ) from None
    return info


def _frame_file(folder: Path, patient: str, frame: int, gt: bool) -> Optional[Path]:
    suffix = "_gt" if gt else ""
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{patient}_frame{frame:02d}{suffix}{ext}"
        if p.is_file():
            return p
    return None


def _find_sets(root: Path) -> tuple[Path, Optional[Path]]:
    for base in (root, root / "database", root / "ACDC" / "database"):
        if (base / "training").is_dir():
            testing = base / "testing"
            return base / "training", testing if testing.is_dir() else None
    raise FileNotFoundError(
        f"No ACDC training folder under {str(root)!r}: expected {str(root / 'training')!r} "
        f"(or database/training) with patientXXX/ folders."
    )


def collect(folder: Path, *, require_labels: bool) -> dict[str, dict[str, Any]]:
    """The ED/ES cases of every ``patientXXX`` folder in ``folder``.

    Args:
        folder: ``training`` or ``testing``.
        require_labels: raise when a frame has no ``_gt`` file (else: the patient is unlabelled).

    Returns:
        patient -> {"group": str, "labelled": bool, "cases": [{"phase", "frame", "image", "label"?}]}.

    Raises:
        FileNotFoundError: missing Info.cfg or frame image (or label when required).
        ValueError: no patient folders.
    """
    patients = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("patient"))
    if not patients:
        raise _common.PrepareError(f"no patientXXX folders in {str(folder)!r}.")
    out: dict[str, dict[str, Any]] = {}
    for pdir in patients:
        info = read_info(pdir / "Info.cfg")
        frames = {ph: int(float(info[ph])) for ph in PHASES}
        cases, labelled = [], True
        for phase, frame in frames.items():
            img = _frame_file(pdir, pdir.name, frame, gt=False)
            stem = pdir / f"{pdir.name}_frame{frame:02d}"
            if img is None:
                raise FileNotFoundError(f"{pdir.name}: {phase} frame {frame} image {str(stem) + '.nii.gz'!r} not found.")
            lbl = _frame_file(pdir, pdir.name, frame, gt=True)
            if lbl is None:
                if require_labels:
                    raise FileNotFoundError(f"{pdir.name}: {phase} label {str(stem) + '_gt.nii.gz'!r} not found.")
                labelled = False
            case = {"phase": phase, "frame": frame, "image": img}
            if lbl is not None:
                case["label"] = lbl
            cases.append(case)
        if frames["ED"] == frames["ES"]:
            logger.warning("%s: ED and ES are the same frame %d; one case kept", pdir.name, frames["ED"])
            cases = cases[:1]
        out[pdir.name] = {"group": info.get("Group", ""), "labelled": labelled, "cases": cases}
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
    official_test: bool = True,
) -> Path:
    """Write the ACDC datalist (ED and ES frames as cases, split by patient).

    Args:
        root: the ACDC folder holding ``training/`` (and ``testing/``).
        out: folder of the JSON (default ``root``).
        name: JSON file name.
        absolute: absolute paths instead of paths relative to ``out``.
        val_fraction: fraction of (training) patients for validation.
        test_fraction: fraction of training patients for test, used only without the
            official labelled test set.
        seed: split seed.
        check: compare image and label grids from the NIfTI headers.
        official_test: use the labelled ``testing/`` patients as the test split.

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: missing folders, Info.cfg, frames or training labels.
        ValueError: malformed Info.cfg, no patients, grid mismatches, bad fractions.
    """
    root = _common.require_dir(root, "ACDC root")
    train_dir, test_dir = _find_sets(root)
    train = collect(train_dir, require_labels=True)
    test = collect(test_dir, require_labels=False) if test_dir is not None else {}
    use_official = official_test and bool(test) and all(p["labelled"] for p in test.values())
    _common.check_fractions(val_fraction, 0.0 if use_official else test_fraction)
    if check:
        for pats in (train, test):
            for p in pats.values():
                for c in p["cases"]:
                    if "label" in c:
                        _common.check_same_grid(c["image"], c["label"])

    groups = {k: v["group"] for k, v in train.items()}
    if use_official:
        split = _common.split_subjects(sorted(train), val_fraction, 0.0, seed, groups=groups)
        split["test"] = sorted(test)
        note = (f"official testing patients as test ({len(test)}); {len(train)} training patients split "
                f"into training/validation with val_fraction={val_fraction}, stratified by Group")
        unlabeled_pats: list[str] = []
    else:
        split = _common.split_subjects(sorted(train), val_fraction, test_fraction, seed, groups=groups)
        note = (f"{len(train)} training patients split with val_fraction={val_fraction}, "
                f"test_fraction={test_fraction}, stratified by Group")
        unlabeled_pats = sorted(test)
    pool = {**train, **test}
    out_dir = Path(out).expanduser() if out is not None else root

    def entry(patient: str, case: dict[str, Any]) -> dict[str, Any]:
        e = {"image": _common.entry_path(case["image"], out_dir, absolute)}
        if "label" in case:
            e["label"] = _common.entry_path(case["label"], out_dir, absolute)
        e.update({"subject": patient, "phase": case["phase"], "frame": case["frame"],
                  "group": pool[patient]["group"]})
        return e

    cases = {k: [entry(p, c) for p in pats for c in pool[p]["cases"]] for k, pats in split.items()}
    unlabeled = [entry(p, c) for p in unlabeled_pats for c in pool[p]["cases"]]
    meta = _common.assemble(
        name="ACDC",
        description=(f"Automated Cardiac Diagnosis Challenge cine MRI, ED and ES frames as cases "
                     f"(3D short-axis stacks). Source: {train_dir}" + (f" and {test_dir}" if test_dir else "") + "."),
        labels=ACDC_LABELS,
        cases_by_split=cases,
        absolute=absolute,
        seed=seed,
        split_note=note,
        extra={"modality": {"0": "cine MRI"},
               "reference": "Bernard et al., IEEE TMI 37(11), 2018",
               "unlabeled": unlabeled},
    )
    path = _common.write_datalist(out_dir / name, meta)
    logger.info("ACDC: %s", meta["split"]["counts"])
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("root", help="ACDC folder with training/ (and testing/) patient folders")
    _common.add_common_args(p)
    p.add_argument("--no-official-test", action="store_true",
                   help="draw the test split from the training patients even when testing/ has labels")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments and write the datalist; 0 on success, 1 on missing/malformed input."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    return _common.run("prepare_acdc", lambda: prepare(
        Path(args.root), None if args.out is None else Path(args.out), name=args.name, absolute=args.absolute,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, check=not args.no_check,
        official_test=not args.no_official_test,
    ))


if __name__ == "__main__":
    sys.exit(main())
