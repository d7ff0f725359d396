"""The heartbeat state machine: its table, exhaustively, and its timing, by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import Heartbeat, HeartbeatState, LocalProtocolError
from roombus._heartbeat import TRANSITIONS, Beat

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
def test_a_peer_expires_exactly_interval_plus_timeout_after_its_last_pong(
    interval: float, timeout: float, steps: list[tuple[float, bool]]
) -> None:
    hb = Heartbeat.start(interval, timeout, now=0.0)
    now = 0.0
    last_alive = 0.0
    pinged_since_alive = False
    for dt, pong in steps:
        now += dt
        # Fire every timer that is due by now, as a driver would.
        while hb.state is not HeartbeatState.EXPIRED and hb.deadline <= now:
            state = hb.timer(now)
            if state is HeartbeatState.AWAITING_PONG:
                assert now >= last_alive + interval
                pinged_since_alive = True
        if hb.state is HeartbeatState.EXPIRED:
            # Gone exactly when the silence reached interval + timeout, not before.
            assert now >= last_alive + interval + timeout
            assert hb.expires_at == last_alive + interval + timeout
            return
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
