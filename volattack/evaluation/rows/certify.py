"""Certified Dice rows (``evaluate.certify``): per case and noise level ``sigma``, a row
``certified(sigma=s)`` whose Dice columns score the certified map of
:func:`volattack.defenses.smoothing.certify` (SegCertify, Fischer, Baader & Vechev, ICML 2021),
abstentions counted as errors (``evaluate.certify.abstain``).

The row's ``info`` (case records and the summary of ``results.json``) holds the certified L2
radius in input and source units, its RMS equivalent ``R / sqrt(voxels)`` (over a whole volume
this is tiny, far below any attack's RMS), the abstention rate, the inference passes spent
(``n0 + n``) and the parameters. The noise of case ``i`` is drawn from
``seed_from(seed, i, sigma index)``, so a row depends neither on the other cases nor on the
other rows. Perturbation-size columns are empty: no perturbed image exists.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

from volattack.evaluation.cases import CaseData, score
from volattack.evaluation.columns import Outcome
from volattack.evaluation.config import EvalConfig, format_number
from volattack.evaluation.records import Scores
from volattack.evaluation.rows import RowPass, register_row_pass


class CertifiedOutcome(Outcome):
    """An :class:`~volattack.evaluation.columns.Outcome` whose prediction is a certified map with
    abstentions (``-1``): Dice through :func:`~volattack.defenses.smoothing.certified_dice_per_class`,
    HD95 with abstained voxels in no class, the flip rate counting an abstention as a change.

    Args:
        pred: certified map ``(1, 1, H, W, D)`` with ``-1`` where abstained.
        abstain: ``"miss"`` or ``"worst"`` (see ``certified_dice_per_class``).
        **kwargs: those of ``Outcome`` (``label``, ``num_classes``, ``spacing``, ``clean``, ``info``).
    """

    def __init__(self, pred: Any, *args: Any, abstain: str = "miss", **kwargs: Any) -> None:
        super().__init__(pred, *args, **kwargs)
        self.abstain = abstain

    @cached_property
    def dice_per_class(self) -> list[float]:
        from volattack.defenses.smoothing import certified_dice_per_class

        return [float(v) for v in certified_dice_per_class(self.pred, self.label, self.num_classes,
                                                           self.abstain)[0].tolist()]

    @cached_property
    def dice(self) -> float:
        vals = [v for v in self.dice_per_class if v == v]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    @cached_property
    def hd95_per_class(self) -> list[float]:
        import torch

        from volattack.metrics import hd95

        k = self.num_classes
        pred = torch.where(self.pred < 0, torch.full_like(self.pred, k), self.pred)
        return [float(v) for v in hd95(pred, self.label, k + 1, spacing=self.spacing)[0, : k - 1].tolist()]


@register_row_pass("certify")
class CertifyPass(RowPass):
    """``evaluate.certify``: one certified row per noise level (see the module docstring)."""

    @classmethod
    def enabled(cls, eval_cfg: EvalConfig) -> bool:
        return getattr(eval_cfg, "certify", None) is not None

    @property
    def settings(self) -> Any:
        return self.passes.cfg.certify

    def labels(self) -> list[str]:
        return [f"certified(sigma={format_number(s, 'sigma')})" for s in self.settings.sigma]

    def rows(self, data: CaseData, index: int, case_seed: int, clean: Outcome) -> dict[str, Scores]:
        from volattack.defenses.smoothing import certify
        from volattack.ops import seed_from

        p, c = self.passes, self.settings
        out: dict[str, Scores] = {}
        for j, (label, sigma) in enumerate(zip(self.labels(), c.sigma)):
            t0 = time.perf_counter()
            res = certify(p.model, data.image, sigma, c.n0, c.n, c.alpha, c.tau, inferer=p.inferer, batch=c.batch,
                          seed=seed_from(p.seed, index, j), num_classes=p.k, unit_scale=p.unit_scale,
                          bounds=p.bounds)
            info = dict(res.info(), seconds=time.perf_counter() - t0)
            outcome = CertifiedOutcome(res.labels, data.label, p.k, data.spacing, clean=clean, info=info,
                                       bounds=p.bounds, unit_scale=p.unit_scale, abstain=c.abstain)
            out[label] = score(outcome)
        return out

    def describe(self) -> dict[str, Any]:
        c = self.settings
        return {"name": self.name, "sigma": list(c.sigma), "n0": c.n0, "n": c.n, "alpha": c.alpha, "tau": c.tau,
                "batch": c.batch, "abstain": c.abstain,
                "method": "SegCertify (Fischer, Baader & Vechev, ICML 2021): Holm-corrected binomial tests per voxel"}


__all__ = ["CertifiedOutcome", "CertifyPass"]
