"""``evaluate.space: source``: the attack on the scan's own grid in HU through the deployed pipeline,
the adversarial scan written like the source (int16, LPS oblique affine, anisotropic spacing) and
scored as read back from disk; re-evaluated independently (MONAI's own transforms and inverse); the
budget after rounding; caches; every bad input before any file is written; the CLI flag."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import volattack
from volattack.data.config import PreprocessConfig
from volattack.data.source import read_scan
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.evaluation.runner import evaluate
from volattack.evaluation.source_passes import quantize_adv
from volattack.metrics import mean_foreground_dice
from volattack.models.sources import load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PRE = PreprocessConfig(spacing=[1.6, 1.6, 2.5], roi_size=[16, 16, 16], crop_foreground=True)
SHAPE = (32, 28, 16)


def write_case(root: Path, seed: int) -> dict:
    """A phantom written the way scanners write CT: int16 HU, stored LPS, rotated 7 degrees about z,
    1.4 x 1.4 x 3.2 mm."""
    from volattack.data.phantoms import generate_phantom

    ph = generate_phantom(seed, size=SHAPE, spacing=(1.4, 1.4, 3.2))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]
    t = np.deg2rad(7.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    aff = rot @ ph.affine @ flip
    img = nib.Nifti1Image(np.rint(ph.image[::-1, ::-1]).astype(np.int16), aff)
    img.header.set_data_dtype(np.int16)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, str(root / f"ct{seed}.nii.gz"))
    nib.save(nib.Nifti1Image(ph.label[::-1, ::-1].astype(np.uint8), aff), str(root / f"lab{seed}.nii.gz"))
    return {"image": str(root / f"ct{seed}.nii.gz"), "label": str(root / f"lab{seed}.nii.gz")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from volattack.models.config import ModelConfig

    root = tmp_path_factory.mktemp("source_space")
    cases = [write_case(root, s) for s in range(2)]
    (root / "dataset.json").write_text(json.dumps({"test": cases, "labels": {"0": "background", "1": "liver",
                                                                              "2": "spleen", "3": "kidney_left",
                                                                              "4": "kidney_right"}}))
    torch.manual_seed(0)
    cfg = ModelConfig(name="unet", in_channels=1, out_channels=5,
                      kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})
    net = volattack.create_model(cfg.name, 1, 5, **cfg.kwargs)
    ckpt = volattack.save_checkpoint(root / "m.pt", net, cfg, preprocess=PRE)
    return root, cases, ckpt


def _eval(root: Path, cases, ckpt, name: str, class_names=None, **ev):
    kw = {"space": "source", "attacks": [AttackSpec("pgd", params={"eps": 8, "alpha": 2, "steps": 2})],
          "figures": False, "sanity_unbounded_steps": 1, **ev}
    loaded = load_model(ckpt)
    return evaluate(loaded.module, cases, root / name, eval_cfg=EvalConfig(**kw), preprocess=PRE, num_classes=5,
                    loaded=loaded, progress=False, model_digest=loaded.digest, class_names=class_names)


def _digest(p: str) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _monai_dice(adv_path: str, label_path: str, ckpt) -> float:
    """Dice of the deployed MONAI pipeline run on the file: model-space transforms, sliding window,
    softmax, MONAI's inverse transforms back to the file's grid (the crop's padding as background)."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from volattack.data.transforms import build_transforms
    from volattack.inference import make_inferer

    loaded = load_model(ckpt)
    tf = build_transforms(PRE, mode="eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = tf({"image": adv_path, "label": label_path})
        with torch.no_grad():
            prob = torch.softmax(make_inferer(PRE.roi_size, 4, 0.25, cval=0.0)(s["image"].as_tensor()[None],
                                                                                loaded.module), 1)[0]
        s["pred"] = MetaTensor(prob, meta=s["image"].meta, applied_operations=s["image"].applied_operations)
        back = Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=False)(s)["pred"].as_tensor()
    back[0] += 1 - back.sum(0)
    label = torch.as_tensor(np.rint(read_scan(label_path).array)).long()[None]
    return float(mean_foreground_dice(back.argmax(0)[None, None], label, 5)[0])


def test_round_trip_written_scan_is_like_the_source_and_its_dice_is_reproduced(setup):
    root, cases, ckpt = setup
    before = {c["image"]: _digest(c["image"]) for c in cases}
    res = _eval(root, cases, ckpt, "run", save_adv=True, save_pred=True)
    assert res["space"] == "source" and not res["failed"] and len(res["cases"]) == 2
    lbl = res["attacks"][0]["label"]
    for case, entry in zip(res["cases"], cases):
        assert _digest(entry["image"]) == before[entry["image"]]  # the source is untouched
        adv_rel = [o for o in case["outputs"] if o.startswith("adversarial/")]
        assert adv_rel == [f"adversarial/{case['case']}_pgd_eps_8__alpha_2__steps_2.nii.gz"]
        adv_path = str(root / "run" / adv_rel[0])
        src, adv = nib.load(entry["image"]), nib.load(adv_path)
        assert adv.shape == src.shape == SHAPE
        assert adv.header.get_data_dtype() == np.int16
        np.testing.assert_allclose(adv.affine, src.affine, atol=1e-6)
        assert int(adv.header["qform_code"]) == 1 and int(adv.header["sform_code"]) == 1
        delta = np.asarray(adv.dataobj, dtype=np.float64) - np.asarray(src.dataobj, dtype=np.float64)
        assert np.abs(delta).max() <= 8 and np.all(delta == np.rint(delta)) and np.abs(delta).max() > 0
        row = case["attacks"][lbl]
        assert row["linf_units"] == pytest.approx(np.abs(delta).max())
        assert row["linf"] == row["linf_units"]  # the input is in HU: unit scale 1
        reported = row["dice"]
        # re-evaluated from disk: by volattack's deployed pipeline and by MONAI's own transforms
        from volattack.models.deploy import pipeline_for

        scan = read_scan(adv_path)
        pred = pipeline_for(load_model(ckpt), scan).predict(torch.as_tensor(scan.array)[None])
        label = torch.as_tensor(np.rint(read_scan(entry["label"]).array)).long()[None]
        assert abs(float(mean_foreground_dice(pred, label, 5)[0]) - reported) <= 0.005
        assert abs(_monai_dice(adv_path, entry["label"], ckpt) - reported) <= 0.005
        assert abs(_monai_dice(entry["image"], entry["label"], ckpt) - case["clean"]["dice"]) <= 0.005
        assert case["clean"]["info"]["source_bounds"] == [float(np.min(src.dataobj)), float(np.max(src.dataobj))]
        pred_file = root / "run" / f"predictions/{case['case']}_clean.nii.gz"
        assert nib.load(str(pred_file)).shape == SHAPE
    assert (root / "run" / "report.md").is_file() and (root / "run" / "results.csv").is_file()
    assert res["sanity"] is not None


def test_rerun_reuses_cases_and_source_bounds_recompute(setup, caplog):
    root, cases, ckpt = setup
    first = _eval(root, cases[:1], ckpt, "cache")
    with caplog.at_level(logging.INFO, logger="volattack.evaluation.runner"):
        again = _eval(root, cases[:1], ckpt, "cache")
    assert "already done, reused" in caplog.text
    assert again["cases"][0]["attacks"] == first["cases"][0]["attacks"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="volattack.evaluation.runner"):
        bounded = _eval(root, cases[:1], ckpt, "cache", source_bounds=[-2000, 3071])
    assert "recomputed: evaluate changed" in caplog.text
    assert bounded["bounds"] == [-2000.0, 3071.0]
    assert bounded["cases"][0]["clean"]["info"]["source_bounds"] == [-2000.0, 3071.0]
    narrow = _eval(root, cases[:1], ckpt, "narrow", source_bounds=[-200, 300])  # the case fails, with the reason
    assert not narrow["cases"] and "must contain the values of" in narrow["failed"][0]["reason"]


def test_quantize_keeps_the_linf_budget_after_rounding():
    class Scan:  # an int16 scan, unscaled
        grid_step = 1.0

        @staticmethod
        def storage():
            return (-32768.0, 32767.0), 1.0, 0.0

        @staticmethod
        def quantize(a):
            return np.clip(np.rint(a), -32768, 32767).astype(np.float32)

        @classmethod
        def channel_scans(cls):
            return [cls]

    clean = torch.tensor([0.0, 10.0, -1024.0, 100.0]).reshape(1, 1, 4, 1, 1)
    adv = clean + torch.tensor([8.6, -8.5, -3.0, 2.4]).reshape(1, 1, 4, 1, 1)
    q = quantize_adv(Scan, adv, clean, bounds=(-1024.0, 3071.0), eps=8.6)
    np.testing.assert_array_equal(q.reshape(-1), [8.0, 2.0, -1024.0, 102.0])  # floor(8.6) = 8; bounds clip -1027
    q2 = quantize_adv(Scan, adv, clean, bounds=(-1023.5, 101.5), eps=None)
    np.testing.assert_array_equal(q2.reshape(-1), [9.0, 2.0, -1023.0, 101.0])  # grid points inside the bounds


@pytest.mark.parametrize("case", ["fraction", "mri", "label_grid", "no_model"])
def test_bad_inputs_fail_before_any_attack_and_leave_no_file(setup, tmp_path, case):
    root, cases, ckpt = setup
    loaded = load_model(ckpt)
    pre, run_cases, params = PRE, cases[:1], {"eps": 8, "steps": 1}
    match = ""
    if case == "fraction":
        params, match = {"eps": 8 / 255, "steps": 1}, "looks like a model-space fraction"
    elif case == "mri":
        from dataclasses import replace

        pre, match = replace(PRE, units="a.u."), "unknown units"
        loaded.preprocessing = type(loaded.preprocessing)()  # a model carrying no preprocessing of its own
    elif case == "label_grid":
        other = write_case(tmp_path, 5)
        img = nib.load(other["label"])
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), str(tmp_path / "short.nii.gz"))
        run_cases, match = [{"image": other["image"], "label": str(tmp_path / "short.nii.gz")}], "is not on the grid"
    else:
        loaded, match = None, "needs the LoadedModel"
    ev = EvalConfig(space="source", attacks=[AttackSpec("pgd", params=params)], figures=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        evaluate(load_model(ckpt).module, run_cases, out, eval_cfg=ev, preprocess=pre, num_classes=5, loaded=loaded,
                 progress=False)
    assert not out.exists()


def test_channel_files_in_channel_files_out_each_with_its_own_type(setup, tmp_path, caplog):
    # nnU-Net's raw data stores a multi-modal scan as one file per channel (case_0000, case_0001):
    # the adversarial scan comes back the same way, each file with its own type, and the Dice
    # reported is that of the files read back
    from volattack.models.config import ModelConfig
    from volattack.models.deploy import pipeline_for

    root, cases, _ = setup
    src0 = nib.load(cases[0]["image"])
    second = np.asarray(src0.dataobj, dtype=np.float32) * 0.5 + 20.25  # a float32 second channel
    img1 = nib.Nifti1Image(second, src0.affine)
    img1.header.set_data_dtype(np.float32)
    nib.save(img1, str(tmp_path / "case_0001.nii.gz"))
    entry = {"image": [cases[0]["image"], str(tmp_path / "case_0001.nii.gz")], "label": cases[0]["label"]}
    torch.manual_seed(1)
    cfg = ModelConfig(name="unet", in_channels=2, out_channels=5,
                      kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})
    ckpt = volattack.save_checkpoint(tmp_path / "m2.pt", volattack.create_model(cfg.name, 2, 5, **cfg.kwargs), cfg,
                                     preprocess=PRE)
    res = _eval(tmp_path, [entry], ckpt, "run2", save_adv=True)
    assert not res["failed"], res["failed"]
    case, lbl = res["cases"][0], res["attacks"][0]["label"]
    adv_rel = [o for o in case["outputs"] if o.startswith("adversarial/")]
    stem = f"adversarial/{case['case']}_pgd_eps_8__alpha_2__steps_2"
    assert adv_rel == [f"{stem}_0000.nii.gz", f"{stem}_0001.nii.gz"]
    adv = [nib.load(str(tmp_path / "run2" / r)) for r in adv_rel]
    assert [a.get_data_dtype() for a in adv] == [np.dtype(np.int16), np.dtype(np.float32)]
    for a, src in zip(adv, (src0, img1)):
        assert a.shape == SHAPE
        np.testing.assert_allclose(a.affine, src.affine, atol=1e-6)
    d0 = np.asarray(adv[0].dataobj, dtype=np.float64) - np.asarray(src0.dataobj, dtype=np.float64)
    d1 = np.asarray(adv[1].dataobj, dtype=np.float64) - second
    assert np.abs(d0).max() <= 8 and np.all(d0 == np.rint(d0)) and np.abs(d0).max() > 0
    assert np.abs(d1).max() <= 8 + 1e-4 and np.abs(d1).max() > 0
    back = read_scan([str(tmp_path / "run2" / r) for r in adv_rel])
    pred = pipeline_for(load_model(ckpt), back).predict(torch.as_tensor(back.array)[None])
    label = torch.as_tensor(np.rint(read_scan(entry["label"]).array)).long()[None]
    assert abs(float(mean_foreground_dice(pred, label, 5)[0]) - case["attacks"][lbl]["dice"]) <= 0.005
    with caplog.at_level(logging.INFO, logger="volattack.evaluation.runner"):
        again = _eval(tmp_path, [entry], ckpt, "run2", save_adv=True)
    assert "already done, reused" in caplog.text  # both channel files found
    assert again["cases"][0]["attacks"] == res["cases"][0]["attacks"]
    (tmp_path / "run2" / adv_rel[1]).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="volattack.evaluation.runner"):
        _eval(tmp_path, [entry], ckpt, "run2", save_adv=True)
    assert "already done, reused" not in caplog.text and (tmp_path / "run2" / adv_rel[1]).is_file()


def test_config_bad_values():
    with pytest.raises(ValueError, match="space must be one of"):
        EvalConfig(space="scan")
    with pytest.raises(ValueError, match="source_bounds must be None or"):
        EvalConfig(space="source", source_bounds=[3, 1])
    with pytest.raises(ValueError, match="needs space: source"):
        EvalConfig(source_bounds=[0, 1])
    with pytest.raises(ValueError, match="cannot be combined with threat_model, surrogate_checkpoint"):
        EvalConfig(space="source", threat_model="patch", surrogate_checkpoint="x.pt")
    with pytest.raises(ValueError, match=r"model_options must be a mapping of option names to values, got \['folds'\]"):
        EvalConfig(model_options=["folds"])
    assert EvalConfig(model_options=None).model_options == {}


def test_cli_attack_space_source(setup, tmp_path, capsys):
    from volattack.cli import main

    root, cases, ckpt = setup
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data": {"preprocess": {"spacing": [1.6, 1.6, 2.5], "roi_size": [16, 16, 16]}},
                               "model": {"out_channels": 5}}))
    common = [str(ckpt), str(root / "dataset.json"), "pgd", "--space", "source", "--config", str(cfg), "--quiet"]
    rc = main(["attack", *common, "-p", "eps=4", "-p", "steps=1", "--save-adv", "--max-cases", "1", "--out",
               str(tmp_path / "run"), "--set", "evaluate.figures=false", "--set", "evaluate.sanity_checks=false"])
    assert rc == 0, capsys.readouterr().err
    written = sorted((tmp_path / "run" / "adversarial").iterdir())
    assert len(written) == 1 and nib.load(str(written[0])).header.get_data_dtype() == np.int16
    assert json.loads((tmp_path / "run" / "results.json").read_text())["space"] == "source"
    rc = main(["attack", *common, "-p", "eps=8/255", "--out", str(tmp_path / "bad")])
    assert rc != 0 and "model-space fraction" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_model_space_stays_the_default(setup):
    root, cases, ckpt = setup
    assert EvalConfig().space == "model" and EvalConfig().source_bounds is None
    loaded = load_model(ckpt)
    ev = EvalConfig(attacks=[AttackSpec("pgd", params={"eps": 4 / 255, "steps": 1})], figures=False,
                    sanity_checks=False)
    res = evaluate(loaded.module, cases[:1], root / "model_space", eval_cfg=ev, preprocess=PRE, num_classes=5,
                   progress=False)
    assert res["space"] == "model" and not res["failed"] and res["bounds"] == [0.0, 1.0]
    assert res["cases"][0]["shape"] != list(SHAPE)  # the preprocessed (reoriented, resampled, cropped) grid


def test_goal_in_source_space_removes_the_organ_only_inside_the_mask(setup, tmp_path):
    """A targeted removal with a box mask on the scan's own grid: the perturbation of the written
    int16 file is zero outside the box, and the goal columns are measured on the read-back file."""
    from volattack.evaluation.goal_config import GoalConfig

    root, cases, ckpt = setup
    scan = read_scan(cases[0]["image"])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ scan.affine[:3, :3].T + scan.affine[:3, 3]
    lo, hi = np.percentile(world, 25, axis=0), np.percentile(world, 75, axis=0)  # a box in the middle
    goal = GoalConfig(target={"remove": ["liver"]}, mask={"box": [*lo.tolist(), *hi.tolist()]})
    names = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}
    res = _eval(root, cases[:1], ckpt, "goal", class_names=names, goal=goal, save_adv=True, sanity_checks=False,
                attacks=[AttackSpec("pgd", params={"eps": 16, "alpha": 4, "steps": 3})])
    row = res["summary"]["attacks"]["pgd(eps=16, alpha=4, steps=3)"]
    assert 0.0 <= row["removed_fraction"] <= 1.0 and 0.0 <= row["target_reached"] <= 1.0
    assert res["summary"]["clean"]["target_dice"] is not None
    (written,) = (root / "goal" / "adversarial").iterdir()
    delta = np.asarray(nib.load(str(written)).dataobj, dtype=np.int32) - np.asarray(
        nib.load(cases[0]["image"]).dataobj, dtype=np.int32)
    inside = ((world >= lo) & (world <= hi)).all(1).reshape(SHAPE)
    assert np.abs(delta[~inside]).max() == 0 and np.abs(delta[inside]).max() > 0
    assert np.abs(delta).max() <= 16
