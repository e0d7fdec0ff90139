"""Model zoo: MONAI 3D segmentation networks by name.

``create_model("unet", in_channels=1, out_channels=5, channels=(16, 32, 64))`` builds a
MONAI network with ``spatial_dims=3``. Every entry has small, CPU-friendly defaults that
any keyword argument of the MONAI constructor overrides; an unknown keyword is an error
(never silently ignored), so a typo in a config file cannot train the wrong network.

Registered names: ``unet`` (Ronneberger et al. 2015 / Kerfoot et al. 2018 residual
units, ``monai.networks.nets.UNet``), ``segresnet`` (Myronenko 2018,
``monai.networks.nets.SegResNet``), ``unetr`` (Hatamizadeh et al. 2022,
``monai.networks.nets.UNETR``), ``swin_unetr`` (Hatamizadeh et al. 2022,
``monai.networks.nets.SwinUNETR``).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any, Callable

import torch.nn as nn

from volattack.registry import Registry, suggest

logger = logging.getLogger(__name__)

MODELS: Registry[nn.Module] = Registry("model")

# Arguments that the zoo sets itself and a caller may not pass as keyword arguments.
_FIXED = ("spatial_dims", "in_channels", "out_channels")


def _allowed_kwargs(cls: type) -> list[str]:
    """Keyword arguments of ``cls.__init__`` that a caller may set (all but the fixed ones)."""
    params = inspect.signature(cls.__init__).parameters
    return sorted(
        p
        for p, v in params.items()
        if p != "self" and p not in _FIXED and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)
    )


def _build(
    name: str,
    cls: type,
    defaults: dict[str, Any],
    in_channels: int,
    out_channels: int,
    kwargs: dict[str, Any],
) -> nn.Module:
    """Instantiate MONAI network ``cls`` with ``defaults`` updated by ``kwargs``.

    Raises:
        ValueError: a keyword that ``cls`` does not take (named, with a suggestion), a
            fixed argument passed as keyword, or a constructor that rejects the values.
    """
    allowed = _allowed_kwargs(cls)
    for key in kwargs:
        if key in _FIXED:
            raise ValueError(
                f"Model '{name}': keyword argument '{key}' is set by the zoo "
                f"(spatial_dims=3; channels via in_channels/out_channels), got {key}={kwargs[key]!r}."
            )
        if key not in allowed:
            raise ValueError(
                f"Unknown keyword argument '{key}' for model '{name}'.{suggest(key, allowed)} "
                f"Valid keyword arguments: {', '.join(allowed)}."
            )
    args = {**defaults, **kwargs}
    try:
        return cls(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **args)
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        raise ValueError(f"Cannot build model '{name}' with arguments {args!r}: {e}") from e


@MODELS.register("unet")
def unet(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """MONAI residual U-Net (Ronneberger et al., MICCAI 2015; Kerfoot et al., STACOM 2018).

    Defaults: ``channels=(16, 32, 64, 128)``, ``strides=(2, 2, 2)``, ``num_res_units=1``,
    instance norm. The spatial size of the input must be divisible by the product of
    ``strides`` (8 by default).

    Args:
        in_channels: input channels C.
        out_channels: number of classes K (background included).
        **kwargs: any other ``monai.networks.nets.UNet`` argument.

    Shape:
        (B, C, H, W, D) -> (B, K, H, W, D) logits.
    """
    from monai.networks.nets import UNet

    defaults = {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1}
    channels = kwargs.get("channels", defaults["channels"])
    strides = kwargs.get("strides", defaults["strides"])
    if "channels" in kwargs and "strides" not in kwargs:
        strides = (2,) * max(len(channels) - 1, 0)
        kwargs = {**kwargs, "strides": strides}
    if len(channels) < 2 or len(strides) != len(channels) - 1:
        raise ValueError(
            f"Model 'unet': len(strides) must be len(channels) - 1 with at least 2 channels, "
            f"got channels={list(channels)}, strides={list(strides)}."
        )
    return _build("unet", UNet, defaults, in_channels, out_channels, kwargs)


@MODELS.register("segresnet")
def segresnet(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """MONAI SegResNet (Myronenko, "3D MRI brain tumor segmentation using autoencoder
    regularization", BrainLes 2018), without the VAE branch.

    Defaults: ``init_filters=8``, ``blocks_down=(1, 2, 2)``, ``blocks_up=(1, 1)``. The input
    spatial size must be divisible by ``2 ** (len(blocks_down) - 1)``.

    Args:
        in_channels: input channels C.
        out_channels: number of classes K.
        **kwargs: any other ``monai.networks.nets.SegResNet`` argument.

    Shape:
        (B, C, H, W, D) -> (B, K, H, W, D) logits.
    """
    from monai.networks.nets import SegResNet

    defaults = {"init_filters": 8, "blocks_down": (1, 2, 2), "blocks_up": (1, 1)}
    return _build("segresnet", SegResNet, defaults, in_channels, out_channels, kwargs)


@MODELS.register("unetr")
def unetr(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """MONAI UNETR (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image
    Segmentation", WACV 2022).

    Defaults (small, CPU-friendly): ``img_size=(32, 32, 32)``, ``feature_size=8``,
    ``hidden_size=96``, ``mlp_dim=192``, ``num_heads=4``. The network only accepts inputs
    of exactly ``img_size`` (use a sliding-window inferer for whole volumes); each entry of
    ``img_size`` must be divisible by the patch size 16.

    Args:
        in_channels: input channels C.
        out_channels: number of classes K.
        **kwargs: any other ``monai.networks.nets.UNETR`` argument.

    Shape:
        (B, C, *img_size) -> (B, K, *img_size) logits.
    """
    from monai.networks.nets import UNETR

    defaults = {
        "img_size": (32, 32, 32),
        "feature_size": 8,
        "hidden_size": 96,
        "mlp_dim": 192,
        "num_heads": 4,
    }
    img_size = kwargs.get("img_size", defaults["img_size"])
    sizes = [img_size] * 3 if isinstance(img_size, int) else list(img_size)
    if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 16 or s % 16 for s in sizes):
        raise ValueError(
            f"Model 'unetr': img_size must be 3 positive multiples of the patch size 16, got {img_size!r}."
        )
    return _build("unetr", UNETR, defaults, in_channels, out_channels, kwargs)


@MODELS.register("swin_unetr")
def swin_unetr(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """MONAI SwinUNETR (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic
    Segmentation of Brain Tumors in MRI Images", BrainLes 2021).

    MONAI >= 1.5 takes no ``img_size``; any input whose spatial size is divisible by 32
    works. Defaults (small): ``feature_size=12`` (must be divisible by 12),
    ``depths=(1, 1, 1, 1)``, ``num_heads=(3, 3, 3, 3)``, ``window_size=4`` and group
    normalisation with 3 groups in the convolutional blocks (``norm_name``): the paper's
    instance norm cannot normalise the 1x1x1 bottleneck that a 32^3 input produces; pass
    ``norm_name="instance"`` for inputs of 64^3 or more.

    Args:
        in_channels: input channels C.
        out_channels: number of classes K.
        **kwargs: any other ``monai.networks.nets.SwinUNETR`` argument.

    Shape:
        (B, C, H, W, D) -> (B, K, H, W, D) logits, H, W, D divisible by 32.
    """
    if importlib.util.find_spec("einops") is None:
        raise ImportError(
            "Model 'swin_unetr' needs the 'einops' package (MONAI's SwinUNETR uses it): "
            "pip install einops."
        )
    from monai.networks.nets import SwinUNETR

    defaults = {
        "feature_size": 12,
        "depths": (1, 1, 1, 1),
        "num_heads": (3, 3, 3, 3),
        "window_size": 4,
        "norm_name": ("group", {"num_groups": 3}),
    }
    return _build("swin_unetr", SwinUNETR, defaults, in_channels, out_channels, kwargs)


def _check_channels(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def create_model(name: str, in_channels: int = 1, out_channels: int = 5, **kwargs: Any) -> nn.Module:
    """Build the registered 3D segmentation network ``name``.

    Args:
        name: a registered name (``list_models()``): ``unet``, ``segresnet``, ``unetr``,
            ``swin_unetr``.
        in_channels: input channels C (1 for CT).
        out_channels: number of classes K including background.
        **kwargs: constructor arguments of the MONAI network overriding the zoo's defaults.

    Returns:
        The network in training mode, on CPU, mapping images to logits.

    Shape:
        (B, C, H, W, D) -> (B, K, H, W, D).

    Raises:
        ValueError: unknown name (with a "did you mean"), channels < 1, unknown keyword
            argument (named, with the model), or values the constructor rejects.
    """
    builder: Callable[..., nn.Module] = MODELS.get(name)
    _check_channels("in_channels", in_channels)
    _check_channels("out_channels", out_channels)
    model = builder(in_channels, out_channels, **kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("Built model '%s' (%d parameters).", name, n_params)
    return model


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return MODELS.names()
