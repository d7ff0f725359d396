"""
The heartbeat: one connection's liveness state machine.

Theory of operation
-------------------
A connection is *alive* at connect and whenever a pong arrives (solicited or not). Let
``alive_at`` be the last such instant. The broker pings it at ``alive_at + interval``,
and gives up on it ``timeout`` after the ping was *sent* (``pinged_at + timeout``)
unless a pong came in between. A peer is never given up on without a ping, however
late the driver calls in: a timer that fires after both instants passed sends the ping
and opens the answer window then.

A stalled driver (a GC pause, a stopped VM, a long synchronous hook) must not blame
its peers: their pongs may be waiting unread. So a verdict also needs the driver to
have been running for the whole answer window. The timer firing more than
:attr:`Heartbeat.late_after` after the give-up instant shows that it was not, and so
does a stall the driver reports (``resumed_at``: the instant it resumed) after the
ping: then the window opens again at the resume, and the peer has a full ``timeout``
of running time to answer. That happens once per ping (GRACE): a driver that is late
every time, overloaded rather than stopped, still closes a dead peer, a window later.

The machine has one timer, :attr:`Heartbeat.deadline`: the ping instant while IDLE,
the give-up instant while AWAITING_PONG or GRACE. Inputs are :class:`Beat` values; the
transitions are the table ``TRANSITIONS`` below, and nothing else changes the state.
A pair missing from the table is a driver bug and raises LocalProtocolError.
"""

from __future__ import annotations

import enum
import math
from typing import Final

import attrs

from .errors import LocalProtocolError


class HeartbeatState(enum.Enum):
    """Where a connection's heartbeat stands."""

    IDLE = "idle"  #: alive; the deadline is when to ping
    AWAITING_PONG = "awaiting-pong"  #: pinged; the deadline is when to give up
    #: pinged, and the answer window opened again after a stall (once per ping); the
    #: deadline is when to give up
    GRACE = "grace"
    EXPIRED = "expired"  #: gave up; the connection must be closed


class Beat(enum.Enum):
    """Inputs to the heartbeat machine."""

    PONG = "pong"  #: a pong arrived
    PING_DUE = "ping-due"  #: the timer fired at or after the ping instant
    OVERDUE = "overdue"  #: the timer fired at or after the give-up instant, on time
    #: the timer fired at or after the give-up instant, but the driver was stalled
    #: during the answer window (late by more than ``late_after``, or resumed after
    #: the ping): the answer may be waiting unread
    STALLED = "stalled"


#: (state, input) -> next state. The only place transitions are defined.
TRANSITIONS: dict[tuple[HeartbeatState, Beat], HeartbeatState] = {
    (HeartbeatState.IDLE, Beat.PONG): HeartbeatState.IDLE,
    # However late the timer fires: never a verdict without a ping first.
    (HeartbeatState.IDLE, Beat.PING_DUE): HeartbeatState.AWAITING_PONG,
    (HeartbeatState.AWAITING_PONG, Beat.PONG): HeartbeatState.IDLE,
    (HeartbeatState.AWAITING_PONG, Beat.OVERDUE): HeartbeatState.EXPIRED,
    # The answer window opens again at the resume, once per ping: a driver late every
    # time (overloaded, not stopped) still closes a dead peer, one window later.
    (HeartbeatState.AWAITING_PONG, Beat.STALLED): HeartbeatState.GRACE,
    (HeartbeatState.GRACE, Beat.PONG): HeartbeatState.IDLE,
    (HeartbeatState.GRACE, Beat.OVERDUE): HeartbeatState.EXPIRED,
}

#: A timer that fires this much after its instant (or ``timeout / 2``, if less) shows a
#: stalled driver, not ordinary scheduling delay.
LATE_AFTER: Final = 1.0


@attrs.define
class Heartbeat:
    """
    One connection's heartbeat.

    Args:
        interval: Silence after which to ping.
        timeout: Running time a ping has to be answered in.
        alive_at: The instant the connection became alive (its connect).
    """

    interval: float
    timeout: float
    alive_at: float
    state: HeartbeatState = HeartbeatState.IDLE
    #: While AWAITING_PONG or GRACE: when the answer window opened (the ping, or the
    #: resume after a stall).
    pinged_at: float = 0.0

    @classmethod
    def start(cls, interval: float, timeout: float, now: float) -> Heartbeat:
        """Begin a heartbeat for a connection that connected at *now*."""
        return cls(interval, timeout, now)

    @property
    def ping_at(self) -> float:
        """When the next ping is due (while IDLE)."""
        return self.alive_at + self.interval

    @property
    def expires_at(self) -> float:
        """When the connection is given up if no pong arrives first (and the driver runs)."""
        if self.state is HeartbeatState.IDLE:
            return self.alive_at + self.interval + self.timeout
        return self.pinged_at + self.timeout

    @property
    def deadline(self) -> float:
        """The instant the timer next matters: the ping or the give-up instant."""
        if self.state is HeartbeatState.IDLE:
            return self.alive_at + self.interval
        return self.pinged_at + self.timeout

    @property
    def late_after(self) -> float:
        """How late a timer may fire before it shows a stalled driver."""
        return min(LATE_AFTER, self.timeout / 2)

    def _step(self, beat: Beat) -> HeartbeatState:
        try:
            self.state = TRANSITIONS[self.state, beat]
        except KeyError:
            raise LocalProtocolError(
                f"can't handle {beat} in heartbeat state {self.state}"
            ) from None
        return self.state

    def pong(self, now: float) -> HeartbeatState:
        """A pong arrived at *now*: the connection is alive again."""
        self._step(Beat.PONG)
        self.alive_at = now
        return self.state

    def timer(self, now: float, *, resumed_at: float = -math.inf) -> HeartbeatState:
        """
        The timer fired at *now* (at or after :attr:`deadline`).

        Args:
            now: The driver's clock.
            resumed_at: The last instant the driver resumed from a stall it noticed
                (input arriving meanwhile was read first); ``-inf`` for none.

        Returns:
            AWAITING_PONG when a ping must be sent, GRACE when the answer window
            opened again after a stall (nothing to send), EXPIRED when the connection
            must be closed.

        Raises:
            LocalProtocolError: if called before the deadline, or after expiry.
        """
        deadline = self.deadline
        if now < deadline:
            raise LocalProtocolError(f"heartbeat timer fired early: {now} < {deadline}")
        if self.state is HeartbeatState.IDLE:
            self._step(Beat.PING_DUE)
            self.pinged_at = now
            return self.state
        if now - deadline > self.late_after:
            resumed_at = max(resumed_at, now)  # this very call is the resume
        if (
            self.state is HeartbeatState.AWAITING_PONG
            and self.pinged_at < resumed_at
            and now < resumed_at + self.timeout
        ):
            self._step(Beat.STALLED)
            self.pinged_at = resumed_at
            return self.state
        return self._step(Beat.OVERDUE)
