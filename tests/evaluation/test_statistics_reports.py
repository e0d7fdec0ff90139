"""Intervals in every table, ROG's robust rate, organ-size strata, the black-box sanity check, the
``reliable`` preset, robustness cards and the leaderboard, on hand-built results with known values."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import pytest

from volattack.evaluation.card import build_card, read_card, write_card
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.evaluation.leaderboard import build_leaderboard, write_leaderboard
from volattack.evaluation.report import csv_text, interval_table, per_class_table, size_table
from volattack.evaluation.sanity import sanity_checks
from volattack.evaluation.summary import organ_size_strata, size_bin, summarize
from volattack.metrics.statistics import bootstrap_ci, robust_volume_rate

CLEAN = [0.90, 0.80, 0.70, 0.60]
ADV = {"pgd(eps=8/255)": [0.30, 0.50, 0.20, 0.40], "square(eps=8/255, queries=50)": [0.60, 0.70, 0.50, 0.55]}


def _case(i: int, clean: float, adv: dict[str, float], vols=(5.0, 50.0)) -> dict:
    return {"case": f"{i:04d}_c{i}", "image": f"img{i}", "label": f"lab{i}", "index": i, "seed": i, "shape": [8, 8, 8],
            "spacing_mm": [1.0, 1.0, 1.0], "key": "k", "key_parts": {"weights": "w", "attacks": "a", "data": f"d{i}"},
            "clean": {"clean_dice": clean, "dice": clean, "dice_per_class": [clean, clean],
                      "gt_volume_ml_per_class": list(vols)},
            "attacks": {lbl: {"clean_dice": clean, "dice": d, "dice_drop": clean - d,
                              "dice_per_class": [d - 0.1, d + 0.1], "linf": 8 / 255} for lbl, d in adv.items()}}


def _results(clean=CLEAN, adv=ADV, names=None, eps=8 / 255, class_names=None) -> dict:
    cases = [_case(i, c, {lbl: v[i] for lbl, v in adv.items()}) for i, c in enumerate(clean)]
    names = names or {lbl: lbl.split("(")[0] for lbl in adv}
    return {"threat_model": "volume", "seed": 0, "volattack": "0.2.0", "versions": {"torch": "2"},
            "model": {"name": "unet"}, "num_classes": 3,
            "class_names": class_names or {"1": "liver", "2": "spleen"},
            "attacks": [{"label": lbl, "name": names[lbl], "params": {"eps": eps},
                         "linf_budget": names[lbl] in ("pgd", "square")} for lbl in adv],
            "cases": cases, "summary": summarize(cases, list(adv), 0.5).to_dict()}


def test_every_mean_has_a_bootstrap_interval_and_the_cases_behind_it():
    res = _results()
    row = res["summary"]["attacks"]["pgd(eps=8/255)"]
    est = bootstrap_ci(ADV["pgd(eps=8/255)"])
    assert row["adv_dice"] == pytest.approx(0.35) and row["adv_dice_ci"] == pytest.approx([est.lo, est.hi])
    assert row["adv_dice_n"] == 4 and row["dice_drop_ci"][0] <= row["dice_drop"] <= row["dice_drop_ci"][1]
    # ROG's robust rate: cases with adv >= 0.5 x their own clean Dice (0.5 >= 0.4 and 0.4 >= 0.3: 2 of 4)
    assert row["robust_rate"] == pytest.approx(robust_volume_rate(CLEAN, ADV["pgd(eps=8/255)"])) == 0.5
    assert len(row["robust_rate_ci"]) == 2 and row["robust_rate_n"] == 4
    assert len(row["dice_per_class_ci"]) == 2  # per-class intervals
    clean = res["summary"]["clean"]
    assert clean["clean_dice_ci"][0] < 0.75 < clean["clean_dice_ci"][1] and "dice_drop_ci" not in clean


def test_report_prints_intervals_in_a_second_table_and_the_csv_their_bounds():
    res = _results()
    table = interval_table(res).splitlines()
    assert table[0] == "| Attack | n | Clean Dice | Adv Dice | Drop | Robust rate |"
    pgd = next(line for line in table if line.startswith("| pgd(eps=8/255) |"))
    lo, hi = res["summary"]["attacks"]["pgd(eps=8/255)"]["adv_dice_ci"]
    assert f"| 4 | 0.750 [" in pgd and f"| 0.350 [{lo:.3f}, {hi:.3f}] |" in pgd
    rows = list(csv.DictReader(io.StringIO(csv_text(res))))
    header = list(rows[0])
    assert header.index("adv_dice_lo") == header.index("adv_dice") + 1 and "adv_dice_hi" in header
    assert float(rows[1]["adv_dice_lo"]) == pytest.approx(lo) and "fooling_rate_lo" not in header
    assert "[" in per_class_table(res).splitlines()[2]


def test_a_single_case_has_no_interval_and_says_so_by_showing_none():
    res = _results(clean=[0.9], adv={"pgd(eps=8/255)": [0.3]})
    row = res["summary"]["attacks"]["pgd(eps=8/255)"]
    assert row["adv_dice_n"] == 1 and all(math.isnan(v) for v in row["adv_dice_ci"])
    assert "| pgd(eps=8/255) | 1 | 0.900 | 0.300 |" in interval_table(res)


def test_drops_stratified_by_organ_size():
    assert [size_bin(v) for v in (0.0, 5.0, 10.0, 99.9, 100.0, float("nan"))] == [
        None, "small", "medium", "medium", "large", None]
    res = _results()
    strata = {(s["attack"], s["size"]): s for s in organ_size_strata(res["cases"], ["pgd(eps=8/255)"])}
    small, medium = strata[("pgd(eps=8/255)", "small")], strata[("pgd(eps=8/255)", "medium")]
    assert set(strata) == {("pgd(eps=8/255)", "small"), ("pgd(eps=8/255)", "medium")}  # no class >= 100 mL
    # class 1 (5 mL) loses clean - (adv - 0.1), class 2 (50 mL) clean - (adv + 0.1): small drops 0.2 more
    assert small["drop"] - medium["drop"] == pytest.approx(0.2) and small["n"] == medium["n"] == 4
    assert small["clean_dice"] == pytest.approx(0.75) and small["drop_ci"][0] <= small["drop"] <= small["drop_ci"][1]
    text = "\n".join(size_table(res))
    assert "small < 10 mL, medium 10–100 mL, large ≥ 100 mL" in text and "| pgd(eps=8/255) | small | 4 |" in text


def _blackbox(res):
    return [c for c in sanity_checks(res, []) if c["check"] == "blackbox"]


def test_blackbox_check_flags_a_stronger_black_box_attack():
    ok, = _blackbox(_results())  # square 0.59 vs PGD 0.35: white-box wins, no masking
    assert ok["status"] == "ok" and "no sign of gradient masking" in ok["detail"]
    assert "pgd(eps=8/255) Dice 0.350" in ok["detail"] and "n=4" in ok["detail"]
    masked = {"pgd(eps=8/255)": [0.85, 0.78, 0.69, 0.6], "square(eps=8/255, queries=50)": [0.5, 0.4, 0.45, 0.3]}
    warn, = _blackbox(_results(adv=masked))
    assert warn["status"] == "warn" and "likely gradient masking" in warn["detail"]
    assert "(black − white -0.318 [" in warn["detail"]
    other_eps = _results(adv=masked)
    other_eps["attacks"][0]["params"]["eps"] = 4 / 255  # PGD at another budget: nothing to compare
    na, = _blackbox(other_eps)
    assert na["status"] == "n/a" and "no white-box L-inf attack at the eps" in na["detail"]
    none, = _blackbox(_results(adv={"pgd(eps=8/255)": ADV["pgd(eps=8/255)"]}))
    assert none["status"] == "n/a" and "sanity_blackbox_queries" in none["detail"]


def test_reliable_preset_expands_to_sea_with_its_label():
    spec = AttackSpec("reliable", params={"eps": "4/255"})
    assert spec.name == "sea" and spec.preset == "reliable"
    assert spec.params == {"norm": "linf", "steps": 300, "eps": 4 / 255,
                           "losses": ["masked_ce", "balanced_masked_ce", "jsd", "masked_spherical"]}
    assert spec.expand()[0][0] == "reliable(eps=4/255)"
    assert AttackSpec("reliable", params={"eps": "4/255", "steps": 20}).expand()[0][0] == "reliable(eps=4/255, steps=20)"
    again = AttackSpec(spec.name, params=dict(spec.params), preset=spec.preset)  # config.yaml round trip
    assert again.expand() == spec.expand()
    from volattack.config import RunConfig, from_dict
    from volattack.pipeline import _validate_attacks

    cfg = from_dict(RunConfig, {"evaluate": {"attacks": [{"name": "reliable", "params": {"eps": "4/255"}}]}})
    assert cfg.evaluate.attacks[0].name == "sea" and cfg.evaluate.attacks[0].expand() == spec.expand()
    _validate_attacks(cfg)  # the sea attack accepts the preset's settings
    with pytest.raises(ValueError, match=r"preset must be one of \['reliable'\] or None, got 'fast'"):
        AttackSpec("pgd", preset="fast")
    with pytest.raises(ValueError, match=r"sanity_blackbox_queries must be >= 0, got -1"):
        EvalConfig(sanity_blackbox_queries=-1)


def test_blackbox_option_adds_square_at_the_strongest_white_box_linf_eps():
    from volattack.config import RunConfig
    from volattack.pipeline import with_blackbox_check

    ev = EvalConfig(attacks=[AttackSpec("pgd", sweep={"eps": ["2/255", "8/255"]}), AttackSpec("gn", params={"eps": 0.5}),
                             AttackSpec("pgd_l2", params={"eps": 2.0})], sanity_blackbox_queries=30)
    cfg = with_blackbox_check(RunConfig(evaluate=ev))
    added = cfg.evaluate.attacks[-1]
    assert len(cfg.evaluate.attacks) == 4 and added.name == "square"
    assert added.params == {"eps": pytest.approx(8 / 255), "queries": 30}
    assert with_blackbox_check(cfg).evaluate.attacks == cfg.evaluate.attacks  # already there: not twice
    off = RunConfig(evaluate=EvalConfig(attacks=ev.attacks))
    assert with_blackbox_check(off) is off


def _card_run(tmp_path, name, datalist_text='{"test": []}', **kw):
    run = tmp_path / name
    run.mkdir()
    dl = tmp_path / f"{name}_dataset.json"
    dl.write_text(datalist_text)
    (run / "config.yaml").write_text(f"data:\n  datalist: {dl}\n  test_key: test\n")
    write_card(_results(**kw), run)
    return run


def test_robustness_card_has_every_row_with_its_interval_and_the_identities(tmp_path):
    run = _card_run(tmp_path, "a")
    card = read_card(run)
    assert card["clean"]["dice"] == pytest.approx(0.75) and len(card["clean"]["dice_ci"]) == 2 and card["clean"]["n"] == 4
    rows = {r["label"]: r for r in card["rows"]}
    assert set(rows) == set(ADV) and rows["pgd(eps=8/255)"]["adv_dice_n"] == 4
    assert rows["pgd(eps=8/255)"]["kind"] == "attack" and len(rows["pgd(eps=8/255)"]["adv_dice_ci"]) == 2
    assert card["config_digest"] and card["key_parts"] == {"weights": "w", "attacks": "a"}
    assert card["dataset"]["class_names"] == {"1": "liver", "2": "spleen"} and card["dataset"]["datalist_digest"]
    assert card["versions"]["volattack"] == "0.2.0" and card["versions"]["torch"] == "2"
    rel = _results(adv={"reliable(eps=4/255)": [0.2] * 4, "corrupt_noise(s=1)": [0.7] * 4},
                   names={"reliable(eps=4/255)": "sea", "corrupt_noise(s=1)": "x"})
    rel["attacks"] = rel["attacks"][:1]  # the corruption row comes from a row pass, not an attack
    kinds = {r["label"]: r["kind"] for r in build_card(rel)["rows"]}
    assert kinds == {"reliable(eps=4/255)": "reliable", "corrupt_noise(s=1)": "row"}


def test_leaderboard_merges_cards_and_refuses_other_datasets_or_label_sets(tmp_path):
    a = _card_run(tmp_path, "a")
    b = tmp_path / "b"
    b.mkdir()
    (b / "config.yaml").write_text((a / "config.yaml").read_text())  # same datalist file
    write_card(_results(adv={"pgd(eps=8/255)": [0.5, 0.6, 0.4, 0.5]}), b)
    md, text = build_leaderboard([a, b])
    lines = md.splitlines()
    assert lines[2] == "| Run | Model | Defence | clean | pgd(eps=8/255) | square(eps=8/255, queries=50) |"
    assert lines[4].startswith(f"| {a} | unet | none | 0.750 [") and lines[5].endswith("| – |")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 + 2 and rows[1]["row"] == "pgd(eps=8/255)" and float(rows[1]["dice"]) == pytest.approx(0.35)
    other = _card_run(tmp_path, "c", datalist_text='{"test": [{"image": "other"}]}')
    with pytest.raises(ValueError, match=r"different datasets .*" + str(other).replace("/", ".")):
        build_leaderboard([a, other])
    labels = tmp_path / "d"
    labels.mkdir()
    (labels / "config.yaml").write_text((a / "config.yaml").read_text())
    write_card(_results(class_names={"1": "heart", "2": "lung"}), labels)
    out = tmp_path / "board.md"
    with pytest.raises(ValueError, match=r"different label sets .*'heart'"):
        write_leaderboard([a, labels], out)
    assert not out.exists() and not out.with_suffix(".csv").exists()  # nothing half-written
    with pytest.raises(FileNotFoundError, match=r"no robustness card .*missing"):
        build_leaderboard([tmp_path / "missing"])
    md_path, csv_path = write_leaderboard([a, b], out)
    assert md_path.read_text() == md and csv_path.read_text() == text


def test_leaderboard_command_line(tmp_path, capsys):
    from volattack.cli import main

    a = _card_run(tmp_path, "a")
    assert main(["leaderboard", str(a)]) == 0
    assert "| Run | Model | Defence | clean |" in capsys.readouterr().out
    other = _card_run(tmp_path, "o", datalist_text="{}")
    assert main(["leaderboard", str(a), str(other), "--out", str(tmp_path / "lb.md")]) == 1
    assert "cannot be compared" in capsys.readouterr().err and not (tmp_path / "lb.md").exists()
    code = ("import sys\nfrom volattack.cli import main\ntry:\n    main(['leaderboard', '--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0\nassert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "RUN_DIR" in out.stdout
    json.loads((a / "robustness.json").read_text())  # plain JSON
