"""
The heartbeat: one connection's liveness state machine.

Theory of operation
-------------------
A connection is *alive* at connect and whenever a pong arrives (solicited or not). Let
``alive_at`` be the last such instant. The broker pings it at ``alive_at + interval``
and closes it at ``alive_at + interval + timeout`` unless a pong came in between. So
a silent peer is closed exactly ``interval + timeout`` after its last sign of life,
however late the driver calls in, and never earlier.

The machine has one timer, :attr:`Heartbeat.deadline`: the ping instant while IDLE,
the give-up instant while AWAITING_PONG. Inputs are :class:`Beat` values; the
transitions are the table ``TRANSITIONS`` below, and nothing else changes the state.
A pair missing from the table is a driver bug and raises LocalProtocolError.
"""

from __future__ import annotations

import enum

import attrs

from ._errors import LocalProtocolError


class HeartbeatState(enum.Enum):
    """Where a connection's heartbeat stands."""

    IDLE = "idle"  #: alive; the deadline is when to ping
    AWAITING_PONG = "awaiting-pong"  #: pinged; the deadline is when to give up
    EXPIRED = "expired"  #: gave up; the connection must be closed


class Beat(enum.Enum):
    """Inputs to the heartbeat machine."""

    PONG = "pong"  #: a pong arrived
    PING_DUE = "ping-due"  #: the timer fired at or after the ping instant
    OVERDUE = "overdue"  #: the timer fired at or after the give-up instant


#: (state, input) -> next state. The only place transitions are defined.
TRANSITIONS: dict[tuple[HeartbeatState, Beat], HeartbeatState] = {
    (HeartbeatState.IDLE, Beat.PONG): HeartbeatState.IDLE,
    (HeartbeatState.IDLE, Beat.PING_DUE): HeartbeatState.AWAITING_PONG,
    # The driver was so late that the peer never had a chance to be pinged in time:
    # the deadline is the same either way.
    (HeartbeatState.IDLE, Beat.OVERDUE): HeartbeatState.EXPIRED,
    (HeartbeatState.AWAITING_PONG, Beat.PONG): HeartbeatState.IDLE,
    (HeartbeatState.AWAITING_PONG, Beat.OVERDUE): HeartbeatState.EXPIRED,
}


@attrs.define
class Heartbeat:
    """
    One connection's heartbeat.

    Args:
        interval: Silence after which to ping.
        timeout: Time a ping has to be answered in.
        now: The instant the connection became alive (its connect).
    """

    interval: float
    timeout: float
    alive_at: float
    state: HeartbeatState = HeartbeatState.IDLE

    @classmethod
    def start(cls, interval: float, timeout: float, now: float) -> Heartbeat:
        """Begin a heartbeat for a connection that connected at *now*."""
        return cls(interval, timeout, now)

    @property
    def ping_at(self) -> float:
        """When the next ping is due."""
        return self.alive_at + self.interval

    @property
    def expires_at(self) -> float:
        """When the connection is given up if no pong arrives first."""
        return self.alive_at + self.interval + self.timeout

    @property
    def deadline(self) -> float:
        """The instant the timer next matters: the ping or the give-up instant."""
        if self.state is HeartbeatState.IDLE:
            return self.alive_at + self.interval
        return self.alive_at + self.interval + self.timeout

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

    def timer(self, now: float) -> HeartbeatState:
        """
        The timer fired at *now* (at or after :attr:`deadline`).

        Returns:
            AWAITING_PONG when a ping must be sent, EXPIRED when the connection must
            be closed.

        Raises:
            LocalProtocolError: if called before the deadline, or after expiry.
        """
        if now < self.deadline:
            raise LocalProtocolError(f"heartbeat timer fired early: {now} < {self.deadline}")
        return self._step(Beat.OVERDUE if now >= self.expires_at else Beat.PING_DUE)
