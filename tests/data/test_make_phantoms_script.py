"""The stand-alone data_scripts/make_phantoms.py entry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "data_scripts" / "make_phantoms.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_phantoms_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_writes_dataset(script, tmp_path, capsys):
    rc = script.main([str(tmp_path / "ph"), "--n", "2", "--n-val", "1", "--n-test", "0",
                      "--size", "16", "16", "16", "--seed", "4", "-p", "noise_hu=5",
                      "-p", "perirenal_fat=false"])
    assert rc == 0
    path = Path(capsys.readouterr().out.strip())
    meta = json.loads(path.read_text())
    assert meta["numTraining"] == 2 and len(meta["validation"]) == 1 and meta["test"] == []
    assert meta["generator"]["seed"] == 4
    assert meta["generator"]["phantom_kwargs"] == {"noise_hu": 5.0, "perirenal_fat": False}
    assert (tmp_path / "ph" / "labelsTr" / "case_002.nii.gz").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--n", "0"], "n must be an integer >= 1, got 0"),
        (["--size", "8", "16", "16"], "size must be >= 16"),
        (["-p", "noise_hu"], "--param must be KEY=VALUE"),
        (["-p", "noise_hu=loud"], "needs a number or true/false"),
    ],
)
def test_bad_arguments_exit_2(script, tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        script.main([str(tmp_path / "x")] + argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
