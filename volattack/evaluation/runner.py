"""Evaluation runner: a model x cases x attack suite, resumable, shardable across processes.

For each case the runner predicts the clean volume with sliding-window inference, runs
every configured attack under the configured threat model, and scores clean and
adversarial predictions with ``volattack.metrics``:

- ``volume`` threat model: the attack runs end to end through the same sliding-window
  inference that scores it (exact gradient; with
  :class:`volattack.inference.sliding.WindowedInferer` when available, memory does not grow
  with the activations of all windows);
- ``patch`` threat model: the published protocol (tile, attack each tile through the bare
  model, stitch), see :mod:`volattack.evaluation.patchwise`.

With ``evaluate.surrogate_checkpoint`` the attacks are crafted on the surrogate and scored
on the target (transfer).

With ``evaluate.defense`` (:class:`~volattack.evaluation.config.DefenseConfig`) the evaluated
model is the defended model ``model(t_n(... t_1(x)))``
(:class:`~volattack.defenses.input_transforms.DefendedModel`, built by :func:`build_defense`):
its clean Dice is the clean row, every attack is scored on it, and the attacks (and the
gradient-masking sanity checks) differentiate the adaptive model of
:func:`~volattack.defenses.input_transforms.adaptive_wrapper` (BPDA through the
non-differentiable transforms, EOT over the randomised ones; Athalye et al., ICML 2018).
The defence sits inside sliding-window inference, so its transforms act on each window (the
whole volume when one window covers it). The undefended model's clean Dice is recorded too,
so the report shows what the defence costs. Randomised transforms and EOT are reseeded from
the case seed before the clean prediction and before every attack, so results depend neither
on the order or sharding of cases nor on the other attacks of the suite. (With a randomised
defence, :class:`~volattack.inference.sliding.WindowedInferer` recomputes each window in the
backward pass with fresh EOT draws: the gradient is then a second EOT estimate of the same
expected gradient, not the gradient of the exact draws of the forward pass.)

Per-case results are written atomically to ``cases/<case>.json``
as soon as the case is done; a rerun with the same configuration skips finished cases, so
an interrupted run (even ``kill -9``) resumes where it stopped. Under ``torchrun`` the cases
are sharded across ranks (case ``i`` on rank ``i % world_size``) and gathered on rank 0,
which writes ``results.json``, ``results.csv``, ``report.md`` and the figures.
A case whose files cannot be read is recorded as failed with the reason; the others go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn

from volattack.config import dump_yaml, to_dict
from volattack.data.config import PreprocessConfig
from volattack.evaluation.config import DefenseConfig, EvalConfig
from volattack.inference import make_inferer
from volattack.ops import seed_from
from volattack.utils import atomic_write_json, atomic_write_text, versions

if TYPE_CHECKING:  # pragma: no cover
    from volattack.defenses.input_transforms import DefendedModel

logger = logging.getLogger(__name__)


def _case_id(entry: dict[str, Any], index: int) -> str:
    name = Path(str(entry.get("image", f"case_{index}"))).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{index:04d}_{name}"


def _nanmean(values: Sequence[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _floats(t: torch.Tensor) -> list[float]:
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


def score(pred: torch.Tensor, label: torch.Tensor, num_classes: int, spacing: Sequence[float]) -> dict[str, Any]:
    """Foreground Dice per class and its mean, HD95 per class (mm) and its mean, for one case."""
    from volattack.metrics import dice_per_class, hd95, mean_foreground_dice

    dpc = dice_per_class(pred, label, num_classes)
    h = hd95(pred, label, num_classes, spacing=spacing)
    return {
        "dice": float(mean_foreground_dice(pred, label, num_classes)[0]),
        "dice_per_class": _floats(dpc[0]),
        "hd95_mm": _nanmean(_floats(h[0])),
        "hd95_mm_per_class": _floats(h[0]),
    }


def _config_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: ``evaluate.defense.transforms[].name`` -> class name in :mod:`volattack.defenses.input_transforms`
DEFENSE_CLASSES: dict[str, str] = {
    "gaussian": "GaussianSmoothing",
    "median": "MedianFilter",
    "dct_lowpass": "DCTLowPass",
    "dct_quant": "DCTQuantization",
    "noise": "RandomNoise",
}


def build_defense(model: nn.Module, defense: DefenseConfig) -> "DefendedModel":
    """The defended model of an ``evaluate.defense`` section: ``model(t_n(... t_1(x)))``.

    Transforms are built from ``defense.transforms`` (names as in :data:`DEFENSE_CLASSES`,
    constructor keywords from ``params``) with the exact forward pass (``bpda="none"``); the
    adaptive attack's BPDA mode is applied by
    :func:`~volattack.defenses.input_transforms.adaptive_wrapper`, not here.

    Args:
        model: segmenter mapping images to logits (shared, not copied).
        defense: the ``evaluate.defense`` section.

    Returns:
        A :class:`~volattack.defenses.input_transforms.DefendedModel`.

    Raises:
        ValueError: a bad transform parameter (unknown keyword, with a suggestion, or a value the
            transform rejects); the message names ``transforms[i]`` and the transform.

    Shape:
        images ``(B, C, H, W, D)`` (input units) -> logits ``(B, K, H, W, D)``.
    """
    import inspect

    from volattack.defenses import input_transforms as it
    from volattack.registry import suggest

    transforms: list[nn.Module] = []
    for i, spec in enumerate(defense.transforms):
        cls = getattr(it, DEFENSE_CLASSES[spec.name])
        allowed = [n for n, p in inspect.signature(cls.__init__).parameters.items()
                   if n not in ("self", "bpda", "generator") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        for key in spec.params:
            if key not in allowed:
                raise ValueError(
                    f"transforms[{i}] ({spec.name}): unknown parameter {key!r}.{suggest(str(key), allowed)} "
                    f"Valid parameters: {', '.join(allowed)}."
                )
        try:
            transforms.append(cls(**spec.params))
        except (ValueError, TypeError) as e:
            raise ValueError(f"transforms[{i}] ({spec.name}): {e}") from e
    return it.DefendedModel(model, transforms)


def describe_defense(defended: "DefendedModel") -> str:
    """One line naming the transforms of a defended model (``results["defense"]``).

    ``DefendedModel.describe`` without the ``bpda`` arguments: the defence's forward pass does not
    depend on them, and the adaptive attack's BPDA mode is reported separately
    (``AdaptiveModel.describe``, ``results["adaptive"]``).

    Args:
        defended: a :class:`~volattack.defenses.input_transforms.DefendedModel`.

    Returns:
        e.g. ``"DCTQuantization(block_size=8, q=10.0, growth=1.0, intensity_scale=255.0) -> model"``.
    """
    import re

    return re.sub(r", bpda='\w+'|bpda='\w+'(, )?", "", defended.describe())


class _Evaluator:
    """Holds everything one evaluation needs; :meth:`case` scores one datalist entry."""

    def __init__(self, model, surrogate, eval_cfg: EvalConfig, preprocess: PreprocessConfig, num_classes: int,
                 seed: int, out: Path, device: torch.device) -> None:
        import volattack
        from volattack.data.transforms import build_transforms, hu_per_unit

        self.model, self.cfg, self.pre, self.k, self.seed, self.out, self.device = (
            model, eval_cfg, preprocess, num_classes, seed, out, device)
        self.inferer = make_inferer(preprocess.roi_size, eval_cfg.sw_batch_size, eval_cfg.sw_overlap,
                                    cval=float(preprocess.b_min))
        self.unit_scale = hu_per_unit(preprocess)
        self.bounds = (float(preprocess.b_min), float(preprocess.b_max))
        self.transforms = build_transforms(preprocess, mode="eval")
        crafting = surrogate if surrogate is not None else model
        self.grad_model = model  # differentiated by the zero-gradient sanity check
        self.defended: Optional[nn.Module] = None
        self.adaptive: Optional[nn.Module] = None
        self.crafting_adaptive: Optional[nn.Module] = None
        self.undefended = model
        d = eval_cfg.defense
        if d is not None:
            from volattack.defenses.input_transforms import adaptive_wrapper

            self.defended = build_defense(model, d).to(device).eval()
            self.adaptive = adaptive_wrapper(self.defended, d.bpda, d.eot_samples, seed=seed).eval()
            self.crafting_adaptive = self.adaptive
            if surrogate is not None:  # the attacker knows the defence, not the target's weights
                import warnings

                with warnings.catch_warnings():  # same settings: adaptive_wrapper has warned once above
                    warnings.simplefilter("ignore")
                    self.crafting_adaptive = adaptive_wrapper(
                        build_defense(surrogate, d).to(device).eval(), d.bpda, d.eot_samples, seed=seed).eval()
            self.model = self.defended
            self.grad_model = self.adaptive
            crafting = self.crafting_adaptive
        self.runs: list[tuple[str, str, dict[str, Any]]] = [
            (label, spec.name, kw) for spec in eval_cfg.attacks for label, kw in spec.expand()
        ]
        labels = [r[0] for r in self.runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"evaluate.attacks has duplicate entries: {labels}.")
        patch = eval_cfg.threat_model == "patch"
        common = dict(bounds=self.bounds, seed=seed, unit_scale=self.unit_scale)
        self.attacks = {
            label: volattack.create_attack(name, crafting, inferer=None if patch else self.inferer, **common, **kw)
            for label, name, kw in self.runs
        }
        self.unbounded = None
        if eval_cfg.sanity_checks and eval_cfg.sanity_unbounded_steps > 0:
            width = self.bounds[1] - self.bounds[0]
            self.unbounded = volattack.create_attack(
                "pgd", crafting, inferer=None if patch else self.inferer, eps=width, alpha=width / 8,
                steps=eval_cfg.sanity_unbounded_steps, measure_ssim=False, **common)
        self.patch_size = list(eval_cfg.patch_size or preprocess.roi_size)

    def _reseed(self, case_seed: int) -> None:
        """Reseed every randomised transform and EOT generator from the case seed (order-free replay).

        Called before the clean prediction and before each attack (and each sanity check), so a
        row's numbers depend neither on the other cases nor on the other attacks. The attacker's
        EOT generators restart from the case seed (``seed + i``, as the attacks); the defender's
        own draws (scoring) use an independent stream mixed from the case seed, the transform's
        ``seed`` and its position, so the attacker never sees the defender's noise, and the clean
        and adversarial predictions of a case see the same defender draws.
        """
        if self.defended is None:
            return
        from volattack.defenses.input_transforms import EOTModel, RandomNoise

        for j, m in enumerate(self.defended.modules()):  # the defender's draws
            if isinstance(m, RandomNoise):
                m.generator.manual_seed(seed_from(case_seed, m.seed, j, 1))
        for root in (self.adaptive, self.crafting_adaptive):  # the attacker's EOT draws
            for m in root.modules():  # type: ignore[union-attr]
                if isinstance(m, EOTModel):
                    m.generator.manual_seed(case_seed)

    def _attack(self, atk, image, label, seed):
        if self.cfg.threat_model == "patch":
            from volattack.evaluation.patchwise import attack_patchwise

            return attack_patchwise(atk, image, label, self.patch_size, self.cfg.patch_overlap,
                                    tile_batch=self.cfg.sw_batch_size, seed=seed)
        res = atk.run(image, label, seed=seed)
        return res.adv, res.info

    def _zero_grad_fraction(self, image, label) -> float:
        """Fraction of input voxels whose Dice-CE gradient is exactly zero (gradient masking check)."""
        from volattack.attacks.base import eval_mode
        from volattack.attacks.objectives import objective_per_sample

        x = image.detach().clone().requires_grad_(True)
        with eval_mode(self.grad_model):
            loss = objective_per_sample(self.inferer(x, self.grad_model).float(), label, "dice_ce").sum()
            (g,) = torch.autograd.grad(loss * x[0].numel(), x)
        return float((g == 0).float().mean())

    def _check_window_fits(self, shape: tuple[int, ...], entry: dict[str, Any]) -> None:
        """A volume smaller than the sliding window is padded with ``b_min``, as training pads its
        crops (logged). An attack tile larger than the volume would attack padding, so under the
        ``patch`` threat model the case fails with the reason instead."""
        roi = list(self.pre.roi_size)
        if any(w > n for w, n in zip(roi, shape)):
            logger.info("case %r: volume %s is smaller than the sliding window %s; padded with b_min=%g "
                        "as in training", entry.get("image"), list(shape), roi, self.pre.b_min)
        if self.cfg.threat_model == "patch" and any(w > n for w, n in zip(self.patch_size, shape)):
            raise ValueError(
                f"case {entry.get('image')!r}: the attack tile evaluate.patch_size={list(self.patch_size)} is "
                f"larger than the preprocessed volume {list(shape)}; choose evaluate.patch_size that fits "
                "(or keep more of the volume: data.preprocess.crop_foreground, spacing)."
            )

    def case(self, entry: dict[str, Any], index: int, cid: str, key: str) -> dict[str, Any]:
        from volattack.metrics import perturbation_stats, voxel_flip_rate

        t0 = time.perf_counter()
        image, label, affine, spacing = load_case(entry, self.transforms)
        image, label = image.to(self.device), label.to(self.device)
        self._check_window_fits(tuple(image.shape[2:]), entry)
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"case {entry.get('image')!r}: image contains NaN or Inf values.")
        if int(label.max()) >= self.k or int(label.min()) < 0:
            raise ValueError(
                f"case {entry.get('label')!r}: labels must be in [0, {self.k - 1}], "
                f"got values in [{int(label.min())}, {int(label.max())}]."
            )
        seed = self.seed + index
        self._reseed(seed)
        with torch.no_grad():
            clean_pred = self.inferer(image, self.model).argmax(1, keepdim=True)
        record: dict[str, Any] = {
            "case": cid, "image": str(entry.get("image")), "label": str(entry.get("label")), "key": key,
            "seed": seed, "shape": list(image.shape[2:]), "spacing_mm": spacing,
            "clean": score(clean_pred, label, self.k, spacing), "attacks": {}, "sanity": {},
        }
        if self.defended is not None:
            with torch.no_grad():
                bare_pred = self.inferer(image, self.undefended).argmax(1, keepdim=True)
            record["clean_undefended"] = score(bare_pred, label, self.k, spacing)
        if self.cfg.save_pred:
            _save_label(clean_pred, affine, self.out / "predictions" / f"{cid}_clean.nii.gz")
        panel: Optional[tuple] = None
        for lbl, _name, _kw in self.runs:
            self._reseed(seed)
            adv, info = self._attack(self.attacks[lbl], image, label, seed)
            with torch.no_grad():
                adv_pred = self.inferer(adv, self.model).argmax(1, keepdim=True)
            s = score(adv_pred, label, self.k, spacing)
            p = perturbation_stats(image, adv, data_range=self.bounds, unit_scale=self.unit_scale)
            s.update({m: float(v[0]) for m, v in p.items()})
            s["flip_rate"] = float(voxel_flip_rate(clean_pred, adv_pred, label)[0])
            s["seconds"] = float(info["seconds"])
            s["steps_run"] = info.get("steps_run")
            record["attacks"][lbl] = s
            if index < self.cfg.figure_cases and self.cfg.figures and (panel is None or s["dice"] < panel[0]):
                panel = (s["dice"], lbl, adv.detach().cpu(), adv_pred.cpu())
            if self.cfg.save_adv:
                from volattack.data.io import write_nifti
                from volattack.data.transforms import to_source_units

                hu = to_source_units(adv[0, 0].float().cpu(), self.pre)
                write_nifti(hu, self.out / "adversarial" / f"{cid}_{_slug(lbl)}.nii.gz", affine)
            if self.cfg.save_pred:
                _save_label(adv_pred, affine, self.out / "predictions" / f"{cid}_{_slug(lbl)}.nii.gz")
        if self.cfg.sanity_checks:
            self._reseed(seed)
            record["sanity"]["zero_grad_fraction"] = self._zero_grad_fraction(image, label)
            if self.unbounded is not None:
                self._reseed(seed)
                adv, _ = self._attack(self.unbounded, image, label, seed)
                with torch.no_grad():
                    pred = self.inferer(adv, self.model).argmax(1, keepdim=True)
                record["sanity"]["unbounded_pgd_dice"] = score(pred, label, self.k, spacing)["dice"]
        if panel is not None:
            from volattack.evaluation.figures import triplanar_panel

            try:
                triplanar_panel(
                    image.cpu(), panel[2], clean_pred.cpu(), panel[3], label.cpu(),
                    self.out / "figures" / f"panel_{cid}.png",
                    title=f"{cid}: {panel[1]} (Dice {record['clean']['dice']:.2f} -> {panel[0]:.2f})",
                    unit_scale=self.unit_scale, units=self.pre.units,
                )
                record["figure"] = f"figures/panel_{cid}.png"
            except ImportError as e:  # matplotlib missing
                logger.warning("no figure: %s", e)
        record["seconds"] = time.perf_counter() - t0
        return record


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
) -> dict[str, Any]:
    """Evaluate ``model`` clean and under every attack of ``eval_cfg`` on ``cases``.

    Args:
        model: segmenter mapping ``(1, C, H, W, D)`` to logits ``(1, K, H, W, D)``; with
            ``eval_cfg.defense`` it is evaluated behind the configured input transforms.
        cases: datalist entries ``{"image": path, "label": path}``.
        out_dir: run directory (``config.yaml``, ``results.json``, ``report.md``, ``cases/``).
        eval_cfg: attacks, threat model, sliding-window settings, outputs.
        preprocess: the preprocessing the model was trained with (intensity window -> source-unit
            scale; ``preprocess.units`` names the source unit in the reports).
        num_classes: K, including background.
        seed: base seed; case ``i`` is attacked with seed ``seed + i`` (recorded per case).
        class_names: optional names of classes for the report.
        run_config: the resolved configuration to store as ``config.yaml`` (dataclass or dict).
        model_info: description of the model (checkpoint path, architecture) for the results.
        surrogate: craft the attacks on this model instead (transfer); scored on ``model``.
        surrogate_info: description of the surrogate for the results.
        progress: show a progress bar over cases.

    Returns:
        The results dictionary written to ``results.json`` (on every rank under torchrun).
    """
    from tqdm.auto import tqdm

    import volattack
    from volattack.utils import resolve_device

    from volattack.distributed import setup_distributed

    dist_ctx, device = setup_distributed(resolve_device(eval_cfg.device))
    rank, world = dist_ctx.rank, dist_ctx.world
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cases").mkdir(exist_ok=True)
        if run_config is not None:
            atomic_write_text(out / "config.yaml", dump_yaml(run_config))
    model = model.to(device).eval()
    if surrogate is not None:
        surrogate = surrogate.to(device).eval()
    ev = _Evaluator(model, surrogate, eval_cfg, preprocess, num_classes, seed, out, device)
    key_payload: dict[str, Any] = {
        "attacks": [(lbl, n, kw) for lbl, n, kw in ev.runs], "seed": seed,
        # ``units`` is a label (no effect on any number): runs keep their key when it is added or renamed
        "preprocess": {k: v for k, v in to_dict(preprocess).items() if k != "units"},
        "model": model_info or {}, "surrogate": surrogate_info or {},
        "eval": {k: v for k, v in to_dict(eval_cfg).items()
                 if k in ("threat_model", "patch_size", "patch_overlap", "sw_batch_size", "sw_overlap",
                          "sanity_checks", "sanity_unbounded_steps")},
    }
    if eval_cfg.defense is not None:  # absent without a defence: earlier runs keep their key
        key_payload["defense"] = to_dict(eval_cfg.defense)
    key = _config_key(key_payload)
    cases = list(cases)[: eval_cfg.max_cases] if eval_cfg.max_cases else list(cases)
    mine = [(i, c) for i, c in enumerate(cases) if i % world == rank]
    (out / "cases").mkdir(parents=True, exist_ok=True)
    per_case: dict[int, dict[str, Any]] = {}
    failed: dict[int, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for i, entry in tqdm(mine, desc="evaluate", disable=not progress or rank != 0, unit="case"):
        cid = _case_id(entry, i)
        path = out / "cases" / f"{cid}.json"
        if path.is_file():
            try:
                done = json.loads(path.read_text())
                if done.get("key") == key:
                    per_case[i] = done
                    logger.info("case %s already done, reused", cid)
                    continue
            except json.JSONDecodeError:
                logger.warning("case file %s is unreadable; recomputing", path)
        try:
            per_case[i] = ev.case(entry, i, cid, key)
        except (ValueError, FileNotFoundError, OSError) as e:
            logger.error("case %s failed: %s", cid, e)
            failed[i] = {"case": cid, "image": str(entry.get("image")), "reason": str(e)}
            continue
        atomic_write_json(path, per_case[i])
    seconds = time.perf_counter() - t_start
    if world > 1:
        from volattack.distributed import all_gather_objects

        gathered = all_gather_objects(dist_ctx, (per_case, failed, seconds))
        per_case, failed = {}, {}
        seconds = max(g[2] for g in gathered)
        for pc, fl, _ in gathered:
            per_case.update(pc)
            failed.update(fl)
    records = [per_case[i] for i in sorted(per_case)]
    results = {
        "volattack": volattack.__version__,
        "versions": versions(),
        "seed": seed,
        "threat_model": eval_cfg.threat_model,
        "patch": {"size": ev.patch_size, "overlap": eval_cfg.patch_overlap} if eval_cfg.threat_model == "patch" else None,
        "transfer": {"surrogate": surrogate_info or {}} if surrogate is not None else None,
        "num_classes": num_classes,
        "class_names": {str(k): v for k, v in (class_names or {}).items()},
        "model": model_info or {},
        "attacks": [{"label": lbl, "name": n, "params": kw} for lbl, n, kw in ev.runs],
        "fooling_threshold": eval_cfg.fooling_threshold,
        "world_size": world,
        "cases": records,
        "failed": [failed[i] for i in sorted(failed)],
        "summary": summarize(records, [r[0] for r in ev.runs], eval_cfg.fooling_threshold),
        "timings": {"evaluate_seconds": seconds},
        "intensity_units": preprocess.units,
    }
    if ev.defended is not None:
        assert eval_cfg.defense is not None and ev.adaptive is not None
        results["defense"] = describe_defense(ev.defended)
        results["defense_config"] = to_dict(eval_cfg.defense)
        results["adaptive"] = ev.adaptive.describe()
        results["summary"]["clean_undefended"] = {
            "dice": _nanmean([c["clean_undefended"]["dice"] for c in records if "clean_undefended" in c]),
            "hd95_mm": _nanmean([c["clean_undefended"]["hd95_mm"] for c in records if "clean_undefended" in c]),
        }
    if eval_cfg.sanity_checks:
        from volattack.evaluation.sanity import sanity_checks

        results["sanity"] = sanity_checks(results, eval_cfg.attacks)
    if rank == 0:
        atomic_write_json(out / "results.json", results)
        from volattack.evaluation.report import write_report

        if eval_cfg.figures and records:
            from volattack.evaluation.figures import dice_vs_budget

            try:
                results["budget_figure"] = dice_vs_budget(results, eval_cfg.attacks, out / "figures" / "dice_vs_budget.png")
            except ImportError as e:  # pragma: no cover
                logger.warning("no figure: %s", e)
        write_report(results, out)
    from volattack.distributed import barrier

    barrier(dist_ctx, device)
    return results


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
        if not rows:
            continue
        adv = torch.tensor([r["dice"] for r in rows], dtype=torch.float64)
        absd, reld = dice_drop(clean, adv)
        entry = {
            "clean_dice": _nanmean(clean.tolist()),
            "adv_dice": _nanmean(adv.tolist()),
            "dice_drop": _nanmean(absd.tolist()),
            "dice_drop_rel": _nanmean(reld.tolist()),
            "fooling_rate": float(fooling_rate(clean, adv, threshold)),
            "dice_per_class": [_nanmean([r["dice_per_class"][j] for r in rows]) for j in range(k)],
        }
        for m in ("hd95_mm", "flip_rate", "linf", "rms", "linf_units", "rms_units", "psnr", "ssim", "seconds"):
            if m in rows[0]:
                entry[m] = _nanmean([r[m] for r in rows])
        summary["attacks"][lbl] = entry
    return summary
