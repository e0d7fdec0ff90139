"""Robustness studies (volattack study): variant merging, validation before training, comparison
tables with known values, and a tiny end-to-end study that a rerun reuses completely."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from volattack import pipeline
from volattack.cli import main
from volattack.config import ConfigError
from volattack.study import (
    comparison_columns,
    comparison_csv,
    comparison_rows,
    deep_merge,
    dice_table,
    expand_dotted,
    full_table,
    load_study,
    run_study,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- merging


def test_deep_merge_known_values_and_inputs_untouched():
    base = {"train": {"epochs": 5, "lr": 1.0, "adversary": {"name": "none", "params": {"eps": 1}}}, "seed": 0}
    over = {"train": {"lr": 2.0, "adversary": {"name": "pgd", "params": {"steps": 3}}}}
    out = deep_merge(base, over)
    assert out == {"train": {"epochs": 5, "lr": 2.0, "adversary": {"name": "pgd", "params": {"eps": 1, "steps": 3}}},
                   "seed": 0}
    assert base["train"]["lr"] == 1.0 and base["train"]["adversary"]["params"] == {"eps": 1}
    assert over == {"train": {"lr": 2.0, "adversary": {"name": "pgd", "params": {"steps": 3}}}}
    # a non-mapping replaces a mapping and vice versa
    assert deep_merge({"a": {"b": 1}}, {"a": 3}) == {"a": 3}
    assert deep_merge({"a": 3}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_expand_dotted_merges_with_nested_keys():
    out = expand_dotted({"train.adversary.name": "pgd", "train": {"epochs": 3, "adversary.share": 0.5}})
    assert out == {"train": {"adversary": {"name": "pgd", "share": 0.5}, "epochs": 3}}
    with pytest.raises(ConfigError, match=r"variants.x: keys must be non-empty \(dotted\) names, got 'train..lr'"):
        expand_dotted({"train..lr": 1}, "variants.x")


# ---------------------------------------------------------------- validation before any training


def _study(tmp_path: Path, variants, **extra) -> dict:
    raw = {
        "seed": 0,
        "output_dir": str(tmp_path / "study"),
        "phantoms": {"out": str(tmp_path / "ph"), "n": 2, "n_val": 1, "n_test": 1, "size": [16, 16, 16], "seed": 0},
        "data": {"preprocess": {"spacing": None, "roi_size": [16, 16, 16], "num_samples": 1}},
        "model": {"name": "unet", "out_channels": 5, "kwargs": {"channels": [4, 8], "strides": [2]}},
        "train": {"epochs": 1, "batch_size": 1, "val_interval": 1, "cache": False},
        "evaluate": {"attacks": [{"name": "fgsm", "params": {"eps": "4/255"}}], "sanity_checks": False,
                     "figures": False},
        "variants": variants,
    }
    raw.update(extra)
    return raw


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any variant starts running."""

    def forbidden(*args, **kwargs):
        raise AssertionError("run_benchmark was called although the study config is invalid")

    monkeypatch.setattr(pipeline, "run_benchmark", forbidden)


@pytest.mark.parametrize(
    "variants, extra, match",
    [
        (None, {}, r"A study config needs a 'variants' mapping"),
        ({}, {}, r"variants must name at least one variant, got an empty mapping"),
        ([{"clean": {}}], {}, r"variants must be a mapping of variant name -> overrides"),
        ({"a/b": {}}, {}, r"variant names must start with a letter or digit .* got 'a/b'"),
        ({"ok": {}, "bad": 3}, {}, r"variants.bad must be a mapping of overrides \(or empty\), got 3"),
        # an unknown key in the second variant: nothing of the first one runs
        ({"ok": {}, "bad": {"train": {"epoch": 2}}}, {},
         r"variants.bad: Unknown config key 'train.epoch'. Did you mean 'epochs'\?"),
        ({"bad": {"train.adversary.nmae": "pgd"}}, {},
         r"variants.bad: Unknown config key 'train.adversary.nmae'. Did you mean 'name'\?"),
        ({"bad": {"train.adversary.name": "pgdd"}}, {}, r"variants.bad: train.adversary: Unknown adversary 'pgdd'"),
        ({"bad": {"train": {"adversary": {"name": "pgd", "params": {"eps": -1}}}}}, {},
         r"variants.bad: train.adversary: eps must be >= 0, got -1"),
        ({"bad": {"evaluate.split": "validation"}}, {},
         r"variants.bad: a variant may override only 'model', 'train' keys .* got 'evaluate'"),
        ({"bad": {"model.name": "unett"}}, {}, r"variants.bad: model: .*unett"),
        ({"bad": {"model.kwargs.widths": [1, 2]}}, {}, r"variants.bad: model: .*widths"),
        ({"bad": {"train.epochs": 0}}, {}, r"variants.bad: train.epochs must be an integer >= 1, got 0"),
        ({"ok": {}}, {"evaluate": {"attacks": [{"name": "vafaa"}]}},
         r"evaluate.attacks: vafaa: Unknown attack 'vafaa'. Did you mean 'vafa'\?"),
        ({"ok": {}}, {"train": None}, r"variants.ok: no 'train' section"),
    ],
)
def test_bad_study_fails_before_training(tmp_path, no_training, variants, extra, match):
    raw = _study(tmp_path, variants, **extra)
    if variants is None:
        del raw["variants"]
    with pytest.raises(ConfigError, match=match):
        run_study(raw)
    assert not (tmp_path / "study").exists() and not (tmp_path / "ph").exists()


def test_missing_datalist_without_phantoms(tmp_path, no_training):
    raw = _study(tmp_path, {"ok": {}}, phantoms=None)
    with pytest.raises(ConfigError, match="data.datalist is empty"):
        run_study(raw)
    raw["data"]["datalist"] = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        run_study(raw)


def test_load_study_merges_variants_and_overrides(tmp_path):
    raw = _study(tmp_path, {
        "clean": None,
        "at": {"train.adversary": {"name": "pgd", "params": {"eps": "4/255", "steps": 1}}, "train": {"lr": 0.01}},
    })
    plan = load_study(raw, tmp_path / "out", overrides=["train.batch_size=2", "variants.at.train.adversary.share=0.5"])
    assert list(plan.variants) == ["clean", "at"]
    clean, at = plan.variants["clean"], plan.variants["at"]
    assert clean.output_dir == str(tmp_path / "out" / "clean") and at.output_dir == str(tmp_path / "out" / "at")
    assert clean.train.adversary.name == "none" and clean.train.lr == pytest.approx(1e-3)
    assert at.train.adversary.name == "pgd" and at.train.adversary.params == {"eps": "4/255", "steps": 1}
    assert at.train.adversary.share == 0.5 and at.train.lr == 0.01
    assert clean.train.batch_size == at.train.batch_size == 2  # --set on the base reaches every variant
    assert at.evaluate == clean.evaluate and at.data == clean.data
    with pytest.warns(UserWarning, match="different numbers of epochs"):
        load_study(_study(tmp_path, {"a": {}, "b": {"train.epochs": 2}}))


def test_shipped_study_config_is_valid_with_equal_epochs():
    plan = load_study(REPO / "configs" / "robustness_study.yaml")
    assert list(plan.variants) == ["clean", "pgd_at", "vaft"]
    assert len({c.train.epochs for c in plan.variants.values()}) == 1
    advs = {n: c.train.adversary for n, c in plan.variants.items()}
    assert advs["clean"].name == "none"
    assert advs["pgd_at"].name == "pgd" and advs["pgd_at"].fr_weight == 0
    assert advs["vaft"].name == "vafa" and advs["vaft"].fr_weight == 1.0
    names = {a.name for a in plan.base.evaluate.attacks}
    assert {"pgd", "vafa", "sa2"} <= names
    # the study redone (issue 11): >= 3 seeds, >= 12 test cases, reliable beside every single attack at
    # the same eps and passes (SEA: 4 losses x (steps + 1 stage forward) with 3 steps), certified Dice, corruptions
    assert len(plan.seeds) >= 3 and plan.base.phantoms.n_test >= 12
    assert {"apgd", "segpgd", "cospgd", "sea"} <= names
    steps = {a.name: a.params["steps"] for a in plan.base.evaluate.attacks}
    assert {steps[n] for n in ("pgd", "apgd", "segpgd", "cospgd")} == {4 * (steps["sea"] + 1)}
    assert plan.base.evaluate.certify is not None and plan.base.evaluate.corruptions is not None


# ---------------------------------------------------------------- comparison tables (known values)


def _fake_results(clean: float, adv: dict, units: str = "HU") -> dict:
    return {
        "intensity_units": units,
        "threat_model": "volume",
        "attacks": [{"label": k, "name": k.split("(")[0], "params": {}} for k in adv],
        "summary": {
            "n_cases": 2,
            "clean": {"dice": clean},
            "attacks": {k: {"clean_dice": clean, "adv_dice": v, "dice_drop": clean - v, "linf": 4 / 255,
                            "rms": 3 / 255, "linf_units": 4 / 255 * 425, "rms_units": 3 / 255 * 425, "ssim": 0.97}
                        for k, v in adv.items()},
        },
    }


def test_comparison_rows_csv_and_tables():
    results = {"clean": _fake_results(0.9, {"pgd(eps=4/255)": 0.5}),
               "at": _fake_results(0.8, {"pgd(eps=4/255)": 0.7})}
    rows = comparison_rows(results)
    assert [(r["variant"], r["attack"]) for r in rows] == [
        ("clean", "clean"), ("clean", "pgd(eps=4/255)"), ("at", "clean"), ("at", "pgd(eps=4/255)")]
    assert rows[0]["adv_dice"] == rows[0]["clean_dice"] == 0.9 and rows[0]["dice_drop"] is None
    assert rows[3]["dice_drop"] == pytest.approx(0.1) and rows[3]["linf"] == pytest.approx(4 / 255)
    table = list(csv.DictReader(io.StringIO(comparison_csv(rows))))
    assert list(table[0]) == comparison_columns() and len(table) == 4
    assert comparison_columns()[:6] == ["variant", "attack", "clean_dice", "clean_dice_lo", "clean_dice_hi", "adv_dice"]
    assert table[1]["adv_dice"] == "0.5" and table[0]["dice_drop"] == "" and table[1]["intensity_units"] == "HU"
    pivot = dice_table(rows).splitlines()
    assert pivot[0] == "| Variant | clean | pgd(eps=4/255) |"
    assert pivot[2] == "| clean | 0.900 | 0.500 |" and pivot[3] == "| at | 0.800 | 0.700 |"
    full = full_table(rows)
    assert "| at | pgd(eps=4/255) | 0.800 | 0.700 | 0.100 | – | 4.00/255 | 6.7 | 5.0 | 0.970 |" in full
    assert "L-inf HU" in full
    mri = comparison_rows({"m": _fake_results(0.9, {"gn": 0.9}, units="a.u.")})
    assert "L-inf a.u." in full_table(mri) and mri[1]["intensity_units"] == "a.u."


def _cases_results(clean: list, adv: list) -> dict:
    """Results with per-case Dice (clean and one attack) and the summary built from them."""
    from volattack.evaluation.summary import summarize

    cases = [{"case": f"{i:04d}_c", "image": "x", "label": "y", "index": i, "seed": i, "shape": [], "spacing_mm": [],
              "clean": {"clean_dice": c, "dice": c}, "attacks": {"pgd": {"clean_dice": c, "dice": a}}}
             for i, (c, a) in enumerate(zip(clean, adv))]
    return {"threat_model": "volume", "attacks": [{"label": "pgd", "name": "pgd", "params": {}}], "cases": cases,
            "summary": summarize(cases, ["pgd"], 0.5).to_dict()}


def test_paired_differences_between_variants_with_intervals_and_n_s():
    from volattack.evaluation.comparison import differences_lines, format_difference, paired_differences

    base = [0.9, 0.6, 0.8, 0.7, 0.5, 0.85]
    a = _cases_results(base, [0.40, 0.20, 0.35, 0.30, 0.10, 0.38])
    b = _cases_results([v + 0.001 for v in base], [0.60, 0.41, 0.56, 0.50, 0.31, 0.58])  # +0.2 under attack
    diffs = {d["attack"]: d for d in paired_differences({"a": a, "b": b})}
    assert diffs["pgd"]["diff"] == pytest.approx(0.205, abs=1e-9) and diffs["pgd"]["n"] == 6
    assert diffs["pgd"]["significant"] and diffs["pgd"]["lo"] > 0  # a consistent gain: interval excludes 0
    assert diffs["clean"]["diff"] == pytest.approx(0.001) and diffs["clean"]["significant"]  # constant shift
    noisy = _cases_results([v + e for v, e in zip(base, [0.02, -0.03, 0.01, -0.01, 0.02, -0.02])],
                           [0.40, 0.20, 0.35, 0.30, 0.10, 0.38])
    d = {x["attack"]: x for x in paired_differences({"a": a, "c": noisy})}["clean"]
    assert d["lo"] <= 0 <= d["hi"] and not d["significant"]
    assert format_difference(d).endswith("(n.s.)") and format_difference(d).startswith("-0.002 [")
    assert format_difference({"diff": 0.005, "lo": -0.010, "hi": 0.021, "n": 4, "significant": False}) == \
        "+0.005 [-0.010, +0.021] (n.s.)"
    text = "\n".join(differences_lines({"a": a, "b": b}))
    assert "| Attack | b − a |" in text and "| pgd | +0.205 [" in text
    assert differences_lines({"a": a}) == []  # one variant: nothing to compare
    pivot = dice_table(comparison_rows({"a": a, "b": b}))
    assert "| a | 0.725 [" in pivot  # the Dice pivot shows each mean's interval


# ---------------------------------------------------------------- command line


def test_study_help_does_not_import_torch():
    code = (
        "import sys\nfrom volattack.cli import main\n"
        "try:\n    main(['study', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules and 'monai' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "variants" in out.stdout and "--set" in out.stdout


def test_study_cli_config_error_exit_code(tmp_path, capsys, no_training):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(_study(tmp_path, {"a": {"train": {"adversary": {"name": "fgsmm"}}}})))
    assert main(["study", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "volattack study: config error: variants.a: train.adversary: Unknown adversary 'fgsmm'" in err
    assert main(["study", str(tmp_path / "missing.yaml")]) == 2
    assert "Config file not found" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_study_end_to_end_and_rerun_reuses_everything(tmp_path, capsys):
    """Two variants (clean, FGSM-RS adversarial training), 1 epoch on 16^3 phantoms, FGSM evaluation."""
    cfg = tmp_path / "study.yaml"
    raw = _study(tmp_path, {"clean": {}, "fast_at": {"train.adversary": {"name": "fgsm_rs", "params": {"eps": "4/255"}}}},
                 output_dir=str(tmp_path / "not_used"))
    cfg.write_text(yaml.safe_dump(raw))
    cmd = ["study", str(cfg), "--out", str(tmp_path / "study"), "--quiet"]
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Variant | clean | fgsm(eps=4/255) |") and "comparison: " in out
    study = tmp_path / "study"
    for name in ("comparison.md", "comparison.csv", "comparison.png", "study.json", "study.yaml",
                 "clean/results.json", "fast_at/results.json", "clean/train/best.pt", "fast_at/train/best.pt"):
        assert (study / name).is_file(), name
    assert (study / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO((study / "comparison.csv").read_text())))
    assert [(r["variant"], r["attack"]) for r in rows] == [
        ("clean", "clean"), ("clean", "fgsm(eps=4/255)"), ("fast_at", "clean"), ("fast_at", "fgsm(eps=4/255)")]
    for variant in ("clean", "fast_at"):
        res = json.loads((study / variant / "results.json").read_text())
        clean_row, adv_row = [r for r in rows if r["variant"] == variant]
        assert float(clean_row["adv_dice"]) == pytest.approx(res["summary"]["clean"]["dice"])
        assert float(adv_row["adv_dice"]) == pytest.approx(res["summary"]["attacks"]["fgsm(eps=4/255)"]["adv_dice"])
        assert float(adv_row["linf"]) <= 4 / 255 + 1e-6
    # the variants really differ: FGSM-RS training produced other weights than clean training
    logs = [json.loads((study / v / "train" / "train_log.json").read_text()) for v in ("clean", "fast_at")]
    assert logs[0]["config"]["train"]["adversary"]["name"] == "none"
    assert logs[1]["config"]["train"]["adversary"]["name"] == "fgsm_rs"
    assert logs[0]["history"][0]["loss"] != logs[1]["history"][0]["loss"]
    summary = json.loads((study / "study.json").read_text())
    assert summary["finished"] == ["clean", "fast_at"] and summary["variants"]["fast_at"]["epochs"] == 1
    md = (study / "comparison.md").read_text()
    assert "variants finished: 2/2" in md and "fgsm_rs(eps=4/255)" in md and "| fast_at | fgsm(eps=4/255) |" in md

    # rerun: training and every case are reused (files untouched), the comparison is identical
    watched = sorted(study.glob("*/cases/*.json")) + sorted(study.glob("*/train/*.pt"))
    assert len(watched) == 6
    stamps = [p.stat().st_mtime_ns for p in watched]
    csv_before = (study / "comparison.csv").read_text()
    assert main(cmd) == 0
    assert not (tmp_path / "not_used").exists()
    assert [p.stat().st_mtime_ns for p in watched] == stamps
    assert (study / "comparison.csv").read_text() == csv_before


# ---------------------------------------------------------------- seeds: validation, two-way bootstrap, aggregation


@pytest.mark.parametrize(
    "seeds, match",
    [
        ([], r"seeds must list at least one seed, got an empty list"),
        ([0, 1, 0], r"seeds must not repeat a seed, got \[0, 1, 0\] \(repeated: \[0\]\)"),
        ([0, -1], r"seeds entries must be integers >= 0, got -1 in \[0, -1\]"),
        ([0, 1.5], r"seeds entries must be integers >= 0, got 1.5"),
        ([True], r"seeds entries must be integers >= 0, got True"),
        (3, r"seeds must be a list of training seeds \(e.g. \[0, 1, 2\]\), got 3"),
    ],
)
def test_bad_seeds_fail_before_training(tmp_path, no_training, seeds, match):
    raw = _study(tmp_path, {"clean": {}}, seeds=seeds)
    with pytest.raises(ConfigError, match=match):
        run_study(raw)
    assert not (tmp_path / "study").exists() and not (tmp_path / "ph").exists()


def test_load_study_reads_seeds_and_keeps_them_out_of_the_run_config(tmp_path):
    plan = load_study(_study(tmp_path, {"clean": {}}, seeds=[2, 0]))
    assert plan.seeds == [2, 0] and plan.variants["clean"].seed == 0
    assert load_study(_study(tmp_path, {"clean": {}})).seeds is None
    assert load_study(_study(tmp_path, {"clean": {}}, seeds=[0, 1]), overrides=["seeds=[5]"]).seeds == [5]


def test_two_way_bootstrap_hand_computed_tables():
    from volattack.study_seeds import two_way_bootstrap

    # seeds differ, cases equal: the mean of 2 resampled seeds is 0, 0.5 or 1 (prob. 1/4, 1/2, 1/4)
    assert tuple(two_way_bootstrap([[0.0, 0.0], [1.0, 1.0]])) == (0.5, 0.0, 1.0)
    # additive x = a_s + b_c, a = (0, 1), b = (0, 2): each resample's mean is mean(a*) + mean(b*); both
    # extremes have probability 1/16 > 2.5%, so the interval is [0, 3]; resampling the cases only (seeds
    # fixed, the clustered case bootstrap) would give [0.5, 2.5]: the seeds' spread is counted here
    est = two_way_bootstrap([[0.0, 2.0], [1.0, 3.0]])
    assert tuple(est) == (1.5, 0.0, 3.0) and est.n == 4
    # NaN cells are skipped: mean over seeds of the per-seed means
    assert two_way_bootstrap([[1.0, np.nan, 3.0], [4.0, 4.0, np.nan]]).value == pytest.approx(3.0)
    one = two_way_bootstrap([[0.7]])
    assert one.value == 0.7 and math.isnan(one.lo) and one.reason == "one value: no interval"
    assert two_way_bootstrap([[np.nan, np.nan]]).n == 0


def test_two_way_bootstrap_variance_and_one_seed_against_scipy():
    from scipy import stats

    from volattack.study_seeds import two_way_bootstrap, two_way_replicates

    a, b = np.array([0.0, 1.0, 3.0]), np.array([0.0, 2.0, 1.0, 5.0, 4.0])
    reps = two_way_replicates(a[:, None] + b[None, :], n_boot=40000, seed=1)
    # additive table: the bootstrap variance of the mean is var(a) / S + var(b) / C (population variances)
    assert reps.var() == pytest.approx(a.var() / 3 + b.var() / 5, rel=0.05)
    # one seed: the ordinary percentile bootstrap of the cases (scipy.stats.bootstrap)
    x = np.array([0.91, 0.62, 0.85, 0.70, 0.55, 0.88, 0.79, 0.66, 0.93, 0.58, 0.74, 0.81])
    ours = two_way_bootstrap(x[None, :], n_boot=20000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=0).confidence_interval
    width = ref.high - ref.low
    assert ours.lo == pytest.approx(ref.low, abs=0.05 * width) and ours.hi == pytest.approx(ref.high, abs=0.05 * width)
    # several seeds widen the interval of the same cases when the seeds disagree
    spread = two_way_bootstrap(np.stack([x, x + 0.1, x - 0.1]), n_boot=20000)
    assert spread.hi - spread.lo > ours.hi - ours.lo
    with pytest.raises(ValueError, match=r"values must be a \(seeds, cases\) table, got shape \(3,\)"):
        two_way_bootstrap([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="n_boot must be a positive integer, got 0"):
        two_way_bootstrap([[1.0, 2.0]], n_boot=0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.5"):
        two_way_bootstrap([[1.0, 2.0]], level=1.5)


def test_aggregate_rows_and_differences_over_seeds_and_cases():
    from volattack.evaluation.comparison import differences_table
    from volattack.study_seeds import aggregate_rows, seed_case_table, seed_differences, two_way_bootstrap

    clean = [0.9, 0.6, 0.8, 0.7]
    adv_a = {0: [0.40, 0.20, 0.35, 0.30], 1: [0.50, 0.30, 0.45, 0.40]}
    shift = {0: [0.20, 0.22, 0.18, 0.20], 1: [0.21, 0.19, 0.20, 0.20]}  # b gains ~0.2 on every (seed, case)
    res = {s: {"a": _cases_results(clean, adv_a[s]),
               "b": _cases_results([c + 0.01 * (j % 2 * 2 - 1) for j, c in enumerate(clean)],
                                   [v + d for v, d in zip(adv_a[s], shift[s])])} for s in (0, 1)}
    rows = {(r.variant, r.attack): r for r in aggregate_rows(res)}
    assert list(rows) == [("a", "clean"), ("a", "pgd"), ("b", "clean"), ("b", "pgd")]
    pgd_a = rows[("a", "pgd")]
    assert pgd_a["adv_dice"] == pytest.approx((0.3125 + 0.4125) / 2)  # mean over seeds of the case means
    table, seeds, cases = seed_case_table({s: res[s]["a"] for s in (0, 1)}, "pgd")
    assert seeds == [0, 1] and cases == ["0000_c", "0001_c", "0002_c", "0003_c"]
    assert table.tolist() == [adv_a[0], adv_a[1]]
    est = two_way_bootstrap(table)
    assert (pgd_a["adv_dice_lo"], pgd_a["adv_dice_hi"]) == (est.lo, est.hi) and pgd_a.values["adv_dice_n"] == 8
    assert pgd_a["clean_dice"] == pytest.approx(0.75) and rows[("a", "clean")]["adv_dice"] == pytest.approx(0.75)
    diffs = {d["attack"]: d for d in seed_differences(res)}
    assert diffs["pgd"]["diff"] == pytest.approx(np.mean([shift[0], shift[1]])) and diffs["pgd"]["significant"]
    assert diffs["pgd"]["lo"] > 0 and diffs["pgd"]["n"] == 8 and diffs["pgd"]["seeds"] == 2
    assert diffs["clean"]["diff"] == pytest.approx(0.0) and not diffs["clean"]["significant"]  # +-0.01: n.s.
    text = differences_table(list(diffs.values()))
    assert "| clean | +0.000 [" in text and "(n.s.)" in text.splitlines()[2] and "| pgd | +0.200 [" in text


def test_seeded_study_runs_every_seed_into_its_folder_and_aggregates(tmp_path, monkeypatch):
    calls = []

    def fake_run(cfg, out_dir, **kwargs):  # per-case Dice: +0.1 per seed, +0.2 for the trained variant
        calls.append((cfg.seed, Path(out_dir).relative_to(tmp_path / "study").as_posix()))
        bump = 0.1 * cfg.seed + (0.2 if Path(out_dir).name == "at" else 0.0)
        return _cases_results([0.9, 0.8, 0.7], [0.3 + bump, 0.2 + bump, 0.1 + bump])

    monkeypatch.setattr(pipeline, "run_benchmark", fake_run)
    raw = _study(tmp_path, {"clean": {}, "at": {"train.adversary": {"name": "fgsm_rs", "params": {"eps": "4/255"}}}},
                 seeds=[0, 1])
    out = run_study(raw)
    assert calls == [(0, "seed_0/clean"), (0, "seed_0/at"), (1, "seed_1/clean"), (1, "seed_1/at")]
    study = tmp_path / "study"
    for name in ("comparison.md", "comparison.csv", "comparison.png", "study.json", "study.yaml",
                 "seed_0/comparison.md", "seed_1/study.json"):
        assert (study / name).is_file(), name
    summary = json.loads((study / "study.json").read_text())
    assert summary["seeds"] == summary["finished_seeds"] == [0, 1] and set(out["results_by_seed"]) == {0, 1}
    # "results": per variant the aggregated rows, what `volattack study` prints as its Dice pivot
    pivot = dice_table(comparison_rows(out["results"])).splitlines()
    assert pivot[0] == "| Variant | clean | pgd |" and pivot[2].startswith("| clean | 0.800 [") and "| 0.250 [" in pivot[2]
    rows = {(r["variant"], r["attack"]): r for r in summary["rows"]}
    assert rows[("clean", "pgd")]["adv_dice"] == pytest.approx(0.25)  # mean over seeds of 0.2 and 0.3
    assert rows[("at", "pgd")]["adv_dice"] == pytest.approx(0.45)
    lo, hi = rows[("clean", "pgd")]["adv_dice_lo"], rows[("clean", "pgd")]["adv_dice_hi"]
    assert lo < 0.25 < hi
    diff = next(d for d in summary["differences"] if d["attack"] == "pgd")
    assert (diff["a"], diff["b"]) == ("clean", "at") and diff["diff"] == pytest.approx(0.2)
    assert diff["significant"] and diff["n"] == 6 and diff["seeds"] == 2
    md = (study / "comparison.md").read_text()
    assert "runs finished: 4/4 (seeds 0, 1 of 2;" in md and "| at − clean |" in md and "| pgd | +0.200 [" in md
    assert "| at | 1 | fgsm_rs(eps=4/255) |" in md and "[seed 1](seed_1/comparison.md)" in md
    table = list(csv.DictReader(io.StringIO((study / "comparison.csv").read_text())))
    assert [(r["variant"], r["attack"]) for r in table] == [("clean", "clean"), ("clean", "pgd"), ("at", "clean"),
                                                           ("at", "pgd")]
