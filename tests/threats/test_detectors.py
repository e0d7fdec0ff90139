"""Detectors of adversarial volumes and the adaptive attack against them: metrics by hand, the
common interface of every registered detector, bad input, and the attack contract of the
adaptive attack (budget, bounds, input untouched, modes restored, seeded replay)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, rankdata
from torch import nn

from volattack.inference.sliding import full_graph_inferer
from volattack.threats.adaptive_detect import adaptive_attack, detector_objective, score_target
from volattack.threats.detectors import (MIN_ATTACKED, MIN_CLEAN, WholeVolume, auroc, create_detector,
                                         fpr_threshold, list_detectors, tpr_at_fpr)

PARAMS = {"uncertainty": {}, "spectral": {"bands": 4}, "mahalanobis": {"layer": "net.0"}, "cnn": {"epochs": 2}}


def smooth_volumes(n: int, seed: int, size: int = 16) -> list[torch.Tensor]:
    """Smooth random volumes in [0.2, 0.8] (low-frequency content only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.rand(1, 1, 4, 4, 4, generator=g)
        v = nn.functional.interpolate(v, size=(size,) * 3, mode="trilinear", align_corners=True)
        out.append(0.2 + 0.6 * v)
    return out


def checkerboard(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``v`` plus a +-eps 3D checkerboard (all its energy at the highest DCT frequency)."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in v.shape[2:]], indexing="ij")).sum(0)
    return (v + eps * (1 - 2 * (idx % 2)).float()).clamp(0, 1)


@pytest.fixture
def data(tiny_model):
    clean = smooth_volumes(8, 0)
    adv = [checkerboard(v, 0.03) for v in clean]
    return WholeVolume(tiny_model), clean, adv


# --------------------------------------------------------------------------- metrics
def test_auroc_by_hand_and_by_ranks():
    clean, adv = [0.1, 0.4, 0.35, 0.8], [0.9, 0.4, 0.7]
    # pairs: 0.9 beats 4; 0.4 beats 0.1, 0.35 and ties 0.4 (2.5); 0.7 beats 3  -> 9.5 / 12
    assert auroc(clean, adv) == pytest.approx(9.5 / 12)
    ranks = rankdata(clean + adv)  # average ranks for ties
    r_adv = ranks[len(clean):].sum()
    by_ranks = (r_adv - len(adv) * (len(adv) + 1) / 2) / (len(adv) * len(clean))
    assert auroc(clean, adv) == pytest.approx(by_ranks)
    u = mannwhitneyu(adv, clean).statistic
    assert auroc(clean, adv) == pytest.approx(u / (len(adv) * len(clean)))


def test_separable_scores_give_auroc_one_and_swapped_zero():
    assert auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0
    assert auroc([3.0, 4.0], [0.0, 1.0, 2.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5


def test_threshold_and_tpr_at_5_percent_fpr_by_hand():
    clean = list(range(20))  # 0 .. 19: one false positive allowed -> threshold = 18
    assert fpr_threshold(clean, 0.05) == 18
    assert tpr_at_fpr(clean, [18.5, 19.5, 25.0, 10.0], 0.05) == 0.75
    assert fpr_threshold(list(range(10)), 0.05) == 9  # floor(0.5) = 0 false positives allowed
    with pytest.raises(ValueError, match="fpr must be"):
        fpr_threshold(clean, 1.0)
    with pytest.raises(ValueError, match="clean must be a non-empty"):
        auroc([], [1.0])


# ------------------------------------------------------------------- the interface
def test_registry_names_and_unknown_name_suggests():
    assert set(list_detectors()) >= {"uncertainty", "spectral", "mahalanobis", "cnn"}
    with pytest.raises(ValueError, match="Did you mean 'spectral'"):
        create_detector("spectrl")


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_detector_fits_scores_per_sample_and_is_differentiable(name, data):
    model, clean, adv = data
    det = create_detector(name, **PARAMS[name]).fit(clean, adv, model)
    fit_scores = det.score(torch.cat(clean), model).detach()
    assert fit_scores.shape == (8,)
    # standardised by the clean fitting scores; the threshold is their 5%-FPR level
    assert float(fit_scores.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(fit_scores.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert det.threshold == pytest.approx(fpr_threshold(fit_scores, 0.05), abs=1e-5)
    assert float((fit_scores > det.threshold + 1e-5).float().mean()) <= 0.05
    # a batch scores as its samples alone
    both = det.score(torch.cat(adv[:2]), model)
    alone = torch.cat([det.score(adv[0], model), det.score(adv[1], model)])
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)
    # differentiable in x
    x = adv[0].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(det.score(x, model).sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0


def test_spectral_separates_a_high_frequency_perturbation(data):
    model, clean, adv = data
    det = create_detector("spectral", bands=4).fit(clean, None, model)  # clean only: gaussian head
    test = smooth_volumes(6, 5)
    c = det.score(torch.cat(test), model)
    a = det.score(torch.cat([checkerboard(v, 0.03) for v in test]), model)
    assert auroc(c, a) == 1.0 and tpr_at_fpr(c, a) == 1.0


def test_uncertainty_features_are_mean_and_quantiles_of_entropy_and_margin(tiny_model):
    det = create_detector("uncertainty", quantiles=(0.5,))
    logits = torch.zeros(1, 3, 2, 1, 1)
    logits[0, 1, 0] = 10.0  # voxel 0: class 1 (foreground), nearly certain
    logits[0, 2, 1] = 1.0   # voxel 1: class 2 (foreground), p = (e^0, e^0, e^1) / sum
    f = det.features(torch.zeros(1, 1, 2, 1, 1), tiny_model, logits)
    p1 = torch.softmax(logits[0, :, 1, 0, 0], 0)
    h1 = float(-(p1 * p1.log()).sum())
    p0 = torch.softmax(logits[0, :, 0, 0, 0], 0)
    h0 = float(-(p0 * p0.log()).sum())
    m0, m1 = float(p0[1] - p0[0]), float(p1[2] - p1[0])
    assert f.shape == (1, 4)
    torch.testing.assert_close(f[0], torch.tensor([(h0 + h1) / 2, (h0 + h1) / 2, (m0 + m1) / 2, (m0 + m1) / 2]))


@pytest.mark.parametrize("n_true", [1, 2, 7, 40])
def test_masked_quantile_equals_torch_quantile_of_the_selection(n_true):
    from volattack.threats.detector_kinds import masked_quantile

    g = torch.Generator().manual_seed(n_true)
    v = torch.randn(40, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[torch.randperm(40, generator=g)[:n_true]] = True
    q = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    ours, ref = masked_quantile(v, mask, q), torch.quantile(v[mask], q)
    torch.testing.assert_close(ours, ref)
    w = torch.arange(1.0, 7.0, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), v)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), v)
    torch.testing.assert_close(g_ours, g_ref)


def test_uncertainty_without_foreground_uses_every_voxel(tiny_model):
    det = create_detector("uncertainty", quantiles=(0.0, 1.0))
    logits = torch.zeros(1, 3, 3, 1, 1)
    logits[0, 0] = torch.tensor([5.0, 2.0, 1.0]).view(3, 1, 1)  # background everywhere
    f = det.features(torch.zeros(1, 1, 3, 1, 1), tiny_model, logits)[0]
    p = torch.softmax(logits[0, :, :, 0, 0], 0)
    h = -(p * p.log()).sum(0)
    m = p[0] - p[1]
    torch.testing.assert_close(f, torch.stack([h.mean(), h.min(), h.max(), m.mean(), m.min(), m.max()]))


def test_mahalanobis_class_mode_through_a_sliding_window_keeps_gradients(data):
    _, clean, adv = data
    net = data[0].network
    model = WholeVolume(net, full_graph_inferer((8, 8, 8), 2, 0.25))
    det = create_detector("mahalanobis", layer="net.2", mode="class").fit(clean, None, model)
    x = adv[0].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(det.score(x, model).sum(), x)
    assert float(g.abs().sum()) > 0


def test_cnn_is_seeded(data):
    model, clean, adv = data
    a = create_detector("cnn", epochs=2, seed=4).fit(clean, adv, model).score(torch.cat(adv), model)
    b = create_detector("cnn", epochs=2, seed=4).fit(clean, adv, model).score(torch.cat(adv), model)
    c = create_detector("cnn", epochs=2, seed=5).fit(clean, adv, model).score(torch.cat(adv), model)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------ bad input
def test_unknown_layer_lists_the_layer_names(data):
    model, clean, _ = data
    with pytest.raises(ValueError, match=r"layer 'net.9' is not a module.*Layer names: net, net\.0, net\.1"):
        create_detector("mahalanobis", layer="net.9").fit(clean, None, model)
    with pytest.raises(ValueError, match="layer must name a module"):
        create_detector("mahalanobis")


def test_too_few_cases_state_the_minimum(data):
    model, clean, adv = data
    with pytest.raises(ValueError, match=f"at least {MIN_CLEAN} clean volumes to fit, got 3"):
        create_detector("spectral").fit(clean[:3], None, model)
    with pytest.raises(ValueError, match=f"at least {MIN_ATTACKED} attacked volumes to fit, got 0"):
        create_detector("cnn").fit(clean, None, model)
    with pytest.raises(ValueError, match=f"no attacked volumes or at least {MIN_ATTACKED}, got 2"):
        create_detector("uncertainty").fit(clean, adv[:2], model)


def test_bad_parameters_and_unfitted_use(data):
    model, clean, _ = data
    with pytest.raises(ValueError, match="bands must be <= 21"):
        create_detector("spectral", block_size=8, bands=22)
    with pytest.raises(ValueError, match="head must be one of"):
        create_detector("uncertainty", head="svm")
    with pytest.raises(ValueError, match="head='logistic' needs attacked volumes"):
        create_detector("spectral", head="logistic").fit(clean, None, model)
    with pytest.raises(RuntimeError, match="not fitted"):
        create_detector("spectral").score(clean[0], model)
    with pytest.raises(ValueError, match=r"clean\[0\] must be a floating tensor"):
        create_detector("spectral").fit([torch.zeros(4, dtype=torch.long)] * 5, None, model)


# ------------------------------------------------------------------ adaptive attack
@pytest.fixture
def fitted(data):
    model, clean, adv = data
    return model, create_detector("spectral", bands=4).fit(clean, adv, model), clean


def test_adaptive_attack_keeps_the_attack_contract(fitted, tiny_model):
    model, det, clean = fitted
    x = torch.cat(clean[:2])
    y = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(2))
    x0, y0 = x.clone(), y.clone()
    tiny_model.train()
    modes = [m.training for m in tiny_model.modules()]
    res = adaptive_attack("pgd", model, det, 2.0, eps=4 / 255, steps=3, seed=3).run(x, y)
    assert res.adv.shape == x.shape and not res.adv.requires_grad
    assert float((res.adv - x).abs().max()) <= 4 / 255 + 1e-6 and max(res.info["linf"]) <= 4 / 255 + 1e-6
    assert float(res.adv.min()) >= 0 and float(res.adv.max()) <= 1
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [m.training for m in tiny_model.modules()] == modes
    assert all(p.grad is None for p in tiny_model.parameters())
    assert res.info["seed"] == 3
    again = adaptive_attack("pgd", model, det, 2.0, eps=4 / 255, steps=3, seed=3).run(x, y)
    assert torch.equal(res.adv, again.adv)
    # a batch equals its samples attacked alone with their ids
    a0 = adaptive_attack("pgd", model, det, 2.0, eps=4 / 255, steps=3, seed=3).run(x[:1], y[:1], sample_ids=[0])
    torch.testing.assert_close(a0.adv, res.adv[:1], rtol=0, atol=1e-6)


def test_adaptive_attack_lowers_the_score_that_the_plain_attack_raises(fitted):
    model, det, clean = fitted
    x = torch.cat(clean[:4])
    y = torch.zeros(4, 1, 16, 16, 16, dtype=torch.long)
    kw = dict(eps=8 / 255, steps=5, seed=0)
    plain = adaptive_attack("pgd", model, det, 0.0, **kw).run(x, y).adv  # weight 0: the plain attack's steps
    adaptive = adaptive_attack("pgd", model, det, 50.0, target=score_target(det, 0.5), **kw).run(x, y).adv
    s_plain, s_adapt = det.score(plain, model), det.score(adaptive, model)
    assert float(s_adapt.mean()) < float(s_plain.mean())


def test_cnn_detector_nets_follow_the_attack_mode(data):
    model, clean, adv = data
    det = create_detector("cnn", epochs=1).fit(clean, adv, model)
    det.net.train()
    adaptive_attack("fgsm", model, det, 1.0, eps=4 / 255).run(clean[0], torch.zeros(1, 1, 16, 16, 16, dtype=torch.long))
    assert det.net.training  # restored


def test_detector_objective_needs_a_detector_aware_model(tiny_model, tiny_batch):
    import volattack

    name = detector_objective("ce")
    assert name == "ce+detector" and detector_objective(name) == name
    x, y = tiny_batch
    with pytest.raises(ValueError, match="needs the logits of a DetectorAware model"):
        volattack.create_attack("pgd", tiny_model, objective=name, steps=1).run(x, y)
    with pytest.raises(ValueError, match="objective must be one of.*Did you mean 'dice_ce'"):
        detector_objective("dice_cee")


def test_adaptive_attack_rejects_an_inferer_and_an_unfitted_detector(fitted):
    model, det, _ = fitted
    with pytest.raises(ValueError, match="inferer must be None"):
        adaptive_attack("pgd", model, det, 1.0, inferer=lambda x, m: m(x))
    with pytest.raises(RuntimeError, match="not fitted"):
        adaptive_attack("pgd", model, create_detector("spectral"), 1.0)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        adaptive_attack("pgd", model, det, -1.0)
    with pytest.raises(ValueError, match="quantile must be <= 1"):
        score_target(det, 1.5)
    assert score_target(det) == det.threshold
    assert score_target(det, 0.5) == pytest.approx(float(np.median(det.fit_info["clean_scores"])))
