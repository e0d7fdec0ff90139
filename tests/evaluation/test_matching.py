"""True budget matching: each attack's strength parameter calibrated by bisection until its measured
budget hits the target; rows at equal measured budgets; an unreachable target names the range."""

from __future__ import annotations

import json

import pytest
import torch

import volattack
from volattack.data.config import PreprocessConfig
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.evaluation.extra_config import MatchConfig
from volattack.evaluation.rows.matching import BudgetError, Calibration, param_range, strength

PRE = PreprocessConfig(roi_size=[16, 16, 16], crop_foreground=False)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from volattack.data.datalist import load_datalist

    root = tmp_path_factory.mktemp("ph")
    dl = volattack.make_phantom_dataset(root, n=1, size=(20, 20, 16), seed=0, n_val=0, n_test=2, progress=False)
    return load_datalist(dl, key="test")


def _model():
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 5, 3, padding=1)


def test_bisection_hits_a_known_curve_within_tolerance_in_few_runs():
    calls = []

    def f(p):
        calls.append(p)
        return 3.0 * p ** 2 + p  # increasing, non-linear

    cal = Calibration(f, 0.0, 10.0, max_runs=12, zero_at_lo=True)
    for t in (0.5, 2.0, 40.0):
        p, size, ok = cal.solve(t, 0.01)
        assert ok and abs(size - t) <= 0.01 * t and f(p) == pytest.approx(size)
    assert cal.runs <= 12 and len(calls) - 3 == cal.runs  # the three checks above are extra calls
    with pytest.raises(ValueError, match=r"reachable sizes \[0, 310\]"):
        cal.solve(400.0, 0.01)
    # a budget of runs that is too small: the closest run, flagged
    short = Calibration(f, 0.0, 10.0, max_runs=3, zero_at_lo=True)
    p, size, ok = short.solve(2.0, 1e-6)
    assert not ok and short.runs == 3


def test_strength_table_and_ranges():
    assert strength("pgd", {}) == "eps" and strength("vafa", {}) == "q_max" and strength("sa2", {}) == "rho"
    assert strength("fft", {"mode": "amplitude"}) == "rho" and strength("fft", {}) == "eps"
    with pytest.raises(ValueError, match=r"attack 'nope' has no strength parameter"):
        strength("nope", {})
    assert param_range("pgd", "eps", {}, (0.0, 1.0), 100) == (0.0, 1.0)
    assert param_range("pgd_l2", "eps", {}, (0.0, 2.0), 100) == (0.0, 20.0)
    assert param_range("vafa", "q_max", {"q_min": 5.0}, (0.0, 1.0), 100) == (5.0, 255.0)
    assert param_range("vafa", "q_max", {}, (0.0, 1.0), 100) == (1.0, 255.0)
    assert param_range("sa2", "rho", {}, (0.0, 1.0), 100) == (0.0, 0.99)


def test_bad_match_config():
    with pytest.raises(ValueError, match=r"match\.measure must be one of .* got 'rms'\. Did you mean 'rms_hu'\?"):
        MatchConfig(measure="rms")
    with pytest.raises(ValueError, match=r"match\.target"):
        MatchConfig(measure="ssim", target=[0.99, 1.5])
    with pytest.raises(ValueError, match=r"match\.target"):
        MatchConfig(target=[0.0])
    with pytest.raises(ValueError, match=r"match\.per must be one of \('case', 'dataset'\), got 'batch'"):
        MatchConfig(per="batch")
    with pytest.raises(ValueError, match=r"match\.max_runs"):
        MatchConfig(max_runs=2)
    assert EvalConfig(match={"target": ["4"]}).match.target == [4.0]


def test_pgd_and_sa2_are_matched_to_the_measured_rms(tmp_path, cases):
    from volattack.evaluation.runner import evaluate

    cfg = EvalConfig(attacks=[AttackSpec("pgd", {"steps": 2}, sweep={"eps": [2 / 255, 4 / 255]}),
                              AttackSpec("sa2", {"steps": 2, "block_size": 4})],
                     figures=True, figure_cases=0, sanity_checks=False,
                     match={"measure": "rms_hu", "target": [1.0, 3.0], "tolerance": 0.05})
    res = evaluate(_model(), cases, tmp_path / "run", eval_cfg=cfg, preprocess=PRE, num_classes=5, progress=False)
    labels = [f"{a} @ rms_hu={t}" for a in ("pgd", "sa2") for t in (1, 3)]
    assert set(labels) <= set(res["summary"]["attacks"])  # one matched pgd for the whole eps sweep
    per_case = [json.loads(p.read_text())["attacks"] for p in sorted((tmp_path / "run" / "cases").glob("*.json"))]
    for rows in per_case:
        for a in ("pgd", "sa2"):
            lo, hi = rows[f"{a} @ rms_hu=1"], rows[f"{a} @ rms_hu=3"]
            for row, t in ((lo, 1.0), (hi, 3.0)):
                assert row["info"]["match_ok"] == 1.0
                assert abs(row["rms_units"] - t) <= 0.05 * t  # the schema's own measurement
                assert row["info"]["match_measured"] == pytest.approx(row["rms_units"], rel=1e-4)
                assert row["info"]["match_runs"] <= 12
            assert hi["info"]["match_param"] > lo["info"]["match_param"]  # larger budget, larger parameter
    desc = next(d for d in res["row_passes"] if d["name"] == "match")
    assert desc["figure"] == "figures/dice_vs_matched_budget.png"
    assert (tmp_path / "run" / desc["figure"]).read_bytes()[:4] == b"\x89PNG"
    assert "| sa2 @ rms_hu=3 |" in (tmp_path / "run" / "report.md").read_text()


def test_measured_budget_grows_with_the_parameter(cases):
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.evaluation.cases import CaseData, load_case
    from volattack.evaluation.passes import CasePasses

    cfg = EvalConfig(attacks=[AttackSpec("pgd", {"steps": 2})], figures=False, sanity_checks=False,
                     match={"target": [2.0]})
    passes = CasePasses(_model(), None, cfg, PRE, intensity_from_preprocess(PRE), 5, 0, None, torch.device("cpu"))
    mp = next(rp for rp in passes.row_passes if rp.name == "match")
    data = CaseData(*load_case(cases[0], passes.transforms))
    eps = (0.5 / 255, 1 / 255, 2 / 255, 4 / 255)
    sizes = [mp._run("pgd", "eps", {"steps": 2}, e, data, 0, 0)[0] for e in eps]
    assert sizes == sorted(sizes) and sizes[0] > 0
    assert all(s <= e * 425 * (1 + 1e-5) for s, e in zip(sizes, eps))  # RMS <= L-inf = eps (425 HU per unit)
    assert 4 < sizes[-1] / sizes[0] <= 8 * (1 + 1e-5)  # about proportional to eps (sign steps, clipping)


def test_an_unreachable_target_fails_before_results_naming_the_range(tmp_path, cases):
    from volattack.evaluation.runner import evaluate

    cfg = EvalConfig(attacks=[AttackSpec("pgd", {"steps": 1})], figures=False, sanity_checks=False,
                     match={"measure": "rms_hu", "target": [5000.0]})
    with pytest.raises(BudgetError, match=r"evaluate\.match\.target=5000: pgd cannot reach rms_hu=5000 on case 0; "
                                          r"with eps in \[0, 1\] it reaches rms_hu in \[0, \d+(\.\d+)?\]"):
        evaluate(_model(), cases, tmp_path / "run", eval_cfg=cfg, preprocess=PRE, num_classes=5, progress=False)
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list((tmp_path / "run" / "cases").glob("*.json"))


def test_a_ssim_match_needs_no_units_and_a_hu_match_needs_them(cases):
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.evaluation.passes import CasePasses

    intensity = intensity_from_preprocess(PRE)
    cfg = EvalConfig(attacks=[AttackSpec("vafa", {})], figures=False, sanity_checks=False, match={"target": [2.0]})

    class NoUnits:
        bounds, unit_scale, pad_value = intensity.bounds, None, intensity.pad_value

    with pytest.raises(ValueError, match=r"match\.measure='rms_hu' needs source units"):
        CasePasses(_model(), None, cfg, PRE, NoUnits(), 5, 0, None, torch.device("cpu"))


def test_per_dataset_one_parameter_matches_the_mean_budget(cases):
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.evaluation.cases import CaseData, clean_outcome, load_case
    from volattack.evaluation.passes import CasePasses

    cfg = EvalConfig(attacks=[AttackSpec("pgd", {"steps": 1})], figures=False, sanity_checks=False,
                     match={"target": [2.0], "per": "dataset", "tolerance": 0.05})
    passes = CasePasses(_model(), None, cfg, PRE, intensity_from_preprocess(PRE), 5, 0, None, torch.device("cpu"))
    mp = next(rp for rp in passes.row_passes if rp.name == "match")
    data = [CaseData(*load_case(c, passes.transforms)) for c in cases]
    with pytest.raises(BudgetError, match=r"per='dataset' needs the evaluated cases"):
        mp.rows(data[0], 0, 0, clean_outcome(passes.predict(data[0].image), data[0], 5))
    passes.cases = cases  # what the runner provides
    rows = [mp.rows(d, i, i, clean_outcome(passes.predict(d.image), d, 5))["pgd @ rms_hu=2"] for i, d in enumerate(data)]
    assert rows[0].info["match_param"] == rows[1].info["match_param"]  # one parameter for the dataset
    assert abs(sum(r["rms_units"] for r in rows) / 2 - 2.0) <= 0.05 * 2.0
    assert mp.describe()["dataset_parameters"]["pgd @ rms_hu=2"] == rows[0].info["match_param"]


def test_per_dataset_matching_runs_from_the_config(tmp_path, cases):
    from volattack.evaluation.runner import evaluate

    cfg = EvalConfig(attacks=[AttackSpec("pgd", {"steps": 1})], figures=False, sanity_checks=False,
                     match={"target": [2.0], "per": "dataset", "tolerance": 0.05})
    res = evaluate(_model(), cases, tmp_path / "run", eval_cfg=cfg, preprocess=PRE, num_classes=5, progress=False)
    params = {c["attacks"]["pgd @ rms_hu=2"]["info"]["match_param"] for c in res["cases"]}
    assert len(params) == 1  # the runner hands every case to the pass: one parameter for the dataset
    assert abs(res["summary"]["attacks"]["pgd @ rms_hu=2"]["rms_units"] - 2.0) <= 0.05 * 2.0
