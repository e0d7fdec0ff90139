"""KeptPasses: graphs kept in an arena give the gradients plain autograd gives, within the budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from volattack.inference.kept_passes import KeptPasses


class _Reuse(nn.Module):
    """Saves tensors whose storages are freed during the pass, so that later saved tensors can get
    the same addresses (a cache keyed on addresses alone would hand back the wrong data)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        outs = []
        for k in range(4):
            a = self.conv(x * (k + 1.0))  # a new buffer per iteration, the previous one freed
            outs.append(torch.sin(a).sum(dim=1, keepdim=True))  # sin saves a
            del a
        return torch.cat(outs, dim=1) * torch.cos(x)


def _plain_grad(net, w, g):
    wi = w.clone().requires_grad_(True)
    (gi,) = torch.autograd.grad(net(wi), wi, g)
    return gi


@pytest.mark.parametrize("make", [
    lambda: _Reuse(),
    lambda: nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True),
                          nn.LeakyReLU(inplace=True), nn.Conv3d(4, 3, 3, padding=1)),
    lambda: nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Sigmoid()),  # its backward reads its output
])
def test_kept_pass_gives_the_plain_autograd_gradient(make):
    torch.manual_seed(0)
    net = make().eval()
    w = torch.randn(1, 1, 6, 6, 6)
    out0 = net(w)
    g = torch.randn_like(out0)
    keep = KeptPasses(2 ** 26)
    out = keep.run(net, w, (0,))
    assert torch.equal(out, out0.detach()) and not out.requires_grad
    wi, kept_out = keep.pop((0,))
    (gi,) = torch.autograd.grad(kept_out, wi, g)
    assert gi.abs().max() > 0
    torch.testing.assert_close(gi, _plain_grad(net, w, g), rtol=0, atol=0)
    assert keep.pop((0,)) is None  # handed over once


def test_budget_decides_how_many_passes_are_kept_and_release_forgets_them():
    torch.manual_seed(0)
    net = _Reuse().eval()
    w = torch.randn(1, 1, 6, 6, 6)
    probe = KeptPasses(2 ** 26)
    probe.run(net, w, (0,))
    per = probe.per_pass
    assert per is not None and 0 < per <= probe.used
    keep = KeptPasses(int(2.5 * per))
    outs = [keep.run(net, w * (i + 1), (i,)) for i in range(4)]
    assert sorted(keep.kept) == [(0,), (1,)] and keep.used <= keep.budget
    assert all(torch.equal(o, net(w * (i + 1)).detach()) for i, o in enumerate(outs))  # same values kept or not
    g = torch.randn_like(outs[1])
    wi, out = keep.pop((1,))
    (gi,) = torch.autograd.grad(out, wi, g)
    torch.testing.assert_close(gi, _plain_grad(net, w * 2, g), rtol=0, atol=0)
    keep.release()
    assert keep.kept == {} and keep.used == 0


def test_a_pass_larger_than_the_arena_is_not_kept():
    torch.manual_seed(0)
    net = _Reuse().eval()
    w = torch.randn(1, 1, 6, 6, 6)
    keep = KeptPasses(1024)  # smaller than one pass
    out = keep.run(net, w, (0,))
    assert keep.kept == {} and keep.used == 0
    assert torch.equal(out, net(w).detach())
    keep.run(net, w, (1,))  # later passes run without autograd
    assert keep.kept == {}
