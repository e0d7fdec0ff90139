"""Cost of one attack step through the deployed nnU-Net v2 pipeline, and its memory per voxel.

One attack step = the deployed pipeline's forward on the scan (nnU-Net's transpose, crop,
normalisation, resampling, gaussian sliding window, mirroring TTA, fold mean, resampling back,
softmax; :mod:`volattack.models.nnunet_deploy`), per-sample Dice-CE against the clean prediction
(``volattack.attacks.objectives.objective_per_sample(..., "dice_ce")``) and the input gradient in
HU (``torch.autograd.grad``). Compared, in the same process and interleaved, with the bare network
passes over the same windows, flips and folds:

- ``bare f+b``: one forward with autograd and one input backward per (fold, window, flip): the
  cost of any exact gradient that keeps no window's activations beyond its own backward;
- ``bare passes``: the network passes the step runs with ``keep_activations_mb=0``: in addition
  one forward without autograd per (fold, window, flip) (the forward pass; the backward
  recomputes each window, so that at most one window's activations are alive).
  ``step (recompute) / bare passes`` is the overhead of everything that is not the network
  (preprocessing, resampling, stitching, softmax, the loss).

``step`` uses the default ``keep_activations_mb`` (``--keep-mb``): the passes whose graphs fit the
budget are not recomputed; ``step (recompute)`` keeps none.

Memory: each volume runs in a fresh subprocess reporting its peak resident set (``VmHWM``) during
one attack step; the figure is ``(peak_big - peak_small) / (voxels_big - voxels_small)``, the extra
peak per extra source voxel (constant parts cancel). Before the step, the setup's freed memory is
given back to the OS and the peak counter reset (:func:`settle_memory`): the peak is that of what
is live (model, scan, labels) plus the step, not of the phantom generation's and the clean
prediction's garbage, which varied by tens of MiB from run to run.

The model folder is ``--model`` (one built by ``data_scripts/make_nnunet_model.py``); with
``--folds 2`` and a folder that has one fold, a temporary copy gets ``fold_1`` = ``fold_0`` (same
cost as two trained folds). Scans: phantoms (int16 HU NIfTI, about 1.5 x 1.5 x 3 mm).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_nnunet.py --model MODEL_FOLDER [--small 48 48 32]
        [--big 96 96 64] [--time-size 64 64 48] [--reps 3] [--folds 2] [--write] [--results PATH]
    python benchmarks/bench_nnunet.py --model MODEL_FOLDER --predictor-check RUN_DIR --datalist DATALIST

The second form runs ``nnUNetPredictor`` itself on the clean test files and on the adversarial
files a ``volattack attack MODEL_FOLDER DATALIST ... --space source --save-adv`` run wrote, and
prints its Dice beside volattack's reported one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from benchmarks_results import add_results_args, emit, refuse_quick_write  # noqa: E402

SECTION = "nnU-Net v2 deployed pipeline: attack step cost and memory"


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only).")


def model_with_folds(model: Path, folds: int, tmp: Path) -> Path:
    """``model`` itself, or a copy with ``fold_1 .. fold_{folds-1}`` copied from ``fold_0``."""
    have = sorted(d.name for d in model.glob("fold_*") if (d / "checkpoint_final.pth").is_file())
    if len(have) >= folds:
        return model
    dst = tmp / model.name
    dst.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(model / name, dst / name)
    for f in range(folds):
        (dst / f"fold_{f}").mkdir()
        os.symlink((model / have[0] / "checkpoint_final.pth").resolve(), dst / f"fold_{f}" / "checkpoint_final.pth")
    return dst


def make_scan(size, path: Path):
    """A phantom written as int16 HU NIfTI and read back as a SourceScan."""
    import nibabel as nib
    import numpy as np

    from volattack.data.phantoms import generate_phantom
    from volattack.data.source import read_scan

    ph = generate_phantom(3, size=tuple(size), spacing=(1.5, 1.5, 3.0))
    nib.save(nib.Nifti1Image(np.round(ph.image).astype(np.int16), ph.affine), str(path))
    return read_scan(path)


def attack_step(pipe, x, y):
    """Forward, per-sample Dice-CE against ``y``, input gradient (HU)."""
    import torch

    from volattack.attacks.objectives import objective_per_sample

    xi = x.detach().requires_grad_(True)
    loss = objective_per_sample(pipe(xi), y, "dice_ce").sum()
    (g,) = torch.autograd.grad(loss, xi)
    return g


def bare_passes(head, xpad, with_nograd_forward: bool) -> None:
    """The network passes over the head's windows, flips and folds (input gradients only)."""
    import torch

    from volattack.utils import heap_allocations

    for net in head.networks:
        for sl in head._layout["slicers"]:
            w = xpad[(slice(None), slice(None)) + sl]
            with heap_allocations():  # as the head runs its passes (a no-op under glibc's defaults)
                for dims in head.flips:
                    wi = (torch.flip(w, dims) if dims else w).contiguous()
                    if with_nograd_forward:
                        with torch.no_grad():
                            net(wi)
                    wi = wi.requires_grad_(True)
                    out = net(wi)
                    torch.autograd.grad(out, [wi], torch.ones_like(out))


def setup(args, size, keep_mb=None):
    import torch

    from volattack.models.sources import load_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    folder = model_with_folds(Path(args.model), args.folds, tmp)
    loaded = load_model(folder, folds=list(range(args.folds)),
                        keep_activations_mb=args.keep_mb if keep_mb is None else keep_mb,
                        mmap_threshold_mb=args.mmap_mb)
    scan = make_scan(size, tmp / "scan.nii.gz")
    pipe = loaded.deploy(scan)
    x = torch.from_numpy(scan.array)[None]
    y = pipe.predict(x)
    return pipe, x, y, tmp, (folder, scan)


def settle_memory() -> int:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), reset the peak counter to the
    current resident set (Linux ``/proc/self/clear_refs``, value 5) and return that resident set
    (bytes): what the setup left live, without its garbage."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
    Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only).")


def child_memory(args) -> None:
    pipe, x, y, tmp, _ = setup(args, args.size)
    base = settle_memory()
    t0 = time.perf_counter()
    attack_step(pipe, x, y)
    out = {"peak": vm_hwm(), "base": base, "seconds": time.perf_counter() - t0, "voxels": int(x[0, 0].numel()),
           "passes": pipe.head.network_passes(), "kept": pipe.head.last_kept, "keep_mb": args.keep_mb, "mmap_mb": args.mmap_mb}
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def child_time(args) -> None:
    import torch

    from volattack.models.sources import load_model

    pipe, x, y, tmp, (folder, scan) = setup(args, args.size)
    recompute = load_model(folder, folds=list(range(args.folds)), keep_activations_mb=0,
                           mmap_threshold_mb=args.mmap_mb).deploy(scan)
    head = pipe.head
    with torch.no_grad():
        xpad = head._pad(head.resize_in(pipe.to_model(x)).float())
    runs = {"step": lambda: attack_step(pipe, x, y), "step (recompute)": lambda: attack_step(recompute, x, y),
            "bare f+b": lambda: bare_passes(head, xpad, False), "bare passes": lambda: bare_passes(head, xpad, True)}
    for f in runs.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"times": times, "passes": head.network_passes(), "windows": head.num_windows,
                      "flips": len(head.flips), "folds": len(head.networks), "voxels": int(x[0, 0].numel()),
                      "kept": head.last_kept, "pass_bytes": head.last_pass_bytes, "keep_mb": args.keep_mb,
                      "describe": head.describe()}))


def predictor_dice(model: Path, datalist: Path, run_dir: Path) -> list[dict]:
    """Dice (mean over foreground classes, volattack's rule) of ``nnUNetPredictor`` itself on each
    test case's clean file and on the adversarial file volattack wrote under ``run_dir``
    (``--save-adv``), next to the Dice volattack reported for it (``results.csv``)."""
    import numpy as np
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from volattack.data.source import read_scan
    from volattack.metrics.segmentation import mean_foreground_dice

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model), use_folds=None)
    k = pred.label_manager.num_segmentation_heads

    def dice(image: Path, label: np.ndarray) -> float:
        img, props = SimpleITKIO().read_images([str(image)])
        seg = pred.predict_single_npy_array(img, props, None, None, False).transpose(2, 1, 0)
        return float(mean_foreground_dice(torch.from_numpy(seg.astype(np.int64))[None],
                                          torch.from_numpy(label.astype(np.int64))[None], k)[0])

    records = [json.loads(p.read_text()) for p in sorted((run_dir / "cases").glob("*.json"))]
    out = []
    for case in json.loads(datalist.read_text())["test"]:
        image, label = datalist.parent / case["image"], datalist.parent / case["label"]
        rec = next((r for r in records if Path(r["image"]).name == Path(image).name), None)
        if rec is None:
            continue
        lab = read_scan(label).array[0]
        row = {"case": case["subject"], "clean_volattack": rec["clean"]["dice"], "clean_nnunet": dice(image, lab)}
        for name, att in rec["attacks"].items():
            adv = sorted(run_dir.glob(f"adversarial/*{Path(image).name.split('.')[0]}_*"))
            row[name] = {"adv_volattack": att["dice"], "adv_nnunet": dice(adv[0], lab) if adv else None,
                         "file": adv[0].name if adv else None}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *extra], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, mem: dict, timing: dict) -> list[str]:
    from bench_overhead import machine

    t = timing["times"]
    med = {k: statistics.median(v) for k, v in t.items()}
    best = {k: min(v) for k, v in t.items()}
    slope = (mem["big"]["peak"] - mem["small"]["peak"]) / (mem["big"]["voxels"] - mem["small"]["voxels"])
    fmt = "x".join
    d = timing["describe"]
    return [
        f"## {SECTION}",
        "",
        f"Machine: {machine()} (2 CPU cores shared with other jobs, no GPU).",
        f"Model: the folder built by `data_scripts/make_nnunet_model.py` (patch {d['patch_size']}), "
        f"{timing['folds']} folds, mirroring over axes {d['mirror_axes']} "
        f"({timing['flips']} passes per window), tile step {d['tile_step_size']}, float16 accumulation "
        f"emulated. Scan for timing: phantom {fmt(map(str, args.time_size))} at 1.5 x 1.5 x 3 mm "
        f"({timing['windows']} windows, {timing['passes']} network passes per forward). {args.reps} "
        f"interleaved repetitions after a warm-up. `step`: keep_activations_mb={timing['keep_mb']:g}, "
        f"{timing['kept']} of {timing['passes']} passes kept ({timing['pass_bytes'] / 2**20:.1f} MiB saved "
        f"per pass); `step (recompute)`: keep_activations_mb=0. Written by `python benchmarks/bench_nnunet.py --write`.",
        "",
        "| | median s | best s | step / this (median) | step / this (best-of) |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {k} | {med[k]:.2f} | {best[k]:.2f} | {med['step'] / med[k]:.3f} | {best['step'] / best[k]:.3f} |"
          for k in ("step", "step (recompute)", "bare f+b", "bare passes")],
        "",
        f"Memory (keep_activations_mb={mem['big']['keep_mb']:g}; {mem['small']['kept']} and "
        f"{mem['big']['kept']} passes kept): peak RSS of one attack step in a fresh process: {fmt(map(str, args.small))} "
        f"({mem['small']['voxels']} voxels) {mem['small']['peak'] / 2**20:.0f} MiB, {fmt(map(str, args.big))} "
        f"({mem['big']['voxels']} voxels, {mem['big']['passes']} passes) {mem['big']['peak'] / 2**20:.0f} MiB: "
        f"**{slope:.0f} bytes per extra source voxel** (target <= 150).",
        "",
        "Targets (issue 10): step <= 1.10 x the bare forward+backward passes (`bare f+b`); <= 150 bytes "
        "per extra source voxel. `step (recompute)` runs every network pass twice (a forward without "
        "autograd, then the recomputation in the window-by-window backward), the price of keeping one "
        "window's activations at a time; `step` skips the recomputation for the passes kept within the "
        "budget, so the memory bound holds beyond the budget's constant.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", required=True, help="nnU-Net model folder")
    ap.add_argument("--small", type=int, nargs=3, default=[48, 48, 32])
    ap.add_argument("--big", type=int, nargs=3, default=[96, 96, 64])
    ap.add_argument("--time-size", type=int, nargs=3, default=[64, 64, 48])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--keep-mb", type=float, default=1024.0, help="keep_activations_mb of the measured step")
    ap.add_argument("--mmap-mb", type=float, default=1.0,
                    help="mmap_threshold_mb of the model (default 1, the option's default; 0: glibc's defaults)")
    add_results_args(ap)
    ap.add_argument("--predictor-check", metavar="RUN_DIR",
                    help="instead: nnUNetPredictor's Dice on the clean and adversarial files of a "
                         "`volattack attack ... --space source --save-adv` run (needs --datalist)")
    ap.add_argument("--datalist", help="the datalist that run attacked")
    ap.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "memory":
        return child_memory(args)
    if args.child == "time":
        return child_time(args)
    if args.predictor_check:
        if not args.datalist:
            ap.error("--predictor-check needs --datalist")
        predictor_dice(Path(args.model), Path(args.datalist), Path(args.predictor_check))
        return None
    refuse_quick_write(ap, args)
    common = ["--model", args.model, "--folds", str(args.folds), "--reps", str(args.reps), "--keep-mb", str(args.keep_mb),
              "--mmap-mb", str(args.mmap_mb)]
    mem = {k: run_child("--child", "memory", "--size", *map(str, s), *common)
           for k, s in (("small", args.small), ("big", args.big))}
    print(json.dumps(mem), flush=True)
    timing = run_child("--child", "time", "--size", *map(str, args.time_size), *common)
    print(json.dumps(timing), flush=True)
    emit(SECTION, report(args, mem, timing), args)


if __name__ == "__main__":
    main()
