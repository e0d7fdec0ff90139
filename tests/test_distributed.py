"""One torchrun setup for training and evaluation (issue 9, defect 5): each rank binds to GPU
``LOCAL_RANK`` with ``torch.cuda.set_device`` before the NCCL group is created.

No GPU is needed: CUDA availability, ``set_device`` and the process-group calls are replaced by
recorders, and the run is stopped at the first use of the chosen device (moving the model there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from volattack.data.config import DataConfig, PreprocessConfig
from volattack.distributed import DistContext, setup_distributed


class _Stop(Exception):
    """Raised where the run first uses its device."""


class _DeviceProbe(nn.Module):
    """A model that records the device it is moved to, then stops the run."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def to(self, *args, **kwargs):  # noqa: D102 - see the class docstring
        self.seen.append(("model.to", torch.device(args[0] if args else kwargs["device"])))
        raise _Stop


@pytest.fixture
def fake_torchrun(monkeypatch: pytest.MonkeyPatch):
    """``torchrun`` on the second node of 2 x 2 processes with 4 GPUs per node: global rank 2 is
    local rank 0 there (``rank % device_count`` would pick ``cuda:2``, the wrong GPU)."""
    calls: list = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "rendezvous", lambda url, **kw: iter([(dist.HashStore(), 2, 4)]))

    def init_process_group(backend=None, **kwargs):
        calls.append(("init_process_group", backend))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    return calls


def _expected(probe: str) -> list:
    cuda0 = torch.device("cuda", 0)
    return [("set_device", cuda0), ("init_process_group", "nccl"), (probe, cuda0)]


def test_setup_distributed_binds_local_rank_before_init(fake_torchrun: list) -> None:
    ctx, device = setup_distributed(torch.device("cuda"))
    assert ctx == DistContext(rank=2, world=4, created=True)
    assert device == torch.device("cuda", 0)
    assert fake_torchrun == _expected("model.to")[:2]


def test_evaluation_uses_cuda_local_rank(fake_torchrun: list, tmp_path: Path) -> None:
    from volattack.evaluation.config import EvalConfig
    from volattack.evaluation.runner import evaluate

    with pytest.raises(_Stop):
        evaluate(_DeviceProbe(fake_torchrun), [], tmp_path / "eval", eval_cfg=EvalConfig(attacks=[], device="auto"),
                 preprocess=PreprocessConfig(roi_size=[16, 16, 16]), num_classes=5, progress=False)
    assert fake_torchrun == _expected("model.to")


def test_training_uses_cuda_local_rank(fake_torchrun: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import volattack.training.loop as loop
    from volattack.data.phantoms import make_phantom_dataset
    from volattack.models.config import ModelConfig
    from volattack.training.config import TrainConfig

    datalist = make_phantom_dataset(tmp_path / "ph", n=4, size=(16, 16, 16), seed=0, n_val=1, n_test=0)
    monkeypatch.setattr(loop, "create_model", lambda *a, **k: _DeviceProbe(fake_torchrun))
    with pytest.raises(_Stop):
        loop.train(ModelConfig(), TrainConfig(epochs=1, device="cuda"), DataConfig(datalist=str(datalist)),
                   tmp_path / "run", progress=False)
    assert fake_torchrun == _expected("model.to")
