"""
Every way a framed hub lets a WebSocket go tells the rest of its room with the
driver's wall clock: the ``timestamp`` of the hub call it happened in is the one in
the ``presence`` leave the others get.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Pong, TextMessage

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub

from .test_hub import connect, written

T = 1_700_000_123  # the driver's wall clock at the call that lets the connection go


def leaves(data: bytes) -> dict[str, int]:
    """The leaves in a stream of server frames: who left, at what timestamp."""
    ws = Connection(ConnectionType.CLIENT)
    ws.receive_data(data)
    out = {}
    for event in ws.events():
        if isinstance(event, TextMessage):
            envelope = json.loads(event.data)
            if envelope["type"] == "presence" and envelope["event"] == "leave":
                out[envelope["username"]] = envelope["timestamp"]
    return out


def frame(event: object) -> bytes:
    return Connection(ConnectionType.CLIENT).send(event)  # type: ignore[arg-type]


def lost(hub: Hub, cid: int) -> None:
    hub.lost(cid, now=1.0, timestamp=T)


def closed_by_its_peer(hub: Hub, cid: int) -> None:
    hub.receive(cid, frame(CloseConnection(code=1000)), now=1.0, timestamp=T)


def refused_input(hub: Hub, cid: int) -> None:
    hub.receive(cid, b"\x82\x81abcd\x00", now=1.0, timestamp=T)  # a masked binary frame


def drained_now(hub: Hub, cid: int) -> None:
    # Shuffled first (a draw of 0 swaps the two), and closed at the window's start.
    hub.drain(now=1.0, timestamp=T, seconds=5, random=lambda: 0.0)


def drained_later(hub: Hub, cid: int) -> None:
    # Shuffled first, then closed half-way through its slot: at 2.25 (the other at 4.75).
    hub.drain(now=1.0, timestamp=0, seconds=5, random=iter([0.0, 0.5, 0.5]).__next__)
    assert cid in hub.broker
    hub.timeout(now=3.0, timestamp=T)


def published_to(hub: Hub, cid: int) -> bytes:
    """It reads nothing (the others do): the messages that overflow its queue close it."""
    out = b""
    for i in range(40):
        hub.publish("lobby", i, username="server", now=1.0, timestamp=T)
        for c, queue in hub.take_dirty():
            while c != cid and queue:
                out += queue.data()
                queue.consume(len(queue.data()))
    return out


def overflowed_by_a_client(hub: Hub, cid: int) -> bytes:
    """It reads nothing; another client's messages overflow its queue."""
    out = b""
    sender = Connection(ConnectionType.CLIENT)
    for i in range(40):
        chat = sender.send(TextMessage(data=json.dumps({"type": "chat", "content": i})))
        hub.receive(cid - 1, chat, now=1.0, timestamp=T)
        for c, queue in hub.take_dirty():
            while c != cid and queue:
                out += queue.data()
                queue.consume(len(queue.data()))
    return out


def over_the_budget(hub: Hub, cid: int) -> bytes:
    """It reads nothing (the others do): past max-queued-bytes, it is closed."""
    out = b""
    for i in range(3):
        hub.publish("lobby", "x" * 2000 + str(i), username="server", now=1.0, timestamp=0)
        for c, queue in hub.take_dirty():
            while c != cid and queue:
                out += queue.data()
                queue.consume(len(queue.data()))
    hub.enforce_budget(now=1.0, timestamp=T)
    return out


@pytest.mark.parametrize(
    "go",
    [
        lost,
        closed_by_its_peer,
        refused_input,
        drained_now,
        drained_later,
        published_to,
        overflowed_by_a_client,
        over_the_budget,
    ],
)
def test_a_leave_carries_the_timestamp_of_the_call_that_let_it_go(
    go: Callable[[Hub, int], bytes | None],
) -> None:
    hub = Hub(BrokerConfig(send_queue=8, rate_limit=0), ServerConfig(max_queued_bytes=4096))
    ann = connect(hub, "lobby", "ann")
    bob = connect(hub, "lobby", "bob")
    written(hub)
    out = go(hub, bob) or b""
    assert bob not in hub.broker
    assert leaves(out + written(hub).get(ann, b""))["bob"] == T


def test_a_slow_reader_overflowed_by_a_timeout_s_leaves_is_let_go_at_its_timestamp() -> None:
    """A dead peer timed out by the heartbeat leaves; that leave overflows a slow
    reader's queue, which is closed too: both leaves carry the timeout's timestamp."""
    hub = Hub(BrokerConfig(ping_interval=1, ping_timeout=1, send_queue=4, rate_limit=0))
    ann = connect(hub, "lobby", "ann")
    slow = connect(hub, "lobby", "slow")
    dead = connect(hub, "lobby", "dead")
    written(hub)
    for i in range(4):  # the slow reader's queue is full
        hub.publish("lobby", i, username="server", now=0.5, timestamp=0)
        for cid, queue in hub.take_dirty():
            if cid != slow:
                while queue:
                    queue.consume(len(queue.data()))
    hub.timeout(now=1.0, timestamp=0)  # everyone pinged
    for cid in (ann, slow):
        hub.receive(cid, frame(Pong()), now=1.1, timestamp=0)
    hub.timeout(now=2.5, timestamp=T)  # the dead one's pong is late
    assert dead not in hub.broker and slow not in hub.broker and ann in hub.broker
    assert leaves(written(hub)[ann]) == {"dead": T, "slow": T}


def test_a_flooder_of_unsolicited_pongs_leaves_at_the_timestamp_of_its_flood() -> None:
    hub = Hub(BrokerConfig(rate_limit=1, rate_burst=3), ServerConfig())
    ann = connect(hub, "lobby", "ann")
    bob = connect(hub, "lobby", "bob")
    written(hub)
    hub.receive(bob, frame(Pong()) * 20, now=1.0, timestamp=T)  # each one charged
    assert bob not in hub.broker
    assert leaves(written(hub)[ann]) == {"bob": T}


def test_a_client_s_chat_carries_the_timestamp_of_the_call_it_came_in() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    ann = connect(hub, "lobby", "ann")
    bob = connect(hub, "lobby", "bob")
    written(hub)
    chat = frame(TextMessage(data='{"type":"chat","content":"hi"}'))
    hub.receive(ann, chat, now=1.0, timestamp=T)
    ws = Connection(ConnectionType.CLIENT)
    ws.receive_data(written(hub)[bob])
    (event,) = list(ws.events())
    assert isinstance(event, TextMessage)
    assert json.loads(event.data)["timestamp"] == T
