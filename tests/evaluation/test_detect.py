"""``volattack detect``: the detection figures by hand, config and input errors before any work
(nothing written), and a tiny end-to-end run through the command line that writes its files."""

from __future__ import annotations

import json

import pytest

from volattack.cli import main
from volattack.config import ConfigError
from volattack.evaluation.detect import (DetectConfig, DetectorSpec, check_case_counts, detection_figures,
                                         split_detect_config)


def test_detection_figures_by_hand():
    clean = [0.0, 1.0, 2.0, 3.0]
    adv = [2.5, 4.0, 5.0, 1.5]
    fig = detection_figures(clean, adv, threshold=2.0, fpr=0.05, n_boot=200, seed=0)
    # 2.5 beats 3 clean, 4 and 5 beat 4, 1.5 beats 2: 13 / 16
    assert fig["auroc"]["value"] == pytest.approx(13 / 16)
    assert fig["auroc"]["lo"] <= 13 / 16 <= fig["auroc"]["hi"] and fig["auroc"]["n"] == 4
    # test threshold at 5% FPR of 4 clean scores: floor(0.2) = 0 false positives -> 3.0; TPR 2/4
    assert fig["test_threshold"] == 3.0 and fig["tpr_at_fpr"]["value"] == 0.5
    # the fitted threshold 2.0: TPR 3/4, FPR 1/4
    assert fig["tpr_at_threshold"] == 0.75 and fig["fpr_at_threshold"] == 0.25
    sep = detection_figures([0, 1, 2], [3, 4, 5], threshold=2.0, fpr=0.05, n_boot=100, seed=0)
    assert sep["auroc"]["value"] == sep["auroc"]["lo"] == sep["auroc"]["hi"] == 1.0


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="needs a 'detect' section"):
        split_detect_config({"seed": 0})
    with pytest.raises(ConfigError, match="Did you mean 'mahalanobis'"):
        split_detect_config({"detect": {"detectors": [{"name": "mahalanobis2"}]}})
    with pytest.raises(ConfigError, match="Unknown config key 'detect.fit'. Did you mean 'fpr'|'fit_split'"):
        split_detect_config({"detect": {"fit": "validation"}})
    with pytest.raises(ConfigError, match="distinct labels"):
        split_detect_config({"detect": {"detectors": [{"name": "cnn"}, {"name": "cnn"}]}})
    with pytest.raises(ConfigError, match="adaptive.detectors names 'cn'.*Did you mean 'cnn'"):
        split_detect_config({"detect": {"detectors": [{"name": "cnn"}], "adaptive": {"detectors": ["cn"]}}})
    with pytest.raises(ConfigError, match="fpr must be"):
        split_detect_config({"detect": {"fpr": 0}})


def test_too_few_cases_state_the_minimum():
    cfg = DetectConfig(detectors=[DetectorSpec("spectral")])
    with pytest.raises(ValueError, match="has 3 cases; fitting a detector needs at least 5 clean and 5 attacked"):
        check_case_counts(cfg, 3, 4)
    with pytest.raises(ValueError, match="test_split='test' has 1 cases; the report needs at least 2"):
        check_case_counts(cfg, 5, 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Tiny phantoms (5 fitting, 2 test cases) and an untrained tiny UNet checkpoint."""
    import torch

    from volattack.data.config import PreprocessConfig
    from volattack.data.phantoms import make_phantom_dataset
    from volattack.models.checkpoint import save_checkpoint
    from volattack.models.config import ModelConfig
    from volattack.models.zoo import create_model

    root = tmp_path_factory.mktemp("detect")
    datalist = make_phantom_dataset(root / "ph", n=1, n_val=5, n_test=2, size=(24, 24, 16), seed=0, progress=False)
    mcfg = ModelConfig(name="unet", out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    torch.manual_seed(0)
    pre = PreprocessConfig(spacing=None, roi_size=[16, 16, 16])
    ckpt = save_checkpoint(root / "m.pt", create_model("unet", 1, 5, channels=[4, 8], strides=[2]), mcfg, preprocess=pre)
    return root, datalist, ckpt


def _write(root, datalist, ckpt, detectors: str, out: str, extra: str = "") -> str:
    cfg = root / f"{out}.yaml"
    cfg.write_text(f"""
seed: 0
output_dir: {root / out}
data:
  datalist: {datalist}
  preprocess: {{spacing: null, roi_size: [16, 16, 16]}}
model: {{name: unet, out_channels: 5, kwargs: {{channels: [4, 8], strides: [2]}}}}
detect:
  checkpoint: {ckpt}
  detectors: {detectors}
  attacks:
    - name: pgd
      params: {{eps: 8/255, steps: 1}}
  n_boot: 50
{extra}""")
    return str(cfg)


def test_end_to_end_writes_detect_json_and_md(tiny_run, capsys):
    root, datalist, ckpt = tiny_run
    cfg = _write(root, datalist, ckpt, "[{name: spectral, params: {bands: 4}}, {name: uncertainty}]", "run")
    assert main(["detect", cfg, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "## pgd" in out and "report:" in out
    res = json.loads((root / "run" / "detect.json").read_text())
    assert len(res["fit_cases"]) == 5 and len(res["test_cases"]) == 2
    (block,) = res["attacks"]
    assert block["label"] == "pgd(eps=8/255, steps=1)" and block["linf_max"] <= 8 / 255 + 1e-6
    rows = {r["detector"]: r for r in block["detectors"]}
    assert set(rows) == {"spectral", "uncertainty"}
    for r in rows.values():
        for kind in ("non_adaptive", "adaptive"):
            assert 0 <= r[kind]["auroc"]["value"] <= 1 and 0 <= r[kind]["tpr_at_fpr"]["value"] <= 1
        assert r["adaptive"]["linf_max"] <= 8 / 255 + 1e-6 and len(r["adaptive"]["dice"]) == 2
        assert r["describe"]["fit"]["clean"] == 5 and r["describe"]["fit"]["attacked"] == 5
    md = (root / "run" / "detect.md").read_text()
    assert "| spectral |" in md and "| uncertainty |" in md


def test_rerun_reuses_finished_blocks_and_new_weights_recompute(tiny_run, capsys, caplog, monkeypatch):
    import logging

    import torch

    import volattack.evaluation.detect as detect
    from volattack.models.checkpoint import save_checkpoint
    from volattack.models.config import ModelConfig
    from volattack.models.zoo import create_model

    root, datalist, ckpt = tiny_run
    cfg = _write(root, datalist, ckpt, "[{name: spectral, params: {bands: 4}}]", "resume")
    assert main(["detect", cfg, "--quiet"]) == 0
    first_json, first_md = (root / "resume" / "detect.json").read_text(), (root / "resume" / "detect.md").read_text()
    assert len(list((root / "resume" / "blocks").glob("*.json"))) == 1
    calls = []
    real = detect._attack_block
    monkeypatch.setattr(detect, "_attack_block", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    (root / "resume" / "detect.json").unlink()  # as if killed after the block, before the report
    with caplog.at_level(logging.INFO, logger="volattack.evaluation.detect"):
        assert main(["detect", cfg, "--quiet"]) == 0
    assert calls == [] and "reusing the finished block pgd(eps=8/255, steps=1)" in caplog.text
    assert (root / "resume" / "detect.json").read_text() == first_json
    assert (root / "resume" / "detect.md").read_text() == first_md
    torch.manual_seed(1)  # other weights at the same path: the block is recomputed
    mcfg = ModelConfig(name="unet", out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    from volattack.data.config import PreprocessConfig

    save_checkpoint(ckpt, create_model("unet", 1, 5, channels=[4, 8], strides=[2]), mcfg,
                    preprocess=PreprocessConfig(spacing=None, roi_size=[16, 16, 16]))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="volattack.evaluation.detect"):
        assert main(["detect", cfg, "--quiet"]) == 0
    assert calls == ["pgd(eps=8/255, steps=1)"] and "no finished block with its key" in caplog.text
    assert len(list((root / "resume" / "blocks").glob("*.json"))) == 2
    capsys.readouterr()


def test_bad_input_fails_before_any_work_and_writes_nothing(tiny_run, capsys):
    root, datalist, ckpt = tiny_run
    cfg = _write(root, datalist, ckpt, "[{name: mahalanobis, params: {layer: model.9}}]", "bad_layer")
    assert main(["detect", cfg, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "layer 'model.9' is not a module" in err and "Layer names: model, model.0" in err
    assert not (root / "bad_layer").exists()
    cfg = _write(root, datalist, ckpt, "[{name: spectral}]", "few", extra="  max_fit_cases: 3\n")
    assert main(["detect", cfg, "--quiet"]) == 1
    assert "needs at least 5 clean and 5 attacked volumes" in capsys.readouterr().err
    assert not (root / "few").exists()
    cfg = _write(root, datalist, ckpt, "[{name: spectrl}]", "name")
    assert main(["detect", cfg, "--quiet"]) == 2
    assert "Did you mean 'spectral'" in capsys.readouterr().err
    cfg = _write(root, datalist, ckpt, "[{name: spectral, params: {bands: 0}}]", "param")
    assert main(["detect", cfg, "--quiet"]) == 2
    assert "detect.detectors[0] (spectral): bands must be >= 1" in capsys.readouterr().err
