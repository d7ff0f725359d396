"""The heartbeat state machine: its table, exhaustively, and its timing, by property."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import LocalProtocolError
from roombus.core.heartbeat import TRANSITIONS, Beat
from roombus.lowlevel import Heartbeat, HeartbeatState

from ..strategies import durations


@given(st.sampled_from(HeartbeatState), st.sampled_from(Beat))
def test_every_pair_is_in_the_table_or_refused(state: HeartbeatState, beat: Beat) -> None:
    hb = Heartbeat(1.0, 1.0, 0.0, state)
    if (state, beat) in TRANSITIONS:
        assert hb._step(beat) is TRANSITIONS[state, beat]
    else:
        with pytest.raises(LocalProtocolError):
            hb._step(beat)
        assert hb.state is state


def test_expired_is_final() -> None:
    assert not any(s is HeartbeatState.EXPIRED for s, _ in TRANSITIONS)


def test_timer_before_the_deadline_is_a_driver_error() -> None:
    hb = Heartbeat.start(10, 5, now=0)
    with pytest.raises(LocalProtocolError, match="early"):
        hb.timer(9.99)


@given(
    interval=durations,
    timeout=durations,
    # Each step: wait dt, then a pong arrives (True) or the timer is checked (False).
    steps=st.lists(st.tuples(st.floats(min_value=0, max_value=50), st.booleans()), max_size=30),
)
def test_on_time_a_peer_expires_exactly_interval_plus_timeout_after_its_last_pong(
    interval: float, timeout: float, steps: list[tuple[float, bool]]
) -> None:
    """A driver that fires every timer exactly at its deadline (pongs come in between)."""
    hb = Heartbeat.start(interval, timeout, now=0.0)
    now = 0.0
    last_alive = 0.0
    pinged_since_alive = False
    for dt, pong in steps:
        target = now + dt
        # Fire every timer that is due by the target, each at its own instant.
        while hb.state is not HeartbeatState.EXPIRED and hb.deadline <= target:
            now = hb.deadline
            state = hb.timer(now)
            if state is HeartbeatState.AWAITING_PONG:
                assert now == last_alive + interval
                pinged_since_alive = True
        if hb.state is HeartbeatState.EXPIRED:
            # Gone exactly when the silence reached interval + timeout, not before.
            assert now == last_alive + interval + timeout
            return
        now = target
        assert now < last_alive + interval + timeout
        assert hb.state is (
            HeartbeatState.AWAITING_PONG if pinged_since_alive else HeartbeatState.IDLE
        )
        if pong:
            hb.pong(now)
            last_alive = now
            pinged_since_alive = False
            assert hb.state is HeartbeatState.IDLE
            assert hb.deadline == now + interval


def test_a_late_timer_pings_rather_than_expires_a_peer_never_pinged() -> None:
    hb = Heartbeat.start(10, 5, now=0)
    assert hb.timer(100.0) is HeartbeatState.AWAITING_PONG  # a ping, not a verdict
    assert hb.deadline == 105.0  # the answer window starts when the ping is sent
    assert hb.timer(105.0) is HeartbeatState.EXPIRED


def test_a_timer_late_after_a_ping_gives_the_peer_a_new_window() -> None:
    hb = Heartbeat.start(10, 5, now=0)
    hb.timer(10.0)
    # The driver was stalled past the give-up instant: pongs may be waiting unread.
    assert hb.timer(40.0) is HeartbeatState.GRACE
    assert hb.deadline == 45.0
    assert hb.timer(45.0) is HeartbeatState.EXPIRED


def test_the_window_opens_again_once_per_ping() -> None:
    """A driver late every time (overloaded, not stopped) still closes a dead peer."""
    hb = Heartbeat.start(10, 5, now=0)
    hb.timer(10.0)
    assert hb.timer(40.0) is HeartbeatState.GRACE
    assert hb.timer(60.0) is HeartbeatState.EXPIRED
    hb = Heartbeat.start(10, 5, now=0)
    hb.timer(10.0)
    hb.timer(40.0)
    hb.pong(41.0)  # answered: the next ping may have its window opened again
    hb.timer(51.0)
    assert hb.timer(70.0) is HeartbeatState.GRACE


def test_a_stall_the_driver_saw_after_the_ping_gives_the_peer_a_new_window() -> None:
    hb = Heartbeat.start(10, 5, now=0)
    hb.timer(10.0)
    # On time for this heartbeat, but the driver resumed from a stall at 14.5.
    assert hb.timer(15.0, resumed_at=14.5) is HeartbeatState.GRACE
    assert hb.deadline == 19.5
    assert hb.timer(19.5, resumed_at=14.5) is HeartbeatState.EXPIRED


#: A step of the simulation: the server runs for a while, or is stopped for a while.
sim_steps = st.lists(
    st.tuples(st.sampled_from(["run", "stall"]), st.floats(min_value=0, max_value=60)),
    max_size=20,
)


@given(
    interval=durations,
    timeout=durations,
    rtt=st.floats(min_value=0, max_value=0.5),
    live=st.booleans(),
    steps=sim_steps,
    jitter=st.floats(min_value=0, max_value=0.5),
)
def test_a_stalled_driver_never_blames_a_peer_that_answers(
    interval: float,
    timeout: float,
    rtt: float,
    live: bool,
    steps: list[tuple[str, float]],
    jitter: float,
) -> None:
    """
    A server that runs, and now and then stops (a GC pause, a stopped VM): no timer
    fires while it is stopped, and what arrived meanwhile waits unread. While running,
    timers fire late by up to *jitter* of the stall threshold; on resuming, input that
    arrived is read first, then the late timers fire.

    A peer that answers every ping within ``rtt * timeout`` is never given up on. A
    silent one is given up on only a full ``timeout`` after a ping was sent (counted
    from the end of a stall that came after the ping), never before
    ``interval + timeout`` of silence, and soon once the server runs long enough.
    """
    hb = Heartbeat.start(interval, timeout, now=0.0)
    late = jitter * hb.late_after
    answer = rtt * timeout
    now = 0.0
    arrivals: list[float] = []  # pongs on their way or waiting unread
    pinged_at: float | None = None
    reopened = False  # the current ping's window opened again after a stall
    resumed_at = -math.inf

    def fire(at: float, resumed: float) -> None:
        nonlocal pinged_at, reopened
        was = hb.state
        state = hb.timer(at, resumed_at=resumed)
        if state is HeartbeatState.EXPIRED:
            assert not live, "a peer that answers every ping was given up on"
            assert pinged_at is not None, "given up on without a ping"
            # A full timeout since the ping, and since the resume after a stall (once
            # per ping: a second stall in the new window is not waited out again).
            assert at >= pinged_at + timeout
            assert at >= hb.pinged_at + timeout
            if not reopened:
                assert not (pinged_at < resumed and at < resumed + timeout)
                assert at - (pinged_at + timeout) <= hb.late_after
            assert at >= hb.alive_at + interval + timeout
        elif state is HeartbeatState.GRACE:
            assert not reopened
            reopened = True
            assert hb.deadline > at
        elif was is HeartbeatState.IDLE:
            pinged_at = at
            reopened = False
            if live:
                arrivals.append(at + answer)

    def read_until(t: float) -> None:
        for a in sorted(x for x in arrivals if x <= t):
            arrivals.remove(a)
            if hb.state is not HeartbeatState.EXPIRED:
                hb.pong(max(a, now))

    for kind, dt in [*steps, ("run", 2 * (interval + timeout) + 2)]:
        if hb.state is HeartbeatState.EXPIRED:
            break
        end = now + dt
        if kind == "stall":
            # Nothing runs; on resuming, input first, then every timer already due.
            now = end
            resumed_at = now
            read_until(now)
            while hb.state is not HeartbeatState.EXPIRED and hb.deadline <= now:
                fire(now, resumed_at)
            continue
        while hb.state is not HeartbeatState.EXPIRED:
            at = hb.deadline + late
            pong = min(arrivals, default=math.inf)
            if min(at, pong) > end:
                break
            if pong <= at:
                now = pong
                read_until(now)
            else:
                now = at
                fire(now, resumed_at)
        now = max(now, end)
    # Long enough after the last stall: a silent peer is gone by now, a live one is not.
    assert (hb.state is HeartbeatState.EXPIRED) == (not live)
