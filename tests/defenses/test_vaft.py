"""VAFT frequency-consistency loss and training objective: hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from volattack.defenses.vaft import VAFTLoss, frequency_consistency_loss, logits_dct, vaft_objective

SQRT8 = math.sqrt(8.0)


def test_constant_difference_gives_dc_only_paper_form() -> None:
    clean = torch.zeros(1, 1, 2, 2, 2)
    for c in (2.0, -0.75):
        adv = clean + c
        # the orthonormal DC coefficient of 8 equal values c is 8c / sqrt(8) = c sqrt(8); the rest is 0
        assert frequency_consistency_loss(clean, adv).item() == pytest.approx(abs(c) * SQRT8, rel=1e-6)


def test_single_voxel_difference_by_hand() -> None:
    # a delta d at voxel (0,0,0): the 2-point DCT rows are (1, 1)/sqrt2 and (1, -1)/sqrt2, so every one of the
    # 8 coefficients is +-d / (2 sqrt2) and the L1 sum is 8 |d| / (2 sqrt2) = |d| sqrt8 (the spatial L1 is |d|)
    clean = torch.zeros(1, 1, 2, 2, 2)
    adv = clean.clone()
    adv[0, 0, 0, 0, 0] = 3.0
    coeffs = logits_dct(adv - clean)
    assert torch.allclose(coeffs.abs(), torch.full_like(coeffs, 3.0 / (2 * math.sqrt(2.0))), atol=1e-6)
    assert frequency_consistency_loss(clean, adv).item() == pytest.approx(3.0 * SQRT8, rel=1e-6)


def test_sum_over_channels_and_per_sample_reduction() -> None:
    clean = torch.zeros(2, 2, 2, 2, 2)
    adv = clean.clone()
    adv[0, 0] += 1.0
    adv[0, 1] -= 2.0  # sample 0: (1 + 2) sqrt8
    adv[1, 1] += 0.5  # sample 1: 0.5 sqrt8
    per = frequency_consistency_loss(clean, adv, reduction="none")
    assert per.shape == (2,)
    assert torch.allclose(per, torch.tensor([3.0 * SQRT8, 0.5 * SQRT8]), rtol=1e-6)
    assert frequency_consistency_loss(clean, adv).item() == pytest.approx(3.5 * SQRT8 / 2, rel=1e-6)
    assert frequency_consistency_loss(clean, adv, reduction="sum").item() == pytest.approx(3.5 * SQRT8, rel=1e-6)
    # l1="mean": divided by the K * H * W * D = 16 coefficients of a sample
    mean_form = frequency_consistency_loss(clean, adv, reduction="none", l1="mean")
    assert torch.allclose(mean_form, per / 16, rtol=1e-6)


def test_normalized_form_per_sample() -> None:
    clean = torch.stack([torch.full((1, 2, 2, 2), 4.0), torch.full((1, 2, 2, 2), -2.0)])
    adv = clean + torch.tensor([1.0, 1.0]).view(2, 1, 1, 1, 1)
    # sum |D(clean)| = |a| sqrt8 per sample, so L_fr = |c| sqrt8 / (|a| sqrt8) = |c| / |a|
    per = frequency_consistency_loss(clean, adv, normalized=True, reduction="none")
    assert torch.allclose(per, torch.tensor([1.0 / 4.0, 1.0 / 2.0]), rtol=1e-6)


def test_blockwise_differs_from_whole_volume_by_hand() -> None:
    clean = torch.zeros(1, 1, 4, 4, 4)
    adv = clean + 1.0
    # whole volume: DC = 64 / sqrt(64) = 8; eight 2^3 blocks: each DC = sqrt8, total 8 sqrt8
    assert frequency_consistency_loss(clean, adv).item() == pytest.approx(8.0, rel=1e-6)
    assert frequency_consistency_loss(clean, adv, block_size=2).item() == pytest.approx(8 * SQRT8, rel=1e-6)


def test_zero_when_equal_and_gradients_reach_both() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 3, 4, 4, 4, generator=g, requires_grad=True)
    assert frequency_consistency_loss(clean, clean.detach().clone()).item() == 0.0
    assert frequency_consistency_loss(clean, clean.detach().clone(), normalized=True, block_size=2).item() == 0.0
    adv = (clean.detach() + 0.1 * torch.randn(2, 3, 4, 4, 4, generator=g)).requires_grad_(True)
    for normalized in (False, True):
        loss = frequency_consistency_loss(clean, adv, normalized=normalized, block_size=2)
        gc, ga = torch.autograd.grad(loss, (clean, adv))
        assert float(ga.abs().sum()) > 0 and float(gc.abs().sum()) > 0
        if not normalized:  # depends on the difference only
            assert torch.allclose(gc, -ga)


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(1, 2, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(1, 2, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: frequency_consistency_loss(a, b, normalized=True), (clean, adv))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction": "avg"}, "reduction"),
        ({"l1": "max"}, "l1"),
        ({"block_size": 0}, "block_size"),
        ({"normalized": 1}, "normalized"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    a = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match=match):
        frequency_consistency_loss(a, a, **kwargs)


def test_bad_shapes_raise() -> None:
    a = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="logits_adv must have the shape"):
        frequency_consistency_loss(a, torch.zeros(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="logits_clean must be 5-D"):
        frequency_consistency_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="logits_adv must be floating"):
        frequency_consistency_loss(a, torch.zeros(1, 1, 2, 2, 2, dtype=torch.long))


def _logits_and_labels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(2, 3, 4, 4, 4, generator=g)
    adv = clean + 0.5 * torch.randn(2, 3, 4, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g)
    return clean, adv, labels


@pytest.mark.parametrize("seg_loss, ref", [("dice", DiceLoss), ("dice_ce", DiceCELoss)])
def test_vaft_loss_terms_and_weights(seg_loss: str, ref: type) -> None:
    clean, adv, labels = _logits_and_labels()
    ref_loss = ref(to_onehot_y=True, softmax=True)
    s_clean = float(ref_loss(clean, labels))
    s_adv = float(ref_loss(adv, labels))
    fr = float(frequency_consistency_loss(clean, adv, normalized=True))
    total, terms = VAFTLoss(2.0, 3.0, 0.5, normalized=True, seg_loss=seg_loss)(clean, adv, labels)
    assert terms["seg_clean"] == pytest.approx(s_clean, rel=1e-5)
    assert terms["seg_adv"] == pytest.approx(s_adv, rel=1e-5)
    assert terms["fr"] == pytest.approx(fr, rel=1e-5)
    assert total.item() == pytest.approx(2 * s_clean + 3 * s_adv + 0.5 * fr, rel=1e-5)
    assert terms["total"] == pytest.approx(total.item(), rel=1e-6)
    assert all(isinstance(v, float) for v in terms.values())


def test_vaft_loss_defaults_are_paper_form_and_differentiable() -> None:
    clean, adv, labels = _logits_and_labels()
    clean.requires_grad_(True)
    adv.requires_grad_(True)
    total, terms = VAFTLoss()(clean, adv, labels)
    assert terms["fr"] == pytest.approx(float(frequency_consistency_loss(clean.detach(), adv.detach())), rel=1e-6)
    gc, ga = torch.autograd.grad(total, (clean, adv))
    assert float(gc.abs().sum()) > 0 and float(ga.abs().sum()) > 0
    # identical logits: L_fr vanishes and the two segmentation terms are equal
    _, same = VAFTLoss()(clean.detach(), clean.detach(), labels)
    assert same["fr"] == 0.0 and same["seg_clean"] == same["seg_adv"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dice_weight": -1.0}, "dice_weight"),
        ({"adv_weight": float("nan")}, "adv_weight"),
        ({"fr_weight": "1"}, "fr_weight"),
        ({"seg_loss": "dicece"}, "seg_loss.*Did you mean 'dice_ce'"),
        ({"normalized": "yes"}, "normalized"),
        ({"block_size": -2}, "block_size"),
    ],
)
def test_vaft_loss_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VAFTLoss(**kwargs)


def test_vaft_loss_bad_labels() -> None:
    clean, adv, _ = _logits_and_labels()
    with pytest.raises(ValueError, match="labels must have shape"):
        VAFTLoss()(clean, adv, torch.zeros(2, 1, 4, 4, 3, dtype=torch.long))


def test_vaft_objective_runs_model_on_both(tiny_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 8, 8, 8, generator=g)
    labels = torch.randint(0, 3, (1, 1, 8, 8, 8), generator=g)
    tiny_model.eval()
    loss = VAFTLoss(normalized=True)
    total, terms = vaft_objective(tiny_model, loss, x, x.clone(), labels)
    assert terms["fr"] == 0.0  # same input, eval mode: identical logits
    adv = (x + 0.1 * torch.rand(1, 1, 8, 8, 8, generator=g)).clamp(0, 1)
    total, terms = vaft_objective(tiny_model, loss, x, adv, labels)
    assert terms["fr"] > 0
    total.backward()
    assert all(p.grad is not None for p in tiny_model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="adv_images must be a tensor with the shape"):
        vaft_objective(tiny_model, loss, x, adv[..., :4], labels)
    with pytest.raises(ValueError, match="loss must be a VAFTLoss"):
        vaft_objective(tiny_model, torch.nn.MSELoss(), x, adv, labels)
