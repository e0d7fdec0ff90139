"""Uncertainty of dataset-level numbers: bootstrap intervals over cases and ROG's robust-volume rate.

Every mean an evaluation reports is a mean over a handful of test cases, so it comes with a
percentile-bootstrap 95% interval over cases (Efron and Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 13): the cases are resampled with replacement ``n_boot`` times, the mean
of each resample computed, and the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
percentiles of those means. The difference between two models or two attacks evaluated on the
same cases is bootstrapped *paired* (the same resampled cases for both), which removes the
between-case variance that both share; its interval containing 0 means the data do not
separate the two.

The robust-volume rate follows ROG (Daza et al., "Towards Robust General Medical Image
Segmentation", MICCAI 2021): the fraction of volumes that stay robust under attack, a volume
being robust when its adversarial Dice is at least ``t`` times its clean Dice.

Values are plain per-case numbers (lists, NumPy arrays or CPU tensors); NaN values (a case
without the quantity) are skipped, and every random choice comes from a local, seeded
:class:`numpy.random.Generator`, so intervals are reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["Estimate", "bootstrap_ci", "paired_bootstrap_diff", "robust_volume_indicators", "robust_volume_rate",
           "DEFAULT_N_BOOT", "DEFAULT_LEVEL", "ROBUST_T"]

#: resamples of every interval (percentile bootstrap)
DEFAULT_N_BOOT = 2000
#: coverage of every interval
DEFAULT_LEVEL = 0.95
#: ROG's robustness threshold t (Daza et al. 2021): robust when adversarial Dice >= t x clean Dice
ROBUST_T = 0.5
#: resampled means computed per block (bounds the memory of the index matrix)
_BLOCK = 1 << 22


class Estimate(tuple):
    """``(estimate, lo, hi)``: a point estimate and its bootstrap interval (unpacks as 3 numbers).

    Attributes:
        n: number of cases (pairs) the estimate rests on, NaN values dropped.
        reason: why the interval is NaN (fewer than 2 cases), else ``""``.
    """

    n: int
    reason: str

    def __new__(cls, value: float, lo: float, hi: float, n: int, reason: str = "") -> "Estimate":
        self = super().__new__(cls, (float(value), float(lo), float(hi)))
        self.n, self.reason = int(n), reason
        return self

    @property
    def value(self) -> float:
        return self[0]

    @property
    def lo(self) -> float:
        return self[1]

    @property
    def hi(self) -> float:
        return self[2]

    def excludes_zero(self) -> bool:
        """The interval lies strictly on one side of 0 (``False`` when it is NaN)."""
        return bool(self.lo > 0 or self.hi < 0)


def _as_array(values: Any, name: str) -> np.ndarray:
    """Per-case numbers as a 1-D float64 array (``None`` entries become NaN)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    if not isinstance(values, np.ndarray):
        values = [math.nan if v is None else v for v in values]
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-case numbers, got shape {arr.shape}.")
    return arr


def _check(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}.")


def _percentile_interval(x: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of ``x`` (finite, n >= 2) over ``n_boot`` resamples."""
    rng = np.random.default_rng(seed)
    n = x.size
    per_block = max(1, _BLOCK // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, per_block):  # blocks of resamples, each vectorised over cases
        stop = min(n_boot, start + per_block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | Any, *, n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                 seed: int = 0) -> Estimate:
    """Mean of per-case ``values`` and its percentile-bootstrap interval over cases.

    Args:
        values: per-case numbers ``(N,)``; NaN and ``None`` entries are skipped.
        n_boot: number of resamples (2000: the percentiles move by about 0.1 of the interval
            width between seeds).
        level: coverage (0.95: a 95% interval).
        seed: seed of the resampling generator.

    Returns:
        ``(mean, lo, hi)`` as an :class:`Estimate` (``.n`` cases used). With no finite value the
        mean is NaN; with fewer than 2 the interval is NaN and ``.reason`` says why (one case
        has no spread to resample).

    Raises:
        ValueError: ``n_boot < 1``, ``level`` outside (0, 1) or ``values`` not one-dimensional.
    """
    _check(n_boot, level)
    x = _as_array(values, "values")
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "no case has a value")
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, math.nan, math.nan, 1, "one case: no interval")
    if not np.isfinite(x).all():  # e.g. the PSNR of an unperturbed case
        return Estimate(mean, math.nan, math.nan, x.size, "infinite values: no interval")
    lo, hi = _percentile_interval(x, n_boot, level, seed)
    return Estimate(mean, lo, hi, x.size)


def paired_bootstrap_diff(a: Sequence[float] | Any, b: Sequence[float] | Any, *, n_boot: int = DEFAULT_N_BOOT,
                          level: float = DEFAULT_LEVEL, seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over paired cases and its paired percentile-bootstrap interval.

    The same resampled cases enter both samples (the bootstrap of the per-case differences),
    so what the two share (hard and easy cases) cancels.

    Args:
        a, b: per-case values ``(N,)`` of the same cases in the same order (e.g. the Dice of two
            models, or of two attacks, case by case). A pair with NaN or ``None`` on either side
            is dropped.
        n_boot, level, seed: as in :func:`bootstrap_ci`.

    Returns:
        ``(mean(a - b), lo, hi)`` as an :class:`Estimate` (``.n`` pairs used).

    Raises:
        ValueError: ``a`` and ``b`` differ in length (they are not paired), or as :func:`bootstrap_ci`.
    """
    xa, xb = _as_array(a, "a"), _as_array(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must be paired (same cases, same order), got lengths {xa.size} and {xb.size}.")
    return bootstrap_ci(xa - xb, n_boot=n_boot, level=level, seed=seed)


def robust_volume_indicators(clean: Sequence[float] | Any, adv: Sequence[float] | Any,
                             t: float = ROBUST_T) -> np.ndarray:
    """Per case: 1.0 when robust (``adv >= t * clean``, ROG), 0.0 when not, NaN when not counted.

    Args:
        clean: per-case clean Dice ``(N,)``: each case is compared with *its own* clean Dice
            (ROG's text compares with the clean mean; per case, a hard case whose clean Dice is
            low is not counted robust merely for staying low).
        adv: per-case adversarial Dice ``(N,)``, same cases.
        t: threshold in (0, 1].

    Returns:
        ``(N,)`` float64; NaN where either Dice is NaN or the clean Dice is 0 (nothing to keep).

    Raises:
        ValueError: ``t`` outside (0, 1] or lengths differ.
    """
    if not (0 < t <= 1):
        raise ValueError(f"t must be in (0, 1], got {t!r}.")
    c, a = _as_array(clean, "clean"), _as_array(adv, "adv")
    if c.shape != a.shape:
        raise ValueError(f"clean and adv must hold the same cases, got lengths {c.size} and {a.size}.")
    out = (a >= t * c).astype(np.float64)
    out[np.isnan(c) | np.isnan(a) | (c == 0)] = math.nan
    return out


def robust_volume_rate(clean: Sequence[float] | Any, adv: Sequence[float] | Any, t: float = ROBUST_T) -> float:
    """ROG's robust-volume rate: the fraction of counted cases with ``adv >= t * clean``.

    See :func:`robust_volume_indicators` (per-case clean Dice, cases with clean Dice 0 or NaN
    not counted). NaN when no case is counted.
    """
    ind = robust_volume_indicators(clean, adv, t)
    ind = ind[~np.isnan(ind)]
    return float(ind.mean()) if ind.size else math.nan
