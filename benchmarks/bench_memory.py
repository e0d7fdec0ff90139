"""Peak memory and time of one input gradient through sliding-window inference: plain autograd
through MONAI's SlidingWindowInferer versus volattack's WindowedInferer (window-by-window VJP).

One computation = forward through the inferer, per-sample Dice-CE loss
(``volattack.attacks.objectives.objective_per_sample(..., "dice_ce")``), input gradient with
``torch.autograd.grad``. Model: ``monai.networks.nets.UNet(3, 1, 3, (16, 32, 64, 128), (2, 2, 2),
num_res_units=1)`` in eval mode; window 64^3, overlap 0.25, gaussian blending.

Memory: each (inferer, volume) runs in a fresh subprocess that reports its peak resident set
(``VmHWM`` from ``/proc/self/status``; torch's CPU allocations are invisible to tracemalloc), or
``torch.cuda.max_memory_allocated`` with ``--cuda``. The figure of merit is the extra peak per extra
voxel, ``(peak_big - peak_small) / (voxels_big - voxels_small)``: the constant parts (interpreter,
libraries, model, one window batch's activations) cancel. ``sw_batch_size`` defaults to 1 so that
the small volume (a single window) and the big one run the same window batch; with larger
batches the big volume's fuller batches would be counted as per-voxel memory. A third, larger
volume (``--large``, memory only) gives the same slope between big and large volumes, where the
volume-sized tensors rather than one window's activations set both peaks.

Time: the two inferers on the same volume, interleaved repetitions in one subprocess, median.

Usage:
    python benchmarks/bench_memory.py [--small 64 64 64] [--big 192 192 160] [--large 256 256 224]
                                      [--sw-batch-size 1] [--reps 3] [--write]

``--write`` replaces the section "## Sliding-window gradient memory" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROI = (64, 64, 64)
OVERLAP = 0.25
MODE = "gaussian"
K = 3


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only).")


def build(size, sw_batch_size: int, device: str):
    import torch
    from monai.networks.nets import UNet

    from volattack.inference.sliding import WindowedInferer, full_graph_inferer

    torch.manual_seed(0)  # benchmark script, not library code
    model = UNet(3, 1, K, (16, 32, 64, 128), (2, 2, 2), num_res_units=1).to(device).eval()
    kw = dict(roi_size=ROI, sw_batch_size=sw_batch_size, overlap=OVERLAP, mode=MODE)
    inferers = {"plain": full_graph_inferer(**kw), "windowed": WindowedInferer(**kw)}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, *size, generator=g).to(device)
    y = torch.randint(0, K, (1, 1, *size), generator=g).to(device)
    return model, inferers, x, y


def input_gradient(inferer, model, x, y):
    """One forward + Dice-CE loss + input gradient (the step of every gradient attack)."""
    import torch

    from volattack.attacks.objectives import objective_per_sample

    xi = x.detach().requires_grad_(True)
    loss = objective_per_sample(inferer(xi, model), y, "dice_ce").sum()
    (g,) = torch.autograd.grad(loss, xi)
    return g


def child_memory(args) -> None:
    import torch

    device = "cuda" if args.cuda else "cpu"
    model, inferers, x, y = build(args.size, args.sw_batch_size, device)
    if args.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    input_gradient(inferers[args.inferer], model, x, y)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if args.cuda else vm_hwm()
    print(json.dumps({"peak": peak, "seconds": seconds}))


def child_time(args) -> None:
    model, inferers, x, y = build(args.size, args.sw_batch_size, "cuda" if args.cuda else "cpu")
    import torch

    for name in ("plain", "windowed"):  # warm-up
        input_gradient(inferers[name], model, x, y)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in ("plain", "windowed")}
    for _ in range(args.reps):
        for name in ("plain", "windowed"):
            if args.cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            input_gradient(inferers[name], model, x, y)
            if args.cuda:
                torch.cuda.synchronize()
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    print(json.dumps(times))


def run_child(*extra: str, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(size) -> str:
    return "x".join(map(str, size))


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--small", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--big", type=int, nargs=3, default=[192, 192, 160])
    ap.add_argument("--large", type=int, nargs=3, default=[256, 256, 224],
                    help="third volume for the marginal figure at larger sizes (memory only); 0 0 0 skips it")
    ap.add_argument("--sw-batch-size", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="measure torch.cuda.max_memory_allocated on a GPU")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--raw", help="also write the raw measurements (JSON) to this file")
    ap.add_argument("--reuse", help="take the figures found in a --raw file of an earlier run; measure the rest")
    ap.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--inferer", choices=["plain", "windowed"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "memory":
        return child_memory(args)
    if args.child == "time":
        return child_time(args)

    common = ["--sw-batch-size", str(args.sw_batch_size)] + (["--cuda"] if args.cuda else [])
    sizes = {"small": args.small, "big": args.big}
    if all(v > 0 for v in args.large):
        sizes["large"] = args.large
    voxels = {k: v[0] * v[1] * v[2] for k, v in sizes.items()}
    names = ("plain", "windowed")
    allocators = {"glibc default": {}} if args.cuda else {
        "glibc default": {},
        "mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(2**20)},
    }
    mem: dict[tuple[str, str, str], int] = {}
    reused = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    mem = {tuple(k.split(" / ")): v for k, v in reused.get("memory", {}).items()}  # type: ignore[misc]
    for alloc, env in allocators.items():
        for name in names:
            for key, size in sizes.items():
                if (name, alloc, key) in mem:
                    continue
                out = run_child("--child", "memory", "--inferer", name, "--size", *map(str, size), *common, env=env)
                mem[name, alloc, key] = out["peak"]
                print(f"{name:9s} {alloc:21s} {key:5s} {size}: peak {out['peak'] / 2**20:.0f} MiB", flush=True)

    def slope(n: str, alloc: str, a: str, b: str) -> float:
        return (mem[n, alloc, b] - mem[n, alloc, a]) / (voxels[b] - voxels[a])

    timing = reused.get("time") or {
        key: run_child("--child", "time", "--size", *map(str, sizes[key]), "--reps", str(args.reps), *common)
        for key in ("small", "big")
    }
    reps = len(timing["small"]["plain"]["wall"])
    raw_text = json.dumps({"memory": {" / ".join(k): v for k, v in mem.items()}, "time": timing})
    print(raw_text)
    if args.raw:
        Path(args.raw).write_text(raw_text + "\n")

    from monai.networks.nets import UNet

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_overhead import machine

    nparams = sum(p.numel() for p in UNet(3, 1, K, (16, 32, 64, 128), (2, 2, 2), num_res_units=1).parameters())
    target = (6 + 6 * K) * 4
    s, b = _fmt(sizes["small"]), _fmt(sizes["big"])
    what = "torch.cuda.max_memory_allocated" if args.cuda else "peak RSS (VmHWM) of a fresh process"
    large = "large" in sizes
    lines = [
        "## Sliding-window gradient memory (plain autograd vs window-by-window VJP)",
        "",
        f"Machine: {machine()}.",
        f"One input gradient (forward, per-sample Dice-CE, `torch.autograd.grad` w.r.t. the input) through "
        f"sliding-window inference: MONAI UNet(3, 1, {K}, (16, 32, 64, 128), (2, 2, 2), num_res_units=1) "
        f"({nparams / 1e6:.2f} M parameters, eval), window {_fmt(ROI)}, overlap {OVERLAP}, "
        f"{MODE} blending, sw_batch_size {args.sw_batch_size}, float32, batch 1. "
        f"Memory is the {what}, one process per inferer, allocator setting and volume; "
        f"extra bytes per extra voxel = (peak_big - peak_small) / (voxels_big - voxels_small) for {s} -> {b}"
        + (f", and the same slope for {b} -> {_fmt(sizes['large'])} (memory only)" if large else "")
        + ". Written by `python benchmarks/bench_memory.py --write`.",
        "",
        f"| inferer | allocator | peak {s} (MiB) | peak {b} (MiB) | extra bytes / extra voxel {s} -> {b} |"
        + (f" peak {_fmt(sizes['large'])} (MiB) | extra bytes / extra voxel {b} -> {_fmt(sizes['large'])} |"
           if large else ""),
        "|---|---|---|---|---|" + ("---|---|" if large else ""),
    ]
    labels = {"plain": "plain autograd (MONAI `SlidingWindowInferer`)",
              "windowed": "`WindowedInferer` (window-by-window VJP)"}
    for n in names:
        for alloc in allocators:
            sl = slope(n, alloc, "small", "big")
            row = (f"| {labels[n]} | {alloc} | {mem[n, alloc, 'small'] / 2**20:.0f} | "
                   f"{mem[n, alloc, 'big'] / 2**20:.0f} | {sl:.1f} ({sl / 4:.1f} float32) |")
            if large:
                sl = slope(n, alloc, "big", "large")
                row += f" {mem[n, alloc, 'large'] / 2**20:.0f} | {sl:.1f} ({sl / 4:.1f} float32) |"
            lines.append(row)
    pairs = [("small", "big")] + ([("big", "large")] if large else [])
    worst = max(slope("windowed", al, a, b) for al in allocators for a, b in pairs)
    plain = min(slope("plain", al, a, b) for al in allocators for a, b in pairs)
    lines += [
        "",
        f"Target (volattack issue 4): at most 6 + 6K = {6 + 6 * K} float32 = {target} bytes per extra voxel "
        f"for K = {K}. `WindowedInferer`: at most {worst:.1f} bytes in every row "
        f"({'within' if worst <= target else 'ABOVE'} target); plain autograd: at least {plain:.0f} bytes "
        f"({plain / worst:.1f}x more). "
        "The windowed figure is everything that scales with the volume: the input and its int64 labels, "
        "the stitched logits, the Dice-CE loss's intermediates (softmax, one-hot, log-softmax) and their "
        "gradients, the input gradient. With the default allocator, freed memory is kept and reused by "
        "glibc, so peaks carry a few tens of MiB of noise; the 1 MiB mmap threshold "
        "(`MALLOC_MMAP_THRESHOLD_`) returns freed tensors to the OS at once, so its peaks follow the live "
        "tensors. The small volume's peak is set by one window's activations, which the big volume's "
        "tensors partly reuse; the big -> large slope is the one for whole-volume sizes.",
        "",
        f"Time of the same computation, {reps} interleaved repetitions after a warm-up, in one process per "
        "volume: wall-clock minimum and median, and median process CPU time (all threads). Other jobs "
        "shared the 2 cores during the runs and slow single repetitions by up to 5x (busy-waiting "
        "OpenMP threads inflate CPU time too), so the minimum is the least disturbed run:",
        "",
        "| volume | plain wall min / median (s) | windowed wall min / median (s) | ratio of minima | "
        "ratio of medians | plain CPU (s) | windowed CPU (s) | CPU ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    med = statistics.median
    for key in ("small", "big"):
        p, w = timing[key]["plain"], timing[key]["windowed"]
        lines.append(
            f"| {_fmt(sizes[key])} | {min(p['wall']):.2f} / {med(p['wall']):.2f} | "
            f"{min(w['wall']):.2f} / {med(w['wall']):.2f} | {min(w['wall']) / min(p['wall']):.2f} | "
            f"{med(w['wall']) / med(p['wall']):.2f} | {med(p['cpu']):.2f} | {med(w['cpu']):.2f} | "
            f"{med(w['cpu']) / med(p['cpu']):.2f} |"
        )
    lines += [
        "",
        "The windowed backward re-runs each window's forward with autograd (one extra forward per window, "
        "as in gradient checkpointing); on a single window (64^3) that is the whole difference. On the big "
        "volume plain autograd also writes and re-reads every window's activations (GBs), while the "
        "windowed pass reuses one window's buffers.",
    ]
    from benchmarks_results import emit

    emit("Sliding-window gradient memory", lines, args)


if __name__ == "__main__":
    main()
