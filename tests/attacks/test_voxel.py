"""Direction of effect and options of the voxel attacks on a tiny trained segmenter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import volattack
from volattack.attacks.objectives import hard_foreground_dice
from volattack.attacks.apgd import apgd_checkpoints


def _task(n: int, seed: int):
    """Smooth random fields; class 1 where the field is high, class 2 where very high."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, 8, generator=g)
    x = F.interpolate(x, size=(16, 16, 16), mode="trilinear", align_corners=False)
    x = (x - x.amin(dim=(2, 3, 4), keepdim=True)) / (x.amax(dim=(2, 3, 4), keepdim=True)
                                                      - x.amin(dim=(2, 3, 4), keepdim=True))
    y = (x > 0.55).long() + (x > 0.75).long()
    return x, y


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 3, 1),
    )
    x, y = _task(8, 0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(x), y[:, 0]).backward()
        opt.step()
    for p in net.parameters():
        p.grad = None
    xt, yt = _task(2, 1)
    return net.eval(), xt, yt


def _dice(model, x, y):
    with torch.no_grad():
        return hard_foreground_dice(model(x).argmax(1, keepdim=True), y, 3)


def test_the_tiny_model_learned_the_task(model_and_data):
    model, x, y = model_and_data
    assert float(_dice(model, x, y).mean()) > 0.8


@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd", "apgd", "segpgd", "cospgd", "pgd_l2"])
def test_gradient_attacks_beat_noise_at_the_same_linf(name, model_and_data):
    model, x, y = model_and_data
    eps = 8 / 255
    kw = {"eps": eps} if name != "pgd_l2" else {"eps": 1.0}
    if name not in ("fgsm",):
        kw["steps"] = 10
    res = volattack.create_attack(name, model, **kw).run(x, y)
    linf = max(res.info["linf"])
    # noise whose measured L-inf is at least the attack's (sigma * ~4 = max |N|)
    noise = volattack.create_attack("gn", model, eps=linf / 2).run(x, y)
    assert min(noise.info["linf"]) >= linf * 0.99
    clean = _dice(model, x, y)
    d_atk = _dice(model, res.adv, y)
    d_gn = _dice(model, noise.adv, y)
    assert (d_atk < d_gn).all(), (name, clean, d_atk, d_gn)
    assert (clean - d_atk > 0.1).all()


def test_apgd_at_least_as_strong_as_pgd(model_and_data):
    model, x, y = model_and_data
    from volattack.attacks.objectives import objective_per_sample

    for eps in (2 / 255, 4 / 255):
        p = volattack.create_attack("pgd", model, eps=eps, steps=10).run(x, y).adv
        a = volattack.create_attack("apgd", model, eps=eps, steps=10).run(x, y).adv
        with torch.no_grad():
            lp = objective_per_sample(model(p), y, "dice_ce")
            la = objective_per_sample(model(a), y, "dice_ce")
        assert (la >= lp - 1e-4).all(), (eps, lp, la)
        assert (_dice(model, a, y) <= _dice(model, p, y) + 0.02).all()


def test_apgd_checkpoints():
    # p: 0, .22, .22+.22-.03=.41? no: max(p1 - p0 - .03, .06) = .19 -> .41, then max(.16,.06) -> .57, ...
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_targeted_remove_organ(model_and_data):
    model, x, y = model_and_data

    def remove_class_2(labels):
        return torch.where(labels == 2, torch.zeros_like(labels), labels)

    atk = volattack.create_attack("pgd", model, eps=32 / 255, steps=20, targeted=True, target_labels=remove_class_2)
    adv = atk(x, y)
    with torch.no_grad():
        pred, pred_adv = model(x).argmax(1), model(adv).argmax(1)
    # organ 2 is (mostly) erased; the rest of the map stays close to the target
    assert (pred_adv == 2).sum() < 0.2 * (pred == 2).sum()
    target = remove_class_2(y)[:, 0]
    assert (pred_adv == target).float().mean() > (pred == target).float().mean()


def test_targeted_needs_a_target(model_and_data):
    model, x, y = model_and_data
    with pytest.raises(ValueError, match="targeted=True needs target_labels"):
        volattack.create_attack("pgd", model, targeted=True)(x, y)
    with pytest.raises(ValueError, match="target_labels must have shape"):
        volattack.create_attack("pgd", model, targeted=True, target_labels=y[:, :, :8])(x, y)
    with pytest.raises(ValueError, match="target_labels were given but targeted=False"):
        volattack.create_attack("pgd", model)(x, y, target_labels=y)


def test_restarts_keep_the_per_sample_best(model_and_data):
    """restarts=3 returns, per sample, the restart with the highest final objective; restart r
    draws from RandomStreams(seed, ids, r), restart 0 is the plain call."""
    model, x, y = model_and_data
    from volattack.attacks.base import eval_mode
    from volattack.attacks.objectives import objective_per_sample
    from volattack.attacks.streams import RandomStreams

    kw = dict(eps=2 / 255, steps=3, objective="ce")
    atk = volattack.create_attack("pgd", model, seed=0, **kw)
    with eval_mode(model):
        runs = [atk._attack(x, y, None, None, RandomStreams(0, [0, 1], r))[0] for r in range(3)]
    assert torch.equal(runs[0], atk(x, y))  # restart 0 is the plain call
    best = volattack.create_attack("pgd", model, seed=0, restarts=3, **kw).run(x, y)
    with torch.no_grad():
        losses = torch.stack([objective_per_sample(model(a), y, "ce") for a in runs])
        lb = objective_per_sample(model(best.adv), y, "ce")
    torch.testing.assert_close(lb, losses.max(0).values)
    assert best.info["restarts"] == 3
    assert best.info["restart_best"] == losses.argmax(0).tolist()
    assert len(set(map(tuple, (r.flatten().tolist()[:50] for r in runs)))) == 3  # independent draws


def test_early_stop_freezes_successful_samples(model_and_data):
    model, x, y = model_and_data
    res = volattack.create_attack("pgd", model, eps=32 / 255, alpha=8 / 255, steps=50, early_stop=0.5).run(x, y)
    assert res.info["steps_run"] < 50
    assert (_dice(model, res.adv, y) <= 0.6).all()


def test_hu_bounds(model_and_data):
    # inputs in HU with bounds (-1000, 1000): eps in HU, result inside the bounds and the ball
    model, x, y = model_and_data

    class HU(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, v):
            return self.inner((v + 175) / 425)

    xh = x * 425 - 175
    atk = volattack.create_attack("pgd", HU(model), eps=8 * 425 / 255, steps=5, bounds=(-1000.0, 1000.0))
    adv = atk(xh, y)
    assert float((adv - xh).abs().max()) <= 8 * 425 / 255 + 1e-3
    assert (_dice(model, (adv + 175) / 425, y) < _dice(model, x, y)).all()


def test_zero_budget_is_identity(model_and_data):
    model, x, y = model_and_data
    for name in ("pgd", "bim", "fgsm", "apgd", "gn"):
        assert torch.equal(volattack.create_attack(name, model, eps=0.0)(x, y), x)
    assert torch.equal(volattack.create_attack("pgd", model, steps=0, random_start=False)(x, y), x)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(steps=-1), "steps must be >= 0, got -1"),
        (dict(steps=2.5), "steps must be an integer, got 2.5"),
        (dict(alpha=-0.1), "alpha must be >= 0"),
        (dict(restarts=0), "restarts must be >= 1"),
        (dict(objective="dise"), "objective must be one of"),
        (dict(bounds=(1.0, 0.0)), "bounds must be finite with lo < hi"),
        (dict(early_stop=2.0), "early_stop must be <= 1"),
        (dict(seed=-3), "seed must be >= 0"),
    ],
)
def test_bad_parameters(kw, msg, model_and_data):
    model, _, _ = model_and_data
    with pytest.raises(ValueError, match=msg):
        volattack.create_attack("pgd", model, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_and_fp16_gradients_do_not_underflow(dtype):
    """Under fp16 autocast a mean over 64^3 voxels gives per-voxel gradients below fp16's range; the
    attack scales the loss by the voxel count so that every voxel still gets a signed step."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    m = UNet(3, 1, 3, (8, 16), (2,), num_res_units=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 64, 64, 64, generator=g)
    y = torch.randint(0, 3, (1, 1, 64, 64, 64), generator=g)
    atk = volattack.create_attack("bim", m, eps=8 / 255, alpha=1 / 255, steps=1, amp_dtype=dtype)
    adv = atk(x, y)
    assert adv.dtype == torch.float32
    moved = float(((adv - x).abs() > 0).float().mean())
    assert moved > 0.999
    if dtype == torch.float16:
        atk._grad_scale = lambda _x: 1.0  # what an unscaled mean would give
        unscaled = float(((atk(x, y) - x).abs() > 0).float().mean())
        assert unscaled < moved
