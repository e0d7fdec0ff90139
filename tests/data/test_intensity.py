"""Intensity models: known values, round trips, bounds, gradients and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRanged

from volattack.data.config import PreprocessConfig
from volattack.data.intensity import (
    IntensityModel,
    PercentileIntensity,
    WindowIntensity,
    ZScoreIntensity,
    intensity_from_preprocess,
)
from volattack.data.transforms import ApplyIntensityd


def test_ct_window_known_values():
    w = WindowIntensity(-175.0, 250.0, 0.0, 1.0)
    assert w.unit_scale == 425.0 and w.bounds == (0.0, 1.0) and w.units == "HU"
    assert w.to_source(0.5) == 37.5
    assert abs(8 / 255 * w.unit_scale - 13.333) < 1e-3
    assert w.from_source(37.5) == 0.5
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 1000.0], np.float32)
    out = w.from_source(hu)
    assert out.dtype == np.float32 and np.allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    # clipped values come back at the window's limits
    assert np.allclose(w.to_source(out), [-175.0, -175.0, 37.5, 250.0, 250.0])
    d = w.describe()
    assert d == {"kind": "window", "a_min": -175.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0, "units": "HU",
                 "bounds": [0.0, 1.0], "unit_scale": 425.0}


def test_window_is_bit_identical_to_monai_scale_intensity_range():
    g = torch.Generator().manual_seed(0)
    x = MetaTensor(torch.rand(1, 20, 20, 12, generator=g) * 3000 - 1024)
    for a, b, lo, hi in [(-175, 250, 0, 1), (-57.3, 301.9, -1.0, 0.9)]:
        ref = ScaleIntensityRanged("image", a_min=a, a_max=b, b_min=lo, b_max=hi, clip=True)({"image": x.clone()})
        out = ApplyIntensityd(["image"], WindowIntensity(a, b, lo, hi))({"image": x.clone()})
        assert isinstance(out["image"], MetaTensor)
        assert torch.equal(ref["image"].as_tensor(), out["image"].as_tensor())


def test_round_trips_inside_the_bounds():
    g = torch.Generator().manual_seed(1)
    models: list[IntensityModel] = [
        WindowIntensity(-100.0, 300.0, -1.0, 1.0),
        ZScoreIntensity(mean=50.0, std=120.0, clip=(-200.0, 400.0)),
        ZScoreIntensity(mean=-3.0, std=2.0),
    ]
    for m in models:
        lo, hi = m.bounds
        lo, hi = max(lo, -5.0), min(hi, 5.0)
        x = torch.rand(2, 1, 4, 4, 4, generator=g, dtype=torch.float64) * (hi - lo) + lo
        assert torch.allclose(m.from_source(m.to_source(x)), x, atol=1e-12), m
        v = np.linspace(-100.0, 250.0, 11)  # inside every clip range
        back = m.to_source(m.from_source(v))
        assert np.allclose(back, v), m


def test_zscore_known_values_and_bounds():
    z = ZScoreIntensity(mean=40.0, std=20.0, clip=(-60.0, 140.0))
    assert z.bounds == (-5.0, 5.0) and z.unit_scale == 20.0
    assert z.from_source(80.0) == 2.0 and z.from_source(1000.0) == 5.0 and z.from_source(-1000.0) == -5.0
    assert z.to_source(-1.5) == 10.0
    assert ZScoreIntensity(mean=0.0, std=1.0).bounds == (-math.inf, math.inf)
    assert ZScoreIntensity(mean=0.0, std=1.0).pad_value == 0.0 and z.pad_value == -5.0
    assert z.describe()["clip"] == [-60.0, 140.0] and z.describe()["kind"] == "zscore"


def test_percentile_per_image_known_values_numpy_and_torch():
    p = PercentileIntensity(lower=0.0, upper=100.0, b_min=0.0, b_max=1.0)
    v = np.arange(11, dtype=np.float32) * 10.0 + 100.0  # 100 .. 200
    assert np.allclose(p.from_source(v), np.linspace(0, 1, 11))
    assert p.unit_scale is None and p.bounds == (0.0, 1.0) and p.units == "a.u."
    w = p.fit(v)
    assert (w.a_min, w.a_max) == (100.0, 200.0)
    assert p.to_source(0.5, reference=v) == 150.0
    # 10th and 90th percentiles with linear interpolation, like numpy; torch agrees
    q = PercentileIntensity(lower=10.0, upper=90.0)
    t = torch.tensor(v)
    assert np.allclose(q.source_window(v), np.percentile(v, [10, 90]))
    assert torch.allclose(torch.stack(q.source_window(t)), torch.tensor(np.percentile(v, [10, 90]), dtype=t.dtype))
    assert np.allclose(q.from_source(t).numpy(), q.from_source(v), atol=1e-6)
    # a batch: percentiles per sample, so a sample's mapping ignores its batch-mates
    b = torch.stack([t, t * 3.0]).reshape(2, 1, 11, 1, 1)
    out = q.from_source(b)
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], q.from_source(b[:1])[0])


def test_percentile_to_source_needs_the_reference_image():
    with pytest.raises(ValueError, match="reference is None: a percentile mapping depends on the image"):
        PercentileIntensity().to_source(0.5)
    with pytest.raises(ValueError, match="constant between its percentiles"):
        PercentileIntensity().fit(np.ones(5))
    assert np.allclose(PercentileIntensity().from_source(np.full(4, 7.0)), 0.0)  # constant image: b_min


def test_torch_mappings_are_differentiable():
    w = WindowIntensity(0.0, 100.0, 0.0, 1.0)
    v = torch.tensor([50.0, 150.0], requires_grad=True)
    w.from_source(v).sum().backward()
    assert torch.allclose(v.grad, torch.tensor([0.01, 0.0]))  # zero gradient where clipped
    x = torch.tensor([0.25], requires_grad=True)
    ZScoreIntensity(mean=1.0, std=4.0).to_source(x).sum().backward()
    assert x.grad.item() == 4.0
    s = torch.linspace(0, 1, 101, requires_grad=True)
    PercentileIntensity(5.0, 95.0).from_source(s).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_from_preprocess_uses_the_window_and_units():
    m = intensity_from_preprocess(PreprocessConfig(a_min=0.0, a_max=600.0, b_min=-1.0, b_max=1.0, units="a.u."))
    assert m == WindowIntensity(0.0, 600.0, -1.0, 1.0, units="a.u.") and m.unit_scale == 300.0
    with pytest.raises(ValueError, match="cfg must be a PreprocessConfig"):
        intensity_from_preprocess({"a_min": 0})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: WindowIntensity(10.0, 10.0), "a_max must be > a_min, got a_min=10.0, a_max=10.0"),
        (lambda: WindowIntensity(0.0, 1.0, 1.0, 0.0), "b_max must be > b_min"),
        (lambda: WindowIntensity(float("nan"), 1.0), "a_min must be finite"),
        (lambda: WindowIntensity("0", 1.0), "a_min must be a number, got '0'"),
        (lambda: WindowIntensity(units=""), "units must be a non-empty label"),
        (lambda: ZScoreIntensity(std=0.0), "std must be > 0, got 0.0"),
        (lambda: ZScoreIntensity(clip=(5.0, 1.0)), r"clip must have lo < hi, got \(5.0, 1.0\)"),
        (lambda: ZScoreIntensity(clip=5.0), "clip must be None or"),
        (lambda: PercentileIntensity(lower=50.0, upper=40.0), "upper must be > lower"),
        (lambda: PercentileIntensity(upper=101.0), "upper must be <= 100"),
        (lambda: PercentileIntensity(clip="yes"), "clip must be True or False"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    w = WindowIntensity()
    assert torch.equal(w.from_source(torch.tensor([-175, 250], dtype=torch.int16)), torch.tensor([0.0, 1.0]))
    assert w.from_source(np.array([-175, 250], np.int16)).dtype == np.float32  # integer scans become float32
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got dtype torch.int64"):
        w.to_source(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="v must be a floating-point tensor, got dtype torch.bool"):
        w.from_source(torch.tensor([True]))
    with pytest.raises(ValueError, match="x must be a torch.Tensor, a numpy array or a number, got str"):
        w.to_source("0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x must be a floating-point array"):
        w.to_source(np.array([1, 2]))
    with pytest.raises(ValueError, match="intensity must be an IntensityModel"):
        ApplyIntensityd(["image"], "window")  # type: ignore[arg-type]
