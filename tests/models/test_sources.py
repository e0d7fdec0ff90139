"""Model sources: ``load_model`` dispatch, what each built-in source knows about its model
(classes, preprocessing, inference, digest), the decline reasons, and a throwaway source
registered with one decorator."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import volattack
from volattack.data.config import PreprocessConfig
from volattack.data.intensity import WindowIntensity, ZScoreIntensity
from volattack.inference.sliding import WindowedInferer
from volattack.models.checkpoint import read_checkpoint, save_checkpoint
from volattack.models.config import ModelConfig
from volattack.models.sources import (
    InferenceSpec,
    LoadedModel,
    ModelPreprocessing,
    ModelSource,
    list_sources,
    load_model,
    register_source,
)
from volattack.models.sources.base import SOURCES
from volattack.models.zoo import create_model
from volattack.ops import module_digest

CFG = ModelConfig(name="unet", in_channels=1, out_channels=3, kwargs={"channels": [4, 8], "strides": [2]})
UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
             "num_res_units": 0}
PRE = PreprocessConfig(a_min=-100.0, a_max=300.0, b_min=0.0, b_max=1.0, spacing=[1.0, 1.0, 2.0],
                       orientation="LPS", roi_size=[16, 16, 8], units="HU")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return create_model(CFG.name, CFG.in_channels, CFG.out_channels, **CFG.kwargs).eval()


def _x() -> torch.Tensor:
    return torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))


def test_builtin_sources_in_asking_order():
    assert list_sources() == ["torchscript", "checkpoint", "monai_bundle", "nnunet"]


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_carries_its_training_preprocessing(tmp_path):
    ref = _net()
    ck = save_checkpoint(tmp_path / "ck.pt", ref, CFG, preprocess=PRE, class_names={0: "bg", 1: "liver", 2: "x"},
                         epoch=2)
    assert read_checkpoint(ck)["preprocess"]["a_min"] == -100.0  # stored in new checkpoints
    m = load_model(ck)
    assert isinstance(m, LoadedModel) and not m.module.training
    torch.testing.assert_close(m.module(_x()), ref(_x()))
    assert (m.num_classes, m.in_channels, m.class_names) == (3, 1, {0: "bg", 1: "liver", 2: "x"})
    p = m.preprocessing
    assert p.intensity == WindowIntensity(-100.0, 300.0, 0.0, 1.0, units="HU") and p.intensity.unit_scale == 400.0
    assert (p.orientation, p.spacing, p.roi_size) == ("LPS", (1.0, 1.0, 2.0), (16, 16, 8)) and p.config == PRE
    assert m.inference == InferenceSpec(roi_size=(16, 16, 8), overlap=0.25, mode="gaussian", sw_batch_size=4, cval=0.0)
    assert m.digest == module_digest(ref) and len(m.digest) == 64
    assert m.info["source"] == "checkpoint" and m.info["format"] == "volattack-checkpoint"
    assert m.info["architecture"] == "unet" and m.info["epoch"] == 2 and m.info["preprocessing_from"] == "checkpoint"


def test_old_checkpoint_falls_back_to_config_yaml_beside_it(tmp_path):
    ck = save_checkpoint(tmp_path / "old.pt", _net(), CFG)  # no preprocess stored (as before 0.2)
    bare = load_model(ck)
    assert bare.preprocessing == ModelPreprocessing() and bare.info["preprocessing_from"] == "unknown"
    assert bare.inference.roi_size is None and bare.class_names == {}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"preprocess": {"a_min": -50.0, "a_max": 350.0,
                                                                                  "roi_size": [8, 8, 8]}}}))
    m = load_model(ck)
    assert m.preprocessing.intensity == WindowIntensity(-50.0, 350.0) and m.preprocessing.roi_size == (8, 8, 8)
    assert m.info["preprocessing_from"] == "config.yaml"
    assert isinstance(m.inference.make(), WindowedInferer)


def test_save_checkpoint_rejects_a_bad_preprocess(tmp_path):
    with pytest.raises(ValueError, match="a_max must be > a_min"):
        save_checkpoint(tmp_path / "x.pt", _net(), CFG, preprocess={"a_min": 1.0, "a_max": 0.0})
    with pytest.raises(ValueError, match="preprocess: .*unexpected keyword argument 'amin'"):
        save_checkpoint(tmp_path / "x.pt", _net(), CFG, preprocess={"amin": 1.0})
    with pytest.raises(ValueError, match="preprocess must be a PreprocessConfig or a mapping, got int"):
        save_checkpoint(tmp_path / "x.pt", _net(), CFG, preprocess=3)
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- torchscript


def test_torchscript_with_any_suffix(tmp_path):
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and TorchScript deprecation warnings
        scripted = torch.jit.trace(net, _x())
    path = tmp_path / "scripted.pt"  # a .pt suffix does not make it a checkpoint
    scripted.save(str(path))
    m = load_model(path)
    assert m.info["source"] == "torchscript" and m.info["format"] == "torchscript"
    assert m.num_classes is None and m.preprocessing.intensity is None
    torch.testing.assert_close(m.module(_x()), net(_x()))
    with pytest.raises(ValueError, match=r"roi_size is None: .*make\(roi_size="):
        m.inference.make()
    inferer = m.inference.make(roi_size=[8, 8, 8], sw_batch_size=2)
    assert isinstance(inferer, WindowedInferer)
    with pytest.raises(ValueError, match="model source 'torchscript' has no option 'network_key'"):
        load_model(path, network_key="x")


# --------------------------------------------------------------------------- bundle


def _bundle(root: Path) -> tuple[Path, nn.Module]:
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    net = UNet(**UNET_ARGS).eval()
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    cfg = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "roi": [32, 32, 16],
        "window": {"lo": -57.0, "hi": 164.0},
        "network_def": {"_target_": "monai.networks.nets.UNet", **UNET_ARGS},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": "@window::lo", "a_max": "@window#hi",
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": 2, "overlap": 0.5},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    meta = {"name": "tiny", "network_data_format": {
        "inputs": {"image": {"num_channels": 1}},
        "outputs": {"pred": {"num_channels": 3, "channel_def": {"0": "background", "1": "spleen", "2": "liver"}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root, net


def test_bundle_deployment_read_from_plain_values(tmp_path):
    bundle, net = _bundle(tmp_path / "b")
    with pytest.raises(ValueError, match=r"trust_bundle is False .*--trust-bundle"):
        load_model(bundle)
    m = load_model(bundle, trust_bundle=True)
    torch.testing.assert_close(m.module(_x()), net(_x()))
    assert (m.num_classes, m.in_channels) == (3, 1)
    assert m.class_names == {0: "background", 1: "spleen", 2: "liver"}
    assert m.preprocessing.intensity == WindowIntensity(-57.0, 164.0, 0.0, 1.0)
    assert (m.preprocessing.orientation, m.preprocessing.spacing) == ("RAS", (1.5, 1.5, 2.0))
    assert m.inference == InferenceSpec(roi_size=(32, 32, 16), overlap=0.5, sw_batch_size=2, cval=0.0)
    assert m.info["source"] == "monai_bundle" and m.info["architecture"] == "UNet" and "notes" not in m.info
    with pytest.raises(ValueError, match=r"no option 'network'. Did you mean 'network_key'"):
        load_model(bundle, trust_bundle=True, network="x")


def test_bundle_expressions_are_not_evaluated(tmp_path):
    bundle, _ = _bundle(tmp_path / "b")
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    cfg["preprocessing"]["transforms"][3] = {"_target_": "NormalizeIntensityd", "keys": "image",
                                             "subtrahend": "$__import__('os').getpid()", "divisor": 2.0}
    cfg["inferer"]["roi_size"] = "$[8] * 3"
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    m = load_model(bundle, trust_bundle=True)
    assert m.preprocessing.intensity is None and m.inference.roi_size is None
    assert m.info["notes"] == ["intensity transform not found as plain values"]
    cfg["preprocessing"]["transforms"][3]["subtrahend"] = 40.0
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    assert load_model(bundle, trust_bundle=True).preprocessing.intensity == ZScoreIntensity(40.0, 2.0)


# --------------------------------------------------------------------------- dispatch errors


def test_no_source_names_the_path_and_each_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Model not found: .*nothing\.pt"):
        load_model(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"No model source can open '.*empty': torchscript: a directory, not a file; "
                                         r"checkpoint: a directory, not a file; monai_bundle: no configs/inference"):
        load_model(tmp_path / "empty")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match=r"torchscript: not a zip archive.*checkpoint: not a zip archive written by "
                                         r"torch.save.*monai_bundle: not a directory"):
        load_model(txt)
    bare = tmp_path / "bare.pt"
    torch.save(_net().state_dict(), bare)
    with pytest.raises(ValueError, match="bare state_dict"):
        load_model(bare)


# --------------------------------------------------------------------------- a new source


@pytest.fixture
def toy_source():
    """A source added with one decorator: a JSON file naming a zoo model (removed afterwards)."""

    @register_source("test_toy")
    class ToySource(ModelSource):
        priority = 100

        def can_open(self, path: Path) -> tuple[bool, str]:
            return (path.suffix == ".toy", "a .toy file" if path.suffix == ".toy" else "not a .toy file")

        def load(self, path, *, map_location="cpu", trust_bundle=False, **options):
            spec = json.loads(path.read_text())
            torch.manual_seed(spec["seed"])
            module = create_model(spec["name"], 1, spec["classes"], channels=[4, 8], strides=[2])
            pre = ModelPreprocessing(intensity=ZScoreIntensity(0.0, 100.0, clip=(-300.0, 300.0)), roi_size=(8, 8, 8))
            return LoadedModel.build(module, source=self.name, path=path, fmt="toy", num_classes=spec["classes"],
                                     in_channels=1, preprocessing=pre)

    yield ToySource
    SOURCES._items.pop("test_toy", None)


def test_a_new_source_is_one_decorator(tmp_path, toy_source):
    assert list_sources()[0] == "test_toy"  # highest priority asked first
    path = tmp_path / "m.toy"
    path.write_text(json.dumps({"name": "unet", "classes": 3, "seed": 0}))
    m = volattack.load_model(path)
    assert m.info == {"source": "test_toy", "path": str(path), "format": "toy", "architecture": "UNet"}
    assert m.num_classes == 3 and m.digest == module_digest(_net())
    assert m.inference.cval == -3.0 and m.inference.roi_size == (8, 8, 8)  # padding: the intensity's lower bound
    with pytest.raises(ValueError, match=r"test_toy: not a \.toy file"):
        load_model(tmp_path)


def test_register_source_rejects_bad_classes():
    with pytest.raises(ValueError, match="must be a ModelSource subclass"):
        register_source("test_bad")(nn.Identity)
    with pytest.raises(ValueError, match=r"must define can_open\(path\) and load\(path, ...\)"):
        register_source("test_half")(type("Half", (ModelSource,), {"can_open": lambda self, p: (True, "")}))
    with pytest.raises(ValueError, match="model source 'checkpoint' is already registered"):
        register_source("checkpoint")(type("Other", (ModelSource,), {"can_open": lambda s, p: (0, ""),
                                                                     "load": lambda s, p, **k: None}))
    assert "test_bad" not in list_sources() and "test_half" not in list_sources()


@pytest.mark.parametrize("kwargs, match", [
    (dict(roi_size=[8, 8]), r"roi_size must be None or 3 positive integers, got \[8, 8\]"),
    (dict(overlap=1.0), "overlap must be < 1"),
    (dict(mode="linear"), "mode must be one of gaussian, constant, got 'linear'"),
    (dict(sw_batch_size=0), "sw_batch_size must be >= 1"),
])
def test_inference_spec_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InferenceSpec(**kwargs)
    with pytest.raises(ValueError, match=r"unknown InferenceSpec.make overrides \['window'\]"):
        InferenceSpec(roi_size=(8, 8, 8)).make(window=3)
    with pytest.raises(ValueError, match="orientation must be None or 3 axis codes"):
        ModelPreprocessing(orientation="RA")
    with pytest.raises(ValueError, match="intensity must be None or an IntensityModel, got dict"):
        ModelPreprocessing(intensity={"kind": "window"})


def test_package_root_stays_import_light():
    code = ("import sys, volattack; assert 'load_model' in dir(volattack) and 'LoadedModel' in volattack.__all__; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert volattack.LoadedModel is LoadedModel
