"""Certified Dice by randomized smoothing on a noise-trained model (issue 11 target), with its
soundness check: for sigma in {0.06, 0.12, 0.25} (input units), per test phantom, the certified
Dice (SegCertify, Fischer et al., ICML 2021: abstentions count as misses) and the abstention rate
of ``volattack.certify``; the certified L2 radius R = sigma * Phi^-1(tau) in input units and HU and
its RMS equivalent R / sqrt(voxels) next to the measured RMS of the robustness study's empirical
attacks; and the smoothed model's Dice (majority vote over noise draws, no abstention) clean and
under an EOT PGD-L2 attack of radius R on its soft form (``SmoothedModel``: softmax averaged over
noise draws; Salman et al., NeurIPS 2019). Soundness: the certified Dice is no higher than the
attacked smoothed Dice, case by case and on average.

The model is the robustness study's clean recipe (configs/robustness_study.yaml, variant
``clean``, seed 0) trained with ``train.noise_sigma`` (Gaussian noise augmentation, clamped to
the input range: the base classifier that ``certify(..., bounds=(0, 1))`` certifies).

Usage:
    python benchmarks/bench_certify_sigma.py [--train-sigma 0.12] [--cases 6] [--n0 10] [--n 100]
        [--alpha 1e-3] [--tau 0.75] [--eot 4] [--steps 5] [--out runs/G2_noise] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

SIGMAS = (0.06, 0.12, 0.25)


def noise_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The run config and the best checkpoint of the noise-trained clean recipe (trained once, then reused)."""
    from dataclasses import replace

    from volattack.pipeline import ensure_phantoms, run_train
    from volattack.study import load_study
    from volattack.utils import atomic_write_json

    plan = load_study(args.study, overrides=[f"train.noise_sigma={args.train_sigma}", f"seed={args.seed}"])
    cfg = replace(plan.variants["clean"], output_dir=str(args.out))
    cfg = ensure_phantoms(cfg, progress=False)
    train_dir = Path(args.out) / "train"
    summary_path = train_dir / "train_summary.json"
    if not summary_path.is_file():
        summary = run_train(cfg, train_dir, resume=(train_dir / "last.pt").is_file(), progress=False)
        atomic_write_json(summary_path, summary)
    return cfg, Path(json.loads(summary_path.read_text())["best_checkpoint"])


def study_rms(run: Path) -> list[tuple[str, float]]:
    """``(label, mean measured RMS in HU)`` of every attack row of a study run's results (if present)."""
    path = run / "results.json"
    if not path.is_file():
        return []
    summ = json.loads(path.read_text())["summary"]["attacks"]
    return [(k, v["rms_units"]) for k, v in summ.items() if isinstance(v.get("rms_units"), (int, float))]


def measure_case(model: Any, x: torch.Tensor, y: torch.Tensor, i: int, args: argparse.Namespace,
                 inferer: Any) -> dict[float, dict[str, float]]:
    """Per sigma: certified Dice, abstention, radius, smoothed Dice clean and under EOT PGD-L2 at R."""
    import volattack
    from volattack.attacks.objectives import hard_foreground_dice
    from volattack.defenses.smoothing import SmoothedModel, certified_dice, smoothed_predict
    from volattack.ops import seed_from

    out = {}
    k = 5
    for j, sigma in enumerate(SIGMAS):
        seed, s_clean, s_eot, s_att = (seed_from(args.seed, i, j, t) for t in range(4))
        res = volattack.certify(model, x, sigma, args.n0, args.n, args.alpha, args.tau, inferer=inferer,
                                batch=args.batch, seed=seed, num_classes=k, unit_scale=args.hu, bounds=(0.0, 1.0))
        kw = dict(inferer=inferer, batch=args.batch, num_classes=k, bounds=(0.0, 1.0))
        clean = smoothed_predict(model, x, sigma, args.n, seed=s_clean, **kw)
        smooth = SmoothedModel(model, sigma, samples=args.eot, seed=s_eot, inferer=inferer, bounds=(0.0, 1.0))
        atk = volattack.create_attack("pgd_l2", smooth, eps=res.radius, steps=args.steps, bounds=(0.0, 1.0),
                                      seed=seed, measure_ssim=False)
        adv = atk.run(x, y).adv
        attacked = smoothed_predict(model, adv, sigma, args.n, seed=s_att, **kw)
        delta = (adv - x).double()
        out[sigma] = {
            "cert": float(certified_dice(res.labels, y, k, "miss")[0]), "abstain": float(res.abstain_rate[0]),
            "radius": res.radius, "radius_hu": res.radius_units, "radius_rms_hu": res.radius_rms_units,
            "smoothed": float(hard_foreground_dice(clean, y, k)[0]),
            "attacked": float(hard_foreground_dice(attacked, y, k)[0]),
            "adv_l2": float(delta.flatten().norm()), "adv_rms_hu": float(delta.pow(2).mean().sqrt()) * args.hu,
        }
    return out


def _ci(values: list[float], digits: int = 3) -> str:
    from volattack.metrics.statistics import bootstrap_ci

    e = bootstrap_ci(values)
    return f"{e.value:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}]"


def table(per_case: list[dict[float, dict[str, float]]], base: list[float]) -> list[str]:
    """The Markdown table of the measurements (means and 95% bootstrap intervals over the cases)."""
    from volattack.metrics.statistics import paired_bootstrap_diff

    lines = ["| sigma | R (L2, input) | R (HU) | RMS equiv. R/sqrt(V) (HU) | Certified Dice | Abstained | "
             "Smoothed Dice | Smoothed Dice under EOT PGD-L2 at R | attacked − certified | sound cases |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for sigma in SIGMAS:
        rows = [c[sigma] for c in per_case]
        cert, att = [r["cert"] for r in rows], [r["attacked"] for r in rows]
        d = paired_bootstrap_diff(att, cert)
        sound = sum(a >= c for a, c in zip(att, cert))
        lines.append(
            f"| {sigma:g} | {rows[0]['radius']:.4f} | {rows[0]['radius_hu']:.1f} | {rows[0]['radius_rms_hu']:.3f} | "
            f"{_ci(cert)} | {_ci([r['abstain'] for r in rows])} | {_ci([r['smoothed'] for r in rows])} | {_ci(att)} | "
            f"{d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] | {sound}/{len(rows)} |")
    lines += ["", f"Base (unsmoothed) noise-trained model, clean: Dice {_ci(base)}."]
    return lines


def main() -> None:
    import volattack
    from benchmarks_results import add_results_args, emit
    from bench_overhead import machine
    from volattack.attacks.objectives import hard_foreground_dice
    from volattack.data.datalist import load_datalist
    from volattack.data.transforms import build_transforms
    from volattack.evaluation.cases import load_case
    from volattack.inference import make_inferer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="configs/robustness_study.yaml")
    ap.add_argument("--study-run", default="runs/robustness_study/seed_0/clean")
    ap.add_argument("--train-sigma", type=float, default=0.12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--n0", type=int, default=10)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=1e-3)
    ap.add_argument("--tau", type=float, default=0.75)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eot", type=int, default=4, help="noise draws per EOT gradient")
    ap.add_argument("--steps", type=int, default=5, help="PGD-L2 steps")
    ap.add_argument("--hu", type=float, default=425.0, help="HU per input unit (window [-175, 250])")
    ap.add_argument("--out", default="runs/G2_noise")
    add_results_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, best = noise_model(args)
    model, _ = volattack.load_checkpoint(str(best))
    model.eval()
    pre = cfg.data.preprocess
    inferer = make_inferer(pre.roi_size, 4, 0.25)
    tf = build_transforms(pre, mode="eval")
    vols = [load_case(c, tf)[:2] for c in load_datalist(cfg.data.datalist, key="test")[:args.cases]]
    per_case, base = [], []
    for i, (x, y) in enumerate(vols):
        with torch.no_grad():
            base.append(float(hard_foreground_dice(inferer(x, model).argmax(1, keepdim=True), y, 5)[0]))
        per_case.append(measure_case(model, x, y, i, args, inferer))
        print(f"case {i}: " + ", ".join(f"sigma {s}: cert {v['cert']:.3f} attacked {v['attacked']:.3f}"
                                        for s, v in per_case[-1].items()), flush=True)
    voxels = math.prod(vols[0][0].shape[2:])
    rms = study_rms(Path(args.study_run))
    lines = [
        "## Certified Dice on a noise-trained model (sigma 0.06 / 0.12 / 0.25) and soundness", "",
        f"Machine: {machine()}. Model: the robustness study's clean recipe trained with train.noise_sigma = "
        f"{args.train_sigma} (seed {args.seed}); {len(vols)} test phantoms ({'x'.join(map(str, vols[0][0].shape[2:]))} "
        f"= {voxels} voxels after cropping); certify n0 = {args.n0}, n = {args.n}, alpha = {args.alpha:g} (Holm over "
        f"the voxels), tau = {args.tau}, noise clamped to [0, 1]; smoothed predictions from {args.n} draws; EOT "
        f"PGD-L2 at eps = R, {args.steps} steps, {args.eot} noise draws per gradient. Means with 95% bootstrap "
        "intervals over the cases. Written by `python benchmarks/bench_certify_sigma.py`.", "",
        *table(per_case, base), "",
        "Measured RMS of the study's empirical attacks on the clean model (seed 0, HU): "
        + (", ".join(f"{lbl} {v:.2f}" for lbl, v in rms) if rms else "(study run not found)") + ".", "",
        "Said plainly: over a whole volume the certified RMS is tiny. The certified L2 radius spreads over every "
        "voxel, so its RMS equivalent is hundredths to tenths of a HU while the empirical attacks run at RMS of "
        "several HU; randomized smoothing certifies these segmentations only against perturbations far "
        "below the budgets attacks use, with noise (sigma 0.25 = 106 HU) far above them.",
    ]
    emit("Certified Dice on a noise-trained model", lines, args)


if __name__ == "__main__":
    main()
