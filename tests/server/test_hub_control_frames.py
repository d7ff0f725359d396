"""
Input that is not a message still costs: pings, unsolicited pongs and the frames of a
fragmented message are charged to the connection's rate limit, with the chat flood's
policy (dropped while over it, closed with 1008 once abusive). The answer to the
server's own ping is never charged. A framed hub driven by hand, no network.
"""

from __future__ import annotations

from wsproto.connection import Connection, ConnectionType
from wsproto.events import Ping, TextMessage

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub

from .test_hub import connect, written
from .test_wire import raw_frame

RATE_CLOSE = b"\x88\x15\x03\xf0rate limit exceeded"
PONG = raw_frame(0xA, b"")


def flood(hub: Hub, cid: int, frame: bytes, *, count: int, per_write: int = 100) -> int:
    """Send *count* copies of *frame*, *per_write* to a write, all at one instant, until
    the hub closes the connection; returns how many were sent."""
    sent = 0
    while sent < count and cid in hub.broker:
        hub.receive(cid, frame * per_write, now=0.0, timestamp=0)
        while hub.input_pending(cid):  # the rest of the write, as an adapter reads it
            hub.receive(cid, b"", now=0.0, timestamp=0)
        sent += per_write
    return sent


def test_a_ping_flood_is_closed_with_1008() -> None:
    hub = Hub(BrokerConfig(rate_limit=100, rate_burst=200), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    ping = Connection(ConnectionType.CLIENT).send(Ping(payload=b"p"))
    sent = flood(hub, cid, ping, count=100_000)
    assert cid not in hub.broker
    # The burst is answered, then the refusals pile up to the burst again: closed.
    assert sent <= 2 * 200 + 100
    out = written(hub)[cid]
    assert out.endswith(RATE_CLOSE)
    assert out.count(b"\x8a\x01p") <= 1  # only the latest pong is ever queued


def test_an_unsolicited_pong_flood_is_closed_with_1008() -> None:
    hub = Hub(BrokerConfig(rate_limit=100, rate_burst=200), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    assert flood(hub, cid, PONG, count=100_000) <= 2 * 200 + 100
    assert written(hub)[cid].endswith(RATE_CLOSE)


def test_refused_pings_go_unanswered() -> None:
    hub = Hub(BrokerConfig(rate_limit=1, rate_burst=2), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    ping = Connection(ConnectionType.CLIENT).send(Ping(payload=b"p"))
    answered = []
    for _ in range(4):  # two within the burst, then two refused (strikes 1, 2: not abuse)
        hub.receive(cid, ping, now=0.0, timestamp=0)
        answered.append(written(hub).get(cid) == b"\x8a\x01p")
    assert answered == [True, True, False, False]
    assert cid in hub.broker


def test_fragments_are_charged_like_messages() -> None:
    """Many-fragment messages at a rate of messages well within the limit: each frame
    costs, so the run is closed as a flood."""
    hub = Hub(BrokerConfig(rate_limit=100, rate_burst=200), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    message = raw_frame(0x1, b"", fin=False) + raw_frame(0x0, b"x", fin=False) * 99
    message += raw_frame(0x0, b'{"type":"ping"}')
    sent = flood(hub, cid, message, count=30, per_write=1)  # 30 messages: 30 % of the burst
    assert cid not in hub.broker
    assert sent <= 5
    assert written(hub)[cid].endswith(RATE_CLOSE)


def test_heartbeat_pongs_are_never_charged() -> None:
    """A client that used up its allowance on chats still answers every ping: the answer
    to the server's own ping is free, so the heartbeat never trips the limit."""
    hub = Hub(BrokerConfig(rate_limit=1, rate_burst=1, ping_interval=1, ping_timeout=1))
    cid = connect(hub, "lobby", "ann")
    chat = Connection(ConnectionType.CLIENT).send(TextMessage(data='{"type":"ping"}'))
    now = 0.0
    for _ in range(200):
        now += 1.0
        hub.receive(cid, chat * 2, now=now, timestamp=0)  # one allowed, one refused
        hub.timeout(now=now, timestamp=0)  # the server pings
        assert written(hub)[cid].endswith(b"\x89\x00")
        hub.receive(cid, PONG, now=now, timestamp=0)
        assert cid in hub.broker
    assert hub.broker.next_deadline() == now + 1.0  # the pong counted: next ping in 1 s
