"""Options every attack accepts: restarts, early_stop and amp_dtype are honoured or rejected at
construction with the reason (a constructor error is a config-load error for the pipeline)."""

from __future__ import annotations

import pytest
import torch

import volattack
from volattack.attacks.objectives import objective_per_sample

ALL = volattack.list_attacks()
FAST = {"gn": {}, "fgsm": {}, "square": {"queries": 4}}


def make(name, model, **kw):
    return volattack.create_attack(name, model, **{**FAST.get(name, {"steps": 2}), **kw})


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("fgsm", {}, r"restarts=2 is not supported: fgsm has no random start \(random_start=False\)"),
        ("bim", {}, r"restarts=2 is not supported: bim has no random start"),
        ("pgd", {"random_start": False}, r"restarts=2 is not supported: pgd has no random start"),
        ("apgd", {}, r"restarts=2 is not supported: apgd has no random start"),
        ("vafa", {}, r"restarts=2 is not supported: vafa draws no random numbers"),
        ("gn", {}, r"restarts=2 is not supported: gn has no objective"),
        ("fft", {"random_start": False}, r"restarts=2 is not supported: fft with random_start=False"),
        ("sa2", {"rho": 0.0}, r"restarts=2 is not supported: sa2 draws no random numbers"),
    ],
)
def test_restarts_of_deterministic_attacks_are_rejected(name, kw, match, tiny_model):
    with pytest.raises(ValueError, match=match):
        make(name, tiny_model, restarts=2, **kw)


@pytest.mark.parametrize("name, match", [
    ("apgd", r"early_stop=0.5 is not supported by apgd: its step-size schedule"),
    ("gn", r"early_stop=0.5 is not supported by gn: it has no step loop"),
])
def test_early_stop_is_rejected_where_it_cannot_work(name, match, tiny_model):
    with pytest.raises(ValueError, match=match):
        make(name, tiny_model, early_stop=0.5)


@pytest.mark.parametrize("name", ALL)
def test_restarts_run_or_are_rejected_and_keep_the_per_sample_best(name, tiny_model, tiny_batch):
    """For every registered attack: restarts=3 either raises at construction (deterministic
    attack) or returns, per sample, an objective no worse than the plain call's."""
    x, y = tiny_batch
    one = make(name, tiny_model, seed=2)
    try:
        three = make(name, tiny_model, seed=2, restarts=3)
    except ValueError as e:
        assert "restarts=3 is not supported" in str(e)
        assert not one.is_random or name == "gn"
        return
    assert one.is_random
    r1, r3 = one.run(x, y), three.run(x, y)
    assert r3.info["restarts"] == 3 and len(r3.info["restart_best"]) == 2
    with torch.no_grad():
        model = tiny_model.eval()
        last = max(int(getattr(one, "steps", 1)), 1)
        l1 = one.gain(model(r1.adv), y, None, last)
        l3 = one.gain(model(r3.adv), y, None, last)
    assert bool((l3 >= l1 - 1e-6).all()), (name, l1, l3)
    # restart 0 is the plain call: where it won, the result is the plain call's
    for b, w in enumerate(r3.info["restart_best"]):
        if w == 0:
            torch.testing.assert_close(r3.adv[b], r1.adv[b], rtol=0, atol=1e-6)
    # per-sample extras come from the winning restart, and replay holds
    assert torch.equal(make(name, tiny_model, seed=2, restarts=3)(x, y), r3.adv)


@pytest.mark.parametrize("name, kw", [("vafa", {}), ("sa2", {}), ("fft", {}), ("fft", {"mode": "amplitude"})])
def test_early_stop_on_the_spectral_attacks_freezes_successful_samples(name, kw, tiny_model, tiny_batch):
    """early_stop=1 counts every sample as successful at the first step, so no parameter moves:
    the result is the steps=0 result and one step ran."""
    x, y = tiny_batch
    stopped = volattack.create_attack(name, tiny_model, steps=4, early_stop=1.0, seed=1, **kw).run(x, y)
    start = volattack.create_attack(name, tiny_model, steps=0, seed=1, **kw).run(x, y)
    assert stopped.info["steps_run"] == 1
    torch.testing.assert_close(stopped.adv, start.adv, rtol=0, atol=1e-6)
    free = volattack.create_attack(name, tiny_model, steps=4, early_stop=0.0, seed=1, **kw).run(x, y)
    assert free.info["steps_run"] == 4  # Dice <= 0 is never reached here


@pytest.mark.parametrize("value, dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                          (torch.bfloat16, torch.bfloat16), (None, None)])
def test_amp_dtype_accepts_yaml_strings(value, dtype, tiny_model, tiny_batch):
    atk = make("pgd", tiny_model, amp_dtype=value)
    assert atk.amp_dtype == dtype
    if dtype is torch.bfloat16:  # CPU autocast runs bf16
        x, y = tiny_batch
        assert atk(x, y).dtype == torch.float32


@pytest.mark.parametrize("bad", ["fp16", "float32", torch.float32, 16])
def test_amp_dtype_rejects_other_values(bad, tiny_model):
    with pytest.raises(ValueError, match=r"amp_dtype must be None, torch.float16, torch.bfloat16, 'float16' or "
                                         r"'bfloat16', got " + repr(bad).replace(".", r"\.")):
        make("vafa", tiny_model, amp_dtype=bad)


def test_apgd_restarts_with_a_random_start(tiny_model, tiny_batch):
    x, y = tiny_batch
    kw = dict(steps=4, random_start=True, seed=4)
    one = volattack.create_attack("apgd", tiny_model, **kw)(x, y)
    two = volattack.create_attack("apgd", tiny_model, restarts=2, **kw).run(x, y)
    with torch.no_grad():
        l1 = objective_per_sample(tiny_model.eval()(one), y, "dice_ce")
        l2 = objective_per_sample(tiny_model(two.adv), y, "dice_ce")
    assert bool((l2 >= l1 - 1e-6).all()) and two.info["restarts"] == 2
