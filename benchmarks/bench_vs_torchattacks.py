"""Strength and speed of volattack's `pgd` versus torchattacks' PGD, side by side in one run.

Both attack the same model (the quickstart checkpoint, wrapped in the same sliding-window
inference) on the same preprocessed test volumes with the same eps, step size, steps and
loss (voxel cross-entropy, the only loss torchattacks' PGD supports on dense labels).
Reports mean foreground Dice after each attack and the median time ratio.

torchattacks is installed only for this benchmark:
    .venv/bin/pip install --no-deps torchattacks==3.5.1
Usage:
    python benchmarks/bench_vs_torchattacks.py [--checkpoint runs/quickstart/train/best.pt]
        [--config configs/quickstart.yaml] [--eps 4/255] [--steps 10] [--reps 3] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


class SlidingWindowModel(nn.Module):
    """``model`` behind MONAI sliding-window inference, so whole volumes go through one module."""

    def __init__(self, model: nn.Module, roi, sw_batch_size: int = 4, overlap: float = 0.25) -> None:
        super().__init__()
        from monai.inferers import SlidingWindowInferer

        self.model = model
        self.inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap,
                                            mode="gaussian")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inferer(x, self.model)


def main() -> None:
    import torchattacks

    import volattack
    from bench_overhead import machine
    from volattack.attacks.objectives import hard_foreground_dice
    from benchmarks_results import add_quickstart_args, emit, load_quickstart
    from volattack.checks import parse_number
    from volattack.evaluation.config import format_number

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_quickstart_args(ap)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    eps = float(parse_number(args.eps))
    alpha = eps / 4
    cfg, model, k, vols = load_quickstart(args)
    wrapped = SlidingWindowModel(model, cfg.data.preprocess.roi_size).eval()

    ours = volattack.create_attack("pgd", wrapped, eps=eps, alpha=alpha, steps=args.steps, objective="ce",
                                   seed=0, measure_ssim=False)
    theirs = torchattacks.PGD(wrapped, eps=eps, alpha=alpha, steps=args.steps, random_start=True)

    def run_ours(x, y):
        return ours(x, y)

    def run_theirs(x, y):
        torch.manual_seed(0)
        return theirs(x, y[:, 0])

    dice = {"volattack": [], "torchattacks": []}
    ratios = []
    clean = []
    for x, y in vols:
        with torch.no_grad():
            clean.append(float(hard_foreground_dice(wrapped(x).argmax(1, keepdim=True), y, k)[0]))
        run_ours(x, y), run_theirs(x, y)  # warm-up
        for _ in range(args.reps):
            t0 = time.perf_counter()
            a = run_ours(x, y)
            t1 = time.perf_counter()
            b = run_theirs(x, y)
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
        with torch.no_grad():
            dice["volattack"].append(float(hard_foreground_dice(wrapped(a).argmax(1, keepdim=True), y, k)[0]))
            dice["torchattacks"].append(float(hard_foreground_dice(wrapped(b).argmax(1, keepdim=True), y, k)[0]))
    mean = {n: sum(v) / len(v) for n, v in dice.items()}
    lines = [
        "## PGD versus torchattacks",
        "",
        f"Machine: {machine()}.",
        f"Quickstart checkpoint, {len(vols)} test volumes, whole-volume sliding-window model, "
        f"eps {format_number(eps)}, alpha eps/4, {args.steps} steps, voxel CE for both, "
        f"{args.reps} interleaved repetitions per volume. torchattacks {torchattacks.__version__}.",
        "Written by `python benchmarks/bench_vs_torchattacks.py --write`.",
        "",
        "| | clean Dice | Dice after PGD | time ratio (volattack / torchattacks), median [min, max] |",
        "|---|---|---|---|",
        f"| volattack `pgd` | {sum(clean) / len(clean):.3f} | {mean['volattack']:.3f} | "
        f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] |",
        f"| torchattacks `PGD` | {sum(clean) / len(clean):.3f} | {mean['torchattacks']:.3f} | 1 |",
    ]
    emit("PGD versus torchattacks", lines, args)


if __name__ == "__main__":
    main()
