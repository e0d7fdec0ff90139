"""data_scripts/prepare_btcv.py on fake BTCV folder trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from volattack.data.datalist import load_datalist

IDS = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010"]


@pytest.fixture(scope="module")
def btcv(load_script):
    return load_script("prepare_btcv")


def _tree(root: Path, nii, layout: str = "RawData/Training", ids=IDS, testing=("0061",)) -> Path:
    base = root / layout
    for i in ids:
        nii(base / "img" / f"img{i}.nii.gz", value=-100)
        nii(base / "label" / f"label{i}.nii.gz", dtype=np.uint8, value=1)
    for i in testing:
        nii(root / "RawData" / "Testing" / "img" / f"img{i}.nii.gz")
    return root


def _subjects(meta: dict) -> dict[str, set[str]]:
    return {k: {c["subject"] for c in meta[k]} for k in ("training", "validation", "test")}


def test_datalist_keys_split_and_files(btcv, nii, tmp_path, capsys):
    root = _tree(tmp_path / "BTCV", nii)
    assert btcv.main([str(root), "--seed", "3"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == root / "dataset.json"
    meta = json.loads(path.read_text())
    assert {"name", "labels", "training", "validation", "test", "paths", "split", "unlabeled"} <= set(meta)
    assert meta["paths"] == "relative to the folder of this file"
    assert len(meta["labels"]) == 14 and meta["labels"]["1"] == "spleen" and meta["labels"]["13"] == "adrenal_gland_left"
    assert meta["labels"]["0"] == "background" and meta["labels"]["6"] == "liver"
    subs = _subjects(meta)
    assert [len(subs[k]) for k in ("training", "validation", "test")] == [7, 1, 2]
    assert not (subs["training"] & subs["validation"] or subs["training"] & subs["test"] or subs["validation"] & subs["test"])
    assert set().union(*subs.values()) == set(IDS)
    for k in ("training", "validation", "test"):
        cases = load_datalist(path, key=k)  # every referenced file exists
        for c in cases:
            assert Path(c["image"]).name == f"img{c['subject']}.nii.gz"
            assert Path(c["label"]).name == f"label{c['subject']}.nii.gz"
    assert [c["subject"] for c in meta["unlabeled"]] == ["0061"]
    assert all(not Path(c["image"]).is_absolute() for c in meta["training"])
    # the same seed gives the same split; another seed another one
    assert btcv.main([str(root), "--seed", "3", "--out", str(tmp_path / "again")]) == 0
    assert _subjects(json.loads((tmp_path / "again" / "dataset.json").read_text())) == subs
    assert btcv.main([str(root), "--seed", "4", "--out", str(tmp_path / "other")]) == 0
    assert _subjects(json.loads((tmp_path / "other" / "dataset.json").read_text())) != subs


def test_out_folder_and_absolute_paths(btcv, nii, tmp_path, capsys):
    root = _tree(tmp_path / "raw", nii, layout="Training", testing=())
    out = tmp_path / "lists"
    assert btcv.main([str(root), "--out", str(out), "--absolute"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["paths"] == "absolute" and meta["unlabeled"] == []
    assert all(Path(c["image"]).is_absolute() for k in ("training", "test") for c in meta[k])
    assert btcv.main([str(root), "--out", str(out), "--name", "rel.json"]) == 0
    rel = json.loads((out / "rel.json").read_text())
    assert rel["training"][0]["image"].startswith("../raw/Training/img/")
    assert len(load_datalist(out / "rel.json", key="training")) == len(rel["training"])


def test_flat_layout(btcv, nii, tmp_path):
    root = _tree(tmp_path / "SABS", nii, layout=".", ids=IDS[:4], testing=())
    assert btcv.main([str(root), "--val-fraction", "0.25", "--test-fraction", "0.25"]) == 0
    meta = json.loads((root / "dataset.json").read_text())
    assert sum(len(meta[k]) for k in ("training", "validation", "test")) == 4


def test_errors_exit_nonzero_with_clear_message(btcv, nii, tmp_path, capsys):
    assert btcv.main([str(tmp_path / "missing")]) == 1
    assert "BTCV root not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert btcv.main([str(tmp_path / "empty")]) == 1
    assert "No BTCV training folders" in capsys.readouterr().err
    root = _tree(tmp_path / "orphan", nii, ids=IDS[:3], testing=())
    nii(root / "RawData" / "Training" / "label" / "label0099.nii.gz", dtype=np.uint8)
    assert btcv.main([str(root)]) == 1
    err = capsys.readouterr().err
    assert "labels without images" in err and "['0099']" in err
    root = _tree(tmp_path / "grid", nii, ids=IDS[:3], testing=())
    nii(root / "RawData" / "Training" / "label" / "label0002.nii.gz", shape=(8, 8, 4), dtype=np.uint8)
    assert btcv.main([str(root)]) == 1
    assert "spatial shape (8, 8, 8)" in capsys.readouterr().err
    assert btcv.main([str(root), "--no-check", "--val-fraction", "0.6", "--test-fraction", "0.5"]) == 1
    assert "val_fraction + test_fraction must be < 1" in capsys.readouterr().err
    assert not (root / "dataset.json").exists()
