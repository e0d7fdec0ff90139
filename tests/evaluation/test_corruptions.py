"""Natural corruptions: TorchIO transforms at fixed, recorded severities, rows scored through the
schema beside the attacks, the severity-weighted degradation (ROOD-MRI) as summary rows."""

from __future__ import annotations

import json

import pytest
import torch

import volattack
from volattack.data.config import PreprocessConfig
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.evaluation.extra_config import CORRUPTIONS, CorruptionConfig
from volattack.evaluation.records import Scores
from volattack.evaluation.rows.corruptions import SEVERITY_TABLE, bias_pattern, corrupt, severity_weighted

PRE = PreprocessConfig(roi_size=[16, 16, 16], crop_foreground=False)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from volattack.data.datalist import load_datalist
    from volattack.data.transforms import build_transforms
    from volattack.evaluation.cases import load_case

    root = tmp_path_factory.mktemp("ph")
    dl = volattack.make_phantom_dataset(root, n=1, size=(20, 20, 16), seed=0, n_val=0, n_test=2, progress=False)
    cases = load_datalist(dl, key="test")
    img, lab, aff, sp = load_case(cases[0], build_transforms(PRE, mode="eval"))
    return cases, img, aff


def _rms(a, b):
    return float(((a - b) ** 2).mean().sqrt())


def test_every_corruption_is_in_the_table_and_grows_with_severity(phantom):
    _, img, aff = phantom
    assert set(SEVERITY_TABLE) == set(CORRUPTIONS)
    for name in CORRUPTIONS:
        sizes = []
        for s in range(1, 6):
            out = corrupt(img, aff, name, s, bounds=(0.0, 1.0), noise_seed=3, pattern=bias_pattern(0))
            assert out.shape == img.shape and out.dtype == img.dtype
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # clamped to the bounds
            sizes.append(_rms(out, img))
        assert sizes[0] > 0, name
        if name != "anisotropy":  # nearest resampling of 16 slices aliases: not monotone on this grid
            assert sizes[-1] > sizes[0], (name, sizes)  # severity 5 changes more than severity 1


def test_anisotropy_equals_torchio_random_anisotropy_with_a_degenerate_range(phantom):
    import torchio as tio

    _, img, aff = phantom
    for s, f in [(2, 2.0), (5, 5.0)]:
        ref = tio.RandomAnisotropy(axes=(2,), downsampling=(f, f))(
            tio.ScalarImage(tensor=img[0].clone(), affine=aff)).data
        assert torch.allclose(corrupt(img, aff, "anisotropy", s, bounds=(0.0, 1.0))[0], ref.clamp(0, 1), atol=1e-6)


def test_corruptions_are_fixed_and_noise_is_torchio_with_its_seed(phantom):
    import torchio as tio

    _, img, aff = phantom
    a = corrupt(img, aff, "noise", 2, bounds=(0.0, 1.0), noise_seed=7)
    state = torch.random.get_rng_state()
    b = corrupt(img, aff, "noise", 2, bounds=(0.0, 1.0), noise_seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream is left alone
    assert torch.equal(a, b)
    assert not torch.equal(a, corrupt(img, aff, "noise", 2, bounds=(0.0, 1.0), noise_seed=8))
    ref = tio.Noise(mean=0.0, std=0.04, seed=7)(tio.ScalarImage(tensor=img[0].clone(), affine=aff)).data
    assert torch.allclose(a[0], ref.clamp(0, 1))  # peer oracle: TorchIO's own transform
    # the noise std scales with the model-input range
    wide = corrupt(img * 2, aff, "noise", 2, bounds=(0.0, 2.0), noise_seed=7)
    assert torch.allclose(wide, a * 2, atol=1e-5)
    # blur: TorchIO's Blur with the tabled std in mm
    ref_blur = tio.Blur(std=(2.0,) * 3)(tio.ScalarImage(tensor=img[0].clone(), affine=aff)).data
    assert torch.allclose(corrupt(img, aff, "blur", 3, bounds=(0.0, 1.0))[0], ref_blur.clamp(0, 1))
    assert bias_pattern(0) == bias_pattern(0) and bias_pattern(0) != bias_pattern(1)
    assert all(-1 <= u <= 1 for u in bias_pattern(0)) and len(bias_pattern(0)) == 20


def test_severity_weighted_degradation_formula():
    clean = Scores(values={"adv_dice": 0.9, "hd95_mm": 2.0})
    rows = [Scores(values={"adv_dice": d, "hd95_mm": h, "dice_drop": 0.9 - d}) for d, h in
            [(0.8, 3.0), (0.6, 5.0), (0.3, float("nan"))]]
    row = severity_weighted(rows, [1, 3, 5], clean)
    assert row.info["dice_degradation"] == pytest.approx((1 * 0.1 + 3 * 0.3 + 5 * 0.6) / 9)
    assert row["dice_drop"] == pytest.approx(row.info["dice_degradation"])
    assert row.info["hd95_degradation_mm"] == pytest.approx((1 * 1.0 + 3 * 3.0) / 4)  # NaN skipped
    assert row["adv_dice"] == pytest.approx((0.8 + 3 * 0.6 + 5 * 0.3) / 9)


def test_bad_corruption_config():
    with pytest.raises(ValueError, match=r"unknown corruption 'motoin'.*Did you mean 'motion'\?"):
        CorruptionConfig(names=["motoin"])
    with pytest.raises(ValueError, match=r"severities must hold integers in 1\.\.5, got 6"):
        CorruptionConfig(severities=[1, 6])
    with pytest.raises(ValueError, match=r"names has duplicates"):
        CorruptionConfig(names=["blur", "blur"])
    with pytest.raises(ValueError, match=r"unknown corruption 'RandomGhost'.*Did you mean"):
        EvalConfig(corruptions={"names": ["RandomGhost"]})


def test_config_load_rejects_an_unknown_corruption_with_a_suggestion():
    from volattack.evaluation.config import EvalConfig as EC
    from volattack.yaml_config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"corruptions: corruptions\.names: unknown corruption 'bias'.*"
                                          r"Did you mean 'bias_field'\?"):
        from_dict(EC, {"corruptions": {"names": ["bias"]}}, "evaluate")


def test_corruption_rows_reach_the_records_summary_and_report(tmp_path, phantom):
    from volattack.evaluation.runner import evaluate

    cases = phantom[0]
    torch.manual_seed(0)
    cfg = EvalConfig(attacks=[AttackSpec("gn", {"eps": 0.0})], figures=False, sanity_checks=False,
                     corruptions={"names": ["noise", "blur"], "severities": [1, 3, 5], "seed": 1})
    res = evaluate(torch.nn.Conv3d(1, 5, 3, padding=1), cases, tmp_path / "run", eval_cfg=cfg, preprocess=PRE,
                   num_classes=5, progress=False)
    rows = res["summary"]["attacks"]
    expected = {"gn(eps=0)"} | {f"{n} s{s}" for n in ("noise", "blur") for s in (1, 3, 5)} | {
        "noise severity-weighted", "blur severity-weighted"}
    assert set(rows) == expected
    per_case = [json.loads(p.read_text())["attacks"] for p in sorted((tmp_path / "run" / "cases").glob("*.json"))]
    assert all(set(a) == expected for a in per_case)
    # sizes measured in source units: noise std 0.02 k of the range, RMS about 0.02 k x 425 HU before clamping
    assert 0 < rows["noise s1"]["rms_units"] < rows["noise s5"]["rms_units"]
    assert rows["noise s1"]["rms_units"] == pytest.approx(0.02 * 425, rel=0.5)
    # noise draws differ per case (seed_from(seed, index)) and are recorded
    seeds = [a["noise s1"]["info"]["noise_seed"] for a in per_case]
    assert len(set(seeds)) == 2
    w = rows["noise severity-weighted"]
    assert w["dice_drop"] == pytest.approx(w["clean_dice"] - w["adv_dice"])
    assert w["dice_drop"] == pytest.approx(
        sum(s * rows[f"noise s{s}"]["dice_drop"] for s in (1, 3, 5)) / 9, abs=1e-9)
    desc = next(d for d in res["row_passes"] if d["name"] == "corruptions")
    assert desc["parameters"]["blur"]["3"] == {"std_mm": 2.0} and desc["seed"] == 1
    assert "| noise severity-weighted |" in (tmp_path / "run" / "report.md").read_text()
