"""SEA (Croce, Singh and Hein, ECCV 2024) made volumetric: worst case over the losses, stage radii,
lowest-Dice selection, pass count, L2, bad arguments. Batch consistency, replay, bounds and
modes are covered by the contract test (tests/attacks/test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import volattack
from volattack.attacks.objectives import hard_foreground_dice
from volattack.attacks.sea import SEA, SEA_LOSSES, _LowestDice, sea_stages
from volattack.ops import l2_norm


class Counting(nn.Module):
    """Counts forward calls of the wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def dice_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return hard_foreground_dice(logits.argmax(1, keepdim=True), y, logits.shape[1]).tolist()


def test_stages_split_the_iterations_30_30_40():
    assert sea_stages(10) == [(3, 2.0), (3, 1.5), (4, 1.0)]
    assert sea_stages(100) == [(30, 2.0), (30, 1.5), (40, 1.0)]
    assert sea_stages(7) == [(2, 2.0), (2, 1.5), (3, 1.0)]
    assert sea_stages(2) == [(0, 2.0), (0, 1.5), (2, 1.0)]
    assert sea_stages(0) == [(0, 2.0), (0, 1.5), (0, 1.0)]
    for n in range(0, 40):
        assert sum(s for s, _ in sea_stages(n)) == n and sea_stages(n)[-1][0] >= 0.4 * n


def test_sea_is_the_per_sample_minimum_of_its_single_loss_runs(tiny_model, tiny_batch):
    x, y = tiny_batch
    kw = dict(eps=8 / 255, steps=6, seed=4)
    full = volattack.create_attack("sea", tiny_model, **kw).run(x, y)
    singles = {loss: volattack.create_attack("sea", tiny_model, losses=[loss], **kw).run(x, y) for loss in SEA_LOSSES}
    for b in range(2):
        per_loss = {loss: r.info["sea_dice"][b] for loss, r in singles.items()}
        # each loss's run inside sea is exactly the run of that loss alone (its own streams)
        assert full.info["dice_by_loss"][b] == pytest.approx(per_loss, abs=0)
        assert full.info["sea_dice"][b] == min(per_loss.values())
        assert all(full.info["sea_dice"][b] <= d for d in per_loss.values())
        chosen = full.info["loss_chosen"][b]
        assert per_loss[chosen] == min(per_loss.values())
        torch.testing.assert_close(full.adv[b], singles[chosen].adv[b], rtol=0, atol=0)
    # the reported Dice is the Dice of the returned images, and it is below the clean Dice
    assert dice_of(tiny_model, full.adv, y) == pytest.approx(full.info["sea_dice"], abs=1e-6)
    clean = dice_of(tiny_model, x, y)
    assert all(a < c for a, c in zip(full.info["sea_dice"], clean)), (clean, full.info["sea_dice"])


@pytest.mark.parametrize("norm, eps", [("linf", 4 / 255), ("l2", 0.4)])
def test_stage_radii_are_honoured_and_reprojected(norm, eps, tiny_model, tiny_batch, monkeypatch):
    x, y = tiny_batch
    size = (lambda d: d.abs().flatten(1).amax(1)) if norm == "linf" else l2_norm
    calls = []
    original = SEA.apgd_loop

    def spy(self, x_, y_, target, mask, delta, *, steps, eps, gain=None, observe=None):
        seen = []

        def watch(d, logits):
            seen.append(float(size(d).max()))
            observe(d, logits)

        out = original(self, x_, y_, target, mask, delta, steps=steps, eps=eps, gain=gain, observe=watch)
        calls.append((steps, eps, float(size(delta).max()), max(seen)))
        return out

    monkeypatch.setattr(SEA, "apgd_loop", spy)
    res = volattack.create_attack("sea", tiny_model, norm=norm, eps=eps, steps=10, losses=["jsd"], seed=1).run(x, y)
    assert [(s, r) for s, r, _, _ in calls] == [(3, pytest.approx(2 * eps)), (3, pytest.approx(1.5 * eps)),
                                                 (4, pytest.approx(eps))]
    for steps, radius, start, largest in calls:
        assert start <= radius * (1 + 1e-5)  # each stage starts re-projected onto its own ball
        assert largest <= radius * (1 + 1e-5)
    # the larger balls are really used: stage 1 goes beyond 1.5 eps, stage 2 beyond eps
    assert calls[0][3] > 1.5 * eps * 1.01 and calls[1][3] > eps * 1.01
    final = res.info["linf"] if norm == "linf" else res.info["l2"]
    assert max(final) <= eps * (1 + 1e-5) and max(final) > 0.5 * eps


def test_passes_are_counted_and_match_the_model_calls(tiny_model, tiny_batch):
    x, y = tiny_batch
    model = Counting(tiny_model)
    res = volattack.create_attack("sea", model, steps=10, seed=0).run(x, y)
    # per loss: 10 forward/backward passes plus one forward of the last iterate of each of 3 stages
    assert res.info["passes"] == 4 * 13 == model.calls
    assert res.info["grad_passes"] == 40 and res.info["steps_run"] == 10
    model.calls = 0
    res = volattack.create_attack("sea", model, steps=2, losses=["masked_ce", "jsd"]).run(x, y)
    assert res.info["passes"] == 2 * 3 == model.calls  # only the last stage runs


def test_lowest_dice_tracker_keeps_the_lowest_and_the_later_of_ties():
    y = torch.tensor([[1, 1, 0, 0]]).reshape(1, 1, 4, 1, 1).repeat(2, 1, 1, 1, 1)

    def logits_predicting(pred):  # (2, 4) class maps -> confident logits
        p = torch.tensor(pred).reshape(2, 1, 4, 1, 1)
        return torch.cat([(p == 0).float(), (p == 1).float()], dim=1) * 10

    track = _LowestDice(y)
    deltas = [torch.full((2, 1, 4, 1, 1), float(k)) for k in range(3)]
    track(deltas[0], logits_predicting([[1, 1, 0, 0], [1, 1, 0, 0]]))  # Dice 1, 1
    track(deltas[1], logits_predicting([[1, 0, 0, 0], [1, 1, 1, 1]]))  # Dice 2/3, 2/3
    track(deltas[2], logits_predicting([[1, 1, 1, 0], [1, 0, 0, 0]]))  # Dice 0.8, 2/3 (tie: later wins)
    assert track.dice.tolist() == pytest.approx([2 / 3, 2 / 3])
    assert track.delta[:, 0, 0, 0, 0].tolist() == [1.0, 2.0] and track.passes == 3


def test_steps_zero_returns_the_best_random_start(tiny_model, tiny_batch):
    x, y = tiny_batch
    res = volattack.create_attack("sea", tiny_model, steps=0, eps=4 / 255, seed=2).run(x, y)
    assert res.info["passes"] == 4 and 0 < max(res.info["linf"]) <= 4 / 255 + 1e-7
    assert torch.equal(volattack.create_attack("sea", tiny_model, steps=0, random_start=False)(x, y), x)


def test_config_lists_the_losses(tiny_model):
    cfg = volattack.create_attack("sea", tiny_model, losses=["jsd", "masked_ce"], norm="l2").config()
    assert cfg["losses"] == ["jsd", "masked_ce"] and cfg["norm"] == "l2" and cfg["eps"] == 0.5


@pytest.mark.parametrize("kw, match", [
    (dict(losses=[]), r"losses must be a non-empty list of objective names, got \[\]"),
    (dict(losses="jsd"), r"losses must be a non-empty list of objective names, got 'jsd'"),
    (dict(losses=["jsd", "maskd_ce"]), r"losses must hold objective names .* got 'maskd_ce'. Did you mean 'masked_ce'"),
    (dict(losses=["jsd", "jsd"]), r"losses must not repeat a name, got \['jsd', 'jsd'\]"),
    (dict(norm="l1"), r"norm must be one of linf, l2, got 'l1'"),
    (dict(objective="ce"), r"sea takes no 'objective': it runs every loss of 'losses'"),
    (dict(alpha=0.1), r"sea takes no 'alpha'"),
    (dict(targeted=True), r"sea takes no 'targeted': its losses and its Dice selection are against the true labels"),
    (dict(steps=-1), r"steps must be >= 0, got -1"),
    (dict(early_stop=0.5), r"early_stop=0.5 is not supported by sea"),
    (dict(restarts=2, random_start=False), r"restarts=2 is not supported: sea has no random start"),
])
def test_bad_arguments(kw, match, tiny_model):
    with pytest.raises(ValueError, match=match):
        volattack.create_attack("sea", tiny_model, **kw)
