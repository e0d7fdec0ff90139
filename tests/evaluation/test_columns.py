"""The one results schema: a column added in one place reaches every output; typed records
round-trip through JSON; formatting and aggregation rules; the README's metric section is generated."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch

import volattack
from volattack.data.config import PreprocessConfig
from volattack.evaluation import columns as schema
from volattack.evaluation.columns import Column, FormatContext, Outcome, get_column, register_column
from volattack.evaluation.comparison import comparison_csv, comparison_rows, full_table
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.evaluation.records import CaseRecord, Row, Scores, Summary
from volattack.evaluation.runner import evaluate
from volattack.evaluation.summary import summarize

REPO = Path(__file__).resolve().parents[2]
PRE = PreprocessConfig(roi_size=[16, 16, 16], crop_foreground=False)


def _changed_fraction(o: Outcome):
    """Fraction of input voxels the attack changed (a throwaway metric)."""
    return None if o.adv is None else float((o.adv != o.image).float().mean())


@pytest.fixture
def extra_column():
    """Register a throwaway column for one test (and remove it afterwards)."""
    col = register_column(Column("voxels_changed", "Changed voxels", "fraction of input voxels the attack changed.",
                                 case=_changed_fraction, fmt=schema.fixed(4)))
    yield col
    schema.unregister_column(col.key)
    assert "voxels_changed" not in [c.key for c in schema.COLUMNS]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    datalist = volattack.make_phantom_dataset(root / "ph", n=1, size=(20, 20, 16), seed=0, n_val=0, n_test=2,
                                              progress=False)
    from volattack.data.datalist import load_datalist

    return load_datalist(datalist, key="test")


def _run(cases, out: Path, **options) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 5, 3, padding=1)
    cfg = EvalConfig(attacks=[AttackSpec("fgsm", {"eps": 4 / 255})], figures=False, sanity_checks=False, **options)
    return evaluate(model, cases, out, eval_cfg=cfg, preprocess=PRE, num_classes=5, progress=False)


def test_a_new_column_reaches_every_output(cases, tmp_path, caplog, extra_column):
    label = "fgsm(eps=4/255)"
    # a run written before the column existed is recomputed, and the log says why
    _run(cases, tmp_path)
    schema.unregister_column(extra_column.key)
    _run(cases, tmp_path / "before")
    register_column(extra_column)
    with caplog.at_level(logging.INFO, logger="volattack.evaluation.runner"):
        res = _run(cases, tmp_path / "before")
    assert sum("recomputed: schema changed" in m for m in caplog.messages) == 2
    for run in (tmp_path, tmp_path / "before"):
        # per-case records
        per_case = [json.loads(p.read_text())["attacks"][label]["voxels_changed"]
                    for p in sorted((run / "cases").glob("*.json"))]
        assert len(per_case) == 2 and all(0 < v <= 1 for v in per_case)
        # summary: the mean over cases; the clean row has no value
        results = json.loads((run / "results.json").read_text())
        assert results["summary"]["attacks"][label]["voxels_changed"] == pytest.approx(sum(per_case) / 2)
        assert "voxels_changed" not in results["summary"]["clean"]
        # report.md: header, value, definition
        report = (run / "report.md").read_text()
        assert "| Changed voxels |" in report and f"{sum(per_case) / 2:.4f}" in report
        assert "- **Changed voxels** (`voxels_changed`): fraction of input voxels the attack changed." in report
        # results.csv
        rows = list(csv.DictReader(io.StringIO((run / "results.csv").read_text())))
        assert float(rows[1]["voxels_changed"]) == pytest.approx(sum(per_case) / 2) and rows[0]["voxels_changed"] == ""
        # the study's tables
        comp = comparison_rows({"v": results})
        assert "| Changed voxels |" in full_table(comp)
        assert "voxels_changed" in comparison_csv(comp).splitlines()[0].split(",")
    assert res["summary"]["attacks"][label]["voxels_changed"] > 0


def test_readme_metrics_section_is_generated_from_the_schema():
    text = (REPO / "README.md").read_text()
    head = "## Metrics (definitions used in every report)\n"
    start = text.index(head) + len(head)
    end = min(text.index("\n## ", start), text.index("\n### Statistics", start))
    assert text[start:end].strip() == schema.metrics_markdown().strip(), (
        "regenerate the README's Metrics section from volattack.evaluation.columns.metrics_markdown()")
    assert all(f"(`{c.key}`)" in text[start:end] for c in schema.COLUMNS)


def test_column_validation_and_registration():
    with pytest.raises(ValueError, match="key must be an identifier, got 'bad key'"):
        Column("bad key", "X", "x", case=lambda o: 0)
    with pytest.raises(ValueError, match=r"tables must be a subset of \('report', 'study'\)"):
        Column("x", "X", "x", case=lambda o: 0, tables=frozenset({"paper"}))
    with pytest.raises(ValueError, match="give a per-case function"):
        Column("x", "X", "x")
    with pytest.raises(ValueError, match="a column 'adv_dice' is already registered"):
        register_column(Column("adv_dice", "X", "x", case=lambda o: 0))
    with pytest.raises(ValueError, match="a column 'dice' is already registered"):  # the record key of adv_dice
        register_column(Column("dice", "X", "x", case=lambda o: 0))
    with pytest.raises(ValueError, match="Unknown column 'adv_dise'. Did you mean 'adv_dice'"):
        get_column("adv_dise")
    with pytest.raises(ValueError, match="table must be one of"):
        schema.table_columns("paper")


def test_formatting_of_missing_values_and_input_budgets():
    linf = get_column("linf")
    assert linf.format(None) == "–" and linf.format(float("nan")) == "–" and linf.format(float("inf")) == "∞"
    assert linf.format(4 / 255) == "4.00/255"  # unit-width input range
    assert linf.format(4 / 255, FormatContext(bounds=(-1.0, 0.0))) == "4.00/255"
    assert linf.format(0.0313725, FormatContext(bounds=(-1.0, 1.0))) == "0.03137"
    assert linf.format(13.3, FormatContext(bounds=(-175.0, 250.0))) == "13.3"
    assert get_column("linf_units").heading("a.u.") == "L-inf a.u."
    assert get_column("seconds").format(1.234) == "1.23"


def _scores(clean: float, adv: float, **extra) -> tuple[Scores, Scores]:
    c = Scores({"clean_dice": clean, "adv_dice": clean, "hd95_mm": 1.0, "dice_per_class": [clean, float("nan")]})
    a = Scores({"clean_dice": clean, "adv_dice": adv, "dice_drop": clean - adv, "linf": 4 / 255,
                "dice_per_class": [adv, float("nan")], **extra}, info={"mean_q": 10.0 + adv})
    return c, a


def _record(i: int, clean: float, adv: float) -> CaseRecord:
    c, a = _scores(clean, adv)
    return CaseRecord(case=f"{i:04d}_x", image="x.nii.gz", label="y.nii.gz", index=i, seed=i, shape=[4, 4, 4],
                      spacing_mm=[1.0, 1.0, 1.0], clean=c, attacks={"vafa": a})


def test_summary_aggregation_known_values_and_attack_info_is_kept():
    recs = [_record(0, 0.8, 0.2), _record(1, 0.6, 0.5), _record(2, 0.0, 0.0)]
    s = summarize(recs, ["vafa"], threshold=0.5)
    row = s.attacks["vafa"]
    assert row.get("adv_dice") == pytest.approx(0.7 / 3) and row.get("clean_dice") == pytest.approx(1.4 / 3)
    assert row.get("fooling_rate") == pytest.approx(0.5)  # case 0 fooled, case 1 not, case 2 (clean 0) excluded
    assert row.get("dice_per_class")[0] == pytest.approx(0.7 / 3) and math.isnan(row.get("dice_per_class")[1])
    assert row.info["mean_q"] == pytest.approx(10.0 + 0.7 / 3)  # VAFA's extras: kept and averaged
    assert row.get("ssim") is None  # no case has it: missing, not NaN
    assert s.clean.get("adv_dice") == pytest.approx(1.4 / 3) and "fooling_rate" not in s.clean.values
    # JSON round trip keeps the keys of results written before the schema
    d = s.to_dict()
    assert d["clean"]["dice"] == pytest.approx(1.4 / 3) and d["attacks"]["vafa"]["info"]["mean_q"] > 10
    back = Summary.from_dict(json.loads(json.dumps(d)))
    assert back.attacks["vafa"].info == row.info and back.clean.get("hd95_mm") == 1.0
    rec = recs[0].to_dict()
    assert rec["attacks"]["vafa"]["dice"] == 0.2 and "adv_dice" not in rec["attacks"]["vafa"]
    assert json.dumps(CaseRecord.from_dict(json.loads(json.dumps(rec))).to_dict()) == json.dumps(rec)
    # an old summary (schema 1) reads: the clean row's "dice" fills the Dice columns
    old = Summary.from_dict({"n_cases": 1, "clean": {"dice": 0.9, "hd95_mm": 2.0}, "attacks": {}})
    assert old.clean.get("clean_dice") == 0.9 and old.rows()[0].label == "clean"
    assert Row.from_dict("a", "attack", {"adv_dice": 0.1}).get("adv_dice") == 0.1


def test_sizes_come_from_the_attack_info_when_complete_else_measured_once():
    x = torch.zeros(1, 1, 4, 4, 4)
    adv = x + 2 / 255
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    clean = Outcome(y, y, 2, [1, 1, 1])
    calls = []

    def measure(a, b, **kw):
        calls.append(kw)
        return {"linf": [0.5], "rms": [0.25], "psnr": [3.0], "ssim": [0.9], "linf_units": [1.0], "rms_units": [2.0]}

    info = {"linf": [2 / 255], "rms": [2 / 255], "psnr": [40.0], "ssim": [0.99], "linf_units": [3.3],
            "rms_units": [3.3], "seconds": 1.5}
    o = Outcome(y, y, 2, [1, 1, 1], clean=clean, image=x, adv=adv, info=info, unit_scale=425.0, measure=measure)
    assert o.perturbation["linf"] == pytest.approx(2 / 255) and o.perturbation["ssim"] == 0.99 and not calls
    partial = {k: v for k, v in info.items() if k != "psnr"}
    o = Outcome(y, y, 2, [1, 1, 1], clean=clean, image=x, adv=adv, info=partial, unit_scale=425.0, measure=measure)
    assert o.perturbation["linf"] == 0.5 and o.perturbation["psnr"] == 3.0
    assert o.perturbation["rms_units"] == 2.0 and len(calls) == 1
    assert calls[0] == {"data_range": (0.0, 1.0), "unit_scale": 425.0}


def test_volume_sizes_come_from_the_attack_and_stitched_ones_are_measured_once(cases, tmp_path, monkeypatch):
    from volattack.evaluation import cases as case_module

    calls = []
    measure = case_module.measure_perturbation

    def counting(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(case_module, "measure_perturbation", counting)
    vol = _run(cases, tmp_path / "volume")
    assert calls == []  # the attack's info holds every size
    patch = _run(cases, tmp_path / "patch", threat_model="patch", patch_size=[16, 16, 16])
    assert len(calls) == 2  # one stitched result per case and attack
    for res in (vol, patch):
        s = res["summary"]["attacks"]["fgsm(eps=4/255)"]
        assert s["linf"] == pytest.approx(4 / 255, rel=1e-5) and s["linf_units"] == pytest.approx(s["linf"] * 425)
