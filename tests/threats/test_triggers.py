"""Backdoor triggers: registry, identity at zero strength, FIBA's kept phase, the learned trigger's
budget, seeded replay, perceptibility by hand, and triggers that do not fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from volattack.threats.triggers import create_trigger, list_triggers, low_frequency_cube, tile_to

HU = 425.0  # source units per model-input unit of the CT window [-175, 250] -> [0, 1]
WIDE = (-1e3, 1e3)  # bounds that never clamp, for exact identities


def volume(shape=(1, 1, 16, 12, 10), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 0.6 + 0.2


def test_registry_lists_the_four_triggers_and_suggests() -> None:
    assert {"patch", "spectral", "dct", "learned"} <= set(list_triggers())
    with pytest.raises(ValueError, match="Did you mean 'spectral'"):
        create_trigger("spectrl")
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        create_trigger("spectral", alpha=1.5)
    with pytest.raises(ValueError, match="unexpected keyword"):
        create_trigger("patch", colour=3)


@pytest.mark.parametrize("name,params", [("patch", {"intensity": 0.0}), ("spectral", {"alpha": 0.0}),
                                         ("spectral", {"alpha": 0.0, "block_size": 4}), ("dct", {"rms": 0.0}),
                                         ("learned", {"eps": 0.0, "tile": 4})])
def test_zero_strength_is_the_identity(name: str, params: dict) -> None:
    x = volume()
    t = create_trigger(name, bounds=(0.0, 1.0), unit_scale=HU, seed=3, **params)
    assert torch.equal(t(x), x)
    stats = t.perceptibility(x, t(x))
    assert stats["linf_units"] == 0 and stats["ssim"] == pytest.approx(1.0)


@pytest.mark.parametrize("block_size", [None, 4])
def test_spectral_trigger_keeps_the_phase_and_changes_only_the_low_band(block_size) -> None:
    x = volume((1, 1, 16, 16, 12))
    t = create_trigger("spectral", bounds=WIDE, unit_scale=HU, alpha=0.3, beta=0.25, block_size=block_size)
    y = t(x)
    assert not torch.allclose(y, x)
    if block_size is None:
        fx, fy = torch.fft.fftn(x[0, 0]), torch.fft.fftn(y[0, 0])
    else:
        from volattack.attacks.spectral import block_split

        fx = torch.fft.fftn(block_split(x, 4), dim=(-3, -2, -1))
        fy = torch.fft.fftn(block_split(y, 4), dim=(-3, -2, -1))
    nz = (fx.abs() > 1e-8) & (fy.abs() > 1e-8)
    assert nz.float().mean() > 0.9
    # same phase where both amplitudes are nonzero: the unit phasors agree
    assert torch.allclose((fx / fx.abs())[nz], (fy / fy.abs())[nz], atol=1e-8)
    if block_size is None:  # outside the centred low-frequency cube the amplitude is untouched
        band = torch.fft.ifftshift(low_frequency_cube(fx.shape, 0.25))
        assert torch.allclose(fx.abs()[~band], fy.abs()[~band], atol=1e-8)
        assert not torch.allclose(fx.abs()[band], fy.abs()[band])


def test_low_frequency_cube_half_width_by_hand() -> None:
    m = low_frequency_cube((10, 10, 10), 0.1)  # half-width floor(0.1 * 10) = 1 around index 5
    assert m.sum() == 27 and bool(m[4:7, 4:7, 4:7].all())


def test_patch_size_position_and_perceptibility_by_hand() -> None:
    x = torch.full((1, 1, 10, 10, 10), 0.5, dtype=torch.float64)
    t = create_trigger("patch", bounds=(0.0, 1.0), unit_scale=HU, size=1, position=[0.0, 0.0, 0.0],
                       intensity=42.5)
    y = t(x)
    assert torch.allclose(y[0, 0, 0, 0, 0], torch.tensor(0.6, dtype=torch.float64))  # + 42.5 HU = +0.1
    assert int((y != x).sum()) == 1
    stats = t.perceptibility(x, y)
    assert stats["linf_units"] == pytest.approx(42.5)
    assert stats["rms_units"] == pytest.approx(42.5 / math.sqrt(1000))


def test_patch_position_in_world_mm() -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 0.0, 6.0]
    t = create_trigger("patch", bounds=WIDE, unit_scale=None, size=[2, 2, 1], position_mm=[-2.0, 8.0, 12.0],
                       intensity=1.0)
    box = t.box((10, 10, 10), affine)  # world (-2, 8, 12) is voxel (4, 4, 2)
    assert box == [(3, 5), (3, 5), (2, 3)]
    assert int(t.mask(torch.zeros(1, 1, 10, 10, 10), affine).sum()) == 4


def test_a_trigger_that_does_not_fit_is_refused() -> None:
    x = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"does not fit in the volume of shape \[8, 8, 8\]"):
        create_trigger("patch", size=10)(x)
    with pytest.raises(ValueError, match="does not fit"):
        create_trigger("patch", size=4, position=[1.0, 1.0, 1.0])(x)
    with pytest.raises(ValueError, match="block_size=16 does not fit"):
        create_trigger("dct", block_size=16)(x)
    with pytest.raises(ValueError, match="tile=12 does not fit"):
        create_trigger("learned", tile=12)(x)
    with pytest.raises(ValueError, match="position_mm needs the volume's affine"):
        create_trigger("patch", size=2, position_mm=[0, 0, 0])(x)


def test_dct_trigger_rms_in_source_units_and_periodic() -> None:
    x = volume((1, 1, 16, 16, 8))
    t = create_trigger("dct", bounds=WIDE, unit_scale=HU, rms=5.0, block_size=8, band="middle")
    d = t(x) - x
    assert t.perceptibility(x, t(x))["rms_units"] == pytest.approx(5.0, rel=1e-6)
    assert torch.allclose(d[..., :8, :, :], d[..., 8:, :, :])  # the same pattern in every block


@pytest.mark.parametrize("name,params", [("spectral", {"alpha": 0.2}), ("dct", {"rms": 3.0}),
                                         ("learned", {"eps": 8.0, "tile": 4}), ("spectral", {"alpha": 0.2, "block_size": 4})])
def test_seeded_replay(name: str, params: dict) -> None:
    x = volume()
    a = create_trigger(name, bounds=(0.0, 1.0), unit_scale=HU, seed=5, **params)(x)
    b = create_trigger(name, bounds=(0.0, 1.0), unit_scale=HU, seed=5, **params)(x)
    c = create_trigger(name, bounds=(0.0, 1.0), unit_scale=HU, seed=6, **params)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.get_rng_state()
    create_trigger(name, seed=5, **params)
    assert torch.equal(torch.get_rng_state(), g)  # a local generator: the global stream is untouched


def test_learned_trigger_keeps_its_budget_and_lowers_the_loss(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).double()
    x = volume((1, 1, 12, 12, 12))
    target = torch.ones(1, 1, 12, 12, 12, dtype=torch.long)
    t = create_trigger("learned", bounds=(0.0, 1.0), unit_scale=HU, eps=8.0, tile=4, steps=10, seed=1)

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(net(t(x)), target[:, 0]))

    before = loss()
    t.fit(net, [x], [target])
    assert float(t.pattern.abs().max()) <= 8.0 / HU + 1e-12
    assert t.perceptibility(x, t(x))["linf_units"] <= 8.0 + 1e-9
    assert loss() < before
    path = t.save(tmp_path / "trigger.pt")
    again = create_trigger("learned", bounds=(0.0, 1.0), unit_scale=HU, eps=8.0, tile=4, pattern=str(path))
    assert torch.equal(again(x), t(x))
    with pytest.raises(ValueError, match="exceeds eps=4.0"):
        create_trigger("learned", bounds=(0.0, 1.0), unit_scale=HU, eps=4.0, tile=4, pattern=str(path))


def test_tile_to_repeats_from_the_origin() -> None:
    p = torch.arange(8.0).reshape(1, 2, 2, 2)
    out = tile_to(p, (3, 4, 2))
    assert out.shape == (1, 3, 4, 2) and torch.equal(out[:, 2:, 2:], p[:, :1, :2])


def test_keep_dc_leaves_the_block_means_unchanged() -> None:
    from volattack.attacks.spectral import block_split

    x = volume((1, 1, 8, 8, 8))
    y = create_trigger("spectral", bounds=WIDE, alpha=0.5, beta=0.25, block_size=4, keep_dc=True)(x)
    means = lambda v: block_split(v, 4).mean((-3, -2, -1))  # noqa: E731
    assert not torch.allclose(y, x) and torch.allclose(means(y), means(x), atol=1e-12)
    z = create_trigger("spectral", bounds=WIDE, alpha=0.5, beta=0.25, block_size=4)(x)
    assert not torch.allclose(means(z), means(x))  # FIBA's blend moves the means too
