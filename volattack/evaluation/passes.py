"""The passes of one case: clean prediction, every attack, the gradient-masking checks, the outputs.

:class:`CasePasses` holds what every case of an evaluation shares (the inferer, the attacks,
the defence and its adaptive model, the intensity model) and runs the passes of one case:

- clean: sliding-window prediction of the (defended) model, and of the bare model with a defence;
- attacks: each configured attack under the threat model (``volume``: end to end through the
  same inference that scores it; ``patch``: :func:`~volattack.evaluation.patchwise.attack_patchwise`),
  scored through the results schema; the attack's own ``info`` gives the perturbation sizes
  (norms computed once, by the attack), stitched patch-wise results are measured once;
- sanity: the zero-gradient fraction and unbounded PGD (:mod:`volattack.evaluation.sanity`);
- outputs: adversarial scans in source units, predicted label maps, the triplanar panel.

Random draws are order-free: attack ``a`` on case ``i`` draws from ``seed_from(seed, i)``
(``sample_ids=[i]``), randomised defence transforms and EOT are reseeded from the case seed
``seed + i`` before the clean prediction and before every attack, so a row's numbers depend
neither on the other cases (their order or sharding) nor on the other attacks.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from volattack.data.config import PreprocessConfig
from volattack.evaluation.cases import CaseData, attack_outcome, check_case, clean_outcome, load_case, score
from volattack.evaluation.config import EvalConfig
from volattack.evaluation.records import CaseRecord, SanityRecord
from volattack.inference import make_inferer

logger = logging.getLogger(__name__)


def slug(label: str) -> str:
    """File-name form of an attack label (``pgd(eps=8/255)`` -> ``pgd_eps_8_255``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_")


class CasePasses:
    """What the cases of one evaluation share, and the passes of one case (:meth:`run`).

    Args:
        model: the evaluated segmenter (on ``device``, eval mode).
        surrogate: craft the attacks on this model instead (transfer), or ``None``.
        eval_cfg: the ``evaluate`` section.
        preprocess: the preprocessing the model was trained with.
        intensity: its intensity model (bounds, unit scale, source-unit mapping).
        num_classes: K, background included.
        seed: the run seed.
        out: run directory (outputs are written below it).
        device: where the cases are evaluated.
        class_names: class index -> name (``evaluate.goal`` names classes by them).
    """

    def __init__(self, model: nn.Module, surrogate: Optional[nn.Module], eval_cfg: EvalConfig,
                 preprocess: PreprocessConfig, intensity: Any, num_classes: int, seed: int, out: Path,
                 device: torch.device, class_names: Optional[Mapping[int, str]] = None) -> None:
        from volattack.data.transforms import build_transforms
        from volattack.evaluation.goal_config import bind_goal

        self.cfg, self.pre, self.intensity, self.k, self.seed, self.out, self.device = (
            eval_cfg, preprocess, intensity, num_classes, seed, out, device)
        self.bounds = tuple(float(b) for b in intensity.bounds)
        self.unit_scale = intensity.unit_scale
        self.inferer = make_inferer(preprocess.roi_size, eval_cfg.sw_batch_size, eval_cfg.sw_overlap,
                                    cval=float(intensity.pad_value))
        self.transforms = build_transforms(preprocess, mode="eval")
        self.patch_size = list(eval_cfg.patch_size or preprocess.roi_size)
        self.undefended = model
        self.goal = bind_goal(eval_cfg.goal, class_names, num_classes)  # evaluate.goal by class index
        self.case_goal: Any = None  # the goal on the current case (resolve_goal)
        self.model, self.grad_model = model, model  # scored / differentiated by the zero-gradient check
        self.defended: Optional[nn.Module] = None
        self.adaptive: Optional[nn.Module] = None
        crafting = self._setup_defense(model, surrogate)
        self.runs: list[tuple[str, str, dict[str, Any]]] = [
            (label, spec.name, kw) for spec in eval_cfg.attacks for label, kw in spec.expand()]
        labels = [r[0] for r in self.runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"evaluate.attacks has duplicate entries: {labels}.")
        self.attacks = {lbl: self._create(name, crafting, **kw) for lbl, name, kw in self.runs}
        from volattack.evaluation.rows import enabled_row_passes

        self.row_passes = enabled_row_passes(self)
        extra = [lbl for rp in self.row_passes for lbl in rp.labels()]
        if len(set(labels + extra)) != len(labels) + len(extra):
            raise ValueError(f"evaluate: row labels must be unique, got {labels + extra}.")
        self.unbounded = None
        if eval_cfg.sanity_checks and eval_cfg.sanity_unbounded_steps > 0:
            width = self.bounds[1] - self.bounds[0]
            self.unbounded = self._create("pgd", crafting, eps=width, alpha=width / 8, targeted=False,
                                          steps=eval_cfg.sanity_unbounded_steps, measure_ssim=False)

    def row_labels(self) -> list[str]:
        """Labels of every row of a case beside the clean one: the attacks, then the row passes'."""
        return [r[0] for r in self.runs] + [lbl for rp in self.row_passes for lbl in rp.labels()]

    def _create(self, name: str, model: nn.Module, **kw: Any) -> Any:
        from volattack.attacks import create_attack

        inferer = None if self.cfg.threat_model == "patch" else self.inferer
        if self.goal is not None and self.goal.targeted:
            kw.setdefault("targeted", True)
        return create_attack(name, model, inferer=inferer, bounds=self.bounds, seed=self.seed,
                                       unit_scale=self.unit_scale, **kw)

    def _setup_defense(self, model: nn.Module, surrogate: Optional[nn.Module]) -> nn.Module:
        """Build the defended and adaptive models of ``evaluate.defense``; the model attacks craft on."""
        crafting = surrogate if surrogate is not None else model
        d = self.cfg.defense
        if d is None:
            return crafting
        from volattack.defenses.adaptive import adaptive_wrapper
        from volattack.defenses.registry import build_defense

        self.defended = build_defense(model, d).to(self.device).eval()
        self.adaptive = adaptive_wrapper(self.defended, d.bpda, d.eot_samples, seed=self.seed).eval()
        self.crafting_adaptive = self.adaptive
        if surrogate is not None:  # the attacker knows the defence, not the target's weights
            with warnings.catch_warnings():  # same settings: adaptive_wrapper has warned once above
                warnings.simplefilter("ignore")
                self.crafting_adaptive = adaptive_wrapper(
                    build_defense(surrogate, d).to(self.device).eval(), d.bpda, d.eot_samples, seed=self.seed).eval()
        self.model, self.grad_model = self.defended, self.adaptive
        return self.crafting_adaptive

    def reseed(self, case_seed: int) -> None:
        """Reseed the defence's randomised transforms and the attacker's EOT from the case seed."""
        if self.defended is not None:
            from volattack.defenses.registry import reseed_defense

            reseed_defense(self.defended, [self.adaptive, self.crafting_adaptive], case_seed)

    # ------------------------------------------------------------------ the passes
    def predict(self, x: torch.Tensor, model: Optional[nn.Module] = None) -> torch.Tensor:
        """Sliding-window class map ``(1, 1, H, W, D)`` of ``model`` (default: the evaluated model)."""
        with torch.no_grad():
            return self.inferer(x, self.model if model is None else model).argmax(1, keepdim=True)

    def attack(self, atk: Any, data: CaseData, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adversarial image and ``info`` of one attack on case ``index`` under the threat model."""
        if self.cfg.threat_model == "patch":
            from volattack.evaluation.patchwise import attack_patchwise
            from volattack.ops import seed_from

            return attack_patchwise(atk, data.image, data.label, self.patch_size, self.cfg.patch_overlap,
                                    tile_batch=self.cfg.sw_batch_size, seed=seed_from(self.seed, index))
        goal = self.case_goal.run_kwargs(atk) if self.case_goal is not None and atk is not self.unbounded else {}
        res = atk.run(data.image, data.label, seed=self.seed, sample_ids=[index], **goal)
        return res.adv, res.info

    def resolve_goal(self, outcome: Any, data: CaseData, cid: str, *, bounds: Optional[Sequence[float]] = None,
                     units: Optional[str] = None, to_source: Optional[Callable] = None) -> Any:
        """Set the case's goal (target map, mask: :func:`~volattack.evaluation.goals.resolve_case_goal`)
        and the NSD tolerance on its clean ``outcome``; returns the outcome. ``bounds``, ``units``
        and ``to_source`` (input -> source units) default to the model input's."""
        outcome.nsd_tolerance_mm = self.cfg.nsd_tolerance_mm
        self.case_goal = None
        if self.goal is not None:
            from volattack.evaluation.goals import resolve_case_goal

            if to_source is None and self.unit_scale is not None:
                to_source = self.intensity.to_source
            self.case_goal = resolve_case_goal(
                self.goal, clean_pred=outcome.pred, label=data.label, image=data.image, affine=data.affine,
                spacing=data.spacing, bounds=self.bounds if bounds is None else bounds,
                units=self.pre.units if units is None else units, where=f"case {cid}", to_source=to_source)
            outcome.goal = self.case_goal
        return outcome

    def zero_grad_fraction(self, data: CaseData) -> float:
        """Fraction of input voxels whose Dice-CE gradient is exactly zero (gradient masking check)."""
        from volattack.attacks.base import eval_mode
        from volattack.attacks.objectives import objective_per_sample

        x = data.image.detach().clone().requires_grad_(True)
        with eval_mode(self.grad_model):
            loss = objective_per_sample(self.inferer(x, self.grad_model).float(), data.label, "dice_ce").sum()
            (g,) = torch.autograd.grad(loss * x[0].numel(), x)
        return float((g == 0).float().mean())

    def sanity(self, data: CaseData, index: int, case_seed: int) -> SanityRecord:
        """The per-case inputs of the gradient-masking checks (empty without ``sanity_checks``)."""
        rec = SanityRecord()
        if not self.cfg.sanity_checks:
            return rec
        self.reseed(case_seed)
        rec.zero_grad_fraction = self.zero_grad_fraction(data)
        if self.unbounded is not None:
            self.reseed(case_seed)
            adv, info = self.attack(self.unbounded, data, index)
            rec.unbounded_pgd_dice = clean_outcome(self.predict(adv), data, self.k).dice
        return rec

    def expected_outputs(self, cid: str, adv_suffix: str = ".nii.gz") -> list[str]:
        """Files the configuration asks for case ``cid`` (relative to the run directory);
        adversarial scans end in ``adv_suffix``."""
        files = []
        if self.cfg.save_pred:
            files.append(f"predictions/{cid}_clean.nii.gz")
        for lbl, _, _ in self.runs:
            if self.cfg.save_adv:
                files.append(f"adversarial/{cid}_{slug(lbl)}{adv_suffix}")
            if self.cfg.save_pred:
                files.append(f"predictions/{cid}_{slug(lbl)}.nii.gz")
        return files

    def wants_panel(self, index: int) -> bool:
        """Case ``index`` gets a triplanar panel (figures on, matplotlib installed, an attack to show)."""
        return (self.cfg.figures and index < self.cfg.figure_cases and bool(self.runs)
                and importlib.util.find_spec("matplotlib") is not None)

    def missing_outputs(self, record: CaseRecord, entry: Optional[Mapping[str, Any]] = None) -> list[str]:
        """What a cached case lacks that this configuration asks for (files, its panel); ``entry``
        is the case's datalist entry (passes whose outputs depend on its files use it)."""
        missing = [f for f in self.expected_outputs(record.case) if not (self.out / f).is_file()]
        if self.wants_panel(record.index) and not (record.figure and (self.out / record.figure).is_file()):
            missing.append("its figure panel")
        return missing

    def _write(self, kind: str, cid: str, lbl: str, vol: torch.Tensor, affine: Any) -> str:
        import numpy as np

        from volattack.data.io import write_nifti

        rel = f"{kind}/{cid}_{slug(lbl)}.nii.gz"
        if kind == "adversarial":
            write_nifti(self.intensity.to_source(vol[0, 0].float().cpu()), self.out / rel, affine)
        else:
            write_nifti(vol[0, 0].to(torch.uint8).cpu().numpy(), self.out / rel, affine, dtype=np.uint8)
        return rel

    def panel(self, record: CaseRecord, data: CaseData, clean_pred: torch.Tensor, shown: tuple) -> Optional[str]:
        """Write the triplanar panel of the attack ``shown = (dice, label, adv, adv_pred)``."""
        from volattack.evaluation.figures import triplanar_panel

        cid = record.case
        try:
            triplanar_panel(
                data.image.cpu(), shown[2], clean_pred.cpu(), shown[3], data.label.cpu(),
                self.out / "figures" / f"panel_{cid}.png",
                title=f"{cid}: {shown[1]} (Dice {record.clean['adv_dice']:.2f} -> {shown[0]:.2f})",
                unit_scale=self.unit_scale or 1.0, units=self.pre.units if self.unit_scale else "input units",
            )
        except ImportError as e:  # matplotlib missing
            logger.warning("no figure: %s", e)
            return None
        return f"figures/panel_{cid}.png"

    def run(self, entry: Mapping[str, Any], index: int, cid: str) -> CaseRecord:
        """Every pass of one case (clean, attacks, sanity, outputs) -> its record (without key)."""
        t0 = time.perf_counter()
        data = CaseData(*load_case(entry, self.transforms)).to(self.device)
        check_case(data, entry, self.k, self.pre.roi_size, float(self.intensity.pad_value),
                   self.patch_size if self.cfg.threat_model == "patch" else None)
        case_seed = self.seed + index
        self.reseed(case_seed)
        clean_pred = self.predict(data.image)
        clean = self.resolve_goal(clean_outcome(clean_pred, data, self.k), data, cid)
        record = CaseRecord(case=cid, image=str(entry.get("image")), label=str(entry.get("label")), index=index,
                            seed=case_seed, shape=list(data.image.shape[2:]), spacing_mm=data.spacing,
                            clean=score(clean, clean_row=True))
        if self.defended is not None:
            bare = clean_outcome(self.predict(data.image, self.undefended), data, self.k)
            bare.nsd_tolerance_mm = self.cfg.nsd_tolerance_mm
            record.clean_undefended = score(bare, clean_row=True)
        if self.cfg.save_pred:
            record.outputs.append(self._write("predictions", cid, "clean", clean_pred, data.affine))
        shown: Optional[tuple] = None
        for lbl, _name, _kw in self.runs:
            self.reseed(case_seed)
            adv, info = self.attack(self.attacks[lbl], data, index)
            adv_pred = self.predict(adv)
            scores = score(attack_outcome(adv_pred, adv, info, data, clean, bounds=self.bounds,
                                          unit_scale=self.unit_scale))
            record.attacks[lbl] = scores
            if self.wants_panel(index) and (shown is None or scores["adv_dice"] < shown[0]):
                shown = (scores["adv_dice"], lbl, adv.detach().cpu(), adv_pred.cpu())
            if self.cfg.save_adv:
                record.outputs.append(self._write("adversarial", cid, lbl, adv, data.affine))
            if self.cfg.save_pred:
                record.outputs.append(self._write("predictions", cid, lbl, adv_pred, data.affine))
        for rp in self.row_passes:
            self.reseed(case_seed)
            record.attacks.update(rp.rows(data, index, case_seed, clean))
        record.sanity = self.sanity(data, index, case_seed)
        if shown is not None:
            record.figure = self.panel(record, data, clean_pred, shown)
        record.seconds = time.perf_counter() - t0
        return record
