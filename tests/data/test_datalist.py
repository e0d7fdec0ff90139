"""MSD-style datalist loading: resolution of paths and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from volattack.data.datalist import load_datalist


def _write(tmp_path: Path, obj, name: str = "dataset.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / sub).mkdir()
    for name in ("imagesTr/a.nii.gz", "labelsTr/a.nii.gz", "imagesTs/b.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_resolves_relative_to_json_folder(files):
    p = _write(files, {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz",
                                     "case": "a"}]})
    out = load_datalist(p)
    assert out == [{"image": str(files.resolve() / "imagesTr/a.nii.gz"),
                    "label": str(files.resolve() / "labelsTr/a.nii.gz"), "case": "a"}]


def test_base_dir_and_absolute_paths(files, tmp_path_factory):
    other = tmp_path_factory.mktemp("json_elsewhere")
    absolute = str(files / "labelsTr/a.nii.gz")
    p = _write(other, {"training": [{"image": "imagesTr/a.nii.gz", "label": absolute}]})
    out = load_datalist(p, base_dir=files)
    assert out[0]["image"] == str(files.resolve() / "imagesTr/a.nii.gz")
    assert out[0]["label"] == absolute
    with pytest.raises(FileNotFoundError, match="entry 0 of 'training'.*image file not found"):
        load_datalist(p)  # relative to the JSON's own folder: missing


def test_plain_string_entries_without_labels(files):
    p = _write(files, {"test": ["imagesTs/b.nii.gz", {"image": "imagesTr/a.nii.gz"}]})
    out = load_datalist(p, key="test", require_label=False)
    assert out == [{"image": str(files.resolve() / "imagesTs/b.nii.gz")},
                   {"image": str(files.resolve() / "imagesTr/a.nii.gz")}]
    with pytest.raises(ValueError, match="entry 0 of 'test'.*has no 'label' field"):
        load_datalist(p, key="test")


def test_an_image_may_be_one_file_per_channel(files):
    (files / "imagesTr/a_0001.nii.gz").write_bytes(b"x")
    p = _write(files, {"training": [{"image": ["imagesTr/a.nii.gz", "imagesTr/a_0001.nii.gz"],
                                     "label": "labelsTr/a.nii.gz"}]})
    assert load_datalist(p)[0]["image"] == [str(files.resolve() / "imagesTr/a.nii.gz"),
                                            str(files.resolve() / "imagesTr/a_0001.nii.gz")]
    p = _write(files, {"training": [{"image": ["imagesTr/a.nii.gz", "imagesTr/zz_0001.nii.gz"],
                                     "label": "labelsTr/a.nii.gz"}]})
    with pytest.raises(FileNotFoundError, match=r"entry 0 of 'training'.*image file not found: .*zz_0001.nii.gz"):
        load_datalist(p)


def test_check_files_false_skips_existence(tmp_path):
    p = _write(tmp_path, {"training": [{"image": "nope.nii.gz", "label": "nope_l.nii.gz"}]})
    out = load_datalist(p, check_files=False)
    assert out[0]["image"].endswith("nope.nii.gz")


def test_empty_split_warns(tmp_path):
    p = _write(tmp_path, {"training": []})
    with pytest.warns(UserWarning, match="'training'.*is empty"):
        assert load_datalist(p) == []


def test_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="Datalist JSON not found: .*missing.json"):
        load_datalist(tmp_path / "missing.json")


def test_invalid_json(tmp_path):
    p = _write(tmp_path, '{"training": [', "broken.json")
    with pytest.raises(ValueError, match="broken.json' is not valid JSON"):
        load_datalist(p)


def test_top_level_not_object(tmp_path):
    p = _write(tmp_path, [1, 2])
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        load_datalist(p)


def test_missing_key_lists_available(tmp_path):
    p = _write(tmp_path, {"training": [], "validation": [], "name": "x"})
    with pytest.raises(ValueError, match=r"key 'test' not found.*available list keys: \['training', 'validation'\]"):
        load_datalist(p, key="test")


def test_split_not_a_list(tmp_path):
    p = _write(tmp_path, {"training": {"image": "a"}})
    with pytest.raises(ValueError, match="key 'training'.*must be a list of cases, got dict"):
        load_datalist(p)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"label": "labelsTr/a.nii.gz"}, "entry 1 of 'training'.*has no 'image' field"),
        ({"image": "imagesTr/a.nii.gz"}, "entry 1 of 'training'.*has no 'label' field"),
        (42, "entry 1 of 'training'.*must be an object or a path string, got int"),
        ({"image": [], "label": "labelsTr/a.nii.gz"},
         r"entry 1 of 'training'.*'image' must be a non-empty path string or a non-empty list of them .*got \[\]"),
        ({"image": ["imagesTr/a.nii.gz", 3], "label": "labelsTr/a.nii.gz"}, r"'image' must be .*got \['imagesTr/a.nii.gz', 3\]"),
        ({"image": "imagesTr/a.nii.gz", "label": ["labelsTr/a.nii.gz"]},
         r"entry 1 of 'training'.*'label' must be a non-empty path string, got \['labelsTr/a.nii.gz'\]"),
        ({"image": "imagesTr/a.nii.gz", "label": ""}, "entry 1 of 'training'.*'label' must be a non-empty path"),
    ],
)
def test_bad_entries_name_index(files, entry, match):
    good = {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}
    p = _write(files, {"training": [good, entry]})
    with pytest.raises(ValueError, match=match):
        load_datalist(p)


def test_missing_referenced_file_names_key_index_path(files):
    good = {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}
    bad = {"image": "imagesTr/a.nii.gz", "label": "labelsTr/zz.nii.gz"}
    p = _write(files, {"validation": [good, good, bad]})
    with pytest.raises(FileNotFoundError, match=r"entry 2 of 'validation'.*label file not found: .*labelsTr/zz.nii.gz"):
        load_datalist(p, key="validation")
