"""DDP training under torchrun (gloo, 2 CPU processes): files, rank parity, resume, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from volattack.data.config import DataConfig, PreprocessConfig
from volattack.data.phantoms import make_phantom_dataset
from volattack.models.checkpoint import read_checkpoint
from volattack.models.config import ModelConfig
from volattack.training.config import TrainConfig
from volattack.training import epoch_seed, shard_indices, train

MODEL = ModelConfig(name="unet", in_channels=1, out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
# 16^3 phantoms and a 16^3 roi: the pos/neg crop is the whole volume, so crops are deterministic and
# a 2-rank run can be compared with a 1-process run regardless of the ranks' random streams.
PRE = PreprocessConfig(roi_size=[16, 16, 16], num_samples=1, crop_foreground=False)
ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = tmp_path_factory.mktemp("ddp_phantoms")
    datalist = make_phantom_dataset(root, n=4, size=(16, 16, 16), seed=0, n_val=3, n_test=0)
    return DataConfig(datalist=str(datalist), preprocess=PRE)


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ...`` (a free rendezvous port is picked)."""
    env = {**os.environ, **ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


# ----------------------------------------------------------------------------- sharding


def test_shard_indices_are_disjoint_equal_and_follow_the_single_process_order() -> None:
    from monai.data import DataLoader

    eseed = epoch_seed(0, 3)
    # one process: exactly the order DataLoader(shuffle=True) visits with the same generator seed
    visited = [int(b) for b in DataLoader(list(range(7)), batch_size=1, shuffle=True,
                                          generator=torch.Generator().manual_seed(eseed))]
    assert shard_indices(7, eseed, 0, 1) == visited
    # three ranks: round-robin deal of that order, the remainder (7 mod 3 = 1 case) left out
    shards = [shard_indices(7, eseed, r, 3) for r in range(3)]
    assert shards == [visited[0:6:3], visited[1:6:3], visited[2:6:3]]
    assert all(len(s) == 2 for s in shards)
    assert Counter(i for s in shards for i in s) == Counter(visited[:6])  # disjoint
    # another epoch, another permutation (and another left-out case over a few epochs)
    assert shard_indices(7, epoch_seed(0, 4), 0, 1) != visited
    left_out = {(set(range(7)) - {i for r in range(3) for i in shard_indices(7, epoch_seed(0, e), r, 3)}).pop()
                for e in range(1, 9)}
    assert len(left_out) > 1


@pytest.mark.parametrize(
    ("n", "rank", "world", "message"),
    [
        (4, 0, 0, r"world_size must be an integer >= 1, got 0"),
        (4, 2, 2, r"rank must be an integer in \[0, 2\), got 2"),
        (4, -1, 2, r"rank must be an integer in \[0, 2\), got -1"),
        (1, 0, 2, r"n must be an integer >= world_size=2 .*got 1"),
    ],
)
def test_shard_indices_bad_input(n: int, rank: int, world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shard_indices(n, 0, rank, world)


def test_bad_world_size_environment(data: DataConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"environment variable WORLD_SIZE must be an integer, got 'two'"):
        train(MODEL, TrainConfig(epochs=1), data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_two_ranks_match_one_process_with_twice_the_batch(data: DataConfig, tmp_path: Path) -> None:
    """``torchrun -m volattack train``: one set of files, and 2 ranks x batch 1 equals 1 process x batch 2
    (same permutation, DDP's gradient mean equals the batch mean of Dice-CE; instance norm).

    The UNet has no conv biases here: a bias right before an instance norm has a true gradient of 0,
    and AdamW's normalisation turns the float noise of that 0 into steps of about +-lr, which differ
    between any two summation orders (1 process or 2); every other parameter agrees to ~1e-8."""
    model_cfg = replace(MODEL, kwargs={**MODEL.kwargs, "bias": False})
    cfg = {
        "output_dir": str(tmp_path / "ddp"), "seed": 2,
        "data": {"datalist": data.datalist, "preprocess": {"roi_size": PRE.roi_size, "num_samples": 1,
                                                            "crop_foreground": False}},
        "model": {"out_channels": 5, "kwargs": model_cfg.kwargs},
        "train": {"epochs": 2, "batch_size": 1, "lr": 3e-3, "lr_schedule": "cosine", "val_interval": 1,
                  "sw_batch_size": 1, "cache": False},
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    r = _torchrun("-m", "volattack", "train", "cfg.yaml", "--quiet", cwd=tmp_path)
    assert "best validation Dice" in r.stdout

    run = tmp_path / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "train_log.json"]
    log = json.loads((run / "train_log.json").read_text())
    assert log["world_size"] == 2 and [h["epoch"] for h in log["history"]] == [1, 2]
    assert read_checkpoint(run / "last.pt")["world_size"] == 2

    tcfg = TrainConfig(epochs=2, batch_size=2, lr=3e-3, lr_schedule="cosine", val_interval=1, sw_batch_size=1,
                       cache=False)
    train(model_cfg, tcfg, data, tmp_path / "one", seed=2, progress=False)
    one_log = json.loads((tmp_path / "one" / "train_log.json").read_text())
    for a, b in zip(log["history"], one_log["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-6)  # sharded validation (2 + 1 cases)
    ddp, one = _state(run / "last.pt"), _state(tmp_path / "one" / "last.pt")
    assert set(ddp) == set(one)
    for k in one:  # observed: max difference 3e-8
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-5, atol=1e-6)
    # and the run did train: the parameters left the seeded initialisation
    torch.manual_seed(2)
    from volattack.models.zoo import create_model

    init = create_model(model_cfg.name, 1, 5, **model_cfg.kwargs).state_dict()
    assert any((ddp[k] - init[k]).abs().max() > 1e-3 for k in init if init[k].is_floating_point())


SCRIPT = r'''
"""Runs on every rank: adversarial DDP training, a resume, an uninterrupted run; dumps hashes."""
import hashlib, json, os, sys
from dataclasses import replace

import volattack.defenses.adversarial as adv_mod
import volattack.training as T
import volattack.training.loop as loop
from volattack.data.config import DataConfig, PreprocessConfig
from volattack.defenses.config import AdversaryConfig
from volattack.models.config import ModelConfig
from volattack.training.config import TrainConfig

nets, checks = [], {"calls": 0, "bad_mode": 0, "stray_grads": 0, "ddp_alive_at_teardown": 0}
_create, _adv_loss, _teardown = loop.create_model, adv_mod.adversarial_loss, loop.teardown


def spy_create(*a, **k):
    nets.append(_create(*a, **k))
    return nets[-1]


def spy_adv_loss(model, *a, **k):
    loss, terms = _adv_loss(model, *a, **k)
    checks["calls"] += 1
    checks["bad_mode"] += int(not all(m.training for m in model.modules()))
    checks["stray_grads"] += int(any(p.grad is not None for p in model.parameters()))
    return loss, terms


def spy_teardown(ctx):
    # a DDP wrapper still alive here would destroy the group from its reducer, GIL held (deadlock)
    import gc
    from torch.nn.parallel import DistributedDataParallel as DDP

    checks["ddp_alive_at_teardown"] += sum(isinstance(o, DDP) for o in gc.get_objects())
    _teardown(ctx)


loop.create_model, adv_mod.adversarial_loss, loop.teardown = spy_create, spy_adv_loss, spy_teardown
datalist, root = sys.argv[1], sys.argv[2]
data = DataConfig(datalist=datalist,
                  preprocess=PreprocessConfig(roi_size=[16, 16, 16], num_samples=1, crop_foreground=False))
model = ModelConfig(name="unet", out_channels=5, kwargs={"channels": [4, 8], "strides": [2]})
tcfg = TrainConfig(epochs=2, batch_size=1, lr=3e-3, val_interval=1, sw_batch_size=1, cache=False,
                   adversary=AdversaryConfig(name="pgd", params={"eps": "4/255", "steps": 2}, clean_weight=1.0))
T.train(model, replace(tcfg, epochs=1), data, f"{root}/part", seed=1, progress=False)
T.train(model, tcfg, data, f"{root}/part", seed=1, resume=True, progress=False)
T.train(model, tcfg, data, f"{root}/full", seed=1, progress=False)


def digest(net):
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).numpy().tobytes())
    return h.hexdigest()


rank = os.environ["RANK"]
with open(f"{root}/rank{rank}.json", "w") as f:
    json.dump({"digests": [digest(n) for n in nets], "checks": checks}, f)
'''


def test_torchrun_adversarial_training_resume_and_identical_ranks(data: DataConfig, tmp_path: Path) -> None:
    """PGD adversarial training on 2 ranks (clean + adversarial term: two DDP forward passes around the
    attack per step): both ranks end with the same parameters (and those are in last.pt), the attack
    leaves the module clean, a run resumed under torchrun (every rank loads last.pt) ends where an
    uninterrupted one does, and no DDP wrapper outlives its run into the group's teardown (its reducer
    would then destroy the group with the GIL held: the deadlock seen under CPU contention)."""
    (tmp_path / "ranks.py").write_text(SCRIPT)
    _torchrun("ranks.py", data.datalist, str(tmp_path), cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # three train() calls per rank (part, resumed part, full); every rank ends each one identical
    assert len(ranks[0]["digests"]) == 3 and ranks[0]["digests"] == ranks[1]["digests"]
    # 2 epochs x 2 steps per rank (4 cases, 2 ranks, batch 1) on part + full: 8 adversarial steps per rank
    for r in ranks:
        assert r["checks"] == {"calls": 8, "bad_mode": 0, "stray_grads": 0, "ddp_alive_at_teardown": 0}

    for name in ("part", "full"):
        run = tmp_path / name
        assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "train_log.json"]
    # rank 0's final network is what last.pt holds
    import hashlib

    h = hashlib.sha256()
    for k, t in _state(tmp_path / "full" / "last.pt").items():
        h.update(k.encode())
        h.update(t.contiguous().reshape(-1).numpy().tobytes())
    assert h.hexdigest() == ranks[0]["digests"][2]

    part_log = json.loads((tmp_path / "part" / "train_log.json").read_text())
    full_log = json.loads((tmp_path / "full" / "train_log.json").read_text())
    assert [h["epoch"] for h in part_log["history"]] == [1, 2]
    for a, b in zip(part_log["history"], full_log["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    part, full = _state(tmp_path / "part" / "last.pt"), _state(tmp_path / "full" / "last.pt")
    for k in full:
        torch.testing.assert_close(part[k], full[k], rtol=1e-4, atol=1e-5)


def test_fewer_training_cases_than_ranks_is_an_error(data: DataConfig, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before any model work: a 1-case split on 2 ranks (a fake group: only its size is read)."""
    import volattack.training.loop as loop
    from volattack.distributed import DistContext

    listing = json.loads(Path(data.datalist).read_text())
    listing["training"] = listing["training"][:1]
    path = Path(data.datalist).parent / "one_case.json"
    path.write_text(json.dumps(listing))
    monkeypatch.setattr(loop, "setup_distributed", lambda device: (DistContext(rank=0, world=2), device))
    with pytest.raises(ValueError, match=r"training split 'training' of .*one_case\.json.* has 1 case\(s\), "
                                         r"fewer than the 2 ranks"):
        train(MODEL, replace(TrainConfig(), epochs=1), replace(data, datalist=str(path)), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()

