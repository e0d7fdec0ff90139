"""Evaluation runner: a model x cases x attack suite, with per-case resumable results.

For each case the runner predicts the clean volume with sliding-window inference, then
runs every configured attack end to end through the same sliding-window inferer (the
``volume`` threat model: the attack sees exactly the stitched output it is scored on),
and scores clean and adversarial predictions with the metrics of ``volattack.metrics``.
Per-case results are written atomically to ``cases/<case>.json`` as soon as the case is
done; a rerun with the same configuration skips finished cases, so an interrupted run
resumes where it stopped. ``results.json`` and ``report.md`` are rebuilt at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from volattack.configs import dump_yaml, to_dict
from volattack.data.config import PreprocessConfig
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.utils import atomic_write_json, atomic_write_text, versions

logger = logging.getLogger(__name__)

THREAT_MODEL = "volume"


def _case_id(entry: dict[str, Any], index: int) -> str:
    name = Path(str(entry.get("image", f"case_{index}"))).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{index:04d}_{name}"


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _clean_floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().cpu().flatten().tolist()]


def load_case(entry: dict[str, Any], transforms: Any) -> tuple[torch.Tensor, torch.Tensor, Any, list[float]]:
    """Load and preprocess one datalist entry.

    Returns:
        image ``(1, C, H, W, D)`` float32, label ``(1, 1, H, W, D)`` long, the image's affine
        after preprocessing ``(4, 4)`` (numpy), and its voxel spacing in mm.
    """
    from monai.data.utils import affine_to_spacing

    sample = transforms(dict(entry))
    image, label = sample["image"], sample["label"]
    affine = getattr(image, "affine", None)
    if affine is None:
        affine = torch.eye(4)
    spacing = [float(s) for s in affine_to_spacing(torch.as_tensor(affine), r=3)]
    img = torch.as_tensor(image).float().unsqueeze(0)
    lab = torch.as_tensor(label).long().unsqueeze(0)
    return img, lab, torch.as_tensor(affine).cpu().numpy(), spacing


def score(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing: Sequence[float]
) -> dict[str, Any]:
    """Foreground Dice per class and its mean, HD95 per class (mm) and its mean, for one case."""
    from volattack.metrics import dice_per_class, hd95, mean_foreground_dice

    dpc = dice_per_class(pred, label, num_classes)
    h = hd95(pred, label, num_classes, spacing=spacing)
    return {
        "dice": float(mean_foreground_dice(pred, label, num_classes)[0]),
        "dice_per_class": _clean_floats(dpc[0]),
        "hd95_mm": _nanmean(_clean_floats(h[0])),
        "hd95_mm_per_class": _clean_floats(h[0]),
    }


def _config_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` clean and under every attack of ``eval_cfg`` on ``cases``.

    Args:
        model: segmenter mapping ``(1, C, H, W, D)`` to logits ``(1, K, H, W, D)``.
        cases: datalist entries ``{"image": path, "label": path}``.
        out_dir: run directory (``config.yaml``, ``results.json``, ``report.md``, ``cases/``).
        eval_cfg: attacks, sliding-window settings, outputs.
        preprocess: the preprocessing the model was trained with (intensity window -> HU scale).
        num_classes: K, including background.
        seed: base seed; case ``i`` is attacked with seed ``seed + i`` (recorded per case).
        class_names: optional names of classes for the report.
        run_config: the resolved configuration to store as ``config.yaml`` (dataclass or dict).
        model_info: description of the model (checkpoint path, architecture) for the results.
        progress: show a progress bar over cases.

    Returns:
        The results dictionary also written to ``results.json``.
    """
    from monai.inferers import SlidingWindowInferer
    from tqdm.auto import tqdm

    import volattack
    from volattack.data.transforms import build_transforms, hu_per_unit
    from volattack.utils import resolve_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases").mkdir(exist_ok=True)
    if run_config is not None:
        atomic_write_text(out / "config.yaml", dump_yaml(run_config))
    device = resolve_device(eval_cfg.device)
    model = model.to(device).eval()
    roi = list(preprocess.roi_size)
    inferer = SlidingWindowInferer(
        roi_size=roi, sw_batch_size=eval_cfg.sw_batch_size, overlap=eval_cfg.sw_overlap, mode="gaussian"
    )
    unit_scale = hu_per_unit(preprocess)
    bounds = (float(preprocess.b_min), float(preprocess.b_max))
    runs: list[tuple[str, str, dict[str, Any]]] = []
    for spec in eval_cfg.attacks:
        for label, kw in spec.expand():
            runs.append((label, spec.name, kw))
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"evaluate.attacks has duplicate entries: {labels}.")
    # build every attack once up front so that bad parameters fail before any work
    attacks = {
        label: volattack.create_attack(
            name, model, bounds=bounds, seed=seed, inferer=inferer, unit_scale=unit_scale, **kw
        )
        for label, name, kw in runs
    }
    key = _config_key(
        {
            "attacks": [(lbl, n, kw) for lbl, n, kw in runs],
            "seed": seed,
            "preprocess": to_dict(preprocess),
            "model": model_info or {},
            "sw": [eval_cfg.sw_batch_size, eval_cfg.sw_overlap],
        }
    )
    transforms = build_transforms(preprocess, mode="eval")
    cases = list(cases)[: eval_cfg.max_cases] if eval_cfg.max_cases else list(cases)
    per_case: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    bar = tqdm(list(enumerate(cases)), desc="evaluate", disable=not progress, unit="case")
    for i, entry in bar:
        cid = _case_id(entry, i)
        path = out / "cases" / f"{cid}.json"
        if path.is_file():
            try:
                done = json.loads(path.read_text())
                if done.get("key") == key:
                    per_case.append(done)
                    logger.info("case %s already done, skipped", cid)
                    continue
            except json.JSONDecodeError:
                logger.warning("case file %s is unreadable; recomputing", path)
        per_case.append(
            _evaluate_case(
                model, entry, i, cid, key, transforms, inferer, attacks, runs, device, num_classes,
                seed, unit_scale, bounds, eval_cfg, out, preprocess,
            )
        )
        atomic_write_json(path, per_case[-1])
    results = {
        "volattack": volattack.__version__,
        "versions": versions(),
        "seed": seed,
        "threat_model": THREAT_MODEL,
        "num_classes": num_classes,
        "class_names": {str(k): v for k, v in (class_names or {}).items()},
        "model": model_info or {},
        "attacks": [{"label": lbl, "name": n, "params": kw} for lbl, n, kw in runs],
        "fooling_threshold": eval_cfg.fooling_threshold,
        "cases": per_case,
        "summary": summarize(per_case, labels, eval_cfg.fooling_threshold),
        "timings": {"evaluate_seconds": time.perf_counter() - t_start},
    }
    atomic_write_json(out / "results.json", results)
    from volattack.evaluation.report import write_report

    write_report(results, out)
    return results


def _evaluate_case(model, entry, index, cid, key, transforms, inferer, attacks, runs, device, num_classes,
                   seed, unit_scale, bounds, eval_cfg, out, preprocess):
    """Clean and adversarial scores of one case (see :func:`evaluate`)."""
    from volattack.metrics import perturbation_stats, voxel_flip_rate

    t0 = time.perf_counter()
    image, label, affine, spacing = load_case(entry, transforms)
    image, label = image.to(device), label.to(device)
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"case {entry.get('image')!r}: image contains NaN or Inf values.")
    if int(label.max()) >= num_classes or int(label.min()) < 0:
        raise ValueError(
            f"case {entry.get('label')!r}: labels must be in [0, {num_classes - 1}], "
            f"got values in [{int(label.min())}, {int(label.max())}]."
        )
    with torch.no_grad():
        clean_logits = inferer(image, model)
    clean_pred = clean_logits.argmax(1, keepdim=True)
    record: dict[str, Any] = {
        "case": cid,
        "image": str(entry.get("image")),
        "label": str(entry.get("label")),
        "key": key,
        "seed": seed + index,
        "shape": list(image.shape[2:]),
        "spacing_mm": spacing,
        "clean": score(clean_pred, label, num_classes, spacing),
        "attacks": {},
    }
    if eval_cfg.save_pred:
        _save_label(clean_pred, affine, out / "predictions" / f"{cid}_clean.nii.gz")
    for lbl, _name, _kw in runs:
        atk = attacks[lbl]
        res = atk.run(image, label, seed=seed + index)
        with torch.no_grad():
            adv_pred = inferer(res.adv, model).argmax(1, keepdim=True)
        s = score(adv_pred, label, num_classes, spacing)
        p = perturbation_stats(image, res.adv, data_range=bounds, unit_scale=unit_scale)
        s.update({k: float(v[0]) for k, v in p.items()})
        s["flip_rate"] = float(voxel_flip_rate(clean_pred, adv_pred, label)[0])
        s["seconds"] = float(res.info["seconds"])
        s["steps_run"] = res.info.get("steps_run")
        record["attacks"][lbl] = s
        if eval_cfg.save_adv:
            from volattack.data.io import write_nifti
            from volattack.data.transforms import to_source_units

            hu = to_source_units(res.adv[0, 0].float().cpu(), preprocess)
            write_nifti(hu, out / "adversarial" / f"{cid}_{_slug(lbl)}.nii.gz", affine)
        if eval_cfg.save_pred:
            _save_label(adv_pred, affine, out / "predictions" / f"{cid}_{_slug(lbl)}.nii.gz")
    record["seconds"] = time.perf_counter() - t0
    return record


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_")


def _save_label(pred: torch.Tensor, affine: Any, path: Path) -> None:
    import numpy as np

    from volattack.data.io import write_nifti

    write_nifti(pred[0, 0].to(torch.uint8).cpu().numpy(), path, affine, dtype=np.uint8)


def summarize(per_case: list[dict[str, Any]], labels: Sequence[str], threshold: float) -> dict[str, Any]:
    """Dataset-level figures: means over cases, fooling rate at ``threshold``, Dice drops.

    Every mean skips NaN values (e.g. HD95 of a class absent from both maps).
    """
    from volattack.metrics import dice_drop, fooling_rate

    clean = torch.tensor([c["clean"]["dice"] for c in per_case], dtype=torch.float64)
    k = len(per_case[0]["clean"]["dice_per_class"]) if per_case else 0
    summary: dict[str, Any] = {
        "n_cases": len(per_case),
        "clean": {
            "dice": _nanmean(clean.tolist()),
            "dice_per_class": [_nanmean([c["clean"]["dice_per_class"][j] for c in per_case]) for j in range(k)],
            "hd95_mm": _nanmean([c["clean"]["hd95_mm"] for c in per_case]),
        },
        "attacks": {},
    }
    for lbl in labels:
        rows = [c["attacks"][lbl] for c in per_case]
        adv = torch.tensor([r["dice"] for r in rows], dtype=torch.float64)
        absd, reld = dice_drop(clean, adv)
        entry = {
            "clean_dice": _nanmean(clean.tolist()),
            "adv_dice": _nanmean(adv.tolist()),
            "dice_drop": _nanmean(absd.tolist()),
            "dice_drop_rel": _nanmean(reld.tolist()),
            "fooling_rate": float(fooling_rate(clean, adv, threshold)) if len(rows) else float("nan"),
            "dice_per_class": [_nanmean([r["dice_per_class"][j] for r in rows]) for j in range(k)],
        }
        for m in ("hd95_mm", "flip_rate", "linf", "rms", "linf_units", "rms_units", "psnr", "ssim", "seconds"):
            if rows and m in rows[0]:
                entry[m] = _nanmean([r[m] for r in rows])
        summary["attacks"][lbl] = entry
    return summary
