"""Reports, figures and sanity checks print and compare perturbation sizes by their real units
(defect 9 of the 0.2 audit), on hand-built results with known values."""

from __future__ import annotations

import pytest

from volattack.evaluation.config import AttackSpec
from volattack.evaluation.figures import budget_series
from volattack.evaluation.report import csv_text, markdown_table
from volattack.evaluation.sanity import sanity_checks


def _results(attacks: dict[str, dict], names: dict[str, str], bounds=None, linf_budget=None) -> dict:
    res = {
        "threat_model": "volume",
        "attacks": [{"label": k, "name": names[k], "params": {},
                     "linf_budget": (linf_budget or {}).get(k, names[k] in ("pgd", "fgsm"))} for k in attacks],
        "cases": [],
        "summary": {"n_cases": 2, "clean": {"dice": 0.9, "hd95_mm": 3.0, "dice_per_class": [0.9]},
                    "attacks": {k: {"clean_dice": 0.9, "dice_per_class": [v["adv_dice"]], **v}
                                for k, v in attacks.items()}},
    }
    if bounds is not None:
        res["bounds"] = list(bounds)
    return res


def test_linf_column_is_printed_in_the_input_range_units():
    atk = {"pgd(eps=8/255)": {"adv_dice": 0.5, "linf": 8 / 255, "linf_units": 13.3}}
    unit = markdown_table(_results(atk, {"pgd(eps=8/255)": "pgd"}))
    assert "| 8.00/255 | 13.3 |" in unit  # [0, 1] inputs (and results without bounds)
    wide = markdown_table(_results(atk, {"pgd(eps=8/255)": "pgd"}, bounds=(-1.0, 1.0)))
    assert "| 0.03137 | 13.3 |" in wide and "/255 |" not in wide
    hu = markdown_table(_results({"pgd": {"adv_dice": 0.5, "linf": 8.0}}, {"pgd": "pgd"}, bounds=(-1024.0, 3071.0)))
    assert "| 8 |" in hu and "/255 |" not in hu
    assert "0.03137254" in csv_text(_results(atk, {"pgd(eps=8/255)": "pgd"}, bounds=(-1.0, 1.0)))  # raw numbers


def test_backdoor_columns_appear_only_in_runs_that_have_them():
    plain = markdown_table(_results({"pgd": {"adv_dice": 0.5}}, {"pgd": "pgd"}))
    assert "Backdoor success" not in plain and "Untouched Dice" not in plain and "| NSD |" in plain
    trig = markdown_table(_results({"trigger": {"adv_dice": 0.5, "backdoor_success": 0.75}}, {"trigger": "pgd"}))
    assert "| Backdoor success | Backdoor Dice | Untouched Dice |" not in trig  # only the one with a value
    assert "| Backdoor success |" in trig and "| 0.750 |" in trig
    assert "Backdoor Dice" not in trig and "Untouched Dice" not in trig


def test_budget_figure_scales_only_linf_eps_on_a_unit_range():
    linf = AttackSpec("pgd", sweep={"eps": ["2/255", "8/255"]})
    l2 = AttackSpec("pgd_l2", sweep={"eps": [0.5, 1.0]})
    steps = AttackSpec("pgd", params={"eps": "4/255"}, sweep={"steps": [1, 5]})
    labels = {lbl: spec.name for spec in (linf, l2, steps) for lbl, _ in spec.expand()}
    attacks = {lbl: {"adv_dice": 0.5} for lbl in labels}
    res = _results(attacks, labels, linf_budget={lbl: n == "pgd" for lbl, n in labels.items()})
    series = {s.label: s for s in budget_series(res, [linf, l2, steps])}
    assert series["pgd (eps, L-inf, /255)"].xs == pytest.approx([2.0, 8.0])
    assert series["pgd_l2 (eps, as configured)"].xs == [0.5, 1.0]  # an L2 radius is not a grey level
    assert series["pgd (steps, as configured)"].xs == [1.0, 5.0]
    wide = budget_series({**res, "bounds": [-1.0, 1.0]}, [linf])
    assert wide[0].xs == pytest.approx([2 / 255, 8 / 255]) and wide[0].scale == 1.0


def test_beats_noise_compares_at_equal_measured_rms_not_linf():
    """Gaussian noise of sigma 8/255 has an L-inf near 4.5 sigma: an L-inf comparison would let a
    32/255 PGD "beat" it. At equal RMS only the 4/255 PGD qualifies, and here it does not win."""
    atk = {
        "gn(eps=8/255)": {"adv_dice": 0.80, "linf": 36 / 255, "rms": 8 / 255},
        "pgd(eps=4/255)": {"adv_dice": 0.85, "linf": 4 / 255, "rms": 3.8 / 255},
        "pgd(eps=32/255)": {"adv_dice": 0.10, "linf": 32 / 255, "rms": 30 / 255},
    }
    names = {k: k.split("(")[0] for k in atk}
    (check,) = [c for c in sanity_checks(_results(atk, names), []) if c["check"] == "beats_noise"]
    assert check["status"] == "warn"
    assert "pgd(eps=4/255) Dice 0.850" in check["detail"] and "RMS of gn(eps=8/255) (8.00/255)" in check["detail"]
    atk["pgd(eps=4/255)"]["adv_dice"] = 0.3
    (check,) = [c for c in sanity_checks(_results(atk, names), []) if c["check"] == "beats_noise"]
    assert check["status"] == "ok"
    del atk["pgd(eps=4/255)"]
    (check,) = [c for c in sanity_checks(_results(atk, {k: names[k] for k in atk}), []) if c["check"] == "beats_noise"]
    assert check["status"] == "n/a" and "no attack with RMS <= that of gn(eps=8/255)" in check["detail"]
