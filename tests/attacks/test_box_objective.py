"""The objectives computed on the box a deployed pipeline's output varies in equal the full-grid ones."""

from __future__ import annotations

import pytest
import torch

import volattack
from volattack.attacks.box_objective import BOX_OBJECTIVES, boxed_objective
from volattack.attacks.objectives import objective_per_sample
from volattack.data.intensity import WindowIntensity
from volattack.inference.deployed import LOG_MIN_PROB, DeployedPipeline, SoftmaxHead
from volattack.inference.steps import Crop, Intensity, Orient, Resample

from tests.inference.test_deployed import _Pointwise, oblique_lps

SHAPE = (9, 8, 6)


def _pipeline(resample: bool) -> DeployedPipeline:
    o = Orient.to_codes(oblique_lps(), SHAPE, "RAS")  # LPS -> RAS: two flips
    steps, grid = [o], o.out_shape
    if resample:
        steps.append(Resample.like_monai_spacing(o.out_affine, o.out_shape, [2.0, 2.0, 2.0]))
        grid = steps[-1].out_shape
    steps += [Intensity(WindowIntensity(-175, 250)), Crop([1, 0, 1], [grid[0] - 1, grid[1] - 2, grid[2] - 1], grid)]
    return DeployedPipeline(steps, SoftmaxHead(_Pointwise().eval()), bounds=(-1024.0, 3071.0), units="HU")


def _scan(seed: int) -> torch.Tensor:
    return torch.empty((1, 1) + SHAPE).uniform_(-300, 400, generator=torch.Generator().manual_seed(seed))


def _labels(seed: int, k: int = 3) -> torch.Tensor:
    return torch.randint(0, k, (1, 1) + SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("resample", [False, True])
def test_the_pipeline_output_is_the_constant_outside_its_box(resample):
    pipe = _pipeline(resample)
    assert pipe.constant_outside() is None  # not known before the first call
    outs = [pipe(_scan(s)) for s in (0, 1)]
    box, const, grid = pipe.constant_outside()
    assert grid == SHAPE and tuple(b.stop - b.start for b in box) != SHAPE
    assert torch.equal(const, torch.tensor([0.0, LOG_MIN_PROB, LOG_MIN_PROB]))
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[box] = False
    assert outside.any()
    for lp in outs:
        assert torch.equal(lp[0][:, outside], const[:, None].expand(3, int(outside.sum())))
    # inside the box the output depends on the input (the box is not larger than needed)
    assert not torch.equal(outs[0][(slice(None), slice(None)) + box], outs[1][(slice(None), slice(None)) + box])


def test_no_crop_means_no_box():
    o = Orient.to_codes(oblique_lps(), SHAPE, "RAS")
    pipe = DeployedPipeline([o, Intensity(WindowIntensity(-175, 250))], SoftmaxHead(_Pointwise().eval()),
                            bounds=(-1024.0, 3071.0), units="HU")
    pipe(_scan(0))
    assert pipe.constant_outside() is None


@pytest.mark.parametrize("kind", sorted(BOX_OBJECTIVES))
@pytest.mark.parametrize("resample", [False, True])
def test_boxed_objective_equals_the_full_grid_objective_in_value_and_gradient(kind, resample):
    pipe = _pipeline(resample)
    y = _labels(3)  # foreground labels outside the box too
    x = _scan(2).requires_grad_(True)
    lp = pipe(x)
    box, const, _ = pipe.constant_outside()
    assert pipe.log_softmax_output() is (not resample)  # resampling acts on probabilities
    full = objective_per_sample(lp, y, kind)
    fast = boxed_objective(lp, y, kind, box, const, log_probs=pipe.log_softmax_output())
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    (g_full,) = torch.autograd.grad(full.sum(), x, retain_graph=True)
    (g_fast,) = torch.autograd.grad(fast.sum(), x)
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_fast, g_full, rtol=1e-4, atol=1e-6 * float(g_full.abs().max()))


@pytest.mark.parametrize("kind", sorted(BOX_OBJECTIVES))
def test_boxed_objective_per_sample_in_a_batch(kind):
    gen = torch.Generator().manual_seed(0)
    const = torch.tensor([0.5, -2.0, 1.0, -7.0])
    logits = const.view(1, 4, 1, 1, 1).repeat(2, 1, 5, 6, 4)
    box = (slice(1, 4), slice(2, 6), slice(0, 3))
    logits[(slice(None), slice(None)) + box] = torch.randn(2, 4, 3, 4, 3, generator=gen)
    labels = torch.randint(0, 4, (2, 1, 5, 6, 4), generator=gen)
    fast = boxed_objective(logits, labels, kind, box, const)
    assert fast.shape == (2,)
    torch.testing.assert_close(fast, objective_per_sample(logits, labels, kind), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1:], boxed_objective(logits[1:], labels[1:], kind, box, const))


@pytest.mark.parametrize("kind", sorted(BOX_OBJECTIVES))
def test_skipping_the_log_softmax_on_log_probabilities_changes_neither_value_nor_gradient(kind):
    pipe = _pipeline(False)
    y, x = _labels(6), _scan(7).requires_grad_(True)
    lp = pipe(x)
    box, const, _ = pipe.constant_outside()
    skip, full = (boxed_objective(lp, y, kind, box, const, log_probs=f) for f in (True, False))
    torch.testing.assert_close(skip, full, rtol=1e-6, atol=1e-7)
    (g_skip,) = torch.autograd.grad(skip.sum(), x, retain_graph=True)
    (g_full,) = torch.autograd.grad(full.sum(), x)
    torch.testing.assert_close(g_skip, g_full, rtol=1e-4, atol=1e-6 * float(g_full.abs().max()))
    # on logits that are not log-probabilities the skip is wrong: the flag is what makes it exact
    raw = lp.detach() + 3.0
    assert not torch.allclose(boxed_objective(raw, y, kind, box, const + 3.0, log_probs=True),
                              objective_per_sample(raw, y, kind), rtol=1e-3)


@pytest.mark.parametrize("kind", ["ce", "dice"])
def test_the_kept_label_counts_follow_the_labels(kind):
    gen = torch.Generator().manual_seed(1)
    const = torch.tensor([0.5, -2.0, 1.0])
    logits = const.view(1, 3, 1, 1, 1).repeat(1, 1, 5, 6, 4)
    box = (slice(1, 4), slice(2, 6), slice(0, 3))
    logits[(slice(None), slice(None)) + box] = torch.randn(1, 3, 3, 4, 3, generator=gen)
    labels = torch.randint(0, 3, (1, 1, 5, 6, 4), generator=gen)
    for _ in range(2):  # the second call reuses the counts
        torch.testing.assert_close(boxed_objective(logits, labels, kind, box, const),
                                   objective_per_sample(logits, labels, kind), rtol=1e-5, atol=1e-6)
    labels[0, 0, 0] = 2  # in place, outside the box: a new version
    torch.testing.assert_close(boxed_objective(logits, labels, kind, box, const),
                               objective_per_sample(logits, labels, kind), rtol=1e-5, atol=1e-6)
    other = torch.zeros_like(labels)  # another tensor
    torch.testing.assert_close(boxed_objective(logits, other, kind, box, const),
                               objective_per_sample(logits, other, kind), rtol=1e-5, atol=1e-6)
    smaller = (slice(1, 3),) + box[1:]  # another box with the same labels
    logits[:, :, 3] = const.view(1, 3, 1, 1)
    torch.testing.assert_close(boxed_objective(logits, other, kind, smaller, const),
                               objective_per_sample(logits, other, kind), rtol=1e-5, atol=1e-6)


def test_boxed_objective_refuses_other_objectives():
    with pytest.raises(ValueError, match="kind must be one of .*'segpgd'"):
        boxed_objective(torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2, dtype=torch.long), "segpgd",
                        (slice(0, 1),) * 3, torch.zeros(2))


@pytest.mark.parametrize("objective", ["dice_ce", "ce", "segpgd"])
def test_an_attack_on_the_pipeline_is_the_same_with_and_without_the_box(objective, monkeypatch):
    import volattack.attacks.base as base

    calls = []
    real = base.boxed_objective
    monkeypatch.setattr(base, "boxed_objective", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe = _pipeline(True)
    x, y = _scan(4), _labels(5)
    kw = dict(eps=20.0, alpha=5.0, steps=4, bounds=pipe.bounds, unit_scale=1.0, objective=objective, seed=0)
    adv_box = volattack.create_attack("pgd", pipe, **kw).run(x, y).adv
    assert bool(calls) == (objective in BOX_OBJECTIVES)
    monkeypatch.setattr(pipe, "constant_outside", lambda: None)
    adv_full = volattack.create_attack("pgd", pipe, **kw).run(x, y).adv
    assert not torch.equal(adv_full, x)
    # the same steps up to the sign of gradient entries that round-off can flip: almost every voxel equal
    assert (adv_box - adv_full).abs().le(1e-3).float().mean() > 0.99
