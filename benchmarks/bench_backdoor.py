"""Backdoors on the phantom task: the fine-tuning attack (success and clean Dice against fine-tuning
steps and the number of poisoned cases, as a figure) and the backdoor defences (spectral
signatures, fine-pruning, clean fine-tuning).

Fine-tuning attack (``finetune``): from a clean checkpoint (``train.init_checkpoint``), fine-tune
on a small set of ``--set-size`` training cases of which ``k`` are poisoned with the trigger and
target of the config's ``train.poison`` (rate ``k / set-size``, so exactly ``k`` cases), at a
constant learning rate; after ``s`` optimisation steps (for every ``s`` of ``--steps``, by resuming
the same run, which replays an uninterrupted one at a constant rate) the model is evaluated on
the test cases with ``evaluate.trigger`` (attack success with its 95% bootstrap interval over
cases, backdoor Dice, clean Dice on the clean cases). Writes ``finetune.json`` and
``finetune.png`` (success and clean Dice against steps, one line per ``k``).

Defences (``defend``, on a poisoned training run ``--poisoned-run``):
- spectral signatures (Tran et al., NeurIPS 2018) on the features of ``--feature-layer`` of every
  training case of the poisoned split: precision and recall of the flagged cases;
- fine-pruning (Liu et al., RAID 2018): prune ``--prune-fraction`` of the input channels of
  ``--prune-layer`` least active on clean training cases, evaluate, then fine-tune clean for
  ``--defence-steps`` steps and evaluate again;
- clean fine-tuning alone for the same steps. Writes ``defences.json``.

Usage:
    python benchmarks/bench_backdoor.py finetune --config configs/backdoor.yaml \\
        --clean runs/backdoor_clean/best.pt --out runs/backdoor_ft [--steps 8 24 48] [--poisoned 1 2 4]
    python benchmarks/bench_backdoor.py defend --config configs/backdoor.yaml \\
        --poisoned-run runs/backdoor/train --out runs/backdoor_def
Both take ``--test-datalist`` (default: the config's datalist) and ``--max-cases``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from volattack.utils import atomic_write_json  # noqa: E402

logger = logging.getLogger("bench_backdoor")


def load(path: str) -> Any:
    from volattack.pipeline import load_run_config

    return load_run_config(path)


def small_datalist(cfg: Any, n: int, out: Path, offset: int = 0) -> str:
    """A datalist of training cases ``offset .. offset + n - 1`` of the config (absolute paths, the labels)."""
    from volattack.data.datalist import load_datalist

    cases = load_datalist(cfg.data.datalist, key=cfg.data.train_key, base_dir=cfg.data.base_dir)[offset:offset + n]
    labels = json.loads(Path(cfg.data.datalist).read_text()).get("labels", {})
    path = out / f"datalist_{offset}_{n}.json"
    atomic_write_json(path, {"labels": labels, "training": [{"image": c["image"], "label": c["label"]} for c in cases]})
    return str(path)


def evaluate_model(cfg: Any, ckpt: str, poison_run: str, test_datalist: str, max_cases: int, out: Path
                   ) -> dict[str, Any]:
    """Clean Dice and the trigger row (success, backdoor Dice, untouched Dice, RMS HU) with intervals."""
    from volattack.data.datalist import load_datalist
    from volattack.evaluation.config import EvalConfig
    from volattack.evaluation.runner import evaluate
    from volattack.models.sources import load_model
    from volattack.threats.config import TriggerEvalConfig

    model = load_model(ckpt)
    cases = load_datalist(test_datalist, key="test")[:max_cases]
    ec = EvalConfig(attacks=[], sanity_checks=False, figures=False, sw_batch_size=4,
                    trigger=TriggerEvalConfig(run=poison_run))
    res = evaluate(model.module, cases, out, eval_cfg=ec, preprocess=cfg.data.preprocess,
                   num_classes=int(cfg.model.out_channels), seed=cfg.seed, progress=False)
    clean = res["summary"]["clean"]
    row = next(iter(res["summary"]["attacks"].values()))
    keys = ("backdoor_success", "backdoor_dice", "untouched_dice", "rms_units", "linf_units", "ssim", "adv_dice")
    return {"cases": len(cases), "clean_dice": clean["clean_dice"], "clean_dice_ci": clean.get("clean_dice_ci"),
            **{k: row.get(k) for k in keys}, **{f"{k}_ci": row.get(f"{k}_ci") for k in keys}}


def fine_tune(cfg: Any, init: str, datalist: str, out: Path, steps: int, poison: Optional[Any], lr: float,
              resume: bool = False) -> str:
    """Fine-tune ``init`` on ``datalist`` for ``steps`` optimisation steps (constant lr); ``last.pt``."""
    from volattack.training import train

    data = replace(cfg.data, datalist=datalist, val_key="none")
    n = len(json.loads(Path(datalist).read_text())["training"])
    per_epoch = math.ceil(n / cfg.train.batch_size)
    if steps % per_epoch:
        raise ValueError(f"--steps must be multiples of {per_epoch} (steps per epoch of {n} cases), got {steps}.")
    tc = replace(cfg.train, epochs=steps // per_epoch, lr=lr, lr_schedule="constant", val_interval=10_000,
                 init_checkpoint=init, poison=poison)
    train(cfg.model, tc, data, out, seed=cfg.seed, resume=resume, progress=False)
    return str(out / "last.pt")


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load(args.config)
    if cfg.train is None or cfg.train.poison is None:
        raise ValueError(f"{args.config} needs a train.poison section (the trigger and target).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dl = small_datalist(cfg, args.set_size, out)
    test = args.test_datalist or cfg.data.datalist
    rows = []
    for k in args.poisoned:
        poison = replace(cfg.train.poison, rate=k / args.set_size)
        run = out / f"k{k}"
        for j, s in enumerate(sorted(args.steps)):
            ckpt = fine_tune(cfg, args.clean, dl, run, s, poison, args.lr, resume=j > 0)
            ev = evaluate_model(cfg, ckpt, str(run), test, args.max_cases, out / f"eval_k{k}_s{s}")
            rows.append({"poisoned": k, "set_size": args.set_size, "steps": s, **ev})
            logger.info("k=%d steps=%d: success %.3f clean Dice %.3f", k, s, ev["backdoor_success"], ev["clean_dice"])
    base = evaluate_model(cfg, args.clean, str(out / f"k{args.poisoned[0]}"), test, args.max_cases, out / "eval_clean")
    result = {"config": args.config, "clean_checkpoint": args.clean, "lr": args.lr, "rows": rows,
              "clean_model": base, "trigger": json.loads((out / f"k{args.poisoned[0]}" / "poison.json").read_text())["trigger"]}
    atomic_write_json(out / "finetune.json", result)
    figure(result, out / "finetune.png")
    return result


def figure(result: dict[str, Any], path: Path) -> None:
    """Success and clean Dice against steps, one line per number of poisoned cases (95% intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    base = result["clean_model"]
    for k in sorted({r["poisoned"] for r in result["rows"]}):
        rs = sorted((r for r in result["rows"] if r["poisoned"] == k), key=lambda r: r["steps"])
        for ax, key in zip(axes, ("backdoor_success", "clean_dice")):
            xs, ys = [0] + [r["steps"] for r in rs], [base[key]] + [r[key] for r in rs]
            cis = [base.get(f"{key}_ci")] + [r.get(f"{key}_ci") for r in rs]
            ax.plot(xs, ys, marker="o", label=f"{k} of {rs[0]['set_size']} poisoned")
            lo = [c[0] if c else y for c, y in zip(cis, ys)]
            hi = [c[1] if c else y for c, y in zip(cis, ys)]
            ax.fill_between(xs, lo, hi, alpha=0.15)
    axes[0].set(xlabel="fine-tuning steps", ylabel="attack success rate", ylim=(-0.05, 1.05),
                title="backdoor success (triggered test cases)")
    axes[1].set(xlabel="fine-tuning steps", ylabel="clean Dice", title="clean Dice (clean test cases)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _split_images(cfg: Any, run: Path) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor]]:
    """Model inputs of the poisoned training split (poisoned files in place), the poisoned indices,
    and the clean inputs of the unpoisoned cases."""
    from volattack.data.datalist import load_datalist
    from volattack.data.transforms import build_transforms
    from volattack.threats.poison import read_record

    rec = read_record(run)
    cases = load_datalist(cfg.data.datalist, key=cfg.data.train_key, base_dir=cfg.data.base_dir)
    for r in rec["poisoned"]:
        cases[r["index"]] = {"image": r["image"], "label": r["label"]}
    tr = build_transforms(cfg.data.preprocess, mode="eval")
    images = [torch.as_tensor(tr(dict(c))["image"]).float()[None] for c in cases]
    idx = [int(r["index"]) for r in rec["poisoned"]]
    return images, idx, [x for i, x in enumerate(images) if i not in idx]


def run_defend(args: argparse.Namespace) -> dict[str, Any]:
    from volattack.inference import make_inferer
    from volattack.models.checkpoint import save_checkpoint
    from volattack.models.sources import load_model
    from volattack.threats.backdoor import case_features, fine_prune, spectral_signatures

    cfg = load(args.config)
    out, run = Path(args.out), Path(args.poisoned_run)
    out.mkdir(parents=True, exist_ok=True)
    test = args.test_datalist or cfg.data.datalist
    ckpt = str(run / "best.pt")
    net = load_model(ckpt).module.eval()
    pre = cfg.data.preprocess
    inferer = make_inferer(pre.roi_size, 4, 0.25, cval=float(pre.b_min))
    images, poisoned, clean_images = _split_images(cfg, run)
    feats = case_features(net, args.feature_layer, images, forward=lambda x: inferer(x, net))
    sig = spectral_signatures(feats, poisoned)
    result: dict[str, Any] = {"poisoned_run": str(run), "spectral_signatures": {
        "layer": args.feature_layer, "cases": len(images), "poisoned": poisoned, **sig}}
    result["backdoored"] = evaluate_model(cfg, ckpt, str(run), test, args.max_cases, out / "eval_backdoored")
    pruned, chans = fine_prune(net, args.prune_layer, clean_images[: args.clean_cases], args.prune_fraction,
                               forward=lambda x, m: inferer(x, m))
    pruned_path = out / "pruned.pt"
    save_checkpoint(pruned_path, pruned, cfg.model, preprocess=pre)
    result["pruned"] = {"layer": args.prune_layer, "fraction": args.prune_fraction, "channels": chans,
                        **evaluate_model(cfg, str(pruned_path), str(run), test, args.max_cases, out / "eval_pruned")}
    clean_dl = small_datalist(cfg, args.clean_cases, out)  # the original files: the defender's clean data
    for name, init in (("fine_pruned", str(pruned_path)), ("clean_finetuned", ckpt)):
        last = fine_tune(cfg, init, clean_dl, out / name, args.defence_steps, None, args.lr)
        result[name] = {"steps": args.defence_steps,
                        **evaluate_model(cfg, last, str(run), test, args.max_cases, out / f"eval_{name}")}
    atomic_write_json(out / "defences.json", result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("finetune", "defend"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--test-datalist", default=None)
        p.add_argument("--max-cases", type=int, default=10)
        p.add_argument("--lr", type=float, default=1e-3)
    ft = sub.choices["finetune"]
    ft.add_argument("--clean", required=True, help="clean checkpoint to fine-tune from")
    ft.add_argument("--set-size", type=int, default=8)
    ft.add_argument("--poisoned", type=int, nargs="+", default=[1, 2, 4])
    ft.add_argument("--steps", type=int, nargs="+", default=[8, 24, 48])
    df = sub.choices["defend"]
    df.add_argument("--poisoned-run", required=True)
    df.add_argument("--feature-layer", default="model.1")
    df.add_argument("--prune-layer", default="model.2.0.conv")
    df.add_argument("--prune-fraction", type=float, default=0.5)
    df.add_argument("--clean-cases", type=int, default=8)
    df.add_argument("--defence-steps", type=int, default=24)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_finetune(args) if args.cmd == "finetune" else run_defend(args)
    logger.info("%s", json.dumps(result, default=str)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
