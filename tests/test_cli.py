"""The command line: fast help, listing, argument/config errors with exit codes, and an end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from volattack.cli import main


def test_help_and_parser_do_not_import_torch():
    code = (
        "import sys; from volattack.cli import build_parser; build_parser().format_help(); "
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "volattack", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("volattack ")


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attacks: " in out and "pgd" in out and "models: " in out and "unet" in out and "dice_ce" in out
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert list(lines) == ["attacks", "models", "objectives", "defenses", "sources", "triggers", "detectors"]
    assert set(lines["triggers"].split(", ")) == {"patch", "spectral", "dct", "learned", "dct_learned"}
    assert set(lines["detectors"].split(", ")) == {"uncertainty", "spectral", "mahalanobis", "cnn"}
    assert "nnunet" in lines["sources"] and "dct_quant" in lines["defenses"]
    assert main(["list", "triggers"]) == 0 and capsys.readouterr().out == f"triggers: {lines['triggers']}\n"


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2


def test_unknown_config_key_exit_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("evaluate:\n  checkpoint: x.pt\n  atacks: []\n")
    assert main(["evaluate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Unknown config key 'evaluate.atacks'. Did you mean 'attacks'?" in err


def test_bad_attack_name_and_budget_fail_before_work(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("evaluate:\n  checkpoint: missing.pt\n  attacks:\n    - name: pgdd\n")
    assert main(["evaluate", str(cfg)]) == 2
    assert "Unknown attack 'pgdd'. Did you mean 'pgd'?" in capsys.readouterr().err
    cfg.write_text("evaluate:\n  checkpoint: missing.pt\n  attacks:\n    - name: pgd\n      params: {eps: -1}\n")
    assert main(["evaluate", str(cfg)]) == 2
    assert "eps must be >= 0, got -1" in capsys.readouterr().err
    cfg.write_text("evaluate:\n  checkpoint: missing.pt\n  attacks:\n    - name: pgd\n      params: {steps: -2}\n")
    assert main(["evaluate", str(cfg)]) == 2
    assert "steps must be >= 0, got -2" in capsys.readouterr().err


def test_bad_set_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\n")
    assert main(["evaluate", str(cfg), "--set", "train.epochz=3"]) == 2
    assert "Did you mean 'epochs'?" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"evaluate:\n  checkpoint: {tmp_path / 'nope.pt'}\n")
    assert main(["evaluate", str(cfg)]) == 1
    assert "nope.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_end_to_end_and_resume(tmp_path, capsys):
    """Phantoms -> 1 epoch of training -> clean + PGD evaluation; a rerun reuses everything."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"""
seed: 0
output_dir: {tmp_path / 'run'}
phantoms: {{out: {tmp_path / 'ph'}, n: 2, n_val: 1, n_test: 2, size: [32, 32, 24], seed: 0}}
data:
  preprocess: {{spacing: null, roi_size: [16, 16, 16], num_samples: 1}}
model: {{name: unet, out_channels: 5, kwargs: {{channels: [4, 8, 16], strides: [2, 2]}}}}
train: {{epochs: 1, batch_size: 1, val_interval: 1}}
evaluate:
  attacks:
    - name: pgd
      params: {{steps: 2}}
      sweep: {{eps: [2/255, 8/255]}}
    - name: gn
      params: {{eps: 8/255}}
"""
    )
    assert main(["benchmark", str(cfg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pgd(eps=8/255)" in out and "report:" in out
    run = tmp_path / "run"
    for name in ("config.yaml", "results.json", "report.md", "results.csv", "train/best.pt"):
        assert (run / name).is_file(), name
    res = json.loads((run / "results.json").read_text())
    assert res["seed"] == 0 and res["threat_model"] == "volume" and len(res["cases"]) == 2
    assert set(res["summary"]["attacks"]) == {"pgd(eps=2/255)", "pgd(eps=8/255)", "gn(eps=8/255)"}
    assert "torch" in res["versions"]
    s = res["summary"]["attacks"]["pgd(eps=8/255)"]
    assert s["linf"] <= 8 / 255 + 1e-6
    assert s["linf_units"] == pytest.approx(s["linf"] * 425, rel=1e-4)
    assert "| pgd(eps=8/255) |" in (run / "report.md").read_text()
    # rerun: cases are reused (file times unchanged), results identical
    case_files = sorted((run / "cases").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in case_files]
    assert main(["benchmark", str(cfg), "--quiet"]) == 0
    assert [p.stat().st_mtime_ns for p in case_files] == stamps
    again = json.loads((run / "results.json").read_text())
    assert again["summary"] == res["summary"]
    # the attack command on the trained checkpoint, with adversarial volumes saved as NIfTI in HU
    ckpt = run / "train" / "best.pt"
    datalist = tmp_path / "ph" / "dataset.json"
    out_dir = tmp_path / "atk"
    assert main(["attack", str(ckpt), str(datalist), "pgd", "-p", "eps=4/255", "-p", "steps=1",
                 "--max-cases", "1", "--save-adv", "--out", str(out_dir), "--quiet"]) == 0
    saved = sorted((out_dir / "adversarial").glob("*.nii.gz"))
    assert len(saved) == 1
    import nibabel as nib
    import numpy as np

    img = nib.load(str(saved[0]))
    assert img.get_data_dtype() == np.float32
    src = nib.load(str(tmp_path / "ph" / json.loads(datalist.read_text())["test"][0]["image"]))
    np.testing.assert_allclose(img.header.get_zooms(), src.header.get_zooms(), rtol=1e-5)
    assert img.get_fdata().min() >= -175 - 1e-3 and img.get_fdata().max() <= 250 + 1e-3


def test_bundle_is_refused_without_trust_bundle(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text('{"network_def": {"_target_": "os.system", "command": "echo hi"}}')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"evaluate:\n  checkpoint: {bundle}\n")
    assert main(["evaluate", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "--trust-bundle" in err and "bundle" in err


def test_only_rank_zero_prints_under_torchrun(monkeypatch, capsys):
    """Under torchrun every rank runs the command; tables and paths are printed once (rank 0)."""
    from volattack import cli

    monkeypatch.setenv("RANK", "1")
    cli._out("table\n")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    cli._out("table\n")
    assert capsys.readouterr().out == "table\n"
