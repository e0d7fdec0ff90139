"""WindowedInferer: forward equals MONAI's sliding-window inference, backward equals autograd
through it, window by window, with no parameter gradients."""

from __future__ import annotations

import math

import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from torch import nn

import volattack
from volattack.inference.sliding import WindowedInferer, full_graph_inferer


def _net(seed: int = 0, in_channels: int = 1, k: int = 3, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Small conv net with BatchNorm (eval mode), weights drawn from a local generator."""
    net = nn.Sequential(
        nn.Conv3d(in_channels, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Conv3d(4, k, 3, padding=1),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        net[1].running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        net[1].running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return net.to(dtype).eval()


def _rand(shape, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


ROI = (8, 8, 8)
SHAPES = [
    (2, 1, 16, 16, 16),  # multiple of the window, two images
    (1, 1, 20, 13, 11),  # not a multiple
    (1, 2, 6, 16, 12),  # smaller than the window along H: padded
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_forward_equals_monai(shape, overlap, mode, sw_batch_size):
    net = _net(in_channels=shape[1])
    x = _rand(shape)
    ref = sliding_window_inference(x, ROI, sw_batch_size, net, overlap, mode, sigma_scale=0.125)
    out = WindowedInferer(ROI, sw_batch_size, overlap, mode, sigma_scale=0.125)(x, net)
    assert out.shape == (shape[0], 3) + shape[2:] and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # and through the autograd.Function path (input requiring grad)
    out_g = WindowedInferer(ROI, sw_batch_size, overlap, mode)(x.clone().requires_grad_(True), net)
    assert out_g.requires_grad
    torch.testing.assert_close(out_g.detach(), ref, rtol=0, atol=1e-6)


def test_forward_is_bitwise_monai_and_plain_without_grad():
    net = _net()
    x = _rand((2, 1, 20, 13, 11))
    ref = sliding_window_inference(x, ROI, 3, net, 0.25, "gaussian")
    out = WindowedInferer(ROI, 3, 0.25, "gaussian")(x, net)
    assert torch.equal(out, ref)  # same windows, same order of summation
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():  # input requiring grad, grad mode off: plain inference
        assert not WindowedInferer(ROI, 3)(x.clone().requires_grad_(True), net).requires_grad


def test_one_inferer_on_several_shapes():
    net = _net()
    inf = WindowedInferer(ROI, 2, 0.5, "gaussian")
    for shape in [(1, 1, 12, 12, 12), (2, 1, 9, 17, 8), (1, 1, 12, 12, 12)]:
        x = _rand(shape)
        ref = sliding_window_inference(x, ROI, 2, net, 0.5, "gaussian")
        torch.testing.assert_close(inf(x, net), ref, rtol=0, atol=1e-6)
    inf.overlap = 0.0  # changed settings are picked up
    torch.testing.assert_close(inf(x, net), sliding_window_inference(x, ROI, 2, net, 0.0, "gaussian"),
                               rtol=0, atol=1e-6)


def test_metatensor_input_keeps_the_graph():
    from monai.data import MetaTensor

    net = _net()
    x = _rand((1, 1, 12, 10, 9))
    xm = MetaTensor(x.clone()).requires_grad_(True)
    WindowedInferer(ROI, 2, 0.5)(xm, net).sum().backward()
    xp = x.clone().requires_grad_(True)
    sliding_window_inference(xp, ROI, 2, net, 0.5, "gaussian").sum().backward()
    torch.testing.assert_close(torch.as_tensor(xm.grad), xp.grad, rtol=0, atol=1e-5)


def _grads(inferer_a, inferer_b, net, x, seed=3):
    """Input gradients of sum(logits * w) through two inferers."""
    out = []
    w = None
    for inf in (inferer_a, inferer_b):
        xi = x.clone().requires_grad_(True)
        logits = inf(xi, net)
        if w is None:
            w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
        (g,) = torch.autograd.grad((logits * w).sum(), xi)
        out.append(g)
    return out


@pytest.mark.parametrize(
    "shape,overlap,mode,bs,padding_mode",
    [
        ((2, 1, 16, 16, 16), 0.25, "gaussian", 3, "constant"),
        ((1, 1, 20, 13, 11), 0.5, "constant", 1, "constant"),
        ((1, 1, 20, 13, 11), 0.0, "gaussian", 4, "constant"),
        ((1, 2, 6, 16, 12), 0.5, "gaussian", 2, "constant"),
        ((1, 1, 6, 16, 5), 0.25, "gaussian", 3, "reflect"),
        ((1, 1, 6, 16, 5), 0.25, "constant", 3, "replicate"),
        ((1, 1, 6, 16, 5), 0.5, "gaussian", 1, "circular"),
    ],
)
def test_input_gradient_equals_full_graph(shape, overlap, mode, bs, padding_mode):
    net = _net(in_channels=shape[1])
    x = _rand(shape)
    cval = 0.3 if padding_mode == "constant" else 0.0  # torch's pad takes no value for the other modes
    kw = dict(roi_size=ROI, sw_batch_size=bs, overlap=overlap, mode=mode, padding_mode=padding_mode, cval=cval)
    g_full, g_win = _grads(full_graph_inferer(**kw), WindowedInferer(**kw), net, x)
    assert float(g_full.abs().max()) > 1e-3  # a gradient that is not trivially zero
    torch.testing.assert_close(g_win, g_full, rtol=0, atol=1e-5)


def test_gradcheck_float64_tiny():
    net = _net(k=2, dtype=torch.float64)
    inf = WindowedInferer((4, 4, 4), sw_batch_size=2, overlap=0.5, mode="gaussian", padding_mode="reflect")
    x = _rand((1, 1, 6, 5, 3), dtype=torch.float64).requires_grad_(True)  # last dim padded 3 -> 4
    assert torch.autograd.gradcheck(lambda v: inf(v, net), (x,), eps=1e-6, atol=1e-7, fast_mode=True)


def test_no_parameter_grad_and_input_untouched():
    net = _net()
    x = _rand((1, 1, 12, 12, 12))
    x0 = x.clone()
    xi = x.requires_grad_(True)
    WindowedInferer(ROI, 2, 0.5)(xi, net).square().sum().backward()
    assert xi.grad is not None and float(xi.grad.abs().sum()) > 0
    assert all(p.grad is None for p in net.parameters())
    torch.testing.assert_close(x.detach(), x0, rtol=0, atol=0)


def test_windows_are_run_twice_in_the_same_batches():
    net = _net()
    calls = []

    def recorder(win):
        calls.append((torch.is_grad_enabled(), tuple(win.shape), float(win.detach().sum())))
        return net(win)

    x = _rand((2, 1, 16, 12, 8)).requires_grad_(True)  # 3 x 2 x 1 windows per image at overlap 0.5
    WindowedInferer(ROI, sw_batch_size=4, overlap=0.5)(x, recorder).sum().backward()
    n_batches = math.ceil(2 * 3 * 2 * 1 / 4)
    assert len(calls) == 2 * n_batches
    fwd, bwd = calls[:n_batches], calls[n_batches:]
    assert not any(c[0] for c in fwd) and all(c[0] for c in bwd)
    assert [c[1] for c in fwd] == [c[1] for c in bwd] == [(4, 1, 8, 8, 8), (4, 1, 8, 8, 8), (4, 1, 8, 8, 8)]
    assert [c[2] for c in fwd] == [c[2] for c in bwd]


def test_autocast_state_is_replayed_in_backward():
    net = _net()
    states = []

    def recorder(win):
        states.append(torch.is_autocast_enabled("cpu"))
        return net(win)

    x = _rand((1, 1, 12, 8, 8)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = WindowedInferer(ROI, 1, 0.5)(x, recorder)
    out.float().sum().backward()
    assert len(states) == 4 and all(states)


def test_train_mode_is_rejected_for_gradients_and_handled_by_attacks(tiny_model):
    x = _rand((1, 1, 12, 12, 12)).requires_grad_(True)
    inf = WindowedInferer(ROI, 2, 0.25)
    assert tiny_model.training
    with pytest.raises(ValueError, match="network must be in eval mode"):
        inf(x, tiny_model)
    # inference without gradients is allowed (as in MONAI)
    with torch.no_grad():
        assert inf(x, tiny_model.eval()).shape == (1, 3, 12, 12, 12)
    tiny_model.train()
    y = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    adv = volattack.create_attack("pgd", tiny_model, inferer=inf, steps=1, seed=0)(x.detach(), y)
    assert adv.shape == x.shape and tiny_model.training  # eval inside the attack, mode restored


def test_pgd_through_windowed_equals_monai_inferer():
    net = _net()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 1, 20, 18, 14, generator=g)
    y = torch.randint(0, 3, (1, 1, 20, 18, 14), generator=g)
    kw = dict(roi_size=(12, 12, 12), sw_batch_size=2, overlap=0.5, mode="gaussian")
    adv_w = volattack.create_attack("pgd", net, inferer=WindowedInferer(**kw), steps=2, seed=0)(x, y)
    adv_m = volattack.create_attack("pgd", net, inferer=full_graph_inferer(**kw), steps=2, seed=0)(x, y)
    assert float((adv_w - x).abs().max()) > 0
    torch.testing.assert_close(adv_w, adv_m, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


def test_tuple_output_uses_first_head():
    net = _net()
    x = _rand((1, 1, 12, 10, 8))

    def two_heads(w):
        o = net(w)
        return o, o * 2

    ref = sliding_window_inference(x, ROI, 2, two_heads, 0.25, "gaussian")[0]
    torch.testing.assert_close(WindowedInferer(ROI, 2)(x, two_heads), ref, rtol=0, atol=1e-6)


def test_from_monai_copies_settings_and_rejects_unsupported():
    net = _net()
    x = _rand((1, 1, 12, 10, 9))
    m = SlidingWindowInferer(roi_size=ROI, sw_batch_size=2, overlap=0.5, mode="gaussian", sigma_scale=0.2)
    w = WindowedInferer.from_monai(m)
    assert (w.roi_size, w.sw_batch_size, w.overlap, w.mode, w.sigma_scale) == (ROI, 2, 0.5, "gaussian", 0.2)
    torch.testing.assert_close(w(x, net), m(x, net), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="inferer.buffer_steps must be None"):
        WindowedInferer.from_monai(SlidingWindowInferer(roi_size=ROI, buffer_steps=2))
    with pytest.raises(ValueError, match="inferer must be a monai.inferers.SlidingWindowInferer"):
        WindowedInferer.from_monai(w)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(roi_size=0), r"roi_size must be a positive int or a sequence of positive ints, got 0"),
        (dict(roi_size=(8, -1, 8)), r"roi_size must be .* got \(8, -1, 8\)"),
        (dict(roi_size=(8, 8.5, 8)), r"roi_size must be .* got \(8, 8.5, 8\)"),
        (dict(roi_size=True), r"roi_size must be .* got True"),
        (dict(roi_size=ROI, sw_batch_size=0), r"sw_batch_size must be an int >= 1, got 0"),
        (dict(roi_size=ROI, sw_batch_size=2.0), r"sw_batch_size must be an int >= 1, got 2.0"),
        (dict(roi_size=ROI, overlap=1.0), r"overlap must be in \[0, 1\), got 1.0\."),
        (dict(roi_size=ROI, overlap=-0.1), r"overlap must be in \[0, 1\), got -0.1\."),
        (dict(roi_size=ROI, overlap=(0.5, 1.2, 0.0)), r"overlap must be in \[0, 1\), got \(0.5, 1.2, 0.0\)\."),
        (dict(roi_size=ROI, mode="linear"), r"mode must be one of \('constant', 'gaussian'\), got 'linear'"),
        (dict(roi_size=ROI, sigma_scale=0.0), r"sigma_scale must be > 0 .* got 0.0"),
        (dict(roi_size=ROI, padding_mode="zeros"), r"padding_mode must be one of .* got 'zeros'"),
        (dict(roi_size=ROI, cval=float("nan")), r"cval must be a finite number, got nan"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowedInferer(**kwargs)
    if "roi_size" in kwargs and kwargs["roi_size"] == ROI:  # the comparison inferer validates the same way
        with pytest.raises(ValueError, match=match):
            full_graph_inferer(**kwargs)


def test_bad_call_arguments():
    net = _net()
    x = _rand((1, 1, 12, 12, 12))
    with pytest.raises(ValueError, match=r"roi_size must have 3 entries .* got \(8, 8\)"):
        WindowedInferer((8, 8))(x, net)
    with pytest.raises(ValueError, match=r"overlap must have 3 entries .* got \(0.5, 0.5\)"):
        WindowedInferer(8, overlap=(0.5, 0.5))(x, net)
    with pytest.raises(ValueError, match="inputs must be a floating-point tensor, got dtype torch.int64"):
        WindowedInferer(8)(torch.zeros(1, 1, 8, 8, 8, dtype=torch.long), net)
    with pytest.raises(ValueError, match=r"inputs must be \(B, C, \*spatial\) .* got shape \(8, 8\)"):
        WindowedInferer(8)(torch.zeros(8, 8), net)
    with pytest.raises(ValueError, match="inputs must be a torch.Tensor, got ndarray"):
        WindowedInferer(8)(x.numpy(), net)
    with pytest.raises(ValueError, match="network must be callable, got int"):
        WindowedInferer(8)(x, 3)
    with pytest.raises(ValueError, match=r"network output must be \(n, K, \*roi_size\) .* got \(1, 3, 4, 4, 4\)"):
        WindowedInferer(8, sw_batch_size=1)(x, lambda w: net(w)[..., ::2, ::2, ::2])
    with pytest.raises(ValueError, match="network must return a tensor .* got dict"):
        WindowedInferer(8)(x, lambda w: {"out": net(w)})


def test_attack_swaps_monai_inferer_for_the_windowed_one():
    """create_attack(..., inferer=SlidingWindowInferer(...)) gets the memory-bounded gradient."""
    import volattack
    from monai.inferers import SlidingWindowInferer

    from volattack.inference.sliding import WindowedInferer

    model = torch.nn.Conv3d(1, 2, 3, padding=1)
    atk = volattack.create_attack("pgd", model, inferer=SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.25))
    assert isinstance(atk.inferer, WindowedInferer)
