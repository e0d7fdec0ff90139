"""External models: TorchScript archives and MONAI bundles (trust gate, strict weights); the
deprecated ``volattack.models.external`` names still work."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from volattack.models.checkpoint import save_checkpoint
from volattack.models.config import ModelConfig
from volattack.models.sources import load_model
from volattack.models.sources.monai_bundle import load_bundle
from volattack.models.sources.torchscript import is_torchscript_archive, load_torchscript
from volattack.models.zoo import create_model

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
             "num_res_units": 0}


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.drop = nn.Dropout3d(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x))


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


@pytest.fixture
def ts_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = TinyConv().eval()
    path = tmp_path / "net.ts"
    _script(net).save(str(path))
    return path, net


def _x() -> torch.Tensor:
    return torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_round_trip_in_eval_mode(ts_file):
    path, net = ts_file
    loaded = load_torchscript(path)
    assert not loaded.training  # dropout off: deterministic and equal to the eager module
    x = _x()
    torch.testing.assert_close(loaded(x), net(x))
    torch.testing.assert_close(loaded(x), loaded(x))
    assert is_torchscript_archive(path)


def test_torchscript_missing_and_corrupt(tmp_path, ts_file):
    with pytest.raises(FileNotFoundError, match=r"TorchScript file not found: .*nope\.ts"):
        load_torchscript(tmp_path / "nope.ts")
    bad = tmp_path / "bad.ts"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"Cannot load TorchScript file .*bad\.ts"):
        load_torchscript(bad)
    truncated = tmp_path / "trunc.ts"
    truncated.write_bytes(ts_file[0].read_bytes()[:300])
    with pytest.raises(ValueError, match=r"Cannot load TorchScript file .*trunc\.ts"):
        load_torchscript(truncated)
    sd = tmp_path / "sd.pt"
    torch.save(TinyConv().state_dict(), sd)
    assert not is_torchscript_archive(sd)
    with pytest.raises(ValueError, match=r"sd\.pt.*torch\.save checkpoint, not TorchScript"):
        load_torchscript(sd)
    with pytest.raises(ValueError, match="must be a TorchScript file, got the directory"):
        load_torchscript(tmp_path)


# --------------------------------------------------------------------------- bundles


def _write_bundle(root: Path, *, state: dict | None = None, config: dict | None = None,
                  wrap: str | None = None) -> tuple[Path, nn.Module]:
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    net = UNet(**UNET_ARGS).eval()
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    cfg = config if config is not None else {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "network_def": {"_target_": "monai.networks.nets.UNet", **UNET_ARGS},
        "network": "$@network_def.to(torch.device('cpu'))",
    }
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    (root / "configs" / "metadata.json").write_text(json.dumps({"name": "tiny", "version": "0.1"}))
    sd = state if state is not None else net.state_dict()
    torch.save({wrap: sd} if wrap else sd, root / "models" / "model.pt")
    return root, net


def test_bundle_requires_trust(tmp_path):
    bundle, _ = _write_bundle(tmp_path / "b")
    with pytest.raises(ValueError, match=r"trust_bundle is False .*runs code from its config.*--trust-bundle"):
        load_bundle(bundle)
    with pytest.raises(ValueError, match="--trust-bundle"):
        load_model(bundle)


@pytest.mark.parametrize("wrap", [None, "model"])
def test_bundle_trusted_loads_same_outputs(tmp_path, wrap):
    bundle, net = _write_bundle(tmp_path / "b", wrap=wrap)
    loaded = load_bundle(bundle, trust_bundle=True)
    assert not loaded.training
    x = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(x), net(x))
    loaded = load_model(bundle, trust_bundle=True)
    assert loaded.info["format"] == "monai-bundle" and loaded.info["metadata"]["name"] == "tiny"
    torch.testing.assert_close(loaded.module(x), net(x))


def test_bundle_strict_weights_name_keys_and_path(tmp_path):
    from monai.networks.nets import UNet

    sd = UNet(**UNET_ARGS).state_dict()
    first = next(iter(sd))
    sd_missing = {k: v for k, v in sd.items() if k != first}
    bundle, _ = _write_bundle(tmp_path / "a", state=sd_missing)
    with pytest.raises(ValueError, match=rf"model\.pt.*do not fit.*missing keys: {first}"):
        load_bundle(bundle, trust_bundle=True)
    sd_extra = dict(sd, **{"extra.weight": torch.zeros(1)})
    bundle, _ = _write_bundle(tmp_path / "b", state=sd_extra)
    with pytest.raises(ValueError, match=r"model\.pt.*unexpected keys: extra\.weight"):
        load_bundle(bundle, trust_bundle=True)
    sd_shape = dict(sd, **{first: torch.zeros(1, 1, 1)})
    bundle, _ = _write_bundle(tmp_path / "c", state=sd_shape)
    with pytest.raises(ValueError, match=r"shape mismatches: .*\(1, 1, 1\)"):
        load_bundle(bundle, trust_bundle=True)


def test_bundle_bad_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="Bundle directory not found"):
        load_bundle(tmp_path / "missing", trust_bundle=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a MONAI bundle"):
        load_bundle(tmp_path / "empty", trust_bundle=True)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="bundle_dir must be a MONAI bundle directory, got the file"):
        load_bundle(f, trust_bundle=True)
    bundle, _ = _write_bundle(tmp_path / "nodef", config={"net": {"_target_": "torch.nn.Identity"}})
    with pytest.raises(ValueError, match=r"network_key 'network_def' not found .*available keys: \['bundle_root', 'net'\]"):
        load_bundle(bundle, trust_bundle=True)
    bundle, _ = _write_bundle(tmp_path / "nomod", config={"network_def": {"_target_": "builtins.dict"}})
    with pytest.raises(ValueError, match="must build a torch.nn.Module, got dict"):
        load_bundle(bundle, trust_bundle=True)
    bundle, _ = _write_bundle(tmp_path / "noweights")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights: expected models/model.pt or models/model.ts"):
        load_bundle(bundle, trust_bundle=True)
    bundle, _ = _write_bundle(tmp_path / "pickled")
    torch.save({"model": TinyConv()}, bundle / "models" / "model.pt")  # a pickled module: refused
    with pytest.raises(ValueError, match=r"cannot be loaded safely.*weights_only=True"):
        load_bundle(bundle, trust_bundle=True)


def test_bundle_with_only_torchscript(tmp_path, ts_file):
    bundle = tmp_path / "tsb"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.ts").write_bytes(ts_file[0].read_bytes())
    model = load_bundle(bundle, trust_bundle=True)
    x = _x()
    torch.testing.assert_close(model(x), ts_file[1](x))


# --------------------------------------------------------------------------- deprecated module


def test_deprecated_external_names(tmp_path, ts_file):
    from volattack.models import external

    assert external.load_torchscript is load_torchscript and external.load_bundle is load_bundle
    cfg = ModelConfig(name="unet", in_channels=1, out_channels=3, kwargs={"channels": [4, 8], "strides": [2]})
    ref = create_model(cfg.name, cfg.in_channels, cfg.out_channels, **cfg.kwargs).eval()
    ck = save_checkpoint(tmp_path / "ck.pt", ref, cfg, epoch=2)
    with pytest.warns(DeprecationWarning, match="use volattack.load_model"):
        model, info = external.load_any_model(ck)
    assert info["format"] == "volattack-checkpoint" and info["epoch"] == 2 and info["model"]["name"] == "unet"
    torch.testing.assert_close(model(_x()), ref(_x()))
