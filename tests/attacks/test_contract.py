"""One contract test over every registered attack: the promises of ``volattack.attacks.base``
(module docstring) and of the README's Python API section, checked for every name in the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import volattack
from volattack import measure, metrics
from volattack.attacks.base import Attack

# keep every attack cheap; attacks without a steps argument take no extras (square: queries)
FAST = {"gn": {}, "fgsm": {}, "square": {"queries": 4}}


def make(name: str, model: nn.Module, **kw) -> Attack:
    if name == "square" and "steps" in kw:  # its iterations are queries
        kw["queries"] = kw.pop("steps")
    return volattack.create_attack(name, model, **{**FAST.get(name, {"steps": 2}), **kw})


ALL = volattack.list_attacks()


def test_registry_has_the_promised_names():
    assert {"gn", "fgsm", "bim", "pgd", "pgd_l2", "apgd", "segpgd", "cospgd", "sea", "square"} <= set(ALL)


def test_unknown_attack_suggests_a_name(tiny_model):
    with pytest.raises(ValueError, match="Did you mean 'pgd'"):
        volattack.create_attack("pgdd", tiny_model)


@pytest.mark.parametrize("name", ALL)
def test_contract(name, tiny_model, tiny_batch):
    x, y = tiny_batch
    x0, y0 = x.clone(), y.clone()
    modes = [m.training for m in tiny_model.modules()]
    atk = make(name, tiny_model, seed=3)
    res = atk.run(x, y)
    adv = res.adv
    # shape, dtype, device kept; detached
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.device == x.device
    assert not adv.requires_grad and adv.grad_fn is None
    # inside bounds
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # inside the budget, where the attack has one
    if getattr(atk, "linf_budget", False):
        assert float((adv - x).abs().max()) <= atk.eps + 1e-6
        assert max(res.info["linf"]) <= atk.eps + 1e-6
    # it did something
    assert float((adv - x).abs().max()) > 0
    # input untouched, model mode restored, no parameter grads
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [m.training for m in tiny_model.modules()] == modes
    assert all(p.grad is None for p in tiny_model.parameters())
    # measured budget reported
    for key in ("linf", "rms", "l2", "psnr", "ssim", "seed", "seconds", "steps_run", "restarts", "sample_ids"):
        assert key in res.info
    assert res.info["seed"] == 3
    assert res.info["sample_ids"] == [0, 1]
    # seeded replay bit for bit
    again = make(name, tiny_model, seed=3)(x, y)
    assert torch.equal(adv, again)


@pytest.mark.parametrize("name", ALL)
def test_batch_equals_its_samples_attacked_alone_with_their_ids(name, tiny_model, tiny_batch):
    x, y = tiny_batch
    both = make(name, tiny_model, seed=3).run(x, y, sample_ids=[3, 7])
    assert both.info["sample_ids"] == [3, 7]
    a0 = make(name, tiny_model, seed=3)(x[:1], y[:1], sample_ids=[3])
    a1 = make(name, tiny_model, seed=3)(x[1:], y[1:], sample_ids=[7])
    torch.testing.assert_close(torch.cat([a0, a1]), both.adv, rtol=0, atol=1e-6)
    # seeded replay with explicit ids is bit for bit too
    assert torch.equal(make(name, tiny_model, seed=3)(x, y, sample_ids=[3, 7]), both.adv)


@pytest.mark.parametrize("name", ALL)
def test_samples_of_one_batch_get_their_own_random_draws(name, tiny_model, tiny_batch):
    """Two identical samples in one batch: different results for attacks that draw random numbers
    (each sample has its own stream), identical ones for deterministic attacks."""
    x, y = tiny_batch
    xx, yy = x[:1].repeat(2, 1, 1, 1, 1), y[:1].repeat(2, 1, 1, 1, 1)
    atk = make(name, tiny_model, seed=3)
    adv = atk(xx, yy)
    if atk.is_random:
        assert float((adv[0] - adv[1]).abs().max()) > 0, f"{name}: both samples got the same draw"
        # and a sample's draw follows its id, not its position in the batch
        swapped = atk(xx, yy, sample_ids=[1, 0])
        torch.testing.assert_close(swapped, adv.flip(0), rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(adv[0], adv[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_info_is_the_one_measurement(name, tiny_model, tiny_batch):
    """info holds exactly volattack.measure.perturbation_stats of (input, result), and its SSIM is
    bit for bit measure.ssim3d == metrics.ssim3d of the same pair."""
    x, y = tiny_batch
    res = make(name, tiny_model, seed=1, unit_scale=425.0).run(x, y)
    stats = measure.perturbation_stats(x, res.adv, data_range=(0.0, 1.0), unit_scale=425.0)
    assert set(stats) == {"linf", "rms", "l2", "psnr", "ssim", "linf_units", "rms_units"}
    for key, value in stats.items():
        assert res.info[key] == value.tolist(), key
    assert res.info["ssim"] == measure.ssim3d(x, res.adv, data_range=1.0).tolist()
    assert res.info["ssim"] == metrics.ssim3d(x, res.adv, data_range=1.0).tolist()
    assert metrics.ssim3d is measure.ssim3d and metrics.perturbation_stats is measure.perturbation_stats


@pytest.mark.parametrize("bad, match", [
    ([0], r"sample_ids must hold one id per sample \(2\), got 1"),
    ([0, -1], r"sample_ids must be non-negative integers, got -1"),
    ([0, 1.5], r"sample_ids must be non-negative integers, got 1.5"),
    ("ab", r"sample_ids must be a sequence of 2 non-negative integers, got 'ab'"),
])
def test_bad_sample_ids(bad, match, tiny_model, tiny_batch):
    x, y = tiny_batch
    with pytest.raises(ValueError, match=match):
        make("pgd", tiny_model).run(x, y, sample_ids=bad)


class Exploding(nn.Module):
    """Raises on the second forward, after the attack has put it in eval mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= 2:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("gn", "fgsm")])
def test_mode_restored_and_no_grads_when_the_attack_raises(name, tiny_model, tiny_batch):
    x, y = tiny_batch
    model = Exploding(tiny_model)
    model.train()
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        make(name, model, steps=3).run(x, y)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs(name, tiny_model, tiny_batch):
    x, y = tiny_batch
    atk = make(name, tiny_model)
    with pytest.raises(ValueError, match="images must be 5-D"):
        atk(x[0], y[0])
    with pytest.raises(ValueError, match="labels must have shape"):
        atk(x, y[..., :8])
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = x.clone()
        bad[0, 0, 0, 0, 0] = float("nan")
        atk(bad, y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = x.clone()
        bad[1, 0, 3, 2, 1] = float("inf")
        atk(bad, y)
    with pytest.raises(ValueError, match="inside bounds"):
        atk(x + 2.0, y)
    with pytest.raises(ValueError, match="mask must be broadcastable"):
        atk(x, y, mask=torch.ones(2, 1, 8, 8, 8))


@pytest.mark.parametrize("name", [n for n in ALL if n != "gn"])
def test_labels_outside_the_class_range(name, tiny_model, tiny_batch):
    x, y = tiny_batch
    with pytest.raises(ValueError, match="labels must be < the model's 3 output classes, got maximum 7"):
        make(name, tiny_model)(x, torch.full_like(y, 7))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("eps", [-0.1, float("nan")])
def test_bad_eps(name, tiny_model, eps):
    if "eps" not in _init_params(name):
        pytest.skip(f"{name} has no eps")
    with pytest.raises(ValueError, match="eps must be"):
        make(name, tiny_model, eps=eps)


def _init_params(name: str) -> set[str]:
    import inspect

    cls = volattack.attacks.ATTACKS.get(name)
    params: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params |= set(inspect.signature(klass.__init__).parameters)
    return params


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("gn",)])
def test_mask_confines_the_perturbation(name, tiny_model, tiny_batch):
    x, y = tiny_batch
    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[..., 4:12, 4:12, 4:12] = 1
    adv = make(name, tiny_model)(x, y, mask=mask)
    outside = (adv - x)[(mask == 0).expand_as(x)]
    assert float(outside.abs().max()) == 0.0
    assert float((adv - x).abs().max()) > 0.0
