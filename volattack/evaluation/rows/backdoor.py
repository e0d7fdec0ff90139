"""Backdoor rows (``evaluate.trigger``): per case one row ``trigger(<name>)``, the case's
preprocessed input with the trigger added (:mod:`volattack.threats.triggers`), predicted by the
evaluated model and scored through the results schema.

The row's Dice columns compare the prediction with the ground truth (how much the trigger
changes the segmentation); ``backdoor_success``, ``backdoor_dice`` and ``untouched_dice`` compare
it with the target map of the behaviour (:func:`volattack.threats.backdoor.backdoor_scores`), and
``backdoor_dice_clean_input`` is the backdoor Dice of the clean prediction (a backdoor that is
specific to its trigger keeps it low, a model that fails everywhere does not); the
size columns (L-inf and RMS in model and source units, PSNR, SSIM) are the trigger's
perceptibility on the case. The clean row is the clean Dice on clean cases.

With ``run:`` the trigger, the target and the class names are those recorded in the poisoned
training run's ``poison.json`` (a learned trigger's fitted pattern included), so a backdoored
model is evaluated with the trigger it was poisoned with.
"""

from __future__ import annotations

from typing import Any

from volattack.evaluation.cases import CaseData, attack_outcome, score
from volattack.evaluation.columns import Outcome
from volattack.evaluation.config import EvalConfig
from volattack.evaluation.records import Scores
from volattack.evaluation.rows import RowPass, register_row_pass


def _names(passes: Any, tc: Any, record: Any) -> dict[int, str]:
    """Class names: the run's record, the section's ``class_names``, or the evaluation's."""
    for src in (record.get("class_names") if record else None, tc.class_names, getattr(passes, "class_names", None)):
        if src:
            return {int(k): str(v) for k, v in src.items()}
    raise ValueError("evaluate.trigger.target names classes, but no class names are known: set "
                     "evaluate.trigger.class_names (index -> name) or evaluate.trigger.run.")


@register_row_pass("backdoor")
class BackdoorPass(RowPass):
    """``evaluate.trigger``: the triggered row of every case (see the module docstring)."""

    @classmethod
    def enabled(cls, eval_cfg: EvalConfig) -> bool:
        return getattr(eval_cfg, "trigger", None) is not None

    def __init__(self, passes: Any) -> None:
        from volattack.threats.config import TriggerSpec
        from volattack.threats.poison import build_trigger, read_record, resolve_target

        super().__init__(passes)
        tc = passes.cfg.trigger
        self.record = read_record(tc.run) if tc.run is not None else None
        if self.record is not None:
            t = self.record["trigger"]
            params = {k: v for k, v in t["params"].items() if k != "surrogate"}
            spec = tc.trigger or TriggerSpec(name=t["name"], params=params, seed=int(t["seed"]))
            target = tc.target or self.record["target"]
        else:
            spec, target = tc.trigger, tc.target
        if "surrogate" in spec.params and "pattern" not in spec.params:
            raise ValueError("evaluate.trigger: a learned trigger is evaluated with its fitted pattern "
                             "(trigger.params.pattern, or run: the poisoned training run), not a surrogate.")
        try:
            self.trigger, _ = build_trigger(TriggerSpec(spec.name, {k: v for k, v in spec.params.items()
                                                                    if k != "surrogate"}, spec.seed), passes.intensity)
            self.resolved = resolve_target(target, _names(passes, tc, self.record))
        except ValueError as e:
            raise ValueError(f"evaluate.trigger: {e}") from None
        self.spec, self.target, self.threshold = spec, target, float(tc.threshold)

    def labels(self) -> list[str]:
        return [f"trigger({self.spec.name})"]

    def rows(self, data: CaseData, index: int, case_seed: int, clean: Outcome) -> dict[str, Scores]:
        from volattack.threats.backdoor import backdoor_scores
        from volattack.threats.poison import target_map

        p = self.passes
        try:
            self.trigger.check_fits(data.image.shape[2:], data.affine)
        except ValueError as e:
            raise ValueError(f"evaluate.trigger: case {index}: {e}") from None
        x_t = self.trigger.apply(data.image, data.affine)
        pred = p.predict(x_t)
        tmap = target_map(data.label, self.resolved, self.trigger.mask(data.image, data.affine))
        info = backdoor_scores(pred, data.label, tmap, self.resolved, p.k, self.threshold)
        # the same measure on the clean input: what the model does without the trigger (specificity)
        info["backdoor_dice_clean_input"] = backdoor_scores(clean.pred, data.label, tmap, self.resolved, p.k,
                                                            self.threshold)["backdoor_dice"]
        out = attack_outcome(pred, x_t, info, data, clean, bounds=p.bounds, unit_scale=p.unit_scale)
        return {self.labels()[0]: score(out)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "trigger": self.trigger.describe(), "target": self.target,
                "target_indices": {k: v for k, v in self.resolved.items()}, "threshold": self.threshold,
                "run": self.passes.cfg.trigger.run}


__all__ = ["BackdoorPass"]
