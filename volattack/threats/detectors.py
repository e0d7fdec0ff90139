"""Detectors of adversarial volumes: a registry, the common interface and the detection metrics.

A detector maps a volume to one score per sample, higher meaning more likely adversarial, and is
fitted on clean volumes (and, for the supervised ones, attacked volumes) of a training split:

- ``uncertainty``: statistics of the voxel entropy and margin of the softmax over the predicted
  foreground (Maag and Fischer, VISAPP 2024);
- ``spectral``: log band energies of the input's block DCT;
- ``mahalanobis``: Mahalanobis distance of a layer's pooled features to Gaussians with tied
  covariance fitted on clean volumes (Lee et al., NeurIPS 2018);
- ``cnn``: a small 3D CNN trained to separate clean from attacked volumes.

The four are in :mod:`volattack.threats.detector_kinds`; adding one is one decorated subclass of
:class:`Detector`. Interface: ``fit(clean, attacked_or_None, model)`` then ``score(x, model)`` ->
``(B,)``. Scores are standardised by the clean fitting scores (``(raw - mean) / std``, monotone, so
AUROC is unchanged) so that one weight of the adaptive attack means the same for every detector;
:attr:`Detector.threshold` is the score at ``fpr`` (default 5%) false-positive rate on the clean
fitting set (:func:`fpr_threshold`). Every detector here is differentiable in ``x`` (the adaptive
attack of :mod:`volattack.threats.adaptive_detect` descends it); a detector declaring
``differentiable = False`` must give a differentiable :meth:`Detector.surrogate_score`, used by
BPDA (straight-through: the real score forward, the surrogate's gradient backward).

Detection metrics: :func:`auroc` (the Mann-Whitney probability that an attacked volume scores
above a clean one, ties counted one half) and :func:`tpr_at_fpr`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from volattack.attacks.base import eval_mode
from volattack.checks import check_number
from volattack.ops import first_head
from volattack.registry import Registry

logger = logging.getLogger(__name__)

DETECTORS: Registry["Detector"] = Registry("detector")

#: fewest clean volumes any detector is fitted on (the 5%-FPR threshold needs a spread)
MIN_CLEAN = 5
#: fewest attacked volumes a supervised detector (or head) is fitted on
MIN_ATTACKED = 5

Volumes = Union[torch.Tensor, Sequence[torch.Tensor]]


def register_detector(name: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`Detector` subclass under ``name`` (sets ``cls.name``)."""

    return DETECTORS.register_class(name)


def list_detectors() -> list[str]:
    """Sorted names of the registered detectors."""
    return DETECTORS.names()


def create_detector(name: str, **params: Any) -> "Detector":
    """Build the detector registered as ``name`` (unknown names raise with a suggestion)."""
    return DETECTORS.create(name, **params)


# ------------------------------------------------------------------------ metrics
def _scores(values: Any, name: str) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be a non-empty sequence of finite scores, got {arr.tolist()!r}.")
    return arr


def auroc(clean: Any, attacked: Any) -> float:
    """Area under the ROC curve of attacked (positive) against clean (negative) scores.

    ``AUROC = 1/(n m) sum_i sum_j [a_i > c_j] + 0.5 [a_i = c_j]``: the Mann-Whitney U statistic of
    the attacked scores divided by ``n m`` (1 when every attacked volume scores above every clean
    one, 0.5 for indistinguishable scores).

    Shape:
        clean ``(n,)``, attacked ``(m,)`` -> float.
    """
    c, a = _scores(clean, "clean"), _scores(attacked, "attacked")
    diff = a[:, None] - c[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def fpr_threshold(clean: Any, fpr: float = 0.05) -> float:
    """The score threshold at false-positive rate ``fpr`` of the ``clean`` scores: with the clean
    scores sorted ascending ``s_1 <= ... <= s_n`` and ``m = floor(fpr n)`` false positives allowed,
    the threshold is ``s_(n - m)``; a volume is flagged when its score is strictly above it, so at
    most ``m`` clean volumes are flagged (e.g. n = 20, fpr = 0.05: the second-largest clean score).

    Shape:
        clean ``(n,)`` -> float.
    """
    check_number("fpr", fpr, low=0, high=1, high_open=True)
    s = np.sort(_scores(clean, "clean"))
    m = int(math.floor(fpr * s.size + 1e-9))
    return float(s[s.size - 1 - m])


def tpr_at_fpr(clean: Any, attacked: Any, fpr: float = 0.05) -> float:
    """True-positive rate (share of attacked scores strictly above :func:`fpr_threshold` of the
    clean scores) at false-positive rate ``fpr``.

    Shape:
        clean ``(n,)``, attacked ``(m,)`` -> float in [0, 1].
    """
    t = fpr_threshold(clean, fpr)
    return float((_scores(attacked, "attacked") > t).mean())


# --------------------------------------------------------------------- the model
class WholeVolume(nn.Module):
    """A segmenter applied to whole volumes, ``x -> inferer(x, network)`` (or ``network(x)``).

    Detectors and the adaptive attack call models on whole volumes; the layer names of the
    Mahalanobis detector are those of :attr:`network`. Use a full-graph inferer
    (:func:`volattack.inference.sliding.full_graph_inferer`) when layer features must carry
    gradients: :class:`~volattack.inference.sliding.WindowedInferer` runs its forward pass
    without gradients and recomputes the windows in the backward pass.

    Args:
        network: the segmenter ``(B, C, *window) -> (B, K, *window)``.
        inferer: ``inferer(x, network) -> logits``; ``None`` calls the network on the whole volume.

    Shape:
        ``(B, C, H, W, D)`` -> logits ``(B, K, H, W, D)`` (a plain tensor, float32).
    """

    def __init__(self, network: nn.Module, inferer: Optional[Callable[..., Any]] = None) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        self.network = network
        self.inferer = inferer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = first_head(self.inferer(x, self.network) if self.inferer is not None else self.network(x))
        return out.as_subclass(torch.Tensor).float()


def network_of(model: nn.Module) -> nn.Module:
    """The module whose layers a detector names: ``model.network`` of a :class:`WholeVolume`
    (also inside wrappers exposing ``model``), else ``model`` itself."""
    seen = 0
    while seen < 8:
        if isinstance(model, WholeVolume):
            return model.network
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            return model
        model, seen = inner, seen + 1
    return model


# --------------------------------------------------------------------- base class
def as_volume_list(volumes: Optional[Volumes], name: str) -> list[torch.Tensor]:
    """Volumes as a list of ``(1, C, *spatial)`` float tensors (a batch tensor is split).

    Raises:
        ValueError: not a tensor or a list of tensors, or a tensor of rank < 3 (named ``name``).
    """
    if volumes is None:
        return []
    if torch.is_tensor(volumes):
        volumes = list(volumes.unbind(0))
        volumes = [v.unsqueeze(0) for v in volumes]
    if not isinstance(volumes, (list, tuple)):
        raise ValueError(f"{name} must be a tensor (N, C, *spatial) or a list of tensors, got {type(volumes).__name__}.")
    out = []
    for i, v in enumerate(volumes):
        if not torch.is_tensor(v) or v.ndim < 3 or not v.is_floating_point():
            raise ValueError(f"{name}[{i}] must be a floating tensor (1, C, *spatial), got {getattr(v, 'shape', v)!r}.")
        out.append(v if v.shape[0] == 1 else v.unsqueeze(0))
    return out


class Detector:
    """Base class of the detectors (see the module docstring).

    Args:
        fpr: false-positive rate of :attr:`threshold` on the clean fitting set, in [0, 1).
        seed: seed of every random choice of the detector (recorded in :meth:`describe`).

    Attributes:
        threshold: score above which a volume is flagged (``None`` before :meth:`fit`).
        fit_info: the fitting cases' counts and the clean fitting scores' range.
    """

    name: ClassVar[str] = "detector"
    #: whether :meth:`score` has a useful gradient in ``x`` (else BPDA through :meth:`surrogate_score`)
    differentiable: ClassVar[bool] = True
    #: whether :meth:`fit` needs attacked volumes
    needs_attacked: ClassVar[bool] = False
    #: whether :meth:`score` uses the model's logits (then callers may pass them)
    uses_logits: ClassVar[bool] = False

    def __init__(self, *, fpr: float = 0.05, seed: int = 0) -> None:
        check_number("fpr", fpr, low=0, high=1, high_open=True)
        check_number("seed", seed, low=0, integer=True)
        self.fpr, self.seed = float(fpr), int(seed)
        self.threshold: Optional[float] = None
        self.fit_info: dict[str, Any] = {}
        self._center, self._scale = 0.0, 1.0

    # ------------------------------------------------------------ public API
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if the detector cannot work with ``model`` (before any work)."""

    def check_counts(self, n_clean: int, n_attacked: int) -> None:
        """Raise ``ValueError`` when there are too few cases to fit, stating the minimum."""
        if n_clean < MIN_CLEAN:
            raise ValueError(f"detector {self.name} needs at least {MIN_CLEAN} clean volumes to fit, got {n_clean}.")
        if self.needs_attacked and n_attacked < MIN_ATTACKED:
            raise ValueError(
                f"detector {self.name} needs at least {MIN_ATTACKED} attacked volumes to fit, got {n_attacked}.")
        if not self.needs_attacked and 0 < n_attacked < MIN_ATTACKED:
            raise ValueError(f"detector {self.name} needs no attacked volumes or at least {MIN_ATTACKED}, "
                             f"got {n_attacked}.")

    def fit(self, clean: Volumes, attacked: Optional[Volumes], model: nn.Module) -> "Detector":
        """Fit on clean (and attacked) volumes; set the score standardisation and :attr:`threshold`.

        Args:
            clean: clean volumes, a tensor ``(N, C, *spatial)`` or a list of ``(1, C, *spatial)``.
            attacked: attacked volumes in the same form, or ``None`` (unsupervised detectors).
            model: the segmenter on whole volumes (e.g. :class:`WholeVolume`).

        Raises:
            ValueError: too few volumes (at least :data:`MIN_CLEAN` clean and, when needed or
                given, :data:`MIN_ATTACKED` attacked), or a model the detector cannot use.
        """
        c, a = as_volume_list(clean, "clean"), as_volume_list(attacked, "attacked")
        self.check_counts(len(c), len(a))
        self.check_model(model)
        with eval_mode(model), torch.no_grad():
            self._fit(c, a or None, model)
            self._center, self._scale = 0.0, 1.0
            raw = torch.cat([self._raw(v, model).detach().double() for v in c])
        self._center = float(raw.mean())
        self._scale = max(float(raw.std(unbiased=False)), 1e-12)
        fit_scores = ((raw - self._center) / self._scale).numpy()
        self.threshold = fpr_threshold(fit_scores, self.fpr)
        self.fit_info = {"clean": len(c), "attacked": len(a), "fpr": self.fpr, "threshold": self.threshold,
                         "clean_scores": [float(v) for v in fit_scores]}
        logger.info("detector %s fitted on %d clean + %d attacked volumes; threshold %.4g at %.0f%% FPR",
                    self.name, len(c), len(a), self.threshold, 100 * self.fpr)
        return self

    def score(self, x: torch.Tensor, model: nn.Module, *, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Standardised score per sample (higher = more likely adversarial), differentiable in ``x``.

        Args:
            x: volumes ``(B, C, *spatial)``.
            model: the segmenter the detector was fitted with.
            logits: ``model(x)`` if already computed (used by detectors with :attr:`uses_logits`).

        Shape:
            ``(B, C, *spatial)`` -> ``(B,)`` float32 (each sample scored alone).
        """
        if self.threshold is None:
            raise RuntimeError(f"detector {self.name} is not fitted: call fit(clean, attacked, model) first.")
        if not torch.is_tensor(x) or x.ndim < 3:
            raise ValueError(f"x must be a tensor (B, C, *spatial), got {getattr(x, 'shape', x)!r}.")
        with eval_mode(model):
            raw = [self._raw(x[b : b + 1], model, None if logits is None else logits[b : b + 1])
                   for b in range(x.shape[0])]
        return ((torch.cat(raw) - self._center) / self._scale).float()

    def surrogate_score(self, x: torch.Tensor, model: nn.Module, *,
                        logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A differentiable stand-in for :meth:`score` (BPDA); detectors here are differentiable."""
        return self.score(x, model, logits=logits)

    def modules(self) -> list[nn.Module]:
        """The detector's own trainable networks (put in eval mode with the model by the attack)."""
        return []

    def describe(self) -> dict[str, Any]:
        """Name, parameters, seed and fitting summary (plain values, for the results)."""
        params = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("fit_info", "threshold")
                  and isinstance(v, (int, float, str, bool, type(None), list, tuple))}
        return {"name": self.name, "params": params, "fit": dict(self.fit_info)}

    # ------------------------------------------------------------ for subclasses
    def _fit(self, clean: list[torch.Tensor], attacked: Optional[list[torch.Tensor]], model: nn.Module) -> None:
        """Fit the detector's statistics (no gradient; model in eval mode)."""
        raise NotImplementedError

    def _raw(self, x: torch.Tensor, model: nn.Module, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unstandardised score of one volume ``(1, C, *spatial)`` -> ``(1,)``, differentiable."""
        raise NotImplementedError


from volattack.threats import detector_kinds  # noqa: E402,F401  (registers the detectors)

__all__ = ["DETECTORS", "Detector", "MIN_ATTACKED", "MIN_CLEAN", "WholeVolume", "as_volume_list", "auroc",
           "create_detector", "fpr_threshold", "list_detectors", "network_of", "register_detector", "tpr_at_fpr"]
