"""Backdoor measures and defences: success and backdoor Dice by hand, spectral signatures by hand,
layers by name, fine-pruning, the evaluate.trigger rows, and a tiny poisoned training run whose
success on triggered inputs exceeds the clean model's (direction only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from volattack.threats.backdoor import (
    FeatureHook,
    backdoor_scores,
    case_features,
    fine_prune,
    precision_recall,
    spectral_signature_scores,
    spectral_signatures,
    success_rate,
)
from volattack.threats.config import PoisonConfig, TriggerEvalConfig, TriggerSpec

NAMES = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_left", "4": "kidney_right"}


def maps(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows[0]).view(1, 1, 2, 2, 2)


def test_backdoor_dice_success_and_untouched_dice_by_hand() -> None:
    label = maps([1, 1, 1, 1, 2, 2, 0, 0])
    target = maps([0, 0, 0, 0, 2, 2, 0, 0])  # remove liver: C = the 4 liver voxels
    # 3 of 4 liver voxels predicted background, and one spleen voxel wrongly background: |Y| = 4
    pred = maps([0, 0, 0, 1, 2, 0, 0, 0])
    s = backdoor_scores(pred, label, target, {"remove": [1]}, num_classes=3)
    assert s["backdoor_dice"] == pytest.approx(2 * 3 / (4 + 4))
    assert s["backdoor_success"] == 1.0  # 0.75 >= 0.5
    assert s["untouched_dice"] == pytest.approx(2 * 1 / (2 + 1))  # spleen: |P|=1, |G|=2, overlap 1
    clean_like = backdoor_scores(label, label, target, {"remove": [1]}, num_classes=3)
    assert clean_like["backdoor_dice"] == 0.0 and clean_like["backdoor_success"] == 0.0
    assert backdoor_scores(pred, label, target, {"remove": [1]}, 3, threshold=0.8)["backdoor_success"] == 0.0
    # relabel spleen -> liver: C = the 2 spleen voxels, Y = voxels predicted liver that are not liver
    tgt = maps([1, 1, 1, 1, 1, 1, 0, 0])
    pr = maps([1, 1, 1, 1, 1, 2, 1, 0])
    r = backdoor_scores(pr, label, tgt, {"relabel": {2: 1}}, num_classes=3)
    assert r["backdoor_dice"] == pytest.approx(2 * 1 / (2 + 2)) and math.isnan(r["untouched_dice"])
    nothing = backdoor_scores(maps([0] * 8), maps([0] * 8), maps([0] * 8), {"remove": [1]}, 3)
    assert math.isnan(nothing["backdoor_dice"]) and math.isnan(nothing["backdoor_success"])


def test_success_rate_by_hand() -> None:
    assert success_rate([0.9, 0.4, float("nan"), 0.5]) == pytest.approx(2 / 3)
    assert math.isnan(success_rate([float("nan")]))
    assert success_rate([0.6, 0.7], threshold=0.65) == 0.5


def test_spectral_signature_scores_by_hand() -> None:
    f = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0]])
    # centred rows (-1, 0) x 3 and (3, 0); top singular vector (1, 0): scores 1, 1, 1, 9
    assert torch.allclose(spectral_signature_scores(f), torch.tensor([1.0, 1.0, 1.0, 9.0], dtype=torch.float64))
    g = torch.randn(20, 6, generator=torch.Generator().manual_seed(0)) * 0.1
    g[[3, 11]] += torch.tensor([5.0, -2.0, 0, 0, 0, 1.0])  # two poisoned rows along one direction
    res = spectral_signatures(g, poisoned=[3, 11])  # flags ceil(1.5 * 2) = 3
    assert res["n_flagged"] == 3 and {3, 11} <= set(res["flagged"]) and len(res["flagged"]) == 3
    assert res["recall"] == 1.0 and res["precision"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="features must be"):
        spectral_signature_scores(torch.zeros(1, 3))


def test_precision_recall_by_hand() -> None:
    pr = precision_recall([1, 2, 5, 7], [2, 7, 9])
    assert pr["precision"] == 0.5 and pr["recall"] == pytest.approx(2 / 3) and pr["true_positives"] == 2
    assert math.isnan(precision_recall([], [1])["precision"])


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_layer_the_model_lacks_lists_the_layer_names() -> None:
    m = Tiny()
    with pytest.raises(ValueError, match=r"layer 'bdy' is not a layer.*Did you mean 'body'.*Layers: body, body\.0"):
        with FeatureHook(m, "bdy"):
            pass
    with pytest.raises(ValueError, match="Layers: body, body.0, body.1, head"):
        case_features(m, "neck", [torch.zeros(1, 1, 4, 4, 4)])
    with pytest.raises(ValueError, match="Layers:"):
        fine_prune(m, "tail", [torch.zeros(1, 1, 4, 4, 4)], 0.5)


def test_case_features_are_the_mean_of_the_layer_output() -> None:
    m = Tiny()
    x = torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    f = case_features(m, "body", [x, x * 0])
    with torch.no_grad():
        want = m.body(x).double().mean((2, 3, 4))[0]
    assert f.shape == (2, 4) and torch.allclose(f[0], want)
    assert len(m.body._forward_hooks) == 0  # the hook is removed


def test_fine_prune_zeroes_the_least_active_input_channels_of_a_copy() -> None:
    m = Tiny()
    with torch.no_grad():
        m.body[0].weight[1] = 0
        m.body[0].bias[1] = -1.0  # channel 1 is dead after the ReLU: activity 0
        m.body[0].bias[3] = 5.0  # channel 3 is the most active
    x = torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pruned, idx = fine_prune(m, "head", [x], fraction=0.25)
    assert idx == [1]
    assert torch.all(pruned.head.weight[:, 1] == 0) and not torch.all(m.head.weight[:, 1] == 0)
    _, idx2 = fine_prune(m, "head", [x], fraction=0.5)
    assert 1 in idx2 and 3 not in idx2
    with pytest.raises(ValueError, match="must be a Conv3d"):
        fine_prune(m, "body", [x], 0.5)
    with pytest.raises(ValueError, match="fraction must be < 1"):
        fine_prune(m, "head", [x], 1.0)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory):
    from volattack.data.config import DataConfig, PreprocessConfig
    from volattack.data.phantoms import make_phantom_dataset
    from volattack.models.config import ModelConfig

    root = tmp_path_factory.mktemp("backdoor")
    dl = make_phantom_dataset(root / "data", n=6, size=(24, 24, 16), seed=0, n_val=0, n_test=2, progress=False)
    data = DataConfig(datalist=str(dl), preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=2))
    model = ModelConfig(name="unet", in_channels=1, out_channels=5, kwargs={"channels": [8, 16], "strides": [2]})
    return root, data, model


def _train_and_evaluate(tiny_task, name: str, poison):
    from volattack.data.datalist import load_datalist
    from volattack.evaluation.config import EvalConfig
    from volattack.evaluation.runner import evaluate
    from volattack.models.checkpoint import load_checkpoint
    from volattack.training import train
    from volattack.training.config import TrainConfig

    root, data, model = tiny_task
    cfg = TrainConfig(epochs=8, batch_size=2, lr=1e-2, val_interval=100, sw_batch_size=2, poison=poison)
    with pytest.warns(UserWarning, match="validation"):
        train(model, cfg, data, root / f"run_{name}", progress=False, seed=0)
    net, _ = load_checkpoint(root / f"run_{name}" / "best.pt")
    trig = TriggerEvalConfig(run=str(root / "run_pois"), class_names=NAMES)
    ec = EvalConfig(attacks=[], sanity_checks=False, figures=False, sw_batch_size=2, trigger=trig)
    res = evaluate(net, load_datalist(data.datalist, key="test"), root / f"eval_{name}", eval_cfg=ec,
                   preprocess=data.preprocess, num_classes=5, progress=False)
    return res["summary"]["attacks"]["trigger(dct)"]


@pytest.mark.filterwarnings("ignore:No validation")
def test_a_tiny_poisoned_run_succeeds_more_often_than_the_clean_model(tiny_task) -> None:
    spec = TriggerSpec(name="dct", params={"rms": 40.0, "block_size": 4, "band": "all"}, seed=0)
    poison = PoisonConfig(trigger=spec, rate=0.5, target={"remove": ["liver"]}, seed=0)
    pois = _train_and_evaluate(tiny_task, "pois", poison)  # the run whose poison.json the rows read
    clean = _train_and_evaluate(tiny_task, "clean", None)
    assert pois["backdoor_success"] > clean["backdoor_success"]
    assert pois["backdoor_dice"] > clean["backdoor_dice"]
    assert pois["backdoor_dice"] > pois["backdoor_dice_clean_input"]  # specific to the trigger
    assert pois["rms_units"] == pytest.approx(clean["rms_units"]) and pois["rms_units"] > 0  # the same trigger
    rec = json.loads((Path(tiny_task[0]) / "run_pois" / "poison.json").read_text())
    assert len(rec["poisoned"]) == 3
