"""Autograd graphs of network passes kept from a forward pass to its backward, in one arena.

A whole-volume loss needs every sliding-window pass's output before any pass's backward. Keeping
the graphs of the passes that fit a memory budget saves their recomputation in the backward pass
(:class:`~volattack.inference.nnunet_head.NnunetHead`). Kept where autograd left them, the saved
activations are heap blocks interleaved with the forward's short-lived buffers; glibc's heap cannot
give back the memory between long-lived blocks, and the volume-sized buffers the forward and the
backward allocate around them then add up instead of reusing one another (measured in
``benchmarks/bench_nnunet.py``: about 200 bytes per source voxel more than without kept graphs).
:class:`KeptPasses` therefore copies every tensor autograd saves for a kept pass into one
preallocated byte arena (the technique of ``torch.autograd.graph.save_on_cpu``, with a bump
allocator instead of pinned host copies): the originals are freed as the pass goes on, the heap
holds only short-lived buffers, and the arena is one mapping of at most the budget, given back as a
whole when the cache is released, or handed to the next cache (:meth:`KeptPasses.take_arena`: the
nnU-Net head reuses it in the next attack step, whose copies then land on resident pages instead of
faulting in a fresh mapping).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

_ALIGN = 64  # bytes; every copy starts on a multiple (any dtype's item size divides it)


class KeptPasses:
    """The autograd graphs of network passes kept within ``budget`` bytes.

    :meth:`run` evaluates one pass; while the kept passes' input leaves and saved tensors (each
    storage once, parameters excluded) stay within ``budget``, the pass's input leaf is made in the
    arena, its saved tensors are copied there, the output's own values are freed (its graph keeps
    copies of whatever it needs) and ``(input leaf, output)`` is kept under ``key``; beyond it the pass
    runs without autograd and the backward recomputes it. :meth:`pop` hands a kept pass to the
    backward and forgets it. ``per_pass`` is the largest number of bytes one kept pass used.

    Args:
        budget: bytes (>= 0).
    """

    def __init__(self, budget: int, arena: Optional[torch.Tensor] = None) -> None:
        self.budget = int(budget)
        self.used = 0
        self.per_pass: Optional[int] = None
        self.kept: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cap = self.budget - self.budget % _ALIGN  # the arena's bytes
        ok = arena is not None and arena.dtype == torch.uint8 and arena.numel() == self._cap
        self._arena: Optional[torch.Tensor] = arena if ok else None  # a previous cache's, reused
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._top = 0  # bytes of the arena in use
        self._full = False  # a pass overflowed the arena: run the rest without autograd

    def _views(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._typed:
            self._typed[dtype] = self._arena.view(dtype)  # type: ignore[union-attr]
        return self._typed[dtype]

    def _alloc(self, nbytes: int) -> Optional[int]:
        """Offset of ``nbytes`` new bytes in the arena (aligned), or ``None`` when they do not fit."""
        off = -(-self._top // _ALIGN) * _ALIGN
        if off + nbytes > self._arena.numel():  # type: ignore[union-attr]
            return None
        self._top = off + nbytes
        return off

    def _leaf(self, w: torch.Tensor) -> Optional[torch.Tensor]:
        """A contiguous copy of ``w`` in the arena, requiring grad (the pass's input leaf)."""
        off = self._alloc(w.numel() * w.element_size())
        if off is None:
            return None
        leaf = torch.empty(0, dtype=w.dtype, device=w.device).set_(
            self._arena.untyped_storage(), off // w.element_size(), w.shape)  # type: ignore[union-attr]
        with torch.no_grad():
            leaf.copy_(w)
        return leaf.requires_grad_(True)

    def run(self, net: nn.Module, w: torch.Tensor, key: tuple[int, ...]) -> torch.Tensor:
        """``net(w)`` (detached), its graph kept under ``key`` when it fits the budget."""
        if self._full or (self.per_pass is not None and self.used + self.per_pass > self.budget):
            with torch.no_grad():
                return net(w.contiguous())
        if self._arena is None or (self._top == 0 and self._arena.device != w.device):  # a reused one: same device
            self._arena = torch.empty(self._cap, dtype=torch.uint8, device=w.device)
            self._typed.clear()
        arena, start = self._arena, self._top
        home = arena.untyped_storage().data_ptr()
        copies: dict[tuple[int, int], int] = {}
        alive: list[torch.Tensor] = []  # the originals, so that no storage address is reused within the pass
        overflow = False

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal overflow
            if isinstance(t, nn.Parameter) or t.device != arena.device:
                return t
            st = t.untyped_storage()
            if st.data_ptr() == home:  # already in the arena (the input leaf)
                return t
            tag = (st.data_ptr(), t._version)
            if tag not in copies:
                off = self._alloc(st.nbytes())
                if off is None:
                    overflow = True
                    return t
                src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
                with torch.no_grad():
                    arena[off:off + st.nbytes()].copy_(src)
                copies[tag] = off
                alive.append(t)
            base = copies[tag] // t.element_size()
            return self._views(t.dtype).as_strided(t.size(), t.stride(), base + t.storage_offset())

        wi = self._leaf(w)
        if wi is None:
            self._full = True
            with torch.no_grad():
                return net(w.contiguous())
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(wi)
        del alive
        size = self._top - start
        self.per_pass = size if self.per_pass is None else max(self.per_pass, size)
        result = out.detach().clone()
        if overflow or self.used + size > self.budget:
            self._top = start  # the pass's copies are dropped with its graph
            self._full = self._full or overflow
            return result
        # the output's values are not needed any more (what its graph saved is in the arena): free
        # them, keeping the tensor (its shape and graph) for the backward
        out.untyped_storage().resize_(0)
        self.used += size
        self.kept[key] = (wi, out)
        return result

    def pop(self, key: tuple[int, ...]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The kept ``(input leaf, output)`` of ``key`` (forgotten here), or ``None``."""
        return self.kept.pop(key, None)

    def take_arena(self) -> Optional[torch.Tensor]:
        """:meth:`release`, handing the arena over (for the next cache: its pages are resident)."""
        arena = self._arena
        self.release()
        return arena

    def release(self) -> None:
        """Forget every kept pass and the arena."""
        self.kept.clear()
        self._typed.clear()
        self._arena = None
        self._top = self.used = 0


__all__ = ["KeptPasses"]
