"""The deployed segmenter as one differentiable function on the scan's own grid.

A :class:`DeployedPipeline` chains the preprocessing :class:`~volattack.inference.steps.Step` s
fitted to one scan (orientation, resampling, intensity, crop, ...), a *head* that maps the model
input to class probabilities (sliding-window inference and softmax; for nnU-Net the mean over
folds of the mirrored, gaussian-windowed softmax), and the steps' inverses that bring the
probabilities back to the scan's grid. Its output is the log of those probabilities, so it can
be attacked like any segmentation network (``volattack.create_attack(name, pipeline,
inferer=None, bounds=pipeline.bounds, unit_scale=1.0, ...)``) with the perturbation on the scan in
its own units: the attack optimises exactly the function that is evaluated.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from volattack.inference.steps import Crop, Intensity, Orient, Resample, Step

#: smallest probability whose log the pipeline returns (``log`` of 0 would be ``-inf``).
MIN_PROB = 1e-12
LOG_MIN_PROB = math.log(MIN_PROB)

#: source-unit labels of :attr:`DeployedPipeline.units`.
UNITS: tuple[str, ...] = ("HU", "intensity")


class SoftmaxHead(nn.Module):
    """Model input -> class probabilities: ``softmax(inferer(x, network))`` over classes (the
    whole input through ``network`` when ``inferer`` is ``None``).

    Args:
        network: ``(B, C, *roi)`` -> logits ``(B, K, *roi)`` (eval mode).
        inferer: a sliding-window inferer (``WindowedInferer``: exact window-by-window input
            gradient), or ``None``.

    Shape:
        ``(1, C, *grid)`` -> ``(1, K, *grid)``, rows summing to 1.
    """

    def __init__(self, network: nn.Module, inferer: Any = None) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        if inferer is not None and not callable(inferer):
            raise ValueError(f"inferer must be None or callable, got {type(inferer).__name__}.")
        self.network = network
        self.inferer = inferer

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The stitched logits ``(1, K, *grid)`` (float32)."""
        from volattack.ops import first_head

        out = self.inferer(x, self.network) if self.inferer is not None else first_head(self.network(x))
        return out.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    def log_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log(clamp(forward(x), MIN_PROB))`` in one ``log_softmax`` (what the pipeline uses when
        nothing between the head and the source grid mixes values)."""
        return torch.log_softmax(self.logits(x), dim=1).clamp_min(LOG_MIN_PROB)


def _fused_crop_orient(crop: Crop, orient: Orient) -> Any:
    """``orient.invert(crop.pad(lp, 0, log MIN_PROB))`` computed as the reorientation of the small
    crop followed by the padding with the box mapped to the source grid (no full-size flip)."""
    start, end = [0, 0, 0], [0, 0, 0]
    for k in range(3):
        s = orient.perm[2 + k] - 2
        n = orient.in_shape[s]  # type: ignore[index]
        a, b = crop.start[k], crop.end[k]
        start[s], end[s] = (n - b, n - a) if s + 2 in orient.flips else (a, b)
    box = Crop(start, end, orient.in_shape)  # type: ignore[arg-type]

    def op(lp: torch.Tensor) -> torch.Tensor:
        lp = lp.permute(orient.inv_perm)
        return box.pad(torch.flip(lp, dims=orient.flips) if orient.flips else lp, 0.0, LOG_MIN_PROB)

    return op


class _CroppedInverse(nn.Module):
    """``Resample.invert(Crop.invert(p))`` on the source voxels that read the crop, the others being
    background: linear interpolation preserves constants, so it is ``pad + interp(zero-padded(p -
    pad))``, and only rows whose stencil touches the box are nonzero. ``box`` is that region of
    the source grid (the log-probabilities outside it are ``log 1`` and ``log MIN_PROB``)."""

    def __init__(self, crop: Crop, resample: Resample) -> None:
        super().__init__()
        start, end = [], []
        for d, ax in enumerate(resample.inv):  # type: ignore[union-attr]
            a, b = crop.start[d], crop.end[d]
            i0, i1, w = ax.i0, ax.i1, ax.w.double()
            in0, in1 = (i0 >= a) & (i0 < b) & (w < 1), (i1 >= a) & (i1 < b) & (w > 0)
            rows = torch.nonzero(in0 | in1).flatten()
            if rows.numel() == 0:
                raise ValueError("the crop box is outside the resampled grid")
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            sl = slice(lo, hi)
            self.register_buffer(f"i0_{d}", (i0[sl] - a).clamp(0, b - a - 1), persistent=False)
            self.register_buffer(f"i1_{d}", (i1[sl] - a).clamp(0, b - a - 1), persistent=False)
            self.register_buffer(f"w0_{d}", ((1 - w[sl]) * in0[sl]).float(), persistent=False)
            self.register_buffer(f"w1_{d}", (w[sl] * in1[sl]).float(), persistent=False)
            start.append(lo)
            end.append(hi)
        self.box = Crop(start, end, resample.in_shape)  # type: ignore[arg-type]
        self.crop_shape = crop.out_shape

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(p.shape[1], dtype=p.dtype, device=p.device)
        pad[0] = 1.0
        pad = pad.view(1, -1, 1, 1, 1)
        q = p - pad
        for d in range(3):
            dim, i0, i1 = d + 2, getattr(self, f"i0_{d}"), getattr(self, f"i1_{d}")
            shape = [1] * q.ndim
            shape[dim] = i0.numel()
            w0, w1 = getattr(self, f"w0_{d}").view(shape), getattr(self, f"w1_{d}").view(shape)
            if dim == q.ndim - 1:
                size = q.shape[:-1] + (i0.numel(),)
                q = torch.gather(q, -1, i0.view(shape).expand(size)) * w0 + torch.gather(
                    q, -1, i1.view(shape).expand(size)) * w1
            else:
                q = q.index_select(dim, i0) * w0 + q.index_select(dim, i1) * w1
        return q + pad


def _inverse_plan(steps: Sequence[Step]) -> tuple[list[Any], list[Any], list[nn.Module]]:
    """The inverse chain split at the log: steps up to the last one that mixes values (a resampling,
    or any step not known to be a padding or permutation) act on probabilities; the log is taken
    there, and the rest act on log-probabilities (a crop pads ``log 1`` / ``log MIN_PROB``; a crop
    followed by a reorientation is fused; a crop followed by a linear resampling is computed on the
    source region that reads the crop only), so the full-size grid sees as few operations as
    possible. Returns the probability-space ops, the log-space ops and the modules they hold."""
    rev = [s for s in reversed(list(steps)) if not isinstance(s, Intensity)]
    cut = max((i for i, s in enumerate(rev) if not isinstance(s, (Orient, Crop))), default=-1)
    prob, rest, log_ops, held = [s.invert for s in rev[: cut + 1]], rev[cut + 1:], [], []
    if cut >= 1 and isinstance(rev[cut], Resample) and isinstance(rev[cut - 1], Crop) and rev[cut].inv is not None \
            and not any(ax.dense for ax in rev[cut].inv):
        fused = _CroppedInverse(rev[cut - 1], rev[cut])
        prob, rest, held = prob[: cut - 1] + [fused], [fused.box] + rest, [fused]
    i = 0
    while i < len(rest):
        s, nxt = rest[i], rest[i + 1] if i + 1 < len(rest) else None
        if isinstance(s, Crop) and isinstance(nxt, Orient):
            log_ops.append(_fused_crop_orient(s, nxt))
            i += 2
            continue
        log_ops.append((lambda c: (lambda lp: c.pad(lp, 0.0, LOG_MIN_PROB)))(s) if isinstance(s, Crop) else s.invert)
        i += 1
    return prob, log_ops, held


class DeployedPipeline(nn.Module):
    """Preprocessing steps, a probability head and the inverse steps, on the scan's own grid.

    ``forward(x) = log(invert_1(... invert_n(head(step_n(... step_1(x))))))``, clamped at
    ``log(MIN_PROB)``; every part is differentiable in ``x`` (a step that is not raises when built,
    naming it).

    Args:
        steps: the steps fitted to the scan, in application order.
        head: ``(1, C, *model_grid)`` model input -> ``(1, K, *model_grid)`` probabilities.
        bounds: the source-unit range ``(lo, hi)`` the attack may use (``lo < hi``).
        units: ``"HU"`` (CT) or ``"intensity"`` (MRI, unknown units).
        describe: what the pipeline is (model, source, options), for reports and cache keys.

    Shape:
        ``(1, C, I, J, K)`` source units -> ``(1, K, I, J, K)`` log-probabilities.
    """

    def __init__(self, steps: Sequence[Step], head: nn.Module, *, bounds: tuple[float, float], units: str,
                 describe: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        steps = list(steps)
        bad = [type(s).__name__ for s in steps if not isinstance(s, Step)]
        if bad:
            raise ValueError(f"steps must be Step modules, got {bad}.")
        if not isinstance(head, nn.Module):
            raise ValueError(f"head must be a torch.nn.Module, got {type(head).__name__}.")
        b = tuple(bounds) if isinstance(bounds, (tuple, list)) else ()
        if len(b) != 2 or not all(isinstance(v, (int, float)) and not math.isnan(v) for v in b) or not b[0] < b[1]:
            raise ValueError(f"bounds must be (lo, hi) with lo < hi, got {bounds!r}.")
        if units not in UNITS:
            raise ValueError(f"units must be one of {list(UNITS)}, got {units!r}.")
        for prev, nxt in zip(steps, steps[1:]):
            if prev.out_shape is not None and nxt.in_shape is not None and prev.out_shape != nxt.in_shape:
                raise ValueError(f"steps do not chain: {type(prev).__name__} gives {prev.out_shape}, "
                                 f"{type(nxt).__name__} takes {nxt.in_shape}.")
        self.steps = nn.ModuleList(steps)
        self._inverse_prob, self._inverse_log, held = _inverse_plan(steps)
        self._fused = nn.ModuleList(held)  # moved with the pipeline (.to(device))
        self.head = head
        self.bounds = (float(b[0]), float(b[1]))
        self.units = units
        self.info = dict(describe or {})
        self._outside: Optional[tuple[tuple[slice, ...], torch.Tensor, tuple[int, ...]]] = None
        self._outside_known = False

    @property
    def in_shape(self) -> Optional[tuple[int, int, int]]:
        """The source grid's spatial shape (that of the first step that fixes one)."""
        return next((s.in_shape for s in self.steps if s.in_shape is not None), None)

    def to_model(self, x_src: torch.Tensor) -> torch.Tensor:
        """The model input of ``x_src`` (every step applied), differentiable.

        Shape:
            ``(1, C, I, J, K)`` -> ``(1, C, *model_grid)``.
        """
        x = x_src
        for s in self.steps:
            x = s(x)
        return x

    def to_source(self, p: torch.Tensor) -> torch.Tensor:
        """Probabilities on the model grid -> probabilities on the source grid (inverse steps).

        Shape:
            ``(1, K, *model_grid)`` -> ``(1, K, I, J, K)``.
        """
        for s in reversed(self.steps):
            p = s.invert(p)
        return p

    def probabilities(self, x_src: torch.Tensor) -> torch.Tensor:
        """Class probabilities on the source grid (differentiable).

        Shape:
            ``(1, C, I, J, K)`` -> ``(1, K, I, J, K)``.
        """
        self._check_input(x_src)
        return self.to_source(self.head(self.to_model(x_src.float())))

    @staticmethod
    def _check_input(x_src: Any) -> None:
        if not torch.is_tensor(x_src) or x_src.ndim != 5 or not x_src.is_floating_point():
            raise ValueError(f"x_src must be a float (1, C, I, J, K) tensor, got "
                             f"{getattr(x_src, 'shape', type(x_src).__name__)}.")

    def forward(self, x_src: torch.Tensor) -> torch.Tensor:
        """``log(clamp(probabilities(x_src), MIN_PROB))``, with the log taken as early in the
        inverse chain as it commutes (:func:`_inverse_plan`; the same values)."""
        self._check_input(x_src)
        x = self.to_model(x_src.float())
        if not self._inverse_prob and hasattr(self.head, "log_forward"):
            lp = self.head.log_forward(x)
        else:
            p = self.head(x)
            for op in self._inverse_prob:
                p = op(p)
            lp = torch.log(p.clamp_min(MIN_PROB))
        if not self._outside_known:
            self._find_constant_outside(lp)
        for op in self._inverse_log:
            lp = op(lp)
        return lp

    def _find_constant_outside(self, lp: torch.Tensor) -> None:
        """The box of the source grid outside which :meth:`forward` is the constant ``(log 1, log
        MIN_PROB, ...)`` (the log-space inverse steps only pad, permute and flip), found once by
        passing a marker through them; ``None`` when there is no such box or it is the whole grid."""
        self._outside_known = True
        if not self._inverse_log:
            return
        with torch.no_grad():
            mark = torch.zeros((1, lp.shape[1]) + tuple(lp.shape[2:]), dtype=torch.float32, device=lp.device)
            mark[:, 0] = 1.0
            for op in self._inverse_log:
                mark = op(mark)
            inside = mark[0, 0] != 0
            idx = [torch.nonzero(inside.any(dim=tuple(d for d in range(3) if d != a))).flatten() for a in range(3)]
            if any(i.numel() == 0 for i in idx):
                return
            box = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
            const = torch.full((lp.shape[1],), LOG_MIN_PROB, dtype=torch.float32, device=lp.device)
            const[0] = 0.0
            full = tuple(mark.shape[2:])
            rest = mark.clone()
            rest[(slice(None), slice(None)) + box] = const.view(1, -1, 1, 1, 1)
            boxed = mark[(slice(None), slice(None)) + box]
            exact = bool(inside[box].all()) and bool((rest == const.view(1, -1, 1, 1, 1)).all()) \
                and bool((boxed[:, 1:] == 0).all())
            if exact and tuple(b.stop - b.start for b in box) != full:
                self._outside = (box, const, full)

    def constant_outside(self) -> Optional[tuple[tuple[slice, ...], torch.Tensor, tuple[int, ...]]]:
        """``(box, const, grid)``: :meth:`forward`'s output equals ``const`` ``(K,)`` at every voxel of
        the source grid ``grid`` outside the three slices ``box``, whatever the input; ``None``
        when not known (before the first call) or when no voxel is outside. Attacks use it to
        compute sum objectives on the box only (:mod:`volattack.attacks.box_objective`)."""
        return self._outside

    def log_softmax_output(self) -> bool:
        """Whether :meth:`forward` is the head's clamped ``log_softmax`` carried by log-space steps
        only (no probability-space inverse step such as resampling): its rows are then normalised
        log-probabilities, and objectives may skip their own ``log_softmax``."""
        return not self._inverse_prob and hasattr(self.head, "log_forward")

    def predict(self, x_src: torch.Tensor) -> torch.Tensor:
        """Class map on the source grid, no gradient.

        Shape:
            ``(1, C, I, J, K)`` -> ``(1, 1, I, J, K)`` long.
        """
        with torch.no_grad():
            return self.forward(x_src).argmax(1, keepdim=True)

    def describe(self) -> dict[str, Any]:
        """Plain description: ``info``, the steps, the bounds and the units."""
        return {**self.info, "steps": [s.describe() for s in self.steps], "bounds": list(self.bounds),
                "units": self.units}


__all__ = ["Crop", "DeployedPipeline", "Intensity", "LOG_MIN_PROB", "MIN_PROB", "Orient", "Resample", "SoftmaxHead", "Step", "UNITS"]
