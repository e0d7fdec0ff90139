"""Evaluation runner: a model x cases x attack suite, resumable, shardable across processes.

For each case the runner predicts the clean volume with sliding-window inference, runs
every configured attack under the configured threat model, and scores clean and
adversarial predictions through the results schema (:mod:`volattack.evaluation.columns`):

- ``volume`` threat model: the attack runs end to end through the same sliding-window
  inference that scores it (exact gradient; with
  :class:`volattack.inference.sliding.WindowedInferer` memory does not grow with the
  activations of all windows);
- ``patch`` threat model: the published protocol (tile, attack each tile through the bare
  model, stitch), see :mod:`volattack.evaluation.patchwise`.

The work is split along its seams: :mod:`~volattack.evaluation.cases` (loading, checks,
scoring), :mod:`~volattack.evaluation.passes` (the clean, attack, sanity and output passes of a
case), :mod:`~volattack.evaluation.cache` (keys and per-case files),
:mod:`~volattack.evaluation.summary` (rows over cases); this module orchestrates them.

With ``evaluate.surrogate_checkpoint`` the attacks are crafted on the surrogate and scored
on the target (transfer). With ``evaluate.defense`` the evaluated model is the defended model
``model(t_n(... t_1(x)))``: its clean Dice is the clean row, every attack is scored on it, and
the attacks (and the zero-gradient sanity check) differentiate the adaptive model (BPDA through
the non-differentiable transforms, EOT over the randomised ones; Athalye et al., ICML 2018). The
defence sits inside sliding-window inference, so its transforms act on each window. The
undefended model's clean Dice is recorded too, so the report shows what the defence costs.

Per-case results are written atomically to ``cases/<case>.json`` as soon as the case is done,
keyed on everything that produced them (weights and data digests, every result-affecting
option, the schema version: :mod:`~volattack.evaluation.cache`); a rerun reuses a finished case
only when its key matches, and logs why a case is recomputed. An interrupted run (even
``kill -9``) resumes where it stopped. Under ``torchrun`` the cases are sharded across ranks
(case ``i`` on rank ``i % world_size``) and gathered on rank 0, which writes ``results.json``,
``results.csv``, ``report.md`` and the figures. A case whose files cannot be read is recorded as
failed with the reason; the others go on.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from volattack.data.config import PreprocessConfig
from volattack.evaluation import columns as schema
from volattack.evaluation.cache import CacheKey, CaseCache, case_key, run_key_parts
from volattack.evaluation.cases import case_id, load_case  # noqa: F401  (load_case: re-exported)
from volattack.evaluation.config import EvalConfig
from volattack.evaluation.goals import check_goal
from volattack.evaluation.passes import CasePasses
from volattack.evaluation.records import CaseRecord, FailedCase
from volattack.evaluation.source_passes import SourcePasses, check_source_run
from volattack.evaluation.summary import summarize
from volattack.utils import atomic_write_json, atomic_write_text, versions
from volattack.yaml_config import dump_yaml, to_dict

logger = logging.getLogger(__name__)


def _version() -> str:
    """The running volattack's version (the package root is loaded before any of its modules)."""
    return str(getattr(sys.modules.get("volattack"), "__version__", "unknown"))


def _run_cases(passes: CasePasses, mine: Sequence[tuple[int, dict[str, Any]]], cache: CaseCache,
               run_parts: dict[str, str], progress: bool) -> tuple[dict[int, CaseRecord], dict[int, FailedCase]]:
    """Reuse or compute every case of this rank; the log says why a case is (re)computed."""
    from tqdm.auto import tqdm

    done: dict[int, CaseRecord] = {}
    failed: dict[int, FailedCase] = {}
    for i, entry in tqdm(mine, desc="evaluate", disable=not progress, unit="case"):
        cid = case_id(entry, i)
        key: CacheKey = case_key(run_parts, entry, i)
        cached, why = cache.lookup(cid, key)
        if cached is not None:
            missing = passes.missing_outputs(cached, entry)
            if not missing:
                done[i] = cached
                logger.info("case %s already done, reused", cid)
                continue
            why = f"requested outputs missing ({', '.join(missing)})"
        if why != "not computed yet":
            logger.info("case %s recomputed: %s", cid, why)
        try:
            rec = passes.run(entry, i, cid)
        except (ValueError, FileNotFoundError, OSError) as e:
            logger.error("case %s failed: %s", cid, e)
            failed[i] = FailedCase(case=cid, image=str(entry.get("image")), reason=str(e))
            continue
        rec.key, rec.key_parts = key.value, dict(key.parts)
        cache.store(rec)
        done[i] = rec
    return done, failed


def _gather(dist_ctx: Any, done: dict[int, CaseRecord], failed: dict[int, FailedCase],
            seconds: float) -> tuple[list[CaseRecord], list[FailedCase], float]:
    """Every rank's cases, in case order (identity without torchrun)."""
    if dist_ctx.world > 1:
        from volattack.distributed import all_gather_objects

        gathered = all_gather_objects(dist_ctx, ({i: r.to_dict() for i, r in done.items()},
                                                 {i: f.to_dict() for i, f in failed.items()}, seconds))
        done = {i: CaseRecord.from_dict(r) for g in gathered for i, r in g[0].items()}
        failed = {i: FailedCase.from_dict(f) for g in gathered for i, f in g[1].items()}
        seconds = max(g[2] for g in gathered)
    return [done[i] for i in sorted(done)], [failed[i] for i in sorted(failed)], seconds


def _results(passes: CasePasses, records: list[CaseRecord], failed: list[FailedCase], *, seed: int,
             num_classes: int, class_names: Optional[dict[int, str]], model_info: Optional[dict[str, Any]],
             surrogate_info: Optional[dict[str, Any]], transfer: bool, world: int, seconds: float) -> dict[str, Any]:
    """The ``results.json`` document (plain JSON; records via their ``to_dict``)."""
    cfg = passes.cfg
    labels = passes.row_labels()
    results: dict[str, Any] = {
        "schema_version": schema.SCHEMA_VERSION,
        "volattack": _version(),
        "versions": versions(),
        "seed": seed,
        "threat_model": cfg.threat_model,
        "patch": {"size": passes.patch_size, "overlap": cfg.patch_overlap} if cfg.threat_model == "patch" else None,
        "transfer": {"surrogate": surrogate_info or {}} if transfer else None,
        "num_classes": num_classes,
        "class_names": {str(k): v for k, v in (class_names or {}).items()},
        "model": model_info or {},
        "attacks": [{"label": lbl, "name": n, "params": kw,
                     "linf_budget": bool(getattr(passes.attacks[lbl], "linf_budget", False))}
                    for lbl, n, kw in passes.runs],
        "row_passes": [rp.describe() for rp in passes.row_passes],
        "fooling_threshold": cfg.fooling_threshold,
        "goal": passes.goal.describe() if passes.goal is not None else None,
        "nsd_tolerance_mm": cfg.nsd_tolerance_mm,
        "world_size": world,
        "cases": [r.to_dict() for r in records],
        "failed": [f.to_dict() for f in failed],
        "summary": summarize(records, labels, cfg.fooling_threshold).to_dict(),
        "timings": {"evaluate_seconds": seconds},
        "intensity_units": passes.pre.units,
        "bounds": list(getattr(passes, "run_bounds", passes.bounds)),
        "space": cfg.space,
        "intensity": passes.intensity.describe(),
    }
    if passes.defended is not None:
        from volattack.defenses.registry import describe_defense

        results["defense"] = describe_defense(passes.defended)
        results["defense_config"] = to_dict(cfg.defense)
        results["adaptive"] = passes.adaptive.describe()  # type: ignore[union-attr]
    if cfg.sanity_checks:
        from volattack.evaluation.sanity import sanity_checks

        results["sanity"] = sanity_checks(results, cfg.attacks)
    return results


def _write_outputs(results: dict[str, Any], eval_cfg: EvalConfig, out: Path) -> None:
    """``results.json``, the budget figure, ``report.md`` and ``results.csv`` (rank 0)."""
    from volattack.evaluation.report import write_report

    atomic_write_json(out / "results.json", results)
    if eval_cfg.figures and results["cases"]:
        from volattack.evaluation.figures import dice_vs_budget

        try:
            results["budget_figure"] = dice_vs_budget(results, eval_cfg.attacks, out / "figures" / "dice_vs_budget.png")
        except ImportError as e:  # pragma: no cover
            logger.warning("no figure: %s", e)
    write_report(results, out)


def evaluate(
    model: nn.Module,
    cases: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    eval_cfg: EvalConfig,
    preprocess: PreprocessConfig,
    num_classes: int,
    seed: int = 0,
    class_names: Optional[dict[int, str]] = None,
    run_config: Any = None,
    model_info: Optional[dict[str, Any]] = None,
    surrogate: Optional[nn.Module] = None,
    surrogate_info: Optional[dict[str, Any]] = None,
    progress: bool = True,
    model_digest: Optional[str] = None,
    surrogate_digest: Optional[str] = None,
    intensity: Any = None,
    loaded: Any = None,
) -> dict[str, Any]:
    """Evaluate ``model`` clean and under every attack of ``eval_cfg`` on ``cases``.

    Args:
        model: segmenter mapping ``(1, C, H, W, D)`` to logits ``(1, K, H, W, D)``; with
            ``eval_cfg.defense`` it is evaluated behind the configured input transforms.
        cases: datalist entries ``{"image": path, "label": path}``.
        out_dir: run directory (``config.yaml``, ``results.json``, ``report.md``, ``cases/``).
        eval_cfg: attacks, threat model, sliding-window settings, outputs.
        preprocess: the preprocessing the model was trained with (its intensity model gives the
            input bounds, the source-unit scale and the mapping back to source units;
            ``preprocess.units`` names the source unit in the reports).
        num_classes: K, including background.
        seed: base seed; case ``i`` is attacked with ``seed`` and ``sample_ids=[i]``, its
            defence draws come from the case seed ``seed + i`` (recorded per case).
        class_names: optional names of classes for the report.
        run_config: the resolved configuration to store as ``config.yaml`` (dataclass or dict).
        model_info: description of the model (checkpoint path, architecture) for the results.
        surrogate: craft the attacks on this model instead (transfer); scored on ``model``.
        surrogate_info: description of the surrogate for the results.
        progress: show a progress bar over cases.
        model_digest: SHA-256 of the model's weights (:func:`volattack.ops.module_digest`,
            computed when not given); the cache key of every case.
        surrogate_digest: the same for the surrogate.
        intensity: the model's intensity model (default: the one of ``preprocess``).
        loaded: the ``LoadedModel`` of ``model``, needed by ``space: source`` (:mod:`~volattack.evaluation.source_passes`).

    Returns:
        The results dictionary written to ``results.json`` (on every rank under torchrun).

    Length: the run's steps in order (checks before any file, setup, cases, gather, outputs), one call each.
    """
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.distributed import barrier, setup_distributed
    from volattack.ops import module_digest
    from volattack.utils import resolve_device

    check_goal(eval_cfg.goal, class_names, num_classes, list(cases)[: eval_cfg.max_cases])  # before any file
    if eval_cfg.space == "source":  # bad budgets, units and label grids fail before any file
        cases = check_source_run(eval_cfg, cases, loaded, intensity or intensity_from_preprocess(preprocess))
    dist_ctx, device = setup_distributed(resolve_device(eval_cfg.device))
    out = Path(out_dir)
    if dist_ctx.rank == 0:
        (out / "cases").mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            atomic_write_text(out / "config.yaml", dump_yaml(run_config))
    model = model.to(device).eval()
    surrogate = surrogate.to(device).eval() if surrogate is not None else None
    intensity = intensity if intensity is not None else intensity_from_preprocess(preprocess)
    passes = SourcePasses(loaded, eval_cfg, preprocess, intensity, num_classes, seed, out, device,
                          class_names=class_names) if (
        eval_cfg.space == "source") else CasePasses(model, surrogate, eval_cfg, preprocess, intensity, num_classes,
                                                    seed, out, device, class_names=class_names)
    run_parts = run_key_parts(
        eval_options=to_dict(eval_cfg), preprocess=to_dict(preprocess), attacks=passes.runs, seed=seed,
        num_classes=num_classes, weights=model_digest or module_digest(model), model_info=model_info,
        surrogate=None if surrogate is None else (surrogate_digest or module_digest(surrogate)),
        surrogate_info=surrogate_info)
    cases = list(cases)[: eval_cfg.max_cases] if eval_cfg.max_cases else list(cases)
    passes.cases = cases  # every case of the split, for row passes that calibrate over the dataset
    mine = [(i, c) for i, c in enumerate(cases) if i % dist_ctx.world == dist_ctx.rank]
    t_start = time.perf_counter()
    done, failed = _run_cases(passes, mine, CaseCache(out / "cases"), run_parts, progress and dist_ctx.rank == 0)
    records, fails, seconds = _gather(dist_ctx, done, failed, time.perf_counter() - t_start)
    results = _results(passes, records, fails, seed=seed, num_classes=num_classes, class_names=class_names,
                       model_info=model_info, surrogate_info=surrogate_info, transfer=surrogate is not None,
                       world=dist_ctx.world, seconds=seconds)
    if dist_ctx.rank == 0:
        _write_outputs(results, eval_cfg, out)
    barrier(dist_ctx, device)
    return results


__all__ = ["evaluate", "load_case", "case_id", "summarize"]
