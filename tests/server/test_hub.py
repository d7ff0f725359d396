"""The framed hub driven by hand: bytes in, bytes and closes out, no trio."""

from __future__ import annotations

import base64
import sys

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from roombus import BrokerConfig, RoomName, ServerConfig
from roombus.hub import Hub
from roombus.lowlevel import ConnectionId
from roombus.server.metrics import collect
from roombus.server.queues import SendQueue

KEY = base64.b64encode(b"0123456789abcdef")


def request(room: str, user: str) -> bytes:
    return (
        (
            f"GET /ws?room={room}&username={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + b"Sec-WebSocket-Key: "
        + KEY
        + b"\r\n\r\n"
    )


def connect(hub: Hub, room: str, user: str) -> int:
    cid = hub.open(now=0.0)
    hub.receive(cid, request(room, user), now=0.0, timestamp=0)
    return cid


#: The close frame of a reader closed for being slow (1008).
SLOW_CLOSE = b"\x88\x25\x03\xf0send queue full: reading too slowly"


def left_in_queue(hub: Hub, cid: int) -> bytes:
    """Everything *cid*'s send queue still holds, written out."""
    queue = hub.queue(cid)
    assert isinstance(queue, SendQueue)
    out = b""
    while queue:
        out += queue.data()
        queue.consume(len(queue.data()))
    return out


def written(hub: Hub) -> dict[int, bytes]:
    """Write out everything the hub asks for, as a driver with fast peers would."""
    out: dict[int, bytes] = {}
    for cid, queue in hub.take_dirty():
        data = b""
        while queue:
            chunk = queue.data()
            data += chunk
            queue.consume(len(chunk))
        hub.flushed(cid)
        out[cid] = data
    return out


def test_a_thousand_slow_consumers_overflowing_at_once_do_not_recurse() -> None:
    """Each overflow sends a leave to the rest, which are overflowing too: the hub
    works through them as a list, not by recursion."""
    n = 1200
    hub = Hub(BrokerConfig(send_queue=2, rate_limit=0), ServerConfig(max_connections_per_ip=0))
    publisher = connect(hub, "lobby", "pub")
    slow = [connect(hub, "lobby", f"u{i}") for i in range(n)]
    # Nobody reads: the join presence storm alone overflows every queue, in cascades.
    for i in range(3):
        msg = Connection(ConnectionType.CLIENT).send(
            TextMessage(data=f'{{"type":"chat","content":{i}}}')
        )
        hub.receive(publisher, msg, now=1.0, timestamp=0)
    assert hub.overflows >= n
    assert hub.websocket_count <= 1  # the last to join may still be within its bounds
    for cid in slow[:-1]:
        assert left_in_queue(hub, cid).endswith(SLOW_CLOSE)


def test_a_ping_after_our_close_gets_no_pong_and_breaks_nothing() -> None:
    hub = Hub(BrokerConfig(ping_interval=1, ping_timeout=1), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    hub.timeout(now=1.0, timestamp=0)  # pinged
    hub.timeout(now=2.0, timestamp=0)  # no pong: closed with 1011
    out = written(hub)[cid]
    assert out.endswith(b"\x88\x0e\x03\xf3ping timeout")
    client = Connection(ConnectionType.CLIENT)
    hub.receive(cid, client.send(Ping(payload=b"x")), now=2.1, timestamp=0)
    assert written(hub) == {}


def test_a_ping_flood_from_a_client_that_never_reads_stays_bounded() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    queue = hub.queue(cid)
    assert isinstance(queue, SendQueue)
    ping = Connection(ConnectionType.CLIENT).send(Ping(payload=b"p" * 125))
    before = queue.nbytes
    for _ in range(10_000):
        hub.receive(cid, ping, now=0.0, timestamp=0)
    # At most one pong and, once the flood is closed, the close frame (each <= 127).
    assert queue.nbytes <= before + 2 * 127


def test_a_dropped_connection_is_never_upgraded() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = hub.open(now=0.0)
    hub.shutdown(now=0.0, timestamp=0)
    assert hub.take_to_close() == [cid]
    hub.receive(cid, request("lobby", "ann"), now=0.0, timestamp=0)
    assert hub.websocket_count == 0
    assert hub.take_dirty() == []


def test_shutdown_tells_the_broker_at_once() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    connect(hub, "lobby", "ann")
    connect(hub, "lobby", "bob")
    hub.shutdown(now=0.0, timestamp=0)
    assert hub.websocket_count == 0
    assert hub.broker.rooms == []
    closes = written(hub)
    assert all(data.endswith(b"server shutting down") for data in closes.values())


def test_the_peer_close_is_answered_and_the_transport_then_closed() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    client = Connection(ConnectionType.CLIENT)
    hub.receive(cid, client.send(CloseConnection(code=1000)), now=0.0, timestamp=0)
    assert written(hub)[cid] == b"\x88\x02\x03\xe8"
    assert hub.take_to_close() == [cid]


def _request(target: bytes = b"/ws?room=lobby&username=u") -> bytes:
    key = base64.b64encode(b"k" * 16)
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )


def _status(hub: Hub, cid: int) -> bytes:
    hub.receive(cid, _request(), now=0.0, timestamp=0)
    queue = hub.queue(cid)
    assert queue is not None and queue
    return bytes(queue.data()).split(b"\r\n", 1)[0]


def test_over_the_per_address_limit_gets_429_even_with_no_total_limit() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections=0, max_connections_per_ip=2))
    for i in range(70):
        hub.open(now=0.0, peer=f"10.0.0.{i}:1000")
    first = [hub.open(now=0.0, peer="192.0.2.1:1") for _ in range(3)]
    assert hub.take_to_close() == []  # answered, not dropped
    assert _status(hub, first[2]) == b"HTTP/1.1 429 Too Many Requests"
    assert _status(hub, first[0]) == b"HTTP/1.1 101 Switching Protocols"
    assert hub.limit_refusals == 1


def test_far_over_a_limit_is_dropped_without_an_answer() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections=10, max_connections_per_ip=0))
    cids = [hub.open(now=0.0, peer=f"10.0.0.{i}:1") for i in range(10 + 64 + 1)]
    assert hub.take_to_close() == [cids[-1]]
    assert _status(hub, cids[10]) == b"HTTP/1.1 503 Service Unavailable"


def test_connections_without_an_address_share_no_per_address_limit() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections=0, max_connections_per_ip=1))
    cids = [hub.open(now=0.0, peer=peer) for peer in ("stream", "asgi", "", "stream")]
    assert [_status(hub, cid) for cid in cids] == [b"HTTP/1.1 101 Switching Protocols"] * 4
    ipv6 = [hub.open(now=0.0, peer="::1:5000"), hub.open(now=0.0, peer="::1:5001")]
    assert _status(hub, ipv6[1]) == b"HTTP/1.1 429 Too Many Requests"


def test_a_mass_disconnect_gives_the_memory_back() -> None:
    """
    Thousands of connections (in rooms of 10) all dropped at once: what the hub and
    the broker still hold afterwards (once the rooms' positions expired) is a few
    kilobytes, not tables sized for the crowd (a dict never shrinks by deletions) nor
    heaps of stale deadlines.
    """
    import gc
    import tracemalloc

    n = 3000
    hub = Hub(BrokerConfig(), ServerConfig(max_connections_per_ip=0))
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        cids = [connect(hub, f"room{i // 10}", f"user{i}") for i in range(n)]
        written(hub)
        during = tracemalloc.get_traced_memory()[0]
        for cid in cids:
            hub.lost(cid, now=0.0, timestamp=0)
        written(hub)
        del cids
        # The rooms' positions outlive their members, for position_ttl (by design);
        # once that has passed, they are gone too.
        streams = hub.broker.streams
        assert len(streams) == n // 10
        streams.position(RoomName("elsewhere"), BrokerConfig().position_ttl + 1.0)
        assert len(streams) == 1
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert during - before > 3_000_000  # they did take memory
    assert hub.connection_count == 0
    assert kept < 64_000, kept


def test_the_brokers_message_limit_is_the_wires() -> None:
    # Above the wire's default (64 KiB): the configured limit holds, not the default.
    hub = Hub(BrokerConfig(max_message_bytes=100_000, send_queue_bytes=1 << 20), ServerConfig())
    cid = ConnectionId(connect(hub, "lobby", "ann"))
    written(hub)
    client = Connection(ConnectionType.CLIENT)
    chat = '{"type":"chat","content":"' + "x" * 70_000 + '"}'
    hub.receive(cid, client.send(TextMessage(data=chat)), now=0.0, timestamp=0)
    assert b"x" * 70_000 in written(hub)[cid]
    assert hub.take_to_close() == []
    too_big = '{"type":"chat","content":"' + "x" * 100_000 + '"}'
    hub.receive(cid, client.send(TextMessage(data=too_big)), now=0.0, timestamp=0)
    close = written(hub)[cid]
    assert close[0] == 0x88 and close[2:4] == (1009).to_bytes(2, "big")


def test_far_over_max_connections_is_dropped_unanswered_and_counted() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections=1))
    cids = [hub.open(now=0.0) for _ in range(1 + 64)]  # an answer for all of these
    assert hub.take_to_close() == []
    dropped = hub.open(now=0.0)  # more than 64 over: no answer
    assert hub.take_to_close() == [dropped]
    assert dropped not in written(hub)
    assert collect(hub)["roombus_limit_refusals_total"] == 1
    hub.receive(cids[-1], request("lobby", "ann"), now=0.0, timestamp=0)
    assert written(hub)[cids[-1]].startswith(b"HTTP/1.1 503 ")
    assert collect(hub)["roombus_limit_refusals_total"] == 2


def test_lost_is_idempotent_and_ignores_connections_it_does_not_know() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    hub.lost(ConnectionId(999), now=0.0, timestamp=0)
    assert hub.connection_count == 1
    hub.lost(cid, now=0.0, timestamp=0)
    hub.lost(cid, now=0.0, timestamp=0)
    assert hub.connection_count == 0 and hub.websocket_count == 0
    assert hub.closes[(1006, "client")] == 1  # counted once


class _OnlyAnnInVip:
    """An authorizer with no authenticator: it decides by the query's username."""

    def may_join(self, identity, room) -> bool:  # type: ignore[no-untyped-def]
        return room != "vip" or identity.username == "ann"

    def may_publish(self, identity, room) -> bool:  # type: ignore[no-untyped-def]
        return True

    def may_see_presence(self, identity, room) -> bool:  # type: ignore[no-untyped-def]
        return True


def test_an_authorizer_without_an_authenticator_decides_by_the_query_s_username() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(), authorizer=_OnlyAnnInVip())
    out = {}
    for user in ("bob", "ann"):
        cid = hub.open(now=0.0)
        hub.receive(cid, request("vip", user), now=0.0, timestamp=0)
        out[user] = written(hub)[cid]
    assert out["bob"].startswith(b"HTTP/1.1 403 ")
    assert out["bob"].endswith(b"\r\n\r\nnot allowed in room 'vip'\n")  # the broker's reason
    assert out["ann"].startswith(b"HTTP/1.1 101 ")


class _ReadOnlySeat:
    """An authenticator whose identities may join every room and publish nowhere."""

    def authenticate(self, *, path, query, headers, now):  # type: ignore[no-untyped-def]
        from roombus.core.auth import Identity, RoomRules

        return Identity(username="ann", rooms=RoomRules(join=["*"], presence=["*"]))


def test_the_identity_s_room_rules_hold_on_the_open_websocket() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(), authenticator=_ReadOnlySeat())
    cid = connect(hub, "lobby", "ignored")
    assert written(hub)[cid].startswith(b"HTTP/1.1 101 ")
    msg = Connection(ConnectionType.CLIENT).send(TextMessage(data='{"type":"chat","content":1}'))
    hub.receive(cid, msg, now=0.0, timestamp=0)
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(written(hub)[cid])
    (event,) = list(client.events())
    assert isinstance(event, TextMessage) and '"code":"forbidden"' in event.data


def test_probes_are_counted_out_one_by_one() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    probes = [hub.open(now=0.0) for _ in range(3)]
    for cid in probes:
        hub.receive(cid, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    assert hub.probe_count == 3
    for n, cid in enumerate(probes):
        hub.lost(cid, now=0.0, timestamp=0)
        assert hub.probe_count == 2 - n


def test_a_pong_tells_the_adapter_the_deadline_may_have_moved() -> None:
    hub = Hub(BrokerConfig(ping_interval=1, ping_timeout=1), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    hub.timeout(now=1.0, timestamp=0)  # pinged
    hub.deadline_moved = False  # the adapter read the deadline
    hub.receive(cid, Connection(ConnectionType.CLIENT).send(Pong()), now=1.1, timestamp=0)
    assert hub.deadline_moved


def test_crossing_closes_keep_what_was_queued_before_ours() -> None:
    """The server closes (a shutdown) while messages wait in the queue, and the client's
    own close crosses ours: what was queued before our close frame still goes out, then
    the close frame, and then the transport goes."""
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    hub.publish("lobby", "before the close", username="server", now=0.0, timestamp=0)
    hub.shutdown(now=0.0, timestamp=0)  # our close frame, queued after the chat
    client = Connection(ConnectionType.CLIENT)
    hub.receive(cid, client.send(CloseConnection(code=1000)), now=0.0, timestamp=0)
    out = written(hub)[cid]
    assert b"before the close" in out
    assert out.index(b"before the close") < out.index(b"server shutting down")
    assert cid in hub.take_to_close()


def test_the_hub_holds_upgrades_to_the_configured_origins() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(allowed_origins=["https://chat.example"]))

    def upgrade(origin: str) -> tuple[ConnectionId, bytes]:
        cid = hub.open(now=0.0)
        head = request("lobby", "ann").replace(
            b"\r\n\r\n", f"\r\nOrigin: {origin}\r\n\r\n".encode()
        )
        hub.receive(cid, head, now=0.0, timestamp=0)
        return cid, written(hub).get(cid, b"")

    _, refused = upgrade("https://evil.example")
    assert refused.startswith(b"HTTP/1.1 403")
    assert hub.websocket_count == 0
    _, accepted = upgrade("https://chat.example")
    assert accepted.startswith(b"HTTP/1.1 101")
    assert hub.websocket_count == 1


def test_a_head_request_refused_by_admission_gets_no_body() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections=1))
    connect(hub, "lobby", "ann")
    written(hub)
    cid = hub.open(now=0.0)  # over the limit: refused whatever it asks
    hub.receive(cid, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    head, _, body = written(hub)[cid].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"content-length:" in head.lower()
    assert body == b""


def _stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def test_a_chain_of_overflows_is_worked_through_at_one_stack_depth() -> None:
    """Each slow reader's leave overflows the next one only: a chain as long as the room.
    The hub works through it as a worklist, so its stack does not grow with the chain
    (a recursion per link would blow the stack of a large room)."""
    n = 200
    hub = Hub(
        BrokerConfig(send_queue=n + 1, rate_limit=0, heartbeat=False),
        ServerConfig(max_connections_per_ip=0),
    )
    # Nobody reads. The i-th to join holds the room's state and the later joins: the
    # first holds n + 1 messages (full), each later one a message less.
    readers = [connect(hub, "lobby", f"u{i}") for i in range(n)]
    assert hub.overflows == 0
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + 300)  # a recursion per link needs far more
    try:
        hub.publish("lobby", "x", username="server", now=1.0, timestamp=0)
    finally:
        sys.setrecursionlimit(limit)
    assert hub.overflows == n
    assert hub.websocket_count == 0
    for cid in readers:
        assert left_in_queue(hub, cid).endswith(SLOW_CLOSE), cid


def test_a_connection_opened_after_shutdown_is_dropped_at_once() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    hub.shutdown(now=0.0, timestamp=0)
    cid = hub.open(now=1.0, peer="10.0.0.1:1")
    assert hub.take_to_close() == [cid]
    hub.receive(cid, request("lobby", "ann"), now=1.0, timestamp=0)  # read before the close
    assert written(hub) == {}
    assert hub.take_to_close() == []
    hub.lost(cid, now=1.0, timestamp=0)
    assert hub.connection_count == 0


@pytest.mark.parametrize(
    ("path", "status"), [(b"/healthz", b"200"), (b"/no-such-page", b"404"), (b"/ws", b"426")]
)
def test_a_head_request_routed_to_an_answer_gets_its_head_only(path: bytes, status: bytes) -> None:
    """HEAD gets the status and length GET would, and no body (RFC 9110 9.3.2)."""
    answers = {}
    for method in (b"GET", b"HEAD"):
        hub = Hub(BrokerConfig(), ServerConfig())
        cid = hub.open(now=0.0)
        hub.receive(
            cid, method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0
        )
        answers[method] = written(hub)[cid].partition(b"\r\n\r\n")
    get_head, _, get_body = answers[b"GET"]
    head_head, _, head_body = answers[b"HEAD"]
    assert get_head.startswith(b"HTTP/1.1 " + status) and get_body
    assert head_head.startswith(b"HTTP/1.1 " + status) and head_body == b""
    length = [h for h in get_head.lower().split(b"\r\n") if h.startswith(b"content-length:")]
    assert length and length[0] in head_head.lower().split(b"\r\n")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (
            b"GET /ws?room=lobby&username=ann HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"missing or invalid Sec-WebSocket-Key",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: one\r\n  two\r\n\r\n",
            b"malformed HTTP request: folded header lines are not accepted",
        ),
    ],
)
def test_a_bad_upgrade_or_request_says_why_in_its_400(raw: bytes, words: bytes) -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = hub.open(now=0.0)
    hub.receive(cid, raw, now=0.0, timestamp=0)
    head, _, body = written(hub)[cid].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert body == words + b"\n"
