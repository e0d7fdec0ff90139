"""``evaluate.certify`` adds one ``certified(sigma=s)`` row per case and noise level through the
certification row pass: certified Dice in the Dice columns, the radius (input units, source
units, RMS equivalent), abstention rate and passes in the row's info, end to end on phantoms."""

from __future__ import annotations

import json

import pytest
import torch

import volattack
from volattack.config import from_dict
from volattack.data.config import PreprocessConfig
from volattack.data.datalist import load_datalist
from volattack.defenses.config import CertifyConfig
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.evaluation.runner import evaluate
from volattack.yaml_config import ConfigError

PRE = PreprocessConfig(roi_size=[16, 16, 16], crop_foreground=False)


def constant_model(cls: int) -> torch.nn.Module:
    """Predicts class ``cls`` everywhere, whatever the noise."""
    m = torch.nn.Conv3d(1, 5, 3, padding=1)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
        m.bias[cls] = 4.0
    return m


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    datalist = volattack.make_phantom_dataset(root, n=1, size=(20, 20, 16), seed=0, n_val=0, n_test=2,
                                              progress=False)
    return load_datalist(datalist, key="test")


def run(model, cases, out, **certify):
    cfg = EvalConfig(attacks=[AttackSpec("gn", {"eps": 0.0})], figures=False, sanity_checks=False, certify=certify)
    res = evaluate(model, cases, out, eval_cfg=cfg, preprocess=PRE, num_classes=5, progress=False)
    per_case = [json.loads(p.read_text()) for p in sorted((out / "cases").glob("*.json"))]
    return res, per_case


def test_certified_rows_reach_records_summary_and_report(tmp_path, cases):
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 5, 3, padding=1)
    res, per_case = run(model, cases, tmp_path / "run", sigma=[0.06, 0.12], n0=2, n=4, alpha=0.1, tau=0.6, batch=3)
    labels = ["certified(sigma=0.06)", "certified(sigma=0.12)"]
    assert all(list(c["attacks"]) == ["gn(eps=0)", *labels] for c in per_case)
    for c in per_case:
        row = c["attacks"]["certified(sigma=0.12)"]
        info = row["info"]
        # 4 estimation samples: the smallest p-value 0.6^4 = 0.13 exceeds alpha, so every voxel abstains
        assert info["abstain_rate"] == 1.0 and row["dice"] == 0.0 and info["passes"] == 6
        assert info["certified_radius"] == pytest.approx(0.12 * 0.2533471, rel=1e-6)
        assert info["certified_radius_rms"] == pytest.approx(info["certified_radius"] / (20 * 20 * 16) ** 0.5)
        assert (info["n0"], info["n"], info["alpha"], info["tau"]) == (2, 4, 0.1, 0.6)
        assert row["linf"] is None and row["seconds"] > 0
    summ = res["summary"]["attacks"]["certified(sigma=0.12)"]
    assert summ["adv_dice"] == 0.0 and summ["info"]["abstain_rate"] == 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| certified(sigma=0.12) |" in report
    cert = report.split("## Certification (randomized smoothing)")[1].split("\n## ")[0]
    line = next(t for t in cert.splitlines() if t.startswith("| certified(sigma=0.12) |")).split(" | ")
    # sigma, n0, n, alpha, tau, radius (input units), ..., abstention rate, passes
    assert line[1:6] == ["0.12", "2", "4", "0.1", "0.6"]
    assert float(line[6]) == pytest.approx(0.12 * 0.2533471, rel=1e-3)
    assert line[-2:] == ["1", "6 |"]
    assert res["row_passes"][0]["name"] == "certify" and res["row_passes"][0]["sigma"] == [0.06, 0.12]
    again, cached = run(model, cases, tmp_path / "run", sigma=[0.06, 0.12], n0=2, n=4, alpha=0.1, tau=0.6, batch=3)
    row = again["summary"]["attacks"]["certified(sigma=0.12)"]  # from the cache, info included
    assert cached == per_case and row["adv_dice"] == 0.0 and row["info"] == summ["info"]


def test_a_constant_model_is_certified_everywhere_and_its_certified_dice_is_its_clean_dice(tmp_path, cases):
    # p = 0.6^30 = 2e-7 < alpha / voxels = 0.1 / 6400: every voxel certified with the model's class
    res, per_case = run(constant_model(1), cases, tmp_path / "run", sigma=0.25, n0=1, n=30, alpha=0.1, tau=0.6,
                        batch=16)
    for c in per_case:
        row = c["attacks"]["certified(sigma=0.25)"]
        assert row["info"]["abstain_rate"] == 0.0
        assert row["dice"] == pytest.approx(c["clean"]["dice"]) and row["dice_per_class"] == c["clean"]["dice_per_class"]
    assert res["summary"]["attacks"]["certified(sigma=0.25)"]["adv_dice"] == pytest.approx(
        res["summary"]["clean"]["dice"])


def test_certify_config_from_yaml_and_its_bad_values():
    cfg = from_dict(EvalConfig, {"certify": {"sigma": ["8/255", 0.12], "n0": 10, "n": 100}})
    assert isinstance(cfg.certify, CertifyConfig) and cfg.certify.sigma == [8 / 255, 0.12]
    assert EvalConfig(certify={"sigma": 0.25}).certify.sigma == [0.25]
    assert CertifyConfig().sigma == [0.06, 0.12, 0.25]
    for bad, match in [({"sigma": 0}, r"certify.sigma must be a number > 0 .*got 0"),
                       ({"tau": 0.5}, r"certify.tau must be in \(0.5, 1\), got 0.5"),
                       ({"tau": 1}, r"certify.tau must be in \(0.5, 1\), got 1"),
                       ({"n0": 0}, r"certify.n0 must be an integer >= 1, got 0"),
                       ({"n": 0}, r"certify.n must be an integer >= 1, got 0"),
                       ({"alpha": 1.5}, r"certify.alpha must be in \(0, 1\), got 1.5"),
                       ({"sigma": [0.1, 0.1]}, r"certify.sigma must not repeat a value"),
                       ({"abstain": "skip"}, r"certify.abstain must be one of miss, worst, got 'skip'")]:
        with pytest.raises(ValueError, match=match):
            EvalConfig(certify=bad)
    with pytest.raises(ConfigError, match=r"certify.tau must be in \(0.5, 1\), got 0.4"):
        from_dict(EvalConfig, {"certify": {"tau": 0.4}})
