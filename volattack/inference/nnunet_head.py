"""nnU-Net v2's deployed inference as one differentiable head with an exact, memory-lean gradient.

``nnUNetPredictor`` (Isensee et al., Nature Methods 2021; nnunetv2 2.5+) predicts a
preprocessed case by: padding to the patch size, a sliding window at ``tile_step_size``
(``compute_steps_for_sliding_window``) weighted by ``compute_gaussian(patch, 1/8, 10)``, test-time
mirroring over the checkpoint's ``inference_allowed_mirroring_axes`` (the network's logits
averaged over every non-empty combination of axes and the unflipped pass), the window logits
accumulated in float16 buffers and divided by the summed weights, the folds' logits averaged (in
float16), then for export: the logits resampled back to the cropped grid (order 1, stored as
float16) and ``softmax``. :class:`NnunetHead` computes exactly that, from the resampling of the
normalised image to the configuration's spacing to the probabilities on the cropped grid:

``(1, C, *cropped) normalised image -> (1, K, *cropped) probabilities``

``fp16_accumulation=True`` rounds where nnU-Net stores float16 (window sums, weight sums, the
division, the fold mean, the resampled logits), which reproduces its probabilities exactly;
``False`` keeps float32 throughout (agreement to about 2e-3). The rounding is treated as the
identity in the backward pass (straight-through).

Gradient: a whole-volume loss needs every window's logits before any window's backward. The
forward pass keeps the autograd graphs of as many network passes as fit ``keep_activations_mb``
(measured from the tensors autograd saves for the first pass), their saved tensors copied into one
arena (:class:`~volattack.inference.kept_passes.KeptPasses`, so that they do not pin the heap
under the volume-sized buffers); the backward pass runs the
vector-Jacobian product of each kept pass directly and recomputes the others window by window,
fold by fold and flip by flip, each recomputed pass followed at once by its VJP, so that beyond the
budget at most one window's activations are alive (the technique of
:class:`~volattack.inference.sliding.WindowedInferer`). With ``keep_activations_mb=0`` no graph is
kept: every pass runs twice (no-grad forward, recomputation), the peak memory is one window's
activations plus O(voxels) buffers. With a budget the peak grows by at most that budget, and a pass
that was kept costs one forward and one backward, as the bare network would. The two give the same
gradient. The softmax and the back-resampling are differentiated in closed form
(``p * (g - <p, g>)`` and the transposed resampling matrices).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from volattack.checks import check_number
from volattack.inference.kept_passes import KeptPasses
from volattack.inference.nnunet_steps import NnunetResize
from volattack.utils import heap_allocations


def mirror_combinations(axes: Optional[Sequence[int]]) -> list[tuple[int, ...]]:
    """The flips nnU-Net averages: ``()`` (no flip) then every non-empty combination of the
    spatial ``axes`` (0-based), as tensor dims of a ``(1, C, X, Y, Z)`` window, in its order."""
    if not axes:
        return [()]
    dims = [int(a) + 2 for a in axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


class NnunetHead(nn.Module):
    """Resample, pad, gaussian sliding window with mirroring TTA, fold mean, resample back, softmax.

    Args:
        networks: one network per fold, ``(1, C, *patch)`` -> ``(1, K, *patch)`` logits (eval mode,
            no deep supervision).
        patch_size: the configuration's patch size (3 ints).
        tile_step_size: window step as a fraction of the patch, in ``(0, 1]``.
        mirror_axes: spatial axes to mirror over (``None`` or empty: no mirroring).
        resize_in: the normalised cropped image -> the configuration's spacing.
        resize_out: the logits back to the cropped grid.
        fp16_accumulation: emulate nnU-Net's float16 buffers.
        keep_activations_mb: memory budget (MiB, >= 0) for the autograd graphs of network passes
            kept from the forward pass to the backward pass; passes beyond it are recomputed.

    Shape:
        ``(1, C, *resize_in.in_shape)`` -> ``(1, K, *resize_in.in_shape)`` probabilities.
    """

    def __init__(self, networks: Sequence[nn.Module], patch_size: Sequence[int], tile_step_size: float,
                 mirror_axes: Optional[Sequence[int]], resize_in: NnunetResize, resize_out: NnunetResize,
                 fp16_accumulation: bool = True, keep_activations_mb: float = 1024.0) -> None:
        super().__init__()
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        if not networks or not all(isinstance(n, nn.Module) for n in networks):
            raise ValueError(f"networks must be a non-empty list of torch.nn.Module, got {networks!r}.")
        if not 0 < float(tile_step_size) <= 1:
            raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size!r}.")
        self.networks = nn.ModuleList(list(networks))
        self.patch = tuple(int(p) for p in patch_size)
        if len(self.patch) != 3:
            raise ValueError(f"patch_size must be 3 sizes (a 3-D configuration), got {patch_size!r}.")
        self.tile_step_size = float(tile_step_size)
        self.flips = mirror_combinations(mirror_axes)
        self.mirror_axes = tuple(int(a) for a in (mirror_axes or ()))
        self.resize_in, self.resize_out = resize_in, resize_out
        self.fp16 = bool(fp16_accumulation)
        check_number("keep_activations_mb", keep_activations_mb, low=0)
        self.keep_bytes = int(float(keep_activations_mb) * 2 ** 20)
        g16 = compute_gaussian(self.patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
        self.register_buffer("gauss16", g16.clone(), persistent=False)
        self._layout = self._plan_windows()
        #: network passes whose graphs the last differentiable forward kept, and the bytes one pass saves
        self.last_kept: int = 0
        self._spare_arena: Optional[torch.Tensor] = None  # the last backward's KeptPasses arena
        self.last_pass_bytes: Optional[int] = None

    def _plan_windows(self) -> dict[str, Any]:
        """Padding (``pad_nd_image``'s split) and window corners (``compute_steps_for_sliding_window``)."""
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        shape = self.resize_in.out_shape
        padded = tuple(max(s, p) for s, p in zip(shape, self.patch))
        lo = [(q - s) // 2 for s, q in zip(shape, padded)]
        steps = compute_steps_for_sliding_window(padded, self.patch, self.tile_step_size)
        slicers = [tuple(slice(a, a + p) for a, p in zip(corner, self.patch)) for corner in itertools.product(*steps)]
        return {"shape": shape, "padded": padded, "lo": lo, "slicers": slicers}

    @property
    def num_windows(self) -> int:
        """Windows per fold and flip."""
        return len(self._layout["slicers"])

    def network_passes(self) -> int:
        """Network evaluations of one forward: windows x flips x folds."""
        return self.num_windows * len(self.flips) * len(self.networks)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        lay = self._layout
        if lay["padded"] == lay["shape"]:
            return x
        pads: list[int] = []
        for d in reversed(range(3)):
            extra = lay["padded"][d] - lay["shape"][d]
            pads += [lay["lo"][d], extra - lay["lo"][d]]
        return F.pad(x, pads, mode="constant", value=0.0)

    def _unpad(self, x: torch.Tensor) -> torch.Tensor:
        lay = self._layout
        idx = tuple(slice(a, a + s) for a, s in zip(lay["lo"], lay["shape"]))
        return x[(slice(None), slice(None)) + idx]

    def _round(self, t: torch.Tensor) -> torch.Tensor:
        return t.half().float() if self.fp16 else t

    def _mirrored(self, net: nn.Module, w: torch.Tensor, keep: Optional["KeptPasses"] = None,
                  key: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """nnU-Net's ``_internal_maybe_mirror_and_predict`` (fp32 sum in its order, then the mean).
        With ``keep``, each flip's pass is offered to the cache (its graph kept if it fits)."""
        pred = None
        for f, dims in enumerate(self.flips):
            wi = torch.flip(w, dims) if dims else w
            out = keep.run(net, wi, key + (f,)) if keep is not None else net(wi)
            out = torch.flip(out, dims) if dims else out
            pred = out if pred is None else pred + out
        return pred / len(self.flips) if len(self.flips) > 1 else pred

    def fold_logits(self, xpad: torch.Tensor, keep: Optional["KeptPasses"] = None) -> torch.Tensor:
        """The mean over folds of the gaussian-weighted window logits on the padded grid (no grad).

        ``keep``: a :class:`KeptPasses` that keeps the graphs of the passes that fit its budget.

        Shape:
            ``(1, C, *padded)`` -> ``(1, K, *padded)`` float32 (float16 values when emulating).
        """
        g32 = self.gauss16.float()
        acc_dtype = torch.float16 if self.fp16 else torch.float32
        total = None
        count = self._count_map(acc_dtype, xpad.device)
        for i, net in enumerate(self.networks):
            acc = None
            for j, sl in enumerate(self._layout["slicers"]):
                idx = (slice(None), slice(None)) + sl
                with heap_allocations():  # window-sized: the heap's blocks, reused pass after pass
                    pred = self._mirrored(net, xpad[idx].contiguous(), keep, (i, j))[0] * g32
                if acc is None:
                    acc = torch.zeros((pred.shape[0],) + tuple(xpad.shape[2:]), dtype=acc_dtype, device=xpad.device)
                acc[(slice(None),) + sl] += pred
            acc = torch.div(acc, count)
            total = acc if total is None else total + acc
        if len(self.networks) > 1:
            total = total / len(self.networks)
        return total[None].float()

    def _count_map(self, dtype: torch.dtype, device: Optional[torch.device] = None) -> torch.Tensor:
        g = self.gauss16 if dtype == torch.float16 else self.gauss16.float()
        count = torch.zeros(self._layout["padded"], dtype=dtype, device=device if device is not None else g.device)
        for sl in self._layout["slicers"]:
            count[sl] += g
        return count

    def probabilities(self, x: torch.Tensor, keep: Optional["KeptPasses"] = None) -> torch.Tensor:
        """The forward computation without autograd (see the module docstring). The logits are
        resampled back one class at a time (float64 as nnU-Net, without K float64 volumes alive).
        ``keep`` collects the graphs of the network passes that fit its budget."""
        with torch.no_grad():
            xpad = self._pad(self.resize_in(x).float())
            logits = self._unpad(self.fold_logits(xpad, keep))
            out = logits.new_empty(logits.shape[:2] + tuple(self.resize_in.in_shape))
            for k in range(logits.shape[1]):
                out[:, k:k + 1] = self._round(self.resize_out(logits[:, k:k + 1]).float())
            del logits, xpad
            return torch.softmax(out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[0] != 1 or tuple(x.shape[2:]) != self.resize_in.in_shape:
            raise ValueError(f"x must be (1, C, {', '.join(map(str, self.resize_in.in_shape))}), got {tuple(x.shape)}.")
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.probabilities(x)
        return _HeadVJP.apply(x, self)

    def input_grad(self, x: torch.Tensor, grad_p: torch.Tensor, p: torch.Tensor,
                   keep: Optional["KeptPasses"] = None) -> torch.Tensor:
        """The vector-Jacobian product of :meth:`probabilities` at ``x`` for the cotangent ``grad_p``
        (``keep``: the passes whose graphs the forward kept; the others are recomputed).

        Shape:
            x ``(1, C, *cropped)``, grad_p and p ``(1, K, *cropped)`` -> ``(1, C, *cropped)``.
        """
        with torch.no_grad():
            g = grad_p - (p * grad_p).sum(dim=1, keepdim=True)
            g.mul_(p)  # the softmax's VJP, p * (grad_p - <p, grad_p>)
            gl = self._grad_buffer(g.shape[:2], g.device)
            lay = self._layout
            inner = (slice(None),) + tuple(slice(a, a + n) for a, n in zip(lay["lo"], lay["shape"]))
            for k in range(g.shape[1]):  # the resampling's transpose, one class at a time
                gl[(slice(None), slice(k, k + 1)) + inner[1:]] = self.resize_out.adjoint(g[:, k:k + 1])
            del g
            gl.div_(self._count_map(torch.float16 if self.fp16 else torch.float32, gl.device).float())
            if len(self.networks) > 1:
                gl.div_(len(self.networks))
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            r = self.resize_in(xi).float()
        grad_xpad = self._window_vjp(self._pad(r.detach()), gl, keep)
        del gl
        (gx,) = torch.autograd.grad(r, [xi], self._unpad(grad_xpad))
        return gx

    def _grad_buffer(self, lead: Sequence[int], device: torch.device) -> torch.Tensor:
        """A zero float32 ``(*lead, *padded)`` gradient buffer."""
        return torch.zeros(tuple(lead) + tuple(self._layout["padded"]), dtype=torch.float32, device=device)

    def _window_vjp(self, xpad: torch.Tensor, g: torch.Tensor, keep: Optional["KeptPasses"] = None) -> torch.Tensor:
        """Sum over folds, windows and flips of each network pass's input VJP: a kept pass's graph
        is used (and released), any other pass is recomputed (one recomputed pass alive)."""
        gauss = self.gauss16.float()
        grad = torch.zeros_like(xpad)
        scale = 1.0 / len(self.flips)
        for i, net in enumerate(self.networks):
            for j, sl in enumerate(self._layout["slicers"]):
                idx = (slice(None), slice(None)) + sl
                with heap_allocations():  # window-sized (see fold_logits)
                    gw = g[idx] * gauss * scale
                    w = xpad[idx]
                    for f, dims in enumerate(self.flips):
                        kept = keep.pop((i, j, f)) if keep is not None else None
                        if kept is not None:
                            wi, out = kept
                        else:
                            wi = (torch.flip(w, dims) if dims else w).contiguous().requires_grad_(True)
                            with torch.enable_grad():
                                out = net(wi)
                        (gi,) = torch.autograd.grad(out, [wi], torch.flip(gw, dims) if dims else gw)
                        grad[idx] += torch.flip(gi, dims) if dims else gi
                        del out, gi, wi
        return grad

    def describe(self) -> dict[str, Any]:
        """Plain description for reports and cache keys."""
        return {"kind": "nnunet_head", "folds": len(self.networks), "patch_size": list(self.patch),
                "tile_step_size": self.tile_step_size, "mirror_axes": list(self.mirror_axes),
                "fp16_accumulation": self.fp16, "windows": self.num_windows,
                "resample_in": self.resize_in.describe(), "resample_out": self.resize_out.describe()}


class _HeadVJP(torch.autograd.Function):
    """Probabilities of :class:`NnunetHead`; backward = window-, fold- and flip-wise VJPs, using
    the passes the forward kept (:class:`KeptPasses`) and recomputing the others."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, head: NnunetHead) -> torch.Tensor:
        arena, head._spare_arena = head._spare_arena, None  # at most one live cache owns it
        keep = KeptPasses(head.keep_bytes, arena) if head.keep_bytes > 0 else None
        p = head.probabilities(x, keep)
        head.last_kept = len(keep.kept) if keep is not None else 0
        head.last_pass_bytes = keep.per_pass if keep is not None else None
        ctx.save_for_backward(x, p)
        ctx.head, ctx.keep = head, keep
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_p: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        x, p = ctx.saved_tensors
        keep, ctx.keep = ctx.keep, None
        try:
            return ctx.head.input_grad(x, grad_p, p, keep).to(x.dtype), None
        finally:
            if keep is not None:
                ctx.head._spare_arena = keep.take_arena()  # the next forward reuses its resident pages


__all__ = ["NnunetHead", "mirror_combinations"]
