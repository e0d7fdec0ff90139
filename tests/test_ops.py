"""Known values of the small shared tensor operations (volattack.ops)."""

from __future__ import annotations

import pytest
import torch

from volattack.ops import first_head, l2_norm, module_digest, per_sample_view, seed_from, straight_through


def test_first_head_of_deep_supervision_outputs():
    a, b = torch.zeros(1), torch.ones(1)
    assert first_head((a, b)) is a and first_head([b, a]) is b and first_head(a) is a


def test_straight_through_forward_value_backward_surrogate():
    x = torch.tensor([0.2, 1.7, -2.6], requires_grad=True)
    y = straight_through(torch.round(x), x * 3)
    assert y.tolist() == [0.0, 2.0, -3.0]
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.tolist() == [3.0, 3.0, 3.0]


def test_per_sample_view_and_l2_norm():
    v = torch.tensor([2.0, 3.0])
    like = torch.zeros(2, 4, 5, 6)
    assert per_sample_view(v, like).shape == (2, 1, 1, 1)
    t = torch.zeros(2, 1, 2, 2)
    t[0, 0, 0, 0], t[0, 0, 1, 1] = 3.0, 4.0
    assert l2_norm(t).tolist() == [5.0, 0.0]


def test_seed_from_is_deterministic_distinct_and_63_bit():
    assert seed_from(3, 7) == seed_from(3, 7)
    seeds = {seed_from(0, i) for i in range(100)} | {seed_from(1, i) for i in range(100)}
    assert len(seeds) == 200
    assert seed_from(3, 7) != seed_from(7, 3) and seed_from(3, 7) != seed_from(3, 7, 1)
    assert all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(seed_from(2**40, 5))  # accepted by torch


def test_module_digest_tracks_weights_not_identity():
    torch.manual_seed(0)
    a = torch.nn.Conv3d(1, 2, 3)
    b = torch.nn.Conv3d(1, 2, 3)
    b.load_state_dict(a.state_dict())
    assert module_digest(a) == module_digest(b) and len(module_digest(a)) == 64
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert module_digest(a) != module_digest(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_digest_includes_dtype(dtype):
    m = torch.nn.Linear(2, 2).to(dtype)
    other = torch.nn.Linear(2, 2)
    other.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    assert (module_digest(m) == module_digest(other)) == (dtype == torch.float32)


def test_registry_register_class_names_checks_base_and_refuses_duplicates():
    from volattack.registry import Registry

    reg: Registry = Registry("widget")

    class Base:
        pass

    @reg.register_class("round", Base)
    class Round(Base):
        pass

    assert Round.name == "round" and reg.get("round") is Round and reg.names() == ["round"]
    with pytest.raises(ValueError, match="widget 'square' must be a Base subclass"):
        reg.register_class("square", Base)(int)
    with pytest.raises(ValueError, match="widget 'round' is already registered"):
        reg.register_class("round")(type("Other", (Base,), {}))
