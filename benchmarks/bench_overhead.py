"""Overhead of iterative attacks: time of an attack with N steps divided by N bare
forward+backward passes (input gradient of the Dice-CE loss) of the same model on the same
volume, measured side by side in one run (interleaved repetitions, median ratio).

Usage:
    python benchmarks/bench_overhead.py [--size 64 64 48] [--steps 10] [--reps 5] [--write]

``--write`` replaces the overhead section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import volattack
from volattack.attacks.objectives import objective_per_sample

ITERATIVE = ["pgd", "bim", "pgd_l2", "segpgd", "cospgd", "apgd", "vafa", "sa2", "fft"]


def bare(model, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        xi = x.detach().requires_grad_(True)
        loss = objective_per_sample(model(xi), y, "dice_ce").sum()
        torch.autograd.grad(loss, xi)
    return time.perf_counter() - t0


def timed_attack(atk, x, y) -> float:
    t0 = time.perf_counter()
    atk(x, y)
    return time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[64, 64, 48])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--attacks", nargs="*", default=None)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = volattack.create_model("unet", in_channels=1, out_channels=5).eval()
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, *args.size, generator=g)
    y = torch.randint(0, 5, (1, 1, *args.size), generator=g)
    names = [n for n in (args.attacks or ITERATIVE) if n in volattack.list_attacks()]
    attacks = {n: volattack.create_attack(n, model, steps=args.steps, seed=0) for n in names}
    # warm-up
    bare(model, x, y, 2)
    for a in attacks.values():
        timed_attack(a, x, y)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    t_bare: dict[str, list[float]] = {n: [] for n in names}
    t_atk: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.reps):
        for n, a in attacks.items():  # interleave: bare, attack, bare, attack ...
            tb = bare(model, x, y, args.steps)
            ta = timed_attack(a, x, y)
            ratios[n].append(ta / tb)
            t_bare[n].append(tb)
            t_atk[n].append(ta)
    lines = [
        "## Attack overhead (time of N attack steps / N bare forward+backward)",
        "",
        f"Machine: {machine()}.",
        f"Model: MONAI UNet (volattack `unet` defaults, {nparams / 1e6:.2f} M parameters), input "
        f"1x1x{'x'.join(map(str, args.size))}, {args.steps} steps, median of {args.reps} interleaved "
        "repetitions (each ratio: an attack run over the bare run just before it; best-of ratio: "
        "fastest attack run over fastest bare run, the timeit convention, least affected by other "
        "load on the machine). Written by `python benchmarks/bench_overhead.py --write`.",
        "",
        "| attack | median ratio | min | max | best-of ratio |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        r = ratios[n]
        best = min(t_atk[n]) / min(t_bare[n])
        lines.append(f"| {n} | {statistics.median(r):.3f} | {min(r):.3f} | {max(r):.3f} | {best:.3f} |")
    lines += ["", "Targets (issue 3): pgd <= 1.03; vafa, sa2, fft <= 1.15. Single runs on this shared host vary "
              "by about +-10% (min/max columns), so both the median and the best-of ratio are given."]
    from benchmarks_results import emit

    emit("Attack overhead", lines, args)


if __name__ == "__main__":
    main()
