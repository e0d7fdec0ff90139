"""data_scripts/_common.py: seeded subject splits, datalist paths, file-name helpers."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def common(load_script):
    load_script("prepare_btcv")  # puts data_scripts/ on sys.path
    import _common

    return _common


def test_split_counts_disjoint_and_seeded(common):
    subs = [f"s{i:02d}" for i in range(10)]
    a = common.split_subjects(subs, 0.1, 0.2, seed=0)
    assert [len(a[k]) for k in ("training", "validation", "test")] == [7, 1, 2]
    assert sorted(a["training"] + a["validation"] + a["test"]) == subs
    assert common.split_subjects(list(reversed(subs)), 0.1, 0.2, seed=0) == a  # input order irrelevant
    assert common.split_subjects(subs, 0.1, 0.2, seed=1) != a
    # a positive fraction gets at least one subject once n >= 3; with n < 3 it may get none
    assert [len(v) for v in common.split_subjects(["a", "b", "c"], 0.01, 0.01, seed=0).values()] == [1, 1, 1]
    assert common.split_subjects(["a", "b"], 0.1, 0.1, seed=0) == {"test": [], "validation": [], "training": ["a", "b"]}


def test_split_stratified_by_group(common):
    subs = [f"p{i:02d}" for i in range(10)]
    groups = {s: ("A" if i < 5 else "B") for i, s in enumerate(subs)}
    for seed in range(5):
        out = common.split_subjects(subs, 0.0, 0.2, seed=seed, groups=groups)
        assert sorted(groups[s] for s in out["test"]) == ["A", "B"]  # one of each group


@pytest.mark.parametrize(
    "args, match",
    [
        ((["a", "b", "c"], 1.0, 0.0, 0), r"val_fraction must be in \[0, 1\), got 1.0"),
        ((["a", "b", "c"], 0.0, -0.1, 0), r"test_fraction must be in \[0, 1\), got -0.1"),
        ((["a", "b", "c"], 0.5, 0.5, 0), "val_fraction \\+ test_fraction must be < 1"),
        ((["a", "a", "b"], 0.1, 0.1, 0), r"subjects must be unique, got duplicates \['a'\]"),
        ((["a", "b", "c"], 0.1, 0.1, -1), "seed must be an integer >= 0, got -1"),
        ((["a", "b"], 0.45, 0.45, 0), "2 subject\\(s\\) cannot be split .* no subject would be left"),
    ],
)
def test_split_bad_arguments(common, args, match):
    with pytest.raises(ValueError, match=match):
        common.split_subjects(*args)


def test_paths_and_names(common, tmp_path):
    f = tmp_path / "data" / "img" / "x.nii.gz"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")
    assert common.entry_path(f, tmp_path / "data", absolute=False) == "img/x.nii.gz"
    assert common.entry_path(f, tmp_path / "out", absolute=False) == "../data/img/x.nii.gz"
    assert common.entry_path(f, tmp_path, absolute=True) == f.resolve().as_posix()
    assert common.nifti_stem("a/img0001.nii.gz") == "img0001"
    assert common.nifti_stem("b.nii") == "b" and common.nifti_stem("c.mha") == "c"
    with pytest.raises(FileNotFoundError, match="BTCV root not found"):
        common.require_dir(tmp_path / "nope", "BTCV root")
    with pytest.raises(ValueError, match="must be a folder, got the file"):
        common.require_dir(f, "BTCV root")


def test_grid_check_reads_headers(common, nii, tmp_path):
    a = nii(tmp_path / "a.nii.gz", (8, 8, 8))
    b = nii(tmp_path / "b.nii.gz", (8, 8, 6), dtype="uint8")
    common.check_same_grid(a, a)
    with pytest.raises(ValueError, match=r"spatial shape \(8, 8, 8\) but label .*b\.nii\.gz.* has \(8, 8, 6\)"):
        common.check_same_grid(a, b)
