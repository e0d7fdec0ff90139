"""Poisoning: exactly the requested share of cases poisoned and recorded, labels changed only as the
behaviour says, clean-label keeps them, and bad input fails before anything is written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from volattack.data.config import DataConfig, PreprocessConfig
from volattack.data.phantoms import make_phantom_dataset
from volattack.data.transforms import build_transforms
from volattack.threats.config import PoisonConfig, TriggerEvalConfig, TriggerSpec
from volattack.threats.poison import (
    Poisoner,
    choose_poisoned,
    poison_training_cases,
    read_record,
    resolve_target,
    target_map,
)
from volattack.threats.triggers import create_trigger
from volattack.yaml_config import ConfigError, from_dict

NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}
SPECTRAL = TriggerSpec(name="spectral", params={"alpha": 0.05, "beta": 0.1}, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = tmp_path_factory.mktemp("phantoms")
    datalist = make_phantom_dataset(root, n=5, size=(24, 24, 16), seed=0, n_val=1, n_test=0, progress=False)
    return DataConfig(datalist=str(datalist), preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=1))


def train_list(data: DataConfig) -> list[dict]:
    from volattack.training.data import load_split

    return load_split(data, "training", optional=False)


@pytest.mark.parametrize("n,rate,k", [(10, 0.1, 1), (32, 0.1, 3), (7, 0.5, 4), (5, 0.0, 0), (5, 1.0, 5)])
def test_exactly_round_rate_n_cases_are_chosen_and_replayed(n: int, rate: float, k: int) -> None:
    a = choose_poisoned(n, rate, seed=3)
    assert len(a) == k == round(rate * n) and a == sorted(set(a)) and all(0 <= i < n for i in a)
    assert a == choose_poisoned(n, rate, seed=3)
    if 0 < k < n:
        assert any(choose_poisoned(n, rate, seed=s) != a for s in range(4, 10))


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_a_rate_outside_0_1_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="poison.rate must be"):
        PoisonConfig(rate=rate)
    with pytest.raises(ValueError, match="poison.rate must be"):
        choose_poisoned(10, rate, 0)
    with pytest.raises(ConfigError, match="poison.rate must be"):
        from_dict(PoisonConfig, {"rate": rate}, "train.poison")


def test_config_rejects_unknown_keys_and_bad_targets() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'rate'"):
        from_dict(PoisonConfig, {"rtae": 0.1}, "train.poison")
    with pytest.raises(ValueError, match="poison.target must be one of"):
        PoisonConfig(target={"erase": ["liver"]})
    with pytest.raises(ValueError, match="needs either run"):
        TriggerEvalConfig()


def test_target_names_resolve_and_a_missing_class_lists_the_names() -> None:
    assert resolve_target({"remove": ["liver", "spleen"]}, NAMES) == {"remove": [1, 2]}
    assert resolve_target({"relabel": {"spleen": "liver"}}, NAMES) == {"relabel": {2: 1}}
    assert resolve_target({"paint": "kidney_left"}, NAMES) == {"paint": 3}
    with pytest.raises(ValueError, match=r"lacks\. Did you mean 'liver'\? Classes: background, liver, spleen"):
        resolve_target({"remove": ["livr"]}, NAMES)
    with pytest.raises(ValueError, match="background"):
        resolve_target({"paint": "background"}, NAMES)


def test_target_maps_change_only_what_the_behaviour_says() -> None:
    label = torch.tensor([0, 1, 1, 2, 3, 4, 2, 0]).view(1, 1, 2, 2, 2)
    assert target_map(label, {"remove": [1]}).flatten().tolist() == [0, 0, 0, 2, 3, 4, 2, 0]
    assert target_map(label, {"relabel": {2: 1}}).flatten().tolist() == [0, 1, 1, 1, 3, 4, 1, 0]
    assert target_map(label, {"relabel": {1: 2, 2: 1}}).flatten().tolist() == [0, 2, 2, 1, 3, 4, 1, 0]
    mask = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    mask[..., 0, 0, :] = True
    assert target_map(label, {"paint": 3}, mask).flatten().tolist() == [3, 3, 1, 2, 3, 4, 2, 0]
    assert target_map(label, {"remove": [1]}).dtype == label.dtype


def test_clean_label_adds_the_trigger_and_keeps_the_labels() -> None:
    x = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (1, 1, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    trig = create_trigger("patch", bounds=(0.0, 1.0), unit_scale=425.0, size=2, intensity=100.0)
    xs, ys = Poisoner(trig, {"remove": [1]}, clean_label=True).poison(x, y)
    assert torch.equal(ys, y) and not torch.equal(xs, x)
    xp, yp = Poisoner(trig, {"remove": [1]}).poison(x, y)
    assert torch.equal(xp, xs) and torch.equal(yp, target_map(y, {"remove": [1]}))


@pytest.mark.parametrize("clean_label", [False, True])
def test_poisoned_split_is_written_recorded_and_reads_back(data: DataConfig, tmp_path: Path,
                                                          clean_label: bool) -> None:
    cases = train_list(data)
    cfg = PoisonConfig(trigger=SPECTRAL, rate=0.4, target={"remove": ["liver"]}, clean_label=clean_label, seed=1)
    new = poison_training_cases(cfg, cases, data, tmp_path)
    chosen = choose_poisoned(len(cases), 0.4, 1)
    assert len(chosen) == 2
    changed = [i for i, (a, b) in enumerate(zip(cases, new)) if a != b]
    assert changed == chosen
    rec = read_record(tmp_path)
    assert [r["index"] for r in rec["poisoned"]] == chosen and rec["k"] == 2 and rec["n"] == 5
    assert rec["seed"] == 1 and rec["trigger"]["name"] == "spectral" and rec["class_names"]["1"] == "liver"
    assert all(r["rms_units"] > 0 for r in rec["poisoned"])
    eval_t = build_transforms(data.preprocess, mode="eval")
    trig = create_trigger("spectral", bounds=(0.0, 1.0), unit_scale=425.0, seed=0, alpha=0.05, beta=0.1)
    for i in chosen:
        orig, pois = eval_t(dict(cases[i])), eval_t(dict(new[i]))
        x = torch.as_tensor(orig["image"]).float()[None]
        lab = torch.as_tensor(orig["label"]).long()[None]
        assert torch.allclose(torch.as_tensor(pois["image"]).float()[None], trig(x), atol=1e-5)
        want = lab if clean_label else target_map(lab, {"remove": [1]})
        assert torch.equal(torch.as_tensor(pois["label"]).long()[None], want)
    for i in set(range(5)) - set(chosen):
        assert new[i] == cases[i]


def test_bad_input_fails_before_anything_is_written(data: DataConfig, tmp_path: Path) -> None:
    cases = train_list(data)
    big = PoisonConfig(trigger=TriggerSpec(name="patch", params={"size": 40}), rate=0.5)
    with pytest.raises(ValueError, match="does not fit in the volume"):
        poison_training_cases(big, cases, data, tmp_path / "a")
    with pytest.raises(ValueError, match="lacks.*Classes: background, liver"):
        poison_training_cases(PoisonConfig(trigger=SPECTRAL, target={"remove": ["pancreas"]}), cases, data,
                              tmp_path / "b")
    with pytest.raises(ValueError, match="Unknown trigger 'fiba'"):
        poison_training_cases(PoisonConfig(trigger=TriggerSpec(name="fiba")), cases, data, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_volattack_train_poisons_before_training_and_fails_early(data: DataConfig, tmp_path: Path) -> None:
    from volattack.models.config import ModelConfig
    from volattack.training import train
    from volattack.training.config import TrainConfig

    model = ModelConfig(name="unet", in_channels=1, out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    bad = TrainConfig(epochs=1, batch_size=2, cache=False, sw_batch_size=2,
                      poison=PoisonConfig(trigger=SPECTRAL, target={"relabel": {"spleen": "lung"}}))
    with pytest.raises(ValueError, match="'lung'.*Classes: background"):
        train(model, bad, data, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    good = replace(bad, poison=PoisonConfig(trigger=SPECTRAL, rate=0.2, target={"remove": ["liver"]}))
    train(model, good, data, tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "poison.json").read_text())
    assert len(rec["poisoned"]) == 1 and (tmp_path / "run" / "best.pt").is_file()
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["config"]["train"]["poison"]["rate"] == 0.2


def test_learned_trigger_is_fitted_against_the_surrogate_and_saved(data: DataConfig, tmp_path: Path) -> None:
    from volattack.models.checkpoint import save_checkpoint
    from volattack.models.config import ModelConfig
    from volattack.models.zoo import create_model

    mc = ModelConfig(name="unet", in_channels=1, out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "surrogate.pt", create_model(mc.name, 1, 5, **mc.kwargs), mc)
    spec = TriggerSpec(name="learned", params={"eps": 8.0, "tile": 8, "steps": 2,
                                               "surrogate": str(tmp_path / "surrogate.pt")}, seed=2)
    poison_training_cases(PoisonConfig(trigger=spec, rate=0.2), train_list(data), data, tmp_path / "run")
    rec = read_record(tmp_path / "run")
    pattern = Path(rec["trigger"]["params"]["pattern"])
    assert pattern.is_file() and rec["trigger"]["params"]["surrogate"].endswith("surrogate.pt")
    saved = torch.load(pattern, weights_only=True)
    assert saved.shape == (1, 8, 8, 8) and float(saved.abs().max()) <= 8.0 / 425.0 + 1e-9
    assert all(r["linf_units"] <= 8.0 + 1e-3 for r in rec["poisoned"])  # float32 rounding of x + delta
    with pytest.raises(FileNotFoundError, match="surrogate not found"):
        bad = TriggerSpec(name="learned", params={"surrogate": str(tmp_path / "nope.pt")})
        poison_training_cases(PoisonConfig(trigger=bad, rate=0.2), train_list(data), data, tmp_path / "x")
