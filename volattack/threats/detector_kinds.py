"""The registered detectors of :mod:`volattack.threats.detectors`: ``uncertainty``, ``spectral``,
``mahalanobis`` and ``cnn``.

The two statistics detectors (``uncertainty``, ``spectral``) compute a feature vector per volume
and score it with :class:`FeatureHead`: with attacked fitting volumes an L2-regularised logistic
regression on the standardised features (the supervised setting of Maag and Fischer, VISAPP
2024), without them the squared Mahalanobis distance to the clean features (shrunk covariance).
Everything is differentiable in the input; random choices (the CNN's initialisation and its
shuffling) come from local generators seeded with the detector's ``seed``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from volattack.attacks.spectral import block_split, dct3
from volattack.checks import check_choice, check_number
from volattack.ops import first_head
from volattack.threats.detectors import Detector, network_of, register_detector

HEADS = ("auto", "logistic", "gaussian")


def shrunk_precision(z: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Inverse of the shrunk covariance ``(1 - s) S + s (tr S / F) I`` of centred rows ``z``.

    Shape:
        ``(N, F)`` -> ``(F, F)`` float64.
    """
    z = z.double()
    cov = z.T @ z / max(z.shape[0], 1)
    f = cov.shape[0]
    target = torch.eye(f, dtype=cov.dtype) * (torch.trace(cov) / f).clamp_min(1e-12)
    return torch.linalg.inv((1 - shrinkage) * cov + shrinkage * target)


class FeatureHead:
    """Score of a feature vector: logistic regression (clean 0, attacked 1) or Gaussian distance.

    Args:
        kind: ``"auto"`` (logistic when attacked features are given, else gaussian),
            ``"logistic"`` or ``"gaussian"``.
        l2: L2 weight of the logistic regression (on standardised features).
        shrinkage: covariance shrinkage of the Gaussian, in (0, 1].
    """

    def __init__(self, kind: str = "auto", l2: float = 1e-2, shrinkage: float = 0.1) -> None:
        self.kind = check_choice("head", kind, HEADS)
        check_number("l2", l2, low=0)
        check_number("shrinkage", shrinkage, low=0, high=1, low_open=True)
        self.l2, self.shrinkage = float(l2), float(shrinkage)

    def fit(self, clean: torch.Tensor, attacked: Optional[torch.Tensor]) -> None:
        """Fit on clean features ``(N, F)`` and attacked features ``(M, F)`` (or ``None``)."""
        if self.kind == "logistic" and attacked is None:
            raise ValueError("head='logistic' needs attacked volumes to fit; use head='gaussian' or give them.")
        clean = clean.double()
        self.mu = clean.mean(0)
        self.sd = clean.std(0, unbiased=False).clamp_min(1e-6)
        zc = (clean - self.mu) / self.sd
        self.used = "gaussian" if attacked is None or self.kind == "gaussian" else "logistic"
        if self.used == "gaussian":
            self.precision = shrunk_precision(zc, self.shrinkage)
            return
        za = (attacked.double() - self.mu) / self.sd
        x = torch.cat([zc, za])
        y = torch.cat([torch.zeros(len(zc)), torch.ones(len(za))]).double()
        pos_weight = torch.tensor(len(zc) / len(za), dtype=torch.float64)
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logit = x @ w[:-1] + w[-1]
            loss = F.binary_cross_entropy_with_logits(logit, y, pos_weight=pos_weight)
            loss = loss + self.l2 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.w = w.detach()

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        """Raw score of features ``(B, F)`` -> ``(B,)`` (differentiable)."""
        z = (f.double() - self.mu) / self.sd
        if self.used == "gaussian":
            return ((z @ self.precision) * z).sum(1)
        return z @ self.w[:-1] + self.w[-1]


class FeatureDetector(Detector):
    """A detector that scores a feature vector with a :class:`FeatureHead`."""

    def __init__(self, *, head: str = "auto", l2: float = 1e-2, shrinkage: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head_kind = head
        self._head = FeatureHead(head, l2, shrinkage)
        self.l2, self.shrinkage = float(l2), float(shrinkage)

    def features(self, x: torch.Tensor, model: nn.Module, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feature vector of one volume ``(1, C, *spatial)`` -> ``(1, F)``, differentiable."""
        raise NotImplementedError

    def _fit(self, clean: list[torch.Tensor], attacked: Optional[list[torch.Tensor]], model: nn.Module) -> None:
        fc = torch.cat([self.features(v, model) for v in clean])
        fa = torch.cat([self.features(v, model) for v in attacked]) if attacked else None
        self._head.fit(fc, fa)
        self.head_used = self._head.used

    def _raw(self, x: torch.Tensor, model: nn.Module, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._head(self.features(x, model, logits))


@register_detector("uncertainty")
class UncertaintyDetector(FeatureDetector):
    """Prediction-uncertainty statistics (Maag and Fischer, VISAPP 2024).

    Per voxel of the softmax ``p``: entropy ``H = -sum_k p_k log p_k`` (nats) and margin
    ``M = p_(1) - p_(2)`` (top-1 minus top-2 probability). Features: the mean and the
    ``quantiles`` of H and of M over the predicted foreground (voxels whose argmax is not class 0;
    all voxels when none is), 2 (1 + len(quantiles)) numbers. The foreground mask is taken from
    the argmax (no gradient); the values and quantiles are differentiable.

    Args:
        quantiles: quantile levels in [0, 1].
        head, l2, shrinkage: the :class:`FeatureHead`.
        fpr, seed: see :class:`~volattack.threats.detectors.Detector`.
    """

    uses_logits = True

    def __init__(self, *, quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        qs = list(quantiles)
        if not qs:
            raise ValueError("quantiles must not be empty.")
        for q in qs:
            check_number("quantiles", q, low=0, high=1)
        self.quantiles = [float(q) for q in qs]

    def features(self, x: torch.Tensor, model: nn.Module, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = (model(x) if logits is None else logits).float()
        logp = z.log_softmax(1)
        p = logp.exp()
        entropy = -(p * logp).sum(1).flatten()
        top2 = p.topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1]).flatten()
        fg = z.detach().argmax(1).flatten() != 0
        fg = fg | ~fg.any()  # no foreground: every voxel (a tensor op, no host sync)
        q = torch.tensor(self.quantiles, dtype=entropy.dtype, device=entropy.device)
        out = []
        for v in (entropy, margin):
            out.append(((v * fg).sum() / fg.sum()).reshape(1))
            out.append(masked_quantile(v, fg, q))
        return torch.cat(out).unsqueeze(0)


def masked_quantile(v: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(v[mask], q)`` (linear interpolation) without boolean indexing, whose
    data-dependent size forces a device-to-host sync at every adaptive attack step: the masked-out
    values sort to the end as ``+inf`` and the quantile positions ``q (n - 1)`` are tensors.
    Differentiable in ``v`` like ``torch.quantile``.

    Shape:
        v, mask ``(N,)`` (mask bool with at least one True), q ``(Q,)`` in [0, 1] -> ``(Q,)``.
    """
    n = mask.sum()
    vals = torch.where(mask, v, torch.full_like(v, float("inf"))).sort().values
    pos = q * (n - 1).to(v.dtype)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, n - 1)
    frac = pos - lo.to(v.dtype)
    return vals[lo] * (1 - frac) + vals[hi] * frac


@register_detector("spectral")
class SpectralDetector(FeatureDetector):
    """Band energies of the input's block DCT.

    The volume is cut into cubes of side ``block_size`` (:func:`~volattack.attacks.spectral.block_split`),
    each is transformed by the orthonormal 3D DCT-II (:func:`~volattack.attacks.spectral.dct3`), and
    the coefficients ``(i, j, k)`` other than DC are grouped into ``bands`` shells of equal width in
    ``s = i + j + k`` (s in 1 .. 3(b - 1)). Feature per band: ``log`` of the mean squared
    coefficient over the band and all blocks and channels. A sign-gradient perturbation adds energy
    mostly in the high shells.

    Args:
        block_size: DCT block side b >= 2 (at most the smallest side of the volumes).
        bands: number of shells, 1 .. 3(b - 1).
        head, l2, shrinkage: the :class:`FeatureHead`.
        fpr, seed: see :class:`~volattack.threats.detectors.Detector`.
    """

    def __init__(self, *, block_size: int = 8, bands: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_number("block_size", block_size, low=2, integer=True)
        check_number("bands", bands, low=1, high=3 * (block_size - 1), integer=True)
        self.block_size, self.bands = int(block_size), int(bands)
        b = self.block_size
        r = torch.arange(b)
        s = r.view(b, 1, 1) + r.view(1, b, 1) + r.view(1, 1, b)
        shell = ((s - 1).clamp_min(0).float() * self.bands / (3 * (b - 1))).floor().clamp_max(self.bands - 1).long()
        onehot = F.one_hot(shell.flatten(), self.bands).float()
        onehot[0] = 0  # DC
        self._bands = onehot / onehot.sum(0, keepdim=True)  # (b^3, bands): mean over each band

    def features(self, x: torch.Tensor, model: nn.Module, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        coeffs = dct3(block_split(x.float(), self.block_size))
        b3 = self.block_size ** 3
        energy = (coeffs ** 2).reshape(x.shape[0], -1, b3).mean(1)  # (1, b^3): mean over blocks, channels
        return torch.log(energy @ self._bands.to(energy) + 1e-12)


class _Tap:
    """Forward hooks pooling a layer's features of one whole-volume call (window by window).

    ``single``: global average of the layer's output over every window and position; ``class``:
    the average over the positions of each predicted class, the class map taken from the window's
    logits (a hook on the network's output) and resized to the layer's grid by area averaging.
    """

    def __init__(self, network: nn.Module, layer: nn.Module, mode: str, num_classes: int) -> None:
        self.mode, self.k = mode, num_classes
        self.sums: Optional[torch.Tensor] = None
        self.counts: Optional[torch.Tensor] = None
        self._last: Optional[torch.Tensor] = None
        self.handles = [layer.register_forward_hook(self._on_layer)]
        if mode == "class":
            self.handles.append(network.register_forward_hook(self._on_output))

    def _add(self, s: torch.Tensor, c: torch.Tensor) -> None:
        self.sums = s if self.sums is None else self.sums + s
        self.counts = c if self.counts is None else self.counts + c

    def _on_layer(self, module: nn.Module, inputs: Any, out: Any) -> None:
        f = first_head(out).as_subclass(torch.Tensor).float()
        if self.mode == "single":
            self._add(f.sum(dim=(0, *range(2, f.ndim))).unsqueeze(0), torch.full((1,), float(f[0, 0].numel() * f.shape[0])))
        else:
            self._last = f

    def _on_output(self, module: nn.Module, inputs: Any, out: Any) -> None:
        f, self._last = self._last, None
        z = first_head(out).as_subclass(torch.Tensor).detach()
        onehot = F.one_hot(z.argmax(1), self.k).movedim(-1, 1).float()
        w = F.interpolate(onehot, size=f.shape[2:], mode="area")  # (n, K, *grid)
        self._add(torch.einsum("nk...,nf...->kf", w, f), w.sum(dim=(0, *range(2, w.ndim))))

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (G, F), counts (G,))``: G = 1 (single) or K classes (class)."""
        for h in self.handles:
            h.remove()
        if self.sums is None:
            raise RuntimeError("the chosen layer did not run during the model's forward pass.")
        return self.sums / self.counts.clamp_min(1e-12)[:, None], self.counts


@register_detector("mahalanobis")
class MahalanobisDetector(Detector):
    """Feature-space Mahalanobis distance (Lee et al., NeurIPS 2018) on a chosen layer.

    The layer's output (a forward hook on the module named ``layer`` of the segmenter, see
    :func:`~volattack.threats.detectors.network_of`) is pooled per volume (``mode="single"``: one
    global average; ``"class"``: one average per predicted class present, the class-conditional
    form). Gaussians with a tied (pooled within-class) covariance, shrunk toward a multiple of the
    identity by ``shrinkage``, are fitted on clean volumes only. Raw score: the squared distance
    ``(f - mu_c)^T S^-1 (f - mu_c)``, averaged over the classes present (``single``: the one
    Gaussian). Differentiable when the model runs with gradients (a full-graph inferer).

    Args:
        layer: a module name of the segmenter (``dict(network.named_modules())``).
        mode: ``"single"`` or ``"class"``.
        shrinkage: in (0, 1].
        fpr, seed: see :class:`~volattack.threats.detectors.Detector`.
    """

    def __init__(self, *, layer: str = "", mode: str = "single", shrinkage: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must name a module of the model, got {layer!r}.")
        self.layer = layer
        self.mode = check_choice("mode", mode, ("single", "class"))
        check_number("shrinkage", shrinkage, low=0, high=1, low_open=True)
        self.shrinkage = float(shrinkage)

    def check_model(self, model: nn.Module) -> None:
        names = [n for n, _ in network_of(model).named_modules() if n]
        if self.layer not in names:
            from volattack.registry import suggest

            raise ValueError(f"layer {self.layer!r} is not a module of the model.{suggest(self.layer, names)} "
                             f"Layer names: {', '.join(names)}.")

    def _pool(self, x: torch.Tensor, model: nn.Module, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        net = network_of(model)
        tap = _Tap(net, dict(net.named_modules())[self.layer], self.mode, num_classes)
        try:
            model(x)
        finally:
            feats = tap.pooled()
        return feats

    def _fit(self, clean: list[torch.Tensor], attacked: Optional[list[torch.Tensor]], model: nn.Module) -> None:
        self.num_classes = int(model(clean[0]).shape[1]) if self.mode == "class" else 1
        pooled = [self._pool(v, model, self.num_classes) for v in clean]
        feats = torch.stack([p[0] for p in pooled]).double()  # (N, G, F)
        present = torch.stack([p[1] > 0 for p in pooled])  # (N, G)
        w = present.double()
        self._means = (feats * w[..., None]).sum(0) / w.sum(0).clamp_min(1)[:, None]
        resid = (feats - self._means)[present]
        self._precision = shrunk_precision(resid, self.shrinkage)
        self._seen = present.any(0)

    def _raw(self, x: torch.Tensor, model: nn.Module, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        f, counts = self._pool(x, model, self.num_classes)
        use = (counts > 0) & self._seen
        d = f.double() - self._means
        dist = ((d @ self._precision) * d).sum(1)
        return (dist * use).sum().reshape(1) / use.sum().clamp_min(1)


class _SmallCNN(nn.Module):
    """Input and a high-pass residual -> 3 conv layers -> global average -> one logit."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(2 * channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv3d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.out = nn.Linear(2 * width, 1)
        self.register_buffer("scale", torch.ones(2 * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid = x - F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
        h = torch.cat([x, resid], 1) / self.scale.view(1, -1, 1, 1, 1)
        return self.out(self.body(h).mean(dim=(2, 3, 4))).squeeze(1)


@register_detector("cnn")
class CNNDetector(Detector):
    """A small 3D CNN trained to separate clean (0) from attacked (1) volumes.

    Input: the volume and its high-pass residual ``x - mean_3x3x3(x)``, each divided by its
    standard deviation over the clean fitting volumes; three 3x3x3 convolutions (``width``,
    ``2 width``, ``2 width`` channels, the second with stride 2), global average, a linear logit.
    Trained with Adam (``lr``) on binary cross-entropy for ``epochs`` passes over the fitting
    volumes one at a time, in an order drawn from a generator seeded with ``seed``; weights are
    initialised from the same generator (He-uniform). Raw score: the logit.

    Args:
        width: channels of the first layer.
        epochs: passes over the fitting volumes.
        lr: Adam learning rate.
        fpr, seed: see :class:`~volattack.threats.detectors.Detector`.
    """

    needs_attacked = True

    def __init__(self, *, width: int = 8, epochs: int = 30, lr: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_number("width", width, low=1, integer=True)
        check_number("epochs", epochs, low=1, integer=True)
        check_number("lr", lr, low=0, low_open=True)
        self.width, self.epochs, self.lr = int(width), int(epochs), float(lr)
        self.net: Optional[_SmallCNN] = None

    def modules(self) -> list[nn.Module]:
        return [] if self.net is None else [self.net]

    def _init(self, channels: int, g: torch.Generator) -> _SmallCNN:
        net = _SmallCNN(channels, self.width)
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            bound = math.sqrt(6.0 / fan_in) if p.ndim > 1 else 0.0
            p.data = (torch.rand(p.shape, generator=g) * 2 - 1) * bound
        return net

    def _fit(self, clean: list[torch.Tensor], attacked: Optional[list[torch.Tensor]], model: nn.Module) -> None:
        assert attacked is not None
        g = torch.Generator().manual_seed(self.seed)
        net = self._init(clean[0].shape[1], g)
        with torch.no_grad():
            both = [torch.cat([v, v - F.avg_pool3d(v, 3, stride=1, padding=1, count_include_pad=False)], 1)
                    for v in clean]
            net.scale.copy_(torch.stack([b.float().std(dim=(0, 2, 3, 4)) for b in both]).mean(0).clamp_min(1e-6))
        vols = [v.detach().float() for v in clean] + [v.detach().float() for v in attacked]
        labels = torch.tensor([0.0] * len(clean) + [1.0] * len(attacked))
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        net.train()
        with torch.enable_grad():
            for _ in range(self.epochs):
                for i in torch.randperm(len(vols), generator=g).tolist():
                    loss = F.binary_cross_entropy_with_logits(net(vols[i]), labels[i : i + 1])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net

    def _raw(self, x: torch.Tensor, model: nn.Module, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert self.net is not None
        was = self.net.training
        self.net.eval()
        try:
            return self.net(x.float())
        finally:
            self.net.train(was)


__all__ = ["CNNDetector", "FeatureHead", "MahalanobisDetector", "SpectralDetector", "UncertaintyDetector"]
