"""Square attack (Andriushchenko et al., ECCV 2020) for volumes: the p schedule, budget and bounds,
monotone Dice in the queries, no gradients, seeded replay, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import volattack
from volattack.attacks.objectives import hard_foreground_dice
from volattack.attacks.square import square_p, square_side


class Pointwise(nn.Module):
    """Two classes decided voxel by voxel: foreground logit ``k (x - 0.5)``, background its negative."""

    def __init__(self, k: float = 10.0) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))
        self.calls = 0
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        f = self.k * (x - 0.5)
        return torch.cat([-f, f], dim=1)


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("no gradients allowed")


class NoBackward(Pointwise):
    def forward(self, x):
        return super().forward(_NoBackward.apply(x))


def blob(size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    inside = ((zz - size / 2) ** 2 + (yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt() < size / 3
    img = 0.47 + 0.06 * inside.float() + 0.02 * torch.randn(2, size, size, size, generator=g)
    return img.clamp(0, 1)[:, None], inside.long().expand(2, -1, -1, -1)[:, None].contiguous()


def dice(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    with torch.no_grad():
        return hard_foreground_dice(model(x).argmax(1, keepdim=True), y, 2).tolist()


def test_p_schedule_and_side():
    # halvings after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10 000 run
    assert [square_p(q, 0.8, 10000) for q in (0, 10, 11, 50, 51, 201, 8001)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.1,
                                                                                 0.8 / 512]
    assert square_p(60, 0.8, 1000) == 0.05  # rescaled: it = 600
    assert square_p(5, 0.8, 100) == 0.8 / 8  # it = 500 -> after 10, 50, 200
    # side: round((p N)^(1/3)), at least 1, at most the smallest side - 1
    assert square_side(0.05, (20, 20, 20)) == 7  # (400)^(1/3) = 7.37
    assert square_side(1.0, (16, 16, 8)) == 7
    assert square_side(1e-6, (16, 16, 16)) == 1


def test_budget_bounds_queries_and_no_gradients():
    x, y = blob()
    model = Pointwise()
    res = volattack.create_attack("square", model, eps=8 / 255, queries=30, seed=1).run(x, y)
    assert res.info["queries"] == 30 and model.calls == 30
    assert not any(model.grad_enabled)
    assert max(res.info["linf"]) == pytest.approx(8 / 255, rel=1e-5)
    assert float(res.adv.min()) >= 0 and float(res.adv.max()) <= 1
    # a model whose backward raises works: the attack only queries it
    res2 = volattack.create_attack("square", NoBackward(), eps=8 / 255, queries=30, seed=1).run(x, y)
    torch.testing.assert_close(res2.adv, res.adv, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["dice", "margin"])
def test_loss_improves_with_the_queries(loss):
    x, y = blob()
    model = Pointwise()
    clean = dice(model, x, y)
    kw = dict(eps=8 / 255, loss=loss, seed=3, schedule_queries=60)
    runs = {q: volattack.create_attack("square", model, queries=q, **kw).run(x, y) for q in (1, 10, 30, 60)}
    losses = [runs[q].info["square_loss"] for q in (1, 10, 30, 60)]
    for a, b in zip(losses, losses[1:]):  # the search loss never gets worse
        assert all(lb >= la for la, lb in zip(a, b)), losses
    assert all(acc > 0 for acc in runs[60].info["accepted"])
    if loss == "dice":  # 1 - Dice is the loss: Dice is non-increasing in the queries
        ds = [dice(model, runs[q].adv, y) for q in (1, 10, 30, 60)]
        for a, b in zip(ds, ds[1:]):
            assert all(db <= da for da, db in zip(a, b)), ds
        assert all(d < c for d, c in zip(ds[-1], clean)), (clean, ds)


def test_seeded_replay_and_seed_dependence():
    x, y = blob()
    model = Pointwise()
    a = volattack.create_attack("square", model, queries=12, seed=5)(x, y)
    assert torch.equal(a, volattack.create_attack("square", model, queries=12, seed=5)(x, y))
    assert not torch.equal(a, volattack.create_attack("square", model, queries=12, seed=6)(x, y))


@pytest.mark.parametrize("kw, match", [
    (dict(queries=0), "queries must be >= 1, got 0"),
    (dict(queries=2.5), "queries must be an integer"),
    (dict(p_init=0.0), "p_init must be > 0"),
    (dict(p_init=1.5), "p_init must be <= 1"),
    (dict(loss="ce"), "loss must be one of margin, dice, got 'ce'"),
    (dict(schedule_queries=0), "schedule_queries must be >= 1"),
    (dict(targeted=True), "square takes no 'targeted'"),
    (dict(early_stop=0.5), "early_stop=0.5 is not supported by square: its queries are a fixed budget"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        volattack.create_attack("square", Pointwise(), **kw)
