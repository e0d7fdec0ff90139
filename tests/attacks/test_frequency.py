"""Frequency-domain attacks: VAFA, SA^2 and the FFT attack (identities, budgets, effect, errors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import volattack
from volattack.attacks.objectives import hard_foreground_dice
from volattack.attacks.spectral import band_mask, block_merge, block_split, dct3, idct3, rfft3, rfft_mask


class Pointwise(nn.Module):
    """A fixed two-class voxel classifier: foreground logit ``k (x - 0.5)``, background its negative.

    Crafted instead of trained (deterministic, no training time): every voxel is decided by its own
    intensity, so the blob task below has voxels close to the decision boundary that a small
    intensity change flips, and the attack gradients are exact and non-saturated.
    """

    def __init__(self, k: float = 10.0) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))  # a parameter, so "no parameter grads" is checked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.k * (x - 0.5)
        return torch.cat([-f, f], dim=1)


def blobs(n: int = 2, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-contrast spheres (0.55 on 0.45, noise sd 0.03) and their labels, ``(n, 1, size^3)``."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    c = torch.rand(n, 3, 1, 1, 1, generator=g) * size / 4 + 3 * size / 8
    rad = size / 4 + 2 * torch.rand(n, 1, 1, 1, generator=g)
    inside = ((zz - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2 + (xx - c[:, 2]) ** 2).sqrt() < rad
    img = 0.45 + 0.1 * inside.float() + 0.03 * torch.randn(n, size, size, size, generator=g)
    return img.clamp(0, 1)[:, None], inside.long()[:, None]


@pytest.fixture(scope="module")
def task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = blobs()
    return Pointwise(), x, y


def fg_dice(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hard_foreground_dice(model(x).argmax(dim=1, keepdim=True), y, 2)


def integer_dct_volume(shape=(2, 1, 16, 16, 8), block=8, seed=0) -> torch.Tensor:
    """A volume in [0, 1] whose 0..255-scale block DCT coefficients are integers (float64)."""
    g = torch.Generator().manual_seed(seed)
    coeffs = torch.randint(-3, 4, block_split(torch.zeros(shape), block).shape, generator=g).double()
    coeffs[..., 0, 0, 0] = round(127.5 * math.sqrt(block**3))  # DC: block mean about 127.5
    x255 = block_merge(idct3(coeffs), shape)
    assert 0 < float(x255.min()) and float(x255.max()) < 255
    return x255 / 255


# ================================================================================ VAFA
def test_vafa_unit_tables_and_hard_rounding_return_the_input(task):
    # The precise statement: with q = 1 and hard rounding, x' = idct(round(dct(255 x))) / 255.
    # (a) when the 0..255 block DCT coefficients are integers, rounding is the identity and x' = x
    #     to float precision;
    # (b) for any input, each coefficient moves by at most q/2 = 0.5, so (orthonormal DCT) the
    #     RMS change of every block is at most 0.5/255.
    # q_max = 1 pins q = 1 through all the steps, so the whole loop path is exercised.
    model = task[0]
    x = integer_dct_volume()
    y = torch.zeros(x.shape, dtype=torch.long)
    atk = volattack.create_attack("vafa", model, protocol="paper", q_max=1.0, rounding="hard", steps=3)
    res = atk.run(x, y)  # float64 end to end
    assert res.adv.dtype == torch.float64
    torch.testing.assert_close(res.adv, x, rtol=0, atol=1e-12)
    assert res.info["q_mean"] == [1.0, 1.0] and res.info["q_max_used"] == [1.0, 1.0]

    xr, yr = task[1], task[2]
    adv = volattack.create_attack("vafa", model, protocol="paper", q_max=1.0, steps=2).run(xr, yr).adv
    d = block_split(adv - xr, 8)
    block_rms = d.pow(2).mean(dim=(-3, -2, -1)).sqrt()
    assert float(block_rms.max()) <= 0.5 / 255 + 1e-6
    assert float(block_rms.max()) > 0.1 / 255  # and the rounding did act


def test_vafa_hu_bounds_are_normalised():
    # The same identity on HU-valued inputs: the attack quantises (x - lo) / (hi - lo) * 255.
    x01 = integer_dct_volume(shape=(1, 1, 8, 8, 8))
    lo, hi = -175.0, 250.0
    x = (lo + (hi - lo) * x01).float()
    y = torch.zeros(x.shape, dtype=torch.long)
    model = nn.Sequential(nn.Conv3d(1, 2, 1))
    atk = volattack.create_attack("vafa", model, bounds=(lo, hi), protocol="paper", q_max=1.0, rounding="hard", steps=1,
                                 unit_scale=1.0)
    res = atk.run(x, y)
    torch.testing.assert_close(res.adv, x, rtol=0, atol=2e-4)  # float32 HU values around 100
    # q_max 20 on the same HU volume: the change is bounded by q_max/2 on the 0..255 scale
    res = volattack.create_attack("vafa", model, bounds=(lo, hi), q_init="qmax", steps=0).run(x, y)
    assert res.info["q_mean"] == [20.0] and res.info["q_max_used"] == [20.0]
    assert 0 < res.info["rms"][0] <= 10 / 255 * (hi - lo)


def test_vafa_budget_and_info(task):
    model, x, y = task
    res = volattack.create_attack("vafa", model, q_max=10.0, steps=4, seed=1).run(x, y)
    # hard rounding with q <= q_max moves each coefficient by <= q_max/2 -> RMS <= q_max/2 on 0..255
    assert max(res.info["rms"]) <= 5 / 255 + 1e-6
    for qm, qx in zip(res.info["q_mean"], res.info["q_max_used"]):
        assert 1.0 <= qm <= qx <= 10.0
    assert res.info["steps_run"] == 4
    assert all(0.9 < s <= 1.0 for s in res.info["ssim"])


def test_vafa_lowers_dice(task):
    # Published-code settings (q init q_max, q_min 5). The optimised tables must lower the Dice
    # below both the clean Dice and plain quantisation with the initial tables (steps=0).
    model, x, y = task
    clean = fg_dice(model, x, y)
    kw = dict(q_init="qmax", q_min=5.0, q_max=20.0, block_size=8, seed=0)
    start = fg_dice(model, volattack.create_attack("vafa", model, steps=0, **kw)(x, y), y)
    res = volattack.create_attack("vafa", model, steps=20, **kw).run(x, y)
    adv = fg_dice(model, res.adv, y)
    assert bool((adv < clean - 0.1).all()), (clean, adv)
    assert bool((adv < start - 0.04).all()), (start, adv)
    assert all(0.8 < s < 1.0 for s in res.info["ssim"])
    # the optimisation lowered q from q_max where quantising did not help
    assert all(m < 20.0 for m in res.info["q_mean"])


def test_vafa_options_run_and_differ(task):
    model, x, y = task
    base = volattack.create_attack("vafa", model, q_init="qmax", steps=0, center_128=False)(x, y)
    centred = volattack.create_attack("vafa", model, q_init="qmax", steps=0, center_128=True)(x, y)
    # centring only changes the DC coefficient (hence how it rounds): the difference is constant per block
    d = block_split(centred - base, 8)
    spread = d.amax(dim=(-3, -2, -1)) - d.amin(dim=(-3, -2, -1))
    assert float(spread.max()) < 1e-5 and float(d.abs().max()) > 0
    for kw in (dict(rounding="ste"), dict(rounding="hard"), dict(objective="dice_ce"), dict(objective="ce")):
        adv = volattack.create_attack("vafa", model, steps=2, **kw)(x, y)
        assert adv.shape == x.shape and float((adv - x).abs().max()) > 0


def test_vafa_slice_renorm_is_guarded_on_constant_slices(task):
    model = task[0]
    # axial slices (last axis) 0..7 form constant 8^3 blocks: quantising a constant block only
    # rounds its DC coefficient, so those slices stay exactly constant (the division guard);
    # slices 8..15 vary in-plane and are stretched to [0, 1].
    x = torch.full((1, 1, 8, 8, 16), 0.2)
    x[..., 8:] = torch.linspace(0.3, 0.6, 8).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8)
    y = torch.zeros(x.shape, dtype=torch.long)
    adv = volattack.create_attack("vafa", model, protocol="paper", steps=0, slice_renorm=True, rounding="hard")(x, y)
    assert bool(torch.isfinite(adv).all())
    lo = adv.amin(dim=(2, 3)).flatten()
    hi = adv.amax(dim=(2, 3)).flatten()
    torch.testing.assert_close(adv[..., :8], x[..., :8], rtol=0, atol=0.5 / 255)
    torch.testing.assert_close(lo[8:], torch.zeros(8), rtol=0, atol=1e-6)
    torch.testing.assert_close(hi[8:], torch.ones(8), rtol=0, atol=1e-6)
    # off by default: the same call without it stays within the q/2 rounding bound of the input
    plain = volattack.create_attack("vafa", model, protocol="paper", steps=0, rounding="hard")(x, y)
    assert float((plain - x).pow(2).mean().sqrt()) <= 0.5 / 255


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(q_max=0.5), "q_max must be >= 1"),
        (dict(q_min=0.5), "q_min must be >= 1"),
        (dict(q_min=30.0), "q_min must be <= 20.0, got 30.0"),
        (dict(block_size=1), "block_size must be >= 2, got 1"),
        (dict(steps=-1), "steps must be >= 0, got -1"),
        (dict(q_init="max"), "q_init must be one of one, qmax, got 'max'"),
        (dict(rounding="round"), "rounding must be one of soft, ste, hard"),
        (dict(objective="dise"), "objective must be one of"),
        (dict(soft_round_a=1.0), "soft_round_a must be < 1"),
        (dict(slice_renorm=1), "slice_renorm must be True or False, got 1"),
        (dict(ssim_weight=-1.0), "ssim_weight must be >= 0"),
        (dict(spatial_dims=2), "spatial_dims must be 3"),
    ],
)
def test_vafa_bad_arguments(task, kw, match):
    with pytest.raises(ValueError, match=match):
        volattack.create_attack("vafa", task[0], **kw)


def test_vafa_block_larger_than_volume(task):
    model, x, y = task
    with pytest.raises(ValueError, match=r"block_size=32 for volume shape \(2, 1, 16, 16, 16\)"):
        volattack.create_attack("vafa", model, block_size=32)(x, y)


# ================================================================================= SA2
def test_sa2_rho_zero_returns_the_input_exactly(task):
    model, x, y = task
    res = volattack.create_attack("sa2", model, rho=0.0).run(x, y)
    assert torch.equal(res.adv, x)
    assert res.adv.data_ptr() != x.data_ptr()
    assert res.info["xi_mean_abs_dev"] == [0.0, 0.0]


def test_sa2_parseval_budget_per_block_and_dc_kept():
    # x inside (0, 1) with margin, so no clamping: per block ||x' - x|| <= rho ||x - mean(x)||,
    # and the block means (DC coefficients) are untouched.
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(2, 1, 16, 16, 8, generator=g)
    y = torch.zeros(x.shape, dtype=torch.long)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1))
    res = volattack.create_attack("sa2", model, rho=0.3, steps=3, l_dc=1.0, seed=2).run(x, y)
    adv = res.adv
    assert float(adv.min()) > 0 and float(adv.max()) < 1
    xb, ab = block_split(x, 8), block_split(adv, 8)
    diff = (ab - xb).pow(2).sum(dim=(-3, -2, -1)).sqrt()
    ac = (xb - xb.mean(dim=(-3, -2, -1), keepdim=True)).pow(2).sum(dim=(-3, -2, -1)).sqrt()
    assert bool((diff <= 0.3 * ac + 1e-5).all())
    torch.testing.assert_close(ab.mean(dim=(-3, -2, -1)), xb.mean(dim=(-3, -2, -1)), rtol=0, atol=1e-6)
    assert all(0 < d <= 0.3 for d in res.info["xi_mean_abs_dev"])


def test_sa2_band_restricts_the_spectrum_change():
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(1, 1, 8, 8, 8, generator=g)
    y = torch.zeros(x.shape, dtype=torch.long)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1))
    adv = volattack.create_attack("sa2", model, rho=0.5, band="high", steps=2, center=False)(x, y)
    dc = dct3(block_split(adv, 8)) - dct3(block_split(x, 8))
    outside = ~band_mask(8, "high")
    assert float(dc[..., outside].abs().max()) < 1e-5
    assert float(dc[..., ~outside].abs().max()) > 1e-3


def test_sa2_lowers_dice(task):
    # The published run's settings (rho 0.4, 10 steps, l_dc 0.2, l_ssim 0.75); the optimised
    # factors must beat both the clean model and the random start (steps=0).
    model, x, y = task
    clean = fg_dice(model, x, y)
    kw = dict(rho=0.4, l_dc=0.2, l_ssim=0.75, seed=0)
    start = fg_dice(model, volattack.create_attack("sa2", model, steps=0, **kw)(x, y), y)
    res = volattack.create_attack("sa2", model, steps=10, **kw).run(x, y)
    adv = fg_dice(model, res.adv, y)
    assert bool((adv < clean - 0.08).all()), (clean, adv)
    assert bool((adv < start - 0.08).all()), (start, adv)
    assert all(0.9 < s < 1.0 for s in res.info["ssim"])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rho=1.0), "rho must be < 1, got 1.0"),
        (dict(rho=-0.1), "rho must be >= 0, got -0.1"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(band="mid"), "band must be one of all, low, middle, high"),
        (dict(block_size=1), "block_size must be >= 2"),
        (dict(steps=-2), "steps must be >= 0"),
        (dict(l_dc=-1.0), "l_dc must be >= 0"),
        (dict(l_ssim=float("nan")), "l_ssim must be finite"),
        (dict(center="yes"), "center must be True or False"),
    ],
)
def test_sa2_bad_arguments(task, kw, match):
    with pytest.raises(ValueError, match=match):
        volattack.create_attack("sa2", task[0], **kw)


# ================================================================================= FFT
def test_fft_lowers_dice_within_budget(task):
    model, x, y = task
    clean = fg_dice(model, x, y)
    start = fg_dice(model, volattack.create_attack("fft", model, steps=0, seed=0)(x, y), y)
    res = volattack.create_attack("fft", model, eps=4 / 255, steps=20, seed=0).run(x, y)
    adv = fg_dice(model, res.adv, y)
    assert bool((adv < clean - 0.08).all()) and bool((adv < start - 0.08).all()), (clean, start, adv)
    assert max(res.info["linf"]) <= 4 / 255 + 1e-6
    assert all(0.9 < s < 1.0 for s in res.info["ssim"])
    # the amplitude variant lowers it too
    amp = volattack.create_attack("fft", model, mode="amplitude", rho=0.2, steps=20, seed=0)(x, y)
    assert bool((fg_dice(model, amp, y) < clean - 0.08).all())


def test_fft_l2_band_limited_perturbation():
    # L2 projection is a per-sample scaling, so a band limit holds exactly (no bound is hit here)
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(2, 1, 16, 16, 16, generator=g)
    y = torch.zeros(x.shape, dtype=torch.long)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1))
    res = volattack.create_attack("fft", model, norm="l2", eps=0.3, alpha=0.1, band="low", steps=3).run(x, y)
    d = res.adv - x
    assert float(d.flatten(1).norm(dim=1).max()) <= 0.3 + 1e-5
    spec = rfft3(d)
    out = ~rfft_mask((16, 16, 16), "low")
    assert float(spec[..., out].abs().max()) < 1e-5 * float(spec.abs().max())


def test_fft_amplitude_keeps_the_phase():
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(1, 1, 8, 8, 8, generator=g)
    y = torch.zeros(x.shape, dtype=torch.long)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1))
    adv = volattack.create_attack("fft", model, mode="amplitude", rho=0.3, steps=3, seed=4)(x, y)
    fx, fa = rfft3(x.double()), rfft3(adv.double())
    big = fx.abs() > 1e-2
    ratio = fa[big] / fx[big]
    assert float(ratio.imag.abs().max()) < 1e-3  # phase kept
    assert float(ratio.real.min()) >= 0.7 - 1e-3 and float(ratio.real.max()) <= 1.3 + 1e-3
    assert float(ratio.real.max()) > 1.05  # and the amplitudes did change
    torch.testing.assert_close(fa[..., 0, 0, 0], fx[..., 0, 0, 0])  # DC kept


def test_fft_blocks_and_targeted(task):
    model, x, y = task
    # per-block spectrum; targeted toward all-background shrinks the predicted foreground
    target = torch.zeros_like(y)
    atk = volattack.create_attack("fft", model, block_size=8, targeted=True, target_labels=target, steps=10)
    adv = atk(x, y)
    with torch.no_grad():
        fg_clean = model(x).argmax(1).sum(dim=(1, 2, 3))
        fg_adv = model(adv).argmax(1).sum(dim=(1, 2, 3))
    # (a voxel flips only if its intensity is within eps = 4/255 above 0.5: about 8% of the
    # foreground of this task, so a few percent is a real effect)
    assert bool((fg_adv < fg_clean * 0.95).all()), (fg_clean, fg_adv)
    assert float((adv - x).abs().max()) <= 4 / 255 + 1e-6


@pytest.mark.parametrize(
    "name,kw", [("vafa", dict(q_init="qmax", q_min=5.0)), ("sa2", dict(rho=0.4, l_dc=0.2, l_ssim=0.75))]
)
def test_dct_attacks_targeted_toward_background(task, name, kw):
    # Dice-CE: the soft Dice of a class absent from the target has a vanishing gradient
    # (smooth / (sum p)^2), so the CE term carries the targeted signal.
    kw = dict(kw, objective="dice_ce")
    model, x, y = task
    target = torch.zeros_like(y)
    start = volattack.create_attack(name, model, steps=0, **kw)(x, y)
    untargeted = volattack.create_attack(name, model, steps=10, **kw)(x, y)
    targeted = volattack.create_attack(name, model, steps=10, targeted=True, target_labels=target, **kw)(x, y)
    with torch.no_grad():
        fg = {k: model(v).argmax(1).sum(dim=(1, 2, 3)) for k, v in (("start", start), ("t", targeted), ("u", untargeted))}
    # minimising the objective toward "all background" shrinks the predicted foreground from the
    # starting point (steps=0), unlike the untargeted attack (which also flips background voxels)
    assert bool((fg["t"] < fg["start"]).all()) and bool((fg["t"] < fg["u"]).all()), fg


def test_fft_eps_zero_and_no_start_no_steps_return_the_input(task):
    model, x, y = task
    assert torch.equal(volattack.create_attack("fft", model, eps=0.0)(x, y), x)
    assert torch.equal(volattack.create_attack("fft", model, steps=0, random_start=False)(x, y), x)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(eps=-1.0), "eps must be >= 0"),
        (dict(norm="l1"), "norm must be one of linf, l2, got 'l1'"),
        (dict(mode="phase"), "mode must be one of additive, amplitude"),
        (dict(band="hi"), "band must be one of"),
        (dict(radius=(0.5, 0.1)), r"radius\[1\] must be >= 0.5"),
        (dict(radius=0.5), "radius must be a pair"),
        (dict(rho=1.5), "rho must be < 1"),
        (dict(alpha=-0.1), "alpha must be >= 0"),
        (dict(block_size=1), "block_size must be >= 2"),
        (dict(steps=1.5), "steps must be an integer"),
    ],
)
def test_fft_bad_arguments(task, kw, match):
    with pytest.raises(ValueError, match=match):
        volattack.create_attack("fft", task[0], **kw)


def test_fft_empty_band_and_big_block(task):
    model, x, y = task
    with pytest.raises(ValueError, match="selects no frequency"):
        volattack.create_attack("fft", model, band="low", radius=(0.9, 1.0))(x, y)
    with pytest.raises(ValueError, match="block_size=32 for volume shape"):
        volattack.create_attack("fft", model, block_size=32)(x, y)


def test_frequency_attacks_are_registered():
    assert {"vafa", "sa2", "fft"} <= set(volattack.list_attacks())


@pytest.mark.parametrize(
    "name,kw",
    [("vafa", dict(q_init="qmax")), ("sa2", dict(rho=0.4)), ("fft", {}), ("fft", dict(mode="amplitude"))],
)
def test_batch_equals_each_sample_alone_on_saturated_volumes(name, kw):
    # Windowed CT has many voxels exactly on a bound (air at 0, bone at 1). Candidates that land
    # on a bound up to float round-off must not make the gradient (hence the signed steps) differ
    # between a batch and each sample alone.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    x, y = blobs(n=2, size=16, seed=3)
    x = x.clone()
    x[..., :8] = 0.0  # saturated air half
    x[..., 12:, :] = 1.0
    atk = volattack.create_attack(name, model, steps=4, seed=5, **kw)
    both = atk(x, y)
    alone = torch.cat([atk(x[:1], y[:1], sample_ids=[0]), atk(x[1:], y[1:], sample_ids=[1])])
    torch.testing.assert_close(alone, both, rtol=0, atol=1e-6)
    assert float(both.min()) >= 0.0 and float(both.max()) <= 1.0


def _fold_blocks(t: torch.Tensor) -> torch.Tensor:
    """(B, C, nH, nW, nD, b, b, b) -> (B * N, C, b, b, b): every block as its own volume."""
    c, bs = t.shape[1], t.shape[-3:]
    return t.flatten(2, -4).transpose(1, 2).reshape(-1, c, *bs)


@pytest.mark.parametrize("block,win", [(8, 3), (4, 3), (3, 3), (2, 3), (8, 5)])
def test_patch_ssim_objective_is_the_reported_ssim_of_each_block(block, win):
    """The VAFA/SA^2 objective PatchSSIM is measure.ssim3d (the one SSIM code) of each block with the
    objective's window, averaged over blocks; it equals MONAI's compute_ssim_and_cs on the blocks, in
    value and gradient (window shrunk to fit like ssim3d: 3 for 3^3+ blocks, 1 for 2^3 blocks)."""
    from monai.metrics.regression import compute_ssim_and_cs

    from volattack.attacks.spectral_base import PatchSSIM
    from volattack.measure import ssim3d, ssim_window

    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 16, 16, 12, generator=g)
    y0 = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = block_split(x, block)
    y1 = y0.clone().requires_grad_(True)
    y2 = y0.clone().requires_grad_(True)
    got = PatchSSIM(ref, win_size=win)(block_split(y1, block))
    assert got.shape == (2,) and bool((got < 1).all())  # the distortion is visible
    per_block = ssim3d(_fold_blocks(ref), _fold_blocks(block_split(y0, block)), win_size=win)
    torch.testing.assert_close(got.detach(), per_block.reshape(2, -1).mean(1), rtol=0, atol=1e-6)
    w = ssim_window((block,) * 3, win)
    s, _ = compute_ssim_and_cs(_fold_blocks(block_split(y2, block)), _fold_blocks(ref), spatial_dims=3,
                               kernel_size=w, kernel_sigma=[1.5] * 3, data_range=1.0, kernel_type="gaussian")
    monai = s.reshape(2, -1).mean(dim=1)
    torch.testing.assert_close(got, monai, rtol=0, atol=1e-6)
    (ga,) = torch.autograd.grad(got.sum(), y1)
    (gb,) = torch.autograd.grad(monai.sum(), y2)
    assert ga.abs().max() > 0
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(PatchSSIM(ref, win_size=win)(ref), torch.ones(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,win", [((2, 1, 20, 18, 9), 7), ((1, 2, 16, 16, 16), 3), ((1, 1, 12, 10, 6), 11)])
def test_reported_ssim_equals_monai(shape, win):
    """The one reported SSIM (volattack.measure.ssim3d: separable einsum window, shrunk per axis)
    equals MONAI's compute_ssim_and_cs with the same per-axis window."""
    from monai.metrics.regression import compute_ssim_and_cs

    from volattack.measure import ssim3d, ssim_window

    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    y = x + 0.1 * torch.randn(shape, generator=g)
    ref, _ = compute_ssim_and_cs(y, x, 3, ssim_window(shape[2:], win), [1.5] * 3, data_range=2.0)
    got = ssim3d(x, y, data_range=2.0, win_size=win)
    assert got.shape == (shape[0],)
    assert torch.allclose(got, ref.flatten(1).mean(dim=1), atol=1e-6)
    assert torch.allclose(ssim3d(x, x), torch.ones(shape[0]), atol=1e-6)
