"""Pipelines behind the command line: phantoms -> training -> evaluation, resumable.

Each function takes a resolved :class:`~volattack.config.RunConfig` and a run
directory. Rerunning the same command after an interruption resumes: finished
phantoms, a finished training run and finished evaluation cases are reused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from volattack.config import ConfigError, RunConfig, dump_yaml, from_dict, load_yaml, to_dict
from volattack.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def load_run_config(path: Optional[str], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (``yaml.safe_load``), apply ``--set`` overrides, type-check it."""
    from volattack.config import apply_overrides

    raw = load_yaml(path) if path else {}
    raw = apply_overrides(raw, list(overrides))
    cfg = from_dict(RunConfig, raw)
    evaluation_split(cfg)
    return cfg


def evaluation_split(cfg: RunConfig) -> str:
    """The datalist key of the evaluated cases: ``evaluate.split`` when given, else ``data.test_key``.

    Raises:
        ConfigError: both are set to different splits (see
            :func:`volattack.evaluation.config.evaluation_split`).
    """
    from volattack.evaluation.config import evaluation_split as resolve

    try:
        return resolve(cfg.evaluate.split, cfg.data.test_key)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def ensure_phantoms(cfg: RunConfig, *, progress: bool = True) -> RunConfig:
    """Generate the configured phantoms unless the same ones exist; point ``data.datalist`` at them
    (``progress``: show a progress bar while generating)."""
    if cfg.phantoms is None:
        return cfg
    from volattack.data.phantoms import make_phantom_dataset

    p = cfg.phantoms
    out = Path(p.out)
    marker = out / "phantoms.json"
    params = to_dict(p)
    datalist = out / "dataset.json"
    if not (marker.is_file() and datalist.is_file() and json.loads(marker.read_text()) == params):
        logger.info("generating %d+%d+%d phantoms in %s", p.n, p.n_val, p.n_test, out)
        datalist = make_phantom_dataset(
            out, n=p.n, size=tuple(p.size), seed=p.seed, n_val=p.n_val, n_test=p.n_test,
            spacing=p.spacing, phantom_kwargs=p.phantom_kwargs, progress=progress,
        )
        atomic_write_json(marker, params)
    else:
        logger.info("phantoms in %s already exist, reused", out)
    if cfg.data.datalist and Path(cfg.data.datalist) != datalist:
        logger.info("data.datalist %s replaced by the generated phantoms %s", cfg.data.datalist, datalist)
    return replace(cfg, data=replace(cfg.data, datalist=str(datalist)))


def run_train(cfg: RunConfig, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data`` into ``out_dir`` (``best.pt``, ``last.pt``, ``train_log.json``)."""
    from volattack.training import train

    if cfg.train is None:
        raise ConfigError("The config has no 'train' section.")
    if not cfg.data.datalist:
        raise ConfigError("data.datalist is empty: give a datalist JSON or a 'phantoms' section.")
    _validate_adversary(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
    return train(cfg.model, cfg.train, cfg.data, out_dir, seed=cfg.seed, resume=resume, progress=progress)


def run_evaluate(cfg: RunConfig, out_dir: Path, *, checkpoint: Optional[str] = None,
                 trust_bundle: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluate a model clean and under ``cfg.evaluate.attacks``; writes results.json, report.md.

    The model may be anything a registered model source opens (:func:`volattack.models.sources.load_model`:
    a volattack checkpoint, a TorchScript file, a MONAI bundle directory with ``trust_bundle=True``,
    since bundle configs can execute code); its weights digest keys the cached cases. External models carry no
    preprocessing, so ``cfg.data.preprocess`` and ``cfg.model.out_channels`` must describe them.

    With an ``evaluate.defense`` section the model is evaluated behind the configured input
    transforms and attacked adaptively (BPDA/EOT); the section is validated with the attacks,
    before any model or data is loaded.
    """
    from volattack.data.datalist import load_datalist
    from volattack.evaluation.runner import evaluate

    ckpt = checkpoint or cfg.evaluate.checkpoint
    if not ckpt:
        raise ConfigError("No checkpoint to evaluate: set evaluate.checkpoint or pass --checkpoint.")
    if not cfg.evaluate.attacks:
        logger.warning("evaluate.attacks is empty: only clean Dice is reported")
    # fail on a split conflict, bad attack names/parameters and defence transforms before loading data
    split = evaluation_split(cfg)
    _validate_attacks(cfg)
    _validate_defense(cfg)
    cfg = with_blackbox_check(cfg)
    model, info = _load_model(ckpt, trust_bundle, cfg.evaluate.model_options)
    surrogate, sur_info = (_load_model(cfg.evaluate.surrogate_checkpoint, trust_bundle)
                           if cfg.evaluate.surrogate_checkpoint else (None, None))
    cases = load_datalist(cfg.data.datalist, key=split, base_dir=cfg.data.base_dir)
    from volattack.data.datalist import datalist_class_names

    names = datalist_class_names(cfg.data.datalist) or dict(model.class_names)
    return evaluate(
        model.module,
        cases,
        out_dir,
        eval_cfg=cfg.evaluate,
        preprocess=cfg.data.preprocess,
        num_classes=int(model.num_classes or cfg.model.out_channels),
        seed=cfg.seed,
        class_names=names,
        run_config=replace(cfg, evaluate=replace(cfg.evaluate, checkpoint=str(ckpt), split=split)),
        model_info=info,
        surrogate=surrogate.module if surrogate is not None else None,
        surrogate_info=sur_info,
        progress=progress,
        model_digest=model.digest,
        surrogate_digest=surrogate.digest if surrogate is not None else None,
        loaded=model,
    )


def run_benchmark(cfg: RunConfig, out_dir: Path, *, trust_bundle: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """The whole pipeline: phantoms (if configured), training (resumed if interrupted, skipped
    if finished), evaluation (finished cases reused). Returns the evaluation results."""
    cfg = ensure_phantoms(cfg, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
    ckpt = cfg.evaluate.checkpoint
    if cfg.train is not None:
        evaluation_split(cfg)
        _validate_attacks(cfg)
        _validate_defense(cfg)
        _validate_adversary(cfg)
        train_dir = out_dir / "train"
        summary_path = train_dir / "train_summary.json"
        wanted = _training_identity(cfg)
        if summary_path.is_file() and (train_dir / "best.pt").is_file():
            summary = json.loads(summary_path.read_text())
            if summary.get("config") not in (None, wanted):
                raise ConfigError(
                    f"{train_dir} holds a finished training run with another seed/data/model/train "
                    "config; choose another output_dir (or --out) or delete that folder to retrain."
                )
            logger.info("training in %s already finished, reused", train_dir)
        else:
            summary = run_train(cfg, train_dir, resume=(train_dir / "last.pt").is_file(), progress=progress)
            summary["config"] = wanted
            atomic_write_json(summary_path, summary)
        ckpt = summary["best_checkpoint"]
    return run_evaluate(cfg, out_dir, checkpoint=ckpt, trust_bundle=trust_bundle, progress=progress)


def run_detect(path: Optional[str], overrides: list[str] | tuple[str, ...] = (), out: Optional[str] = None, *,
               trust_bundle: bool = False, progress: bool = True) -> dict[str, Any]:
    """``volattack detect``: a run config plus a ``detect`` section
    (:class:`volattack.evaluation.detect.DetectConfig`); phantoms if configured, the model from
    ``detect.checkpoint`` (or trained from ``train`` into ``<out>/train``, reused when finished),
    then :func:`volattack.evaluation.detect.run_detection` into ``out`` (default ``output_dir``).
    The detect section, the split sizes and the layers are checked before any training or attack."""
    from volattack.config import apply_overrides
    from volattack.data.datalist import load_datalist
    from volattack.evaluation.detect import check_case_counts, run_detection, split_detect_config, validate_detect

    rest, dcfg = split_detect_config(apply_overrides(load_yaml(path) if path else {}, list(overrides)))
    cfg = from_dict(RunConfig, rest)
    out_dir = Path(out) if out else Path(cfg.output_dir)
    validate_detect(dcfg)
    if not dcfg.checkpoint and cfg.train is None:
        raise ConfigError("detect.checkpoint is empty and the config has no 'train' section to train a model.")
    cfg = ensure_phantoms(cfg, progress=progress)
    splits = [load_datalist(cfg.data.datalist, key=k, base_dir=cfg.data.base_dir)
              for k in (dcfg.fit_split, dcfg.test_split)]
    check_case_counts(dcfg, min(len(splits[0]), dcfg.max_fit_cases or 10**9),
                      min(len(splits[1]), dcfg.max_test_cases or 10**9))
    ckpt = dcfg.checkpoint
    if not ckpt:
        train_dir = out_dir / "train"
        if not (train_dir / "train_summary.json").is_file():
            summary = run_train(cfg, train_dir, resume=(train_dir / "last.pt").is_file(), progress=progress)
            atomic_write_json(train_dir / "train_summary.json", summary)
        ckpt = str(train_dir / "best.pt")
    model, info = _load_model(ckpt, trust_bundle)
    return run_detection(model.module, splits[0], splits[1], out_dir, cfg=dcfg, preprocess=cfg.data.preprocess,
                         num_classes=int(model.num_classes or cfg.model.out_channels), seed=cfg.seed,
                         model_info=info, progress=progress)


def _load_model(spec: str, trust_bundle: bool, options: Optional[dict[str, Any]] = None) -> tuple[Any, dict[str, Any]]:
    """Load a model from any source (:func:`volattack.models.sources.load_model`, with the source's
    ``options``: ``evaluate.model_options``); its description for the results is the network (the
    checkpoint's model section, the architecture), the source, the format, the path and the
    options."""
    from volattack.models.sources import load_model

    try:
        loaded = load_model(spec, trust_bundle=trust_bundle, **(options or {}))
    except ValueError as e:
        raise ConfigError(f"evaluate.model_options: {e}") if options else e from None
    desc = loaded.info.get("model") if isinstance(loaded.info.get("model"), dict) else {}
    info = {**desc, **{k: loaded.info.get(k) for k in ("source", "format", "architecture")}, "checkpoint": str(spec)}
    info.setdefault("name", info.get("architecture") or info.get("format") or "model")
    if options:
        info["options"] = dict(options)
    return loaded, info


def _validate_attacks(cfg: RunConfig) -> None:
    """Build every configured attack on a dummy model so bad names/values fail before any work."""
    import torch

    import volattack

    dummy = torch.nn.Conv3d(1, 1, 1)
    goal = cfg.evaluate.goal  # a target in evaluate.goal makes every attack targeted
    extra = {"targeted": True} if goal is not None and goal.target is not None else {}
    for spec in cfg.evaluate.attacks:
        for label, kw in spec.expand():
            try:
                volattack.create_attack(spec.name, dummy, **{**extra, **kw})
            except (ValueError, TypeError) as e:
                raise ConfigError(f"evaluate.attacks: {label}: {e}{' (evaluate.goal.target)' if extra else ''}") from e


def with_blackbox_check(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the black-box check's ``square`` attack appended to ``evaluate.attacks`` when
    ``evaluate.sanity_blackbox_queries > 0``: ``queries`` queries at the strongest white-box L-inf
    eps of the configured attacks (the sanity check ``blackbox`` compares it with them;
    :mod:`volattack.evaluation.sanity`). Unchanged when the option is 0, when no white-box L-inf
    attack is configured (logged), or when a ``square`` entry at that eps exists already."""
    ev = cfg.evaluate
    if ev.sanity_blackbox_queries <= 0:
        return cfg
    import torch

    import volattack
    from volattack.evaluation.config import AttackSpec
    from volattack.evaluation.sanity import BLACKBOX_ATTACKS, NOISE_ATTACKS

    dummy = torch.nn.Conv3d(1, 1, 1)
    eps: list[float] = []
    have: list[float] = []
    for spec in ev.attacks:
        for _, kw in spec.expand():
            atk = volattack.create_attack(spec.name, dummy, **kw)
            e = getattr(atk, "eps", None)
            if spec.name in BLACKBOX_ATTACKS and isinstance(e, float):
                have.append(e)
            elif getattr(atk, "linf_budget", False) and spec.name not in NOISE_ATTACKS and isinstance(e, float):
                eps.append(e)
    if not eps:
        logger.warning("evaluate.sanity_blackbox_queries=%d: no white-box L-inf attack to compare with; "
                       "the black-box check is not run", ev.sanity_blackbox_queries)
        return cfg
    top = max(eps)
    if any(abs(h - top) <= 1e-6 * top for h in have):
        return cfg
    square = AttackSpec("square", params={"eps": top, "queries": ev.sanity_blackbox_queries})
    return replace(cfg, evaluate=replace(ev, attacks=[*ev.attacks, square]))


def _validate_defense(cfg: RunConfig) -> None:
    """Build the configured defence and its adaptive model on a dummy model, so bad transform
    parameters fail before any model, data or training work (names, ``bpda`` and ``eot_samples``
    are already checked by the config dataclasses)."""
    d = cfg.evaluate.defense
    if d is None:
        return
    import warnings

    import torch

    from volattack.defenses.adaptive import adaptive_wrapper
    from volattack.defenses.registry import build_defense

    try:
        with warnings.catch_warnings():  # the runner warns about eot_samples without randomness
            warnings.simplefilter("ignore")
            adaptive_wrapper(build_defense(torch.nn.Conv3d(1, 1, 1), d), d.bpda, d.eot_samples, seed=cfg.seed)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"evaluate.defense: {e}") from e


def _training_identity(cfg: RunConfig) -> dict[str, Any]:
    """What identifies a finished training run of ``run_benchmark`` (seed, data, model, train).

    ``data.preprocess.units`` is a report label, not part of the identity, so runs trained
    before it existed (or with another label) are still reused.
    """
    wanted = to_dict({"seed": cfg.seed, "data": cfg.data, "model": cfg.model, "train": cfg.train})
    wanted["data"]["preprocess"].pop("units", None)
    return wanted


def _validate_adversary(cfg: RunConfig) -> None:
    """Unknown adversary names or bad attack parameters fail before any data or training work."""
    import torch

    from volattack.defenses.adversarial import build_adversary

    if cfg.train is None:
        return
    try:
        build_adversary(cfg.train.adversary, torch.nn.Conv3d(1, 1, 1))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"train.adversary: {e}") from e


def config_from_checkpoint_dir(checkpoint: str) -> Optional[dict[str, Any]]:
    """The raw ``config.yaml`` saved beside a checkpoint by ``volattack train``, if any."""
    p = Path(checkpoint).parent / "config.yaml"
    return load_yaml(p) if p.is_file() else None
