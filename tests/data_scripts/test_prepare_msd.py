"""data_scripts/prepare_msd.py on fake Medical Segmentation Decathlon task folders."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volattack.data.datalist import load_datalist


@pytest.fixture(scope="module")
def msd(load_script):
    return load_script("prepare_msd")


def _task(root: Path, nii, cases, labels=None, test=("hippocampus_900",), four_d: int = 0) -> Path:
    training = []
    for c in cases:
        img = root / "imagesTr" / f"{c}.nii.gz"
        if four_d:
            data = np.stack([np.full((8, 8, 8), 10.0 * k, np.float32) for k in range(four_d)], -1)
            img.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(img))
        else:
            nii(img)
        nii(root / "labelsTr" / f"{c}.nii.gz", dtype=np.uint8, value=1)
        training.append({"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"})
    (root / "imagesTr" / "._junk.nii.gz").write_bytes(b"\x00")  # macOS AppleDouble file: ignored
    for t in test:
        nii(root / "imagesTs" / f"{t}.nii.gz")
    meta = {
        "name": "Hippocampus", "description": "fake", "licence": "CC-BY-SA 4.0", "tensorImageSize": "4D" if four_d else "3D",
        "modality": {str(k): m for k, m in enumerate(["FLAIR", "T1w", "T1gd", "T2w"][:max(four_d, 1)])} if four_d else {"0": "MRI"},
        "labels": labels or {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(training), "numTest": len(test),
        "training": training, "test": [f"./imagesTs/{t}.nii.gz" for t in test],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_resplit_keeps_labels_and_never_overwrites_source(msd, nii, tmp_path, capsys):
    cases = [f"hippocampus_{i:03d}" for i in range(1, 11)]
    root = _task(tmp_path / "Task04_Hippocampus", nii, cases)
    source = (root / "dataset.json").read_text()
    assert msd.main([str(root), "--seed", "0"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == root / "datalist.json" and (root / "dataset.json").read_text() == source
    meta = json.loads(path.read_text())
    assert meta["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert meta["source"]["licence"] == "CC-BY-SA 4.0" and meta["tensorImageSize"] == "3D"
    subs = {k: {c["subject"] for c in meta[k]} for k in ("training", "validation", "test")}
    assert [len(subs[k]) for k in ("training", "validation", "test")] == [7, 1, 2]
    assert not (subs["training"] & subs["test"] or subs["training"] & subs["validation"] or subs["validation"] & subs["test"])
    assert set().union(*subs.values()) == set(cases)
    for k in ("training", "validation", "test"):
        assert len(load_datalist(path, key=k)) == len(meta[k])
    assert meta["unlabeled"] == [{"image": "imagesTs/hippocampus_900.nii.gz"}]
    assert "channels" not in meta
    assert msd.main([str(root), "--name", "dataset.json"]) == 1
    assert "refusing to overwrite the task's own" in capsys.readouterr().err
    assert (root / "dataset.json").read_text() == source


def test_subject_regex_groups_cases(msd, nii, tmp_path):
    cases = [f"case_{s:02d}_{v}" for s in range(6) for v in ("a", "b")]
    root = _task(tmp_path / "Task99_Multi", nii, cases, test=())
    assert msd.main([str(root), "--subject-regex", r"^(case_\d+)_", "--val-fraction", "0.2", "--test-fraction", "0.2"]) == 0
    meta = json.loads((root / "datalist.json").read_text())
    where = {}
    for k in ("training", "validation", "test"):
        for c in meta[k]:
            assert where.setdefault(c["subject"], k) == k  # both visits of a subject in one split
    assert len(where) == 6 and all(len([c for k in ("training", "validation", "test") for c in meta[k] if c["subject"] == s]) == 2 for s in where)


def test_four_d_channels_documented_and_extracted(msd, nii, tmp_path):
    root = _task(tmp_path / "Task01_BrainTumour", nii, [f"BRATS_{i:03d}" for i in range(1, 6)], test=(), four_d=4)
    assert msd.main([str(root), "--out", str(tmp_path / "o4")]) == 0
    meta = json.loads((tmp_path / "o4" / "datalist.json").read_text())
    assert meta["tensorImageSize"] == "4D"
    assert meta["channels"]["count"] == 4 and meta["channels"]["order"]["1"] == "T1w"
    assert "model.in_channels=4" in meta["channels"]["note"]
    out = tmp_path / "o1"
    assert msd.main([str(root), "--out", str(out), "--channel", "1"]) == 0
    meta = json.loads((out / "datalist.json").read_text())
    assert meta["modality"] == {"0": "T1w"} and meta["channels"]["extracted_channel"] == 1
    case = load_datalist(out / "datalist.json", key="training")[0]
    assert Path(case["image"]).parent == (out / "imagesTr_T1w").resolve()
    img = nib.load(case["image"])
    assert img.shape == (8, 8, 8) and np.allclose(np.asarray(img.dataobj), 10.0)  # channel 1 holds 10
    assert Path(case["label"]).parent.name == "labelsTr"


def test_errors(msd, nii, tmp_path, capsys):
    assert msd.main([str(tmp_path / "missing")]) == 1
    assert "MSD task folder not found" in capsys.readouterr().err
    (tmp_path / "Task02_Heart").mkdir()
    assert msd.main([str(tmp_path / "Task02_Heart")]) == 1
    assert "is not an MSD task folder" in capsys.readouterr().err
    root = _task(tmp_path / "Task05", nii, ["p_1", "p_2", "p_3"], test=())
    (root / "labelsTr" / "p_2.nii.gz").unlink()
    assert msd.main([str(root)]) == 1
    assert "training entry 1: label file not found" in capsys.readouterr().err
    root = _task(tmp_path / "Task06", nii, ["p_1", "p_2", "p_3"], test=())
    assert msd.main([str(root), "--subject-regex", r"^zzz(\d)"]) == 1
    assert "does not match case 'p_1'" in capsys.readouterr().err
    assert msd.main([str(root), "--subject-regex", "("]) == 2
    assert "not a valid regex" in capsys.readouterr().err
    assert msd.main([str(root), "--channel", "0", "--out", str(tmp_path / "x")]) == 1
    assert "--channel 0 given but the images" in capsys.readouterr().err
    (root / "dataset.json").write_text("{not json")
    assert msd.main([str(root)]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
