"""The defence registry: a contract over every registered transform, a throwaway defence added
with one decorator, the configuration's names, descriptions and the per-case reseeding rule."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from volattack.defenses.adaptive import EOTModel, adaptive_wrapper
from volattack.defenses.config import DefenseConfig, TransformSpec
from volattack.defenses.registry import (
    _DEFENSES,
    build_defense,
    describe_defense,
    get_defense,
    list_defenses,
    register_defense,
    reseed_defense,
)
from volattack.defenses.transforms import InputTransform, RandomNoise
from volattack.ops import seed_from


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_builtin_names():
    assert list_defenses() == ["dct_lowpass", "dct_quant", "gaussian", "median", "noise"]
    import volattack.defenses.config as dc

    assert dc.DEFENSE_TRANSFORMS == tuple(list_defenses())


@pytest.mark.parametrize("name", list_defenses())
def test_contract_of_every_registered_defense(name):
    cls = get_defense(name)
    t = cls()
    assert isinstance(t, InputTransform) and t.defense_name == name
    x = _x()
    out = t(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, _x())  # input untouched
    short = t.describe(with_bpda=False)
    assert short.startswith(f"{cls.__name__}(") and "bpda" not in short
    if hasattr(t, "bpda"):
        assert t.describe().endswith(f"bpda={t.bpda!r})") and not t.differentiable
    assert repr(t) == f"{cls.__name__}({t.describe()[len(cls.__name__) + 1:-1]})"
    if t.randomized:  # reseeding replays; another seed draws anew
        t.reseed(5)
        a = t(x)
        t.reseed(5)
        assert torch.equal(a, t(x))
        t.reseed(6)
        assert not torch.equal(a, t(x))
    else:
        assert torch.equal(out, t(x))


class _Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 2 * x], dim=1)


@pytest.fixture
def throwaway():
    """A defence added in one place, with one decorator (removed afterwards)."""

    @register_defense("test_clip")
    class Clip(InputTransform):
        def __init__(self, lo: float = 0.0, hi: float = 1.0) -> None:
            super().__init__()
            self.lo, self.hi = float(lo), float(hi)

        def describe_args(self) -> list[str]:
            return [f"lo={self.lo}", f"hi={self.hi}"]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(self.lo, self.hi)

    yield Clip
    _DEFENSES._items.pop("test_clip", None)


def test_a_new_defense_is_one_decorator(throwaway):
    assert "test_clip" in list_defenses()
    cfg = DefenseConfig(transforms=[{"name": "test_clip", "params": {"lo": "64/255", "hi": 0.75}}])
    defended = build_defense(_Scale(), cfg)
    x = _x()
    assert torch.equal(defended(x), _Scale()(x.clamp(64 / 255, 0.75)))
    assert describe_defense(defended) == f"Clip(lo={64 / 255}, hi=0.75) -> model"
    adaptive = adaptive_wrapper(defended, "identity")
    assert "exact gradients through Clip" in adaptive.describe()
    with pytest.raises(ValueError, match=r"transforms\[0\] \(test_clip\): unknown parameter 'low'. Did you mean 'lo'"):
        build_defense(_Scale(), DefenseConfig(transforms=[{"name": "test_clip", "params": {"low": 0}}]))


def test_register_defense_rejects_bad_classes():
    with pytest.raises(ValueError, match="must be an InputTransform subclass"):
        register_defense("test_bad")(nn.Identity)

    class Rand(InputTransform):
        randomized = True

    with pytest.raises(ValueError, match=r"is randomized but does not define reseed\(seed\)"):
        register_defense("test_rand")(Rand)
    with pytest.raises(ValueError, match="defense 'noise' is already registered"):
        register_defense("noise")(type("Other", (InputTransform,), {}))
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        register_defense("bad name")
    assert "test_bad" not in list_defenses() and "test_rand" not in list_defenses()


def test_config_names_come_from_the_registry():
    with pytest.raises(ValueError, match=r"name must be one of dct_lowpass, .*noise, got 'jpeg'"):
        TransformSpec("jpeg")
    with pytest.raises(ValueError, match="Did you mean 'median'"):
        TransformSpec("medain")
    with pytest.raises(ValueError, match=r"params.bpda of transform 'median' is not allowed"):
        TransformSpec("median", {"bpda": "none"})
    with pytest.raises(ValueError, match="bpda must be one of none, identity, smooth, got 'identty'"):
        DefenseConfig(transforms=[TransformSpec("median")], bpda="identty")
    assert TransformSpec("noise", {"sigma": "2/255"}).label() == "noise(sigma=2/255)"


def test_describe_defense_leaves_out_the_bpda_mode():
    cfg = DefenseConfig(transforms=[{"name": "median"}, {"name": "dct_quant", "params": {"q": 10}},
                                    {"name": "noise", "params": {"sigma": 0.5}}])
    defended = build_defense(nn.Identity(), cfg)
    assert describe_defense(defended) == (
        "MedianFilter(kernel_size=3) -> DCTQuantization(block_size=8, q=10.0, growth=1.0, intensity_scale=255.0)"
        " -> RandomNoise(sigma=0.5) -> model"
    )
    assert defended.describe().startswith("MedianFilter(kernel_size=3, bpda='none') -> DCTQuantization(")


def test_reseed_defense_follows_the_case_seed_rule():
    """Defender: seed_from(case_seed, transform seed, module position, 1); attacker EOT: case_seed."""
    cfg = DefenseConfig(transforms=[{"name": "gaussian"}, {"name": "noise", "params": {"sigma": 0.1, "seed": 3}}],
                        eot_samples=2)
    defended = build_defense(nn.Conv3d(1, 1, 1), cfg)
    adaptive = adaptive_wrapper(defended, cfg.bpda, cfg.eot_samples, seed=0)
    reseed_defense(defended, [adaptive, adaptive], 11)
    j, noise = next((j, m) for j, m in enumerate(defended.modules()) if isinstance(m, RandomNoise))
    want = torch.Generator().manual_seed(seed_from(11, 3, j, 1))
    assert torch.equal(noise.generator.get_state(), want.get_state())
    eot = next(m for m in adaptive.modules() if isinstance(m, EOTModel))
    assert torch.equal(eot.generator.get_state(), torch.Generator().manual_seed(11).get_state())
    # a case's scoring draws do not depend on what ran before
    x = _x()
    first = defended(x)
    defended(x)
    reseed_defense(defended, [adaptive], 11)
    assert torch.equal(defended(x), first)


def test_config_modules_stay_light():
    code = ("import sys; import volattack.defenses.config, volattack.evaluation.config, volattack.defenses.registry; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
