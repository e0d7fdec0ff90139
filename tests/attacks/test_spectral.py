"""Spectral building blocks: DCT, block split/merge, band masks, soft rounding, rfft helpers."""

from __future__ import annotations

import math

import pytest
import torch

from volattack.attacks.spectral import (
    band_mask,
    block_merge,
    block_split,
    dct3,
    dct_matrix,
    idct3,
    irfft3,
    rfft3,
    rfft_mask,
    rfft_radius,
    soft_round,
    ste_round,
)


# ------------------------------------------------------------------------------ DCT
@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_dct_matrix_is_orthonormal(n):
    c = dct_matrix(n, torch.float64)
    torch.testing.assert_close(c @ c.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_dct_matrix_known_values():
    c = dct_matrix(2, torch.float64)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(c, torch.tensor([[s, s], [s, -s]], dtype=torch.float64))
    c4 = dct_matrix(4, torch.float64)
    # row k=1, column i=0: sqrt(2/4) cos(pi/8)
    assert float(c4[1, 0]) == pytest.approx(math.sqrt(0.5) * math.cos(math.pi / 8), abs=1e-12)
    # cached per (n, dtype, device): the same tensor object comes back
    assert dct_matrix(8) is dct_matrix(8)
    assert dct_matrix(8, torch.float64).dtype == torch.float64


def test_dct3_round_trip_and_parseval():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 3, 2, 2, 8, 8, 8, generator=g)
    c = dct3(x)
    torch.testing.assert_close(idct3(c), x, rtol=0, atol=1e-6)
    # orthonormal: energy kept; DC of a block is sum / sqrt(512)
    torch.testing.assert_close(c.pow(2).sum((-3, -2, -1)), x.pow(2).sum((-3, -2, -1)), rtol=1e-5, atol=0)
    torch.testing.assert_close(c[..., 0, 0, 0], x.sum((-3, -2, -1)) / math.sqrt(512), rtol=1e-5, atol=0)


def test_dct3_of_constant_block_is_dc_only():
    c = dct3(torch.full((4, 4, 4), 2.0, dtype=torch.float64))
    assert float(c[0, 0, 0]) == pytest.approx(2.0 * 8.0)  # 2 * sqrt(64)
    c[0, 0, 0] = 0
    assert float(c.abs().max()) < 1e-12


def test_dct3_bad_input():
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        dct3(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="floating point"):
        dct3(torch.zeros(4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        dct_matrix(0)


# --------------------------------------------------------------------------- blocks
def test_block_split_layout_and_merge_round_trip():
    x = torch.arange(2 * 3 * 8 * 4 * 12, dtype=torch.float32).reshape(2, 3, 8, 4, 12)
    b = block_split(x, 4)
    assert b.shape == (2, 3, 2, 1, 3, 4, 4, 4)
    # block (1, 0, 2) of sample 1, channel 2 is the sub-volume [4:8, 0:4, 8:12]
    torch.testing.assert_close(b[1, 2, 1, 0, 2], x[1, 2, 4:8, 0:4, 8:12])
    assert torch.equal(block_merge(b, x.shape), x)


def test_block_split_pads_non_multiple_by_replicate_and_merge_crops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 6, 5, 7, generator=g)
    b = block_split(x, 4)
    assert b.shape == (1, 2, 2, 2, 2, 4, 4, 4)
    padded = block_merge(b, (1, 2, 8, 8, 8))
    torch.testing.assert_close(padded[:, :, :6, :5, :7], x)
    # replicate padding: the padded voxels repeat the last voxel of each axis
    torch.testing.assert_close(padded[:, :, 6:, :5, :7], x[:, :, 5:6].expand(-1, -1, 2, -1, -1))
    torch.testing.assert_close(padded[:, :, 7, 7, 7], x[:, :, 5, 4, 6])
    merged = block_merge(b, x.shape)
    assert merged.shape == x.shape
    assert torch.equal(merged, x)


def test_block_split_errors():
    x = torch.zeros(1, 1, 8, 6, 8)
    with pytest.raises(ValueError, match=r"block_size=8 for volume shape \(1, 1, 8, 6, 8\)"):
        block_split(x, 8)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        block_split(x, 0)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 2.5"):
        block_split(x, 2.5)
    with pytest.raises(ValueError, match="blocks must have 8 dims"):
        block_merge(torch.zeros(1, 1, 2, 2, 2), (1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="do not cover"):
        block_merge(block_split(torch.zeros(1, 1, 4, 4, 4), 2), (1, 1, 6, 4, 4))


def test_block_dct_pipeline_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 5, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(3, 3, 3, dtype=torch.float64, generator=g)

    def f(v: torch.Tensor) -> torch.Tensor:  # 5 and 4 are padded to 6, the pad cropped again
        return block_merge(idct3(dct3(block_split(v, 3)) * w), v.shape)

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
    # with w = 1 the pipeline is the identity
    torch.testing.assert_close(block_merge(idct3(dct3(block_split(x, 3))), x.shape), x, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- bands
# Hand count: #{(i, j, k) >= 0 : i + j + k <= m} = C(m + 3, 3) when m < b.
# b = 8: low s <= 3 -> C(6, 3) = 20. high s >= 18 = 5*8/2 - 2: with i' = 7 - i, s' = 21 - s <= 3 -> 20.
#        middle = 8^3 - 40 = 472.
# b = 16: low s <= 7 -> C(10, 3) = 120; high s >= 38, s' = 45 - s <= 7 -> 120; middle 4096 - 240 = 3856.
@pytest.mark.parametrize(
    "b,low,middle,high", [(8, 20, 472, 20), (16, 120, 3856, 120), (4, 4, 56, 4)]
)
def test_band_mask_sizes(b, low, middle, high):
    masks = {band: band_mask(b, band) for band in ("low", "middle", "high", "all")}
    assert masks["all"].shape == (b, b, b) and masks["all"].dtype == torch.bool
    assert int(masks["low"].sum()) == low
    assert int(masks["middle"].sum()) == middle
    assert int(masks["high"].sum()) == high
    assert int(masks["all"].sum()) == b**3
    # the three bands partition the block
    total = masks["low"].int() + masks["middle"].int() + masks["high"].int()
    assert bool((total == 1).all())
    assert int(band_mask(b, "low", exclude_dc=True).sum()) == low - 1
    assert not bool(band_mask(b, "all", exclude_dc=True)[0, 0, 0])
    assert bool(masks["low"][0, 0, 0]) and bool(masks["high"][b - 1, b - 1, b - 1])


def test_band_mask_bad_band():
    with pytest.raises(ValueError, match="band must be one of all, low, middle, high, got 'mid'"):
        band_mask(8, "mid")
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        band_mask(-1, "low")


# -------------------------------------------------------------------------- rounding
def test_soft_round_hits_integers_and_approaches_round():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    for a in (0.5, 0.1, 0.01):
        torch.testing.assert_close(soft_round(x, a), x, rtol=0, atol=1e-12)  # s = 1/(1-a) hits the edges
    # continuous at the cell edges: just below and just above an integer
    eps = 1e-9
    torch.testing.assert_close(
        soft_round(torch.tensor([2 - eps], dtype=torch.float64), 0.2),
        soft_round(torch.tensor([2 + eps], dtype=torch.float64), 0.2),
        rtol=0,
        atol=1e-8,
    )
    # midpoint is fixed; a -> 0 gives hard rounding away from the midpoint (k = ln(2/a - 1) grows
    # only logarithmically, so test points 0.35 or more from the midpoint)
    assert float(soft_round(torch.tensor(0.5, dtype=torch.float64), 0.3)) == pytest.approx(0.5)
    y = torch.tensor([0.1, 0.9, 1.05, -0.85], dtype=torch.float64)
    torch.testing.assert_close(soft_round(y, 1e-6), torch.round(y), rtol=0, atol=1e-3)
    # a known value: a = 0.1, x = 0.25 -> 0.5 * (1 + tanh(ln(19) * -0.25) / 0.9)
    k = math.log(19.0)
    want = 0.5 * (1 + math.tanh(-0.25 * k) / 0.9)
    assert float(soft_round(torch.tensor(0.25, dtype=torch.float64), 0.1)) == pytest.approx(want, abs=1e-12)


def test_soft_round_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(20, dtype=torch.float64, generator=g) * 6 - 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: soft_round(v, 0.1), (x,))
    assert torch.autograd.gradcheck(lambda v: soft_round(v, 0.6), (x,))


@pytest.mark.parametrize("a", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_soft_round_bad_a(a):
    with pytest.raises(ValueError, match="a must be in the open interval"):
        soft_round(torch.zeros(3), a)


def test_ste_round_forward_round_backward_identity():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = ste_round(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, -2.0]))
    (g,) = torch.autograd.grad((y * torch.tensor([1.0, 2.0, 3.0])).sum(), x)
    assert torch.equal(g, torch.tensor([1.0, 2.0, 3.0]))


# ------------------------------------------------------------------------------- FFT
def test_rfft_round_trip_and_radius():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 6, 5, 8, generator=g, dtype=torch.float64)
    spec = rfft3(x)
    assert spec.shape == (2, 1, 6, 5, 5) and spec.is_complex()
    torch.testing.assert_close(irfft3(spec, (6, 5, 8)), x)
    r = rfft_radius((6, 5, 8), dtype=torch.float64)
    assert r.shape == (6, 5, 5)
    assert float(r[0, 0, 0]) == 0.0
    assert float(r[0, 0, 4]) == pytest.approx(1.0)  # Nyquist of the last axis
    assert float(r[3, 0, 0]) == pytest.approx(1.0)  # Nyquist of the first axis (6 is even)
    assert float(r[1, 1, 1]) == pytest.approx(math.sqrt((2 / 6) ** 2 + (2 / 5) ** 2 + (2 / 8) ** 2))


def test_rfft_mask_bands_and_radius():
    size = (8, 8, 8)
    r = rfft_radius(size, dtype=torch.float64)
    low, mid, high = (rfft_mask(size, b) for b in ("low", "middle", "high"))
    assert bool(((low.int() + mid.int() + high.int()) == 1).all())
    assert bool((r[low] < 1 / 3).all()) and bool((r[high] >= 2 / 3).all())
    # bins (kH, kW, kD) in cycles/8 with radius 2k/8 * ... : low keeps DC and the 6 axis neighbours
    # at radius 0.25 plus the 12 diagonal neighbours at 0.354 are excluded -> 1 + 6 = 7 full-spectrum
    # bins, of which the rfft half holds DC, (+-1, 0, 0), (0, +-1, 0), (0, 0, 1) = 6
    assert int(low.sum()) == 6
    ring = rfft_mask(size, "all", radius=(0.2, 0.3))
    assert int(ring.sum()) == 5
    assert not bool(rfft_mask(size, "low", exclude_dc=True)[0, 0, 0])
    with pytest.raises(ValueError, match="radius must be"):
        rfft_mask(size, "all", radius=(0.5, 0.1))
    with pytest.raises(ValueError, match="band must be one of"):
        rfft_mask(size, "hi")


def test_fft_parameterisation_gradcheck():
    g = torch.Generator().manual_seed(0)
    size = (4, 3, 5)
    mask = rfft_mask(size, "all", radius=(0.0, 1.0)).unsqueeze(-1).double()
    assert 0 < int(mask.sum()) < mask.numel()
    z = torch.randn(1, 1, 4, 3, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)

    def whole(v: torch.Tensor) -> torch.Tensor:
        return irfft3(torch.view_as_complex(v * mask), size)

    assert torch.autograd.gradcheck(whole, (z,), fast_mode=True)
    # per-block spectrum mapped back and merged
    zb = torch.randn(1, 1, 2, 1, 2, 2, 2, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)

    def blocks(v: torch.Tensor) -> torch.Tensor:
        return block_merge(irfft3(torch.view_as_complex(v), (2, 2, 2)), (1, 1, 3, 2, 4))

    assert torch.autograd.gradcheck(blocks, (zb,), fast_mode=True)
