"""Robustness studies: train several variants of one model and compare them under the same attacks.

A study config is a normal run config (``seed``, ``output_dir``, ``phantoms``, ``data``, ``model``,
``train``, ``evaluate``; see :class:`~volattack.config.RunConfig`) plus a ``variants``
mapping from a variant name to overrides of its ``model`` and ``train`` sections::

    variants:
      clean: {}
      pgd_at:
        train:
          adversary: {name: pgd, params: {eps: 4/255, alpha: 2/255, steps: 3}}
      vaft:
        train.adversary.name: vafa          # dotted keys work too
        train.adversary.fr_weight: 1.0

Overrides are deep-merged into the base config: mappings merge key by key (so a variant that
sets ``train.adversary.name`` keeps the base ``train.epochs``), any other value replaces the
base value; dotted keys are expanded to nested mappings first. A variant may override only
``model`` and ``train`` keys, so every variant is trained on the same data and evaluated on the
same cases under the same attacks (the point of the comparison). ``--set`` overrides apply to
the study config before the variants are merged: ``--set train.epochs=5`` changes every variant
(unless a variant sets ``train.epochs`` itself), ``--set variants.vaft.train.epochs=5`` one of them.

For each variant :func:`volattack.pipeline.run_benchmark` runs into ``<out>/<variant>/``
(phantoms, training, evaluation; all resumable: rerunning the same command after an
interruption reuses finished training runs and finished cases). After each variant the
comparison is rewritten atomically:

- ``comparison.csv``: one row per variant x attack configuration (``clean`` included), every
  scalar column of the results schema (:mod:`volattack.evaluation.comparison`);
- ``comparison.md``: the variants (adversary, epochs, validation Dice, time), a Dice pivot table
  (variants x attacks) and the full table (the schema's ``study`` columns);
- ``comparison.png``: grouped bars of Dice per attack (clean included), one bar per variant;
- ``study.json``: the same numbers with per-variant run directories and timings.

Every variant's config, attack and adversary is validated before any training starts.

The study design follows the VAFT paper's comparison of clean training, PGD adversarial
training and VAFT (Hanif et al., "Frequency Domain Adversarial Training for Robust Volumetric
Medical Segmentation", MICCAI 2023).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from volattack.config import ConfigError, RunConfig, apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from volattack.evaluation.comparison import (
    ComparisonRow,
    attacks_table,
    comparison_columns,
    comparison_csv,
    comparison_figure,
    comparison_rows,
    dice_table,
    differences_lines,
    failed_lines,
    full_table,
    paired_differences,
    sanity_lines,
)
from volattack.evaluation.config import format_number
from volattack.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

#: top-level sections a variant may override
OVERRIDABLE: tuple[str, ...] = ("model", "train")
#: the key of the variants mapping in a study config
VARIANTS_KEY = "variants"
#: default study folder when neither ``out_dir`` nor ``output_dir`` is given
DEFAULT_OUT = "runs/study"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

StudySource = Union[str, "os.PathLike[str]", Mapping[str, Any]]


@dataclass
class StudyPlan:
    """A validated study: the resolved config and one run config per variant.

    Attributes:
        out_dir: the study folder; variant ``name`` runs in ``out_dir / name``.
        raw: the study config after ``--set`` overrides (the mapping written to ``study.yaml``).
        base: the base run config (the study config without ``variants``).
        variants: variant name -> its run config (``output_dir`` = ``out_dir / name``), in the
            order of the config file.
        overrides: variant name -> its overrides as nested mappings (dotted keys expanded).
        seeds: the config's ``seeds`` (one run per seed: :mod:`volattack.study_seeds`), or ``None``.
    """

    out_dir: Path
    raw: dict[str, Any]
    base: RunConfig
    variants: dict[str, RunConfig]
    overrides: dict[str, dict[str, Any]]
    seeds: Optional[list[int]] = None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``: mappings merge key by key, other values replace.

    Example: ``deep_merge({"train": {"epochs": 5, "lr": 1}}, {"train": {"lr": 2}})`` is
    ``{"train": {"epochs": 5, "lr": 2}}``. Neither argument is modified.
    """
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_dotted(overrides: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Nested form of a mapping whose keys may be dotted paths (``{"train.epochs": 3}``).

    Example: ``{"train.adversary.name": "pgd", "train": {"epochs": 3}}`` becomes
    ``{"train": {"adversary": {"name": "pgd"}, "epochs": 3}}`` (entries merged in order with
    :func:`deep_merge`).

    Raises:
        ConfigError: a key that is not a non-empty dotted name; the message names ``where``.
    """
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else str(key)
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where or 'overrides'}: keys must be non-empty (dotted) names, got {key!r}.")
        parts = key.split(".")
        node: Any = expand_dotted(value, path) if isinstance(value, Mapping) else copy.deepcopy(value)
        for part in reversed(parts):
            node = {part: node}
        out = deep_merge(out, node)
    return out


def _read(config: StudySource) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, os.PathLike)):
        return load_yaml(config)
    raise ValueError(f"config must be a YAML path or a mapping, got {type(config).__name__}.")


def _variant_overrides(raw_variants: Any) -> dict[str, dict[str, Any]]:
    """Check the ``variants`` mapping and expand each variant's overrides to nested form."""
    if raw_variants is None:
        raise ConfigError(
            f"A study config needs a '{VARIANTS_KEY}' mapping (variant name -> overrides of "
            f"{' / '.join(OVERRIDABLE)}), got none."
        )
    if not isinstance(raw_variants, Mapping):
        raise ConfigError(f"{VARIANTS_KEY} must be a mapping of variant name -> overrides, got {raw_variants!r}.")
    if not raw_variants:
        raise ConfigError(f"{VARIANTS_KEY} must name at least one variant, got an empty mapping.")
    out: dict[str, dict[str, Any]] = {}
    for name, over in raw_variants.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"{VARIANTS_KEY}: variant names must start with a letter or digit and use only letters, "
                f"digits, '_', '-' and '.' (they name folders), got {name!r}."
            )
        where = f"{VARIANTS_KEY}.{name}"
        if over is None:
            over = {}
        if not isinstance(over, Mapping):
            raise ConfigError(f"{where} must be a mapping of overrides (or empty), got {over!r}.")
        nested = expand_dotted(over, where)
        for key in nested:
            if key not in OVERRIDABLE:
                raise ConfigError(
                    f"{where}: a variant may override only {', '.join(repr(k) for k in OVERRIDABLE)} keys "
                    f"(every variant shares the data and the attacks), got {key!r}."
                )
        out[name] = nested
    return out


def _check_variant(name: str, cfg: RunConfig) -> None:
    """Torch-side checks of one variant: training settings, model, adversary (no training)."""
    import torch

    from volattack.models.zoo import create_model
    from volattack.pipeline import _validate_adversary
    from volattack.training import validate_train_config

    where = f"{VARIANTS_KEY}.{name}"
    if cfg.train is None:
        raise ConfigError(f"{where}: no 'train' section; a study trains every variant (set 'train' in the base config).")
    try:
        validate_train_config(cfg.train, cfg.seed)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
    try:
        with torch.device("meta"):  # checks name and constructor arguments without allocating weights
            create_model(cfg.model.name, cfg.model.in_channels, cfg.model.out_channels, **cfg.model.kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: model: {e}") from e
    try:
        _validate_adversary(cfg)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def load_study(
    config: StudySource,
    out_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    overrides: Sequence[str] = (),
) -> StudyPlan:
    """Read and validate a study config; nothing is trained or written.

    Args:
        config: path of a study YAML (read with ``yaml.safe_load``) or the mapping itself.
        out_dir: the study folder (default: the config's ``output_dir``, else ``runs/study``).
        overrides: ``--set key=value`` strings applied to the study config first.

    Returns:
        The :class:`StudyPlan`.

    Raises:
        ConfigError: missing/empty ``variants``, a bad variant name, a variant overriding a
            section other than ``model``/``train`` or an unknown key, a variant without
            training, bad training settings, an unknown model/adversary/attack name or bad
            attack parameters. The message names the variant and the key.
        FileNotFoundError: no ``phantoms`` section and ``data.datalist`` does not exist.
    """
    from volattack.pipeline import _validate_attacks, _validate_defense, evaluation_split

    raw = apply_overrides(_read(config), list(overrides))
    from volattack.study_seeds import SEEDS_KEY, parse_seeds

    seeds = parse_seeds(raw.get(SEEDS_KEY))
    base_raw = {k: v for k, v in raw.items() if k not in (VARIANTS_KEY, SEEDS_KEY)}
    variant_over = _variant_overrides(raw.get(VARIANTS_KEY))
    out = Path(out_dir) if out_dir is not None else Path(base_raw.get("output_dir") or DEFAULT_OUT)
    base = from_dict(RunConfig, {**base_raw, "output_dir": str(out)})
    if base.phantoms is None:
        if not base.data.datalist:
            raise ConfigError("data.datalist is empty: give a datalist JSON or a 'phantoms' section.")
        if not Path(base.data.datalist).is_file():
            raise FileNotFoundError(f"data.datalist {base.data.datalist!r} does not exist.")
    evaluation_split(base)
    _validate_attacks(base)  # variants cannot change evaluate: once is enough
    _validate_defense(base)
    variants: dict[str, RunConfig] = {}
    for name, nested in variant_over.items():
        merged = deep_merge(base_raw, nested)
        merged["output_dir"] = str(out / name)
        try:
            cfg = from_dict(RunConfig, merged)
        except ConfigError as e:
            raise ConfigError(f"{VARIANTS_KEY}.{name}: {e}") from e
        _check_variant(name, cfg)
        variants[name] = cfg
    epochs = {name: cfg.train.epochs for name, cfg in variants.items() if cfg.train is not None}
    if len(set(epochs.values())) > 1:
        warnings.warn(
            f"variants train for different numbers of epochs {epochs}; the comparison is then not at an "
            "equal training budget.",
            stacklevel=2,
        )
    return StudyPlan(out_dir=out, raw=raw, base=base, variants=variants, overrides=variant_over, seeds=seeds)


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _adversary_text(cfg: RunConfig) -> str:
    adv = cfg.train.adversary if cfg.train is not None else None
    if adv is None or adv.name == "none":
        return "none (clean training)"
    params = ", ".join(f"{k}={format_number(v, k)}" for k, v in adv.params.items())
    text = f"{adv.name}({params})"
    if adv.fr_weight > 0:
        text += f" + L_fr (weight {adv.fr_weight:g}" + (", normalised)" if adv.fr_normalized else ")")
    if adv.share < 1:
        text += f", share {adv.share:g}"
    return text


def _train_info(run_dir: Path) -> dict[str, Any]:
    """Best validation Dice and summed epoch times from ``train/train_log.json`` (if present)."""
    log = run_dir / "train" / "train_log.json"
    try:
        data = json.loads(log.read_text())
    except (OSError, ValueError):
        return {"best_val_dice": None, "train_seconds": None, "epochs_completed": None}
    hist = data.get("history") or []
    return {
        "best_val_dice": data.get("best_dice"),
        "train_seconds": round(sum(float(h.get("seconds") or 0.0) for h in hist), 1),
        "epochs_completed": data.get("epochs_completed"),
    }


def _eval_seconds(results: Mapping[str, Any]) -> Optional[float]:
    """Evaluation time summed over the cases' recorded times (reused cases keep their first time)."""
    secs = [_num(c.get("seconds")) for c in results.get("cases") or []]
    secs = [s for s in secs if s is not None]
    if secs:
        return round(sum(secs), 1)
    return _num((results.get("timings") or {}).get("evaluate_seconds"))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _header_lines(plan: StudyPlan, info: Mapping[str, Mapping[str, Any]],
                  results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Title, what was compared, and the variants table of ``comparison.md``."""
    from volattack.pipeline import evaluation_split

    first = next(iter(results.values()))
    models_differ = len({d["model"] for d in info.values()}) > 1
    lines = [
        "# volattack robustness study",
        "",
        f"- study folder: {plan.out_dir}; variants finished: {len(results)}/{len(plan.variants)}",
        f"- seed {plan.base.seed}; {first['summary']['n_cases']} test cases (split '{evaluation_split(plan.base)}'); "
        f"threat model `{first['threat_model']}`",
        f"- data: {plan.base.data.datalist or (plan.base.phantoms.out if plan.base.phantoms else '?')}",
        f"- model: {plan.base.model.name} {plan.base.model.kwargs or ''}".rstrip()
        + (" (base config; variants override it, see below)" if models_differ else ""),
    ]
    if first.get("defense"):
        lines.append(f"- defence: {first['defense']}: every Dice is that of the defended model")
    lines += ["", "## Variants", "",
              "| Variant | Adversary | Epochs | Best val Dice | Train time s | Eval time s | Report |",
              "|---|---|---|---|---|---|---|"]
    for name, d in info.items():
        adversary = d["adversary"] + (f"; model {d['model']}" if models_differ else "")
        lines.append(
            f"| {name} | {adversary} | {d['epochs']} | {_fmt(d['best_val_dice'])} | "
            f"{_fmt(d['train_seconds'], 0)} | {_fmt(d['evaluate_seconds'], 0)} | [{name}/report.md]({name}/report.md) |"
        )
    return lines


def _markdown(plan: StudyPlan, info: Mapping[str, Mapping[str, Any]], rows: Sequence[ComparisonRow],
              results: Mapping[str, Mapping[str, Any]]) -> str:
    """``comparison.md``: the variants, the Dice pivot, the attacks, the full table with the
    schema's definitions of its columns, sanity warnings and failed cases."""
    from volattack.evaluation.columns import definitions

    first = next(iter(results.values()))
    units = rows[0].units if rows else "HU"
    lines = _header_lines(plan, info, results) + [
        "",
        "## Dice under attack (mean foreground Dice)",
        "",
        dice_table(rows),
        "",
        "![comparison](comparison.png)",
        "",
        *differences_lines(results),
        "## Attacks",
        "",
        attacks_table(first),
        "",
        "## Full table",
        "",
        full_table(rows),
        "",
        *definitions(units, table="study"),
        "",
        "Each variant is attacked white-box (its own gradients); Drop compares the variant's own clean and "
        "adversarial Dice. Train time: sum of the epoch times (training steps and validation); eval time: sum of "
        "the per-case times (clean inference, every attack, sanity checks, figures), as first measured (reruns "
        "reuse finished cases).",
        "",
    ]
    return "\n".join(lines + sanity_lines(results) + failed_lines(results))


def write_comparison(plan: StudyPlan, results: Mapping[str, Mapping[str, Any]],
                     seconds: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """Write ``comparison.{csv,md,png}`` and ``study.json`` into ``plan.out_dir`` (atomically).

    Args:
        plan: the study.
        results: finished variants so far, name -> results of ``run_benchmark``.
        seconds: wall-clock seconds of each variant's ``run_benchmark`` call in this process.

    Returns:
        The study summary written to ``study.json``: ``rows`` (:func:`comparison_rows`),
        ``variants`` (per-variant run folder, adversary, epochs, validation Dice, times,
        failed cases) and ``files``.
    """
    out = plan.out_dir
    rows = comparison_rows(results)
    info: dict[str, dict[str, Any]] = {}
    for name, res in results.items():
        cfg = plan.variants[name]
        run_dir = out / name
        info[name] = {
            "run_dir": str(run_dir),
            "adversary": _adversary_text(cfg),
            "adversary_config": to_dict(cfg.train.adversary) if cfg.train is not None else None,
            "model": f"{cfg.model.name} {json.dumps(to_dict(cfg.model.kwargs), sort_keys=True)}",
            "epochs": cfg.train.epochs if cfg.train is not None else None,
            **_train_info(run_dir),
            "evaluate_seconds": _eval_seconds(res),
            "wall_seconds": None if seconds is None or name not in seconds else round(seconds[name], 1),
            "n_cases": res["summary"]["n_cases"],
            "failed": len(res.get("failed") or []),
        }
    files = {k: str(out / f"comparison.{k}") for k in ("csv", "md", "png")}
    atomic_write_text(files["csv"], comparison_csv(rows))
    atomic_write_text(files["md"], _markdown(plan, info, rows, results))
    comparison_figure(rows, files["png"])
    summary = {"out_dir": str(out), "variants": info, "rows": [r.to_dict() for r in rows],
               "differences": paired_differences(results), "files": files,
               "finished": list(results), "planned": list(plan.variants)}
    atomic_write_json(out / "study.json", summary)
    return summary


def run_study(
    config: StudySource,
    out_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    overrides: Sequence[str] = (),
    trust_bundle: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a robustness study: validate every variant, then phantoms -> training -> evaluation
    for each (:func:`volattack.pipeline.run_benchmark` into ``out_dir/<variant>``), then the
    comparison files (see the module docstring).

    Resumable: rerunning the same call after an interruption reuses finished training runs and
    finished evaluation cases of every variant.

    Args:
        config: path of a study YAML or the mapping itself (run config + ``variants``).
        out_dir: the study folder (default: the config's ``output_dir``, else ``runs/study``).
        overrides: ``--set key=value`` strings applied to the study config before the variants
            are merged (``variants.<name>.<key>=...`` changes one variant).
        trust_bundle: passed to ``run_benchmark`` (only matters for MONAI bundle checkpoints).
        progress: progress bars (variants, training epochs, evaluation cases).

    Returns:
        The summary also written to ``study.json`` (see :func:`write_comparison`) plus
        ``"results"``: variant name -> the full evaluation results.

    Raises:
        ConfigError: any invalid variant, attack or adversary (see :func:`load_study`), before
            any training starts.
    """
    from tqdm.auto import tqdm

    from volattack.pipeline import run_benchmark

    plan = load_study(config, out_dir, overrides=overrides)
    if plan.seeds is not None:  # one study per seed, aggregated over seeds x cases
        from volattack.study_seeds import run_seeded_study

        return run_seeded_study(plan, trust_bundle=trust_bundle, progress=progress)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.out_dir / "study.yaml", dump_yaml(plan.raw))
    logger.info("study in %s: variants %s", plan.out_dir, ", ".join(plan.variants))
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    summary: dict[str, Any] = {}
    bar = tqdm(plan.variants.items(), desc="study", unit="variant", disable=not progress)
    for name, cfg in bar:
        bar.set_postfix_str(name)
        logger.info("study variant '%s': %s, %d epochs", name, _adversary_text(cfg),
                    cfg.train.epochs if cfg.train is not None else 0)
        t0 = time.perf_counter()
        results[name] = run_benchmark(cfg, plan.out_dir / name, trust_bundle=trust_bundle, progress=progress)
        seconds[name] = time.perf_counter() - t0
        logger.info("study variant '%s' finished in %.0f s", name, seconds[name])
        summary = write_comparison(plan, results, seconds)
    return {**summary, "results": results}


__all__ = [
    "ComparisonRow", "OVERRIDABLE", "StudyPlan", "comparison_columns", "comparison_csv", "comparison_figure",
    "comparison_rows", "deep_merge", "dice_table", "expand_dotted", "full_table", "load_study",
    "run_study", "write_comparison",
]
