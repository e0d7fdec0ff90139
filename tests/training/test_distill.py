"""Defensive distillation (teacher at temperature T, student on its soft outputs, deployed at
T = 1) and the hybrid defence (adversarial training through an input sanitiser): the losses by
hand, the frozen teacher, the deployed student, tiny runs end to end, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss

from volattack.config import ConfigError, RunConfig, from_dict
from volattack.data.config import DataConfig, PreprocessConfig
from volattack.data.phantoms import make_phantom_dataset
from volattack.defenses.adversarial import build_adversary
from volattack.defenses.config import AdversaryConfig, DefenseConfig
from volattack.defenses.hybrid import Sanitiser
from volattack.defenses.transforms.dct import DCTQuantization
from volattack.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from volattack.models.config import ModelConfig
from volattack.models.zoo import create_model
from volattack.training import train
from volattack.training.config import TrainConfig
from volattack.training.distill import (
    DistillConfig,
    TrainObjective,
    build_objective,
    distillation_loss,
    soft_target_loss,
)
from volattack.training.step import train_epoch

MODEL = ModelConfig(name="unet", in_channels=1, out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
DICE_CE = DiceCELoss(to_onehot_y=True, softmax=True)


# ---------------------------------------------------------------- the soft-target loss by hand


def _two_voxels() -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits (1, 2, 2, 1, 1): two voxels, two classes."""
    s = torch.tensor([[[[[2.0]], [[0.0]]], [[[0.0]], [[1.0]]]]])  # voxel 1: (2, 0), voxel 2: (0, 1)
    t = torch.tensor([[[[[4.0]], [[0.0]]], [[[0.0]], [[0.0]]]]])  # voxel 1: (4, 0), voxel 2: (0, 0)
    return s, t


def _ce_by_hand(s: list[tuple[float, float]], t: list[tuple[float, float]], temp: float) -> float:
    total = 0.0
    for (s0, s1), (t0, t1) in zip(s, t):
        q0 = math.exp(t0 / temp) / (math.exp(t0 / temp) + math.exp(t1 / temp))
        lse = math.log(math.exp(s0 / temp) + math.exp(s1 / temp))
        total += -(q0 * (s0 / temp - lse) + (1 - q0) * (s1 / temp - lse))
    return total / len(s)


@pytest.mark.parametrize("temp", [1.0, 20.0])
def test_soft_target_loss_by_hand(temp: float) -> None:
    s, t = _two_voxels()
    by_hand = _ce_by_hand([(2, 0), (0, 1)], [(4, 0), (0, 0)], temp)
    assert soft_target_loss(s, t, temp, t2_scaling=False).item() == pytest.approx(by_hand, rel=1e-5)
    # T^2 scaling (Hinton et al. 2015) multiplies the value, and hence the gradient, by T^2
    assert soft_target_loss(s, t, temp).item() == pytest.approx(temp**2 * by_hand, rel=1e-5)


def test_soft_target_gradient_is_t_times_p_minus_q_over_voxels() -> None:
    temp = 20.0
    s, t = _two_voxels()
    s.requires_grad_(True)
    soft_target_loss(s, t, temp).backward()  # T^2 * (p - q) / T / N with N = 2 voxels
    p, q = torch.softmax(s.detach() / temp, 1), torch.softmax(t / temp, 1)
    assert torch.allclose(s.grad, temp * (p - q) / 2, atol=1e-6)
    # the teacher is a constant target: no gradient flows into it
    t2, s2 = t.clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    soft_target_loss(s2, t2, temp).backward()
    assert t2.grad is None and s2.grad is not None


def test_soft_target_loss_is_minimal_at_the_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 3, 4, 4, 4, generator=g) * 5
    at_teacher = soft_target_loss(t.clone(), t, 20.0)
    for _ in range(3):
        assert soft_target_loss(t + torch.randn(t.shape, generator=g), t, 20.0) > at_teacher


def test_alpha_mixes_soft_and_hard_terms() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g) * 10
    y = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g)
    soft, hard = soft_target_loss(s, t, 5.0), DICE_CE(s, y)  # the hard term at T = 1
    for alpha in (0.0, 0.3, 1.0):
        cfg = DistillConfig(teacher="t.pt", temperature=5.0, alpha=alpha)
        want = alpha * soft + (1 - alpha) * hard
        assert distillation_loss(s, t, y, DICE_CE, cfg).item() == pytest.approx(want.item(), rel=1e-5)


def test_temperature_divides_the_logits_of_the_cross_entropy_term() -> None:
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(1, 3, 4, 4, 4, generator=g) * 10, torch.randint(0, 3, (1, 1, 4, 4, 4), generator=g)
    dice = DiceLoss(to_onehot_y=True, softmax=True)(z, y)
    want = dice + torch.nn.functional.cross_entropy(z / 20, y[:, 0])
    assert TrainObjective(DICE_CE, temperature=20.0)(z, y).item() == pytest.approx(want.item(), rel=1e-5)
    assert TrainObjective(DICE_CE)(z, y).item() == pytest.approx(DICE_CE(z, y).item())
    # a loss without Dice/CE parts gets logits / T
    assert TrainObjective(lambda a, b: a.sum(), temperature=4.0)(z, y).item() == pytest.approx(z.sum().item() / 4,
                                                                                                 rel=1e-5)


# ---------------------------------------------------------------- teacher, student, runs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = tmp_path_factory.mktemp("phantoms")
    datalist = make_phantom_dataset(root, n=2, size=(24, 24, 16), seed=0, n_val=1, n_test=0)
    pre = PreprocessConfig(roi_size=[16, 16, 16], num_samples=1, crop_foreground=False)
    return DataConfig(datalist=str(datalist), preprocess=pre)


def _train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=2, lr=3e-3, val_interval=1, sw_batch_size=2, cache=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(data: DataConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(MODEL, _train_cfg(temperature=20.0), data, out, seed=0, progress=False)
    return out / "best.pt"


def test_teacher_is_frozen_in_eval_mode_and_never_updated(teacher: Path) -> None:
    torch.manual_seed(0)
    net = create_model(MODEL.name, 1, 5, **MODEL.kwargs).train()
    obj = build_objective(_train_cfg(distill={"teacher": str(teacher), "temperature": 20.0}), MODEL, net,
                          torch.device("cpu"))
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    assert not obj.teacher.training and all(not p.requires_grad for p in obj.teacher.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 1, 16, 16, 16, generator=g), torch.randint(0, 5, (2, 1, 16, 16, 16), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = obj.batch_loss(net, x, y, None, None, None, 0, [0, 1], torch.device("cpu"))
        loss.backward()
        opt.step()
    assert not obj.teacher.training
    after = obj.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())  # the student learns


def test_distillation_run_end_to_end_and_student_deployed_at_t1(data: DataConfig, teacher: Path,
                                                                 tmp_path: Path) -> None:
    cfg = _train_cfg(epochs=2, distill={"teacher": str(teacher), "temperature": 20.0, "alpha": 0.5})
    res = train(MODEL, cfg, data, tmp_path / "student", seed=1, progress=False)
    log = json.loads((tmp_path / "student" / "train_log.json").read_text())
    assert log["config"]["train"]["distill"]["teacher"] == str(teacher)
    assert log["config"]["train"]["distill"]["temperature"] == 20.0
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in log["history"])
    assert 0.0 <= res["best_dice"] <= 1.0
    # the student's checkpoint is a plain checkpoint: the loaded model returns the network's own
    # logits (deployed at T = 1), nothing divides them by T
    student, info = load_checkpoint(tmp_path / "student" / "best.pt")
    assert set(info) >= {"model", "seed"} and "temperature" not in info
    net = create_model(MODEL.name, 1, 5, **MODEL.kwargs).eval()
    net.load_state_dict(read_checkpoint(tmp_path / "student" / "best.pt")["state_dict"])
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(student(x), net(x))


def test_teacher_at_temperature_learns_larger_logits(data: DataConfig, teacher: Path, tmp_path: Path) -> None:
    """Training at T = 20 fits softmax(z / 20): the deployed logits come out larger than at T = 1."""
    train(MODEL, _train_cfg(), data, tmp_path / "t1", seed=0, progress=False)
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z20 = load_checkpoint(teacher)[0](x)
        z1 = load_checkpoint(tmp_path / "t1" / "best.pt")[0](x)
    spread = lambda z: (z.amax(1) - z.amin(1)).mean().item()  # noqa: E731
    assert spread(z20) > spread(z1)


# ---------------------------------------------------------------- the hybrid defence


def _dct_defense() -> DefenseConfig:
    return DefenseConfig(transforms=[{"name": "dct_quant", "params": {"q": 10, "block_size": 4}}], bpda="identity")


def test_adversarial_training_crafts_through_the_sanitiser(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = DCTQuantization.forward

    def counting(self, x):
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(DCTQuantization, "forward", counting)
    torch.manual_seed(0)
    net = create_model(MODEL.name, 1, 5, **MODEL.kwargs).train()
    steps = 3
    adv = AdversaryConfig(name="pgd", params={"eps": "8/255", "steps": steps})
    for defense, expected in ((None, 0), (_dct_defense(), steps + 1)):
        calls["n"] = 0
        cfg = _train_cfg(adversary=adv, defense=defense)
        obj = build_objective(cfg, MODEL, net, torch.device("cpu"))
        attack = build_adversary(cfg.adversary, obj.attack_model)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(2, 1, 16, 16, 16, generator=g), torch.randint(0, 5, (2, 1, 16, 16, 16), generator=g)
        obj.batch_loss(net, x, y, attack, cfg.adversary, None, 0, [0, 1], torch.device("cpu")).backward()
        # every attack step and the training pass on x' go through the quantiser (BPDA backward);
        # without train.defense it is never called
        assert calls["n"] >= expected if expected else calls["n"] == 0
        assert net.training
    # the adversary's model is the adaptive wrapper with the BPDA copy of the quantiser
    assert "BPDA with an identity backward pass" in obj.attack_model.describe()


def test_sanitiser_is_in_front_of_the_training_pass() -> None:
    torch.manual_seed(0)
    net = create_model(MODEL.name, 1, 5, **MODEL.kwargs).eval()
    sanitiser = Sanitiser(_dct_defense())
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = sanitiser.wrap(net, 0)(x)
        assert torch.equal(out, net(sanitiser.transforms[0](x)))
        assert not torch.equal(out, net(x))


def test_hybrid_train_epoch_runs(data: DataConfig, tmp_path: Path) -> None:
    cfg = _train_cfg(adversary=AdversaryConfig(name="pgd", params={"eps": "4/255", "steps": 1}), defense=_dct_defense())
    res = train(MODEL, cfg, data, tmp_path / "hybrid", seed=0, progress=False)
    log = json.loads((tmp_path / "hybrid" / "train_log.json").read_text())
    assert log["config"]["train"]["defense"]["transforms"][0]["name"] == "dct_quant"
    assert math.isfinite(log["history"][0]["loss"]) and 0.0 <= res["best_dice"] <= 1.0


def test_plain_loss_still_works_in_train_epoch() -> None:
    """``train_epoch`` with a bare loss (benchmarks call it so) is unchanged by the objective hook."""
    torch.manual_seed(0)
    net = create_model(MODEL.name, 1, 5, **MODEL.kwargs).train()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(1, 1, 16, 16, 16, generator=g), "label": torch.randint(0, 5, (1, 1, 16, 16, 16),
                                                                                          generator=g)}
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    losses = train_epoch(net, [batch], opt, DICE_CE, device=torch.device("cpu"))
    assert len(losses) == 1 and math.isfinite(losses[0])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, match", [
    ({"temperature": 0}, r"train\.distill\.temperature must be a finite number > 0, got 0"),
    ({"temperature": -2.0}, r"train\.distill\.temperature must be a finite number > 0, got -2\.0"),
    ({"temperature": float("inf")}, r"train\.distill\.temperature must be a finite number > 0, got inf"),
    ({"alpha": 1.5}, r"train\.distill\.alpha must be in \[0, 1\], got 1\.5"),
    ({"alpha": -0.1}, r"train\.distill\.alpha must be in \[0, 1\], got -0\.1"),
    ({"teacher": ""}, r"train\.distill\.teacher must be the path of the teacher's checkpoint, got ''"),
    ({"t2_scaling": "yes"}, r"train\.distill\.t2_scaling"),
])
def test_distill_config_bad_values(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**{"teacher": "t.pt", **kw})


def test_train_config_bad_combinations() -> None:
    with pytest.raises(ConfigError, match=r"train\.temperature must be a finite number > 0, got 0"):
        TrainConfig(temperature=0)
    with pytest.raises(ConfigError, match=r"train\.temperature must be 1 with train\.distill.*got 20"):
        TrainConfig(temperature=20, distill={"teacher": "t.pt"})
    with pytest.raises(ConfigError, match=r"train\.distill cannot be combined with train\.adversary \(name 'pgd'\)"):
        TrainConfig(distill={"teacher": "t.pt"}, adversary=AdversaryConfig(name="pgd"))
    with pytest.raises(ConfigError, match=r"train\.defense must be a DefenseConfig, a mapping or None, got 3"):
        TrainConfig(defense=3)
    with pytest.raises(ValueError, match=r"transforms must list at least one transform"):
        TrainConfig(defense={"transforms": []})
    with pytest.raises(ValueError, match=r"bpda must be one of"):
        TrainConfig(defense={"transforms": [{"name": "median"}], "bpda": "straight"})


def test_yaml_keys_are_checked() -> None:
    base = {"model": {"name": "unet"}, "data": {"datalist": "d.json"}}
    cfg = from_dict(RunConfig, {**base, "train": {"temperature": 20.0, "defense": {"transforms": [{"name": "median"}]}}})
    assert cfg.train.temperature == 20.0 and isinstance(cfg.train.defense, DefenseConfig)
    cfg = from_dict(RunConfig, {**base, "train": {"distill": {"teacher": "t.pt", "alpha": 0.5}}})
    assert isinstance(cfg.train.distill, DistillConfig) and cfg.train.distill.alpha == 0.5
    with pytest.raises(ConfigError, match=r"temprature"):
        from_dict(RunConfig, {**base, "train": {"distill": {"teacher": "t.pt", "temprature": 2}}})
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\], got 2"):
        from_dict(RunConfig, {**base, "train": {"distill": {"teacher": "t.pt", "alpha": 2}}})


def test_missing_or_unfit_teacher_fails_before_training(data: DataConfig, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    cfg = _train_cfg(distill={"teacher": str(missing)})
    with pytest.raises(FileNotFoundError, match=r"train\.distill\.teacher: no teacher checkpoint at .*nope\.pt"):
        train(MODEL, cfg, data, tmp_path / "run", seed=0, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    other = ModelConfig(name="unet", in_channels=1, out_channels=2, kwargs=MODEL.kwargs)
    save_checkpoint(tmp_path / "two.pt", create_model("unet", 1, 2, **MODEL.kwargs), other)
    with pytest.raises(ValueError, match=r"has \(in, out\) channels \(1, 2\), the student \(1, 5\)"):
        train(MODEL, _train_cfg(distill={"teacher": str(tmp_path / "two.pt")}), data, tmp_path / "run2", seed=0,
              progress=False)


def test_sanitiser_bad_input() -> None:
    with pytest.raises(ValueError, match=r"train\.defense must be a DefenseConfig, got dict"):
        Sanitiser({"transforms": [{"name": "median"}]})  # type: ignore[arg-type]
    bad = DefenseConfig(transforms=[{"name": "median", "params": {"kernel_size": 4}}])
    with pytest.raises(ValueError, match=r"train\.defense\.transforms\[0\] \(median\)"):
        Sanitiser(bad)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        TrainObjective(DICE_CE, temperature=0)
    with pytest.raises(ValueError, match=r"distill \(train\.distill\) is required with a teacher"):
        TrainObjective(DICE_CE, teacher=torch.nn.Identity())
    s, t = _two_voxels()
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1"):
        soft_target_loss(s, t, -1)
    with pytest.raises(ValueError, match=r"must have the same shape"):
        soft_target_loss(s, t[:, :1], 2.0)
