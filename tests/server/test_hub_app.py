"""
The hub's side for the embedding application, in memory: ``publish()``'s answer, the
notice hook (a failing hook breaks nothing), and ``/metrics`` (the series, their
types, HEAD without a body).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from roombus import BrokerConfig, MessagePublished, ServerConfig, UserJoined, UserLeft
from roombus.hub import Hub

from .test_hub import connect, written

if TYPE_CHECKING:
    import pytest


def test_publish_tells_how_many_got_it_and_where_it_is() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    for user in ("ann", "bob"):
        connect(hub, "lobby", user)
    connect(hub, "other", "cy")
    written(hub)
    sent = hub.publish("lobby", "hi", username="server", now=1.0, timestamp=5)
    assert sent.delivered == 2
    assert sent.position is not None and sent.position.seq == 1
    out = written(hub)
    assert len(out) == 2 and all(b'"content":"hi"' in data for data in out.values())
    assert hub.publish("empty", "x", username="server", now=1.0, timestamp=5).delivered == 0


def test_the_notice_hook_sees_every_notice_and_its_failure_breaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[object] = []

    def hook(notice: object) -> None:
        seen.append(notice)
        if isinstance(notice, MessagePublished):
            raise RuntimeError("the application's bug")

    hub = Hub(BrokerConfig(), ServerConfig(), on_notice=hook)
    ann = connect(hub, "lobby", "ann")
    with caplog.at_level(logging.ERROR, logger="roombus"):
        hub.publish("lobby", "x", username="server", now=0.0, timestamp=0)
    assert "on_notice hook failed" in caplog.text
    hub.lost(ann, now=0.0, timestamp=0)
    assert [type(n) for n in seen] == [UserJoined, MessagePublished, UserLeft]
    assert isinstance(seen[1], MessagePublished) and seen[1].content == "x"


def test_the_broker_makes_chat_notices_only_while_there_is_a_hook() -> None:
    seen: list[object] = []
    hub = Hub(BrokerConfig(), ServerConfig())
    assert not hub.broker.notices  # no one would read them
    ann = connect(hub, "lobby", "ann")
    bob = connect(hub, "lobby", "bob")
    written(hub)

    def chat(text: str, now: float) -> dict[int, bytes]:
        frame = Connection(ConnectionType.CLIENT).send(
            TextMessage(data=f'{{"type":"chat","content":"{text}"}}')
        )
        hub.receive(ann, frame, now=now, timestamp=5)
        return written(hub)

    out = chat("one", 1.0)
    assert all(b'"content":"one"' in out[c] for c in (ann, bob))  # delivered all the same
    hub.on_notice = seen.append
    assert hub.broker.notices and hub.on_notice == seen.append
    out = chat("two", 2.0)
    assert b'"seq":2' in out[bob]
    assert [(type(n), getattr(n, "content", None)) for n in seen] == [(MessagePublished, "two")]
    hub.on_notice = None
    assert not hub.broker.notices
    chat("three", 3.0)
    assert len(seen) == 1


METRICS = {
    "roombus_server_info": "gauge",
    "roombus_transport_connections": "gauge",
    "roombus_websocket_connections": "gauge",
    "roombus_rooms": "gauge",
    "roombus_messages_published_total": "counter",
    "roombus_deliveries_total": "counter",
    "roombus_slow_consumers_closed_total": "counter",
    "roombus_queued_bytes": "gauge",
    "roombus_queued_bytes_closed_total": "counter",
    "roombus_limit_refusals_total": "counter",
    "roombus_draining": "gauge",
    "roombus_error_replies_total": "counter",
    "roombus_closes_total": "counter",
    "roombus_handshake_refusals_total": "counter",
    "roombus_publish_write_latency_seconds": "histogram",
    "roombus_send_queue_depth_messages": "histogram",
    "roombus_handshake_duration_seconds": "histogram",
    "roombus_replay_messages": "histogram",
}


def metrics_of(hub: Hub, method: bytes = b"GET") -> tuple[bytes, bytes]:
    cid = hub.open(now=0.0)
    hub.receive(cid, method + b" /metrics HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    head, _, body = written(hub)[cid].partition(b"\r\n\r\n")
    return head, body


def test_metrics_name_every_series_with_its_type() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    connect(hub, "lobby", "ann")
    hub.publish("lobby", "x", username="server", now=0.0, timestamp=0)
    written(hub)
    head, body = metrics_of(hub)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/plain; version=0.0.4; charset=utf-8" in head.lower()
    lines = body.decode().splitlines()
    types = dict(line.split()[2:4] for line in lines if line.startswith("# TYPE "))
    values = dict(line.split() for line in lines if not line.startswith("#"))
    assert types == METRICS
    assert values["roombus_messages_published_total"] == "1.0"
    assert values["roombus_rooms"] == "1.0"
    assert values["roombus_websocket_connections"] == "1.0"


def test_head_metrics_has_the_headers_and_no_body() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    head, body = metrics_of(hub, b"HEAD")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""
    assert b"content-length: 0" not in head.lower()
