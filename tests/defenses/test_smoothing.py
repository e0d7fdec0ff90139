"""Certification by randomized smoothing (SegCertify): the statistics against scipy and a
hand-computed Holm example, known outcomes of constant models, determinism, batching invariance,
bad input, certified Dice, and soundness against an EOT PGD-L2 attack of the smoothed model."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import volattack
from volattack.defenses.smoothing import (
    SmoothedModel,
    binomial_pvalues,
    certified_dice,
    certified_dice_per_class,
    certify,
    holm_reject,
    smoothed_predict,
)
from volattack.inference import make_inferer
from volattack.metrics import dice_per_class, mean_foreground_dice


def constant_model(k: int = 3, cls: int = 1) -> nn.Module:
    """Ignores its input: logit 5 for class ``cls``, 0 elsewhere, at every voxel."""
    m = nn.Conv3d(1, k, 1)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
        m.bias[cls] = 5.0
    return m


def threshold_model() -> nn.Module:
    """Two classes: foreground where the 3x3x3 mean intensity exceeds 0.5 (logit gap 20 * (mean - 0.5))."""
    m = nn.Conv3d(1, 2, 3, padding=1, padding_mode="replicate")
    with torch.no_grad():
        m.weight.zero_()
        m.weight[1] += 10.0 / 27
        m.weight[0] -= 10.0 / 27
        m.bias.copy_(torch.tensor([5.0, -5.0]))
    return m


def sphere(size: int = 12, r: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    d = (ax.view(-1, 1, 1) ** 2 + ax.view(1, -1, 1) ** 2 + ax.view(1, 1, -1) ** 2).sqrt()
    gt = (d <= r).long()[None, None]
    return 0.25 + 0.5 * gt.float(), gt


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("n,tau", [(100, 0.75), (37, 0.95), (1, 0.6)])
def test_binomial_pvalues_equal_scipy_binomtest(n, tau):
    counts = torch.tensor(sorted({0, 1, n // 3, n // 2, int(0.8 * n), n - 1, n}))
    got = binomial_pvalues(counts, n, tau)
    want = [stats.binomtest(int(k), n, tau, alternative="greater").pvalue for k in counts]
    assert got.dtype == torch.float64 and got.shape == counts.shape
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_binomial_pvalues_reject_counts_outside_the_trials():
    with pytest.raises(ValueError, match=r"counts must be in \[0, n=5\], got values in \[0, 6\]"):
        binomial_pvalues(torch.tensor([0, 6]), 5, 0.75)


def test_holm_by_hand():
    # sorted: 0.005 <= .05/4 (reject), 0.01 <= .05/3 (reject), 0.03 > .05/2: stop
    assert holm_reject(torch.tensor([0.01, 0.04, 0.03, 0.005]), 0.05).tolist() == [True, False, False, True]
    # stops at the first failure: 0.024 <= .05/2 and 0.049 <= .05/1 would pass on their own
    assert holm_reject(torch.tensor([0.001, 0.02, 0.024, 0.049]), 0.05).tolist() == [True, False, False, False]
    # every row is its own family; ties straddle no boundary
    rows = torch.tensor([[0.001, 0.001, 0.001, 0.9], [0.2, 0.3, 0.4, 0.5]])
    assert holm_reject(rows, 0.05).tolist() == [[True, True, True, False], [False] * 4]


def test_holm_decisions_equal_the_definition_on_random_pvalues():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(500, generator=g, dtype=torch.float64) ** 4
    alpha = 0.05
    order = sorted(range(len(p)), key=lambda i: float(p[i]))
    want = [False] * len(p)
    for i, j in enumerate(order):  # reference: the step-down loop itself
        if float(p[j]) > alpha / (len(p) - i):
            break
        want[j] = True
    assert holm_reject(p, alpha).tolist() == want
    assert 0 < sum(want) < len(p)


# ---------------------------------------------------------------- certify
def test_a_constant_model_certifies_every_voxel_with_enough_samples_and_abstains_with_few():
    x = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    res = certify(constant_model(), x, 0.25, 3, 100, 0.01, 0.75)  # p = 0.75^100 = 3e-13 < 0.01 / 512
    assert res.labels.shape == (2, 1, 8, 8, 8) and bool((res.labels == 1).all())
    assert res.abstain_rate == [0.0, 0.0] and res.passes == 103
    few = certify(constant_model(), x, 0.25, 3, 2, 0.01, 0.75)  # p = 0.75^2 > alpha
    assert bool((few.labels == -1).all()) and few.abstain_rate == [1.0, 1.0]


def test_radius_in_input_and_source_units_and_its_rms_equivalent():
    x = torch.rand(1, 1, 6, 6, 4)
    res = certify(constant_model(), x, 0.12, 1, 5, 0.1, 0.9, unit_scale=425.0)
    r = 0.12 * stats.norm.ppf(0.9)
    assert res.radius == pytest.approx(r, rel=1e-12)
    assert res.radius_units == pytest.approx(425 * r)
    assert res.radius_rms == pytest.approx(r / math.sqrt(144))
    assert res.radius_rms_units == pytest.approx(425 * r / 12)
    assert certify(constant_model(), x, 0.12, 1, 5, 0.1, 0.9).radius_units is None


def test_seeded_deterministic_and_independent_of_batching():
    torch.manual_seed(0)
    model = nn.Conv3d(1, 3, 3, padding=1)
    x = torch.rand(2, 1, 6, 6, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(sigma=0.5, n0=6, n=41, alpha=0.2, tau=0.55, seed=3)
    a = certify(model, x, batch=1, **kw)
    b = certify(model, x, batch=4, **kw)  # partial batches at the end of both phases
    assert torch.equal(a.labels, b.labels) and a.abstain_rate == b.abstain_rate
    assert torch.equal(certify(model, x, batch=4, **kw).labels, b.labels)
    other = certify(model, x, batch=4, **{**kw, "seed": 4})
    assert not torch.equal(other.labels, b.labels)
    assert 0 < a.abstain_rate[0] < 1  # an informative case: some voxels certified, some not


def test_certify_through_sliding_windows_and_the_models_mode_is_restored():
    model = constant_model(cls=2).train()
    x = torch.rand(1, 1, 20, 20, 16)
    res = certify(model, x, 0.25, 2, 60, 0.01, 0.75, inferer=make_inferer([16, 16, 16], 2, 0.25), batch=3,
                  num_classes=3)
    assert bool((res.labels == 2).all()) and model.training
    with pytest.raises(ValueError, match="num_classes=4 but the model returns 3 channels"):
        certify(model, x, 0.25, 2, 6, 0.01, 0.75, num_classes=4)


def test_exported_lazily_from_the_package():
    assert volattack.certify is certify


@pytest.mark.parametrize("kw,match", [
    ({"sigma": 0.0}, r"sigma must be a number > 0 \(noise std in input units\), got 0.0"),
    ({"sigma": -0.1}, r"sigma must be a number > 0 .*got -0.1"),
    ({"tau": 0.5}, r"tau must be in \(0.5, 1\), got 0.5"),
    ({"tau": 1.0}, r"tau must be in \(0.5, 1\), got 1.0"),
    ({"n0": 0}, r"n0 must be an integer >= 1, got 0"),
    ({"n": 0}, r"n must be an integer >= 1, got 0"),
    ({"alpha": 0.0}, r"alpha must be in \(0, 1\), got 0.0"),
    ({"alpha": 1.0}, r"alpha must be in \(0, 1\), got 1.0"),
    ({"batch": 0}, r"batch must be an integer >= 1, got 0"),
])
def test_bad_input_fails_before_any_inference(kw, match):
    calls = []
    model = constant_model()
    model.register_forward_hook(lambda *a: calls.append(1))
    args = {"sigma": 0.25, "n0": 2, "n": 5, "alpha": 0.01, "tau": 0.75, **kw}
    batch = args.pop("batch", 8)
    with pytest.raises(ValueError, match=match):
        certify(model, torch.rand(1, 1, 4, 4, 4), batch=batch, **args)
    assert calls == []


# ---------------------------------------------------------------- certified Dice
def test_certified_dice_counts_abstentions_as_errors():
    gt = torch.tensor([1, 1, 1, 1, 2, 2, 0, 0]).view(1, 1, 8, 1, 1)
    lab = torch.tensor([1, 1, -1, -1, 2, -1, -1, 2]).view(1, 1, 8, 1, 1)
    # miss: class 1: P={0,1}, G={0..3} -> 4/6; class 2: P={4,7}, G={4,5} -> 2/4
    assert certified_dice_per_class(lab, gt, 3)[0].tolist() == pytest.approx([4 / 6, 2 / 4])
    # worst: each abstained voxel also a false positive of every other foreground class:
    # class 1 gains voxels 5 and 6 in P -> 4/8; class 2 gains 2, 3 and 6 -> 2/7
    assert certified_dice_per_class(lab, gt, 3, "worst")[0].tolist() == pytest.approx([4 / 8, 2 / 7])
    assert certified_dice(lab, gt, 3).tolist() == pytest.approx([(4 / 6 + 2 / 4) / 2])
    # without abstentions both rules are volattack.metrics' Dice
    full = torch.where(lab < 0, gt, lab)
    for rule in ("miss", "worst"):
        assert torch.equal(certified_dice_per_class(full, gt, 3, rule), dice_per_class(full, gt, 3))
    with pytest.raises(ValueError, match="abstain must be one of miss, worst, got 'none'"):
        certified_dice(lab, gt, 3, "none")


def test_worst_rule_is_below_the_dice_of_any_labelling_of_the_abstained_voxels():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 4, (1, 1, 6, 6, 6), generator=g)
    lab = torch.where(torch.rand(gt.shape, generator=g) < 0.3, torch.full_like(gt, -1), gt)
    bound = certified_dice_per_class(lab, gt, 4, "worst")
    for _ in range(20):
        filled = torch.where(lab < 0, torch.randint(0, 4, gt.shape, generator=g), lab)
        assert bool((bound <= dice_per_class(filled, gt, 4) + 1e-6).all())


# ---------------------------------------------------------------- soundness
@pytest.mark.parametrize("sigma", [0.12, 0.25])
def test_certified_dice_is_no_higher_than_the_smoothed_models_dice_under_eot_pgd_l2(sigma):
    """The issue's soundness target, small scale: at the certified radius R an EOT PGD-L2 attack
    of the smoothed model (softmax averaged over noise draws) leaves its Dice at or above the
    certified Dice."""
    x, gt = sphere()
    model = threshold_model().eval()
    res = certify(model, x, sigma, 16, 300, 0.001, 0.75, batch=64, bounds=(0.0, 1.0))
    cert = {rule: float(certified_dice(res.labels, gt, 2, rule)[0]) for rule in ("miss", "worst")}
    assert 0.3 < cert["worst"] <= cert["miss"] < 1.0
    smoothed = SmoothedModel(model, sigma, samples=8, seed=1, bounds=(0.0, 1.0))
    atk = volattack.create_attack("pgd_l2", smoothed, eps=res.radius, steps=10, bounds=(0.0, 1.0), seed=0,
                                  measure_ssim=False)
    out = atk.run(x, gt)
    assert 0 < float((out.adv - x).flatten().norm()) <= res.radius * (1 + 1e-4)
    attacked = smoothed_predict(model, out.adv, sigma, 300, batch=100, seed=2, bounds=(0.0, 1.0))
    clean = smoothed_predict(model, x, sigma, 300, batch=100, seed=2, bounds=(0.0, 1.0))
    attacked_dice = float(mean_foreground_dice(attacked, gt, 2)[0])
    assert cert["miss"] <= attacked_dice <= float(mean_foreground_dice(clean, gt, 2)[0]) + 0.02
    # the certified voxels keep their class under the attack
    kept = res.labels >= 0
    assert torch.equal(attacked[kept], res.labels[kept])
    # the attack is not toothless: far outside the certified radius it goes below the certified Dice
    far = volattack.create_attack("pgd_l2", smoothed, eps=40 * res.radius, steps=10, bounds=(0.0, 1.0), seed=0,
                                  measure_ssim=False).run(x, gt).adv
    far_dice = float(mean_foreground_dice(smoothed_predict(model, far, sigma, 300, batch=100, seed=2,
                                                           bounds=(0.0, 1.0)), gt, 2)[0])
    assert far_dice < cert["worst"]


def test_smoothed_model_is_seeded_and_its_argmax_is_the_base_models_at_tiny_noise():
    x, _ = sphere(8, 2.5)
    model = threshold_model().eval()
    sm = SmoothedModel(model, 1e-6, samples=2, seed=5)
    assert torch.equal(sm(x).argmax(1), model(x).argmax(1))
    noisy = SmoothedModel(model, 0.3, samples=2, seed=5)
    first = noisy(x)
    noisy.reset()
    assert torch.equal(noisy(x), first)
    assert torch.equal(smoothed_predict(model, x, 1e-6, 3), model(x).argmax(1, keepdim=True))
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        SmoothedModel(model, 0.3, samples=0)
    with pytest.raises(ValueError, match=r"sigma must be a number > 0 .*got -0.3"):
        SmoothedModel(model, -0.3)
