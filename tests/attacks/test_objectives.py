"""Known values of the per-sample objectives (hand-made 2x2x2 examples)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import volattack
from volattack.attacks.objectives import (
    OBJECTIVES,
    check_objective,
    class_balance_weights,
    cosine_weights,
    list_objectives,
    objective_per_sample,
    register_objective,
    segpgd_lambda,
)


def test_segpgd_lambda_schedule():
    # l_t = (t - 1) / (2T): 0 at the first step, just under 1/2 at the last
    assert segpgd_lambda(1, 10) == 0.0
    assert segpgd_lambda(2, 10) == pytest.approx(0.05)
    assert segpgd_lambda(10, 10) == pytest.approx(0.45)
    assert segpgd_lambda(20, 20) == pytest.approx(19 / 40)


def _two_class_example():
    # 2 classes on a 2x2x2 volume; logit of class 1 minus class 0 is z
    z = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0, -0.5]).reshape(1, 1, 2, 2, 2)
    logits = torch.cat([torch.zeros_like(z), z], dim=1)
    labels = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1]).reshape(1, 1, 2, 2, 2)
    return logits, labels, z.flatten(), labels.flatten()


def test_ce_and_segpgd_by_hand():
    logits, labels, z, y = _two_class_example()
    # CE_i = log(1 + exp(-z)) for y=1, log(1 + exp(z)) for y=0
    ce = torch.where(y == 1, F.softplus(-z), F.softplus(z))
    assert objective_per_sample(logits, labels, "ce").item() == pytest.approx(ce.mean().item(), rel=1e-6)
    correct = (z > 0).long() == y
    for t, T in [(1, 4), (3, 4)]:
        lam = (t - 1) / (2 * T)
        want = ((1 - lam) * ce[correct].sum() + lam * ce[~correct].sum()) / 8
        got = objective_per_sample(logits, labels, "segpgd", step=t, steps=T)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # targeted swaps the weights: voxels not yet at the target get 1 - lambda
    lam = 0.25
    want = (lam * ce[correct].sum() + (1 - lam) * ce[~correct].sum()) / 8
    got = objective_per_sample(logits, labels, "segpgd", step=3, steps=4, targeted=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_cospgd_weights_by_hand_and_detached():
    logits = torch.zeros(1, 2, 2, 2, 2)
    logits[0, 0, 0, 0, 0] = math.log(3.0)  # p = (0.75, 0.25)
    labels = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    labels[0, 0, 1, 1, 1] = 1
    w = cosine_weights(logits, labels)
    # p = (.5, .5): cos = 0.5 / sqrt(0.5) = 0.7071; p = (.75, .25), y = 0: 0.75 / sqrt(0.625)
    assert w[0, 0, 0, 0].item() == pytest.approx(0.75 / math.sqrt(0.625), rel=1e-6)
    assert w[0, 1, 1, 1].item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert w.shape == (1, 2, 2, 2)  # per voxel, not one scalar
    # the weight is detached: d loss / d logits = w * d CE / d logits / N
    lg = logits.clone().requires_grad_(True)
    objective_per_sample(lg, labels, "cospgd").sum().backward()
    lg2 = logits.clone().requires_grad_(True)
    ce = F.cross_entropy(lg2, labels[:, 0], reduction="none")
    (w * ce).mean().backward()
    torch.testing.assert_close(lg.grad, lg2.grad)
    # targeted uses 1 - cos
    t = objective_per_sample(logits, labels, "cospgd", targeted=True)
    assert t.item() == pytest.approx(((1 - w) * ce.detach()).mean().item(), rel=1e-6)


def test_dice_ce_is_dice_plus_ce_and_per_sample():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, 7, generator=g)
    labels = torch.randint(0, 4, (3, 1, 5, 6, 7), generator=g)
    dce = objective_per_sample(logits, labels, "dice_ce")
    d = objective_per_sample(logits, labels, "dice")
    c = objective_per_sample(logits, labels, "ce")
    torch.testing.assert_close(dce, d + c)
    assert dce.shape == (3,)
    for kind in ("ce", "dice", "dice_ce", "segpgd", "cospgd"):
        batch = objective_per_sample(logits, labels, kind, step=2, steps=5)
        single = torch.cat([objective_per_sample(logits[i:i + 1], labels[i:i + 1], kind, step=2, steps=5)
                            for i in range(3)])
        torch.testing.assert_close(batch, single)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6, 7), (1, 3, 9, 8)])
def test_dice_and_dice_ce_equal_monai_in_value_and_gradient(shape):
    # volattack's Dice works on boolean class masks, not MONAI's float one-hot: MONAI is the oracle.
    # Class 2 is absent from the labels (its ground sum is 0), as organs often are from a crop.
    from monai.losses import DiceCELoss, DiceLoss

    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(*shape, generator=g)).requires_grad_(True)
    labels = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], generator=g)
    labels[labels == 2] = 0
    ref_d = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")(logits, labels).flatten(1).mean(1)
    ref_dce = torch.stack([DiceCELoss(to_onehot_y=True, softmax=True)(logits[i:i + 1], labels[i:i + 1])
                           for i in range(shape[0])])
    for kind, ref in (("dice", ref_d), ("dice_ce", ref_dce)):
        ours = objective_per_sample(logits, labels, kind)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        (g_ours,) = torch.autograd.grad(ours.sum(), logits)
        (g_ref,) = torch.autograd.grad(ref.sum(), logits, retain_graph=True)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)


def test_dice_loss_by_hand():
    # perfect, confident prediction -> dice loss near 0; uniform prediction on 2 classes -> known value
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]).reshape(1, 1, 2, 2, 2)
    logits = torch.zeros(1, 2, 2, 2, 2)
    # p = 0.5 everywhere: each class: 2 * (4 * 0.5) / (8 * 0.5 + 4) = 0.5 -> loss 0.5
    assert objective_per_sample(logits, labels, "dice").item() == pytest.approx(0.5, abs=1e-5)
    sharp = torch.cat([(labels == 0).float(), (labels == 1).float()], dim=1) * 50
    assert objective_per_sample(sharp, labels, "dice").item() == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------ SEA's losses (Croce et al. 2024)

def test_masked_and_balanced_ce_by_hand():
    logits, labels, z, y = _two_class_example()
    ce = torch.where(y == 1, F.softplus(-z), F.softplus(z))
    correct = ((z > 0).long() == y).float()  # argmax of (0, z) is 1 iff z > 0 (z = 0 ties to class 0)
    assert correct.tolist() == [1, 0, 0, 1, 1, 0, 0, 0]
    got = objective_per_sample(logits, labels, "masked_ce")
    assert got.item() == pytest.approx((correct * ce).sum().item() / 8, rel=1e-6)
    # targeted: the voxels not yet at the target count instead
    got_t = objective_per_sample(logits, labels, "masked_ce", targeted=True)
    assert got_t.item() == pytest.approx(((1 - correct) * ce).sum().item() / 8, rel=1e-6)
    # labels hold 5 voxels of class 1 and 3 of class 0: w = N / (C n_c) = 8/10 and 8/6
    w = torch.where(y == 1, torch.tensor(0.8), torch.tensor(8 / 6))
    torch.testing.assert_close(class_balance_weights(labels, 2).flatten(), w)
    assert class_balance_weights(labels, 2).mean().item() == pytest.approx(1.0)
    got = objective_per_sample(logits, labels, "balanced_masked_ce")
    assert got.item() == pytest.approx((w * correct * ce).sum().item() / 8, rel=1e-6)


def test_sea_masks_are_detached():
    logits, labels, z, y = _two_class_example()
    correct = ((z > 0).long() == y).float().reshape(1, 2, 2, 2)
    lg = logits.clone().requires_grad_(True)
    objective_per_sample(lg, labels, "masked_ce").sum().backward()
    lg2 = logits.clone().requires_grad_(True)
    (correct * F.cross_entropy(lg2, labels[:, 0], reduction="none")).mean().backward()
    torch.testing.assert_close(lg.grad, lg2.grad)


def test_jsd_against_scipy():
    from scipy.spatial.distance import jensenshannon

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 2, 2, 3, generator=g) * 3
    labels = torch.randint(0, 3, (2, 1, 2, 2, 3), generator=g)
    p = logits.softmax(dim=1).permute(0, 2, 3, 4, 1).reshape(2, -1, 3).double().numpy()
    e = F.one_hot(labels[:, 0], 3).reshape(2, -1, 3).double().numpy()
    # scipy returns the square root of the divergence (natural log by default)
    want = [sum(jensenshannon(p[b, i], e[b, i]) ** 2 for i in range(12)) / 12 for b in range(2)]
    got = objective_per_sample(logits, labels, "jsd")
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    # the end points: a confident correct voxel gives 0, a confident wrong one log 2
    sure = torch.tensor([[30.0, -30.0], [-30.0, 30.0]]).T.reshape(1, 2, 2, 1, 1)
    lab = torch.zeros(1, 1, 2, 1, 1, dtype=torch.long)
    assert objective_per_sample(sure, lab, "jsd").item() == pytest.approx(math.log(2) / 2, abs=1e-6)


def test_masked_spherical_by_hand_and_scale_invariant():
    logits = torch.tensor([[3.0, 4.0], [1.0, -1.0], [0.0, 2.0], [5.0, 0.0]]).T.reshape(1, 2, 2, 2, 1)
    labels = torch.tensor([1, 0, 0, 0]).reshape(1, 1, 2, 2, 1)
    # correct voxels: 0 (4 > 3, y = 1: z_y/||z|| = 4/5), 1 (1/sqrt 2) and 3 (5/5); voxel 2 is wrong
    want = -(0.8 + 1 / math.sqrt(2) + 1.0) / 4
    assert objective_per_sample(logits, labels, "masked_spherical").item() == pytest.approx(want, rel=1e-6)
    assert objective_per_sample(7 * logits, labels, "masked_spherical").item() == pytest.approx(want, rel=1e-6)


def test_unknown_objective():
    with pytest.raises(ValueError, match="objective must be one of .* got 'dice-ce'. Did you mean 'dice_ce'"):
        check_objective("dice-ce")


# ------------------------------------------------------------------ the objective registry

def test_registry_holds_the_published_objectives():
    assert {"ce", "dice", "dice_ce", "segpgd", "cospgd"} <= set(list_objectives())
    assert {"masked_ce", "balanced_masked_ce", "jsd", "masked_spherical"} <= set(list_objectives())
    assert ", ".join(OBJECTIVES) == ", ".join(list_objectives())  # what `volattack list` prints


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 5, 6, 7, generator=g)
    labels = torch.randint(0, 4, (3, 1, 5, 6, 7), generator=g)
    return logits, labels


@pytest.mark.parametrize("kind", list_objectives())
@pytest.mark.parametrize("targeted", [False, True])
def test_objective_contract(kind, targeted):
    """Every registered objective: one finite value per sample, a batch equals its samples alone,
    finite non-zero gradients with respect to the logits."""
    logits, labels = _batch()
    lg = logits.clone().requires_grad_(True)
    out = objective_per_sample(lg, labels, kind, step=2, steps=5, targeted=targeted)
    assert out.shape == (3,) and bool(torch.isfinite(out).all())
    single = torch.cat([
        objective_per_sample(logits[i : i + 1], labels[i : i + 1], kind, step=2, steps=5, targeted=targeted)
        for i in range(3)
    ])
    torch.testing.assert_close(out.detach(), single)
    (g,) = torch.autograd.grad(out.sum(), lg)
    assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    # sample 0's value depends on sample 0's logits only
    assert float(g[1:].abs().sum()) > 0
    (g0,) = torch.autograd.grad(objective_per_sample(lg, labels, kind, step=2, steps=5)[0], lg)
    assert float(g0[1:].abs().sum()) == 0.0


def test_adding_an_objective_is_one_decorated_function(tiny_model, tiny_batch):
    @register_objective("test_background_logit")
    def background_logit(logits, labels, *, step, steps, targeted):
        return logits[:, 0].flatten(1).mean(dim=1)

    try:
        assert "test_background_logit" in list_objectives()
        x, y = tiny_batch
        atk = volattack.create_attack("pgd", tiny_model, steps=2, objective="test_background_logit")
        adv = atk(x, y)
        with torch.no_grad():
            tiny_model.eval()
            assert bool((background_logit(tiny_model(adv), y, step=1, steps=1, targeted=False)
                         > background_logit(tiny_model(x), y, step=1, steps=1, targeted=False)).all())
        with pytest.raises(ValueError, match="objective 'test_background_logit' is already registered"):
            register_objective("test_background_logit")(lambda *a, **k: None)
    finally:
        OBJECTIVES._items.pop("test_background_logit")


def test_unknown_objective_suggests_a_name():
    with pytest.raises(ValueError, match=r"objective must be one of balanced_masked_ce, ce, cospgd, .* "
                                         r"got 'segpdg'. Did you mean 'segpgd'"):
        objective_per_sample(*_batch(), "segpdg")
    with pytest.raises(ValueError, match="objective must be one of"):
        volattack.create_attack("sa2", torch.nn.Conv3d(1, 2, 1), objective="dicee")
