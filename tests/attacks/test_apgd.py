"""APGD's step-size schedule (Croce & Hein, ICML 2020, Sec. 3.2) on hand-built loss traces."""

from __future__ import annotations

import pytest
import torch

from volattack.attacks.apgd import APGDSchedule, apgd_checkpoints, apgd_halve


def test_checkpoints_follow_the_paper():
    # p: 0, .22, .41, .57, .70, .80, .87, .93, .99 -> w = ceil(p N)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19]
    assert apgd_checkpoints(1) == []


def _halve(n, interval, eta_prev, eta_now, best_prev, best_now):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return apgd_halve(t(n), interval, t(eta_prev), t(eta_now), t(best_prev), t(best_now), rho=0.75).tolist()


def test_halve_conditions_one_by_one_per_sample():
    # four samples over an interval of 4 steps (rho * 4 = 3):
    #   0: 2 increases (cond 1), best improved, eta changed      -> halve (condition 1 alone)
    #   1: 4 increases, best unchanged, eta unchanged            -> halve (condition 2 alone)
    #   2: 3 increases == rho * interval, improved, eta changed  -> halve (the <= boundary)
    #   3: 4 increases, improved, eta unchanged                  -> keep (neither)
    got = _halve(
        n=[2, 4, 3, 4], interval=4,
        eta_prev=[0.2, 0.1, 0.2, 0.1], eta_now=[0.1, 0.1, 0.1, 0.1],
        best_prev=[1.0, 1.0, 1.0, 1.0], best_now=[1.5, 1.0, 1.5, 1.5],
    )
    assert got == [True, True, True, False]
    # condition 2 needs BOTH: eta unchanged and best unchanged
    assert _halve([4, 4], 4, [0.2, 0.1], [0.1, 0.1], [1.0, 1.0], [1.0, 1.2]) == [False, False]


def test_schedule_on_hand_built_traces():
    """steps = 20: checkpoints 5, 9, 12, ... Losses f(x^(k)) for k = 0..12 of three samples."""
    trace = torch.tensor([
        # sample 0 rises every step: never halves at 5 (5 > 3.75) nor at 9 (4 > 3)
        [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        # sample 1 rises 3 of 4 steps between 5 and 9: the <= boundary halves at 9
        [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 7.5, 8.5, 9.5, 10.5],
        # sample 2 peaks at k = 1 then falls: condition 1 at 5 (1 increase); at 9 condition 1
        # (0 increases) again; condition 2 alone cannot fire at 9 since eta changed at 5
        [0.0, 3, 2, 1, 0.5, 0.2, 0.1, 0.0, -1, -2, -3, -4, -5],
    ]).T  # (T, B)
    eta0 = torch.full((3,), 0.5)
    sched = APGDSchedule(20, eta0, trace[0])
    halves, etas = {}, {}
    for k in range(1, 13):
        improved, halve = sched.update(k, trace[k])
        if k not in (5, 9, 12):
            assert not bool(halve.any())
        halves[k] = halve.tolist()
        etas[k] = sched.eta.tolist()
    assert halves[5] == [False, False, True]
    assert halves[9] == [False, True, True]
    assert etas[9] == [0.5, 0.25, 0.125]
    assert sched.best.tolist() == [12.0, 10.5, 3.0]


def test_condition_two_fires_alone_when_nothing_changed_since_the_last_checkpoint():
    """A sample whose loss rises on 9 of 10 steps (condition 1 false) but never beats its best after
    k = 1: condition 2 halves once, and not again at the next checkpoint, because the step size in
    use at the previous checkpoint (before its halving) differs from the current one. (The 0.1 code
    recorded the step size after halving, so condition 2 would have fired at every checkpoint.)"""
    # steps 100: checkpoints 22, 41, 57; f(x^0) = 0, f(x^1) = 10 (the best), then -10, -9, .., -1, -10, ..
    T = 58
    loss = torch.zeros(T)
    loss[1] = 10.0
    loss[2:] = torch.tensor([-10.0 + (k - 2) % 10 for k in range(2, T)])
    sched = APGDSchedule(100, torch.tensor([1.0]), loss[:1])
    fired = {}
    for k in range(1, T):
        _, halve = sched.update(k, loss[k : k + 1])
        if bool(halve.any()):
            fired[k] = sched.eta.item()
    # at 22: 19 of 22 steps increased (> 16.5), best changed since w_0 (0 -> 10): no halving
    # at 41: 18 of 19 increased (> 14.25); eta and best unchanged since 22: condition 2 halves
    # at 57: 14 of 16 increased (> 12); eta changed at 41: no halving
    assert fired == {41: 0.5}


def test_schedule_is_per_sample():
    """A batch of two traces gives each sample the decisions it gets alone."""
    g = torch.Generator().manual_seed(0)
    trace = torch.randn(30, 2, generator=g).cumsum(0)
    eta0 = torch.tensor([0.1, 0.1])
    both = APGDSchedule(30, eta0, trace[0])
    alone = [APGDSchedule(30, eta0[i : i + 1], trace[0, i : i + 1]) for i in range(2)]
    for k in range(1, 30):
        _, h = both.update(k, trace[k])
        for i in range(2):
            _, hi = alone[i].update(k, trace[k, i : i + 1])
            assert h[i].item() == hi.item()
    assert both.eta.tolist() == [a.eta.item() for a in alone]


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_rho_extremes(rho):
    n = torch.tensor([0.0, 4.0])
    same = torch.ones(2)
    out = apgd_halve(n, 4, same * 2, same, same, same * 2, rho=rho)
    # rho 0: only zero increases halve; rho 1: any count <= interval halves
    assert out.tolist() == ([True, False] if rho == 0.0 else [True, True])
