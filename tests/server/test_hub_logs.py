"""
The hub's log records of a connection's life carry its fields (``extra``): ``conn``,
``peer``, ``user``, ``room``, and ``code``/``reason``/``status`` where they apply; and
no record shows a credential, whatever an authenticator's refusal says.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from roombus import BrokerConfig, Identity, Refusal, ServerConfig
from roombus.hub import Hub
from roombus.server.handshake import HttpResponse
from roombus.server.messages import MessageHub

from .test_hub import KEY, connect, request, written
from .test_hub_messages import open_ws

if TYPE_CHECKING:
    import pytest

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJlLW9mLWEtdG9rZW4"


def fields(rec: logging.LogRecord) -> dict[str, Any]:
    return {
        k: rec.__dict__[k]
        for k in ("conn", "peer", "user", "room", "code", "reason", "status")
        if k in rec.__dict__
    }


def find(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def frame(event: Any) -> bytes:
    return Connection(ConnectionType.CLIENT).send(event)


def test_connect_join_leave_and_close_carry_conn_user_room_and_code(caplog):
    hub = Hub(BrokerConfig(), ServerConfig())
    with caplog.at_level(logging.DEBUG, logger="roombus"):
        cid = hub.open(now=0.0, peer="10.0.0.1:4000")
        hub.receive(cid, request("lobby", "ann"), now=0.0, timestamp=0)
        written(hub)
        hub.receive(
            cid, frame(TextMessage(data='{"type":"join","room":"other"}')), now=0.1, timestamp=0
        )
        hub.receive(
            cid, frame(TextMessage(data='{"type":"leave","room":"other"}')), now=0.2, timestamp=0
        )
        hub.receive(cid, frame(CloseConnection(code=1000)), now=0.3, timestamp=0)
        written(hub)
        for gone in hub.take_to_close():
            hub.lost(gone, now=0.4, timestamp=0)
    base = {"conn": cid, "peer": "10.0.0.1:4000", "user": "ann", "room": "lobby"}
    (connected,) = find(caplog, "connected as 'ann'")
    assert fields(connected) == base
    joins = find(caplog, "joined")
    assert [fields(r) for r in joins] == [
        {"conn": cid, "room": "lobby", "user": "ann"},
        {"conn": cid, "room": "other", "user": "ann"},
    ]
    assert all(r.levelno == logging.DEBUG for r in joins)
    leaves = find(caplog, "left")
    assert [fields(r)["room"] for r in leaves] == ["other", "lobby"]  # the close leaves too
    assert all(fields(r)["user"] == "ann" for r in leaves)
    (closed,) = find(caplog, "closed by the client")
    assert fields(closed) == {**base, "code": 1000}
    assert closed.getMessage() == f"conn {cid} (10.0.0.1:4000) closed by the client: 1000"


def test_nothing_is_made_for_debug_lines_when_debug_is_off(caplog):
    hub = Hub(BrokerConfig(), ServerConfig())
    with caplog.at_level(logging.INFO, logger="roombus"):
        cid = connect(hub, "lobby", "ann")
        hub.receive(cid, None, now=1.0, timestamp=0)
    assert caplog.records == []


def test_a_peer_that_vanishes_is_logged_as_lost_with_1006(caplog):
    hub = Hub(BrokerConfig(), ServerConfig())
    with caplog.at_level(logging.DEBUG, logger="roombus"):
        cid = connect(hub, "lobby", "ann")
        hub.lost(cid, now=1.0, timestamp=0)
    (lost,) = find(caplog, "lost")
    assert fields(lost)["code"] == 1006
    assert fields(lost)["user"] == "ann"


def test_a_server_close_carries_code_and_reason(caplog):
    hub = Hub(BrokerConfig(rate_limit=1, rate_burst=1), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    written(hub)
    chat = frame(TextMessage(data='{"type":"chat","content":1}'))
    with caplog.at_level(logging.INFO, logger="roombus"):
        for _ in range(50):
            hub.receive(cid, chat, now=1.0, timestamp=0)
    (closing,) = find(caplog, "closing conn")
    assert fields(closing) == {
        "conn": cid,
        "peer": "",
        "user": "ann",
        "room": "lobby",
        "code": 1008,
        "reason": "rate limit exceeded",
    }
    assert type(fields(closing)["code"]) is int


def test_a_slow_consumer_close_carries_code_1008(caplog):
    hub = Hub(BrokerConfig(send_queue=2, rate_limit=0), ServerConfig())
    slow = connect(hub, "lobby", "slow")
    pub = connect(hub, "lobby", "pub")
    with caplog.at_level(logging.INFO, logger="roombus"):
        for i in range(5):
            hub.receive(
                pub,
                frame(TextMessage(data=f'{{"type":"chat","content":{i}}}')),
                now=1.0,
                timestamp=0,
            )
    behind = {fields(r)["conn"]: r for r in find(caplog, "fell behind")}[slow]  # pub too
    assert fields(behind)["code"] == 1008
    assert fields(behind)["user"] == "slow"
    assert "reading too slowly" in fields(behind)["reason"]


def test_a_handshake_timeout_and_a_refusal_carry_conn_peer_and_status(caplog):
    hub = Hub(BrokerConfig(), ServerConfig(handshake_timeout=1))
    with caplog.at_level(logging.INFO, logger="roombus"):
        late = hub.open(now=0.0, peer="10.0.0.2:1")
        hub.timeout(now=2.0, timestamp=0)
        bad = hub.open(now=2.0, peer="10.0.0.3:1")
        hub.receive(
            bad, request("lobby", "bad\x01name").replace(b"\x01", b"%01"), now=2.0, timestamp=0
        )
    (timed_out,) = find(caplog, "did not complete its handshake")
    assert fields(timed_out) == {"conn": late, "peer": "10.0.0.2:1", "reason": "handshake timeout"}
    (refused,) = find(caplog, "refused with 400")
    assert fields(refused)["conn"] == bad
    assert fields(refused)["status"] == 400
    assert fields(refused)["peer"] == "10.0.0.3:1"


class _Careless:
    """An authenticator whose refusal reason quotes the credentials (it must not)."""

    def authenticate(
        self, *, path: bytes, query: bytes, headers: Any, now: float
    ) -> Identity | Refusal:
        return Refusal(401, f"bad token={TOKEN} (Bearer {TOKEN}, bearer.{TOKEN})")


def test_a_refusal_reason_is_redacted_in_the_log(caplog):
    hub = Hub(BrokerConfig(), ServerConfig(), authenticator=_Careless())
    with caplog.at_level(logging.DEBUG, logger="roombus"):
        cid = hub.open(now=0.0)
        hub.receive(cid, request("lobby", "ann"), now=0.0, timestamp=0)
    (refused,) = find(caplog, "refused with 401")
    assert TOKEN not in refused.getMessage()
    assert TOKEN not in fields(refused)["reason"]
    assert fields(refused)["status"] == 401
    assert TOKEN not in caplog.text


def test_a_message_hub_close_and_a_client_close_carry_their_codes(caplog):
    hub = MessageHub(BrokerConfig(heartbeat=False), ServerConfig())
    with caplog.at_level(logging.DEBUG, logger="roombus"):
        refused = open_ws(hub, "ann")
        hub.receive_message(refused, b"binary", now=1.0, timestamp=0)
        other = open_ws(hub, "bob", room="hall")
        hub.lost(other, now=2.0, timestamp=0, code=1001)
    (closing,) = find(caplog, "closing conn")
    assert fields(closing) == {
        "conn": refused,
        "peer": "",
        "user": "ann",
        "room": "lobby",
        "code": 1003,
        "reason": "binary frames are not supported",
    }
    (closed,) = find(caplog, "closed by the client")
    assert fields(closed) == {
        "conn": other,
        "peer": "",
        "user": "bob",
        "room": "hall",
        "code": 1001,
    }


def test_an_api_refusal_in_a_message_hub_names_the_peer_and_status(caplog):
    hub = MessageHub(
        BrokerConfig(heartbeat=False),
        ServerConfig(allowed_origins=frozenset({"https://ok.example"})),
    )
    with caplog.at_level(logging.INFO, logger="roombus"):
        answer = hub.open_websocket(
            b"/ws?room=lobby&username=ann&token=" + TOKEN.encode(),
            [(b"sec-websocket-key", KEY), (b"origin", b"https://bad.example")],
            now=0.0,
            timestamp=0,
            peer="10.0.0.9:1",
        )
    assert isinstance(answer, HttpResponse) and answer.status == 403
    (refused,) = find(caplog, "refused with 403")
    assert fields(refused) == {"peer": "10.0.0.9:1", "status": 403, "reason": "origin not allowed"}
    assert TOKEN not in caplog.text


def test_every_line_about_a_connection_reads_whole_and_names_its_peer(caplog):
    """Through the paths that log (a refusal, a bad request, a flooder, refused input, a
    peer's close and loss, a slow reader, the byte budget, a handshake timeout), every record
    formats, and one that has a ``peer`` field says it in its text too."""
    hub = Hub(
        BrokerConfig(send_queue=8, rate_limit=1, rate_burst=3),
        ServerConfig(max_queued_bytes=4096, max_connections_per_ip=0),
    )
    peers = iter(f"10.0.0.{i}:4000" for i in range(1, 100))
    with caplog.at_level(logging.DEBUG, logger="roombus"):
        for data in (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x01 nonsense\r\n\r\n"):
            hub.receive(hub.open(now=0.0, peer=next(peers)), data, now=0.0, timestamp=0)
        hub.open(now=0.0, peer=next(peers))  # says nothing: timed out
        users = {}
        for name in ("ann", "bin", "bye", "gone", "slow", "big"):
            cid = hub.open(now=0.0, peer=next(peers))
            hub.receive(cid, request("lobby", name), now=0.0, timestamp=0)
            users[name] = cid
        flooder = hub.open(now=0.0, peer=next(peers))  # alone in its room: rate-limited
        hub.receive(flooder, request("flood", "flo"), now=0.0, timestamp=0)
        written(hub)
        chat = frame(TextMessage(data='{"type":"chat","content":1}'))
        hub.receive(flooder, chat * 20, now=0.1, timestamp=0)
        hub.receive(users["bin"], b"\x82\x81abcd\x00", now=0.1, timestamp=0)
        hub.receive(users["bye"], frame(CloseConnection(code=1000)), now=0.1, timestamp=0)
        hub.lost(users["gone"], now=0.1, timestamp=0)
        written(hub)
        for i in range(10):  # "slow" overflows; "big" stops reading half-way: over the budget
            hub.publish("lobby", "x" * 1000 + str(i), username="server", now=0.2, timestamp=0)
            for cid, queue in hub.take_dirty():
                while (cid == users["ann"] or (cid == users["big"] and i < 5)) and queue:
                    queue.consume(len(queue.data()))
        hub.enforce_budget(now=0.3, timestamp=0)
        hub.timeout(now=60.0, timestamp=0)
    records = [r for r in caplog.records if r.name == "roombus"]
    assert len(records) > 10
    for record in records:
        text = record.getMessage()
        peer = record.__dict__.get("peer")
        if peer:
            assert peer in text, text


def test_refused_input_is_logged_with_its_close_code_and_reason(caplog):
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = hub.open(now=0.0, peer="10.0.0.7:4000")
    hub.receive(cid, request("lobby", "ann"), now=0.0, timestamp=0)
    written(hub)
    with caplog.at_level(logging.INFO, logger="roombus"):
        hub.receive(cid, b"\x81\x02hi", now=0.1, timestamp=0)  # unmasked: a protocol error
    (closing,) = find(caplog, "refused its input")
    assert closing.getMessage() == f"closing conn {cid} (10.0.0.7:4000): 1002 (refused its input)"
    assert fields(closing) == {
        "conn": cid,
        "peer": "10.0.0.7:4000",
        "user": "ann",
        "room": "lobby",
        "code": 1002,
        "reason": "refused its input",
    }
