"""The first thing to run on a CUDA machine: every registered attack on a 96^3 volume with a
MONAI UNet and SwinUNETR in fp32, fp16 and bf16, the attack contract checked on the GPU
(bounds, budget, seeded replay within a tolerance), a ``torchrun`` evaluation over every GPU,
and one line of timings per attack: the attack's time per step over one bare forward+backward
pass (input gradient of the Dice-CE loss) of the same model, dtype and volume.

Usage (one GPU: under 5 minutes with the defaults)::

    python benchmarks/gpu_check.py                       # everything
    python benchmarks/gpu_check.py --models unet --dtypes bf16 --no-torchrun

Without CUDA it prints why and exits 0 (``--device cpu`` runs the same checks on the CPU with a
small ``--size``: that is how the test suite exercises this script). Exit code 1 when any check
fails; each failing line says which.

Replay tolerance: cuDNN's convolution backward kernels are not deterministic, so a sign
step of an L-inf attack may flip on a few voxels between two seeded runs. A replay passes when
at most ``--replay-frac`` of the voxels (default 1%) differ by more than 1e-4 input units.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger("gpu_check")

DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_CLASSES = 5


@dataclass
class Line:
    """One attack x model x dtype result."""

    attack: str
    model: str
    dtype: str
    ratio: float
    seconds: float
    linf: float
    failures: list[str]

    def text(self) -> str:
        status = "ok" if not self.failures else "FAIL: " + "; ".join(self.failures)
        return (f"{self.attack:8s} {self.model:10s} {self.dtype:4s} step/fwd+bwd {self.ratio:6.2f}  "
                f"attack {self.seconds:6.2f} s  linf {self.linf:.4f}  {status}")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      amp: Optional[torch.dtype], reps: int) -> float:
    """Median seconds of one forward+backward pass (input gradient of Dice-CE) under ``amp``."""
    from volattack.attacks.objectives import objective_per_sample

    times = []
    for _ in range(reps + 1):  # the first pass warms up cuDNN's algorithm choice
        sync(x.device)
        t0 = time.perf_counter()
        xi = x.detach().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            logits = model(xi)
        loss = objective_per_sample(logits.float(), y, "dice_ce").sum()
        torch.autograd.grad(loss, xi)
        sync(x.device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]


def build_attack(name: str, model: torch.nn.Module, steps: int, amp: Optional[torch.dtype]) -> Any:
    """The attack with the reference budgets and ``steps`` iterations where it iterates."""
    import volattack

    common: dict[str, Any] = dict(bounds=(0.0, 1.0), seed=0, amp_dtype=amp)
    try:
        return volattack.create_attack(name, model, steps=steps, **common)
    except (TypeError, ValueError) as e:  # one-shot attacks take no ``steps``
        if "steps" not in str(e):
            raise
        return volattack.create_attack(name, model, **common)


def contract_failures(atk: Any, x: torch.Tensor, adv: torch.Tensor, replay: torch.Tensor,
                      replay_frac: float) -> list[str]:
    """What the result breaks of the contract: bounds, L-inf/L2 budget, seeded replay."""
    failures = []
    if adv.shape != x.shape or adv.dtype != x.dtype or adv.device != x.device:
        failures.append("shape/dtype/device changed")
    if float(adv.min()) < -1e-6 or float(adv.max()) > 1 + 1e-6:
        failures.append(f"leaves bounds [0, 1]: [{float(adv.min()):.4g}, {float(adv.max()):.4g}]")
    eps = getattr(atk, "eps", None)
    d = (adv - x).flatten(1)
    if eps is not None and getattr(atk, "linf_budget", False) and float(d.abs().amax()) > eps * (1 + 1e-4) + 1e-6:
        failures.append(f"L-inf {float(d.abs().amax()):.4g} > eps {eps:.4g}")
    if eps is not None and atk.name == "pgd_l2" and float(d.norm(dim=1).amax()) > eps * (1 + 1e-4) + 1e-6:
        failures.append(f"L2 {float(d.norm(dim=1).amax()):.4g} > eps {eps:.4g}")
    frac = float(((adv - replay).abs() > 1e-4).float().mean())
    if frac > replay_frac:
        failures.append(f"seeded replay differs on {frac:.2%} of voxels (> {replay_frac:.0%})")
    return failures


def check_attacks(args: argparse.Namespace, device: torch.device) -> list[Line]:
    """Every attack x model x dtype: time ratio and contract."""
    import volattack

    g = torch.Generator().manual_seed(0)
    size = [args.size] * 3
    x = torch.rand(1, 1, *size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (1, 1, *size), generator=g).to(device)
    names = args.attacks or volattack.list_attacks()
    lines: list[Line] = []
    for model_name in args.models:
        model = volattack.create_model(model_name, in_channels=1, out_channels=NUM_CLASSES).to(device).eval()
        for dname in args.dtypes:
            amp = DTYPES[dname]
            if amp == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                logger.warning("%s: bf16 not supported on this GPU, skipped", model_name)
                continue
            bare = bare_step_seconds(model, x, y, amp, args.reps)
            for name in names:
                lines.append(one_attack(name, model, model_name, dname, amp, x, y, bare, args, device))
                print(lines[-1].text(), flush=True)
    return lines


def one_attack(name: str, model: torch.nn.Module, model_name: str, dname: str, amp: Optional[torch.dtype],
               x: torch.Tensor, y: torch.Tensor, bare: float, args: argparse.Namespace,
               device: torch.device) -> Line:
    """Run one attack twice with the same seed (contract + replay) and time the first run."""
    try:
        atk = build_attack(name, model, args.steps, amp)
        sync(device)
        t0 = time.perf_counter()
        res = atk.run(x, y)
        sync(device)
        seconds = time.perf_counter() - t0
        replay = atk.run(x, y).adv
    except Exception as e:  # a crash is a failed check, reported on the attack's line
        return Line(name, model_name, dname, float("nan"), float("nan"), float("nan"), [f"{type(e).__name__}: {e}"])
    steps = res.info.get("steps_run") or 1
    steps = max(steps) if isinstance(steps, list) else steps
    linf = res.info["linf"]
    linf = max(linf) if isinstance(linf, list) else float(linf)
    fails = contract_failures(atk, x, res.adv, replay, args.replay_frac)
    return Line(name, model_name, dname, seconds / (max(int(steps), 1) * bare), seconds, linf, fails)


def torchrun_evaluation(args: argparse.Namespace, device: torch.device) -> list[str]:
    """``torchrun --nproc_per_node <gpus> -m volattack evaluate`` on phantoms with an untrained UNet;
    returns failures (empty when it ran, wrote results and used every rank)."""
    from volattack.models.checkpoint import save_checkpoint
    from volattack.models.config import ModelConfig

    nproc = max(torch.cuda.device_count(), 1) if device.type == "cuda" else 2
    with tempfile.TemporaryDirectory(prefix="volattack_gpu_check_") as tmp:
        root = Path(tmp)
        py = sys.executable
        subprocess.run([py, "-m", "volattack", "phantoms", str(root / "data"), "--n", "1", "--n-val", "1",
                        "--n-test", str(2 * nproc), "--size", "64", "64", "48", "--seed", "0"],
                       check=True, capture_output=True)
        mcfg = ModelConfig(name="unet", in_channels=1, out_channels=NUM_CLASSES,
                           kwargs={"channels": [16, 32, 64], "strides": [2, 2]})
        torch.manual_seed(0)
        from volattack.models.zoo import create_model

        save_checkpoint(root / "model.pt", create_model(mcfg.name, in_channels=1, out_channels=NUM_CLASSES,
                                                        **mcfg.kwargs), mcfg)
        cfg = {
            "output_dir": str(root / "run"), "seed": 0,
            "data": {"datalist": str(root / "data" / "dataset.json"),
                     "preprocess": {"roi_size": [32, 32, 32]}},
            "model": {"name": "unet", "in_channels": 1, "out_channels": NUM_CLASSES, "kwargs": mcfg.kwargs},
            "evaluate": {"attacks": [{"name": "pgd", "params": {"eps": "4/255", "steps": 3}}],
                         "sanity_checks": False, "figures": False, "device": device.type},
        }
        (root / "cfg.json").write_text(json.dumps(cfg))  # JSON is YAML
        t0 = time.perf_counter()
        proc = subprocess.run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                               "-m", "volattack", "evaluate", str(root / "cfg.json"),
                               "--checkpoint", str(root / "model.pt"), "--quiet"],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            return [f"torchrun evaluation failed (exit {proc.returncode}): {proc.stderr[-2000:]}"]
        results = json.loads((root / "run" / "results.json").read_text())
        print(f"torchrun evaluate: {nproc} processes, {len(results['cases'])} cases in {seconds:.1f} s, "
              f"world_size {results.get('world_size')}", flush=True)
        if results.get("world_size") != nproc or len(results["cases"]) != 2 * nproc:
            return [f"torchrun evaluation used world_size {results.get('world_size')} for "
                    f"{len(results['cases'])} cases (expected {nproc} and {2 * nproc})"]
    return []


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (small smoke runs)")
    p.add_argument("--size", type=int, default=96, help="volume side in voxels (default 96)")
    p.add_argument("--models", nargs="+", default=["unet", "swin_unetr"])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--attacks", nargs="*", default=None, help="default: every registered attack")
    p.add_argument("--steps", type=int, default=5, help="iterations of iterative attacks (default 5)")
    p.add_argument("--reps", type=int, default=3, help="timed bare forward+backward passes (median)")
    p.add_argument("--replay-frac", type=float, default=0.01)
    p.add_argument("--no-torchrun", action="store_true", help="skip the torchrun evaluation")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, report: Callable[[str], None] = print) -> int:
    """Run the checks; 0 when all pass (or there is no CUDA for ``--device cuda``), else 1."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        report("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); "
               "run it on a GPU machine, or pass --device cpu --size 16 for a CPU smoke run")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        report(f"gpu_check: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
               f"{torch.cuda.device_count()} GPU(s)")
    t0 = time.perf_counter()
    lines = check_attacks(args, device)
    failures = [f"{ln.attack}/{ln.model}/{ln.dtype}: {f}" for ln in lines for f in ln.failures]
    if not args.no_torchrun:
        failures += torchrun_evaluation(args, device)
    report(f"gpu_check: {len(lines)} attack runs, {len(failures)} failure(s), {time.perf_counter() - t0:.0f} s")
    for f in failures:
        report(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
