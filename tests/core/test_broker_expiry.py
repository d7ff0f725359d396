"""
Credentials that expire (``ClientConnected.expires``), in the core alone.

A model keeps each live connection's expiry; after every step the broker's
``next_deadline()`` must be exactly the earliest live expiry (heartbeats off) or the
earlier of that and the heartbeat's deadline, and ``handle_timeout(now)`` must close
exactly the live connections whose credentials expired by *now* (1008 "credentials
expired", earliest first), each leave told to the rest of the room.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from roombus import BrokerConfig, RoomName, Username
from roombus.core.actions import Action
from roombus.lowlevel import (
    Broker,
    ClientConnected,
    ClientDisconnected,
    Close,
    CloseCode,
    ConnectionId,
)

from ..helpers import TS, cid, deliveries

#: (kind, connection number, expiry or time step)
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("connect"),
            st.integers(0, 7),
            st.one_of(st.none(), st.integers(1, 40).map(float)),
        ),
        st.tuples(st.just("disconnect"), st.integers(0, 7), st.none()),
        st.tuples(st.just("wait"), st.just(0), st.integers(0, 15).map(float)),
    ),
    max_size=40,
)


def leaves(actions: list[Action]) -> list[tuple[str, frozenset[ConnectionId]]]:
    """(who left, who was told) for every presence ``leave`` among *actions*."""
    return [
        (envelope["username"], frozenset(cid(n) for n in conns))
        for conns, envelope in deliveries(actions)
        if envelope["type"] == "presence" and envelope["event"] == "leave"
    ]


@given(steps)
def test_expiries_are_exact(script: list[tuple[str, int, float | None]]) -> None:
    broker = Broker(BrokerConfig(heartbeat=False, rate_limit=0))
    live: dict[ConnectionId, float | None] = {}
    now = 0.0
    for kind, n, value in script:
        conn = ConnectionId(n)
        if kind == "connect" and conn not in live:
            expires = None if value is None else now + value
            broker.handle(
                ClientConnected(
                    conn=conn, username=Username(f"u{n}"), room=RoomName("r"), expires=expires
                ),
                now=now,
                timestamp=TS,
            )
            live[conn] = expires
        elif kind == "disconnect" and conn in live:
            broker.handle(ClientDisconnected(conn=conn), now=now, timestamp=TS)
            del live[conn]
        elif kind == "wait":
            assert value is not None
            now += value
            actions = broker.handle_timeout(now=now, timestamp=TS)
            due = sorted((at, c) for c, at in live.items() if at is not None and at <= now)
            closes = [a for a in actions if isinstance(a, Close)]
            assert [(c.conn, c.code, c.reason) for c in closes] == [
                (c, CloseCode.POLICY_VIOLATION, "credentials expired") for _, c in due
            ]
            for _, c in due:
                del live[c]
            # Each one's leave reaches every member still there (and none from elsewhere).
            told = leaves(actions)
            gone = {f"u{int(c)}" for _, c in due}
            assert {who for who, _ in told} <= gone
            if live:
                assert {who for who, _ in told} == gone
                for _, receivers in told:
                    assert set(live) <= receivers <= set(live) | {c for _, c in due}
        expiries = [at for at in live.values() if at is not None]
        assert broker.next_deadline() == (min(expiries) if expiries else None)
    # Nothing expires twice, and a departed connection's expiry is never acted on.
    assert broker.handle_timeout(now=now, timestamp=TS) == []


@given(
    expires_in=st.integers(1, 60).map(float),
    ping_interval=st.integers(1, 60).map(float),
)
def test_next_deadline_is_the_earlier_of_heartbeat_and_expiry(
    expires_in: float, ping_interval: float
) -> None:
    broker = Broker(BrokerConfig(ping_interval=ping_interval, ping_timeout=60.0, rate_limit=0))
    broker.handle(
        ClientConnected(conn=ConnectionId(1), username=Username("ann"), expires=expires_in),
        now=0.0,
        timestamp=TS,
    )
    assert broker.next_deadline() == min(expires_in, ping_interval)
    # Just before its expiry it is still open; at it, it is closed.
    early = broker.handle_timeout(now=expires_in - 0.5, timestamp=TS)
    assert not any(isinstance(a, Close) for a in early)
    late = broker.handle_timeout(now=expires_in, timestamp=TS)
    assert [a for a in late if isinstance(a, Close)] == [
        Close(conn=ConnectionId(1), code=CloseCode.POLICY_VIOLATION, reason="credentials expired")
    ]
    assert broker.next_deadline() is None
