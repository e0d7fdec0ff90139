"""Throughput of ``volattack evaluate`` under ``torchrun --nproc_per_node 2`` versus one process,
one thread per process, on the same phantom cases, model and attack, with the parity of the
per-case results.

Setup (not timed): phantoms (``--train-cases`` training and ``--cases`` test cases), a small
MONAI UNet trained on them for ``--train-epochs`` epochs with ``volattack.training.train``
(or ``--checkpoint``), and an evaluation config: PGD (``--steps`` steps, eps 4/255, Dice-CE,
``volume`` threat model, sliding windows of ``--roi``), sanity checks and figures off.

Measurement: ``python -m volattack evaluate cfg.yaml`` (1 process) and
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m volattack evaluate
cfg.yaml`` (2 processes, gloo; the runner shards case ``i`` to rank ``i % 2``), both with
``OMP_NUM_THREADS=1`` and ``OMP_WAIT_POLICY=PASSIVE``, each into a fresh run folder,
interleaved ``--reps`` times; medians. Two rates: end to end (wall time of the command:
interpreter and torch start-up, model loading, process-group set-up, evaluation, report)
and the case loop (``results.json`` ``timings.evaluate_seconds``, the slowest rank's loop).
Parity: the largest |difference| between the two runs' per-case Dice values (clean, and each
attack), expected 0 or float noise.

Usage:
    python benchmarks/bench_torchrun.py [--cases 8] [--size 64 64 48] [--steps 5] [--reps 3]
        [--checkpoint PATH --config RUN.yaml] [--write] [--results benchmarks/RESULTS.md]
    python benchmarks/bench_torchrun.py --quick --write --results /tmp/RESULTS.md   # smoke run

``--write`` replaces the section "## torchrun evaluation throughput" of ``--results``.
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
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks_results import add_results_args, emit, refuse_quick_write  # noqa: E402

SECTION = "torchrun evaluation throughput"
MODEL_KWARGS = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1}
ENV_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def phantoms_and_model(
    root: Path,
    *,
    train_cases: int,
    test_cases: int,
    size: list[int],
    roi: list[int],
    epochs: int,
    crop_foreground: bool = True,
    seed: int = 0,
) -> tuple[Path, Path, dict[str, Any]]:
    """Phantoms under ``root/phantoms`` and a UNet trained on them under ``root/train``.

    Reuses both when they already exist (same folder). Training: ``volattack.training.train``,
    AdamW lr 3e-3 (poly schedule), crops of ``roi`` voxels, no validation split (``best.pt`` is
    the final model).

    Returns:
        the datalist path, the checkpoint path, and the ``data.preprocess`` section used.
    """
    import volattack
    from volattack.data.config import DataConfig, PreprocessConfig
    from volattack.models.config import ModelConfig
    from volattack.training.config import TrainConfig
    from volattack.training import train

    pre = {"roi_size": list(roi), "num_samples": 2, "crop_foreground": crop_foreground}
    params = {"train_cases": train_cases, "test_cases": test_cases, "size": list(size), "epochs": epochs,
              "seed": seed, "preprocess": pre, "model": MODEL_KWARGS}
    marker = root / "setup.json"
    if marker.is_file() and json.loads(marker.read_text()) != params:
        raise ValueError(f"{root} holds phantoms/model made with other settings ({marker}); "
                         "use another --work folder.")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params))
    datalist = root / "phantoms" / "dataset.json"
    if not datalist.is_file():
        datalist = volattack.make_phantom_dataset(root / "phantoms", n=train_cases, size=tuple(size), seed=seed,
                                                  n_val=0, n_test=test_cases)
    ckpt = root / "train" / "best.pt"
    if not ckpt.is_file():
        t0 = time.perf_counter()
        train(
            ModelConfig("unet", 1, 5, dict(MODEL_KWARGS)),
            TrainConfig(epochs=epochs, batch_size=2, lr=3e-3, lr_schedule="poly", val_interval=epochs,
                        device="cpu"),
            DataConfig(datalist=str(datalist), preprocess=PreprocessConfig(**pre)),
            root / "train", seed=seed, progress=False,
        )
        print(f"trained {epochs} epoch(s) on {train_cases} phantoms in {time.perf_counter() - t0:.0f} s", flush=True)
    return datalist, ckpt, pre


def write_config(path: Path, datalist: Path, checkpoint: Path, preprocess: dict[str, Any], steps: int,
                 cases: int) -> Path:
    """An evaluation run config: PGD (eps 4/255, ``steps``, Dice-CE), no sanity checks or figures."""
    import yaml

    cfg = {
        "seed": 0,
        "output_dir": str(path.parent / "run"),
        "data": {"datalist": str(datalist), "preprocess": preprocess},
        "model": {"name": "unet", "in_channels": 1, "out_channels": 5, "kwargs": MODEL_KWARGS},
        "evaluate": {
            "checkpoint": str(checkpoint), "split": "test", "max_cases": cases,
            "attacks": [{"name": "pgd", "params": {"eps": "4/255", "steps": steps, "objective": "dice_ce"}}],
            "threat_model": "volume", "sw_batch_size": 4, "sw_overlap": 0.25,
            "sanity_checks": False, "figures": False, "device": "cpu",
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_evaluate(config: Path, out: Path, nproc: int) -> tuple[float, dict[str, Any]]:
    """Run ``volattack evaluate`` with ``nproc`` processes (1: plain, else torchrun); (wall s, results)."""
    if out.exists():  # a fresh run folder: finished cases would otherwise be reused, not recomputed
        shutil.rmtree(out)
    cli = ["-m", "volattack", "evaluate", str(config), "--out", str(out), "--quiet"]
    if nproc == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cli]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV_ONE_THREAD})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall, json.loads((out / "results.json").read_text())


def case_dice(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """``{(case, "clean" or attack label): Dice}`` of one results.json."""
    out = {}
    for c in results["cases"]:
        out[c["case"], "clean"] = float(c["clean"]["dice"])
        for label, s in c["attacks"].items():
            out[c["case"], label] = float(s["dice"])
    return out


def max_abs_diff(a: dict[tuple[str, str], float], b: dict[tuple[str, str], float]) -> float:
    """Largest |a - b| over the same keys (the key sets must match)."""
    if set(a) != set(b):
        raise RuntimeError(f"the runs scored different cases/attacks: {sorted(set(a) ^ set(b))}")
    return max((abs(a[k] - b[k]) for k in a), default=0.0)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--cases", type=int, default=8, help="test phantoms evaluated")
    ap.add_argument("--size", type=int, nargs=3, default=[64, 64, 48], help="phantom size (voxels)")
    ap.add_argument("--roi", type=int, nargs=3, default=[32, 32, 32], help="training crop and window (voxels)")
    ap.add_argument("--steps", type=int, default=5, help="PGD steps")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-cases", type=int, default=32)
    ap.add_argument("--train-epochs", type=int, default=25)
    ap.add_argument("--work", default=None, help="folder for phantoms, model and runs (default: temporary)")
    add_results_args(ap)
    args = ap.parse_args(argv)
    refuse_quick_write(ap, args)
    if args.quick:
        args.cases, args.size, args.roi, args.steps, args.reps = 2, [24, 24, 16], [16, 16, 16], 1, 1
        args.train_cases, args.train_epochs = 2, 1
    from bench_overhead import machine

    with tempfile.TemporaryDirectory(prefix="bench_torchrun_") as tmp:
        root = Path(args.work) if args.work else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        datalist, ckpt, pre = phantoms_and_model(root, train_cases=args.train_cases, test_cases=args.cases,
                                                 size=args.size, roi=args.roi, epochs=args.train_epochs)
        config = write_config(root / "eval.yaml", datalist, ckpt, pre, args.steps, args.cases)
        wall: dict[int, list[float]] = {1: [], 2: []}
        loop: dict[int, list[float]] = {1: [], 2: []}
        dice: dict[int, list[dict]] = {1: [], 2: []}
        worlds: dict[int, int] = {}
        for rep in range(args.reps):
            order = (1, 2) if rep % 2 == 0 else (2, 1)  # alternate which goes first
            for n in order:
                w, res = run_evaluate(config, root / f"run_rep{rep}_nproc{n}", n)
                wall[n].append(w)
                loop[n].append(float(res["timings"]["evaluate_seconds"]))
                dice[n].append(case_dice(res))
                worlds[n] = int(res["world_size"])
                n_cases = len(res["cases"])
                print(f"rep {rep + 1}/{args.reps} {n} process(es): {w:.1f} s wall, "
                      f"{loop[n][-1]:.1f} s case loop, {n_cases} cases", flush=True)
        if worlds != {1: 1, 2: 2}:
            raise RuntimeError(f"world sizes recorded in results.json: {worlds}, expected 1 and 2.")
        parity = max(max_abs_diff(a, b) for a in dice[1] for b in dice[2])
        repeat = max(max_abs_diff(dice[n][0], d) for n in (1, 2) for d in dice[n])
        clean = statistics.mean(v for (_, k), v in dice[1][0].items() if k == "clean")
        adv = statistics.mean(v for (_, k), v in dice[1][0].items() if k != "clean")

    med = statistics.median
    cpu = machine().split(", ")  # [cpu, threads of this process, Python, torch]
    rate = {n: {"wall": n_cases / med(wall[n]), "loop": n_cases / med(loop[n])} for n in (1, 2)}
    lines = [
        f"## {SECTION} (2 processes vs 1, one thread each)",
        "",
        f"Machine: {cpu[0]}, 1 torch thread per process (OMP_NUM_THREADS=1), Python {sys.version.split()[0]}, "
        f"{cpu[-1]}.",
        f"`volattack evaluate` on {n_cases} test phantoms ({'x'.join(map(str, args.size))}), UNet (16, 32, 64, 128) "
        f"trained {args.train_epochs} epoch(s) on {args.train_cases} phantoms, PGD eps 4/255, {args.steps} steps, "
        f"Dice-CE, `volume` threat model, windows {'x'.join(map(str, args.roi))} (overlap 0.25, sw_batch_size 4), "
        "sanity checks and figures off. 1 process: `python -m volattack evaluate`; 2 processes: "
        "`torchrun --standalone --nproc_per_node 2 -m volattack evaluate` (gloo, case i on rank i % 2). "
        f"Median of {args.reps} interleaved repetitions, each into a fresh run folder. End to end = wall time of "
        "the command (start-up, model loading, process group, evaluation, report); case loop = "
        "`timings.evaluate_seconds` of results.json (the slowest rank). "
        "Written by `python benchmarks/bench_torchrun.py --write`"
        + (" (--quick smoke run: timings meaningless)" if args.quick else "") + ".",
        "",
        "| processes | end to end (s) | cases/s end to end | case loop (s) | cases/s case loop |",
        "|---|---|---|---|---|",
    ]
    for n in (1, 2):
        lines.append(f"| {n} | {med(wall[n]):.1f} | {rate[n]['wall']:.3f} | {med(loop[n]):.1f} | "
                     f"{rate[n]['loop']:.3f} |")
    lines += [
        "",
        f"Speed-up with 2 processes: {rate[2]['wall'] / rate[1]['wall']:.2f}x end to end, "
        f"{rate[2]['loop'] / rate[1]['loop']:.2f}x in the case loop (ideal 2 on 2 cores). "
        f"Parity: largest |Dice difference| between the 1- and 2-process per-case results "
        f"(clean and PGD, every pair of runs) {parity:.3g}; between repetitions of the same run {repeat:.3g}. "
        f"Mean Dice: clean {clean:.3f}, PGD {adv:.3f}.",
    ]
    emit(SECTION, lines, args)


if __name__ == "__main__":
    main()
