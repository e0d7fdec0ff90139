"""Input-transform defences, BPDA and EOT: effects by hand, gradients, seeding, bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import volattack
from volattack.attacks.spectral import block_merge, block_split, dct3, idct3
from volattack.defenses.input_transforms import (
    AdaptiveModel,
    DCTLowPass,
    DCTQuantization,
    DefendedModel,
    EOTModel,
    GaussianSmoothing,
    MedianFilter,
    RandomNoise,
    adaptive_wrapper,
)


class Square(nn.Module):
    """A nonlinear 'model' so that averaging over draws is not the same as averaging the inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ median
def test_median_removes_single_spike() -> None:
    x = torch.full((1, 1, 5, 5, 5), 0.25)
    x[0, 0, 2, 2, 2] = 1.0
    assert torch.equal(MedianFilter(3)(x), torch.full_like(x, 0.25))


def test_median_matches_scipy_with_nearest_borders() -> None:
    x = _rand(2, 2, 7, 6, 5)
    out = MedianFilter(3)(x)
    ref = np.stack([np.stack([ndimage.median_filter(c, size=3, mode="nearest") for c in s]) for s in x.numpy()])
    np.testing.assert_allclose(out.numpy(), ref, atol=0)
    assert torch.equal(MedianFilter(1)(x), x)


# ---------------------------------------------------------------------------- gaussian
def test_gaussian_preserves_constant_volume_and_zero_sigma_is_identity() -> None:
    x = torch.full((2, 1, 8, 8, 8), 3.0)
    assert torch.allclose(GaussianSmoothing(1.5)(x), x, atol=1e-6)
    y = _rand(1, 1, 8, 8, 8)
    assert torch.equal(GaussianSmoothing(0.0)(y), y)


def test_gaussian_impulse_response_by_hand() -> None:
    x = torch.zeros(1, 1, 11, 11, 11)
    x[0, 0, 5, 5, 5] = 1.0
    out = GaussianSmoothing(1.0)(x)
    # erf kernel truncated at 4 sigma and normalised: k0 = erf(0.5/sqrt2) / erf(4.5/sqrt2)
    k0 = math.erf(0.5 / math.sqrt(2)) / math.erf(4.5 / math.sqrt(2))
    assert out[0, 0, 5, 5, 5].item() == pytest.approx(k0**3, rel=1e-5)
    assert out.sum().item() == pytest.approx(1.0, rel=1e-5)  # mass preserved away from borders
    assert torch.allclose(out, out.flip(2)) and torch.allclose(out, out.transpose(2, 4))
    # per-axis sigma: 0 on the last axis smooths only the first two
    out2 = GaussianSmoothing((1.0, 1.0, 0.0))(x)
    assert torch.count_nonzero(out2[0, 0, :, :, 4]) == 0


# ------------------------------------------------------------------------------- DCT
def test_dct_lowpass_keep_all_is_identity() -> None:
    x = _rand(2, 2, 8, 8, 8)
    for t in (DCTLowPass(4), DCTLowPass(4, keep="all"), DCTLowPass(4, keep=9), DCTLowPass(None)):
        assert torch.allclose(t(x), x, atol=1e-6)


def test_dct_lowpass_keep_zero_gives_block_means() -> None:
    x = _rand(1, 1, 8, 8, 8, seed=1)
    means = torch.nn.functional.avg_pool3d(x, 4)
    expected = means.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    assert torch.allclose(DCTLowPass(4, keep=0)(x), expected, atol=1e-6)


def test_dct_lowpass_zeroes_exactly_the_high_index_sums() -> None:
    x = _rand(1, 1, 8, 8, 8, seed=2)
    c = dct3(block_split(DCTLowPass(4, keep=2)(x), 4))
    r = torch.arange(4)
    s = r.view(-1, 1, 1) + r.view(1, -1, 1) + r.view(1, 1, -1)
    assert c[..., s > 2].abs().max() < 1e-6
    assert torch.allclose(c[..., s <= 2], dct3(block_split(x, 4))[..., s <= 2], atol=1e-6)


def _from_coeffs(coeffs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return block_merge(idct3(coeffs), shape)


def test_dct_quantization_flat_unit_table_keeps_integer_dct_inputs() -> None:
    g = torch.Generator().manual_seed(3)
    coeffs = torch.randint(-5, 6, (1, 1, 2, 2, 2, 4, 4, 4), generator=g).float()
    x = _from_coeffs(coeffs, (1, 1, 8, 8, 8))
    out = DCTQuantization(4, q=1.0, growth=0.0, intensity_scale=1.0)(x)
    assert torch.allclose(out, x, atol=1e-5)


def test_dct_quantization_growing_table_by_hand() -> None:
    t = DCTQuantization(4, q=2.5, growth=0.5)
    assert t.table((4, 4, 4))[0, 0, 0].item() == 2.5
    assert t.table((4, 4, 4))[2, 1, 0].item() == pytest.approx(2.5 * (1 + 0.5 * 3))
    coeffs = torch.zeros(1, 1, 1, 1, 1, 4, 4, 4)
    coeffs[..., 0, 0, 0] = 3.4  # step 1 -> 3
    coeffs[..., 1, 0, 0] = 2.4  # step 2 -> round(1.2) * 2 = 2
    coeffs[..., 0, 3, 0] = 3.9  # step 4 -> round(0.975) * 4 = 4
    coeffs[..., 3, 3, 3] = 4.9  # step 10 -> round(0.49) * 10 = 0
    x = _from_coeffs(coeffs, (1, 1, 4, 4, 4))
    out = DCTQuantization(4, q=1.0, growth=1.0, intensity_scale=1.0)(x)
    want = torch.zeros_like(coeffs)
    want[..., 0, 0, 0], want[..., 1, 0, 0], want[..., 0, 3, 0] = 3.0, 2.0, 4.0
    assert torch.allclose(dct3(block_split(out, 4)), want, atol=1e-5)


def test_dct_quantization_error_bound_on_255_scale() -> None:
    x = _rand(1, 1, 8, 8, 8, seed=4)
    t = DCTQuantization(8, q=4.0, growth=1.0)
    err = (t(x) - x) * 255.0
    # orthonormal DCT: per-coefficient error <= Q/2, so the block L2 error <= ||Q / 2||_2 (Parseval)
    assert err.norm().item() <= (t.table((8, 8, 8)) / 2).norm().item() + 1e-4
    assert err.abs().max().item() > 0


# ------------------------------------------------------------------------------ BPDA
@pytest.mark.parametrize("mode", ["identity", "smooth"])
def test_bpda_through_quantization(mode: str) -> None:
    x = _rand(1, 1, 8, 8, 8, seed=5)
    w = _rand(1, 1, 8, 8, 8, seed=6)
    raw = DCTQuantization(4, q=20.0)
    xr = x.clone().requires_grad_(True)
    (g_raw,) = torch.autograd.grad((raw(xr) * w).sum(), xr)
    assert torch.count_nonzero(g_raw) == 0  # hard rounding masks the gradient completely
    t = raw.with_bpda(mode)
    assert raw.bpda == "none" and t.bpda == mode
    xb = x.clone().requires_grad_(True)
    y = t(xb)
    assert torch.allclose(y, raw(x), atol=1e-6)  # forward is the real transform
    (g,) = torch.autograd.grad((y * w).sum(), xb)
    assert torch.count_nonzero(g) == g.numel()
    if mode == "identity":
        assert torch.allclose(g, w)


@pytest.mark.parametrize("mode", ["identity", "smooth"])
def test_bpda_through_median(mode: str) -> None:
    x = torch.full((1, 1, 7, 7, 7), 0.25)
    x[0, 0, 3, 3, 3] = 1.0
    xr = x.clone().requires_grad_(True)
    (g_raw,) = torch.autograd.grad(MedianFilter(3)(xr).sum(), xr)
    assert g_raw[0, 0, 3, 3, 3].item() == 0.0  # the spike is never a window median
    xb = x.clone().requires_grad_(True)
    y = MedianFilter(3, bpda=mode)(xb)
    assert torch.equal(y.detach(), MedianFilter(3)(x))
    (g,) = torch.autograd.grad(y.sum(), xb)
    # identity: d sum / dx = 1; smooth (3^3 window mean): an interior voxel is in 27 windows of weight 1/27
    assert g[0, 0, 3, 3, 3].item() == pytest.approx(1.0, rel=1e-6)
    assert torch.count_nonzero(g) == g.numel()


def test_gaussian_and_lowpass_gradients_are_exact() -> None:
    x = _rand(1, 1, 4, 4, 4, seed=7).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: DCTLowPass(2, keep=1)(v), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda v: GaussianSmoothing(0.8)(v), (x,), fast_mode=True)


# ------------------------------------------------------------------------------- noise
def test_random_noise_seeded_replay_and_sharing() -> None:
    x = _rand(1, 2, 6, 6, 6, seed=8).expand(2, -1, -1, -1, -1).contiguous()
    a, b = RandomNoise(0.1, seed=5), RandomNoise(0.1, seed=5)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    expected = 0.1 * torch.randn((2, 6, 6, 6), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ya - x, expected.expand_as(x), atol=1e-7)  # one draw shared by the batch
    y2 = a(x)
    assert not torch.equal(y2, ya)  # next call: a new draw
    a.reset()
    assert torch.equal(a(x), ya)
    c = RandomNoise(0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c(x), ya)
    assert torch.equal(b(x, generator=torch.Generator().manual_seed(5)), ya)  # per-call generator wins
    assert torch.equal(RandomNoise(0.0)(x), x)


# --------------------------------------------------------------------------------- EOT
def test_eot_output_is_mean_of_draws_and_gradients_average() -> None:
    x = _rand(2, 1, 4, 4, 4, seed=9).requires_grad_(True)
    defended = DefendedModel(Square(), [RandomNoise(0.2)])
    eot = EOTModel(defended, samples=4, seed=3)
    out = eot(x)
    (g_eot,) = torch.autograd.grad(out.sum(), x)
    g = torch.Generator().manual_seed(3)
    outs, grads = [], []
    for _ in range(4):
        o = defended(x, generator=g)
        outs.append(o.detach())
        grads.append(torch.autograd.grad(o.sum(), x)[0])
    assert torch.allclose(out.detach(), torch.stack(outs).mean(0), atol=1e-6)
    assert torch.allclose(g_eot, torch.stack(grads).mean(0), atol=1e-6)
    assert not torch.allclose(outs[0], outs[1])  # the draws differ
    assert not torch.allclose(out, Square()(x))  # E[(x+n)^2] = x^2 + sigma^2 != x^2


def test_eot_seeded_replay() -> None:
    x = _rand(1, 1, 4, 4, 4, seed=10)
    eot = EOTModel(DefendedModel(Square(), [RandomNoise(0.2)]), samples=2, seed=1)
    first = eot(x)
    assert not torch.equal(eot(x), first)
    eot.reset()
    assert torch.equal(eot(x), first)
    assert torch.equal(EOTModel(DefendedModel(Square(), [RandomNoise(0.2)]), samples=2, seed=1)(x), first)


# ---------------------------------------------------------------------- adaptive wrapper
def test_adaptive_wrapper_bpda_description_and_no_mutation() -> None:
    model = Square()
    med = MedianFilter(3)
    defended = DefendedModel(model, [GaussianSmoothing(0.5), med])
    wrapped = adaptive_wrapper(defended, bpda="identity")
    assert isinstance(wrapped, AdaptiveModel)
    text = wrapped.describe()
    assert "BPDA with an identity backward pass" in text and "MedianFilter(kernel_size=3" in text
    assert "exact gradients through GaussianSmoothing" in text and "EOT" not in text
    assert med.bpda == "none" and wrapped.model.transforms[1].bpda == "identity"
    assert wrapped.model.model is model  # the segmenter is shared, not copied
    x = _rand(1, 1, 6, 6, 6, seed=11)
    assert torch.allclose(wrapped(x), defended(x))
    assert "smooth approximation" in adaptive_wrapper(defended, bpda="smooth").describe()
    assert "non-adaptive" in adaptive_wrapper(defended, bpda="none").describe()


def test_adaptive_wrapper_eot_for_randomised_defence() -> None:
    defended = DefendedModel(Square(), [RandomNoise(0.1), DCTQuantization(4, q=8.0)])
    wrapped = adaptive_wrapper(defended, bpda="smooth", eot_samples=3, seed=2)
    assert isinstance(wrapped.model, EOTModel) and wrapped.eot_samples == 3
    assert "EOT over 3 draws (seed 2) of RandomNoise(sigma=0.1)" in wrapped.describe()
    x = _rand(1, 1, 8, 8, 8, seed=12)
    first = wrapped(x)
    wrapped.reset()
    assert torch.equal(wrapped(x), first)
    with pytest.warns(UserWarning, match="eot_samples=4 has no effect"):
        adaptive_wrapper(DefendedModel(Square(), [MedianFilter(3)]), eot_samples=4)


def _labels(seed: int) -> torch.Tensor:
    return torch.randint(0, 3, (1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(seed))


def test_pgd_through_bpda_median_moves_input(tiny_model: nn.Module) -> None:
    x, y = _rand(1, 1, 16, 16, 16, seed=13), _labels(14)
    wrapped = adaptive_wrapper(DefendedModel(tiny_model, [MedianFilter(3)]), bpda="identity")
    atk = volattack.create_attack("pgd", wrapped, steps=3, random_start=False)
    res = atk.run(x, y)
    assert (res.adv - x).abs().max().item() > 0
    assert (res.adv - x).abs().max().item() <= atk.eps + 1e-6
    assert tiny_model.training  # mode restored


def test_pgd_is_masked_by_quantization_without_bpda(tiny_model: nn.Module) -> None:
    x, y = _rand(1, 1, 16, 16, 16, seed=15), _labels(16)
    defended = DefendedModel(tiny_model, [DCTQuantization(8, q=20.0)])
    raw = volattack.create_attack("pgd", adaptive_wrapper(defended, bpda="none"), steps=3, random_start=False)
    assert torch.equal(raw(x, y), x)  # zero gradient: the non-adaptive attack does not move
    bpda = volattack.create_attack("pgd", adaptive_wrapper(defended, bpda="identity"), steps=3, random_start=False)
    assert (bpda(x, y) - x).abs().max().item() > 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: GaussianSmoothing(-1.0), "sigma must be >= 0"),
        (lambda: GaussianSmoothing((1.0, -0.5, 1.0)), "sigma must be >= 0"),
        (lambda: GaussianSmoothing("wide"), "sigma must be a number"),
        (lambda: GaussianSmoothing(1.0, truncated=0.0), "truncated"),
        (lambda: RandomNoise(-0.1), "sigma must be >= 0"),
        (lambda: RandomNoise(0.1, seed=-1), "seed"),
        (lambda: RandomNoise(0.1, generator="g"), "generator must be a torch.Generator"),
        (lambda: MedianFilter(4), "kernel_size must be odd, got 4"),
        (lambda: MedianFilter(0), "kernel_size must be >= 1"),
        (lambda: MedianFilter(3, bpda="straight"), "bpda must be one of"),
        (lambda: DCTQuantization(4, bpda="identiy"), "bpda.*Did you mean 'identity'"),
        (lambda: DCTQuantization(4, q=0.0), "q must be > 0"),
        (lambda: DCTQuantization(4, growth=-1.0), "growth"),
        (lambda: DCTQuantization(4, soft_round_a=1.0), "soft_round_a"),
        (lambda: DCTQuantization(0), "block_size"),
        (lambda: DCTLowPass(4, keep=-1), "keep must be >= 0"),
        (lambda: DCTLowPass(2.5), "block_size"),
        (lambda: EOTModel(Square(), samples=0), "samples must be >= 1"),
        (lambda: EOTModel(Square(), samples=2, seed=-3), "seed"),
        (lambda: DefendedModel(Square(), [lambda v: v]), r"transforms\[0\] must be a torch.nn.Module"),
        (lambda: DefendedModel(Square(), MedianFilter(3)), "transforms must be a list"),
        (lambda: DefendedModel("net", []), "model must be a torch.nn.Module"),
        (lambda: adaptive_wrapper(Square()), "defended_model must be a DefendedModel"),
        (lambda: adaptive_wrapper(DefendedModel(Square(), []), bpda="exact"), "bpda must be one of"),
        (lambda: adaptive_wrapper(DefendedModel(Square(), []), eot_samples=0), "eot_samples must be >= 1"),
    ],
)
def test_bad_arguments_raise(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_at_call_time() -> None:
    x = _rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="sigma must have 1 or 3 values"):
        GaussianSmoothing((1.0, 1.0))(x)
    with pytest.raises(ValueError, match="block_size must not exceed"):
        DCTLowPass(16)(x)
    with pytest.raises(ValueError, match="images must be 5-D"):
        DCTQuantization(4)(x[0])
    with pytest.raises(ValueError, match="images must be floating point"):
        MedianFilter(3)(torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        RandomNoise(0.1)(x, generator=1)
