"""Checkpoints: round trip, atomic save, safe loading and strict errors naming the file."""

from __future__ import annotations

import fractions
import pickle
import re
from pathlib import Path

import pytest
import torch

from volattack.models.checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from volattack.models.config import ModelConfig
from volattack.models.zoo import create_model

SMALL = {"channels": [4, 8], "strides": [2]}


def _small_cfg(**kw: object) -> ModelConfig:
    return ModelConfig(name="unet", in_channels=1, out_channels=3, kwargs={**SMALL, **kw})


def _build(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(cfg.name, cfg.in_channels, cfg.out_channels, **cfg.kwargs)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, ModelConfig]:
    cfg = _small_cfg()
    model = _build(cfg)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, epoch=3, seed=7, metrics={"dice": 0.5})
    return path, model, cfg


def _raw(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_round_trip_identical_outputs(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path, model, _ = saved
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(2, 1, 16, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info["epoch"] == 3 and info["seed"] == 7 and info["metrics"] == {"dice": 0.5}
    assert info["model"] == {"name": "unet", "in_channels": 1, "out_channels": 3, "kwargs": SMALL}
    assert info["format"] == "volattack-checkpoint" and info["version"] == 1
    assert info["path"] == str(path)
    assert "state_dict" not in info


def test_save_is_atomic_and_creates_parents(tmp_path: Path) -> None:
    cfg = _small_cfg()
    path = save_checkpoint(tmp_path / "a" / "b" / "m.pt", _build(cfg), cfg)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temp file left


def test_save_failure_leaves_no_file(tmp_path: Path) -> None:
    cfg = _small_cfg()
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / "m.pt", _build(cfg), cfg, bad=lambda x: x)  # lambda cannot be pickled
    assert list(tmp_path.iterdir()) == []


def test_reserved_extra_key(tmp_path: Path) -> None:
    cfg = _small_cfg()
    with pytest.raises(ValueError, match=r"\['state_dict'\] are reserved"):
        save_checkpoint(tmp_path / "m.pt", _build(cfg), cfg, state_dict={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pt"))):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path = saved[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r" is not a readable torch file"):
        load_checkpoint(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*not a readable torch file"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_random_pickle_file(tmp_path: Path) -> None:
    path = tmp_path / "random.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_torch_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"weights": torch.zeros(3), "epoch": 1}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*not a volattack checkpoint.*'model'"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*not a volattack checkpoint.*list"):
        load_checkpoint(path)


def test_bare_state_dict_hint(tmp_path: Path) -> None:
    cfg = _small_cfg()
    model = _build(cfg)
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"bare state_dict; load it with load_weights_into"):
        load_checkpoint(path)
    other = create_model("unet", 1, 3, **SMALL)
    info = load_weights_into(other, path)
    assert info == {"path": str(path)}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_missing_key(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path = saved[0]
    ckpt = _raw(path)
    key = next(iter(ckpt["state_dict"]))
    del ckpt["state_dict"][key]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*missing keys: " + re.escape(key)):
        load_checkpoint(path)


def test_extra_key(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path = saved[0]
    ckpt = _raw(path)
    ckpt["state_dict"]["head.extra_weight"] = torch.zeros(2)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*unexpected keys: head\.extra_weight"):
        load_checkpoint(path)


def test_shape_mismatch(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path = saved[0]
    ckpt = _raw(path)
    key, value = next((k, v) for k, v in ckpt["state_dict"].items() if v.ndim == 5)
    ckpt["state_dict"][key] = torch.zeros(*value.shape[:-1], value.shape[-1] + 1)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*shape mismatches: " + re.escape(key)):
        load_checkpoint(path)


def test_unknown_model_in_checkpoint(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path = saved[0]
    ckpt = _raw(path)
    ckpt["model"]["name"] = "unet9"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*cannot rebuild model 'unet9'.*Did you mean"):
        load_checkpoint(path)


def test_newer_version_refused(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path = saved[0]
    ckpt = _raw(path)
    ckpt["version"] = 99
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*version 99"):
        load_checkpoint(path)


class _Touch:
    """Unpickling this object would create a file: a safe loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_arbitrary_python_object_refused(saved: tuple[Path, torch.nn.Module, ModelConfig], tmp_path: Path) -> None:
    path, model, cfg = saved
    save_checkpoint(path, model, cfg, note=fractions.Fraction(1, 3))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*weights_only=True"):
        load_checkpoint(path)
    marker = tmp_path / "pwned"
    save_checkpoint(path, model, cfg, payload=_Touch(marker))
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_weights_into(model, path)
    assert not marker.exists()


def test_load_weights_into_same_architecture(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path, model, cfg = saved
    torch.manual_seed(1)
    fresh = create_model("unet", 1, 3, **SMALL).train()
    info = load_weights_into(fresh, path)
    assert fresh.training  # mode untouched
    assert info["epoch"] == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_load_weights_into_other_architecture(saved: tuple[Path, torch.nn.Module, ModelConfig]) -> None:
    path = saved[0]
    other = create_model("segresnet", 1, 3)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*holds model 'unet'.*expected architecture SegResNet"):
        load_weights_into(other, path)
    wider = create_model("unet", 1, 5, **SMALL)
    with pytest.raises(ValueError, match=r"out_channels=3.*expected architecture UNet.*shape mismatches"):
        load_weights_into(wider, path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights_into(wider, path.parent / "missing.pt")
