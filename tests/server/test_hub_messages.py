"""The hub for transports that speak WebSocket messages themselves (MessageHub)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from roombus import BrokerConfig, ConfigError, LocalProtocolError, ServerConfig
from roombus.core.auth import Identity
from roombus.core.names import Username
from roombus.hub import FramedHub, Hub, MessageHub
from roombus.lowlevel import ConnectionId
from roombus.server.auth import Refusal
from roombus.server.handshake import HttpResponse
from roombus.server.metrics import collect
from roombus.server.queues import CloseMessage, MessageQueue

TS = 1_700_000_000
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
QUIET = BrokerConfig(heartbeat=False)


def make_hub(**settings: Any) -> MessageHub:
    broker = {k: v for k, v in settings.items() if k in BrokerConfig.__annotations__}
    server = {k: v for k, v in settings.items() if k not in broker}
    return MessageHub(BrokerConfig(heartbeat=False, **broker), ServerConfig(**server))


def open_ws(hub: MessageHub, username: str, room: str = "lobby", now: float = 0.0) -> ConnectionId:
    opened = hub.open_websocket(
        f"/ws?room={room}&username={username}".encode(),
        [(b"sec-websocket-key", KEY)],
        now=now,
        timestamp=TS,
    )
    assert not isinstance(opened, HttpResponse), opened
    return opened


def outbox(hub: MessageHub) -> dict[ConnectionId, list[Any]]:
    """What each dirty connection has to send (decoded), all of it sent and reported."""
    out: dict[ConnectionId, list[Any]] = {}
    for cid, queue in hub.take_dirty_messages():
        items = out.setdefault(cid, [])
        while queue:
            for item in queue.data():
                items.append(json.loads(item) if isinstance(item, bytes) else item)
                queue.consume(1)
        hub.flushed(cid)
    return out


def test_the_heartbeat_must_be_off() -> None:
    for config in (None, BrokerConfig()):
        with pytest.raises(ConfigError, match="heartbeat") as raised:
            MessageHub(config)
        assert str(raised.value) == (
            "heartbeat: must be off for a transport that owns pings (a MessageHub): "
            "use the server's own ping setting"
        )


def test_each_hub_takes_only_its_own_kind_of_connection() -> None:
    # Each class has only its own inputs and its own output.
    messages = MessageHub(QUIET)
    for name in ("open", "receive", "input_pending", "take_dirty"):
        assert not hasattr(messages, name), name
    framed = FramedHub()
    for name in ("open_websocket", "receive_message", "take_dirty_messages"):
        assert not hasattr(framed, name), name
    assert (FramedHub.framed, MessageHub.framed) == (True, False)
    assert Hub is FramedHub


def test_a_hub_made_with_framed_false_names_the_message_hub() -> None:
    with pytest.raises(LocalProtocolError, match="MessageHub"):
        Hub(QUIET, framed=False)
    with pytest.raises(LocalProtocolError, match="FramedHub"):
        MessageHub(QUIET, framed=True)
    # The class's own value is still accepted.
    assert Hub(framed=True).framed and not MessageHub(QUIET, framed=False).framed


def test_open_joins_at_once_and_the_queue_holds_the_presence_messages() -> None:
    hub = make_hub()
    ann = open_ws(hub, "ann")
    assert hub.websocket_count == 1
    assert [m["type"] for m in outbox(hub)[ann]] == ["presence", "presence_state"]
    bob = open_ws(hub, "bob")
    out = outbox(hub)
    assert out[ann] == [out[bob][0]]  # bob's join, to both
    hub.receive_message(bob, '{"type":"chat","content":"hi"}', now=1.0, timestamp=TS)
    out = outbox(hub)
    assert out[ann] == out[bob]
    assert out[ann][0]["content"] == "hi"
    assert hub.next_deadline() is None  # no heartbeat, no handshake phase


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        (b"/ws?room=lobby&username=ann", [(b"origin", b"https://evil.example")], 403),
        (b"/ws?room=lobby&username=ann", [], 403),  # no origin at all
        (b"/ws?room=a%20b&username=ann", [(b"origin", b"https://ok.example")], 400),
        (b"/ws?room=lobby", [(b"origin", b"https://ok.example")], 400),
        (b"/elsewhere?room=lobby&username=ann", [], 404),
        (
            b"/ws?room=lobby&username=ann",
            [(b"origin", b"https://ok.example"), (b"sec-websocket-key", b"short")],
            400,
        ),
    ],
)
def test_refusals_come_before_any_connection(
    target: bytes, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    hub = make_hub(allowed_origins=["https://ok.example"])
    refused = hub.open_websocket(target, headers, now=0.0, timestamp=TS)
    assert isinstance(refused, HttpResponse) and refused.status == status
    assert hub.connection_count == 0


def test_binary_closes_1003_and_the_others_learn_at_once() -> None:
    hub = make_hub(close_timeout=2.0)
    ann, bob = open_ws(hub, "ann"), open_ws(hub, "bob")
    outbox(hub)
    hub.receive_message(bob, b"\x00", now=1.0, timestamp=TS)
    out = outbox(hub)
    assert out[bob] == [CloseMessage(1003, "binary frames are not supported")]
    assert out[ann][0]["event"] == "leave"
    assert hub.websocket_count == 1
    # CLOSING until the server reports the peer gone; more input is ignored.
    hub.receive_message(bob, '{"type":"chat","content":"late"}', now=1.5, timestamp=TS)
    assert outbox(hub) == {}
    assert hub.take_to_close() == []
    hub.lost(bob, now=1.6, timestamp=TS)
    assert hub.connection_count == 1


def test_unanswered_close_is_dropped_after_the_close_timeout() -> None:
    hub = make_hub(close_timeout=2.0)
    ann = open_ws(hub, "ann")
    hub.receive_message(ann, b"binary", now=1.0, timestamp=TS)
    assert hub.next_deadline() == 3.0
    hub.timeout(now=2.9, timestamp=TS)
    assert hub.take_to_close() == []
    hub.timeout(now=3.0, timestamp=TS)
    assert hub.take_to_close() == [ann]


def test_size_limit_in_utf8_bytes() -> None:
    hub = make_hub(max_message_bytes=1024, send_queue_bytes=4096)
    ann = open_ws(hub, "ann")
    outbox(hub)
    at_limit = '{"type":"chat","content":"' + "x" * (1024 - 28) + '"}'
    hub.receive_message(ann, at_limit, now=0.0, timestamp=TS)
    assert outbox(hub)[ann][0]["type"] == "chat"
    # 400 characters, but 1200 bytes.
    hub.receive_message(ann, '{"type":"chat","content":"' + "€" * 400 + '"}', now=0, timestamp=TS)
    assert outbox(hub)[ann] == [CloseMessage(1009, "message too big")]


def test_shutdown_closes_with_1001_after_what_is_queued_and_refuses_newcomers() -> None:
    hub = make_hub()
    ann = open_ws(hub, "ann")
    hub.shutdown(now=0.0, timestamp=0)
    out = outbox(hub)[ann]
    assert [m["type"] for m in out[:-1]] == ["presence", "presence_state"]
    assert out[-1] == CloseMessage(1001, "server shutting down")
    refused = hub.open_websocket(b"/ws?room=a&username=b", [], now=0.0, timestamp=TS)
    assert isinstance(refused, HttpResponse) and refused.status == 503


def test_a_slow_reader_is_closed_1008_with_its_backlog_dropped() -> None:
    hub = make_hub(send_queue=3)
    ann, slow = open_ws(hub, "ann"), open_ws(hub, "slow")
    outbox(hub)
    queues = dict(hub.take_dirty_messages())
    for i in range(4):  # slow never sends
        hub.receive_message(ann, json.dumps({"type": "chat", "content": i}), now=0, timestamp=TS)
        queues.update(hub.take_dirty_messages())
        while queues[ann]:
            queues[ann].consume(len(queues[ann].data()))
    queue = queues[slow]
    assert isinstance(queue, MessageQueue)
    # What it had not been handed yet is dropped: only the close is left.
    assert queue.data() == [CloseMessage(1008, "send queue full: reading too slowly")]
    assert hub.overflows == 1
    assert hub.websocket_count == 1


class _Expiring:
    """An authenticator: the token is the username, good until ``TS + 10``."""

    def authenticate(
        self, *, path: bytes, query: bytes, headers: Any, now: float
    ) -> Identity | Refusal:
        for name, value in headers:
            if name == b"authorization":
                if now > TS + 10:
                    return Refusal(401, "token expired")
                return Identity(username=value.decode().removeprefix("Bearer "))
        return Refusal(401, "no token")


@pytest.mark.parametrize(("timestamp", "status"), [(TS, None), (TS + 10, None), (TS + 11, 401)])
def test_the_authenticator_decides_on_the_wall_clock(timestamp: int, status: int | None) -> None:
    hub = MessageHub(QUIET, authenticator=_Expiring())
    target = b"/ws?room=lobby&username=mallory"
    headers = [(b"sec-websocket-key", KEY), (b"authorization", b"Bearer ann")]
    opened = hub.open_websocket(target, headers, now=0.0, timestamp=timestamp)
    if status is None:
        assert not isinstance(opened, HttpResponse), opened
        assert outbox(hub)[opened][0]["username"] == "ann"  # the token's, not the query's
    else:
        assert isinstance(opened, HttpResponse) and opened.status == status
        assert hub.connection_count == 0
    refused = hub.open_websocket(target, headers[:1], now=0.0, timestamp=TS)
    assert isinstance(refused, HttpResponse) and refused.status == 401


def test_over_max_connections_is_refused_503_counted_and_forgotten() -> None:
    hub = make_hub(max_connections=1)
    ann = open_ws(hub, "ann")
    refused = hub.open_websocket(
        b"/ws?room=lobby&username=bob", [(b"sec-websocket-key", KEY)], now=0.0, timestamp=TS
    )
    assert isinstance(refused, HttpResponse) and refused.status == 503
    assert hub.connection_count == 1 and hub.websocket_count == 1
    assert collect(hub)["roombus_limit_refusals_total"] == 1
    assert hub.http_refusals[503] == 1
    assert [m["users"] for m in outbox(hub)[ann] if m["type"] == "presence_state"] == [["ann"]]
    hub.lost(ann, now=1.0, timestamp=TS)
    open_ws(hub, "bob")  # the refused one left no trace: there is room again


def test_a_shutdown_refusal_is_counted() -> None:
    hub = make_hub()
    hub.shutdown(now=0.0, timestamp=0)
    refused = hub.open_websocket(b"/ws?room=a&username=b", [], now=0.0, timestamp=TS)
    assert isinstance(refused, HttpResponse) and refused.status == 503
    assert b"shutting down" in refused.body
    assert hub.http_refusals.items() == [(503, 1)]


@pytest.mark.parametrize(
    ("message", "code"),
    [(b"\x00", 1003), ('{"type":"chat","content":"' + "x" * 2000 + '"}', 1009)],
)
def test_every_envelope_carries_the_callers_timestamp(message: str | bytes, code: int) -> None:
    hub = make_hub(max_message_bytes=1024)
    ann = open_ws(hub, "ann")
    bob = hub.open_websocket(
        b"/ws?room=lobby&username=bob", [(b"sec-websocket-key", KEY)], now=1.0, timestamp=TS + 1
    )
    assert not isinstance(bob, HttpResponse)
    assert outbox(hub)[ann][-1]["timestamp"] == TS + 1  # bob's join
    hub.receive_message(bob, '{"type":"chat","content":"hi"}', now=2.0, timestamp=TS + 2)
    assert [m["timestamp"] for m in outbox(hub)[ann]] == [TS + 2]
    hub.receive_message(bob, message, now=3.0, timestamp=TS + 3)
    out = outbox(hub)
    assert out[bob] == [CloseMessage(code, out[bob][0].reason)]
    assert [(m["event"], m["timestamp"]) for m in out[ann]] == [("leave", TS + 3)]
    assert hub.closes.items() == [((code, "server"), 1)]


def test_a_refused_message_closes_after_what_is_already_queued() -> None:
    hub = make_hub()
    ann = open_ws(hub, "ann")  # its presence messages are queued, not yet sent
    hub.receive_message(ann, b"\x00", now=1.0, timestamp=TS)
    out = outbox(hub)[ann]
    assert [m["type"] for m in out[:-1]] == ["presence", "presence_state"]
    assert out[-1] == CloseMessage(1003, "binary frames are not supported")


def test_a_message_for_an_unknown_connection_is_ignored() -> None:
    hub = make_hub()
    ann = open_ws(hub, "ann")
    hub.lost(ann, now=1.0, timestamp=TS)
    for cid in (ann, ConnectionId(12345)):
        hub.receive_message(cid, '{"type":"chat","content":"late"}', now=2.0, timestamp=TS)
    assert outbox(hub) == {} and hub.connection_count == 0


def test_max_queued_bytes_counts_message_queues_and_closes_the_slowest() -> None:
    hub = make_hub(max_queued_bytes=2000, send_queue=1000, send_queue_bytes=100_000)
    ann = open_ws(hub, "ann")
    outbox(hub)
    # Neither ever reads; "slowest" also holds "slow"'s join and presence.
    slowest, slow = open_ws(hub, "slowest"), open_ws(hub, "slow")
    queues = dict(hub.take_dirty_messages())
    for _ in range(8):
        chat = json.dumps({"type": "chat", "content": "x" * 100})
        hub.receive_message(ann, chat, now=0, timestamp=TS)
        queues.update(hub.take_dirty_messages())
        while queues[ann]:
            queues[ann].consume(len(queues[ann].data()))
        hub.flushed(ann)
    assert hub.budget.used > 2000
    assert hub.budget.used - queues[slowest].data_bytes <= 2000 - 2000 // 8
    hub.enforce_budget(now=1.0, timestamp=TS)
    # Closing the one with the most bytes waiting is enough.
    (close,) = queues[slowest].data()  # its backlog dropped
    assert isinstance(close, CloseMessage) and close.code == 1008
    assert queues[slow].data()[-1] != close
    assert hub.budget_closes == 1 and hub.websocket_count == 2
    assert hub.budget.used <= 2000


def test_the_leave_of_a_slow_reader_carries_the_callers_timestamp() -> None:
    hub = make_hub(send_queue=3)
    ann = open_ws(hub, "ann")
    open_ws(hub, "slow")
    outbox(hub)
    seen: list[Any] = []
    for i in range(4):  # slow never sends
        chat = json.dumps({"type": "chat", "content": i})
        hub.receive_message(ann, chat, now=float(i), timestamp=TS + i)
        for cid, queue in hub.take_dirty_messages():
            while cid == ann and queue:
                seen.extend(json.loads(m) for m in queue.data() if isinstance(m, bytes))
                queue.consume(len(queue.data()))
    leaves = [m for m in seen if m.get("event") == "leave"]
    assert [(m["username"], m["timestamp"]) for m in leaves] == [("slow", TS + 3)]


class _Leeway:
    """Credentials that expire at ``TS + 10``, taken with 5 s of clock skew."""

    leeway = 5.0

    def authenticate(
        self, *, path: bytes, query: bytes, headers: Any, now: float
    ) -> Identity | Refusal:
        return Identity(username=Username("ann"), expires_at=TS + 10)


def test_expiring_credentials_close_after_the_authenticators_leeway() -> None:
    hub = MessageHub(QUIET, ServerConfig(close_timeout=60.0), authenticator=_Leeway())
    target, headers = b"/ws?room=lobby", [(b"sec-websocket-key", KEY)]
    ann = hub.open_websocket(target, headers, now=100.0, timestamp=TS)
    assert not isinstance(ann, HttpResponse)
    other = hub.open_websocket(target, headers, now=100.0, timestamp=TS)
    assert not isinstance(other, HttpResponse)
    hub.receive_message(other, b"\x00", now=100.0, timestamp=TS)  # closing: due at 160
    outbox(hub)
    assert hub.next_deadline() == 115.0  # the expiry comes first
    hub.timeout(now=114.9, timestamp=TS + 14)
    assert outbox(hub) == {}
    hub.timeout(now=115.0, timestamp=TS + 15)
    assert isinstance(outbox(hub)[ann][-1], CloseMessage)
    assert hub.next_deadline() == 160.0


def test_a_lost_connections_leave_carries_the_callers_timestamp() -> None:
    hub = make_hub()
    ann, bob = open_ws(hub, "ann"), open_ws(hub, "bob")
    outbox(hub)
    hub.lost(bob, now=1.0, timestamp=TS + 9)
    assert [(m["event"], m["timestamp"]) for m in outbox(hub)[ann]] == [("leave", TS + 9)]


def test_close_timeouts_survive_the_table_shrinking() -> None:
    # Most connections leaving copies the connection table smaller: the deadlines
    # of those left still hold.
    hub = make_hub(close_timeout=2.0)
    cids = [open_ws(hub, f"u{i}") for i in range(300)]
    hub.receive_message(cids[0], b"\x00", now=1.0, timestamp=TS)  # closing: due at 3
    for cid in cids[1:]:
        hub.lost(cid, now=1.5, timestamp=TS)
    assert hub.connection_count == 1
    assert hub.next_deadline() == 3.0
    hub.timeout(now=3.0, timestamp=TS)
    assert hub.take_to_close() == [cids[0]]


class _NoLeeway:
    """An authenticator with no ``leeway`` attribute: no clock skew is allowed."""

    def authenticate(
        self, *, path: bytes, query: bytes, headers: Any, now: float
    ) -> Identity | Refusal:
        return Identity(username=Username("ann"), expires_at=TS + 10)


def test_expiring_credentials_of_an_authenticator_without_leeway_close_at_their_expiry() -> None:
    hub = MessageHub(QUIET, ServerConfig(), authenticator=_NoLeeway())
    ann = hub.open_websocket(
        b"/ws?room=lobby", [(b"sec-websocket-key", KEY)], now=100.0, timestamp=TS
    )
    assert not isinstance(ann, HttpResponse)
    outbox(hub)
    assert hub.next_deadline() == 110.0
    hub.timeout(now=109.9, timestamp=TS + 9)
    assert outbox(hub) == {}
    hub.timeout(now=110.0, timestamp=TS + 10)
    assert isinstance(outbox(hub)[ann][-1], CloseMessage)
