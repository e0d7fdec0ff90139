"""Row passes: evaluations that add rows beside the attacks of every case (natural corruptions,
certified Dice, budget-matched attacks, ...), one module each.

A row pass is a subclass of :class:`RowPass` decorated ``@register_row_pass(name)`` in a new
module of this package (every module here is imported with the package). For each case it
returns ``{row label: Scores}``; the rows are scored through the results schema
(:mod:`volattack.evaluation.columns`), so they appear in the per-case records, the summary,
``report.md`` and ``results.csv`` like an attack's row, with every column that applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from volattack.registry import Registry, import_submodules

if TYPE_CHECKING:  # pragma: no cover
    from volattack.evaluation.cases import CaseData, Outcome
    from volattack.evaluation.config import EvalConfig
    from volattack.evaluation.passes import CasePasses
    from volattack.evaluation.records import Scores

ROW_PASSES: Registry = Registry("row pass")


def register_row_pass(name: str):
    """Class decorator: register a :class:`RowPass` subclass as ``name``."""

    return ROW_PASSES.register_class(name, RowPass)


class RowPass:
    """Rows that one evaluation adds to every case beside its attacks.

    Args:
        passes: the evaluation's shared state (model, inferer, bounds, intensity model, seed,
            device, the ``evaluate`` config); built once per evaluation.
    """

    name: ClassVar[str] = ""

    def __init__(self, passes: "CasePasses") -> None:
        self.passes = passes

    @classmethod
    def enabled(cls, eval_cfg: "EvalConfig") -> bool:
        """Whether the ``evaluate`` section asks for this pass."""
        raise NotImplementedError

    def labels(self) -> list[str]:
        """The labels of the rows this pass adds, in table order (the same for every case)."""
        raise NotImplementedError

    def rows(self, data: "CaseData", index: int, case_seed: int, clean: "Outcome") -> dict[str, "Scores"]:
        """``{label: Scores}`` of case ``index`` (``clean``: the clean prediction's outcome)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the pass did, for ``results.json`` (parameters, recorded draws)."""
        return {"name": self.name}


def enabled_row_passes(passes: "CasePasses") -> list[RowPass]:
    """One instance of every registered pass that the configuration enables (name order)."""
    return [ROW_PASSES.get(n)(passes) for n in ROW_PASSES.names() if ROW_PASSES.get(n).enabled(passes.cfg)]


__all__ = ["ROW_PASSES", "RowPass", "enabled_row_passes", "register_row_pass"]

import_submodules(__name__, __path__)  # every file registers its pass on import
