"""Clinical attack goals: config and command-line syntax, class names, target maps, masks in mm and
world coordinates, bad input, and a targeted removal run end to end through the evaluation runner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import volattack
from volattack.config import RunConfig, from_dict
from volattack.data.config import PreprocessConfig
from volattack.evaluation.config import EvalConfig
from volattack.evaluation.goal_config import (GoalConfig, MaskGoal, TargetGoal, bind_goal, parse_mask_arg,
                                              parse_target_arg)
from volattack.evaluation.goals import (body_mask, box_mask, near_mask, removed_fraction, resolve_case_goal,
                                        target_map)
from volattack.yaml_config import ConfigError

NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}


def _bind(**goal):
    return bind_goal(GoalConfig(**goal), NAMES, 5)


# ----------------------------------------------------------------------------- config and names


def test_yaml_goal_by_class_name_binds_to_indices():
    goal = {"target": {"remove": ["liver"], "relabel": {"spleen": "kidney_left"}},
            "mask": {"near": "kidney_left", "mm": 10}}
    cfg = from_dict(RunConfig, {"evaluate": {"goal": goal}})
    g = bind_goal(cfg.evaluate.goal, NAMES, 5)
    assert g.remove == (1,) and g.relabel == ((2, 3),) and g.near_class == 3 and g.removed == (1, 2)
    assert g.targeted and g.mask.kind == "near" and g.mask.mm == 10.0
    assert g.describe() == {"reference": "prediction", "remove": ["liver"], "relabel": {"spleen": "kidney_left"},
                            "mask": {"near": "kidney_left", "mm": 10.0}}
    assert from_dict(RunConfig, {"evaluate": {"goal": {"mask": "body"}}}).evaluate.goal.mask.kind == "body"
    assert _bind(target={"remove": [2]}).remove == (2,)  # an index works too
    assert _bind(target={"relabel": {"liver": "background"}}).relabel == ((1, 0),)


def test_command_line_goal_syntax():
    assert parse_target_arg(["remove=liver,spleen"]) == {"remove": ["liver", "spleen"]}
    assert parse_target_arg(["relabel=spleen:liver", "remove=kidney_left"]) == {
        "relabel": {"spleen": "liver"}, "remove": ["kidney_left"]}
    assert parse_target_arg([]) is None and parse_mask_arg(None) is None
    assert parse_mask_arg("body") == "body" and parse_mask_arg("body=-300") == {"body": -300.0}
    assert parse_mask_arg("near=kidney_left:10") == {"near": "kidney_left", "mm": 10.0}
    assert parse_mask_arg("box=-10,-20,-30,10,20,30.5") == {"box": [-10.0, -20.0, -30.0, 10.0, 20.0, 30.5]}
    with pytest.raises(ConfigError, match=r"--target expects remove=CLASS.*Did you mean 'remove'"):
        parse_target_arg(["remvoe=liver"])
    with pytest.raises(ConfigError, match="--target relabel expects FROM:TO pairs, got 'spleen'"):
        parse_target_arg(["relabel=spleen"])
    with pytest.raises(ConfigError, match=r"--mask expects body.*got 'nera=liver:3'. Did you mean 'near'"):
        parse_mask_arg("nera=liver:3")
    with pytest.raises(ConfigError, match="--mask 'near=liver:ten': a number does not parse"):
        parse_mask_arg("near=liver:ten")


@pytest.mark.parametrize("goal, match", [
    ({"target": {"remove": ["livr"]}},
     r"evaluate.goal.target.remove: the dataset has no class 'livr'; its classes are liver, spleen, kidney_left, "
     r"kidney_right. Did you mean 'liver'\?"),
    ({"mask": {"near": "Kidney_Left", "mm": 5}},
     r"evaluate.goal.mask.near: .*no class 'Kidney_Left'.*Did you mean 'kidney_left'"),
    ({"target": {"relabel": {"spleen": "pancreas"}}},
     r"relabel.spleen: the dataset has no class 'pancreas'; its classes"),
    ({"target": {"relabel": {"spleen": "spleen"}}}, r"'spleen' -> 'spleen' relabels a class to itself"),
    ({"target": {"relabel": {"spleen": 2}}}, r"relabels a class to itself"),
    ({"target": {"remove": ["background"]}}, r"'background' is the background \(index 0\)"),
    ({"target": {"remove": [7]}}, r"class index 7 is outside 0..4"),
    ({"target": {"remove": ["liver"], "relabel": {"liver": "spleen"}}}, r"'liver' is both removed and relabelled"),
])
def test_a_class_the_dataset_lacks_is_an_error_naming_the_classes_it_has(goal, match):
    with pytest.raises(ValueError, match=match):
        _bind(**goal)


def test_names_unknown_without_labels_ask_for_indices():
    with pytest.raises(ConfigError, match=r"no class 'liver': the dataset .* no classes; name classes by index 1..4"):
        bind_goal(GoalConfig(target={"remove": ["liver"]}), {}, 5)
    assert bind_goal(GoalConfig(target={"remove": ["1"]}), {}, 5).remove == (1,)


@pytest.mark.parametrize("goal, match", [
    ({}, "goal needs a target, a mask or both"),
    ({"target": {}}, "target needs remove"),
    ({"target": {"remove": ["liver", "liver"]}}, "target.remove has duplicates"),
    ({"target": {"remvoe": ["liver"]}}, r"Unknown config key 'evaluate.goal.target.remvoe'. Did you mean 'remove'"),
    ({"mask": "bdy"}, r"mask must be 'body' or a mapping .* got 'bdy'. Did you mean 'body'"),
    ({"mask": {"near": "liver"}}, r"mask.mm must be a distance > 0 in mm with mask.near, got None"),
    ({"mask": {"near": "liver", "mm": -1}}, r"mask.mm must be a distance > 0"),
    ({"mask": {"box": [0, 0, 0, 1, 1]}}, r"mask.box must be 6 finite numbers"),
    ({"mask": {"box": [0, 0, 5, 1, 1, 1]}}, r"mask.box must have x0 < x1, y0 < y1, z0 < z1"),
    ({"mask": {"near": "liver", "mm": 3, "box": [0, 0, 0, 1, 1, 1]}}, r"mask needs exactly one of body, near, box"),
    ({"mask": {"box": [0, 0, 0, 1, 1, 1], "mm": 2}}, r"mask.mm=2.0 is only meaningful with mask.near"),
    ({"mask": "body", "reference": "truth"}, r"reference must be one of \('prediction', 'label'\), got 'truth'"),
])
def test_malformed_goals_fail_when_the_config_is_loaded(goal, match):
    with pytest.raises(ValueError, match=match):
        from_dict(RunConfig, {"evaluate": {"goal": goal}})


def test_goal_needs_the_volume_threat_model_and_a_valid_nsd_tolerance():
    with pytest.raises(ValueError, match="goal needs threat_model 'volume'.*got threat_model='patch'"):
        EvalConfig(goal={"mask": "body"}, threat_model="patch")
    with pytest.raises(ValueError, match="nsd_tolerance_mm must be a finite number >= 0"):
        EvalConfig(nsd_tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="sanity_blackbox_queries > 0 adds the untargeted square attack"):
        EvalConfig(goal={"target": {"remove": ["liver"]}}, sanity_blackbox_queries=100)


# ----------------------------------------------------------------------------- target maps


def test_target_maps_by_hand():
    ref = torch.tensor([0, 1, 1, 2, 3, 4, 2]).view(1, 1, 7, 1, 1)
    removal = target_map(ref, _bind(target={"remove": ["liver"]}))
    assert removal.flatten().tolist() == [0, 0, 0, 2, 3, 4, 2]
    relabel = target_map(ref, _bind(target={"relabel": {"spleen": "liver"}}))
    assert relabel.flatten().tolist() == [0, 1, 1, 1, 3, 4, 1]
    both = target_map(ref, _bind(target={"remove": ["kidney_right"], "relabel": {"kidney_left": "spleen"}}))
    assert both.flatten().tolist() == [0, 1, 1, 2, 2, 0, 2]
    assert ref.flatten().tolist() == [0, 1, 1, 2, 3, 4, 2]  # not modified


def test_removed_fraction_by_hand():
    clean = torch.tensor([1, 1, 1, 1, 2, 2, 0, 0]).view(1, 1, 8, 1, 1)
    adv = torch.tensor([0, 2, 1, 1, 2, 0, 1, 0]).view(1, 1, 8, 1, 1)  # liver: 2 of 4 gone (one grew elsewhere)
    out = removed_fraction(clean, adv, [1, 2, 3], 5)
    assert out[0] == 0.5 and out[1] == 0.5 and math.isnan(out[2]) and math.isnan(out[3])


def test_target_dice_by_hand():
    from volattack.evaluation.goals import target_dice

    target = torch.tensor([0, 0, 0, 3, 3, 0]).view(1, 1, 6, 1, 1)  # the liver (1) removed, a kidney (3) kept
    partly = torch.tensor([1, 0, 0, 3, 3, 3]).view(1, 1, 6, 1, 1)  # one liver voxel left, the kidney grew by one
    # liver: absent from the target, still predicted: 0; kidney: 2*2 / (3 + 2) = 0.8; spleen: absent from both
    assert target_dice(partly, target, 5) == pytest.approx((0.0 + 0.8) / 2)
    done = torch.tensor([0, 0, 0, 3, 3, 0]).view(1, 1, 6, 1, 1)
    assert target_dice(done, target, 5) == 1.0


def test_target_reached_by_hand():
    from volattack.evaluation.goals import target_reached

    clean = torch.tensor([0, 2, 2, 2, 2, 1, 1]).view(1, 1, 7, 1, 1)
    target = target_map(clean, _bind(target={"relabel": {"spleen": "liver"}}))
    adv = torch.tensor([0, 1, 1, 0, 2, 1, 0]).view(1, 1, 7, 1, 1)  # 2 of 4 spleen voxels became liver, 1 background
    assert target_reached(adv, target, target != clean) == 0.5
    assert removed_fraction(clean, adv, [2], 5)[1] == 0.75  # gone from the spleen: 3 of 4
    assert math.isnan(target_reached(adv, clean, clean != clean))


def test_reference_label_uses_the_ground_truth():
    pred = torch.zeros(1, 1, 4, 1, 1, dtype=torch.long)
    label = torch.tensor([0, 1, 1, 2]).view(1, 1, 4, 1, 1)
    g = _bind(target={"remove": ["spleen"]}, reference="label")
    cg = resolve_case_goal(g, clean_pred=pred, label=label, image=torch.rand(1, 1, 4, 1, 1), affine=np.eye(4),
                           spacing=[1, 1, 1], bounds=(0, 1))
    assert cg.target.flatten().tolist() == [0, 1, 1, 0]


# ----------------------------------------------------------------------------- masks


def test_near_mask_distances_in_mm_with_anisotropic_spacing():
    ref = torch.zeros(1, 1, 9, 9, 9, dtype=torch.long)
    ref[0, 0, 4, 4, 4] = 3
    spacing = (1.0, 2.0, 5.0)
    m = near_mask(ref, 3, 4.0, spacing)[0, 0]
    # along axis 0 (1 mm): 4 voxels each side; axis 1 (2 mm): 2; axis 2 (5 mm): none
    assert m[:, 4, 4].nonzero().flatten().tolist() == list(range(0, 9))
    assert m[4, :, 4].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert m[4, 4, :].nonzero().flatten().tolist() == [4]
    # diagonal by hand: (2 voxels, 1 voxel, 0) -> sqrt(2^2 + 2^2) = 2.83 mm inside; (3, 1, 0) -> sqrt(9 + 4) = 3.61
    # inside; (3, 2, 0) -> 5 mm outside; (0, 0, 1) -> 5 mm outside
    assert bool(m[6, 5, 4]) and bool(m[7, 5, 4]) and not bool(m[7, 6, 4]) and not bool(m[4, 4, 5])
    assert int(m.sum()) == int(sum(1 for i in range(9) for j in range(9) for k in range(9)
                                   if ((i - 4) * 1.0) ** 2 + ((j - 4) * 2.0) ** 2 + ((k - 4) * 5.0) ** 2 <= 16))


def test_box_in_world_coordinates_with_a_non_identity_affine():
    # axis 0 runs toward -x (LPS-like flip), axis 1 is world z, axis 2 world y; 2 x 3 x 4 mm; shifted origin
    affine = np.array([[-2.0, 0, 0, 10.0], [0, 0, 4.0, -5.0], [0, 3.0, 0, 100.0], [0, 0, 0, 1]])
    shape = (6, 5, 4)
    m = box_mask([1.0, -5.0, 103.0, 6.0, 3.0, 109.0], affine, shape)[0, 0]
    # x = 10 - 2i in [1, 6] -> i in {2, 3, 4}; z = 100 + 3j in [103, 109] -> j in {1, 2, 3};
    # y = -5 + 4k in [-5, 3] -> k in {0, 1, 2}
    expected = torch.zeros(shape, dtype=torch.bool)
    expected[2:5, 1:4, 0:3] = True
    assert torch.equal(m, expected)


def test_body_mask_fills_enclosed_air_per_axial_slice():
    img = torch.zeros(1, 1, 9, 9, 3)
    img[0, 0, 1:8, 1:8, :] = 0.5  # body
    img[0, 0, 3:6, 3:6, :] = 0.0  # enclosed "lung" air in every axial slice (open along z: not a 3D hole)
    m = body_mask(img, (0.0, 1.0), np.eye(4))[0, 0]
    assert bool(m[4, 4, 1]) and bool(m[1, 1, 0]) and not bool(m[0, 0, 0])
    assert int(m.sum()) == 7 * 7 * 3
    # a threshold in source units: 0.5 maps to -175 + 0.5 * 425 = 37.5 HU, below a threshold of 100 HU
    with pytest.raises(ValueError, match="mask.*is empty: no voxel is above the body threshold 100 HU"):
        resolve_case_goal(_bind(mask={"body": 100}), clean_pred=torch.zeros(1, 1, 9, 9, 3, dtype=torch.long),
                          label=None, image=img, affine=np.eye(4), spacing=[1, 1, 1], bounds=(0, 1),
                          to_source=lambda x: -175 + 425 * x, where="case 0000_x")


def test_empty_masks_on_a_case_are_errors_naming_the_case():
    pred = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    pred[0, 0, 1, 1, 1] = 1
    kw = dict(clean_pred=pred, label=None, image=torch.rand(1, 1, 4, 4, 4), spacing=[1, 1, 1], bounds=(0, 1),
              where="case 0003_ct")
    with pytest.raises(ValueError, match=r"case 0003_ct: .*\{'near': 'kidney_left', 'mm': 5.0\} is empty: the "
                                         r"class 'kidney_left' is absent from the prediction map"):
        resolve_case_goal(_bind(mask={"near": "kidney_left", "mm": 5}), affine=np.eye(4), **kw)
    with pytest.raises(ValueError, match=r"case 0003_ct: .*is empty: the box \[100.0, 0.0, 0.0, 110.0, 3.0, 3.0\] "
                                         r"\(world mm, RAS\) is outside the volume, whose voxel centres span "
                                         r"x \[0.0, 3.0\]"):
        resolve_case_goal(_bind(mask={"box": [100, 0, 0, 110, 3, 3]}), affine=np.eye(4), **kw)
    ok = resolve_case_goal(_bind(mask={"near": "liver", "mm": 1}, target={"remove": ["liver"]}), affine=np.eye(4), **kw)
    assert int(ok.mask.sum()) == 7 and ok.mask.dtype == torch.float32 and int(ok.target.sum()) == 0


# ----------------------------------------------------------------------------- end to end


class IntensityNet(nn.Module):
    """Pointwise classifier of windowed CT intensity: class k scores -(x - mu_k)^2 / (2 s^2)."""

    def __init__(self) -> None:
        super().__init__()
        # background soft tissue, liver/spleen (~110-120 HU -> 0.67), spleen, kidney (~180 HU -> 0.83)
        self.register_buffer("mu", torch.tensor([0.55, 0.675, 2.0, 0.84, 2.0]).view(1, 5, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.mu) ** 2) / (2 * 0.03 ** 2)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("goals")
    datalist = volattack.make_phantom_dataset(root / "ph", n=1, size=(24, 24, 16), seed=0, n_val=0, n_test=2)
    return root, datalist


def _evaluate(root: Path, datalist: Path, name: str, goal, **kw):
    from volattack.data.datalist import load_datalist
    from volattack.evaluation.runner import evaluate

    from volattack.evaluation.config import AttackSpec

    ev = EvalConfig(attacks=[AttackSpec("pgd", params={"eps": "32/255", "alpha": "6/255", "steps": 10})],
                    figures=False, sanity_checks=False, goal=goal, **kw)
    cases = load_datalist(str(datalist), key="test")
    pre = PreprocessConfig(roi_size=[16, 16, 16], crop_foreground=False)
    return evaluate(IntensityNet(), cases, root / name, eval_cfg=ev, preprocess=pre, num_classes=5,
                    class_names=NAMES, progress=False)


def _assert_air_outside_the_body_is_untouched(run: Path, case: dict) -> None:
    """``mask: body``: the air connected to the volume's border (below -500 HU) keeps its (windowed) value."""
    import nibabel as nib
    from scipy import ndimage

    adv = np.asarray(nib.load(str(run / case["outputs"][0])).dataobj, dtype=np.float64)
    src = np.asarray(nib.load(case["image"]).dataobj, dtype=np.float64)  # the record holds the resolved path
    air, _ = ndimage.label(src < -500)
    border = np.unique(np.concatenate([air[[0, -1]].ravel(), air[:, [0, -1]].ravel(), air[:, :, [0, -1]].ravel()]))
    outside = np.isin(air, border[border > 0])
    diff = np.abs(adv - np.clip(src, -175, 250))
    assert outside.any() and diff[outside].max() < 1e-3 and diff[~outside].max() > 1.0


def test_targeted_removal_end_to_end_lowers_the_organs_volume(phantoms):
    root, datalist = phantoms
    res = _evaluate(root, datalist, "remove_liver", {"target": {"remove": ["liver"]}, "mask": "body"}, save_adv=True)
    assert not res["failed"]
    _assert_air_outside_the_body_is_untouched(root / "remove_liver", res["cases"][0])
    assert res["goal"] == {"reference": "prediction", "remove": ["liver"], "mask": {"body": True}}
    clean, adv = res["summary"]["clean"], res["summary"]["attacks"]["pgd(eps=32/255, alpha=6/255, steps=10)"]
    # direction of effect: the liver's predicted volume falls, the prediction moves toward the target
    assert adv["removed_fraction"] > 0.3 and clean.get("removed_fraction") is None
    assert adv["removed_fraction_per_class"][0] == pytest.approx(adv["removed_fraction"])
    assert all(math.isnan(v) for v in adv["removed_fraction_per_class"][1:])
    assert adv["target_dice"] >= clean["target_dice"]  # strict: 1 only once the liver is entirely gone
    assert 0.3 < adv["target_reached"] <= adv["removed_fraction"] and clean.get("target_reached") is None
    assert len(adv["nsd_per_class"]) == 4 and 0 <= adv["nsd"] <= 1 and 0 <= clean["nsd"] <= 1
    for c in res["cases"]:  # per case too: fewer liver voxels than the clean prediction had
        assert c["attacks"]["pgd(eps=32/255, alpha=6/255, steps=10)"]["removed_fraction"] > 0
    report = (root / "remove_liver" / "report.md").read_text()
    assert "## Attack goal" in report
    assert ("- goal: remove `liver`; perturbation inside the body (above -500 HU, holes filled); target map from the "
            "clean prediction") in report
    assert "| Attack | Target Dice | Reached | Removed |" in report
    assert "NSD per class (tolerance 2 mm)" in report
    assert "| Attack | liver | spleen | kidney_left | kidney_right |" in report
    assert "Removed fraction per removed organ" in report and "| Attack | liver |\n" in report
    head = (root / "remove_liver" / "results.csv").read_text().splitlines()[0].split(",")
    assert {"nsd", "target_dice", "removed_fraction"} <= set(head)
    stored = json.loads((root / "remove_liver" / "results.json").read_text())
    row = stored["summary"]["attacks"]["pgd(eps=32/255, alpha=6/255, steps=10)"]
    assert row["removed_fraction"] == adv["removed_fraction"] and stored["goal"] == res["goal"]
    assert stored["class_names"]["1"] == "liver"


def test_untargeted_masked_attack_changes_only_inside_the_mask(phantoms):
    root, datalist = phantoms
    goal = {"mask": {"box": [-6.0, -6.0, -10.0, 6.0, 6.0, 10.0]}}
    res = _evaluate(root, datalist, "box", goal, save_adv=True, nsd_tolerance_mm=1.0)
    assert not res["failed"] and res["nsd_tolerance_mm"] == 1.0
    import nibabel as nib

    case = res["cases"][0]
    adv = nib.load(str(root / "box" / case["outputs"][0]))
    src = nib.load(str(Path(datalist).parent / json.loads(Path(datalist).read_text())["test"][0]["image"]))
    diff = np.abs(np.asarray(adv.dataobj, dtype=np.float64) - np.clip(np.asarray(src.dataobj), -175, 250))
    inside = box_mask(goal["mask"]["box"], adv.affine, adv.shape)[0, 0].numpy()
    assert diff[~inside].max() < 1e-3 and diff[inside].max() > 1.0
    assert res["summary"]["attacks"]["pgd(eps=32/255, alpha=6/255, steps=10)"].get("target_dice") is None


def test_a_name_the_dataset_lacks_fails_before_anything_is_written(phantoms):
    root, datalist = phantoms
    with pytest.raises(ValueError, match=r"no class 'livre'; its classes are liver, spleen.*Did you mean 'liver'"):
        _evaluate(root, datalist, "bad_name", {"target": {"remove": ["livre"]}})
    assert not (root / "bad_name").exists()


def test_a_box_outside_the_volume_fails_before_anything_is_written(phantoms):
    root, datalist = phantoms
    with pytest.raises(ValueError, match=r"case '.*case_001.nii.gz': evaluate.goal.mask box \[500.0, .*\] \(world mm, "
                                         r"RAS\) is outside the volume, whose voxel centres span x \[-"):
        _evaluate(root, datalist, "far_box", {"mask": {"box": [500, 500, 500, 510, 510, 510]}})
    assert not (root / "far_box").exists()


def test_a_box_cropped_away_by_the_preprocessing_fails_the_case_with_the_reason(phantoms):
    root, datalist = phantoms
    # inside the scan (its corner voxel centres) but outside the body, which crop_foreground keeps
    ext = json.loads(Path(datalist).read_text())["test"][0]["image"]
    import nibabel as nib
    from volattack.evaluation.goals import world_extent

    img = nib.load(str(Path(datalist).parent / ext))
    (x0, _), (y0, _), (z0, _) = world_extent(img.affine, img.shape)
    box = [x0 - 1, y0 - 1, z0 - 1, x0 + 0.5, y0 + 0.5, z0 + 0.5]
    from volattack.data.datalist import load_datalist
    from volattack.evaluation.config import AttackSpec
    from volattack.evaluation.runner import evaluate

    ev = EvalConfig(attacks=[AttackSpec("pgd", params={"steps": 1})], figures=False, sanity_checks=False,
                    goal={"mask": {"box": box}}, max_cases=1)
    res = evaluate(IntensityNet(), load_datalist(str(datalist), key="test"), root / "cropped", eval_cfg=ev,
                   preprocess=PreprocessConfig(roi_size=[16, 16, 16]), num_classes=5, class_names=NAMES,
                   progress=False)
    assert len(res["failed"]) == 1 and not res["cases"]
    assert "is empty: the box" in res["failed"][0]["reason"] and "is outside the volume" in res["failed"][0]["reason"]


def test_cli_attack_target_and_mask_flags(phantoms, tmp_path, capsys):
    from volattack.cli import main
    from volattack.models.config import ModelConfig

    _, datalist = phantoms
    cfg = ModelConfig(name="unet", in_channels=1, out_channels=5,
                      kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})
    torch.manual_seed(0)
    ckpt = volattack.save_checkpoint(tmp_path / "m.pt", volattack.create_model(cfg.name, 1, 5, **cfg.kwargs), cfg)
    base = ["attack", str(ckpt), str(datalist), "pgd", "-p", "steps=1", "--max-cases", "1", "--quiet",
            "--set", "data.preprocess.roi_size=[16,16,16]", "--set", "data.preprocess.crop_foreground=false",
            "--set", "evaluate.figures=false", "--set", "evaluate.sanity_checks=false"]
    assert main(base + ["--out", str(tmp_path / "bad"), "--target", "remove=livr"]) == 2
    err = capsys.readouterr().err
    assert "no class 'livr'" in err and "Did you mean 'liver'" in err
    assert main(base + ["--out", str(tmp_path / "bad"), "--mask", "near=kidney_left"]) == 2
    assert "--mask expects body" in capsys.readouterr().err
    sea = [a if a != "pgd" else "sea" for a in base]
    assert main(sea + ["--out", str(tmp_path / "bad"), "--target", "remove=liver"]) == 2
    assert "sea takes no 'targeted'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(base + ["--out", str(tmp_path / "ok"), "--target", "relabel=spleen:liver", "--mask", "body",
                        "--set", "evaluate.nsd_tolerance_mm=3"]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert res["goal"] == {"reference": "prediction", "relabel": {"spleen": "liver"}, "mask": {"body": True}}
    assert isinstance(res["summary"]["clean"]["target_dice"], float) and "nsd" in res["summary"]["clean"]
    assert res["nsd_tolerance_mm"] == 3.0
    assert "## Attack goal" in (tmp_path / "ok" / "report.md").read_text()
    from volattack.pipeline import load_run_config  # the written config.yaml reloads to the same goal

    again = load_run_config(str(tmp_path / "ok" / "config.yaml")).evaluate
    assert again.goal == GoalConfig(target=TargetGoal(relabel={"spleen": "liver"}), mask=MaskGoal(body=True))
    assert again.nsd_tolerance_mm == 3.0


def test_goal_metrics_of_a_certified_map_with_abstentions():
    from volattack.evaluation.columns import Outcome
    from volattack.evaluation.goals import target_dice

    target = torch.tensor([0, 0, 0, 3, 3, 0]).view(1, 1, 6, 1, 1)
    certified = torch.tensor([-1, 0, 0, 3, -1, 0]).view(1, 1, 6, 1, 1)  # -1: abstained, in no class
    assert target_dice(certified, target, 5) == pytest.approx(2 * 1 / (1 + 2))
    clean = Outcome(target, target, 5, [1, 1, 1])
    o = Outcome(certified, target, 5, [1, 1, 1], clean=clean)
    assert len(o.nsd_per_class) == 4 and 0 < o.nsd_per_class[2] <= 1
