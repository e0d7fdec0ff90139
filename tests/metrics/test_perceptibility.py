"""Known-value, rule and bad-input tests of the one perturbation measurement (volattack.measure,
re-exported by volattack.metrics.perceptibility)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs

from volattack.metrics import perturbation_stats, ssim3d


def _one_hot_delta() -> tuple[torch.Tensor, torch.Tensor]:
    """x = 0.5 everywhere on 4^3; x_adv differs by +0.5 at one voxel and -0.25 at another."""
    x = torch.full((1, 1, 4, 4, 4), 0.5)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0, 0] += 0.5
    x_adv[0, 0, 3, 2, 1] -= 0.25
    return x, x_adv


def test_perturbation_stats_by_hand() -> None:
    x, x_adv = _one_hot_delta()
    s = perturbation_stats(x, x_adv, unit_scale=425.0)
    sum_sq = 0.5**2 + 0.25**2  # 0.3125 over N = 64 elements
    mse = sum_sq / 64
    assert set(s) == {"linf", "rms", "l2", "psnr", "ssim", "linf_units", "rms_units"}
    assert all(v.shape == (1,) and v.dtype == torch.float32 for v in s.values())
    assert s["linf"].item() == pytest.approx(0.5)
    assert s["l2"].item() == pytest.approx(math.sqrt(sum_sq))
    assert s["rms"].item() == pytest.approx(math.sqrt(mse))
    assert s["psnr"].item() == pytest.approx(10 * math.log10(1.0 / mse))  # 23.113 dB
    assert s["linf_units"].item() == pytest.approx(212.5)  # HU for the [-175, 250] window
    assert s["rms_units"].item() == pytest.approx(425 * math.sqrt(mse))
    assert 0.0 < s["ssim"].item() < 1.0
    # a range of 2 input units raises PSNR by 10 log10(4) dB; norms are unchanged
    s2 = perturbation_stats(x, x_adv, data_range=(-1.0, 1.0))
    assert s2["psnr"].item() == pytest.approx(s["psnr"].item() + 10 * math.log10(4.0), rel=1e-6)
    assert "linf_units" not in s2 and s2["linf"].item() == pytest.approx(0.5)


def test_perturbation_stats_identical_inputs() -> None:
    x = torch.rand(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    s = perturbation_stats(x, x.clone())
    assert torch.equal(s["linf"], torch.zeros(2)) and torch.equal(s["rms"], torch.zeros(2))
    assert torch.isinf(s["psnr"]).all() and (s["psnr"] > 0).all()
    torch.testing.assert_close(s["ssim"], torch.ones(2), atol=1e-5, rtol=0)


def test_perturbation_stats_batch_consistency_and_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 8, 7, 6, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    batch = perturbation_stats(x, x_adv, unit_scale=425.0)
    assert all(v.dtype == torch.float64 for v in batch.values())
    for i in range(3):
        single = perturbation_stats(x[i : i + 1], x_adv[i : i + 1], unit_scale=425.0)
        for k, v in single.items():
            torch.testing.assert_close(v, batch[k][i : i + 1], rtol=1e-6, atol=1e-7)


def test_perturbation_stats_bad_inputs() -> None:
    x = torch.zeros(1, 1, 4, 4, 4)
    shapes = r"x and x_adv must have the same shape, got x \(1, 1, 4, 4, 4\) and x_adv \(1, 1, 4, 4\)"
    with pytest.raises(ValueError, match=shapes):
        perturbation_stats(x, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"data_range must be \(lo, hi\) with finite lo < hi, got \(1.0, 0.0\)"):
        perturbation_stats(x, x, data_range=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"data_range must be a pair"):
        perturbation_stats(x, x, data_range=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match=r"unit_scale must be a positive finite number .*got 0"):
        perturbation_stats(x, x, unit_scale=0)
    with pytest.raises(ValueError, match=r"unit_scale .*got -425.0"):
        perturbation_stats(x, x, unit_scale=-425.0)
    with pytest.raises(ValueError, match=r"x must be a floating-point image, got dtype torch.int64"):
        perturbation_stats(x.long(), x)


def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 16, 16, 16, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(ssim3d(x, x), torch.ones(1), atol=1e-5, rtol=0)
    small = ssim3d(x, x + 0.02 * noise)
    large = ssim3d(x, x + 0.2 * noise)
    assert 0.9 < small.item() < 1.0
    assert large.item() < small.item() - 0.1  # 0.81 vs 0.998 here


def test_ssim_uniform_window_covering_the_volume_equals_global_formula() -> None:
    # A 3x3x3 volume with a uniform 3^3 window has exactly one window position, so
    # SSIM is the global formula with population (1/N) variances and covariance.
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 3, 3, 3, generator=gen, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    a, b = x.numpy().ravel(), y.numpy().ravel()
    mx, my = a.mean(), b.mean()
    vx, vy, cxy = a.var(), b.var(), np.mean((a - mx) * (b - my))
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ssim3d(x, y, win_size=3, kernel_type="uniform")
    assert got.item() == pytest.approx(expected, abs=1e-5)  # MONAI computes in float32


def test_ssim_window_reduced_to_largest_odd_size_that_fits() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 4, 5, 12, generator=gen)
    y = torch.rand(2, 1, 4, 5, 12, generator=gen)
    got = ssim3d(x, y, win_size=7)  # axes of 4, 5, 12 voxels -> window (3, 5, 7)
    ref, _ = compute_ssim_and_cs(x, y, spatial_dims=3, kernel_size=[3, 5, 7], kernel_sigma=[1.5] * 3)
    torch.testing.assert_close(got, ref.flatten(1).mean(1))
    # a volume smaller than the window along every axis still works
    assert ssim3d(x[..., :2, :2, :2], x[..., :2, :2, :2]).shape == (2,)


def test_ssim_2d_batch_consistency_and_gradient() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(3, 2, 16, 16, generator=gen)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen)).requires_grad_(True)
    batch = ssim3d(x, y)
    assert batch.shape == (3,)
    single = torch.cat([ssim3d(x[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single)
    (grad,) = torch.autograd.grad(batch.sum(), y)
    assert grad.abs().sum() > 0  # usable as an attack objective


def test_ssim_bad_inputs() -> None:
    x = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"x and y must have the same shape"):
        ssim3d(x, torch.zeros(1, 1, 8, 8, 7))
    with pytest.raises(ValueError, match=r"2 or 3 spatial dims\), got \(1, 1, 8\)"):
        ssim3d(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match=r"data_range must be a positive number, got 0"):
        ssim3d(x, x, data_range=0)
    for bad in (4, 0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"win_size must be a positive odd integer, got {bad}"):
            ssim3d(x, x, win_size=bad)
    with pytest.raises(ValueError, match=r"kernel_type must be one of \('gaussian', 'uniform'\), got 'box'"):
        ssim3d(x, x, kernel_type="box")
    with pytest.raises(ValueError, match=r"kernel_sigma must be a positive number, got -1"):
        ssim3d(x, x, kernel_sigma=-1)


def test_one_ssim_everywhere() -> None:
    """metrics re-exports measure's functions; an attack's info["ssim"] is that number, bit for bit,
    also on an anisotropic volume whose window shrinks along one axis only (7, 7, 5)."""
    import volattack
    from volattack import measure
    from volattack.metrics import perceptibility

    assert ssim3d is measure.ssim3d is perceptibility.ssim3d
    assert perturbation_stats is measure.perturbation_stats
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 2, 3, padding=1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 12, 10, 6, generator=g)
    y = torch.randint(0, 2, (2, 1, 12, 10, 6), generator=g)
    for name, kw in (("pgd", {}), ("vafa", {"block_size": 2})):
        res = volattack.create_attack(name, model, steps=2, **kw).run(x, y)
        assert res.info["ssim"] == ssim3d(x, res.adv).tolist()
        assert res.info["ssim"] == perturbation_stats(x, res.adv)["ssim"].tolist()


def test_ssim_identical_is_exactly_one() -> None:
    x = torch.rand(2, 3, 9, 8, 7, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ssim3d(x, x), torch.ones(2))


def test_ssim_of_constant_volumes_by_hand() -> None:
    # constant images: every local variance and covariance is 0, so SSIM = luminance term
    # (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 R)^2; for a = 0.5, b = 0.25, R = 1:
    # (0.25 + 1e-4) / (0.3125 + 1e-4) = 0.800064...
    a = torch.full((1, 1, 9, 9, 9), 0.5, dtype=torch.float64)
    b = torch.full((1, 1, 9, 9, 9), 0.25, dtype=torch.float64)
    assert ssim3d(a, b).item() == pytest.approx(0.2501 / 0.3126, rel=1e-12)
    # with R = 2, C1 = 4e-4
    assert ssim3d(a, b, data_range=2.0).item() == pytest.approx(0.2504 / 0.3129, rel=1e-12)
