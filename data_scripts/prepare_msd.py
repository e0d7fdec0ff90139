#!/usr/bin/env python
"""Re-split a Medical Segmentation Decathlon task into a volattack train/validation/test datalist.

Input: a task folder you already have (Antonelli et al., Nat. Commun. 2022)::

    TaskXX_Name/dataset.json   {"labels", "modality", "tensorImageSize", "training": [...], "test": [...]}
    TaskXX_Name/imagesTr/*.nii.gz  labelsTr/*.nii.gz  imagesTs/*.nii.gz

The labelled ``"training"`` cases are re-split by subject into training/validation/test (seeded):
MSD gives no subject identifiers beyond case names, so the subject is the case name (the image
file name without ``.nii.gz``) unless ``--subject-regex`` extracts a shorter key (its first
group, e.g. ``'^(hippocampus_\\d+)'``). MSD's own ``"test"`` images have no labels; they are
kept under ``"unlabeled"``. Label names come from the task's ``dataset.json``.

Multi-modal (4D) tasks (e.g. Task01_BrainTumour: FLAIR, T1w, T1gd, T2w): each image is a 4D
NIfTI ``(H, W, D, C)``; volattack's loader moves the channels first, so a model needs
``model.in_channels = C`` and one intensity window is applied to every channel (the datalist's
``"channels"`` entry records the order). ``--channel N`` instead writes 3D copies of channel
``N`` (float32 NIfTI, same affine) under ``--out/imagesTr_<name>/`` and points the datalist at
them. Nothing is downloaded; the task's own ``dataset.json`` is never overwritten::

    python data_scripts/prepare_msd.py /data/Task09_Spleen --out data/spleen --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

logger = logging.getLogger("prepare_msd")


def _read_task(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not an MSD task folder: {str(path)!r} not found "
            f"(expected TaskXX_Name/dataset.json, imagesTr/, labelsTr/)."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _common.PrepareError(f"{str(path)!r} is not valid JSON: {e}.") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list) or not meta["training"]:
        raise _common.PrepareError(f"{str(path)!r} has no non-empty 'training' list of cases.")
    if not isinstance(meta.get("labels"), dict) or not meta["labels"]:
        raise _common.PrepareError(f"{str(path)!r} has no 'labels' mapping (class index -> name).")
    return meta


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)


def _channels(meta: dict[str, Any], first_image: Path) -> int:
    """Number of channels of the task's images (1 for 3D)."""
    import nibabel as nib

    try:
        shape = nib.load(str(first_image)).shape
    except Exception as e:
        raise _common.PrepareError(f"Cannot read the NIfTI header of {str(first_image)!r}: {e}") from e
    n = int(shape[3]) if len(shape) == 4 else 1
    modality = meta.get("modality") or {}
    if modality and len(modality) != n:
        logger.warning("dataset.json lists %d modalities but %s has %d channel(s)", len(modality), first_image, n)
    return n


def _extract_channel(src: Path, dst: Path, channel: int) -> None:
    import nibabel as nib
    import numpy as np

    from volattack.data.io import write_nifti

    img = nib.load(str(src))
    if len(img.shape) != 4 or not 0 <= channel < img.shape[3]:
        raise _common.PrepareError(f"--channel {channel} is out of range for {str(src)!r} with shape {img.shape}.")
    data = np.asarray(img.dataobj[..., channel], dtype=np.float32)
    write_nifti(data, dst, img.affine)


def prepare(
    root: Path,
    out: Optional[Path] = None,
    *,
    name: str = "datalist.json",
    absolute: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    check: bool = True,
    subject_regex: Optional[str] = None,
    channel: Optional[int] = None,
) -> Path:
    """Write the re-split MSD datalist.

    Args:
        root: the ``TaskXX_Name`` folder.
        out: folder of the JSON (and of extracted channels); default ``root``.
        name: JSON file name (must differ from the task's own ``dataset.json`` when ``out``
            is ``root``).
        absolute: absolute paths instead of paths relative to ``out``.
        val_fraction: fraction of subjects for validation.
        test_fraction: fraction of subjects for test.
        seed: split seed.
        check: compare image and label grids from the NIfTI headers.
        subject_regex: regex whose first group (or whole match) of the case name is the subject.
        channel: for 4D tasks, write 3D copies of this channel and use them.

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: task folder, its dataset.json, or a listed file is missing.
        ValueError: malformed dataset.json, a regex that does not match, bad channel,
            grid mismatches, bad fractions, or a target that would overwrite the task's JSON.
    """
    root = _common.require_dir(root, "MSD task folder")
    _common.check_fractions(val_fraction, test_fraction)
    meta = _read_task(root)
    out_dir = Path(out).expanduser() if out is not None else root
    target = out_dir / name
    if target.resolve() == (root / "dataset.json").resolve():
        raise _common.PrepareError(
            f"refusing to overwrite the task's own {str(target)!r}: pass --out or another --name."
        )
    pattern = re.compile(subject_regex) if subject_regex else None

    pairs: list[tuple[str, str, Path, Path]] = []  # (case, subject, image, label)
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise _common.PrepareError(
                f"training entry {i} of {str(root / 'dataset.json')!r} needs 'image' and 'label': {entry!r}."
            )
        img, lbl = _resolve(root, entry["image"]), _resolve(root, entry["label"])
        for kind, p in (("image", img), ("label", lbl)):
            if not p.is_file():
                raise FileNotFoundError(f"training entry {i}: {kind} file not found: {str(p)!r}.")
        case = _common.nifti_stem(img)
        subject = case
        if pattern is not None:
            m = pattern.search(case)
            if not m:
                raise _common.PrepareError(f"--subject-regex {subject_regex!r} does not match case {case!r}.")
            subject = m.group(1) if m.groups() else m.group(0)
        pairs.append((case, subject, img, lbl))
    if check:
        for _, _, img, lbl in pairs:
            _common.check_same_grid(img, lbl)

    n_channels = _channels(meta, pairs[0][2])
    modality = {str(k): v for k, v in (meta.get("modality") or {}).items()}
    extra: dict[str, Any] = {
        "modality": modality,
        "source": {k: meta[k] for k in ("name", "description", "reference", "licence", "release") if k in meta},
    }
    if channel is not None:
        if n_channels == 1:
            raise _common.PrepareError(f"--channel {channel} given but the images of {str(root)!r} are 3D.")
        if not 0 <= channel < n_channels:
            raise _common.PrepareError(f"--channel must be in [0, {n_channels - 1}], got {channel}.")
        mod_name = re.sub(r"[^A-Za-z0-9]+", "", str(modality.get(str(channel), f"ch{channel}"))) or f"ch{channel}"
        new_pairs = []
        for case, subject, img, lbl in pairs:
            dst = out_dir / f"imagesTr_{mod_name}" / f"{case}.nii.gz"
            _extract_channel(img, dst, channel)
            new_pairs.append((case, subject, dst, lbl))
        pairs = new_pairs
        extra["channels"] = {"count": 1, "extracted_channel": channel,
                             "name": modality.get(str(channel), f"channel {channel}"),
                             "note": f"3D copies of channel {channel} written under imagesTr_{mod_name}/."}
        extra["modality"] = {"0": modality.get(str(channel), f"channel {channel}")}
    elif n_channels > 1:
        extra["channels"] = {
            "count": n_channels,
            "order": modality,
            "note": (f"4D images (H, W, D, {n_channels}); volattack loads them channel-first: set "
                     f"model.in_channels={n_channels}. One intensity window applies to all channels; "
                     f"use --channel N for single-modality 3D copies."),
        }
        logger.info("4D task with %d channels %s: set model.in_channels=%d", n_channels, modality, n_channels)

    by_subject: dict[str, list[tuple[str, Path, Path]]] = {}
    for case, subject, img, lbl in pairs:
        by_subject.setdefault(subject, []).append((case, img, lbl))
    split = _common.split_subjects(sorted(by_subject), val_fraction, test_fraction, seed)
    cases = {
        k: [
            {"image": _common.entry_path(img, out_dir, absolute), "label": _common.entry_path(lbl, out_dir, absolute),
             "subject": s, "case": case}
            for s in subs for case, img, lbl in sorted(by_subject[s])
        ]
        for k, subs in split.items()
    }
    unlabeled = []
    for entry in meta.get("test") or []:
        rel = entry.get("image") if isinstance(entry, dict) else entry
        if isinstance(rel, str) and _resolve(root, rel).is_file():
            unlabeled.append({"image": _common.entry_path(_resolve(root, rel), out_dir, absolute)})
    extra["unlabeled"] = unlabeled
    labels = {int(k): str(v) for k, v in meta["labels"].items()}
    task_name = str(meta.get("name", root.name))
    result = _common.assemble(
        name=task_name,
        description=(f"MSD task {root.name} re-split for volattack. Source: {root}. Subject = "
                     + (f"first group of --subject-regex {subject_regex!r}" if subject_regex else "case name")
                     + "; MSD's unlabelled test images are under 'unlabeled'."),
        labels=labels,
        cases_by_split=cases,
        absolute=absolute,
        seed=seed,
        split_note=f"seeded permutation of {len(by_subject)} subjects ({len(pairs)} labelled cases): "
                   f"val_fraction={val_fraction}, test_fraction={test_fraction}",
        extra=extra,
    )
    if channel is None and n_channels > 1:
        result["tensorImageSize"] = "4D"
    path = _common.write_datalist(target, result)
    logger.info("MSD %s: %s", task_name, result["split"]["counts"])
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("root", help="MSD task folder (TaskXX_Name with dataset.json, imagesTr, labelsTr)")
    _common.add_common_args(p)
    p.set_defaults(name="datalist.json")
    p.add_argument("--subject-regex", default=None,
                   help="regex whose first group of the case name is the subject (default: the case name)")
    p.add_argument("--channel", type=int, default=None,
                   help="for 4D tasks: write 3D copies of this channel under --out and use them")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments and write the datalist; 0 on success, 1 on missing/malformed input."""
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    if args.subject_regex is not None:
        try:
            re.compile(args.subject_regex)
        except re.error as e:
            sys.stderr.write(f"prepare_msd: error: --subject-regex {args.subject_regex!r} is not a valid regex: {e}\n")
            return 2
    return _common.run("prepare_msd", lambda: prepare(
        Path(args.root), None if args.out is None else Path(args.out), name=args.name, absolute=args.absolute,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, check=not args.no_check,
        subject_regex=args.subject_regex, channel=args.channel,
    ))


if __name__ == "__main__":
    sys.exit(main())
