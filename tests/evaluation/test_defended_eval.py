"""Evaluation of input-transform defences from the config (``evaluate.defense``: BPDA / EOT) and
intensity units (``data.preprocess.units``) in results and reports."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

import volattack
from volattack.config import ConfigError
from volattack.data.config import PreprocessConfig
from volattack.defenses.config import DefenseConfig, TransformSpec
from volattack.models.config import ModelConfig
from volattack.pipeline import load_run_config, run_evaluate

PGD = [{"name": "pgd", "params": {"steps": 4, "eps": "16/255"}}]
DCT_QUANT = [{"name": "dct_quant", "params": {"block_size": 8, "q": 10}}]


def _train_tiny_unet(datalist: Path, pre: PreprocessConfig, steps: int = 30) -> torch.nn.Module:
    """A tiny UNet fitted for a few steps on the training phantoms, so that Dice is well above 0."""
    from monai.losses import DiceCELoss

    from volattack.data.datalist import load_datalist
    from volattack.data.transforms import build_transforms
    from volattack.evaluation.cases import load_case

    tf = build_transforms(pre, mode="eval")
    pairs = [load_case(e, tf)[:2] for e in load_datalist(datalist, key="training")]
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(0)
        model = volattack.create_model("unet", 1, 5, channels=[4, 8], strides=[2], num_res_units=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Phantoms (2 training, 2 test cases), a briefly trained tiny checkpoint and a config writer."""
    root = tmp_path_factory.mktemp("defended")
    datalist = volattack.make_phantom_dataset(root / "ph", n=2, size=(24, 24, 16), seed=0, n_val=0, n_test=2)
    pre = {"roi_size": [16, 16, 16], "crop_foreground": False}
    model = _train_tiny_unet(datalist, PreprocessConfig(**pre))
    cfg = ModelConfig(name="unet", in_channels=1, out_channels=5,
                      kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})
    ckpt = volattack.save_checkpoint(root / "m.pt", model, cfg)

    def write_cfg(name: str, units: str | None = None, **evaluate) -> Path:
        ev = {"checkpoint": str(ckpt), "figures": False, "sanity_unbounded_steps": 0, "attacks": PGD, **evaluate}
        p = root / f"{name}.yaml"
        prep = dict(pre, **({"units": units} if units is not None else {}))
        p.write_text(json.dumps({
            "seed": 0, "output_dir": str(root / name),
            "data": {"datalist": str(datalist), "preprocess": prep},
            "model": {"out_channels": 5}, "evaluate": ev,
        }))
        return p

    def run(name: str, **kw) -> tuple[dict, Path]:
        out = root / name
        return run_evaluate(load_run_config(str(write_cfg(name, **kw))), out, progress=False), out

    return root, write_cfg, run


def _check(res: dict, name: str) -> dict:
    return next(c for c in res["sanity"] if c["check"] == name)


def _per_case(out: Path) -> dict[str, dict]:
    res = json.loads((out / "results.json").read_text())
    return {c["case"]: {k: v for k, v in c.items() if k != "seconds"}
            | {"attacks": {a: {k: v for k, v in m.items() if k != "seconds"} for a, m in c["attacks"].items()}}
            for c in res["cases"]}


def test_dct_quantization_masks_gradients_unless_bpda(env):
    _, _, run = env
    bare, _ = run("bare")
    none, _ = run("bpda_none", defense={"transforms": DCT_QUANT, "bpda": "none"})
    ident, out = run("bpda_identity", defense={"transforms": DCT_QUANT, "bpda": "identity"})
    # hard rounding has an exactly-zero autograd gradient: the sanity check flags it ...
    assert _check(none, "zero_gradients")["status"] == "warn"
    assert "1.0000" in _check(none, "zero_gradients")["detail"]
    # ... and the straight-through (identity) backward pass removes the masking
    assert _check(ident, "zero_gradients")["status"] == "ok"
    label = "pgd(steps=4, eps=16/255)"
    drop_none = none["summary"]["attacks"][label]["dice_drop"]
    drop_ident = ident["summary"]["attacks"][label]["dice_drop"]
    assert drop_ident > drop_none  # the adaptive attack lowers Dice more (direction only)
    # the clean row is the defended model's; the bare model's clean Dice is kept beside it
    assert ident["summary"]["clean"]["dice"] == none["summary"]["clean"]["dice"]
    assert ident["summary"]["clean_undefended"]["dice"] == pytest.approx(bare["summary"]["clean"]["dice"], abs=1e-12)
    assert 0.1 < bare["summary"]["clean"]["dice"] <= 1
    # results.json: what the defence is and which adaptive attack was run
    assert ident["defense"].startswith("DCTQuantization(block_size=8, q=10.0") and "bpda" not in ident["defense"]
    assert ident["defense"].endswith("-> model")
    assert ident["defense_config"] == {"transforms": [{"name": "dct_quant", "params": {"block_size": 8, "q": 10}}],
                                       "bpda": "identity", "eot_samples": 1}
    assert ident["adaptive"].startswith("Adaptive attack: BPDA with an identity backward pass through DCTQuantization")
    assert "no BPDA" in none["adaptive"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["adaptive"] == ident["adaptive"] and on_disk["defense"] == ident["defense"]
    report = (out / "report.md").read_text()
    assert "- adaptive attack: BPDA with an identity backward pass through DCTQuantization" in report
    assert f"- defence: {ident['defense']}" in report and "defended model" in report
    assert "- defence cost: clean Dice" in report and "| clean, no defence |" in report
    # a defence is part of the resume key: a defended run never reuses an undefended case
    parts = [json.loads(p.read_text())["key_parts"] for r in ("bare", "bpda_none", "bpda_identity")
             for p in sorted((env[0] / r / "cases").glob("*.json"))]
    assert len({p["defense"] for p in parts}) == 3 and len({p["weights"] for p in parts}) == 1


def test_without_defense_nothing_changes_and_units_are_reported(env):
    root, _, run = env
    res, out = run("units_au", units="a.u.")
    assert not {"defense", "defense_config", "adaptive"} & set(res)
    assert "clean_undefended" not in res["summary"] and all("clean_undefended" not in c for c in res["cases"])
    assert res["intensity_units"] == "a.u."
    s = res["summary"]["attacks"]["pgd(steps=4, eps=16/255)"]
    assert s["linf_units"] == pytest.approx(s["linf"] * 425, rel=1e-5)  # keys and values as before
    report = (out / "report.md").read_text()
    assert "| L-inf a.u. | RMS a.u. |" in report and "L-inf HU" not in report and "RMS HU" not in report
    assert "in source units (a.u.)" in report and "## Definitions" in report
    assert "defence" not in report and "adaptive attack" not in report
    rows = list(csv.reader(io.StringIO((out / "results.csv").read_text())))
    assert rows[0][-1] == "intensity_units" and "linf_units" in rows[0]
    assert all(r[-1] == "a.u." for r in rows[1:]) and len(rows) == 3  # clean + one attack
    cases = sorted((out / "cases").glob("*.json"))
    # renaming the unit reuses every finished case and relabels the report
    stamps = {p: p.stat().st_mtime_ns for p in cases}
    res_hu = run_evaluate(load_run_config(str(root / "units_au.yaml"), ["data.preprocess.units=HU"]), out,
                          progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert res_hu["intensity_units"] == "HU" and "| L-inf HU | RMS HU |" in (out / "report.md").read_text()


def test_randomised_defence_uses_eot_and_replays_per_case(env):
    _, _, run = env
    defense = {"transforms": [{"name": "noise", "params": {"sigma": "4/255"}}], "bpda": "identity", "eot_samples": 2}
    two = [{"name": "pgd", "params": {"steps": 2}, "sweep": {"eps": ["2/255", "8/255"]}}]
    res, out = run("eot", defense=defense, attacks=two)
    assert "EOT over 2 draws" in res["adaptive"] and res["defense"] == "RandomNoise(sigma=0.01568627450980392) -> model"
    assert _check(res, "zero_gradients")["status"] == "ok"
    before = _per_case(out)
    # recompute the second case alone: randomness is reseeded per case, so it replays bit for bit
    second = sorted((out / "cases").glob("*.json"))[1]
    second.unlink()
    run_evaluate(load_run_config(str(env[0] / "eot.yaml")), out, progress=False)
    assert _per_case(out) == before
    # an attack's row does not depend on the other attacks of the suite (draws restart per attack)
    res1, _ = run("eot_one", defense=defense, attacks=[{"name": "pgd", "params": {"steps": 2, "eps": "8/255"}}],
                  sanity_checks=False)
    for c2, c1 in zip(res["cases"], res1["cases"]):
        assert c2["clean"] == c1["clean"]
        a2 = {k: v for k, v in c2["attacks"]["pgd(eps=8/255)"].items() if k != "seconds"}
        a1 = {k: v for k, v in c1["attacks"]["pgd(steps=2, eps=8/255)"].items() if k != "seconds"}
        assert a2 == a1


@pytest.mark.parametrize(
    "defense, match",
    [
        ({"transforms": [{"name": "dct_qaunt"}]}, r"transforms\[0\]: name must be one of .*Did you mean 'dct_quant'"),
        ({"transforms": DCT_QUANT, "eot_samples": 0}, r"eot_samples must be an integer >= 1, got 0"),
        ({"transforms": DCT_QUANT, "eot_samples": 1.5}, r"evaluate.defense.eot_samples: expected an integer"),
        ({"transforms": DCT_QUANT, "bpda": "identty"}, r"bpda must be one of none, identity, smooth, got 'identty'"),
        ({"transforms": []}, r"transforms must list at least one transform"),
        ({"transforms": [{"name": "median", "params": {"bpda": "none"}}]}, r"params.bpda .*set evaluate.defense.bpda"),
        ({"transforms": [{"name": "median", "parms": {}}]},
         r"Unknown config key 'evaluate.defense.transforms\[0\].parms'"),
    ],
)
def test_bad_defense_config_raises(env, defense, match):
    _, write_cfg, _ = env
    with pytest.raises(ConfigError, match=match):
        load_run_config(str(write_cfg("bad_cfg", defense=defense)))


@pytest.mark.parametrize(
    "transforms, match",
    [
        ([{"name": "dct_quant", "params": {"q": -1}}], r"evaluate.defense: transforms\[0\] \(dct_quant\): q must be"),
        ([{"name": "gaussian", "params": {"sigam": 1}}],
         r"transforms\[0\] \(gaussian\): unknown parameter 'sigam'. Did you mean 'sigma'\?"),
        ([{"name": "median"}, {"name": "median", "params": {"kernel_size": 4}}],
         r"transforms\[1\] \(median\): kernel_size must be odd, got 4"),
    ],
)
def test_bad_transform_parameters_fail_before_any_model_or_data_work(env, tmp_path, transforms, match):
    _, write_cfg, _ = env
    cfg = load_run_config(str(write_cfg("bad_params", defense={"transforms": transforms})),
                          [f"evaluate.checkpoint={tmp_path / 'missing.pt'}", f"data.datalist={tmp_path / 'no.json'}"])
    with pytest.raises(ConfigError, match=match):  # not FileNotFoundError: validated first
        run_evaluate(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("units", ["", " HU", "a|b", "x" * 17, 5])
def test_bad_units_raise(units):
    with pytest.raises(ValueError, match="units must be a non-empty label"):
        PreprocessConfig(units=units).validate()


def test_defense_dataclasses_direct():
    d = DefenseConfig(transforms=[{"name": "noise", "params": {"sigma": "2/255"}}])
    assert d.bpda == "identity" and d.eot_samples == 1
    assert d.transforms == [TransformSpec("noise", {"sigma": 2 / 255})]
    assert TransformSpec("dct_quant", {"q": 10}).label() == "dct_quant(q=10)"
    with pytest.raises(ValueError, match=r"eot_samples must be an integer >= 1, got True"):
        DefenseConfig(transforms=[TransformSpec("median")], eot_samples=True)
    with pytest.raises(ValueError, match=r"name must be one of .*got 'jpeg'"):
        TransformSpec("jpeg")


def test_blackbox_check_flags_dct_quant_without_bpda_not_the_bare_model(env):
    """End to end (tiny model, 2 cases): ``sanity_blackbox_queries`` adds a square attack at the PGD's
    eps; through DCT quantisation without BPDA, PGD's gradient is zero and the gradient-free attack
    does better (flagged), on the bare model PGD wins (not flagged)."""
    _, _, run = env
    bare, out = run("bb_bare", sanity_blackbox_queries=60)
    none, _ = run("bb_none", sanity_blackbox_queries=60, defense={"transforms": DCT_QUANT, "bpda": "none"})
    square = "square(eps=16/255, queries=60)"
    assert square in bare["summary"]["attacks"] and square in none["summary"]["attacks"]
    assert _check(bare, "blackbox")["status"] == "ok", _check(bare, "blackbox")["detail"]
    assert _check(none, "blackbox")["status"] == "warn", _check(none, "blackbox")["detail"]
    assert "likely gradient masking" in _check(none, "blackbox")["detail"]
    assert "⚠ WARNING blackbox" not in (out / "report.md").read_text() and "✓ blackbox" in (out / "report.md").read_text()
    card = json.loads((out / "robustness.json").read_text())
    assert {r["label"] for r in card["rows"]} == {"pgd(steps=4, eps=16/255)", square}
