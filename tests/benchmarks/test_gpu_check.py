"""benchmarks/gpu_check.py: skips cleanly without CUDA, and its checks run (and can fail) on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_skips_cleanly_without_cuda(gpu_check, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said: list[str] = []
    assert gpu_check.main([], report=said.append) == 0
    assert len(said) == 1 and "skipped: no CUDA" in said[0]


def test_cpu_smoke_run_checks_every_attack(gpu_check, capsys) -> None:
    import volattack

    said: list[str] = []
    code = gpu_check.main(["--device", "cpu", "--size", "16", "--models", "unet", "--dtypes", "fp32",
                           "--steps", "2", "--reps", "1", "--no-torchrun"], report=said.append)
    out = capsys.readouterr().out.splitlines()
    assert code == 0, said
    assert sorted(line.split()[0] for line in out) == volattack.list_attacks()
    assert all(line.endswith("ok") and "step/fwd+bwd" in line for line in out)
    assert said[-1].startswith(f"gpu_check: {len(volattack.list_attacks())} attack runs, 0 failure(s)")


def test_contract_failures_are_reported(gpu_check) -> None:
    import volattack

    model = torch.nn.Conv3d(1, 2, 1)
    atk = volattack.create_attack("pgd", model, eps=4 / 255, steps=1)
    x = torch.full((1, 1, 4, 4, 4), 0.5)
    ok = x + 2 / 255
    assert gpu_check.contract_failures(atk, x, ok, ok.clone(), 0.01) == []
    over = x + 8 / 255
    out_of_bounds = x + 0.6
    replay = ok.clone()
    replay[0, 0, 0, 0, :2] += 0.01  # 2 of 64 voxels (3%) differ
    fails = gpu_check.contract_failures(atk, x, over, over, 0.01)
    assert len(fails) == 1 and fails[0].startswith("L-inf 0.03137 > eps 0.01569")
    assert "leaves bounds" in gpu_check.contract_failures(atk, x, out_of_bounds, out_of_bounds, 0.01)[0]
    assert "seeded replay differs on 3.12% of voxels" in gpu_check.contract_failures(atk, x, ok, replay, 0.01)[0]
