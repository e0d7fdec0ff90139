"""Clean training: files written, seed recorded, resume, fine-tuning and bad input."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from volattack.data.config import DataConfig, PreprocessConfig
from volattack.data.phantoms import make_phantom_dataset
from volattack.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from volattack.config import ConfigError, RunConfig, from_dict
from volattack.models.config import ModelConfig
from volattack.models.zoo import create_model
from volattack.training import train, validate_train_config
from volattack.training.config import TrainConfig

pytestmark = pytest.mark.slow

MODEL = ModelConfig(name="unet", in_channels=1, out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
TRAIN = TrainConfig(epochs=2, batch_size=2, lr=3e-3, val_interval=1, sw_batch_size=2, cache=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = tmp_path_factory.mktemp("phantoms")
    datalist = make_phantom_dataset(root, n=3, size=(24, 24, 16), seed=0, n_val=1, n_test=0)
    pre = PreprocessConfig(roi_size=[16, 16, 16], num_samples=1, crop_foreground=False)
    return DataConfig(datalist=str(datalist), preprocess=pre)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def test_train_writes_checkpoints_and_log(data: DataConfig, tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    result = train(MODEL, TRAIN, data, tmp_path / "run", seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched

    run = tmp_path / "run"
    assert {"last.pt", "best.pt", "train_log.json"} <= {p.name for p in run.iterdir()}
    assert result["best_checkpoint"] == str(run / "best.pt")
    assert result["epochs"] == 2 and result["seed"] == 3 and result["seconds"] > 0
    assert 0.0 <= result["best_dice"] <= 1.0

    log = json.loads((run / "train_log.json").read_text())
    assert log["seed"] == 3
    assert [h["epoch"] for h in log["history"]] == [1, 2]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in log["history"])
    assert all(h["val_dice"] is not None for h in log["history"])
    assert log["best_dice"] == pytest.approx(max(h["val_dice"] for h in log["history"]))
    assert log["config"]["model"]["kwargs"] == MODEL.kwargs

    last = read_checkpoint(run / "last.pt")
    assert last["seed"] == 3 and last["epoch"] == 2
    assert "optimizer" in last and len(last["history"]) == 2
    best_model, best_info = load_checkpoint(run / "best.pt")
    assert best_info["seed"] == 3 and best_info["best_dice"] == pytest.approx(result["best_dice"])
    assert best_info["epoch"] == log["best_epoch"]

    # parameters moved away from the seeded initialisation
    torch.manual_seed(3)
    init = create_model(MODEL.name, MODEL.in_channels, MODEL.out_channels, **MODEL.kwargs).state_dict()
    trained = _state(run / "last.pt")
    assert set(init) == set(trained)
    assert any(not torch.equal(init[k], trained[k]) for k in init if init[k].is_floating_point())


def test_resume_continues_and_matches_uninterrupted_run(data: DataConfig, tmp_path: Path) -> None:
    full = tmp_path / "full"
    train(MODEL, TRAIN, data, full, seed=1, progress=False)

    part = tmp_path / "part"
    first = train(MODEL, replace(TRAIN, epochs=1), data, part, seed=1, progress=False)
    assert first["epochs"] == 1
    assert [h["epoch"] for h in json.loads((part / "train_log.json").read_text())["history"]] == [1]
    second = train(MODEL, TRAIN, data, part, seed=1, resume=True, progress=False)
    assert second["epochs"] == 2

    log = json.loads((part / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2]
    full_log = json.loads((full / "train_log.json").read_text())
    for a, b in zip(log["history"], full_log["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    a, b = _state(part / "last.pt"), _state(full / "last.pt")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

    # resuming a finished run trains nothing and keeps the log
    again = train(MODEL, TRAIN, data, part, seed=1, resume=True, progress=False)
    assert again["epochs"] == 2
    assert [h["epoch"] for h in json.loads((part / "train_log.json").read_text())["history"]] == [1, 2]


def test_existing_run_without_resume_raises(data: DataConfig, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(MODEL, replace(TRAIN, epochs=1), data, run, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"already holds a training run.*--resume.*another output folder"):
        train(MODEL, replace(TRAIN, epochs=1), data, run, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"Cannot resume .*last\.pt.*seed=0, got seed=5"):
        train(MODEL, TRAIN, data, run, seed=5, resume=True, progress=False)
    other = replace(MODEL, kwargs={"channels": [4, 8, 16], "strides": [2, 2]})
    with pytest.raises(ValueError, match=r"Cannot resume .*last\.pt.*trained with model"):
        train(other, TRAIN, data, run, seed=0, resume=True, progress=False)


def test_fine_tune_from_checkpoint(data: DataConfig, tmp_path: Path) -> None:
    torch.manual_seed(123)
    start = create_model(MODEL.name, MODEL.in_channels, MODEL.out_channels, **MODEL.kwargs)
    ckpt = save_checkpoint(tmp_path / "start.pt", start, MODEL)
    cfg = replace(TRAIN, epochs=1, lr=1e-12, weight_decay=0.0, init_checkpoint=str(ckpt))
    train(MODEL, cfg, data, tmp_path / "ft", seed=0, progress=False)
    # with a vanishing learning rate the weights stay those of the checkpoint, not a fresh init
    tuned = _state(tmp_path / "ft" / "last.pt")
    for k, v in start.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(tuned[k], v, rtol=1e-5, atol=1e-6)


def test_fine_tune_from_other_architecture_fails_before_training(data: DataConfig, tmp_path: Path) -> None:
    seg_cfg = ModelConfig(name="segresnet", in_channels=1, out_channels=5)
    ckpt = save_checkpoint(tmp_path / "seg.pt", create_model("segresnet", 1, 5), seg_cfg)
    cfg = replace(TRAIN, init_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=re.escape(str(ckpt)) + r".*'segresnet'.*expected architecture UNet"):
        train(MODEL, cfg, data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_roi_incompatible_with_model(data: DataConfig, tmp_path: Path) -> None:
    deep = replace(MODEL, kwargs={"channels": [4, 8, 16, 32], "strides": [2, 2, 2]})
    bad = replace(data, preprocess=replace(data.preprocess, roi_size=[12, 12, 12]))
    with pytest.raises(ValueError, match=r"cannot process training crops of data\.preprocess\.roi_size=\[12, 12, 12\]"):
        train(deep, TRAIN, bad, tmp_path / "run", progress=False)


@pytest.mark.filterwarnings("ignore:key .training. of datalist")
def test_empty_training_split(data: DataConfig, tmp_path: Path) -> None:
    listing = json.loads(Path(data.datalist).read_text())
    listing["training"] = []
    path = Path(data.datalist).parent / "empty.json"
    path.write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r"training split 'training' of .*empty\.json.* is empty"):
        train(MODEL, TRAIN, replace(data, datalist=str(path)), tmp_path / "run", progress=False)


def test_missing_datalist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.datalist must be the path"):
        train(MODEL, TRAIN, DataConfig(), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        train(MODEL, TRAIN, DataConfig(datalist=str(tmp_path / "nope.json")), tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, r"train\.epochs must be an integer >= 1, got 0"),
        ("epochs", 1.5, r"train\.epochs must be an integer >= 1, got 1\.5"),
        ("batch_size", 0, r"train\.batch_size must be an integer >= 1, got 0"),
        ("lr", 0.0, r"train\.lr must be a finite number > 0, got 0\.0"),
        ("lr", -1e-3, r"train\.lr must be a finite number > 0, got -0\.001"),
        ("lr", float("nan"), r"train\.lr must be a finite number > 0, got nan"),
        ("weight_decay", -1.0, r"train\.weight_decay must be a finite number >= 0, got -1\.0"),
        ("val_interval", 0, r"train\.val_interval must be an integer >= 1, got 0"),
        ("sw_overlap", 1.0, r"train\.sw_overlap must be in \[0, 1\), got 1\.0"),
        ("num_workers", -1, r"train\.num_workers must be an integer >= 0, got -1"),
    ],
)
def test_bad_train_config(field: str, value: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):  # TrainConfig checks when it is built
        replace(TRAIN, **{field: value})
    cfg = replace(TRAIN)
    setattr(cfg, field, value)  # assigned afterwards: train() checks again before touching any file
    with pytest.raises(ValueError, match=message):
        validate_train_config(cfg)
    with pytest.raises(ValueError, match=message):
        train(MODEL, cfg, DataConfig(datalist=str(tmp_path / "none.json")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("raw", "message"), [
    ({"epochs": 0}, r"^train\.epochs must be an integer >= 1, got 0\.$"),
    ({"lr_schedule": "step"}, r"^train\.lr_schedule must be one of constant, cosine, poly, got 'step'"),
    ({"sw_overlap": 1.0}, r"^train\.sw_overlap must be in \[0, 1\), got 1\.0\.$"),
])
def test_yaml_train_errors_name_the_key_once(raw: dict, message: str) -> None:
    """From YAML the message is the one Python gives (no "train: train." double prefix)."""
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"train": raw})


def test_bad_seed_and_device(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        validate_train_config(TRAIN, seed=-1)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        train(MODEL, TRAIN, DataConfig(datalist="x.json"), tmp_path / "run", seed=-1, progress=False)
    with pytest.raises(ValueError, match=r"train\.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu0'"):
        replace(TRAIN, device="gpu0")
    for ok in (None, "auto", "cpu", "cuda", "cuda:1"):
        assert replace(TRAIN, device=ok).device == ok


def test_without_validation_split_best_is_final_model(data: DataConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    listing = json.loads(Path(data.datalist).read_text())
    del listing["validation"]
    path = Path(data.datalist).parent / "noval.json"
    path.write_text(json.dumps(listing))
    cfg = replace(TRAIN, epochs=1, lr_schedule="poly")
    with caplog.at_level("WARNING", logger="volattack.training"):
        result = train(MODEL, cfg, replace(data, datalist=str(path)), tmp_path / "run", progress=False)
    assert "No validation cases" in caplog.text
    assert math.isnan(result["best_dice"])
    best, last = _state(tmp_path / "run" / "best.pt"), _state(tmp_path / "run" / "last.pt")
    assert all(torch.equal(best[k], last[k]) for k in last)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["best_dice"] is None and log["history"][0]["val_dice"] is None


def test_train_hands_noise_sigma_and_the_bounds_to_every_epoch(data: DataConfig, tmp_path: Path, monkeypatch) -> None:
    import volattack.training.loop as loop

    seen: list[dict] = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(loop, "train_epoch", spy)
    with pytest.raises(Stop):
        train(MODEL, replace(TRAIN, noise_sigma=0.05), data, tmp_path / "run", seed=0, progress=False)
    pre = data.preprocess
    assert seen[0]["noise_sigma"] == 0.05 and seen[0]["bounds"] == (pre.b_min, pre.b_max)
