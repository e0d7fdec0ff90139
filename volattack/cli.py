"""The ``volattack`` command line: train, attack, evaluate, benchmark, detect, study, leaderboard, phantoms, list.

Argument parsing imports neither torch nor MONAI, so ``volattack --help`` and argument
errors answer at once; each handler imports what it needs. Exit codes: 0 success,
2 bad arguments or configuration, 1 any other failure (the message names the cause).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger("volattack")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _add_common(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    if config:
        p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", default=None, help="run directory (default: output_dir of the config)")
    p.add_argument("--trust-bundle", action="store_true",
                   help="allow loading a MONAI bundle directory as the model (its config can run code)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def _add_goal(p: argparse.ArgumentParser) -> None:
    """``attack --target/--mask``: the clinical goal (``evaluate.goal``) by class name."""
    p.add_argument("--target", action="append", default=[], metavar="GOAL",
                   help="targeted goal by class name: remove=liver[,spleen] or relabel=spleen:liver (repeatable; "
                        "evaluate.goal.target)")
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="perturb only body, body=THRESHOLD, near=CLASS:MM or box=x0,y0,z0,x1,y1,z1 (world mm, RAS; "
                        "evaluate.goal.mask)")


#: ``volattack list`` sections: name -> (module, function returning the registered names)
LISTINGS: dict[str, tuple[str, str]] = {
    "attacks": ("volattack.attacks", "list_attacks"),
    "models": ("volattack.models.zoo", "list_models"),
    "objectives": ("volattack.attacks.objectives", "list_objectives"),
    "defenses": ("volattack.defenses.registry", "list_defenses"),
    "sources": ("volattack.models.sources.base", "list_sources"),
    "triggers": ("volattack.threats.triggers", "list_triggers"),
    "detectors": ("volattack.threats.detectors", "list_detectors"),
}


def _add_attack_parser(sub: Any) -> None:
    """The ``attack`` subcommand: one attack on a datalist, from the command line alone."""
    p = sub.add_parser("attack", help="run one attack on a dataset with a trained checkpoint")
    p.add_argument("checkpoint", help="model: volattack checkpoint, TorchScript file or MONAI bundle directory")
    p.add_argument("datalist", help="MSD-style datalist JSON")
    p.add_argument("attack", help="attack name (volattack list attacks)")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, e.g. -p eps=8/255 -p steps=10 (repeatable)")
    p.add_argument("--split", default=None,
                   help="datalist key to attack (default: data.test_key of the config, 'test' without one)")
    p.add_argument("--config", default=None,
                   help="run config for preprocessing (default: config.yaml beside the checkpoint)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--save-adv", action="store_true", help="write adversarial volumes (float32 NIfTI, HU)")
    p.add_argument("--save-pred", action="store_true", help="write clean/adversarial predictions (NIfTI labels)")
    p.add_argument("--space", choices=["model", "source"], default=None, help="perturb the preprocessed tensor "
                   "(model, default) or the scan on its own grid in its units (source: -p eps=8 is 8 HU; evaluate.space)")
    p.add_argument("-m", "--model-option", dest="model_options", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the model's source (evaluate.model_options), e.g. for an nnU-Net folder "
                        "-m folds=[0] -m use_mirroring=false -m tile_step_size=0.5 (repeatable)")
    _add_goal(p)
    _add_common(p, config=False)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no heavy imports)."""
    parser = argparse.ArgumentParser(
        prog="volattack",
        description="Adversarial attacks and robustness evaluation for 3D medical segmentation models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("phantoms", help="write synthetic abdominal-CT phantoms and a datalist")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=16, help="training cases (default 16)")
    p.add_argument("--n-val", type=int, default=2, help="validation cases (default 2)")
    p.add_argument("--n-test", type=int, default=4, help="test cases (default 4)")
    p.add_argument("--size", type=int, nargs="+", default=[64, 64, 48], help="volume size, 1 or 3 ints")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="train a segmenter from a config (AdamW + Dice-CE)")
    _add_common(p)
    p.add_argument("--resume", action="store_true", help="continue from last.pt in the run directory")

    _add_attack_parser(sub)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint against a list of attacks and budgets")
    _add_common(p)
    p.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (overrides evaluate.checkpoint)")

    p = sub.add_parser("benchmark", help="whole pipeline from a config: phantoms, training, evaluation")
    _add_common(p)

    p = sub.add_parser(
        "detect",
        help="fit detectors of adversarial volumes; AUROC and TPR at 5%% FPR per attack, non-adaptive and adaptive",
        description="Fit the detectors of the config's 'detect' section on a fitting split (clean + attacked "
        "volumes) and report AUROC and TPR at 5%% FPR on a test split, against each attack and against the "
        "adaptive attack that knows the detector; writes detect.json and detect.md.",
    )
    _add_common(p)

    p = sub.add_parser(
        "study",
        help="robustness study: train several variants (e.g. clean, PGD-AT, VAFT) and compare them under attack",
        description="Train every variant of a study config (a run config plus 'variants: {name: overrides of "
        "model/train}'), evaluate each under the same attacks, and write comparison.md/.csv/.png. "
        "Rerunning the same command resumes.",
    )
    _add_common(p)

    p = sub.add_parser(
        "leaderboard",
        help="merge the robustness cards (robustness.json) of several runs into one Markdown + CSV table",
        description="Read RUN_DIR/robustness.json of every run (written by every evaluation) and merge them: one "
        "line per run, the clean Dice and every row's Dice with its 95%% interval. Cards of different datasets "
        "or label sets are refused.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or robustness.json files)")
    p.add_argument("--out", default=None, metavar="FILE.md",
                   help="write the Markdown table here and the CSV beside it (FILE.csv); default: print Markdown")

    p = sub.add_parser("list", help="list the registered attacks, models, objectives, defences, model sources, "
                                    "triggers or detectors")
    p.add_argument("what", nargs="?", default="all", choices=["all", *LISTINGS])
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _out_dir(args: argparse.Namespace, cfg) -> Path:
    return Path(args.out) if args.out else Path(cfg.output_dir)


def cmd_phantoms(args: argparse.Namespace) -> int:
    from volattack.data.phantoms import make_phantom_dataset

    size = args.size * 3 if len(args.size) == 1 else args.size
    if len(size) != 3:
        raise ValueError(f"--size takes 1 or 3 integers, got {args.size}.")
    path = make_phantom_dataset(args.out, n=args.n, size=tuple(size), seed=args.seed,
                                n_val=args.n_val, n_test=args.n_test)
    sys.stdout.write(f"{path}\n")
    return EXIT_OK


def _out(text: str) -> None:
    """Write to stdout on rank 0 only (under ``torchrun`` every rank runs the same command)."""
    if os.environ.get("RANK", "0") == "0":
        sys.stdout.write(text)


def cmd_train(args: argparse.Namespace) -> int:
    from volattack.pipeline import ensure_phantoms, load_run_config, run_train

    cfg = ensure_phantoms(load_run_config(args.config, args.overrides), progress=not args.quiet)
    out = _out_dir(args, cfg)
    summary = run_train(cfg, out, resume=args.resume, progress=not args.quiet)
    _out(f"best validation Dice {summary['best_dice']:.3f}; checkpoint: {summary['best_checkpoint']}\n")
    return EXIT_OK


def _finish_eval(results: dict, out: Path) -> int:
    from volattack.evaluation.report import interval_table, markdown_table

    _out(markdown_table(results) + "\n\n")
    _out("95% bootstrap intervals over cases (n: cases):\n" + interval_table(results) + "\n\n")
    for c in results.get("sanity") or []:
        if c["status"] == "warn":
            _out(f"WARNING sanity check {c['check']}: {c['detail']}\n")
    _out(f"report: {out / 'report.md'}\n")
    if results.get("failed"):
        for f in results["failed"]:
            sys.stderr.write(f"volattack: case {f['case']} failed: {f['reason']}\n")
        return EXIT_ERROR
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from volattack.pipeline import load_run_config, run_evaluate

    cfg = load_run_config(args.config, args.overrides)
    out = _out_dir(args, cfg)
    return _finish_eval(run_evaluate(cfg, out, checkpoint=args.checkpoint, trust_bundle=args.trust_bundle,
                                     progress=not args.quiet), out)


def _key_values(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` arguments (``-p``, ``-m``) as a mapping, values parsed like ``--set``."""
    from volattack.config import parse_override

    out = {}
    for item in items:
        keys, value = parse_override(item)
        out[".".join(keys)] = value
    return out


def cmd_attack(args: argparse.Namespace) -> int:
    from volattack.config import apply_overrides, from_dict, load_yaml
    from volattack.config import RunConfig
    from volattack.pipeline import config_from_checkpoint_dir, run_evaluate

    raw = load_yaml(args.config) if args.config else (config_from_checkpoint_dir(args.checkpoint) or {})
    raw = {k: v for k, v in raw.items() if k in ("seed", "data", "model")}
    params = _key_values(args.params)
    raw.setdefault("data", {})
    raw["data"]["datalist"] = args.datalist
    if args.split is not None:  # the split of this datalist: replaces the test key of the training config
        raw["data"]["test_key"] = args.split
    raw["evaluate"] = {
        "checkpoint": args.checkpoint,
        "attacks": [{"name": args.attack, "params": params}],
        "save_adv": args.save_adv,
        "save_pred": args.save_pred,
        "max_cases": args.max_cases,
    }
    if args.space is not None:
        raw["evaluate"]["space"] = args.space
    options = _key_values(args.model_options)
    if options:
        raw["evaluate"]["model_options"] = options
    goal = _goal_args(args)
    if goal:
        raw["evaluate"]["goal"] = goal
    if args.seed is not None:
        raw["seed"] = args.seed
    raw["output_dir"] = args.out or f"runs/attack_{args.attack}"
    cfg = from_dict(RunConfig, apply_overrides(raw, args.overrides))
    out = _out_dir(args, cfg)
    return _finish_eval(run_evaluate(cfg, out, trust_bundle=args.trust_bundle, progress=not args.quiet), out)


def _goal_args(args: argparse.Namespace) -> dict:
    """``evaluate.goal`` of ``attack --target/--mask`` (empty without either)."""
    from volattack.evaluation.goal_config import parse_mask_arg, parse_target_arg

    goal = {"target": parse_target_arg(args.target), "mask": parse_mask_arg(args.mask)}
    return {k: v for k, v in goal.items() if v is not None}


def cmd_benchmark(args: argparse.Namespace) -> int:
    from volattack.pipeline import load_run_config, run_benchmark

    cfg = load_run_config(args.config, args.overrides)
    out = _out_dir(args, cfg)
    return _finish_eval(run_benchmark(cfg, out, trust_bundle=args.trust_bundle, progress=not args.quiet), out)


def cmd_detect(args: argparse.Namespace) -> int:
    from volattack.pipeline import run_detect

    res = run_detect(args.config, args.overrides, args.out, trust_bundle=args.trust_bundle, progress=not args.quiet)
    _out(res["markdown"] + f"\nreport: {res['files']['md']}\n")
    return EXIT_OK


def cmd_study(args: argparse.Namespace) -> int:
    from volattack.study import comparison_rows, dice_table, run_study

    study = run_study(args.config, args.out, overrides=args.overrides, trust_bundle=args.trust_bundle,
                      progress=not args.quiet)
    _out(dice_table(comparison_rows(study["results"])) + "\n\n")
    for name, res in study["results"].items():
        for c in res.get("sanity") or []:
            if c["status"] == "warn":
                _out(f"WARNING {name}: sanity check {c['check']}: {c['detail']}\n")
    _out(f"comparison: {study['files']['md']}\n")
    failed = [(name, f) for name, res in study["results"].items() for f in res.get("failed") or []]
    for name, f in failed:
        sys.stderr.write(f"volattack: variant {name}: case {f['case']} failed: {f['reason']}\n")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from volattack.evaluation.leaderboard import build_leaderboard, write_leaderboard

    if args.out:
        md, csv_path = write_leaderboard(args.runs, args.out)
        _out(f"leaderboard: {md} and {csv_path}\n")
    else:
        _out(build_leaderboard(args.runs)[0])
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    import importlib

    lines = []
    for what, (module, fn) in LISTINGS.items():
        if args.what in ("all", what):
            lines.append(f"{what}: " + ", ".join(getattr(importlib.import_module(module), fn)()))
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


HANDLERS = {
    "phantoms": cmd_phantoms,
    "train": cmd_train,
    "attack": cmd_attack,
    "evaluate": cmd_evaluate,
    "benchmark": cmd_benchmark,
    "detect": cmd_detect,
    "study": cmd_study,
    "leaderboard": cmd_leaderboard,
    "list": cmd_list,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``volattack`` console script and ``python -m volattack``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from volattack import __version__

        sys.stdout.write(f"volattack {__version__}\n")
        return EXIT_OK
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(getattr(args, "quiet", False))
    # OpenMP threads that spin while waiting make torch up to tens of times slower when other
    # processes share the cores; passive waiting costs nothing on an idle machine. Must be set
    # before torch is imported (the parser above does not import it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from volattack.config import ConfigError

    try:
        return HANDLERS[args.command](args)
    except ConfigError as e:
        sys.stderr.write(f"volattack {args.command}: config error: {e}\n")
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        sys.stderr.write(f"volattack {args.command}: error: {e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"volattack {args.command}: interrupted; rerun the same command to resume.\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
