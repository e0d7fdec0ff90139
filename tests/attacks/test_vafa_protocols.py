"""VAFA's two protocols (the paper's text, its published code) and the published code's returned
image (``output="soft_last"``): values, overrides, identities, direction of effect, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import volattack
from volattack.attacks.vafa import PROTOCOLS


class Pointwise(nn.Module):
    """Two classes decided voxel by voxel: foreground logit ``k (x - 0.5)``, background its negative."""

    def __init__(self, k: float = 10.0) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.k * (x - 0.5)
        return torch.cat([-f, f], dim=1)


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(0)
    r = torch.arange(16, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    inside = ((zz - 8) ** 2 + (yy - 7) ** 2 + (xx - 8.5) ** 2).sqrt() < 5
    x = (0.45 + 0.1 * inside.float() + 0.03 * torch.randn(2, 16, 16, 16, generator=g)).clamp(0, 1)[:, None]
    return Pointwise(), x, inside.long().expand(2, -1, -1, -1)[:, None].contiguous()


def _options(atk) -> dict:
    return {k: getattr(atk, k) for k in ("q_init", "q_min", "objective", "center_128", "slice_renorm", "output")}


def test_default_is_the_published_code_and_paper_is_the_text(task):
    model = task[0]
    default = volattack.create_attack("vafa", model)
    assert default.protocol == "code"
    assert _options(default) == dict(q_init="qmax", q_min=5.0, objective="dice_ce", center_128=True,
                                     slice_renorm=False, output="hard")
    paper = volattack.create_attack("vafa", model, protocol="paper")
    assert _options(paper) == dict(q_init="one", q_min=1.0, objective="dice", center_128=False,
                                   slice_renorm=False, output="hard")
    assert set(PROTOCOLS) == {"code", "paper"}
    assert default.config()["protocol"] == "code" and default.config()["output"] == "hard"


def test_explicit_keywords_override_the_protocol(task):
    model = task[0]
    atk = volattack.create_attack("vafa", model, protocol="paper", q_init="qmax", objective="ce")
    assert (atk.q_init, atk.objective, atk.q_min, atk.center_128) == ("qmax", "ce", 1.0, False)
    atk = volattack.create_attack("vafa", model, q_min=2.0, center_128=False)
    assert (atk.q_init, atk.q_min, atk.center_128, atk.objective) == ("qmax", 2.0, False, "dice_ce")
    # the code's lower bound 5 never exceeds a smaller q_max
    assert volattack.create_attack("vafa", model, q_max=3.0).q_min == 3.0
    with pytest.raises(ValueError, match=r"q_min must be <= 3.0, got 5.0"):
        volattack.create_attack("vafa", model, q_max=3.0, q_min=5.0)


def test_soft_last_with_hard_rounding_is_the_hard_output_one_step_earlier(task):
    # the published code returns the last step's candidate, built with the tables before the final
    # update: with hard rounding during the steps that is exactly the hard output of steps - 1
    model, x, y = task
    kw = dict(rounding="hard", q_max=20.0, block_size=8)
    soft = volattack.create_attack("vafa", model, steps=4, output="soft_last", **kw)(x, y)
    hard = volattack.create_attack("vafa", model, steps=3, **kw)(x, y)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-6)


def test_soft_last_differs_from_hard_and_lies_closer_to_the_input(task):
    model, x, y = task
    kw = dict(q_max=20.0, block_size=8, steps=10, seed=0)
    hard = volattack.create_attack("vafa", model, **kw).run(x, y)
    soft = volattack.create_attack("vafa", model, output="soft_last", **kw).run(x, y)
    assert float((soft.adv - hard.adv).abs().max()) > 1 / 255
    assert all(s < h for s, h in zip(soft.info["rms"], hard.info["rms"])), (soft.info["rms"], hard.info["rms"])
    assert all(s > h for s, h in zip(soft.info["ssim"], hard.info["ssim"]))
    # both report the same final tables
    assert soft.info["q_mean"] == hard.info["q_mean"]


def test_paper_protocol_barely_moves_where_the_code_protocol_attacks(task):
    model, x, y = task
    from volattack.attacks.objectives import hard_foreground_dice

    def dice(adv):
        with torch.no_grad():
            return hard_foreground_dice(model(adv).argmax(1, keepdim=True), y, 2)

    kw = dict(q_max=20.0, block_size=8, steps=10)
    paper = volattack.create_attack("vafa", model, protocol="paper", **kw).run(x, y)
    code = volattack.create_attack("vafa", model, **kw).run(x, y)
    assert bool((dice(code.adv) < dice(paper.adv) - 0.05).all())
    assert max(paper.info["rms"]) < min(code.info["rms"])  # the paper's start at q = 1 is a small change


@pytest.mark.parametrize("kw, match", [
    (dict(protocol="papers"), r"protocol must be one of code, paper, got 'papers'. Did you mean 'paper'"),
    (dict(output="soft"), r"output must be one of hard, soft_last, got 'soft'"),
    (dict(output="soft_last", steps=0), r"output='soft_last' needs steps >= 1 .* got steps=0"),
])
def test_bad_arguments(kw, match, task):
    with pytest.raises(ValueError, match=match):
        volattack.create_attack("vafa", task[0], **kw)
