"""Model zoo: every registered model builds and maps volumes to logits; bad input raises."""

from __future__ import annotations

import pytest
import torch

from volattack.models.zoo import MODELS, create_model, list_models


def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"unet", "segresnet", "unetr", "swin_unetr"} <= set(names)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_maps_volume_to_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, out_channels=3).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 32, 32, 32)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_trains_one_step_on_32_cubed(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, out_channels=2).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.rand(1, 1, 32, 32, 32)).mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_kwargs_override_defaults() -> None:
    small = create_model("unet", 1, 2, channels=(4, 8), strides=(2,))
    default = create_model("unet", 1, 2)
    n_small = sum(p.numel() for p in small.parameters())
    n_default = sum(p.numel() for p in default.parameters())
    assert n_small < n_default
    # channels alone: strides default to 2 per level
    model = create_model("unet", 2, 4, channels=[4, 8, 16])
    assert model(torch.rand(1, 2, 16, 16, 16)).shape == (1, 4, 16, 16, 16)


def test_multichannel_input() -> None:
    model = create_model("segresnet", in_channels=2, out_channels=4).eval()
    assert model(torch.rand(2, 2, 16, 16, 16)).shape == (2, 4, 16, 16, 16)


def test_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match=r"Unknown model 'unett'.*Did you mean.*'unet'"):
        create_model("unett", 1, 2)


@pytest.mark.parametrize("param", ["in_channels", "out_channels"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_channels(param: str, value: object) -> None:
    kwargs = {"in_channels": 1, "out_channels": 2, param: value}
    with pytest.raises(ValueError, match=rf"{param} must be an integer >= 1, got {value!r}"):
        create_model("unet", **kwargs)


def test_unknown_kwarg_names_kwarg_and_model() -> None:
    with pytest.raises(ValueError, match=r"Unknown keyword argument 'init_filter' for model 'segresnet'.*'init_filters'"):
        create_model("segresnet", 1, 2, init_filter=4)
    with pytest.raises(ValueError, match=r"'foo' for model 'unet'"):
        create_model("unet", 1, 2, foo=1)


def test_fixed_kwarg_rejected() -> None:
    with pytest.raises(ValueError, match=r"Model 'unet'.*'spatial_dims'.*spatial_dims=2"):
        create_model("unet", 1, 2, spatial_dims=2)


def test_bad_values_raise_value_error() -> None:
    with pytest.raises(ValueError, match=r"Model 'unet': len\(strides\).*channels=\[8, 16\], strides=\[2, 2\]"):
        create_model("unet", 1, 2, channels=(8, 16), strides=(2, 2))
    with pytest.raises(ValueError, match=r"Model 'unetr': img_size.*\(30, 30, 30\)"):
        create_model("unetr", 1, 2, img_size=(30, 30, 30))
    with pytest.raises(ValueError, match=r"Cannot build model 'swin_unetr'.*feature_size"):
        create_model("swin_unetr", 1, 2, feature_size=10)
