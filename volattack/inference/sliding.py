"""Sliding-window inference with an exact, memory-bounded input gradient.

Whole CT volumes (e.g. 512 x 512 x 200) do not fit a segmenter in one pass, so they are
segmented with sliding-window inference (MONAI's ``sliding_window_inference``): the
volume is covered by overlapping windows of ``roi_size``, each window is segmented, the
window logits are weighted by an importance map (constant or gaussian), summed into the
volume, and divided by the summed importance map. Back-propagating through that with
plain autograd keeps every window's activations alive until the backward pass, so the
memory grows with the number of windows (380-434 bytes per voxel with a small 3-class
MONAI UNet and 64^3 windows, ``benchmarks/RESULTS.md``).

:class:`WindowedInferer` computes the same stitched logits (same scan grid, same
importance map, same padding, same normalisation, same order of summation: its forward
output equals MONAI's bit for bit on CPU) inside a ``torch.autograd.Function`` whose
forward runs the windows under ``torch.no_grad()`` and whose backward is the exact
vector-Jacobian product of the stitching, computed window batch by window batch:

.. math::

    \\frac{\\partial L}{\\partial x} = \\sum_w P_w^\\top J_w(P_w x)^\\top
        \\Big(\\frac{m}{c} \\odot P_w g\\Big),
    \\qquad c = \\sum_w P_w^\\top m,

with ``g`` the gradient of the loss with respect to the stitched logits, ``P_w`` the crop
of window ``w``, ``J_w`` the Jacobian of the network on that window (re-evaluated with
gradients enabled on the same window batch as in the forward pass), ``m`` the window
importance map and ``c`` the count (summed importance) map. The peak memory beyond one
window batch's activations is a handful of volume-sized tensors: the input, its
gradient, the stitched logits and their gradient; the count map lives only inside the
forward and the backward pass (it is recomputed, not kept in between, so it is not alive
while the loss is). Nothing of the forward pass is kept for the backward but a reference
to the input. Measured with ``benchmarks/bench_memory.py``: 45-72 bytes per voxel for a
whole Dice-CE input gradient (most of it the loss), against 380-434 with plain autograd,
at 0.8x its time on a 192 x 192 x 160 volume (1.5x on a single window).

The loop over window batches is inherent (the network runs on one batch at a time, as in
MONAI); inside a batch, each window is one strided slice copy or slice add.

The price is one extra forward pass per window batch (the recomputation), as in
gradient checkpointing (Chen et al., "Training deep nets with sublinear memory cost",
2016). The plain full-graph computation is :func:`full_graph_inferer` (MONAI's
``SlidingWindowInferer`` with the same settings).

Requirements on the network: it must be deterministic (``network.eval()``: BatchNorm
with running statistics, dropout off), since the windows are evaluated twice and
the gradient is that of the second evaluation. With gradients requested, a
``nn.Module`` with any submodule in training mode is rejected. Gradients flow to the
input only: parameters receive no ``.grad`` (use MONAI's ``SlidingWindowInferer`` to
train through sliding windows).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from volattack.ops import first_head

logger = logging.getLogger(__name__)

__all__ = ["WindowedInferer", "full_graph_inferer"]

BLEND_MODES = ("constant", "gaussian")
PADDING_MODES = ("constant", "reflect", "replicate", "circular")

Network = Callable[[torch.Tensor], Any]
IndexTuple = tuple  # (slice over batch, slice over channels, *spatial slices)


def _enum_value(v: Any) -> Any:
    """``BlendMode.GAUSSIAN`` -> ``"gaussian"``; other values unchanged."""
    return v.value if isinstance(v, Enum) else v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _per_dim(name: str, value: Any, n: int, shape: Sequence[int]) -> tuple:
    """``value`` repeated ``n`` times, or the sequence itself when it has ``n`` entries."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(
                f"{name} must have {n} entries for inputs with {n} spatial dims (shape {tuple(shape)}), "
                f"got {tuple(value)}."
            )
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class _Plan:
    """Everything that depends only on the input's shape: windows, padding, importance map.

    Attributes:
        pad: ``F.pad`` amounts (last spatial dim first), all zero when no padding is needed.
        crop: spatial slices that undo the padding on the stitched output.
        padded_size: spatial size after padding (each dim at least the window size).
        slices: spatial slices of the windows, in MONAI's scan order.
        batches: window batches; each item is a full index tuple ``(batch, channels, *spatial)``,
            windows of all images enumerated image-major and cut into chunks of ``sw_batch_size``
            (as MONAI does, so a chunk can span two images).
        importance: the window importance map ``(1, 1, *roi_size)``.
    """

    pad: tuple[int, ...]
    crop: tuple[slice, ...]
    padded_size: tuple[int, ...]
    slices: tuple[tuple[slice, ...], ...]
    batches: tuple[tuple[IndexTuple, ...], ...]
    importance: torch.Tensor

    @property
    def padded(self) -> bool:
        return any(self.pad)


class WindowedInferer:
    """Sliding-window inference whose backward is the exact input gradient, computed window by window.

    A drop-in replacement for ``monai.inferers.SlidingWindowInferer`` wherever the input
    gradient is needed (``volattack.create_attack(..., inferer=WindowedInferer(...))``):
    the forward output equals ``monai.inferers.sliding_window_inference`` with the same
    arguments (same scan grid from ``monai.data.utils.dense_patch_slices``, same
    importance map from ``monai.data.utils.compute_importance_map``, same normalisation
    by the summed importance map; identical bits on CPU), and the gradient with respect
    to ``inputs`` equals autograd through MONAI's function, while the windows'
    activations are never kept for more than one window batch (see the module docstring).

    Volumes smaller than ``roi_size`` along a dimension are padded as MONAI does:
    symmetrically (the extra voxel after), with ``padding_mode``/``cval``, and the output
    is cropped back; the gradient flows back through the padding (``reflect``,
    ``replicate`` and ``circular`` fold the padded voxels' gradient onto the voxels they copy).

    The network must be deterministic (eval mode): each window batch is evaluated once
    in the forward pass (without autograd) and again in the backward pass (with autograd).
    Parameters receive no gradient. A network returning a tuple or list (deep supervision)
    contributes its first output only.

    Args:
        roi_size: window size in voxels, one positive int per spatial dim (or one int for all).
        sw_batch_size: windows per network call (>= 1).
        overlap: fraction of the window shared by neighbouring windows, in [0, 1) (one value
            or one per spatial dim).
        mode: importance map blending the windows: ``"constant"`` (plain average) or
            ``"gaussian"`` (centre-weighted, sigma = ``sigma_scale`` * window size).
        sigma_scale: gaussian sigma as a fraction of the window size (> 0; one value or one
            per spatial dim); ignored for ``"constant"``.
        padding_mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"``
            (``torch.nn.functional.pad``), used when the volume is smaller than the window.
        cval: fill value (input units) for ``"constant"`` padding (ignored by the other modes,
            where MONAI's function raises for a nonzero value).
        progress: show a tqdm progress bar over window batches.

    Shape:
        inputs ``(B, C, *spatial)`` float -> logits ``(B, K, *spatial)`` in the inputs' dtype.
    """

    def __init__(
        self,
        roi_size: Union[Sequence[int], int],
        sw_batch_size: int = 4,
        overlap: Union[Sequence[float], float] = 0.25,
        mode: str = "gaussian",
        sigma_scale: Union[Sequence[float], float] = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        progress: bool = False,
    ) -> None:
        roi = tuple(roi_size) if isinstance(roi_size, (tuple, list)) else roi_size
        if isinstance(roi, tuple):
            ok = len(roi) > 0 and all(_is_int(r) and r > 0 for r in roi)
        else:
            ok = _is_int(roi) and roi > 0
        if not ok:
            raise ValueError(f"roi_size must be a positive int or a sequence of positive ints, got {roi_size!r}.")
        if not _is_int(sw_batch_size) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}.")
        ov = tuple(overlap) if isinstance(overlap, (tuple, list)) else (overlap,)
        if len(ov) == 0 or not all(_is_real(o) and 0 <= o < 1 for o in ov):
            raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
        mode = _enum_value(mode)
        if mode not in BLEND_MODES:
            raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}.")
        sig = tuple(sigma_scale) if isinstance(sigma_scale, (tuple, list)) else (sigma_scale,)
        if len(sig) == 0 or not all(_is_real(s) and s > 0 for s in sig):
            raise ValueError(f"sigma_scale must be > 0 (one value or one per spatial dim), got {sigma_scale}.")
        padding_mode = _enum_value(padding_mode)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
        if not _is_real(cval):
            raise ValueError(f"cval must be a finite number, got {cval!r}.")
        self.roi_size = roi
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = tuple(overlap) if isinstance(overlap, (tuple, list)) else float(overlap)
        self.mode = mode
        self.sigma_scale = tuple(sigma_scale) if isinstance(sigma_scale, (tuple, list)) else float(sigma_scale)
        self.padding_mode = padding_mode
        self.cval = float(cval)
        self.progress = bool(progress)
        self._cached: Optional[tuple[tuple, _Plan]] = None  # last plan, reused across attack steps

    def __repr__(self) -> str:
        return (
            f"WindowedInferer(roi_size={self.roi_size}, sw_batch_size={self.sw_batch_size}, "
            f"overlap={self.overlap}, mode={self.mode!r}, sigma_scale={self.sigma_scale}, "
            f"padding_mode={self.padding_mode!r}, cval={self.cval})"
        )

    @classmethod
    def from_monai(cls, inferer: Any) -> "WindowedInferer":
        """The :class:`WindowedInferer` equivalent to a ``monai.inferers.SlidingWindowInferer``.

        Copies ``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``, ``sigma_scale``,
        ``padding_mode``, ``cval`` and ``progress``. Options without an equivalent here
        (``sw_device``/``device`` different from the input's, ``buffer_steps``,
        ``cpu_thresh``, ``with_coord``) raise ``ValueError``.

        Args:
            inferer: a ``monai.inferers.SlidingWindowInferer``.
        """
        from monai.inferers import SlidingWindowInferer

        if not isinstance(inferer, SlidingWindowInferer):
            raise ValueError(f"inferer must be a monai.inferers.SlidingWindowInferer, got {type(inferer).__name__}.")
        for name in ("sw_device", "device", "buffer_steps", "cpu_thresh"):
            if getattr(inferer, name, None) is not None:
                raise ValueError(
                    f"inferer.{name} must be None to compute window-by-window gradients, "
                    f"got {getattr(inferer, name)!r}."
                )
        if getattr(inferer, "with_coord", False):
            raise ValueError("inferer.with_coord must be False to compute window-by-window gradients, got True.")
        return cls(
            roi_size=inferer.roi_size,
            sw_batch_size=inferer.sw_batch_size,
            overlap=inferer.overlap,
            mode=inferer.mode,
            sigma_scale=inferer.sigma_scale,
            padding_mode=inferer.padding_mode,
            cval=inferer.cval,
            progress=inferer.progress,
        )

    # ---------------------------------------------------------------- public call
    def __call__(self, inputs: torch.Tensor, network: Network) -> torch.Tensor:
        """Stitched logits of ``network`` over ``inputs``, differentiable w.r.t. ``inputs`` only.

        Args:
            inputs: images ``(B, C, *spatial)`` float (any number of spatial dims matching
                ``roi_size``). A MONAI ``MetaTensor`` is treated as a plain tensor.
            network: deterministic callable (``nn.Module`` in eval mode) mapping windows
                ``(n, C, *roi_size)`` to logits ``(n, K, *roi_size)``.

        Returns:
            logits ``(B, K, *spatial)`` in ``inputs.dtype``; they require grad when ``inputs``
            does (and grad mode is on), with the backward described in the class docstring.

        Shape:
            inputs ``(B, C, *spatial)`` -> ``(B, K, *spatial)``.
        """
        if not torch.is_tensor(inputs):
            raise ValueError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}.")
        if type(inputs) is not torch.Tensor and hasattr(inputs, "as_tensor"):  # MetaTensor: keep the graph
            inputs = inputs.as_tensor()
        if inputs.ndim < 3:
            raise ValueError(f"inputs must be (B, C, *spatial) with >= 1 spatial dim, got shape {tuple(inputs.shape)}.")
        if not inputs.is_floating_point():
            raise ValueError(f"inputs must be a floating-point tensor, got dtype {inputs.dtype}.")
        if not callable(network):
            raise ValueError(f"network must be callable, got {type(network).__name__}.")
        plan = self._plan(inputs)
        if torch.is_grad_enabled() and inputs.requires_grad:
            if isinstance(network, nn.Module):
                training = [n or type(network).__name__ for n, m in network.named_modules() if m.training]
                if training:
                    raise ValueError(
                        "network must be in eval mode (network.eval()) for window-by-window gradients: "
                        f"the windows are evaluated twice; got training=True for {training[:3]}."
                    )
            return _WindowedVJP.apply(inputs, network, plan, self)
        with torch.no_grad():
            return self._stitch(inputs, network, plan)

    # ---------------------------------------------------------------- internals
    def _plan(self, x: torch.Tensor) -> _Plan:
        """Scan grid, padding and importance map for inputs shaped like ``x`` (MONAI's rules); the last
        one is cached, so attack steps on the same volume neither rebuild it nor sync with the device."""
        key = (tuple(x.shape), x.dtype, x.device, self.roi_size, self.overlap, self.mode, self.sigma_scale,
               self.sw_batch_size)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        plan = self._build_plan(x)
        self._cached = (key, plan)
        return plan

    def _build_plan(self, x: torch.Tensor) -> _Plan:
        from monai.data.utils import compute_importance_map, dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        n = x.ndim - 2
        spatial = tuple(int(s) for s in x.shape[2:])
        roi = _per_dim("roi_size", self.roi_size, n, x.shape)
        overlap = _per_dim("overlap", self.overlap, n, x.shape)
        sigma = _per_dim("sigma_scale", self.sigma_scale, n, x.shape)
        # volume smaller than the window: pad symmetrically (extra voxel after), as MONAI does
        diff = [max(r - s, 0) for r, s in zip(roi, spatial)]
        pad = tuple(p for d in reversed(diff) for p in (d // 2, d - d // 2))
        crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(diff, spatial))
        padded = tuple(max(r, s) for r, s in zip(roi, spatial))
        interval = _get_scan_interval(padded, roi, n, overlap)
        slices = tuple(tuple(s) for s in dense_patch_slices(padded, roi, interval))
        nw, b, bs = len(slices), x.shape[0], self.sw_batch_size
        total = nw * b
        batches = tuple(
            tuple((slice(i // nw, i // nw + 1), slice(None)) + slices[i % nw] for i in range(s, min(s + bs, total)))
            for s in range(0, total, bs)
        )
        imp = compute_importance_map(roi, mode=self.mode, sigma_scale=sigma, device=x.device, dtype=x.dtype)
        logger.debug("sliding window: %d windows of %s over %s (padded %s), %d batches", nw, roi, spatial,
                     padded, len(batches))
        return _Plan(pad=pad, crop=crop, padded_size=padded, slices=slices, batches=batches,
                     importance=imp[None, None])

    def _pad(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        if not plan.padded:
            return x
        if self.padding_mode == "constant":
            return F.pad(x, list(plan.pad), mode="constant", value=self.cval)
        return F.pad(x, list(plan.pad), mode=self.padding_mode)  # cval only applies to "constant"

    def _windows(self, xp: torch.Tensor, batch: tuple[IndexTuple, ...]) -> torch.Tensor:
        """Gather one window batch ``(n, C, *roi)``: one strided copy per window, as MONAI does
        (a view when ``sw_batch_size`` is 1)."""
        if self.sw_batch_size > 1:
            return torch.cat([xp[idx] for idx in batch])
        return xp[batch[0]]

    def _run(self, network: Network, win: torch.Tensor, roi: tuple[int, ...]) -> torch.Tensor:
        out = first_head(network(win))
        if not torch.is_tensor(out):
            raise ValueError(f"network must return a tensor (or a tuple/list of them), got {type(out).__name__}.")
        if out.ndim != win.ndim or out.shape[0] != win.shape[0] or tuple(out.shape[2:]) != roi:
            raise ValueError(
                f"network output must be (n, K, *roi_size) = ({win.shape[0]}, K, {', '.join(map(str, roi))}) "
                f"for windows {tuple(win.shape)}, got {tuple(out.shape)}."
            )
        return out

    def _progress(self, batches: Sequence) -> Any:
        if not self.progress:
            return batches
        from tqdm.auto import tqdm

        return tqdm(batches, desc="windows", leave=False)

    def _count_map(self, plan: _Plan) -> torch.Tensor:
        """Summed importance map ``(1, 1, *padded)``: one window-sized add per window, in scan order."""
        w = plan.importance
        count = torch.zeros((1, 1) + plan.padded_size, dtype=w.dtype, device=w.device)
        for s in plan.slices:
            count[(slice(None), slice(None)) + s] += w
        return count

    def _stitch(self, x: torch.Tensor, network: Network, plan: _Plan) -> torch.Tensor:
        """No-grad forward: stitched logits ``(B, K, *spatial)`` (MONAI's order of operations)."""
        xp = self._pad(x, plan)
        w = plan.importance
        roi = tuple(w.shape[2:])
        out: Optional[torch.Tensor] = None
        for batch in self._progress(plan.batches):
            seg = self._run(network, self._windows(xp, batch), roi)
            seg = (seg * w).to(seg.dtype)
            if out is None:
                out = torch.zeros((x.shape[0], seg.shape[1]) + plan.padded_size, dtype=x.dtype, device=x.device)
            for idx, p in zip(batch, seg):
                out[idx] += p
        assert out is not None
        out /= self._count_map(plan)
        if plan.padded:
            out = out[(slice(None), slice(None)) + plan.crop].contiguous()
        return out

    def _input_grad(self, x: torch.Tensor, network: Network, plan: _Plan, grad_out: torch.Tensor,
                    autocast: tuple[bool, torch.dtype]) -> torch.Tensor:
        """VJP of the stitched logits: window batch by window batch, the same batches as the forward.

        The count map is recomputed here rather than kept from the forward pass, so that it is not
        alive while the loss and its gradient are (one volume-sized tensor less at the peak).

        Shape:
            x ``(B, C, *spatial)``, grad_out ``(B, K, *spatial)`` -> ``(B, C, *spatial)``.
        """
        with torch.no_grad():
            xp = self._pad(x.detach(), plan)
            g = grad_out
            if plan.padded:
                g = grad_out.new_zeros(grad_out.shape[:2] + plan.padded_size)
                g[(slice(None), slice(None)) + plan.crop] = grad_out
            grad_xp = torch.zeros_like(xp)
            count = self._count_map(plan)
        w = plan.importance
        roi = tuple(w.shape[2:])
        enabled, dtype = autocast
        for batch in self._progress(plan.batches):
            win = self._windows(xp, batch).detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device_type=x.device.type, dtype=dtype, enabled=enabled):
                seg = self._run(network, win, roi)
            with torch.no_grad():
                # d(out / count)/d(out) then d(seg * w)/d(seg), in the order autograd applies them
                gw = torch.cat([g[idx] / count[(slice(None), slice(None)) + idx[2:]] for idx in batch]) * w
                gw = gw.to(seg.dtype)
            (gx,) = torch.autograd.grad(seg, [win], gw, allow_unused=True)
            if gx is None:  # the network ignores its input
                continue
            with torch.no_grad():
                for idx, gi in zip(batch, gx):
                    grad_xp[idx] += gi
            del seg, gx, win
        if not plan.padded:
            return grad_xp
        with torch.enable_grad():  # fold the padding's gradient back (crop, or reflect/replicate/circular)
            xr = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(self._pad(xr, plan), [xr], grad_xp)
        return gx


class _WindowedVJP(torch.autograd.Function):
    """Stitched sliding-window logits; backward = window-by-window vector-Jacobian product."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, network: Network, plan: _Plan, inferer: WindowedInferer) -> torch.Tensor:
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        with torch.no_grad():
            out = inferer._stitch(x, network, plan)
        ctx.save_for_backward(x)
        ctx.network, ctx.plan, ctx.inferer = network, plan, inferer
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None]:
        (x,) = ctx.saved_tensors
        gx = ctx.inferer._input_grad(x, ctx.network, ctx.plan, grad_out, ctx.autocast)
        return gx.to(x.dtype), None, None, None


def full_graph_inferer(
    roi_size: Union[Sequence[int], int],
    sw_batch_size: int = 4,
    overlap: Union[Sequence[float], float] = 0.25,
    mode: str = "gaussian",
    sigma_scale: Union[Sequence[float], float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
) -> Any:
    """MONAI's ``SlidingWindowInferer`` with :class:`WindowedInferer`'s defaults: plain autograd
    through every window (memory grows with the number of windows), for comparison.

    Args:
        roi_size: window size in voxels. sw_batch_size: windows per call. overlap: in [0, 1).
        mode: ``"constant"`` or ``"gaussian"``. sigma_scale: gaussian sigma / window size.
        padding_mode: ``F.pad`` mode when the volume is smaller than the window. cval: fill value.

    Returns:
        ``monai.inferers.SlidingWindowInferer`` (arguments validated as by :class:`WindowedInferer`).

    Shape:
        inputs ``(B, C, *spatial)`` -> logits ``(B, K, *spatial)``.
    """
    from monai.inferers import SlidingWindowInferer

    w = WindowedInferer(roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval)
    return SlidingWindowInferer(
        roi_size=w.roi_size, sw_batch_size=w.sw_batch_size, overlap=w.overlap, mode=w.mode,
        sigma_scale=w.sigma_scale, padding_mode=w.padding_mode, cval=w.cval,
    )
