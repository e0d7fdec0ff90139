"""data_scripts/prepare_acdc.py on fake ACDC folder trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from volattack.data.datalist import load_datalist

GROUPS = ["DCM", "HCM", "MINF", "NOR", "RV"]


@pytest.fixture(scope="module")
def acdc(load_script):
    return load_script("prepare_acdc")


def _patient(folder: Path, nii, num: int, group: str, es: int, gt: bool = True) -> None:
    name = f"patient{num:03d}"
    d = folder / name
    d.mkdir(parents=True)
    (d / "Info.cfg").write_text(f"ED: 1\nES: {es}\nGroup: {group}\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
    nii(d / f"{name}_4d.nii.gz", shape=(8, 8, 4))
    for frame in (1, es):
        nii(d / f"{name}_frame{frame:02d}.nii.gz", shape=(8, 8, 4))
        if gt:
            nii(d / f"{name}_frame{frame:02d}_gt.nii.gz", shape=(8, 8, 4), dtype=np.uint8, value=2)


def _tree(root: Path, nii, n_train: int = 10, n_test: int = 3, test_gt: bool = True) -> Path:
    for i in range(1, n_train + 1):
        _patient(root / "training", nii, i, GROUPS[(i - 1) % 2], es=10 + i)
    for i in range(101, 101 + n_test):
        _patient(root / "testing", nii, i, GROUPS[i % 5], es=9, gt=test_gt)
    return root


def test_official_test_split_by_patient(acdc, nii, tmp_path, capsys):
    root = _tree(tmp_path / "ACDC", nii)
    assert acdc.main([str(root), "--val-fraction", "0.2", "--seed", "1"]) == 0
    path = Path(capsys.readouterr().out.strip())
    meta = json.loads(path.read_text())
    assert meta["labels"] == {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    subs = {k: {c["subject"] for c in meta[k]} for k in ("training", "validation", "test")}
    assert subs["test"] == {"patient101", "patient102", "patient103"}
    assert len(subs["validation"]) == 2 and len(subs["training"]) == 8
    assert not (subs["training"] & subs["validation"] or subs["training"] & subs["test"] or subs["validation"] & subs["test"])
    # stratified: the two validation patients come from the two pathology groups
    assert sorted(c["group"] for c in meta["validation"] if c["phase"] == "ED") == ["DCM", "HCM"]
    for k in ("training", "validation", "test"):
        cases = load_datalist(path, key=k)
        assert len(cases) == 2 * len(subs[k])  # ED and ES of every patient
        for c in cases:
            assert c["phase"] in ("ED", "ES") and Path(c["label"]).name.endswith("_gt.nii.gz")
    es = [c for k in ("training", "validation") for c in meta[k] if c["subject"] == "patient003" and c["phase"] == "ES"]
    assert len(es) == 1 and es[0]["frame"] == 13 and es[0]["image"] == "training/patient003/patient003_frame13.nii.gz"
    assert not any("_4d" in c["image"] for k in ("training", "validation", "test") for c in meta[k])
    assert meta["unlabeled"] == []


def test_unlabelled_testing_and_no_official_test(acdc, nii, tmp_path):
    root = _tree(tmp_path / "ACDC", nii, test_gt=False)
    assert acdc.main([str(root), "--val-fraction", "0.1", "--test-fraction", "0.2"]) == 0
    meta = json.loads((root / "dataset.json").read_text())
    subs = {k: {c["subject"] for c in meta[k]} for k in ("training", "validation", "test")}
    assert [len(subs[k]) for k in ("training", "validation", "test")] == [7, 1, 2]
    assert all(s.startswith("patient0") for k in subs for s in subs[k])
    assert {c["subject"] for c in meta["unlabeled"]} == {"patient101", "patient102", "patient103"}
    assert all("label" not in c for c in meta["unlabeled"])
    root2 = _tree(tmp_path / "ACDC2", nii)
    assert acdc.main([str(root2), "--no-official-test", "--out", str(tmp_path / "o")]) == 0
    meta2 = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert all(c["subject"].startswith("patient0") for c in meta2["test"])


def test_database_subfolder_is_found(acdc, nii, tmp_path):
    root = tmp_path / "ACDC"
    _tree(root / "database", nii, n_train=3, n_test=0)
    assert acdc.main([str(root), "--val-fraction", "0.0", "--test-fraction", "0.34"]) == 0
    meta = json.loads((root / "dataset.json").read_text())
    assert len(meta["test"]) == 2 and meta["training"][0]["image"].startswith("database/training/")


def test_errors(acdc, nii, tmp_path, capsys):
    assert acdc.main([str(tmp_path / "nope")]) == 1
    assert "ACDC root not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert acdc.main([str(tmp_path / "empty")]) == 1
    assert "No ACDC training folder" in capsys.readouterr().err
    root = _tree(tmp_path / "a", nii, n_train=3, n_test=0)
    (root / "training" / "patient002" / "Info.cfg").unlink()
    assert acdc.main([str(root)]) == 1
    assert "Info.cfg not found" in capsys.readouterr().err and not (root / "dataset.json").exists()
    root = _tree(tmp_path / "b", nii, n_train=3, n_test=0)
    (root / "training" / "patient001" / "patient001_frame11_gt.nii.gz").unlink()
    assert acdc.main([str(root)]) == 1
    assert "patient001: ES label" in capsys.readouterr().err
    root = _tree(tmp_path / "c", nii, n_train=3, n_test=0)
    (root / "training" / "patient003" / "Info.cfg").write_text("Group: NOR\n")
    assert acdc.main([str(root)]) == 1
    assert "must give an integer ED frame, got None" in capsys.readouterr().err
