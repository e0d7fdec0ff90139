"""Adversarial training under automatic mixed precision on CPU (bfloat16 autocast, ``train.amp: true``).

Defect 6 of issue 9: the attack must run at its own precision (``amp_dtype`` set, so under float16
it scales its own loss), never inside the training step's autocast."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

import volattack.defenses.adversarial as adversarial
from volattack.data.config import DataConfig, PreprocessConfig
from volattack.data.phantoms import make_phantom_dataset
from volattack.defenses.adversarial import adversarial_loss, build_adversary
from volattack.defenses.config import AdversaryConfig
from volattack.models.checkpoint import read_checkpoint
from volattack.models.config import ModelConfig
from volattack.training.config import TrainConfig
from volattack.models.zoo import create_model
from volattack.training import train

EPS = 8 / 255
PGD = AdversaryConfig(name="pgd", params={"eps": "8/255", "alpha": "2/255", "steps": 2})  # published: adv only
PGD_MIXED = AdversaryConfig(name="pgd", params={"eps": "8/255", "alpha": "2/255", "steps": 2}, clean_weight=1.0)


@pytest.mark.parametrize("outer_autocast", [False, True])
def test_pgd_training_step_under_bf16_autocast(tiny_model: nn.Module, tiny_batch, outer_autocast: bool) -> None:
    """One PGD-AT step (clean + adversarial term) as ``train`` runs it with amp on CPU: the attack (built
    with ``amp_dtype``) and both forward passes run in bfloat16, the attack is called outside any autocast
    (also when the caller wraps the step in one), the loss is finite, the attack leaves the model clean,
    and the step trains."""
    model, (x, y) = tiny_model, tiny_batch
    x_before = x.clone()
    attack = build_adversary(PGD_MIXED, model, seed=0, amp_dtype=torch.bfloat16)
    assert attack.amp_dtype == torch.bfloat16
    phase = {"now": "train"}
    seen: list[tuple[str, torch.dtype]] = []  # (phase, output dtype) of every convolution call
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append((phase["now"], out.dtype)))
               for m in model.modules() if isinstance(m, nn.Conv3d)]
    crafted: dict[str, Any] = {}
    run = attack.run

    def spy_run(images, labels, **kw):
        crafted["autocast_at_call"] = torch.is_autocast_enabled("cpu")
        phase["now"] = "attack"
        try:
            res = run(images, labels, **kw)
        finally:
            phase["now"] = "train"
        crafted.update(images=images, adv=res.adv)
        return res

    attack.run = spy_run
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outer_autocast):
        loss, terms = adversarial_loss(model, x, y, attack, PGD_MIXED, loss_fn, seed=3, amp_dtype=torch.bfloat16)
    for h in handles:
        h.remove()

    assert crafted["autocast_at_call"] is False
    # mixed precision was really on: the attack's passes (>= 1 per step, its own autocast) and the two
    # training passes (clean, adversarial) ran their convolutions in bfloat16
    n_conv = sum(isinstance(m, nn.Conv3d) for m in model.modules())
    assert sum(ph == "attack" for ph, _ in seen) >= 2 * n_conv
    assert sum(ph == "train" for ph, _ in seen) == 2 * n_conv
    assert {dt for _, dt in seen} == {torch.bfloat16}
    assert torch.isfinite(loss) and loss.dim() == 0
    assert set(terms) == {"clean", "adv", "total"} and all(math.isfinite(v) for v in terms.values())
    assert terms["adv"] > 0
    # attack bookkeeping: train mode restored in every submodule, no parameter gradient, input untouched
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before)
    # the adversarial batch is float32, inside the eps-ball and the bounds, and not the clean batch
    adv, images = crafted["adv"], crafted["images"]
    assert adv.dtype == torch.float32 and adv.shape == images.shape
    assert float((adv - images).abs().max()) <= EPS + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - images).abs().max()) > 0.5 * EPS

    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


class _SpyAttack:
    """Stands in for an attack: records the autocast state and arguments of every call, returns the input."""

    def __init__(self, amp_dtype: Optional[torch.dtype] = None) -> None:
        self.amp_dtype = amp_dtype
        self.calls: list[dict[str, Any]] = []

    def run(self, images, labels, *, seed=None, sample_ids=None):
        self.calls.append({"autocast": torch.is_autocast_enabled("cpu"), "seed": seed, "sample_ids": sample_ids})
        return SimpleNamespace(adv=images.detach().clone(), info={})


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_train_epoch_never_calls_the_attack_under_autocast(tiny_model: nn.Module, tiny_batch,
                                                           amp_dtype: torch.dtype) -> None:
    """Defect 6: under float16 AMP the training step used to call the attack inside its autocast, where
    the attack's input gradients run in float16 without the attack's own loss scaling and underflow.
    Now the attack is called outside autocast, while the training passes still run in ``amp_dtype``."""
    from volattack.training import train_epoch

    model, (x, y) = tiny_model, tiny_batch
    spy = _SpyAttack(amp_dtype)
    dtypes: list[torch.dtype] = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv3d))
    first_conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    loader = [{"image": x, "label": y}] * 2
    cfg = AdversaryConfig(name="pgd", clean_weight=1.0)
    losses = train_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.01),
                         DiceCELoss(to_onehot_y=True, softmax=True), device=torch.device("cpu"), attack=spy,
                         adv_cfg=cfg, amp_dtype=amp_dtype, seed=5)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert [c["autocast"] for c in spy.calls] == [False, False]
    assert dtypes == [amp_dtype] * 4  # clean and adversarial training passes of both steps


def test_train_with_amp_and_pgd_adversary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train(amp=True, adversary=pgd)`` on CPU: the adversary is built with ``amp_dtype`` bfloat16 and
    called outside autocast, every adversarial step's training passes run in bfloat16 with a clean model
    afterwards, the logged loss is finite and the parameters change."""
    datalist = make_phantom_dataset(tmp_path / "ph", n=2, size=(16, 16, 16), seed=0, n_val=1, n_test=0)
    data = DataConfig(datalist=str(datalist),
                      preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=1, crop_foreground=False))
    model_cfg = ModelConfig(name="unet", out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    tcfg = TrainConfig(epochs=2, batch_size=1, lr=3e-3, val_interval=1, sw_batch_size=1, cache=False, amp=True,
                       adversary=PGD)

    calls: list[dict[str, Any]] = []
    real = adversarial.adversarial_loss
    real_build = adversarial.build_adversary
    built: list[Any] = []

    def spy_build(*a, **kw):
        attack = real_build(*a, **kw)
        built.append(attack)
        run = attack.run

        def spy_run(images, labels, **kw):
            calls[-1]["attack_autocast"] = torch.is_autocast_enabled("cpu")
            return run(images, labels, **kw)

        attack.run = spy_run
        return attack

    def spy(model, images, labels, attack, cfg, seg_loss, **kw):
        calls.append({"amp_dtype": kw.get("amp_dtype")})
        loss, terms = real(model, images, labels, attack, cfg, seg_loss, **kw)
        calls[-1].update(
            train_mode=all(m.training for m in model.modules()),
            no_grads=all(p.grad is None for p in model.parameters()),
            finite=bool(torch.isfinite(loss)),
            adv=terms.get("adv"),
        )
        return loss, terms

    monkeypatch.setattr(adversarial, "adversarial_loss", spy)
    monkeypatch.setattr(adversarial, "build_adversary", spy_build)
    rng_before = torch.get_rng_state()
    result = train(model_cfg, tcfg, data, tmp_path / "run", seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)

    # the adversary is built for AMP (it runs its own bfloat16 autocast), and never called under the step's
    assert len(built) == 1 and built[0].amp_dtype == torch.bfloat16
    assert len(calls) == 4  # 2 epochs x 2 cases, batch 1
    for c in calls:
        assert c["amp_dtype"] == torch.bfloat16 and c["attack_autocast"] is False
        assert c["train_mode"] and c["no_grads"] and c["finite"]
        assert c["adv"] is not None and c["adv"] > 0
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["config"]["train"]["amp"] is True
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in log["history"])
    assert 0.0 <= result["best_dice"] <= 1.0

    torch.manual_seed(0)
    init = create_model(model_cfg.name, 1, 5, **model_cfg.kwargs).state_dict()
    trained = read_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    assert any((trained[k] - init[k]).abs().max() > 1e-3 for k in init if init[k].is_floating_point())
