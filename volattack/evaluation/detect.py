"""``volattack detect CONFIG``: fit detectors of adversarial volumes and measure them, non-adaptive
and adaptive (Carlini and Wagner, AISec 2017: a detector is evaluated against an attack that
knows it, or not at all).

The config is a run config (``phantoms``, ``data``, ``model``, optionally ``train``) plus a
``detect`` section (:class:`DetectConfig`). For each attack and budget of ``detect.attacks``:

1. every case of the fitting split (``detect.fit_split``) is attacked; each detector of
   ``detect.detectors`` is fitted on the clean and the attacked fitting volumes
   (:meth:`~volattack.threats.detectors.Detector.fit`), which also sets its 5%-FPR threshold;
2. every case of the test split (``detect.test_split``) is attacked the same way (non-adaptive),
   and attacked again by the adaptive attack against each detector
   (:func:`volattack.threats.adaptive_detect.adaptive_attack`: the same attack and budget, its
   objective minus ``weight * relu(score - target)``);
3. per detector: AUROC and TPR at 5% FPR of the attacked against the clean test scores, for the
   non-adaptive and the adaptive attack, with 95% percentile-bootstrap intervals over test cases
   (a resampled case brings its clean and its attacked volume), the TPR and FPR at the threshold
   fitted on the fitting split, and the Dice drop of both attacks (mean foreground Dice, clean
   minus attacked, intervals from :func:`volattack.metrics.statistics.bootstrap_ci`) with the
   paired interval of ``adaptive drop - 0.5 x non-adaptive drop`` (positive: the adaptive attack
   keeps more than half of the damage).

Case i of the fitting split is attacked with sample id i, case j of the test split with id
``n_fit + j``; the detectors get the run seed. Everything is validated (names with suggestions,
parameters, layers, case counts) before any attack runs; ``detect.json`` and ``detect.md`` are
written atomically once everything is done.

Resuming: each finished attack block (one attack and budget with all its detectors) is written
atomically to ``blocks/<key>.json``, its key the digest of what produced it (the ``detect``
section without its attack list, the attack and budget, the network's weights, the preprocessing,
the number of classes, the seed and the bytes of every fitting and test file). Rerunning the same
command after an interruption reuses the finished blocks and computes the rest; a block whose key
differs (other weights, a rewritten case, another detector) is recomputed, and the log says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from volattack.checks import check_number
from volattack.evaluation.config import AttackSpec, format_number
from volattack.metrics.statistics import DEFAULT_LEVEL, DEFAULT_N_BOOT, Estimate, bootstrap_ci, paired_bootstrap_diff
from volattack.threats.detectors import DETECTORS, MIN_ATTACKED, MIN_CLEAN, auroc, fpr_threshold, tpr_at_fpr
from volattack.utils import atomic_write_json, atomic_write_text
from volattack.yaml_config import ConfigError, from_dict, to_dict

logger = logging.getLogger(__name__)

#: fewest test cases a detection report is computed on
MIN_TEST = 2


@dataclass
class DetectorSpec:
    """One detector: a registered name, its parameters and the label of its rows (default: the name)."""

    name: str = "spectral"
    params: dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None

    def __post_init__(self) -> None:
        DETECTORS.get(self.name)  # unknown names raise with a suggestion
        self.label = self.label or self.name


@dataclass
class AdaptiveConfig:
    """The adaptive attack against each detector.

    Attributes:
        enabled: run it.
        weight: penalty weight w of ``objective - w * relu(score - target)`` (scores are
            standardised by the clean fitting scores, so w means the same for every detector).
        quantile: target level, the ``quantile`` of the clean fitting scores (0.5: the clean
            median); ``null``: the detector's 5%-FPR threshold.
        detectors: labels of the detectors attacked adaptively (``null``: all).
    """

    enabled: bool = True
    weight: float = 1.0
    quantile: Optional[float] = 0.5
    detectors: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_number("weight", self.weight, low=0)
        if self.quantile is not None:
            check_number("quantile", self.quantile, low=0, high=1)


@dataclass
class DetectConfig:
    """The ``detect`` section of a ``volattack detect`` config.

    Attributes:
        checkpoint: the segmenter; ``null``: train one from the config's ``train`` section into
            ``<output_dir>/train`` (reused when finished).
        fit_split, test_split: datalist keys of the fitting and the test cases.
        max_fit_cases, max_test_cases: use only the first cases of a split.
        detectors: the detectors (:class:`DetectorSpec`).
        attacks: attacks and budgets (as ``evaluate.attacks``: ``name``, ``params``, ``sweep``).
        adaptive: the adaptive attack (:class:`AdaptiveConfig`).
        fpr: false-positive rate of the thresholds and of the reported TPR, in (0, 1).
        sw_batch_size, sw_overlap: sliding-window inference (full graph, so layer features carry
            gradients).
        n_boot: bootstrap resamples of every interval.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
    """

    checkpoint: Optional[str] = None
    fit_split: str = "validation"
    test_split: str = "test"
    max_fit_cases: Optional[int] = None
    max_test_cases: Optional[int] = None
    detectors: list[DetectorSpec] = field(default_factory=lambda: [DetectorSpec()])
    attacks: list[AttackSpec] = field(default_factory=lambda: [AttackSpec("pgd", params={"eps": 4 / 255})])
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    fpr: float = 0.05
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    n_boot: int = DEFAULT_N_BOOT
    device: str = "auto"

    def __post_init__(self) -> None:
        check_number("fpr", self.fpr, low=0, high=1, low_open=True, high_open=True)
        check_number("sw_batch_size", self.sw_batch_size, low=1, integer=True)
        check_number("sw_overlap", self.sw_overlap, low=0, high=1, high_open=True)
        check_number("n_boot", self.n_boot, low=1, integer=True)
        for key in ("max_fit_cases", "max_test_cases"):
            if getattr(self, key) is not None:
                check_number(key, getattr(self, key), low=1, integer=True)
        if not self.detectors:
            raise ValueError("detectors must list at least one detector.")
        if not self.attacks:
            raise ValueError("attacks must list at least one attack.")
        labels = [d.label for d in self.detectors]
        if len(set(labels)) != len(labels):
            raise ValueError(f"detectors must have distinct labels (set 'label'), got {labels}.")
        for name in self.adaptive.detectors or []:
            if name not in labels:
                from volattack.registry import suggest

                raise ValueError(f"adaptive.detectors names {name!r}, not a detector label.{suggest(name, labels)} "
                                 f"Labels: {', '.join(labels)}.")


def split_detect_config(raw: Mapping[str, Any]) -> tuple[dict[str, Any], DetectConfig]:
    """``(the run config's mapping without 'detect', the DetectConfig)`` of a raw YAML mapping.

    Raises:
        ConfigError: no ``detect`` section, or an invalid one (the dotted key named).
    """
    rest = dict(raw)
    section = rest.pop("detect", None)
    if not isinstance(section, Mapping):
        raise ConfigError(f"The config needs a 'detect' section (a mapping), got {section!r}.")
    return rest, from_dict(DetectConfig, section, "detect")


def validate_detect(cfg: DetectConfig, bounds: Sequence[float] = (0.0, 1.0)) -> None:
    """Build every detector and every attack (plain and adaptive objective) on a dummy model, so
    bad names and parameters fail before any data, model or attack work.

    Raises:
        ConfigError: naming ``detect.detectors[i]`` or ``detect.attacks`` and the cause.
    """
    from volattack.attacks import create_attack
    from volattack.threats.adaptive_detect import detector_objective

    for i, spec in enumerate(cfg.detectors):
        try:
            DETECTORS.create(spec.name, **spec.params)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"detect.detectors[{i}] ({spec.label}): {e}") from e
    dummy = torch.nn.Conv3d(1, 1, 1)
    for spec in cfg.attacks:
        for label, kw in spec.expand():
            try:
                create_attack(spec.name, dummy, bounds=tuple(bounds), **kw)
                if cfg.adaptive.enabled:
                    obj = detector_objective(kw.get("objective", "dice_ce"))
                    create_attack(spec.name, dummy, bounds=tuple(bounds), **{**kw, "objective": obj})
            except (ValueError, TypeError) as e:
                raise ConfigError(f"detect.attacks: {label}: {e}") from e


def check_case_counts(cfg: DetectConfig, n_fit: int, n_test: int) -> None:
    """Raise ``ValueError`` stating the minimum when a split has too few cases to fit or report.

    The fitting split needs :data:`~volattack.threats.detectors.MIN_CLEAN` cases (each gives a
    clean and an attacked volume, so also :data:`~volattack.threats.detectors.MIN_ATTACKED`), the
    test split :data:`MIN_TEST`.
    """
    need = max(MIN_CLEAN, MIN_ATTACKED)
    if n_fit < need:
        raise ValueError(f"detect.fit_split={cfg.fit_split!r} has {n_fit} cases; fitting a detector needs at least "
                         f"{MIN_CLEAN} clean and {MIN_ATTACKED} attacked volumes, i.e. {need} cases.")
    if n_test < MIN_TEST:
        raise ValueError(f"detect.test_split={cfg.test_split!r} has {n_test} cases; the report needs at least {MIN_TEST}.")


# ------------------------------------------------------------------------ statistics
def _bootstrap_pairs(fn: Any, clean: np.ndarray, adv: np.ndarray, n_boot: int, seed: int) -> Estimate:
    """``fn(clean, adv)`` and its percentile-bootstrap interval over cases (a resampled case keeps
    its clean and its attacked score), as in :mod:`volattack.metrics.statistics`."""
    value = fn(clean, adv)
    n = clean.size
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, "one case: no interval")
    rng = np.random.default_rng(seed)
    stats = np.array([fn(clean[idx], adv[idx]) for idx in rng.integers(0, n, size=(n_boot, n))])
    alpha = (1 - DEFAULT_LEVEL) / 2
    lo, hi = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return Estimate(value, float(lo), float(hi), n)


def _est(e: Estimate) -> dict[str, Any]:
    return {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n}


def detection_figures(clean: Sequence[float], adv: Sequence[float], threshold: float, fpr: float,
                      n_boot: int, seed: int) -> dict[str, Any]:
    """AUROC and TPR at ``fpr`` (test ROC) with intervals, and TPR/FPR at the fitted ``threshold``.

    Shape:
        clean, adv: per test case scores ``(n,)``, paired by case.
    """
    c, a = np.asarray(clean, dtype=np.float64), np.asarray(adv, dtype=np.float64)
    return {
        "auroc": _est(_bootstrap_pairs(auroc, c, a, n_boot, seed)),
        "tpr_at_fpr": _est(_bootstrap_pairs(lambda u, v: tpr_at_fpr(u, v, fpr), c, a, n_boot, seed)),
        "tpr_at_threshold": float((a > threshold).mean()),
        "fpr_at_threshold": float((c > threshold).mean()),
        "test_threshold": fpr_threshold(c, fpr),
    }


# ------------------------------------------------------------------------ the run
class _Run:
    """What the attacks and detectors of one detection run share (model, cases, seeds)."""

    def __init__(self, network: torch.nn.Module, cfg: DetectConfig, preprocess: Any, num_classes: int, seed: int,
                 device: torch.device, progress: bool) -> None:
        from volattack.data.intensity import intensity_from_preprocess
        from volattack.inference.sliding import full_graph_inferer
        from volattack.threats.detectors import WholeVolume

        intensity = intensity_from_preprocess(preprocess)
        self.bounds = tuple(float(b) for b in intensity.bounds)
        self.unit_scale = intensity.unit_scale
        inferer = full_graph_inferer(preprocess.roi_size, cfg.sw_batch_size, cfg.sw_overlap,
                                     cval=float(intensity.pad_value))
        self.model = WholeVolume(network.to(device).eval(), inferer)
        self.cfg, self.k, self.seed, self.device, self.progress = cfg, num_classes, seed, device, progress

    def load(self, entries: Sequence[Mapping[str, Any]], preprocess: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from volattack.data.transforms import build_transforms
        from volattack.evaluation.cases import load_case

        transforms = build_transforms(preprocess, mode="eval")
        out = []
        for e in entries:
            x, y, _, _ = load_case(e, transforms)
            out.append((x.as_subclass(torch.Tensor).to(self.device), y.as_subclass(torch.Tensor).to(self.device)))
        return out

    def dice(self, x: torch.Tensor, y: torch.Tensor) -> float:
        from volattack.attacks.objectives import hard_foreground_dice

        with torch.no_grad():
            return float(hard_foreground_dice(self.model(x).argmax(1, keepdim=True), y, self.k)[0])

    def attack_all(self, atk: Any, cases: Sequence[tuple[torch.Tensor, torch.Tensor]], first_id: int,
                   desc: str) -> list[torch.Tensor]:
        from tqdm.auto import tqdm

        return [atk.run(x, y, sample_ids=[first_id + i]).adv
                for i, (x, y) in enumerate(tqdm(cases, desc=desc, disable=not self.progress, leave=False))]

    def scores(self, det: Any, vols: Sequence[torch.Tensor]) -> list[float]:
        with torch.no_grad():
            return [float(det.score(v, self.model)[0]) for v in vols]


def _attack_kwargs(run: _Run, kw: Mapping[str, Any]) -> dict[str, Any]:
    return {**kw, "bounds": run.bounds, "unit_scale": run.unit_scale, "seed": run.seed}


def _drops(run: _Run, clean_dice: list[float], cases: Sequence[tuple], advs: Sequence[torch.Tensor]) -> tuple:
    adv_dice = [run.dice(a, y) for a, (_, y) in zip(advs, cases)]
    return adv_dice, [c - a for c, a in zip(clean_dice, adv_dice)]


def _detector_row(run: _Run, spec: DetectorSpec, name: str, kw: Mapping[str, Any], data: dict[str, Any]) -> dict:
    """Fit one detector for one attack; its non-adaptive and adaptive figures."""
    from volattack.threats.adaptive_detect import adaptive_attack, score_target

    cfg = run.cfg
    det = DETECTORS.create(spec.name, **{"seed": run.seed, "fpr": cfg.fpr, **spec.params})
    det.fit([x for x, _ in data["fit"]], data["fit_adv"], run.model)
    clean_s = run.scores(det, [x for x, _ in data["test"]])
    adv_s = run.scores(det, data["test_adv"])
    row: dict[str, Any] = {"detector": spec.label, "name": spec.name, "describe": det.describe(),
                           "threshold": det.threshold, "clean_scores": clean_s, "attacked_scores": adv_s,
                           "non_adaptive": detection_figures(clean_s, adv_s, det.threshold, cfg.fpr, cfg.n_boot, run.seed)}
    ad = cfg.adaptive
    if not ad.enabled or (ad.detectors is not None and spec.label not in ad.detectors):
        return row
    target = score_target(det, ad.quantile)
    atk = adaptive_attack(name, run.model, det, ad.weight, target=target, **_attack_kwargs(run, kw))
    advs = run.attack_all(atk, data["test"], len(data["fit"]), f"adaptive vs {spec.label}")
    ad_s = run.scores(det, advs)
    ad_dice, ad_drop = _drops(run, data["clean_dice"], data["test"], advs)
    half = [0.5 * d for d in data["drop"]]
    row["adaptive"] = {
        **detection_figures(clean_s, ad_s, det.threshold, cfg.fpr, cfg.n_boot, run.seed),
        "weight": ad.weight, "target": target, "quantile": ad.quantile, "attacked_scores": ad_s,
        "dice": ad_dice, "dice_drop": _est(bootstrap_ci(ad_drop, n_boot=cfg.n_boot, seed=run.seed)),
        "drop_ratio": float(np.mean(ad_drop) / np.mean(data["drop"])) if np.mean(data["drop"]) != 0 else math.nan,
        "drop_minus_half": _est(paired_bootstrap_diff(ad_drop, half, n_boot=cfg.n_boot, seed=run.seed)),
        "linf_max": max(float((a - x).abs().max()) for a, (x, _) in zip(advs, data["test"])),
    }
    return row


def _attack_block(run: _Run, label: str, name: str, kw: Mapping[str, Any], fit: list, test: list,
                  clean_dice: list[float]) -> dict[str, Any]:
    """Attack both splits with one attack and budget; every detector's row."""
    from volattack.attacks import create_attack

    atk = create_attack(name, run.model, **_attack_kwargs(run, kw))
    data = {"fit": fit, "test": test, "clean_dice": clean_dice,
            "fit_adv": run.attack_all(atk, fit, 0, f"{label} fit"),
            "test_adv": run.attack_all(atk, test, len(fit), f"{label} test")}
    adv_dice, drop = _drops(run, clean_dice, test, data["test_adv"])
    data["drop"] = drop
    rows = [_detector_row(run, spec, name, kw, data) for spec in run.cfg.detectors]
    return {"label": label, "name": name, "params": dict(kw), "dice": adv_dice,
            "dice_drop": _est(bootstrap_ci(drop, n_boot=run.cfg.n_boot, seed=run.seed)),
            "linf_max": max(float((a - x).abs().max()) for a, (x, _) in zip(data["test_adv"], test)),
            "detectors": rows}


def _run_key(network: torch.nn.Module, cfg: DetectConfig, preprocess: Any, num_classes: int, seed: int,
             fit_cases: Sequence[Mapping[str, Any]], test_cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What every attack block of a run depends on (module docstring, "Resuming")."""
    from volattack.evaluation.cache import path_digest
    from volattack.ops import module_digest

    def files(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
        return [{k: path_digest(str(c[k])) for k in ("image", "label") if c.get(k)} for c in cases]

    section = {k: v for k, v in to_dict(cfg).items() if k != "attacks"}
    return {"detect": section, "weights": module_digest(network), "preprocess": to_dict(preprocess),
            "num_classes": num_classes, "seed": seed, "fit": files(fit_cases), "test": files(test_cases)}


def _cached_block(out: Path, base_key: Mapping[str, Any], label: str, name: str, kw: Mapping[str, Any],
                  compute: Any) -> dict[str, Any]:
    """The attack block ``label`` from ``out/blocks/<key>.json`` when it was finished with the same
    key, else ``compute()``, written there atomically before it is returned."""
    import json

    from volattack.evaluation.cache import digest

    key = digest({**base_key, "label": label, "name": name, "params": {k: str(v) for k, v in kw.items()}})
    path = out / "blocks" / f"{key}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            logger.warning("detect: recomputing %s: its saved block %s is unreadable (%s)", label, path, e)
        else:
            logger.info("detect: reusing the finished block %s (%s)", label, path)
            return saved
    elif (out / "blocks").is_dir():
        logger.info("detect: computing %s (no finished block with its key %s: new attack, weights, cases or "
                    "detectors)", label, key)
    atomic_write_json(path, compute())
    return json.loads(path.read_text(encoding="utf-8"))  # as a resumed run reads it (NaN -> null)


def run_detection(network: torch.nn.Module, fit_cases: Sequence[Mapping[str, Any]],
                  test_cases: Sequence[Mapping[str, Any]], out_dir: str | Path, *, cfg: DetectConfig,
                  preprocess: Any, num_classes: int, seed: int = 0, model_info: Optional[dict[str, Any]] = None,
                  progress: bool = True) -> dict[str, Any]:
    """The detection run (module docstring); writes ``detect.json`` and ``detect.md`` in ``out_dir``.

    Args:
        network: the segmenter ``(1, C, *window) -> (1, K, *window)`` (sliding window applied here).
        fit_cases, test_cases: datalist entries of the fitting and the test split.
        out_dir: the run folder.
        cfg: the ``detect`` section.
        preprocess: the model's ``data.preprocess`` (eval transforms, intensity window, window size).
        num_classes: K, background included.
        seed: attack and detector seed.
        model_info: description of the model for the results.
        progress: progress bars.

    Returns:
        The ``detect.json`` document, plus ``files`` (the written paths).

    Raises:
        ValueError / ConfigError: bad config, too few cases, a layer the model lacks (before any attack).
    """
    from volattack.utils import resolve_device

    fit_cases = list(fit_cases)[: cfg.max_fit_cases] if cfg.max_fit_cases else list(fit_cases)
    test_cases = list(test_cases)[: cfg.max_test_cases] if cfg.max_test_cases else list(test_cases)
    check_case_counts(cfg, len(fit_cases), len(test_cases))
    run = _Run(network, cfg, preprocess, num_classes, seed, resolve_device(cfg.device), progress)
    validate_detect(cfg, run.bounds)
    for i, spec in enumerate(cfg.detectors):
        try:
            DETECTORS.create(spec.name, **spec.params).check_model(run.model)
        except ValueError as e:
            raise ValueError(f"detect.detectors[{i}] ({spec.label}): {e}") from e
    fit, test = run.load(fit_cases, preprocess), run.load(test_cases, preprocess)
    clean_dice = [run.dice(x, y) for x, y in test]
    base_key = _run_key(network, cfg, preprocess, num_classes, seed, fit_cases, test_cases)
    blocks = [_cached_block(Path(out_dir), base_key, label, spec.name, kw,
                            lambda label=label, name=spec.name, kw=kw: _attack_block(run, label, name, kw, fit, test,
                                                                                     clean_dice))
              for spec in cfg.attacks for label, kw in spec.expand()]
    results = {"seed": seed, "model": model_info or {}, "config": to_dict(cfg), "bounds": list(run.bounds),
               "unit_scale": run.unit_scale, "fit_cases": [str(c.get("image")) for c in fit_cases],
               "test_cases": [str(c.get("image")) for c in test_cases], "clean_dice": clean_dice,
               "clean_dice_mean": _est(bootstrap_ci(clean_dice, n_boot=cfg.n_boot, seed=seed)), "attacks": blocks}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = detect_markdown(results)
    files = {"json": str(atomic_write_json(out / "detect.json", results)),
             "md": str(atomic_write_text(out / "detect.md", md))}
    return {**results, "files": files, "markdown": md}


# ------------------------------------------------------------------------ report
def _missing(v: Any) -> bool:
    """No number: ``None`` (NaN as JSON stores it) or NaN."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v: Any, digits: int = 2) -> str:
    return "-" if _missing(v) else f"{v:.{digits}f}"


def _ci(e: Mapping[str, Any], digits: int = 3) -> str:
    if e is None or _missing(e.get("value")):
        return "-"
    if _missing(e.get("lo")) or _missing(e.get("hi")):
        return f"{e['value']:.{digits}f}"
    return f"{e['value']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def detect_markdown(results: Mapping[str, Any]) -> str:
    """The ``detect.md`` text: one table per attack and budget, a line per detector."""
    fpr = results["config"]["fpr"]
    n_fit, n_test = len(results["fit_cases"]), len(results["test_cases"])
    lines = [f"# Detection of adversarial volumes\n",
             f"Fitted on {n_fit} clean + {n_fit} attacked cases, tested on {n_test} clean + {n_test} attacked "
             f"cases; 95% bootstrap intervals over test cases. TPR at {fpr:.0%} FPR from the test ROC; "
             f"'at thr.' uses the threshold fitted at {fpr:.0%} FPR on the fitting split. "
             f"Clean Dice {_ci(results['clean_dice_mean'])}.\n"]
    for block in results["attacks"]:
        params = ", ".join(f"{k}={format_number(v, k)}" for k, v in block["params"].items())
        lines += [f"\n## {block['label']}\n", f"Parameters: {params or 'defaults'}. Non-adaptive Dice drop "
                  f"{_ci(block['dice_drop'])} (max L-inf {block['linf_max']:.4g}).\n",
                  "| detector | AUROC | TPR@FPR | TPR / FPR at thr. | adaptive AUROC | adaptive TPR@FPR | "
                  "adaptive TPR / FPR at thr. | adaptive Dice drop | drop ratio | drop - half drop |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in block["detectors"]:
            na, ad = row["non_adaptive"], row.get("adaptive")
            cells = [row["detector"], _ci(na["auroc"]), _ci(na["tpr_at_fpr"]),
                     f"{_num(na['tpr_at_threshold'])} / {_num(na['fpr_at_threshold'])}"]
            if ad:
                cells += [_ci(ad["auroc"]), _ci(ad["tpr_at_fpr"]),
                          f"{_num(ad['tpr_at_threshold'])} / {_num(ad['fpr_at_threshold'])}", _ci(ad["dice_drop"]),
                          _num(ad["drop_ratio"]), _ci(ad["drop_minus_half"])]
            else:
                cells += ["-"] * 6
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["AdaptiveConfig", "DetectConfig", "DetectorSpec", "check_case_counts", "detect_markdown",
           "detection_figures", "run_detection", "split_detect_config", "validate_detect"]
