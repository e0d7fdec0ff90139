"""The spectral trigger optimised into training (``dct_learned``, ``train.poison.joint``): identity at
zero coefficients, the RMS budget and L-inf cap after projection, spectral support (zero DCT outside
the band), seeded replay, the lattice anchoring (a crop sees the slice of the whole volume's
trigger), save/load round trip, the joint hook on a tiny model, a tiny joint-poisoned training run,
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from volattack.attacks.spectral import band_mask, block_split, dct3
from volattack.threats.config import JointConfig, PoisonConfig, TriggerSpec
from volattack.threats.joint_trigger import JointPoisoning, lattice_offset, tile_at
from volattack.threats.triggers import create_trigger

HU = 425.0
WIDE = (-1e3, 1e3)  # bounds that never clamp


def volume(shape=(1, 1, 16, 16, 8), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 0.6 + 0.2


def trig(**kw):
    params = {"rms": 5.0, "block_size": 4, "band": "middle", **kw}
    bounds = params.pop("bounds", (0.0, 1.0))
    return create_trigger("dct_learned", bounds=bounds, unit_scale=HU, seed=params.pop("seed", 0), **params)


def rms_hu(t) -> float:
    return float(t.tile().pow(2).mean().sqrt())


def test_zero_coefficients_are_the_identity(tmp_path: Path) -> None:
    x = volume()
    t = trig(init_rms=0.0)
    assert torch.equal(t(x), x) and float(t.coeffs.abs().max()) == 0.0
    np.save(tmp_path / "zero.npy", np.zeros((4, 4, 4)))
    t2 = trig(coeffs=str(tmp_path / "zero.npy"))
    assert torch.equal(t2(x), x)
    assert t2.perceptibility(x, t2(x))["linf_units"] == 0


def test_the_start_sits_on_the_rms_budget_in_hu_and_tiles_the_volume() -> None:
    t = trig(rms=5.0, bounds=WIDE, window_only=False)
    assert rms_hu(t) == pytest.approx(5.0, rel=1e-9)
    x = volume((1, 1, 16, 16, 8))  # whole tiles: the volume's RMS is the tile's
    d = t.delta(x) * HU
    assert float(d.pow(2).mean().sqrt()) == pytest.approx(5.0, rel=1e-6)
    # the same tile in every block
    blocks = block_split(d, 4)
    assert torch.allclose(blocks, blocks[..., :1, :, :, :].expand_as(blocks), atol=1e-9)


@pytest.mark.parametrize("linf", [None, 6.0, 2.0])
def test_projection_keeps_the_rms_budget_and_the_linf_cap(linf) -> None:
    t = trig(rms=5.0, linf=linf)
    big = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 100
    p = t.project(big)
    t.coeffs = p
    assert rms_hu(t) <= 5.0 + 1e-9
    if linf is not None:
        assert float(t.tile().abs().max()) <= linf + 1e-9
        assert max(rms_hu(t) / 5.0, float(t.tile().abs().max()) / linf) == pytest.approx(1.0)  # on the boundary
    else:
        assert rms_hu(t) == pytest.approx(5.0)
    small = t.project(p * 0.1)  # inside the budget: unchanged
    assert torch.allclose(small, p * 0.1)


@pytest.mark.parametrize("band", ["low", "middle", "high", "all"])
def test_the_trigger_is_spectral_its_dct_is_zero_outside_the_band(band: str) -> None:
    t = trig(band=band, bounds=WIDE, window_only=False, block_size=4)
    d = t.delta(volume((1, 1, 8, 8, 8)))  # affine None: lattice offset 0, blocks aligned
    spec = dct3(block_split(d, 4))
    outside = ~band_mask(4, band, exclude_dc=True)
    assert float(spec[..., outside].abs().max()) < 1e-9
    assert float(spec[..., ~outside].abs().max()) > 1e-6
    # the projection also zeroes coefficients outside the band
    assert float(t.project(torch.ones(4, 4, 4, dtype=torch.float64))[outside].abs().max()) == 0.0


def test_seeded_replay() -> None:
    a, b, c = trig(seed=3), trig(seed=3), trig(seed=4)
    assert torch.equal(a.coeffs, b.coeffs)
    assert not torch.allclose(a.coeffs, c.coeffs)
    x = volume()
    assert torch.equal(a(x), b(x))


def test_lattice_offset_and_a_crop_sees_the_slice_of_the_whole_volume_trigger() -> None:
    t = trig(bounds=WIDE, window_only=False)
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    aff[:3, 3] = [-7.5 * 1.5, -3 * 1.5, 2.5 * 3.0]  # a half-voxel origin, as the phantoms have
    assert lattice_offset(None) == (0, 0, 0)
    assert lattice_offset(aff) == (-8, -3, 2)
    x = volume((1, 1, 16, 16, 8))
    full = t.delta(x, aff)
    s = (5, 2, 3)
    crop_aff = aff.copy()
    crop_aff[:3, 3] += aff[:3, :3] @ np.array(s, dtype=float)
    crop = x[..., s[0]:s[0] + 9, s[1]:s[1] + 7, s[2]:s[2] + 5]
    assert torch.allclose(t.delta(crop, crop_aff), full[..., s[0]:s[0] + 9, s[1]:s[1] + 7, s[2]:s[2] + 5])
    tile = torch.arange(8.0).view(2, 2, 2)
    assert tile_at(tile, (3, 1, 1), (1, 0, 0)).flatten().tolist() == [4.0, 0.0, 4.0]  # (v + o) mod 2


def test_window_only_leaves_clipped_voxels_clipped() -> None:
    t = trig(rms=5.0, window_only=True)
    x = volume()
    x[..., :4] = 0.0  # air, clipped at the lower bound
    x[..., 4:6] = 1.0  # bone, clipped at the upper bound
    y = t(x)
    assert torch.equal(y[..., :6], x[..., :6])
    assert not torch.equal(y[..., 6:], x[..., 6:])


def test_save_and_load_reapply_the_same_delta(tmp_path: Path) -> None:
    t = trig(seed=5, linf=9.0)
    t.coeffs = t.project(t.coeffs * 3 + torch.randn(4, 4, 4, dtype=torch.float64))
    path = t.save(tmp_path / "c.npy")
    loaded = np.load(path, allow_pickle=False)  # plain numpy, no pickle
    assert loaded.shape == (4, 4, 4)
    t2 = trig(seed=0, linf=9.0, coeffs=str(path))  # another seed: the file wins
    x = volume()
    aff = np.eye(4)
    aff[:3, 3] = [3.0, 1.0, 2.0]
    assert torch.equal(t2.delta(x, aff), t.delta(x, aff))
    assert t2.params["coeffs"] == str(path)


def test_bad_input_names_the_parameter_and_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rms must be > 0.0, got 0"):
        trig(rms=0)
    with pytest.raises(ValueError, match=r"rms must be > 0.0, got -1"):
        trig(rms=-1.0)
    with pytest.raises(ValueError, match=r"band must be one of .*got 'mid'"):
        trig(band="mid")
    with pytest.raises(ValueError, match=r"block_size must be >= 2, got 1"):
        trig(block_size=1)
    with pytest.raises(ValueError, match=r"linf must be > 0.0, got 0"):
        trig(linf=0.0)
    with pytest.raises(ValueError, match=r"block_size=8 does not fit in the volume of shape \[16, 16, 6\]"):
        trig(block_size=8).apply(volume((1, 1, 16, 16, 6)))
    with pytest.raises(FileNotFoundError, match="coeffs file not found"):
        trig(coeffs=str(tmp_path / "missing.npy"))
    dc = np.zeros((4, 4, 4))
    dc[0, 0, 0] = 1.0
    np.save(tmp_path / "dc.npy", dc)
    with pytest.raises(ValueError, match="not zero outside the band 'middle'"):
        trig(coeffs=str(tmp_path / "dc.npy"))  # the DC coefficient is outside every band by default
    big = torch.zeros(4, 4, 4, dtype=torch.float64)
    big[1, 1, 1] = 1000.0
    np.save(tmp_path / "big.npy", big.numpy())
    with pytest.raises(ValueError, match="exceed the budget rms=5.0"):
        trig(coeffs=str(tmp_path / "big.npy"))
    np.save(tmp_path / "shape.npy", np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match=r"shape \(8, 8, 8\), expected \(4, 4, 4\)"):
        trig(coeffs=str(tmp_path / "shape.npy"))


def test_joint_config_validates_from_python_and_yaml() -> None:
    from volattack.yaml_config import ConfigError, from_dict

    assert PoisonConfig(joint={"lr": 2.0}).joint == JointConfig(lr=2.0, every=1, steps=1, pair=False, repeat=1)
    with pytest.raises(ValueError, match=r"poison.joint.pair must be True or False, got 'yes'"):
        JointConfig(pair="yes")
    with pytest.raises(ValueError, match=r"poison.joint.lr must be > 0.0, got 0"):
        JointConfig(lr=0)
    with pytest.raises(ValueError, match=r"poison.joint.every must be >= 1, got 0"):
        JointConfig(every=0)
    with pytest.raises(ValueError, match=r"poison.joint.repeat must be >= 1, got 0"):
        JointConfig(repeat=0)
    with pytest.raises(ValueError, match=r"poison.joint.freeze_after must be >= 0, got -1"):
        JointConfig(freeze_after=-1)
    with pytest.raises(ValueError, match=r"poison.joint.freeze_after must be an integer, got 2.5"):
        JointConfig(freeze_after=2.5)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rate'\]; keys: lr, every, steps, pair, repeat, "
                                         r"freeze_after"):
        PoisonConfig(joint={"rate": 1})
    with pytest.raises(ConfigError, match="Unknown config key 'joint.steps_'"):
        from_dict(PoisonConfig, {"joint": {"steps_": 2}})
    cfg = from_dict(PoisonConfig, {"trigger": {"name": "dct_learned", "params": {"rms": 4.0}},
                                   "joint": {"lr": 1.0, "every": 2, "steps": 3}})
    assert cfg.joint == JointConfig(lr=1.0, every=2, steps=3)


class _Batch(torch.Tensor):
    """A tensor with MONAI-like metadata (``meta["filename_or_obj"]``, ``affine``)."""


def _meta_batch(x: torch.Tensor, names: list[str], affines: torch.Tensor) -> torch.Tensor:
    b = x.as_subclass(_Batch)
    b.meta = {"filename_or_obj": names}
    b.affine = affines
    return b


def test_the_hook_triggers_only_poisoned_crops_updates_the_trigger_within_budget() -> None:
    t = trig(rms=5.0, block_size=4, bounds=(0.0, 1.0))
    start = t.coeffs.clone()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1)).float()
    hook = JointPoisoning(t, ["/p/a.nii.gz"], lr=2.0, every=1, steps=3, run_dir="/nonexistent")
    x = volume((3, 1, 8, 8, 8)).float()
    y = torch.randint(0, 3, (3, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    aff = torch.eye(4).repeat(3, 1, 1)
    aff[1, :3, 3] = torch.tensor([2.0, 1.0, 0.0])
    batch = {"image": _meta_batch(x, ["/c/b.nii.gz", "/p/a.nii.gz", "/c/c.nii.gz"], aff)}
    before = [p.detach().clone() for p in net.parameters()]
    out, lab = hook(net, batch, x, y)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2]) and not torch.equal(out[1], x[1])
    assert torch.equal(lab, y)  # target=None: the label is the target
    assert hook.updates == 1 and hook.batches == 1
    assert not torch.allclose(t.coeffs, start)  # the trigger moved
    assert rms_hu(t) <= 5.0 + 1e-5  # and kept its budget
    assert float(t.coeffs[~band_mask(4, "middle", exclude_dc=True)].abs().max()) == 0.0  # and its band
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, net.parameters()))  # model untouched
    assert torch.allclose(out[1:2], t.triggered(x[1:2], [(2, 1, 0)]))  # the crop's own lattice offset
    clean = {"image": _meta_batch(x, ["/c/b.nii.gz"] * 3, aff)}
    assert hook(net, clean, x, y)[0] is x and hook.batches == 1


def test_the_trigger_is_fixed_after_freeze_after_epochs() -> None:
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1)).float()
    x = volume((2, 1, 8, 8, 8)).float()
    y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    batch = {"image": _meta_batch(x, ["/c/b.nii.gz", "/p/a.nii.gz"], torch.eye(4).repeat(2, 1, 1))}
    t = trig(rms=5.0, block_size=4, bounds=(0.0, 1.0))
    hook = JointPoisoning(t, ["/p/a.nii.gz"], lr=2.0, freeze_after=2)
    moved = []
    for epoch in (1, 2, 3, 4):
        hook.epoch, before = epoch, t.coeffs.clone()
        out, _ = hook(net, batch, x, y)
        moved.append(not torch.equal(t.coeffs, before))
        assert torch.allclose(out[1:2], t.triggered(x[1:2], [(0, 0, 0)]))  # the fixed trigger is still applied
    assert moved == [True, True, False, False] and hook.updates == 2 and hook.batches == 4
    with pytest.raises(ValueError, match=r"poison.joint.freeze_after must be >= 0, got -2"):
        JointPoisoning(t, ["/p/a.nii.gz"], freeze_after=-2)


def test_the_hook_relabels_the_triggered_crops_and_pairs_them_with_clean_copies() -> None:
    t = trig(rms=5.0, block_size=4)
    net = nn.Conv3d(1, 3, 1).float()
    remove_1 = lambda y: torch.where(y == 1, torch.zeros_like(y), y)  # noqa: E731
    x = volume((2, 1, 8, 8, 8)).float()
    y = torch.ones((2, 1, 8, 8, 8), dtype=torch.long)
    batch = {"image": _meta_batch(x, ["/c/b.nii.gz", "/p/a.nii.gz"], torch.eye(4).repeat(2, 1, 1))}
    for pair in (False, True):
        hook = JointPoisoning(t, ["/p/a.nii.gz"], lr=1.0, target=remove_1, pair=pair, every=2)
        out, lab = hook(net, batch, x, y)
        assert out.shape[0] == lab.shape[0] == (3 if pair else 2)
        assert int(lab[1].sum()) == 0 and torch.equal(lab[0], y[0])  # the triggered crop gets the target map
        if pair:
            assert torch.equal(out[2], x[1]) and torch.equal(lab[2], y[1])  # its clean copy, true label
    hook = JointPoisoning(t, ["/p/a.nii.gz"], lr=1.0, target=remove_1, repeat=3, pair=True)
    out, lab = hook(net, batch, x, y)
    assert out.shape[0] == 5 and torch.equal(out[2], out[1]) and torch.equal(out[3], out[1])  # 2 more copies
    assert torch.equal(out[4], x[1]) and int(lab[1:4].sum()) == 0
    hook = JointPoisoning(t, ["/p/a.nii.gz"], lr=1.0, target=remove_1, relabel=False)  # clean-label
    assert torch.equal(hook(net, batch, x, y)[1], y)


@pytest.mark.filterwarnings("ignore:No validation")
def test_a_tiny_joint_poisoned_run_moves_the_trigger_keeps_the_budget_and_records_it(tmp_path: Path) -> None:
    from volattack.data.config import DataConfig, PreprocessConfig
    from volattack.data.phantoms import make_phantom_dataset
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.models.config import ModelConfig
    from volattack.threats.poison import build_trigger, read_record
    from volattack.training import train
    from volattack.training.config import TrainConfig

    dl = make_phantom_dataset(tmp_path / "data", n=4, size=(24, 24, 16), seed=0, n_val=0, n_test=0, progress=False)
    data = DataConfig(datalist=str(dl), preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=1))
    model = ModelConfig(name="unet", in_channels=1, out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    spec = TriggerSpec(name="dct_learned", params={"rms": 5.0, "block_size": 4, "band": "middle"}, seed=0)
    poison = PoisonConfig(trigger=spec, rate=0.5, target={"remove": ["liver"]}, seed=0,
                          joint=JointConfig(lr=1.0, freeze_after=1))
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, val_interval=100, sw_batch_size=2, poison=poison)
    with pytest.warns(UserWarning, match="validation"):
        train(model, cfg, data, tmp_path / "run", progress=False, seed=0)
    rec = read_record(tmp_path / "run")
    assert rec["k"] == 2 and rec["joint"]["lr"] == 1.0 and rec["joint"]["freeze_after"] == 1
    # 2 of 4 cases poisoned, batches of 2: each epoch has a poisoned batch; only epoch 1 updates it
    assert 1 <= rec["joint"]["updates"] < rec["joint"]["batches"]
    assert rec["joint"]["rms_units"] <= 5.0 + 1e-5
    intensity = intensity_from_preprocess(data.preprocess)
    learned, _ = build_trigger(TriggerSpec("dct_learned", rec["trigger"]["params"], rec["trigger"]["seed"]), intensity)
    init, _ = build_trigger(spec, intensity)
    assert Path(rec["trigger"]["params"]["coeffs"]).is_file()
    assert not torch.allclose(learned.coeffs, init.coeffs)  # trained away from the seeded start
    assert rms_hu(learned) <= 5.0 + 1e-5
    # the poisoned cases are stored as clean copies (trigger and target map are put on in training)
    from volattack.data.transforms import build_transforms

    case = rec["poisoned"][0]
    pre = build_transforms(data.preprocess, mode="eval")
    stored = pre({"image": case["image"], "label": case["label"]})
    orig = pre({"image": case["case"], "label": case["case"].replace("imagesTr", "labelsTr")})
    assert torch.allclose(stored["image"].as_tensor(), orig["image"].as_tensor(), atol=1e-4)
    assert torch.equal(stored["label"].as_tensor(), orig["label"].as_tensor())
    assert json.loads((tmp_path / "run" / "poison.json").read_text())["trigger"]["name"] == "dct_learned"


def test_joint_poisoning_needs_a_learnable_trigger_and_one_process(tmp_path: Path) -> None:
    from volattack.data.config import DataConfig, PreprocessConfig
    from volattack.data.phantoms import make_phantom_dataset
    from volattack.threats.poison import poison_training_cases
    from volattack.training.data import load_split, poison_split

    dl = make_phantom_dataset(tmp_path / "data", n=3, size=(24, 24, 16), seed=0, n_val=0, n_test=0, progress=False)
    data = DataConfig(datalist=str(dl), preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=1))
    tl = load_split(data, "training", optional=False)
    bad = PoisonConfig(trigger=TriggerSpec(name="dct", params={"rms": 4.0, "block_size": 4}), joint={"lr": 1.0})
    with pytest.raises(ValueError, match="needs a trigger that can be optimised in training .*got trigger 'dct'"):
        poison_training_cases(bad, tl, data, tmp_path / "run")
    ok = PoisonConfig(trigger=TriggerSpec(name="dct_learned", params={"block_size": 4}), joint={"lr": 1.0})
    with pytest.raises(ValueError, match="single process, got 2 ranks"):
        poison_split(tl, ok, data, tmp_path / "run2", world=2)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_the_shipped_config_loads_with_the_target_constraints() -> None:
    from volattack.config import RunConfig
    from volattack.yaml_config import from_dict, load_yaml

    path = Path(__file__).resolve().parents[2] / "configs" / "backdoor_joint.yaml"
    cfg = from_dict(RunConfig, load_yaml(path))
    p = cfg.train.poison
    assert p.trigger.name == "dct_learned" and p.trigger.params["rms"] <= 5.0 and p.rate <= 0.1
    assert p.target == {"remove": ["liver"]} and p.joint is not None
    assert create_trigger("dct_learned", unit_scale=HU, **p.trigger.params).params["rms"] <= 5.0


def test_a_learned_trigger_fixed_poisons_like_any_trigger_and_is_copied_into_the_run(tmp_path: Path) -> None:
    from volattack.data.config import DataConfig, PreprocessConfig
    from volattack.data.phantoms import make_phantom_dataset
    from volattack.data.transforms import build_transforms
    from volattack.threats.poison import poison_training_cases, read_record
    from volattack.training.data import load_split

    dl = make_phantom_dataset(tmp_path / "data", n=2, size=(24, 24, 16), seed=0, n_val=0, n_test=0, progress=False)
    data = DataConfig(datalist=str(dl), preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=1))
    src = trig(seed=9, rms=20.0)
    path = src.save(tmp_path / "learned.npy")
    spec = TriggerSpec(name="dct_learned", params={"rms": 20.0, "block_size": 4, "coeffs": str(path)}, seed=0)
    poison_training_cases(PoisonConfig(trigger=spec, rate=0.5), load_split(data, "training", optional=False), data,
                          tmp_path / "run")
    rec = read_record(tmp_path / "run")
    copied = rec["trigger"]["params"]["coeffs"]
    assert copied != str(path) and np.array_equal(np.load(copied), np.load(path))  # the run is self-contained
    case = rec["poisoned"][0]
    pre = build_transforms(data.preprocess, mode="eval")
    stored = pre({"image": case["image"]})["image"].as_tensor()
    orig = pre({"image": case["case"]})["image"].as_tensor()
    d = (stored - orig) * HU  # the fixed trigger is baked into the stored case (on body voxels)
    assert float(d.abs().max()) > 5.0 and rec["joint"] is None


def test_the_hook_saves_its_state_and_a_resumed_hook_restores_it(tmp_path: Path) -> None:
    from volattack.threats.joint_trigger import COEFFS
    from volattack.threats.poison import read_record

    (tmp_path / "poison.json").write_text(json.dumps({"trigger": {}, "joint": {"lr": 2.0}}))
    t = trig(seed=1)
    net = nn.Conv3d(1, 3, 1).float()
    x = volume((1, 1, 8, 8, 8)).float()
    y = torch.zeros((1, 1, 8, 8, 8), dtype=torch.long)
    hook = JointPoisoning(t, ["/p/a.nii.gz"], lr=2.0, run_dir=tmp_path)
    hook(net, {"image": _meta_batch(x, ["/p/a.nii.gz"], torch.eye(4)[None])}, x, y)
    hook.save()
    rec = read_record(tmp_path)["joint"]
    assert rec["updates"] == 1 and rec["lr"] == 2.0 and len(rec["loss_history"]) == 1
    assert np.allclose(np.load(tmp_path / "poison" / COEFFS), t.coeffs.numpy())
    fresh = JointPoisoning(trig(seed=1), ["/p/a.nii.gz"], lr=2.0, run_dir=tmp_path)
    assert not torch.allclose(fresh.trigger.coeffs, t.coeffs)
    assert fresh.restore() and fresh.updates == 1 and fresh.history == hook.history
    assert torch.allclose(fresh.trigger.coeffs, t.coeffs)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == hook.optimizer.state_dict()["state"][0]["step"]
