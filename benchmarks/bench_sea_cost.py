"""Cost of `sea` (Croce, Singh and Hein, ECCV 2024) against its component APGD attacks, side by side
in one run: the time of `sea` over the sum of the times of `apgd` run alone on each of its losses
with the same steps (target <= 1.05), and over the sum of single-loss `sea` runs (identical
passes), on a small volume.

`sea` spends, per loss, the same `steps` forward/backward passes as `apgd` with that many steps,
plus one forward of the last iterate of each radius stage (3 instead of `apgd`'s 1); its Dice
tracking reuses the logits of every step. Timings are CPU (process) seconds with one torch thread by
default, alternate the attacks and keep the median of `--repeats` rounds, so load from other
processes hits them alike.

Usage:
    python benchmarks/bench_sea_cost.py [--size 32 32 32] [--steps 30] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timed(fn) -> float:
    """CPU seconds of ``fn()`` (process time: less sensitive than wall time to other processes)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    import volattack
    from bench_overhead import machine
    from benchmarks_results import add_results_args, emit, refuse_quick_write
    from monai.networks.nets import UNet

    from volattack.attacks.sea import SEA_LOSSES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[32, 32, 32])
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128],
                    help="UNet channels (the quickstart model's by default)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is not inflated by spinning)")
    add_results_args(ap)
    args = ap.parse_args()
    refuse_quick_write(ap, args)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.steps, args.repeats, args.channels = [16, 16, 16], 4, 1, [8, 16, 32]
    torch.manual_seed(0)
    chans = tuple(args.channels)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=chans, strides=(2,) * (len(chans) - 1),
                 num_res_units=1).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, *args.size, generator=g)
    y = torch.randint(0, 4, (1, 1, *args.size), generator=g)
    kw = dict(eps=4 / 255, steps=args.steps, seed=0)
    sea = volattack.create_attack("sea", model, **kw)
    apgds = [volattack.create_attack("apgd", model, objective=loss, random_start=True, **kw) for loss in SEA_LOSSES]
    singles = [volattack.create_attack("sea", model, losses=[loss], **kw) for loss in SEA_LOSSES]
    passes = sea.run(x, y).info["passes"]  # warm-up, and the pass count
    t_sea, t_apgd, t_single = [], [], []
    for _ in range(args.repeats):
        t_sea.append(_timed(lambda: sea.run(x, y)))
        t_apgd.append(sum(_timed(lambda a=a: a.run(x, y)) for a in apgds))
        t_single.append(sum(_timed(lambda a=a: a.run(x, y)) for a in singles))
    ms, ma, m1 = (statistics.median(v) for v in (t_sea, t_apgd, t_single))
    apgd_passes = len(SEA_LOSSES) * (args.steps + 1)
    r_apgd = [a / b for a, b in zip(t_sea, t_apgd)]
    r_single = [a / b for a, b in zip(t_sea, t_single)]
    print(f"sea {ms:.2f} s, sum of apgd {ma:.2f} s, sum of single-loss sea {m1:.2f} s", flush=True)
    lines = [
        "## SEA cost (time of `sea` / sum of its component APGD attacks)",
        "",
        f"Machine: {machine()}; CPU (process) seconds, since other processes shared the CPU; the rounds "
        f"alternate the attacks and the median of {args.repeats} is kept.",
        f"MONAI UNet (channels {', '.join(map(str, chans))}, 1 residual unit, the quickstart architecture), "
        f"one volume of {'x'.join(map(str, args.size))}, eps 4/255, "
        f"{args.steps} steps per loss, {len(SEA_LOSSES)} losses ({', '.join(SEA_LOSSES)}). Written by "
        "`python benchmarks/bench_sea_cost.py --write`.",
        "",
        "| compared with | sea s | components s | ratio of medians | ratio per round (min-max) | "
        "forward passes (sea / components) |",
        "|---|---|---|---|---|---|",
        f"| `apgd` on each loss, same steps, random start | {ms:.2f} | {ma:.2f} | {ms / ma:.3f} | "
        f"{min(r_apgd):.3f}-{max(r_apgd):.3f} | {passes} / {apgd_passes} |",
        f"| single-loss `sea` on each loss (identical passes) | {ms:.2f} | {m1:.2f} | {ms / m1:.3f} | "
        f"{min(r_single):.3f}-{max(r_single):.3f} | {passes} / {passes} |",
        "",
        f"Both spend {len(SEA_LOSSES) * args.steps} backward passes; `sea` adds two forwards per loss (the ends "
        "of its first two radius stages). Target: ratio <= 1.05.",
    ]
    emit("SEA cost", lines, args)


if __name__ == "__main__":
    main()
