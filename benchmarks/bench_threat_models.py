"""Threat models side by side: wall time and reached Dice of the same PGD attack under the
``volume`` threat model (end to end through sliding-window inference, exact gradient) and the
``patch`` threat model (the published protocol: tile, attack each tile through the bare model,
stitch), on the same volumes, model, budget and steps, in one run (interleaved repetitions).

Setup (not timed): phantoms of ``--size`` voxels (no foreground crop, so the attacked volume is
exactly that size), a MONAI UNet trained on them with ``volattack.training.train`` on crops of
``--window`` voxels (or ``--work`` with an earlier run's model). Both threat models then use the
evaluation runner's building blocks: ``volattack.inference.make_inferer`` (windows of
``--window``, overlap 0.25, gaussian blending; ``WindowedInferer``) and
``volattack.evaluation.patchwise.attack_patchwise`` (tiles of ``--window``, overlap
``--patch-overlap``). Each adversarial volume is scored by the same sliding-window inference
(mean foreground Dice, ``volattack.metrics.mean_foreground_dice``); only the attack is timed.

Usage:
    python benchmarks/bench_threat_models.py [--size 96 96 64] [--window 48 48 48] [--steps 10]
        [--cases 2] [--reps 3] [--write] [--results benchmarks/RESULTS.md]
    python benchmarks/bench_threat_models.py --quick --write --results /tmp/RESULTS.md   # smoke run

``--write`` replaces the section "## Threat models: volume vs patch" of ``--results``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks_results import add_results_args, emit, refuse_quick_write  # noqa: E402

SECTION = "Threat models: volume vs patch"
EPS = 4 / 255
OVERLAP = 0.25
K = 5


def n_windows(size: list[int], roi: list[int], overlap: float) -> int:
    """Sliding windows per pass, as MONAI scans: interval ``int(roi * (1 - overlap))`` per axis."""
    n = 1
    for s, r in zip(size, roi):
        if s <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        n *= math.ceil((s - r) / step) + 1
    return n


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--size", type=int, nargs=3, default=[96, 96, 64], help="phantom size (voxels)")
    ap.add_argument("--window", type=int, nargs=3, default=[48, 48, 48],
                    help="sliding window = patch tile = training crop (voxels)")
    ap.add_argument("--patch-overlap", type=float, default=0.0, help="tile overlap (published protocol: 0)")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps")
    ap.add_argument("--sw-batch-size", type=int, default=4, help="windows (and tiles) per forward pass")
    ap.add_argument("--cases", type=int, default=2, help="test phantoms attacked")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-cases", type=int, default=16)
    ap.add_argument("--train-epochs", type=int, default=25)
    ap.add_argument("--work", default=None, help="folder for phantoms and model (default: temporary)")
    add_results_args(ap)
    args = ap.parse_args(argv)
    refuse_quick_write(ap, args)
    if args.quick:
        args.size, args.window, args.steps, args.cases, args.reps = [32, 32, 24], [16, 16, 16], 1, 1, 1
        args.train_cases, args.train_epochs = 2, 1
    import volattack
    from bench_overhead import machine
    from bench_torchrun import phantoms_and_model
    from volattack.data.config import PreprocessConfig
    from volattack.data.datalist import load_datalist
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.data.transforms import build_transforms
    from volattack.evaluation.patchwise import attack_patchwise, tile_grid
    from volattack.evaluation.cases import load_case
    from volattack.inference import make_inferer
    from volattack.metrics import mean_foreground_dice, perturbation_stats

    with tempfile.TemporaryDirectory(prefix="bench_threat_") as tmp:
        root = Path(args.work) if args.work else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        datalist, ckpt, pre_dict = phantoms_and_model(
            root, train_cases=args.train_cases, test_cases=args.cases, size=args.size, roi=args.window,
            epochs=args.train_epochs, crop_foreground=False)
        pre = PreprocessConfig(**pre_dict)
        model, _meta = volattack.load_checkpoint(ckpt)
        model.eval()
        tf = build_transforms(pre, mode="eval")
        vols = [load_case(c, tf)[:2] for c in load_datalist(str(datalist), key="test")[: args.cases]]
        shape = list(vols[0][0].shape[2:])
        inferer = make_inferer(args.window, args.sw_batch_size, OVERLAP)
        common = dict(eps=EPS, steps=args.steps, objective="dice_ce", bounds=(pre.b_min, pre.b_max),
                      unit_scale=intensity_from_preprocess(pre).unit_scale, seed=0)
        atk_volume = volattack.create_attack("pgd", model, inferer=inferer, **common)
        atk_patch = volattack.create_attack("pgd", model, **common)

        def run(kind: str, i: int) -> tuple[float, torch.Tensor]:
            x, y = vols[i]
            t0 = time.perf_counter()
            if kind == "volume":
                adv = atk_volume.run(x, y, seed=i).adv
            else:
                adv, _ = attack_patchwise(atk_patch, x, y, args.window, args.patch_overlap,
                                          tile_batch=args.sw_batch_size, seed=i)
            return time.perf_counter() - t0, adv

        def dice(i: int, img: torch.Tensor) -> float:
            with torch.no_grad():
                pred = inferer(img, model).argmax(1, keepdim=True)
            return float(mean_foreground_dice(pred, vols[i][1], K)[0])

        kinds = ("volume", "patch")
        run("volume", 0)  # warm-up (first-call allocations)
        run("patch", 0)
        secs: dict[str, list[float]] = {k: [] for k in kinds}
        pair_ratio: list[float] = []
        scores: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        clean = [dice(i, x) for i, (x, _) in enumerate(vols)]
        for rep in range(args.reps):
            for i in range(len(vols)):
                order = kinds if (rep + i) % 2 == 0 else kinds[::-1]
                t: dict[str, float] = {}
                for k in order:
                    t[k], adv = run(k, i)
                    secs[k].append(t[k])
                    if rep == 0:  # the attacks are seeded: every repetition gives the same volume
                        p = perturbation_stats(vols[i][0], adv, data_range=(pre.b_min, pre.b_max),
                                               unit_scale=intensity_from_preprocess(pre).unit_scale)
                        scores[k].append({"dice": dice(i, adv), "linf_hu": float(p["linf_units"][0]),
                                          "rms_hu": float(p["rms_units"][0])})
                pair_ratio.append(t["volume"] / t["patch"])
                print(f"rep {rep + 1}/{args.reps} case {i}: volume {t['volume']:.2f} s, patch {t['patch']:.2f} s",
                      flush=True)
        nparams = sum(p.numel() for p in model.parameters())

    med, mean = statistics.median, statistics.mean
    win = "x".join(map(str, args.window))
    stride = [max(1, int(round(p * (1 - args.patch_overlap)))) for p in args.window]
    tiles = math.prod(tile_grid(n, p, s)[0] for n, p, s in zip(shape, args.window, stride))
    windows = n_windows(shape, args.window, OVERLAP)
    lines = [
        f"## {SECTION} (same PGD, steps and volume)",
        "",
        f"Machine: {machine()}.",
        f"{len(vols)} test phantom(s) of {'x'.join(map(str, shape))} voxels (no foreground crop), MONAI UNet "
        f"(16, 32, 64, 128), strides (2, 2, 2), 1 residual unit ({nparams / 1e6:.2f} M parameters) trained "
        f"{args.train_epochs} epoch(s) on {args.train_cases} phantoms with {win} crops. PGD eps {EPS * 255:.0f}/255, "
        f"alpha eps/4, {args.steps} steps, Dice-CE. `volume`: the attack runs through sliding-window inference "
        f"({win} windows, overlap {OVERLAP}, gaussian, `WindowedInferer`; {windows} windows per pass); "
        f"`patch`: {tiles} tiles of {win} (overlap {args.patch_overlap}, replicate padding) attacked through the "
        "bare model and stitched (`attack_patchwise`). Both with "
        f"{args.sw_batch_size} windows/tiles per forward pass. Dice: mean foreground Dice of the sliding-window "
        f"prediction of the adversarial volume (clean {mean(clean):.3f}). Time: the attack only, median over "
        f"{args.reps} interleaved repetitions x {len(vols)} case(s) after a warm-up. "
        "Written by `python benchmarks/bench_threat_models.py --write`"
        + (" (--quick smoke run: timings meaningless)" if args.quick else "") + ".",
        "",
        "| threat model | attack time (s), median [min, max] | Dice after PGD | measured L-inf (HU) | "
        "measured RMS (HU) |",
        "|---|---|---|---|---|",
    ]
    for k in kinds:
        s = secs[k]
        lines.append(f"| {k} | {med(s):.2f} [{min(s):.2f}, {max(s):.2f}] | {mean(r['dice'] for r in scores[k]):.3f} | "
                     f"{mean(r['linf_hu'] for r in scores[k]):.1f} | {mean(r['rms_hu'] for r in scores[k]):.1f} |")
    lines += [
        "",
        f"Time ratio volume / patch: {med(pair_ratio):.2f} (median of per-case pairs; "
        f"[{min(pair_ratio):.2f}, {max(pair_ratio):.2f}]). The `volume` gradient runs every window's forward "
        "twice (forward pass, then recomputation in the window-by-window backward) over overlapping windows; "
        "the `patch` gradient runs one forward and backward per non-overlapping tile, but optimises each tile "
        "against the bare model, not against the stitched prediction that is scored.",
    ]
    emit(SECTION, lines, args)


if __name__ == "__main__":
    main()
