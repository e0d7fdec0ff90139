"""Certified segmentation by randomized smoothing, for volumes (SegCertify: Fischer, Baader &
Vechev, "Scalable Certified Segmentation via Randomized Smoothing", ICML 2021).

The smoothed segmenter predicts at voxel ``v`` the class most likely under Gaussian noise,
``g(x)_v = argmax_c P(f(x + e)_v = c)``, ``e ~ N(0, sigma^2 I)``. If ``P(f(x + e)_v = c) > tau``
then ``g(x + d)_v = c`` for every ``||d||_2 <= R = sigma * Phi^-1(tau)`` (Cohen, Rosenfeld &
Kolter, ICML 2019, applied voxel by voxel). :func:`certify` estimates this with ``n0 + n``
noisy copies of the input pushed through the same (sliding-window) inference as the
evaluation:

1. per voxel the most frequent class ``c`` among the first ``n0`` copies (selection);
2. its count ``k`` among ``n`` further copies (estimation);
3. the one-sided binomial test of ``H0: p_c <= tau`` with p-value ``P(X >= k)``,
   ``X ~ Binomial(n, tau)`` (:func:`binomial_pvalues`);
4. Holm-Bonferroni over all the voxels of an image (:func:`holm_reject`), so that with
   probability at least ``1 - alpha`` no certified voxel is wrong about ``g``;
5. abstention (label ``-1``) where ``H0`` is not rejected.

The radius is an L2 norm over the *whole input* (every voxel at once). Spread evenly over a
volume of ``N`` voxels it is an RMS perturbation of only ``R / sqrt(N)``: e.g. ``R = 0.08`` over
a 96^3 volume is an RMS of 8.5e-5 input units (0.04 HU on the [-175, 250] HU window), far below
the empirical attacks' budgets. :class:`CertifyResult` reports both.

:func:`certified_dice` scores a certified map (abstentions counted as errors, see there);
:func:`smoothed_predict` is the smoothed segmenter's hard prediction without abstention and
:class:`SmoothedModel` its differentiable (softmax-averaged) form for EOT attacks of the smoothed
model (Salman et al., NeurIPS 2019).

Randomness: one local ``torch.Generator`` on the input's device, seeded with ``seed``; copy ``j``
draws its noise as the ``j``-th call of that generator, so the result does not depend on
``batch``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from volattack.defenses.config import ABSTAIN_RULES, check_certify_params
from volattack.ops import first_head

logger = logging.getLogger(__name__)

#: label of an abstained voxel
ABSTAIN = -1

Inferer = Callable[[torch.Tensor, nn.Module], torch.Tensor]


@dataclass
class CertifyResult:
    """What :func:`certify` returns.

    Attributes:
        labels: ``(B, 1, *spatial)`` long: the certified class of every voxel, ``-1`` where the
            test abstained.
        radius: certified L2 radius ``R = sigma * Phi^-1(tau)`` in model-input units (over the
            whole input of one image).
        radius_units: ``R`` in source units (``R * unit_scale``; ``None`` without a unit scale).
        radius_rms: the RMS equivalent ``R / sqrt(N)``, ``N`` the elements of one input
            ``C * H * W * D``: the RMS of a perturbation of L2 norm ``R`` spread evenly.
        radius_rms_units: ``radius_rms`` in source units (``None`` without a unit scale).
        abstain_rate: per image, the fraction of voxels that abstained, ``(B,)`` floats.
        passes: inference passes per image (``n0 + n``: every noisy copy is one full pass).
        sigma, n0, n, alpha, tau: the parameters used.
    """

    labels: torch.Tensor
    radius: float
    radius_units: Optional[float]
    radius_rms: float
    radius_rms_units: Optional[float]
    abstain_rate: list[float]
    passes: int
    sigma: float
    n0: int
    n: int
    alpha: float
    tau: float

    def info(self) -> dict[str, Any]:
        """The scalars of the result (image 0's abstention rate) for records and reports."""
        return {"certified_radius": self.radius, "certified_radius_units": self.radius_units,
                "certified_radius_rms": self.radius_rms, "certified_radius_rms_units": self.radius_rms_units,
                "abstain_rate": self.abstain_rate[0], "passes": self.passes, "sigma": self.sigma,
                "n0": self.n0, "n": self.n, "alpha": self.alpha, "tau": self.tau}


# ---------------------------------------------------------------------- statistics
def binomial_pvalues(counts: Any, n: int, tau: float) -> torch.Tensor:
    """One-sided binomial p-values ``P(X >= k)``, ``X ~ Binomial(n, tau)``, of ``H0: p <= tau``.

    The p-value depends on the count only, so it is looked up in the table of
    ``scipy.stats.binom.sf(k - 1, n, tau)`` for ``k = 0 .. n`` (one vectorised scipy call),
    indexed by the counts on their own device: exact, and no per-voxel work on the host.

    Args:
        counts: successes ``k`` in ``[0, n]``, any shape (tensor or array-like of ints).
        n: trials (>= 1).
        tau: the null probability, in (0, 1).

    Returns:
        float64 tensor of ``counts``' shape (and device), values in [0, 1].
    """
    from scipy.stats import binom

    k = torch.as_tensor(counts)
    if k.is_floating_point() or k.is_complex():
        raise ValueError(f"counts must be integers, got dtype {k.dtype}.")
    if k.numel() and (int(k.min()) < 0 or int(k.max()) > n):
        raise ValueError(f"counts must be in [0, n={n}], got values in [{int(k.min())}, {int(k.max())}].")
    table = torch.as_tensor(binom.sf(np.arange(n + 1) - 1, n, tau), dtype=torch.float64, device=k.device)
    return table[k.long()]


def holm_reject(pvalues: torch.Tensor, alpha: float) -> torch.Tensor:
    """Holm-Bonferroni step-down decisions (Holm, Scand. J. Statistics 1979), per row.

    Within each row of ``m`` p-values sorted ascending, the ``i``-th smallest (1-based) is
    compared with ``alpha / (m - i + 1)``; hypotheses are rejected in that order up to the
    first comparison that fails (it and every larger p-value are kept). The family-wise error
    rate of each row is at most ``alpha``. Vectorised: one sort, one cumulative product.

    Args:
        pvalues: ``(R, m)`` (or ``(m,)``) p-values; each row is one family.
        alpha: family-wise error rate, in (0, 1).

    Returns:
        bool tensor of ``pvalues``' shape: True where the null hypothesis is rejected.
    """
    p = torch.as_tensor(pvalues, dtype=torch.float64)
    flat = p.reshape(1, -1) if p.ndim == 1 else p
    m = flat.shape[-1]
    ps, order = torch.sort(flat, dim=-1, stable=True)
    thr = alpha / (m - torch.arange(m, dtype=torch.float64, device=p.device))
    passed = torch.cumprod((ps <= thr).to(torch.uint8), dim=-1).bool()
    reject = torch.zeros_like(passed).scatter_(-1, order, passed)
    return reject.reshape(p.shape)


def certified_radius(sigma: float, tau: float) -> float:
    """``sigma * Phi^-1(tau)``: the L2 radius (input units) certified at probability ``tau``."""
    return float(sigma) * NormalDist().inv_cdf(float(tau))


# ---------------------------------------------------------------------- noisy votes
def _logits(model: nn.Module, x: torch.Tensor, inferer: Optional[Inferer]) -> torch.Tensor:
    return first_head(model(x)) if inferer is None else inferer(x, model)


def _noisy_labels(model: nn.Module, x: torch.Tensor, sigma: float, m: int, gen: torch.Generator,
                  inferer: Optional[Inferer], bounds: Optional[tuple[float, float]]) -> tuple[torch.Tensor, int]:
    """Predicted classes of ``m`` noisy copies, ``(m, B, V)`` long (``V`` voxels per image), and K.

    Copy ``j`` is ``clamp(x + sigma * e_j)`` with ``e_j`` the next ``randn`` draw of ``gen``."""
    noise = torch.stack([torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) for _ in range(m)])
    xs = x.unsqueeze(0) + sigma * noise
    if bounds is not None:
        xs = xs.clamp(bounds[0], bounds[1])
    out = _logits(model, xs.reshape((m * x.shape[0],) + tuple(x.shape[1:])), inferer)
    return out.argmax(1).reshape(m, x.shape[0], -1), int(out.shape[1])


def _batches(total: int, batch: int) -> list[int]:
    return [min(batch, total - s) for s in range(0, total, batch)]


def _class_counts(model: nn.Module, x: torch.Tensor, sigma: float, count: int, batch: int, gen: torch.Generator,
                  inferer: Optional[Inferer], bounds: Optional[tuple[float, float]],
                  num_classes: Optional[int]) -> torch.Tensor:
    """Votes of ``count`` noisy copies for every class: ``(B, K, V)`` int32, accumulated as one-hot
    sums (one ``scatter_add_`` per batch of copies)."""
    counts: Optional[torch.Tensor] = None
    for m in _batches(count, batch):
        pred, k = _noisy_labels(model, x, sigma, m, gen, inferer, bounds)
        b, v = pred.shape[1], pred.shape[2]
        if counts is None:
            if num_classes is not None and num_classes != k:
                raise ValueError(f"num_classes={num_classes} but the model returns {k} channels.")
            counts = torch.zeros((b, k, v), dtype=torch.int32, device=x.device)
        idx = (pred * v + torch.arange(v, device=x.device)).permute(1, 0, 2).reshape(b, m * v)
        counts.view(b, k * v).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int32))
    assert counts is not None
    return counts


def _selected_counts(model: nn.Module, x: torch.Tensor, sigma: float, count: int, batch: int,
                     gen: torch.Generator, inferer: Optional[Inferer], bounds: Optional[tuple[float, float]],
                     selected: torch.Tensor) -> torch.Tensor:
    """Votes of ``count`` noisy copies for the class ``selected`` ``(B, V)`` of each voxel: ``(B, V)`` int32."""
    hits = torch.zeros(selected.shape, dtype=torch.int32, device=x.device)
    for m in _batches(count, batch):
        pred, _ = _noisy_labels(model, x, sigma, m, gen, inferer, bounds)
        hits += (pred == selected.unsqueeze(0)).sum(0, dtype=torch.int32)
    return hits


def _check_image(image: Any) -> torch.Tensor:
    if not torch.is_tensor(image):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}.")
    if image.ndim < 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float (B, C, *spatial) tensor, got shape {tuple(image.shape)} "
                         f"and dtype {image.dtype}.")
    return image.detach()


def _check_bounds(bounds: Optional[Sequence[float]]) -> Optional[tuple[float, float]]:
    if bounds is None:
        return None
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with lo < hi, got {tuple(bounds)!r}.")
    return lo, hi


def _generator(seed: int, device: torch.device) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


# ---------------------------------------------------------------------- public API
def certify(model: nn.Module, image: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, tau: float, *,
            inferer: Optional[Inferer] = None, batch: int = 8, seed: int = 0, num_classes: Optional[int] = None,
            unit_scale: Optional[float] = None, bounds: Optional[Sequence[float]] = None) -> CertifyResult:
    """Certify every voxel of ``image`` by randomized smoothing (SegCertify, Fischer et al., ICML 2021).

    See the module docstring for the procedure. Every image of the batch is its own Holm family.
    The base classifier is ``f(clamp(x + e))`` when ``bounds`` are given (what noise-augmented
    training shows the model; clamping is part of the base classifier, so the guarantee holds).

    Args:
        model: segmenter mapping ``(N, C, *spatial)`` to logits ``(N, K, *spatial)``; run in eval
            mode and without gradients (its modes are restored).
        image: ``(B, C, *spatial)`` float in model-input units.
        sigma: noise standard deviation in input units (> 0).
        n0: selection samples (>= 1). n: estimation samples (>= 1).
        alpha: family-wise error rate over the voxels of an image, in (0, 1).
        tau: probability threshold, in (0.5, 1).
        inferer: ``inferer(images, model) -> logits`` (e.g. ``volattack.inference.make_inferer``'s
            sliding window), ``None``: ``model(images)``.
        batch: noisy copies per inference call (>= 1; results do not depend on it).
        seed: seed of the noise generator (>= 0).
        num_classes: K, checked against the model's output (``None``: taken from it).
        unit_scale: source units per input unit (e.g. 425 HU), for the radius in source units.
        bounds: ``(lo, hi)`` to clamp noisy inputs into (``None``: no clamping).

    Returns:
        :class:`CertifyResult` (labels ``(B, 1, *spatial)`` with ``-1`` where abstained).

    Raises:
        ValueError: ``sigma <= 0``, ``tau`` outside (0.5, 1), ``n0`` or ``n`` < 1, ``alpha`` outside
            (0, 1), ``batch`` < 1, a bad seed, image or bounds; before any inference.
    """
    from volattack.attacks.base import eval_mode

    check_certify_params(sigma, n0, n, alpha, tau, batch)
    if unit_scale is not None and not (isinstance(unit_scale, (int, float)) and unit_scale > 0):
        raise ValueError(f"unit_scale must be a number > 0 or None, got {unit_scale!r}.")
    x = _check_image(image)
    lims = _check_bounds(bounds)
    gen = _generator(seed, x.device)
    with torch.no_grad(), eval_mode(model):
        counts0 = _class_counts(model, x, sigma, n0, batch, gen, inferer, lims, num_classes)
        selected = counts0.argmax(1)  # (B, V); ties -> the lowest class index
        del counts0
        hits = _selected_counts(model, x, sigma, n, batch, gen, inferer, lims, selected)
    certified = holm_reject(binomial_pvalues(hits, n, tau), alpha)
    labels = torch.where(certified, selected, torch.full_like(selected, ABSTAIN))
    labels = labels.reshape((x.shape[0], 1) + tuple(x.shape[2:]))
    r = certified_radius(sigma, tau)
    r_rms = r / math.sqrt(x[0].numel())
    rate = (~certified).double().mean(1).tolist()
    logger.info("certify: sigma %g, R %.4g (RMS %.3g), abstained %s of the voxels, %d passes", sigma, r, r_rms,
                ", ".join(f"{a:.3f}" for a in rate), n0 + n)
    return CertifyResult(
        labels=labels, radius=r, radius_units=None if unit_scale is None else r * unit_scale, radius_rms=r_rms,
        radius_rms_units=None if unit_scale is None else r_rms * unit_scale, abstain_rate=rate, passes=n0 + n,
        sigma=float(sigma), n0=int(n0), n=int(n), alpha=float(alpha), tau=float(tau))


def smoothed_predict(model: nn.Module, image: torch.Tensor, sigma: float, n: int, *,
                     inferer: Optional[Inferer] = None, batch: int = 8, seed: int = 0,
                     num_classes: Optional[int] = None, bounds: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The smoothed segmenter's prediction without abstention: per voxel the majority class of ``n``
    noisy copies (Monte-Carlo estimate of ``argmax_c P(f(x + e)_v = c)``; ties -> lowest class).

    Args:
        model, image, sigma, inferer, batch, seed, num_classes, bounds: as in :func:`certify`.
        n: noisy copies (>= 1).

    Returns:
        ``(B, 1, *spatial)`` long class map.
    """
    from volattack.attacks.base import eval_mode

    check_certify_params(sigma, 1, n, 0.5, 0.75, batch)
    x = _check_image(image)
    gen = _generator(seed, x.device)
    with torch.no_grad(), eval_mode(model):
        counts = _class_counts(model, x, sigma, n, batch, gen, inferer, _check_bounds(bounds), num_classes)
    return counts.argmax(1).reshape((x.shape[0], 1) + tuple(x.shape[2:]))


def certified_dice_per_class(labels: torch.Tensor, gt: torch.Tensor, num_classes: int,
                             abstain: str = "miss") -> torch.Tensor:
    """Dice of every foreground class of a certified map, abstentions counted as errors.

    volattack.metrics' Dice rule (``2|P n G| / (|P| + |G|)``, NaN for a class absent from both,
    see :func:`volattack.metrics.dice_per_class`), with abstained voxels (label ``-1``) entering as:

    - ``"miss"``: a false negative of their true class (they are in ``G`` of that class, in no
      ``P``); a false positive of no class. Abstaining on true background costs nothing, as
      background is not scored.
    - ``"worst"``: in addition, a false positive of every foreground class other than their true
      one (in ``P`` of each). Each class's Dice is then at most its Dice under any labelling of the
      abstained voxels, so the mean is a lower bound on the Dice of the smoothed segmenter under
      any perturbation within the certified radius (with probability >= 1 - alpha).

    Args:
        labels: certified map ``(B, 1, *spatial)`` with values in ``{-1, 0 .. K-1}``.
        gt: ground truth, same shape, values in ``[0, K)``.
        num_classes: K, background included (>= 2).
        abstain: ``"miss"`` or ``"worst"``.

    Returns:
        ``(B, K - 1)`` float32, NaN for classes absent from both.
    """
    from volattack.checks import check_choice
    from volattack.metrics import dice_per_class

    check_choice("abstain", abstain, ABSTAIN_RULES)
    if not torch.is_tensor(labels) or labels.shape != getattr(gt, "shape", None):
        raise ValueError(f"labels and gt must be tensors of one shape, got {getattr(labels, 'shape', labels)} "
                         f"and {getattr(gt, 'shape', gt)}.")
    if labels.numel() and int(labels.min()) < ABSTAIN:
        raise ValueError(f"labels must be -1 (abstain) or class indices, got min {int(labels.min())}.")
    k = int(num_classes)
    abst = labels == ABSTAIN
    pred = torch.where(abst, torch.full_like(labels, k), labels)  # an extra class K that no class matches
    dice = dice_per_class(pred, gt, k + 1)[:, : k - 1].double()
    if abstain == "miss":
        return dice.float()
    b = labels.shape[0]
    off = (torch.arange(b, device=labels.device) * (k + 1)).view(b, 1)
    p, g, a = (pred.reshape(b, -1) + off), (gt.reshape(b, -1).long() + off), abst.reshape(b, -1)

    def per_class(idx: torch.Tensor) -> torch.Tensor:  # (b, K + 1) voxel counts
        return torch.bincount(idx, minlength=b * (k + 1)).view(b, k + 1).double()

    inter, p_size, g_size = per_class(g[p == g]), per_class(p.flatten()), per_class(g.flatten())
    abst_of = per_class(g[a])  # abstained voxels by true class
    # per foreground class c: |P n G| and |G| unchanged; |P| grows by the abstained voxels of other classes
    p_size = p_size + a.sum(1, keepdim=True).double() - abst_of
    inter, p_size, g_size = inter[:, 1:k], p_size[:, 1:k], g_size[:, 1:k]
    denom = p_size + g_size
    out = torch.where(denom == 0, torch.full_like(denom, float("nan")), 2 * inter / denom.clamp_min(1))
    return out.float()


def certified_dice(labels: torch.Tensor, gt: torch.Tensor, num_classes: int, abstain: str = "miss") -> torch.Tensor:
    """Mean foreground Dice of a certified map (see :func:`certified_dice_per_class` for how
    abstained voxels count): the mean over the non-NaN classes, ``(B,)`` float32."""
    return torch.nanmean(certified_dice_per_class(labels, gt, num_classes, abstain), dim=1)


class SmoothedModel(nn.Module):
    """The smoothed segmenter's soft form, for attacking it with EOT (Salman et al., NeurIPS 2019):
    ``log((1 / S) sum_s softmax(f(clamp(x + sigma e_s))))``, ``e_s`` fresh draws of a local generator.

    Its argmax is the softmax-averaged smoothed prediction, and its gradient the mean over the S
    draws (Expectation over Transformation, Athalye et al., ICML 2018). Noise is added to the whole
    input before ``inferer`` (when given), so overlapping windows see the same noisy volume.

    Args:
        model: the base segmenter. sigma: noise std in input units (> 0).
        samples: draws S per forward pass (>= 1). seed: generator seed (>= 0; :meth:`reset` replays).
        inferer: ``inferer(images, model) -> logits`` (``None``: ``model(images)``).
        bounds: ``(lo, hi)`` clamp of the noisy input (``None``: none).

    Shape:
        ``(B, C, *spatial)`` -> log-probabilities ``(B, K, *spatial)``.
    """

    def __init__(self, model: nn.Module, sigma: float, samples: int = 8, seed: int = 0, *,
                 inferer: Optional[Inferer] = None, bounds: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        from volattack.checks import check_number

        check_certify_params(sigma, 1, 1, 0.5, 0.75)
        check_number("samples", samples, low=1, integer=True)
        self.model, self.sigma, self.samples, self.seed = model, float(sigma), int(samples), int(seed)
        self.inferer, self.bounds = inferer, _check_bounds(bounds)
        self._gens: dict[str, torch.Generator] = {}

    def reset(self) -> None:
        """Restart every generator's draws from ``seed``."""
        for g in self._gens.values():
            g.manual_seed(self.seed)

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = _generator(self.seed, device)
        return self._gens[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gen = self._gen(x.device)
        total: Optional[torch.Tensor] = None
        for _ in range(self.samples):
            xn = x + self.sigma * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            if self.bounds is not None:
                xn = xn.clamp(self.bounds[0], self.bounds[1])
            p = _logits(self.model, xn, self.inferer).float().softmax(1)
            total = p if total is None else total + p
        assert total is not None
        return (total / self.samples).clamp_min(1e-12).log()


__all__ = ["ABSTAIN", "CertifyResult", "SmoothedModel", "binomial_pvalues", "certified_dice",
           "certified_dice_per_class", "certified_radius", "certify", "holm_reject", "smoothed_predict"]
