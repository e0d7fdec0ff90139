"""Adversarial training: the step, PGD-AT versus clean training, VAFT terms, resume, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

import volattack
from volattack.config import ConfigError, from_dict
from volattack.data.config import DataConfig, PreprocessConfig
from volattack.data.phantoms import make_phantom_dataset
from volattack.defenses.adversarial import adversarial_loss, build_adversary
from volattack.defenses.config import AdversaryConfig
from volattack.config import RunConfig
from volattack.models.config import ModelConfig
from volattack.training.config import TrainConfig
from volattack.training import train


def _task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, 6, generator=g)
    x = F.interpolate(x, size=(12, 12, 12), mode="trilinear", align_corners=False)
    lo, hi = x.amin(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)
    x = (x - lo) / (hi - lo)
    return x, (x > 0.5).long()


def _net():
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 2, 3, padding=1),
    )


def test_one_adversarial_step_changes_parameters_and_keeps_the_model_clean():
    torch.manual_seed(0)
    model = _net().train()
    x, y = _task(2, 0)
    cfg = AdversaryConfig(name="pgd", params={"eps": "8/255", "steps": 2}, share=0.5)
    atk = build_adversary(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    loss, terms = adversarial_loss(model, x, y, atk, cfg, DiceCELoss(to_onehot_y=True, softmax=True))
    # the attack ran in eval mode and restored train mode, and wrote no parameter gradient
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert set(terms) == {"clean", "adv", "total"} and terms["adv"] > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_vaft_terms_and_weights():
    torch.manual_seed(0)
    model = _net().train()
    x, y = _task(2, 1)
    cfg = AdversaryConfig(name="vafa", params={"steps": 2, "block_size": 4, "q_init": "qmax", "q_min": 5},
                          fr_weight=1.0)
    loss, terms = adversarial_loss(model, x, y, build_adversary(cfg, model), cfg,
                                   DiceCELoss(to_onehot_y=True, softmax=True))
    assert terms["fr"] > 0
    assert terms["total"] == pytest.approx(terms["clean"] + terms["adv"] + terms["fr"], rel=1e-5)


def test_pgd_at_is_more_robust_than_clean_training():
    """Same steps, same data, same seed: under PGD the PGD-trained model has a lower loss and a
    higher Dice than the clean-trained one (direction only)."""
    from volattack.attacks.objectives import hard_foreground_dice, objective_per_sample

    x, y = _task(8, 0)
    xt, yt = _task(4, 1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    ce, dice = {}, {}
    for name in ("none", "pgd"):
        torch.manual_seed(0)
        model = _net().train()
        cfg = AdversaryConfig(name=name, params={"eps": "16/255", "steps": 2} if name != "none" else {})
        atk = build_adversary(cfg, model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(30):
            opt.zero_grad()
            loss, _ = adversarial_loss(model, x, y, atk, cfg, loss_fn, seed=step)
            loss.backward()
            opt.step()
        model.eval()
        adv = volattack.create_attack("pgd", model, eps=16 / 255, steps=5, seed=0)(xt, yt)
        with torch.no_grad():
            logits = model(adv)
            ce[name] = float(objective_per_sample(logits, yt, "ce").mean())
            dice[name] = float(hard_foreground_dice(logits.argmax(1, keepdim=True), yt, 2).mean())
    assert ce["pgd"] < 0.8 * ce["none"], ce
    assert dice["pgd"] > dice["none"], dice


def test_fgsm_rs_is_fast_at():
    model = _net()
    atk = build_adversary(AdversaryConfig(name="fgsm_rs", params={"eps": "8/255"}), model)
    assert atk.name == "bim" and atk.steps == 1 and atk.random_start and atk.alpha == pytest.approx(1.25 * 8 / 255)


def test_bad_adversary_input_fails_before_training(tmp_path):
    model = _net()
    with pytest.raises(ValueError, match="Unknown adversary 'pgdd'. Did you mean 'pgd'"):
        build_adversary(AdversaryConfig(name="pgdd"), model)
    with pytest.raises(ValueError, match="eps must be >= 0, got -0.1"):
        build_adversary(AdversaryConfig(name="pgd", params={"eps": -0.1}), model)
    with pytest.raises(ConfigError, match=r"adversary.share must be in \[0, 1\], got 1.5"):
        from_dict(RunConfig, {"train": {"adversary": {"name": "pgd", "share": 1.5}}})
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.adversary.shares'. Did you mean 'share'"):
        from_dict(RunConfig, {"train": {"adversary": {"shares": 0.5}}})


@pytest.mark.slow
def test_adversarial_training_resumes_from_the_last_epoch(tmp_path):
    datalist = make_phantom_dataset(tmp_path / "ph", n=2, size=(24, 24, 16), seed=0, n_val=1, n_test=0)
    data = DataConfig(datalist=str(datalist),
                      preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=1, crop_foreground=False))
    model_cfg = ModelConfig(name="unet", out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    tcfg = TrainConfig(epochs=2, batch_size=2, lr=3e-3, val_interval=1, sw_batch_size=2, cache=False,
                       adversary=AdversaryConfig(name="pgd", params={"eps": "4/255", "steps": 1}))
    run = tmp_path / "run"
    first = train(model_cfg, replace(tcfg, epochs=1), data, run, seed=0, progress=False)
    assert first["epochs"] == 1
    second = train(model_cfg, tcfg, data, run, seed=0, resume=True, progress=False)
    assert second["epochs"] == 2
    hist = json.loads((run / "train_log.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    with pytest.raises(ValueError, match="Unknown adversary"):
        train(model_cfg, replace(tcfg, adversary=AdversaryConfig(name="nope")), data, tmp_path / "r2",
              seed=0, progress=False)


@pytest.mark.parametrize("kwargs,expected", [
    ({"name": "pgd"}, 0.0),                                   # Madry PGD-AT: adversarial examples only
    ({"name": "fgsm_rs"}, 0.0),                               # Wong fast AT
    ({"name": "vafa", "fr_weight": 1.0}, 1.0),                # VAFT keeps L_dice(M(X), Y)
    ({"name": "pgd", "share": 0.5}, 1.0),                     # the unattacked half must count
    ({"name": "pgd", "clean_weight": 0.25}, 0.25),            # explicit value kept
    ({"name": "none"}, 1.0),                                  # clean training is the clean term
])
def test_clean_weight_default_follows_the_published_recipe(kwargs, expected):
    assert AdversaryConfig(**kwargs).clean_weight == expected
    raw = {"train": {"adversary": kwargs}}
    assert from_dict(RunConfig, raw).train.adversary.clean_weight == expected


@pytest.mark.parametrize("clean_weight,train_forwards", [(0.0, 1), (1.0, 2)])
def test_adversarial_only_recipe_skips_the_clean_forward(clean_weight, train_forwards):
    """PGD-AT with clean_weight 0: one training forward per batch (on X'), so an epoch costs
    steps + 1 passes; with the clean term two."""
    torch.manual_seed(0)
    model = _net().train()
    x, y = _task(2, 0)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(m.training))
    cfg = AdversaryConfig(name="pgd", params={"eps": "8/255", "steps": 3}, clean_weight=clean_weight)
    loss, terms = adversarial_loss(model, x, y, build_adversary(cfg, model), cfg,
                                   DiceCELoss(to_onehot_y=True, softmax=True))
    assert calls.count(True) == train_forwards        # forwards in train mode
    assert calls.count(False) == 3                      # the attack's steps, in eval mode
    assert ("clean" in terms) == (clean_weight > 0)
    assert terms["total"] == pytest.approx(clean_weight * terms.get("clean", 0.0) + terms["adv"], rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- per-crop random draws


class _RecordingAttack:
    """Stands in for an attack that takes ``sample_ids``: records every call, returns the input."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def run(self, images, labels, *, seed=None, sample_ids=None):
        self.calls.append({"seed": seed, "sample_ids": list(sample_ids), "n": images.shape[0]})
        return SimpleNamespace(adv=images.detach().clone(), info={})


def test_crop_sample_ids_are_distinct_per_crop_and_rank():
    from volattack.training import crop_sample_ids

    assert crop_sample_ids(0, 3) == [0, 1, 2] and crop_sample_ids(3, 2) == [3, 4]
    ranks = [crop_sample_ids(0, 3, r, 2) + crop_sample_ids(3, 2, r, 2) for r in range(2)]
    assert ranks == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert crop_sample_ids(5, 0) == []


@pytest.mark.parametrize("rank", [0, 1])
def test_train_epoch_gives_every_crop_its_own_sample_id(rank):
    """Defect 8 (training side): each attack call gets one id per crop, the crop's index in the epoch
    (interleaved over the ranks), so crops of a batch and of different ranks never share a random start;
    with ``share`` 0.5 only the attacked first half of each batch is passed."""
    from volattack.training import train_epoch

    torch.manual_seed(0)
    model = _net().train()
    x, y = _task(2, 0)
    loader = [{"image": x, "label": y}] * 3
    for share, per_call in ((1.0, 2), (0.5, 1)):
        spy = _RecordingAttack()
        train_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0),
                    DiceCELoss(to_onehot_y=True, softmax=True), device=torch.device("cpu"), attack=spy,
                    adv_cfg=AdversaryConfig(name="pgd", share=share), seed=7, rank=rank, world_size=2)
        ids = [c["sample_ids"] for c in spy.calls]
        assert [len(i) for i in ids] == [per_call] * 3 and all(c["n"] == per_call for c in spy.calls)
        assert ids == [[(2 * step + b) * 2 + rank for b in range(per_call)] for step in range(3)]
        assert len({i for call in ids for i in call}) == 3 * per_call  # distinct within the epoch
        assert len({c["seed"] for c in spy.calls}) == 3  # and a fresh seed per step


def test_adversarial_loss_rejects_a_wrong_number_of_sample_ids():
    model = _net().train()
    x, y = _task(2, 0)
    cfg = AdversaryConfig(name="pgd", params={"eps": "8/255", "steps": 1})
    with pytest.raises(ValueError, match=r"sample_ids must hold one id per sample \(2\), got 3"):
        adversarial_loss(model, x, y, _RecordingAttack(), cfg, DiceCELoss(to_onehot_y=True, softmax=True),
                         sample_ids=[0, 1, 2])


def test_identical_crops_of_a_batch_get_different_random_starts():
    """PGD-AT with a random start: two identical crops in one batch are attacked from different starts
    (their sample ids differ), so their adversarial copies differ."""
    import inspect

    model = _net().train()
    x, y = _task(1, 0)
    x, y = x.repeat(2, 1, 1, 1, 1), y.repeat(2, 1, 1, 1, 1)
    cfg = AdversaryConfig(name="pgd", params={"eps": "8/255", "alpha": "1/255", "steps": 1, "random_start": True})
    attack = build_adversary(cfg, model)
    if "sample_ids" not in inspect.signature(attack.run).parameters:
        pytest.skip("Attack.run has no sample_ids yet")
    crafted = {}
    run = attack.run

    def spy_run(images, labels, *, seed=None, sample_ids=None):
        res = run(images, labels, seed=seed, sample_ids=sample_ids)
        crafted["adv"] = res.adv
        return res

    attack.run = spy_run
    adversarial_loss(model, x, y, attack, cfg, DiceCELoss(to_onehot_y=True, softmax=True), seed=3,
                     sample_ids=[10, 11])
    adv = crafted["adv"]
    assert float((adv[0] - adv[1]).abs().max()) > 1 / 255


@pytest.mark.slow
def test_attack_seeds_and_sample_ids_replay_across_resume(tmp_path, monkeypatch):
    """A run resumed from last.pt makes the attack calls (seed and per-crop ids) an uninterrupted run makes."""
    import volattack.defenses.adversarial as adversarial

    datalist = make_phantom_dataset(tmp_path / "ph", n=2, size=(16, 16, 16), seed=0, n_val=1, n_test=0)
    data = DataConfig(datalist=str(datalist),
                      preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=2, crop_foreground=False))
    model_cfg = ModelConfig(name="unet", out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    tcfg = TrainConfig(epochs=2, batch_size=1, lr=3e-3, val_interval=1, sw_batch_size=1, cache=False,
                       adversary=AdversaryConfig(name="pgd", params={"eps": "4/255", "steps": 1}))
    spies: list[_RecordingAttack] = []

    def spy_build(*a, **kw):
        spies.append(_RecordingAttack())
        return spies[-1]

    monkeypatch.setattr(adversarial, "build_adversary", spy_build)
    train(model_cfg, tcfg, data, tmp_path / "full", seed=4, progress=False)
    train(model_cfg, replace(tcfg, epochs=1), data, tmp_path / "part", seed=4, progress=False)
    train(model_cfg, tcfg, data, tmp_path / "part", seed=4, resume=True, progress=False)
    full, part, resumed = (s.calls for s in spies)
    assert len(full) == 4 and len(part) == 2 and len(resumed) == 2  # 2 cases per epoch, batch 1
    assert part == full[:2] and resumed == full[2:]
    # two crops per case: ids 0, 1 then 2, 3 in every epoch; seeds differ between steps and epochs
    assert [c["sample_ids"] for c in full] == [[0, 1], [2, 3]] * 2
    assert len({c["seed"] for c in full}) == 4
