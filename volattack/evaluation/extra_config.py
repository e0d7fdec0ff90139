"""Configuration of two row passes of an evaluation (light: no torch, no TorchIO import).

- :class:`CorruptionConfig` (``evaluate.corruptions``): natural corruptions through TorchIO at
  fixed severities (:mod:`volattack.evaluation.rows.corruptions`).
- :class:`MatchConfig` (``evaluate.match``): every configured attack calibrated to equal measured
  budgets (:mod:`volattack.evaluation.rows.matching`).

Both are validated when the config is loaded, so a bad name or value fails before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from volattack.checks import check_number, parse_number
from volattack.registry import suggest

#: corruption names of ``evaluate.corruptions.names`` -> the TorchIO transform each one uses
#: (the parameters per severity are in :data:`volattack.evaluation.rows.corruptions.SEVERITY_TABLE`)
CORRUPTIONS: dict[str, str] = {
    "motion": "Motion (RandomMotion with fixed movements)",
    "ghosting": "Ghosting (RandomGhosting with fixed ghosts)",
    "spike": "Spike (RandomSpike with a fixed k-space position)",
    "bias_field": "BiasField (RandomBiasField with seeded, recorded coefficients)",
    "noise": "Noise (RandomNoise with a fixed std and a recorded seed)",
    "blur": "Blur (RandomBlur with a fixed std)",
    "anisotropy": "Resample down and back (RandomAnisotropy with a fixed axis and factor)",
}

#: severities a corruption can have (ROOD-MRI and ImageNet-C use five)
SEVERITIES = (1, 2, 3, 4, 5)

#: budget measures of ``evaluate.match.measure``: RMS or L-inf change in source units (HU for CT),
#: or 3D SSIM between the clean and the attacked input
MATCH_MEASURES = ("rms_hu", "linf_hu", "ssim")
MATCH_PER = ("case", "dataset")


def suggest_corruption(name: str) -> str:
    """A ``" Did you mean 'x'?"`` hint for ``name``, also for TorchIO's class names
    (``RandomBiasField`` -> ``bias_field``); ``''`` if nothing is close."""
    plain = {n.replace("_", ""): n for n in CORRUPTIONS}
    key = name.lower().replace("_", "")
    key = key[len("random"):] if key.startswith("random") else key
    hint = suggest(key, plain)  # names the closest key of ``plain``
    for k, n in plain.items():
        if f"'{k}'" in hint:
            return f" Did you mean '{n}'?"
    return suggest(name, CORRUPTIONS)


@dataclass
class CorruptionConfig:
    """``evaluate.corruptions``: natural corruptions beside the attacks.

    Attributes:
        names: corruptions of :data:`CORRUPTIONS` (default: all seven, in that order).
        severities: severities in 1..5 (default all five); each gives a row ``<name> s<k>``.
        seed: seed of the recorded random choices (the bias-field coefficient pattern, the
            noise realisation of each case: ``seed_from(seed, case index)``).
    """

    names: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.names, str):
            self.names = [self.names]
        if not isinstance(self.names, list) or not self.names:
            raise ValueError(f"corruptions.names must be a non-empty list, got {self.names!r}.")
        for n in self.names:
            if n not in CORRUPTIONS:
                raise ValueError(f"corruptions.names: unknown corruption {n!r}; choose from "
                                 f"{sorted(CORRUPTIONS)}.{suggest_corruption(str(n))}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"corruptions.names has duplicates, got {self.names!r}.")
        if not isinstance(self.severities, list) or not self.severities:
            raise ValueError(f"corruptions.severities must be a non-empty list, got {self.severities!r}.")
        for s in self.severities:
            if isinstance(s, bool) or s not in SEVERITIES:
                raise ValueError(f"corruptions.severities must hold integers in 1..5, got {s!r}.")
        if len(set(self.severities)) != len(self.severities):
            raise ValueError(f"corruptions.severities has duplicates, got {self.severities!r}.")
        self.severities = sorted(int(s) for s in self.severities)
        check_number("corruptions.seed", self.seed, low=0, integer=True)


@dataclass
class MatchConfig:
    """``evaluate.match``: every configured attack at equal measured budgets.

    Attributes:
        measure: ``rms_hu`` / ``linf_hu`` (RMS / L-inf change in source units; needs an intensity
            model with source units) or ``ssim`` (3D SSIM to the clean input; targets in (0, 1)).
        target: the budgets to match, e.g. ``[2, 4, 8]`` HU; each gives a row ``<attack> @ <measure>=<t>``.
        per: ``case``: each case gets its own calibrated parameter; ``dataset``: one parameter per
            attack and target, calibrated on the mean measured budget over the evaluated cases.
        tolerance: relative: a run is matched when its size m satisfies ``|m - t| <= tolerance * t``,
            where the size is the measure for ``rms_hu``/``linf_hu`` and ``1 - SSIM`` for ``ssim``
            (t likewise ``1 - target``).
        max_runs: attack runs at most per attack and case (all targets share them), >= 3.
    """

    measure: str = "rms_hu"
    target: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    per: str = "case"
    tolerance: float = 0.05
    max_runs: int = 12

    def __post_init__(self) -> None:
        if self.measure not in MATCH_MEASURES:
            raise ValueError(f"match.measure must be one of {MATCH_MEASURES}, got {self.measure!r}."
                             f"{suggest(str(self.measure), MATCH_MEASURES)}")
        if self.per not in MATCH_PER:
            raise ValueError(f"match.per must be one of {MATCH_PER}, got {self.per!r}.")
        targets: Any = self.target if isinstance(self.target, list) else [self.target]
        if not targets:
            raise ValueError("match.target must be a non-empty list of budgets, got [].")
        self.target = [float(parse_number(t, "match.target")) for t in targets]
        for t in self.target:
            if self.measure == "ssim":
                check_number("match.target", t, low=0, high=1, low_open=True, high_open=True)
            else:
                check_number("match.target", t, low=0, low_open=True)
        if len(set(self.target)) != len(self.target):
            raise ValueError(f"match.target has duplicates, got {self.target!r}.")
        check_number("match.tolerance", self.tolerance, low=0, high=1, low_open=True, high_open=True)
        check_number("match.max_runs", self.max_runs, low=3, integer=True)

    def size(self, value: float) -> float:
        """The increasing size of a measured budget: the value, or ``1 - SSIM`` for ``ssim``."""
        return 1.0 - value if self.measure == "ssim" else value


__all__ = ["CORRUPTIONS", "CorruptionConfig", "MATCH_MEASURES", "MATCH_PER", "MatchConfig", "SEVERITIES",
           "suggest_corruption"]
