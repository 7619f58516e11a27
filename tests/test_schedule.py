"""Sparsity schedules against their formulas (cubic: torch.ao.pruning's CubicSL itself)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

from wtfront import Schedule, ScheduleError

sparsities = st.tuples(st.floats(0.0, 0.9), st.floats(0.0, 0.99)).map(lambda p: (min(p), max(p)))
times = st.tuples(st.integers(0, 20), st.integers(1, 30), st.integers(1, 5)).map(lambda t: (t[0], t[0] + t[1], t[2]))


@given(sparsities, times, st.integers(-5, 60), st.booleans())
def test_cubic_is_torch_ao_cubicsl(s, tt, t, initially_zero):
    (s0, sf), (start, end, every) = s, tt
    sched = Schedule(sf, start, end, every, "cubic", s0, initially_zero=initially_zero)
    # CubicSL's n pruning steps of dt span end - start
    want = CubicSL.sparsity_compute_fn(s0, sf, t, start, every, (end - start) / every, initially_zero)
    assert sched.sparsity(t) == pytest.approx(want, abs=1e-12)


@given(sparsities, times, st.integers(-5, 60))
def test_linear_and_geometric_formulas(s, tt, t):
    (s0, sf), (start, end, every) = s, tt
    p = min(max((t - start) / (end - start), 0.0), 1.0)
    lin = Schedule(sf, start, end, every, "linear", s0)
    geo = Schedule(sf, start, end, every, "geometric", s0)
    assert lin.sparsity(t) == pytest.approx(s0 + (sf - s0) * p, abs=1e-12)
    assert geo.keep(t) == pytest.approx((1 - s0) * ((1 - sf) / (1 - s0)) ** p, rel=1e-12)
    for sc in (lin, geo):
        assert sc.sparsity(start) == pytest.approx(s0) and sc.sparsity(end) == pytest.approx(sf)
        assert sc.sparsity(end + 7) == sf and sc.sparsity(start - 1) == s0


@given(sparsities, times)
def test_schedules_are_monotone_and_geometric_keeps_a_constant_factor(s, tt):
    (s0, sf), (start, end, every) = s, tt
    for kind in ("cubic", "linear", "geometric"):
        sc = Schedule(sf, start, end, every, kind, s0)
        vals = [sc.sparsity(t) for t in range(start - 2, end + 3)]
        assert all(a <= b + 1e-15 for a, b in itertools.pairwise(vals))
    geo = Schedule(sf, start, end, 1, "geometric", s0)
    if s0 < sf:
        factors = [geo.keep(t + 1) / geo.keep(t) for t in range(start, end)]
        assert all(f == pytest.approx(factors[0], rel=1e-9) for f in factors)


def test_zhu_gupta_example_values():
    """Hand values: 90% sparsity over 10 epochs, cubic; after half the time 1 - 0.5**3 of it is done."""
    sc = Schedule(0.9, start=2, end=12, every=2)
    assert sc.sparsity(2) == 0.0
    assert sc.sparsity(7) == pytest.approx(0.9 * (1 - 0.5**3))
    assert sc.sparsity(12) == pytest.approx(0.9)
    assert sc.steps() == [2, 4, 6, 8, 10, 12]
    assert [t for t in range(20) if sc.is_step(t)] == sc.steps()
    assert Schedule(0.5, 0, 7, 3).steps() == [0, 3, 6, 7]  # the end is always a step
    assert [Schedule(0.5, 0, 7, 3).next_step(t) for t in (0, 1, 4, 6, 7, 8)] == [0, 3, 6, 6, 7, None]
    assert Schedule(0.5, 3, 3).sparsity(3) == 0.5  # one-shot at `start`


def test_epoch_schedule_in_steps():
    ep = Schedule(0.6, start=1, end=5, every=1, kind="cubic")
    st_ = ep.in_steps(10)
    assert (st_.start, st_.end, st_.every, st_.by) == (10, 50, 10, "step")
    for e in range(8):
        assert st_.sparsity(e * 10) == pytest.approx(ep.sparsity(e))
    assert st_.sparsity(25) == pytest.approx(ep.sparsity(2.5))
    assert st_.in_steps(3) is st_
    assert ep.in_steps(10, every=1).steps() == list(range(10, 51))
    assert Schedule.from_dict(ep.to_dict()) == ep


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(final=1.2), "final"),
        (dict(final=0.5, kind="exp"), "kind"),
        (dict(final=0.5, start=4, end=2), "end"),
        (dict(final=0.5, every=0), "every"),
        (dict(final=0.2, initial=0.4), "initial"),
        (dict(final=1.0, kind="geometric"), "geometric"),
        (dict(final=0.5, by="batch"), "by"),
    ],
)
def test_invalid_schedules(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule(**kwargs)


def test_from_dict_names_unknown_keys():
    with pytest.raises(ScheduleError, match="unknown key"):
        Schedule.from_dict({"final": 0.5, "frequency": 2})
    with pytest.raises(ScheduleError, match="required"):
        Schedule.from_dict({"start": 1})
    assert math.isclose(Schedule.from_dict({"final": 0.5, "end": 4, "kind": "linear"}).sparsity(2), 0.25)
