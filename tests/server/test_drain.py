"""The drain schedule (``roombus.server.drain``): every connection closed once, by the
window's end, spread over it; by property, with the driver's time and random source."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import LocalProtocolError
from roombus.core.names import ConnectionId
from roombus.server.drain import DrainSchedule

Source = Callable[[], float]

#: Uniform sources: hypothesis' seeded Random, or a cycle of chosen values (the edges
#: 0 and just under 1 included), or one that misbehaves (1.0 and beyond, negative).
unit = st.floats(0.0, 1.0, exclude_max=True)
sources: st.SearchStrategy[Source] = st.one_of(
    st.randoms(use_true_random=False).map(lambda r: r.random),
    st.lists(unit, min_size=1, max_size=20).map(lambda xs: itertools.cycle(xs).__next__),
    st.lists(st.sampled_from([0.0, 1.0, 2.0, -0.5, 0.999999]), min_size=1).map(
        lambda xs: itertools.cycle(xs).__next__
    ),
)
conn_ids = st.lists(st.integers(1, 10_000).map(ConnectionId), max_size=200)
windows = st.floats(0.0, 3600.0)
starts = st.floats(-1e6, 1e6)


def punctual(schedule: DrainSchedule) -> list[tuple[float, ConnectionId]]:
    """Drive *schedule* as an adapter on time does: ``due`` at each next deadline."""
    closed: list[tuple[float, ConnectionId]] = []
    while (at := schedule.next_deadline()) is not None:
        due = schedule.due(at)
        assert due, "a deadline with nothing due"
        closed.extend((at, cid) for cid in due)
    return closed


@given(conns=conn_ids, now=starts, seconds=windows, source=sources)
def test_every_connection_is_closed_once_within_the_window(
    conns: list[ConnectionId], now: float, seconds: float, source: Source
) -> None:
    schedule = DrainSchedule(conns, now=now, seconds=seconds, random=source)
    assert (schedule.start, schedule.end) == (now, now + seconds)
    assert len(schedule) == len(set(conns))
    closed = punctual(schedule)
    assert sorted(cid for _, cid in closed) == sorted(set(conns))
    assert all(now <= at <= now + seconds for at, _ in closed)
    assert [at for at, _ in closed] == sorted(at for at, _ in closed)
    assert schedule.done and schedule.next_deadline() is None
    assert schedule.due(math.inf) == []


@given(
    n=st.integers(1, 500),
    seconds=st.floats(0.001, 3600.0),
    source=sources,
    slices=st.integers(1, 1000),
)
def test_no_slice_of_the_window_holds_more_than_its_share(
    n: int, seconds: float, source: Source, slices: int
) -> None:
    schedule = DrainSchedule(map(ConnectionId, range(n)), now=0.0, seconds=seconds, random=source)
    instants = [at for at, _ in punctual(schedule)]
    width = seconds / slices
    bound = width * n / seconds + 2
    for i, start in enumerate(instants):  # the most crowded slices start at a close
        within = sum(1 for at in instants[i:] if at <= start + width * (1 - 1e-9))
        assert within < bound, (start, within, bound)


@given(seconds=st.floats(1.0, 100.0), seed=st.integers(0, 2**32))
def test_roughly_uniform_with_a_fair_source(seconds: float, seed: int) -> None:
    import random

    n = 400
    schedule = DrainSchedule(
        map(ConnectionId, range(n)), now=0.0, seconds=seconds, random=random.Random(seed).random
    )
    instants = [at for at, _ in punctual(schedule)]
    quarters = [
        sum(1 for at in instants if q * seconds / 4 <= at < (q + 1) * seconds / 4) for q in range(4)
    ]
    assert all(abs(count - n / 4) <= 2 for count in quarters), quarters
    assert instants[0] < seconds / n and instants[-1] > seconds - seconds / n


def test_the_order_is_shuffled() -> None:
    import random

    schedule = DrainSchedule(
        map(ConnectionId, range(100)), now=0.0, seconds=10.0, random=random.Random(1).random
    )
    order = [cid for _, cid in punctual(schedule)]
    assert order != sorted(order)


@given(conns=conn_ids, now=starts, source=sources)
def test_a_window_of_zero_closes_everything_at_once(
    conns: list[ConnectionId], now: float, source: Source
) -> None:
    schedule = DrainSchedule(conns, now=now, seconds=0.0, random=source)
    if conns:
        assert schedule.next_deadline() == now
    assert sorted(schedule.due(now)) == sorted(set(conns))
    assert schedule.done


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan])
def test_a_window_must_be_finite_and_not_negative(seconds: float) -> None:
    with pytest.raises(LocalProtocolError, match="drain window"):
        DrainSchedule([], now=0.0, seconds=seconds)


# -- a driver that is late, connections that come and go --------------------------------

steps = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.floats(0.0, 50.0)),
        st.tuples(st.just("add"), st.integers(1, 400).map(ConnectionId)),
        st.tuples(st.just("gone"), st.integers(1, 400).map(ConnectionId)),
    ),
    max_size=60,
)


@given(conns=conn_ids, seconds=st.floats(0.0, 100.0), source=sources, steps=steps)
def test_comings_and_goings_under_a_late_driver(
    conns: list[ConnectionId],
    seconds: float,
    source: Source,
    steps: list[tuple[str, float | ConnectionId]],
) -> None:
    schedule = DrainSchedule(conns, now=0.0, seconds=seconds, random=source)
    expected = set(conns)  # what must be closed: not gone by itself before its turn
    closed: list[ConnectionId] = []
    now = 0.0
    for kind, value in steps:
        if kind == "wait":
            deadline = schedule.next_deadline()
            now += float(value)
            due = schedule.due(now)
            assert bool(due) == (deadline is not None and deadline <= now)
            closed.extend(due)
            if now >= schedule.end:
                assert schedule.done  # everything by the end
        elif kind == "add":
            cid = ConnectionId(int(value))
            if cid not in schedule and cid not in closed:
                schedule.add(cid, now=now)
                expected.add(cid)
                deadline = schedule.next_deadline()
                assert deadline is not None and deadline <= max(now, schedule.end)
        else:
            cid = ConnectionId(int(value))
            if cid in schedule:
                schedule.discard(cid)
                expected.discard(cid)
            assert cid not in schedule
    closed.extend(schedule.due(max(now, schedule.end)))
    assert schedule.done
    assert len(closed) == len(set(closed))  # never twice
    assert set(closed) == expected


@given(seconds=st.floats(1.0, 100.0), at=st.floats(0.0, 200.0), source=sources)
def test_a_latecomer_is_closed_within_what_is_left(
    seconds: float, at: float, source: Source
) -> None:
    schedule = DrainSchedule([ConnectionId(1)], now=0.0, seconds=seconds, random=source)
    schedule.discard(ConnectionId(1))
    schedule.add(ConnectionId(2), now=at)
    schedule.add(ConnectionId(2), now=at)  # once
    deadline = schedule.next_deadline()
    assert deadline is not None
    assert at <= deadline <= max(at, seconds)
    assert schedule.due(deadline) == [ConnectionId(2)]
    assert schedule.done
