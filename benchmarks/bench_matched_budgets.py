"""Dice after each attack on the quickstart model, with every attack's *measured* budget
(L-inf and RMS in HU, SSIM) side by side, so voxel and frequency attacks can be compared at
matched budgets rather than at nominal parameters.

Each voxel attack runs at a nominal L-inf of ``--eps``; the frequency attacks at their
published settings. The table sorts rows by measured RMS so attacks of similar size sit together.

Usage (after the quickstart has trained runs/quickstart/train/best.pt):
    python benchmarks/bench_matched_budgets.py [--eps 4/255] [--steps 10] [--write]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    import volattack
    from bench_overhead import machine
    from volattack.attacks.objectives import hard_foreground_dice
    from benchmarks_results import add_quickstart_args, emit, load_quickstart
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.checks import parse_number
    from volattack.evaluation.config import format_number
    from volattack.inference import make_inferer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_quickstart_args(ap)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    eps = float(parse_number(args.eps))
    cfg, model, k, vols = load_quickstart(args)
    pre = cfg.data.preprocess
    inferer = make_inferer(pre.roi_size, 4, 0.25)
    scale = intensity_from_preprocess(pre).unit_scale
    s = args.steps
    settings = {
        "gn": dict(eps=eps),
        "fgsm": dict(eps=eps),
        "bim": dict(eps=eps, alpha=eps / 4, steps=s),
        "pgd": dict(eps=eps, steps=s),
        "apgd": dict(eps=eps, steps=s),
        "segpgd": dict(eps=eps, steps=s),
        "cospgd": dict(eps=eps, steps=s),
        "fft": dict(eps=eps, steps=s),
        "vafa (paper)": ("vafa", dict(protocol="paper", q_max=20, block_size=8, steps=s)),
        "vafa (code: q_init qmax, q_min 5)": ("vafa", dict(protocol="paper", q_max=20, block_size=8, steps=s,
                                                              q_init="qmax", q_min=5)),
        "sa2 (code defaults)": ("sa2", dict(rho=0.2, block_size=8, steps=s)),
        "sa2 (published run)": ("sa2", dict(rho=0.4, block_size=16, steps=s, l_dc=0.2, l_ssim=0.75)),
    }
    rows = []
    clean = []
    for x, y in vols:
        with torch.no_grad():
            clean.append(float(hard_foreground_dice(inferer(x, model).argmax(1, keepdim=True), y, k)[0]))
    for label, spec in settings.items():
        name, kw = spec if isinstance(spec, tuple) else (label, spec)
        atk = volattack.create_attack(name, model, inferer=inferer, unit_scale=scale, seed=0, **kw)
        dice, linf, rms, ssim = [], [], [], []
        for i, (x, y) in enumerate(vols):
            res = atk.run(x, y, seed=i)
            with torch.no_grad():
                dice.append(float(hard_foreground_dice(inferer(res.adv, model).argmax(1, keepdim=True), y, k)[0]))
            linf.append(res.info["linf_units"][0])
            rms.append(res.info["rms_units"][0])
            ssim.append(res.info["ssim"][0])
        m = lambda v: sum(v) / len(v)  # noqa: E731
        rows.append((m(rms), label, m(dice), m(linf), m(ssim)))
        print(f"{label}: Dice {m(dice):.3f} L-inf {m(linf):.1f} HU RMS {m(rms):.1f} HU SSIM {m(ssim):.3f}", flush=True)
    rows.sort()
    lines = [
        "## Dice at matched measured budgets",
        "",
        f"Machine: {machine()}.",
        f"Quickstart checkpoint, {len(vols)} test phantoms, `volume` threat model, clean Dice "
        f"{sum(clean) / len(clean):.3f}; voxel attacks at nominal L-inf {format_number(eps)} ({eps * scale:.1f} HU), "
        f"{s} steps; rows sorted by measured RMS. Written by `python benchmarks/bench_matched_budgets.py --write`.",
        "",
        "| attack | Dice | measured L-inf (HU) | measured RMS (HU) | SSIM |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {lbl} | {d:.3f} | {li:.1f} | {r:.1f} | {ss:.3f} |" for r, lbl, d, li, ss in rows]
    emit("Dice at matched measured budgets", lines, args)


if __name__ == "__main__":
    main()
