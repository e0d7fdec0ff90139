"""Cost of certification by randomized smoothing (SegCertify, Fischer et al., ICML 2021): the time
of ``volattack.certify`` with ``n0 + n`` noisy passes divided by the time of ``n0 + n`` bare
forward passes of the clean volume through the same sliding-window inference and the same
batching, measured side by side in one run (interleaved repetitions, median and best-of ratio),
in process CPU time on one torch thread, so that other load on a shared machine does not enter.
The certify time includes everything: noise draws, vote counting, binomial tests, Holm.

Also prints the certified radius of each sigma as an L2 norm and as its RMS equivalent
``R / sqrt(voxels)`` over this volume and over a 512 x 512 x 200 CT volume.

Usage:
    python benchmarks/bench_certify_cost.py [--size 48 48 40] [--n0 4] [--n 16] [--reps 5] [--threads 1] [--write]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import volattack
from volattack.inference import make_inferer

HU_PER_UNIT = 425.0  # CT window [-175, 250] HU -> [0, 1]


def bare(model, x, inferer, passes: int, batch: int) -> float:
    """Seconds of ``passes`` clean passes, ``batch`` copies per inference call (as certify batches)."""
    t0 = time.process_time()
    with torch.no_grad():
        for s in range(0, passes, batch):
            m = min(batch, passes - s)
            inferer(x.expand(m, *x.shape[1:]).contiguous(), model).argmax(1)
    return time.process_time() - t0


def timed_certify(model, x, inferer, args) -> float:
    t0 = time.process_time()
    volattack.certify(model, x, 0.25, args.n0, args.n, 1e-3, 0.75, inferer=inferer, batch=args.batch, seed=0,
                      num_classes=5)
    return time.process_time() - t0


def radius_lines(size: list[int]) -> list[str]:
    from volattack.defenses.smoothing import certified_radius

    vox, ct = math.prod(size), 512 * 512 * 200
    lines = ["| sigma | tau | R (L2, input units) | R (L2, HU) | RMS equiv. here (HU) | RMS equiv. 512x512x200 (HU) |",
             "|---|---|---|---|---|---|"]
    for sigma in (0.06, 0.12, 0.25):
        for tau in (0.75, 0.95):
            r = certified_radius(sigma, tau)
            lines.append(f"| {sigma} | {tau} | {r:.4f} | {r * HU_PER_UNIT:.1f} | "
                         f"{r / math.sqrt(vox) * HU_PER_UNIT:.4f} | {r / math.sqrt(ct) * HU_PER_UNIT:.5f} |")
    return lines


def main() -> None:
    from benchmarks_results import add_results_args, emit, refuse_quick_write
    from bench_overhead import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[48, 48, 40])
    ap.add_argument("--roi", type=int, nargs=3, default=[32, 32, 32])
    ap.add_argument("--n0", type=int, default=4)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    add_results_args(ap)
    args = ap.parse_args()
    refuse_quick_write(ap, args)
    if args.quick:
        args.size, args.roi, args.n0, args.n, args.reps = [20, 20, 16], [16, 16, 16], 1, 3, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = volattack.create_model("unet", in_channels=1, out_channels=5).eval()
    nparams = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 1, *args.size, generator=torch.Generator().manual_seed(0))
    inferer = make_inferer(args.roi, 2, 0.25)
    passes = args.n0 + args.n
    bare(model, x, inferer, args.batch, args.batch)  # warm-up (certify batches each phase on its own: the
    # bare run below uses the same calls when n0 is a multiple of the batch)
    timed_certify(model, x, inferer, args)
    ratios, t_bare, t_cert = [], [], []
    for _ in range(args.reps):  # interleaved: bare, certify, bare, certify ...
        tb = bare(model, x, inferer, passes, args.batch)
        tc = timed_certify(model, x, inferer, args)
        ratios.append(tc / tb)
        t_bare.append(tb)
        t_cert.append(tc)
    best = min(t_cert) / min(t_bare)
    lines = [
        "## Certification cost (certify with n0 + n noisy passes / n0 + n bare passes)",
        "",
        f"Machine: {machine()}.",
        f"Model: MONAI UNet (volattack `unet` defaults, {nparams / 1e6:.2f} M parameters, 5 classes), input "
        f"1x1x{'x'.join(map(str, args.size))}, sliding window {'x'.join(map(str, args.roi))} (overlap 0.25, "
        f"2 windows per call), n0 = {args.n0}, n = {args.n}, {args.batch} noisy copies per inference call; "
        f"process CPU time on {args.threads} torch thread(s), median of {args.reps} interleaved repetitions. "
        "Written by "
        "`python benchmarks/bench_certify_cost.py --write`.",
        "",
        "| bare passes CPU s (median) | certify CPU s (median) | median ratio | min | max | best-of ratio |",
        "|---|---|---|---|---|---|",
        f"| {statistics.median(t_bare):.2f} | {statistics.median(t_cert):.2f} | {statistics.median(ratios):.3f} | "
        f"{min(ratios):.3f} | {max(ratios):.3f} | {best:.3f} |",
        "",
        "Target (issue 11): at most 1.05. The certify time includes the noise draws, the vote counts, the "
        "binomial tests and the Holm correction; the bare passes run the clean volume through the same "
        "inference with the same batching.",
        "",
        "Certified radius R = sigma * Phi^-1(tau), an L2 norm over the whole input, and its RMS "
        "equivalent R / sqrt(voxels) (425 HU per input unit, the CT window [-175, 250] HU):",
        "",
        *radius_lines(args.size),
        "",
        "Said plainly: over a whole volume the certified RMS equivalent is tiny. Even sigma 0.25 at tau 0.95 "
        "certifies an RMS of about 0.02 HU on a 512 x 512 x 200 CT, while the empirical attacks in the tables "
        "above run at L-inf 1/255 to 8/255 (1.7 to 13.3 HU) with RMS sizes of the same order: randomized smoothing certifies segmentations "
        "only against perturbations far below the budgets attacks are run at, while the noise it needs "
        "(sigma 0.25 is 106 HU) is far above them.",
    ]
    emit("Certification cost", lines, args)


if __name__ == "__main__":
    main()
