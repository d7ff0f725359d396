"""The hub behind proxies: PROXY protocol headers and forwarding headers, by hand."""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub
from roombus.server.messages import MessageHub
from roombus.server.proxyproto import encode_v1, encode_v2

if TYPE_CHECKING:
    import pytest

KEY = base64.b64encode(b"0123456789abcdef")
NGINX = "127.0.0.1:40000"


def request(user: str, headers: str = "") -> bytes:
    return (
        (
            f"GET /ws?room=lobby&username={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{headers}"
            "Sec-WebSocket-Key: "
        ).encode()
        + KEY
        + b"\r\n\r\n"
    )


def status(hub: Hub, cid: int) -> int | None:
    """The HTTP status the hub answered *cid* with (None: nothing written)."""
    for c, queue in hub.take_dirty():
        if c == cid:
            data = bytes(queue.data())
            queue.consume(len(data))
            return int(data.split(b" ", 2)[1])
    return None


def hub_with(**server: object) -> Hub:
    return Hub(BrokerConfig(rate_limit=0), ServerConfig(**server))  # type: ignore[arg-type]


def test_proxy_v1_and_v2_clients_are_counted_by_the_address_they_claim() -> None:
    hub = hub_with(proxy_protocol=True, max_connections_per_ip=1)
    answers = {}
    for i, (encode, client) in enumerate(
        [
            (encode_v1, ("203.0.113.1", 5000)),
            (encode_v2, ("203.0.113.2", 5000)),
            (encode_v2, ("2001:db8::1", 5000)),
            (encode_v1, ("203.0.113.1", 5001)),  # a second from .1: over its limit
        ]
    ):
        cid = hub.open(now=0.0, peer=NGINX)
        hub.receive(cid, encode(client) + request(f"u{i}"), now=0.0, timestamp=0)
        answers[client] = status(hub, cid)
    assert list(answers.values()) == [101, 101, 101, 429]
    assert hub.admission.count("203.0.113.1") == 2
    assert hub.admission.count("127.0.0.1") == 0


def test_a_header_in_pieces_then_the_request() -> None:
    hub = hub_with(proxy_protocol=True)
    cid = hub.open(now=0.0, peer=NGINX)
    data = encode_v2(("198.51.100.7", 1234)) + request("ann")
    for i in range(len(data)):
        hub.receive(cid, data[i : i + 1], now=0.0, timestamp=0)
    assert status(hub, cid) == 101
    assert hub.admission.count("198.51.100.7") == 1


def test_no_valid_header_is_closed_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = hub_with(proxy_protocol=True)
    cid = hub.open(now=0.0, peer=NGINX)
    with caplog.at_level(logging.INFO, logger="roombus"):
        hub.receive(cid, request("ann"), now=0.0, timestamp=0)
    assert hub.take_to_close() == [cid]
    assert hub.proxy_header_errors == 1
    assert hub.metrics()["roombus_proxy_header_errors_total"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{NGINX} sent no valid PROXY protocol header, closed: no PROXY protocol signature"
    ]
    (record,) = caplog.records
    assert {k: record.__dict__[k] for k in ("conn", "peer", "reason")} == {
        "conn": cid,
        "peer": NGINX,
        "reason": "no PROXY protocol signature",
    }


def test_a_header_that_never_completes_has_the_handshake_timeout() -> None:
    hub = hub_with(proxy_protocol=True, handshake_timeout=2.0)
    cid = hub.open(now=0.0, peer=NGINX)
    hub.receive(cid, b"PROXY TCP4 1.2.3", now=0.0, timestamp=0)
    hub.timeout(now=1.9, timestamp=0)
    assert hub.take_to_close() == []
    hub.timeout(now=2.0, timestamp=0)
    assert hub.take_to_close() == [cid]


def test_a_local_command_keeps_the_sockets_address() -> None:
    hub = hub_with(proxy_protocol=True)
    cid = hub.open(now=0.0, peer="10.0.0.9:555")
    hub.receive(
        cid,
        encode_v2(None, local=True) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        now=0.0,
        timestamp=0,
    )
    assert status(hub, cid) == 200
    assert hub.admission.count("10.0.0.9") == 1


def test_without_the_option_a_proxy_header_is_a_bad_request() -> None:
    hub = hub_with()
    cid = hub.open(now=0.0, peer=NGINX)
    hub.receive(cid, encode_v1(("203.0.113.1", 1)) + request("ann"), now=0.0, timestamp=0)
    assert status(hub, cid) == 400


def test_forwarded_for_from_a_trusted_hop_names_the_client() -> None:
    hub = hub_with(forwarded_allow_ips="127.0.0.1", max_connections_per_ip=1)
    codes = []
    for user, xff in [("a", "203.0.113.1"), ("b", "203.0.113.2"), ("c", "203.0.113.1")]:
        cid = hub.open(now=0.0, peer=NGINX)
        hub.receive(cid, request(user, f"X-Forwarded-For: {xff}\r\n"), now=0.0, timestamp=0)
        codes.append(status(hub, cid))
    assert codes == [101, 101, 429]
    assert hub.admission.count("127.0.0.1") == 0


def test_forwarded_for_from_an_untrusted_hop_is_ignored() -> None:
    hub = hub_with(forwarded_allow_ips="10.0.0.0/8", max_connections_per_ip=1)
    codes = []
    for user, xff in [("a", "203.0.113.1"), ("b", "203.0.113.2")]:
        cid = hub.open(now=0.0, peer=NGINX)
        hub.receive(cid, request(user, f"X-Forwarded-For: {xff}\r\n"), now=0.0, timestamp=0)
        codes.append(status(hub, cid))
    assert codes == [101, 429]  # both are 127.0.0.1's
    assert hub.admission.count("127.0.0.1") == 2


def test_proxy_protocol_then_forwarded_headers_from_the_hop_it_names() -> None:
    hub = hub_with(proxy_protocol=True, forwarded_allow_ips="10.0.0.5")
    cid = hub.open(now=0.0, peer=NGINX)
    data = encode_v1(("10.0.0.5", 7)) + request("ann", "Forwarded: for=203.0.113.9\r\n")
    hub.receive(cid, data, now=0.0, timestamp=0)
    assert status(hub, cid) == 101
    assert hub.admission.count("203.0.113.9") == 1
    hub.lost(cid, now=1.0, timestamp=0)
    assert hub.admission.count("203.0.113.9") == 0


def test_the_message_hub_reads_forwarding_headers_from_a_trusted_client() -> None:
    hub = MessageHub(
        BrokerConfig(heartbeat=False),
        ServerConfig(forwarded_allow_ips=["127.0.0.1"], max_connections_per_ip=1),
    )
    target = b"/ws?room=lobby&username=ann"
    first = hub.open_websocket(
        target, [(b"x-forwarded-for", b"203.0.113.1")], now=0.0, timestamp=0, peer=NGINX
    )
    second = hub.open_websocket(
        target, [(b"x-forwarded-for", b"203.0.113.2")], now=0.0, timestamp=0, peer=NGINX
    )
    third = hub.open_websocket(
        target, [(b"x-forwarded-for", b"203.0.113.2")], now=0.0, timestamp=0, peer=NGINX
    )
    assert isinstance(first, int) and isinstance(second, int)
    assert not isinstance(third, int) and third.status == 429


def test_the_request_after_a_proxy_header_joins_at_the_callers_time() -> None:
    hub = hub_with(proxy_protocol=True)
    cid = hub.open(now=0.0, peer=NGINX)
    hub.receive(cid, encode_v1(("203.0.113.1", 5000)) + request("ann"), now=0.0, timestamp=TS)
    (queue,) = [q for c, q in hub.take_dirty() if c == cid]
    written = b""
    while queue:
        chunk = queue.data()
        written += bytes(chunk)
        queue.consume(len(chunk))
    assert written.startswith(b"HTTP/1.1 101 ")
    assert b'"timestamp":%d' % TS in written.replace(b" ", b"")  # ann's join


TS = 1_700_000_000


def test_a_forwarded_client_is_named_by_its_address_in_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = hub_with(forwarded_allow_ips="127.0.0.1")
    with caplog.at_level(logging.INFO, logger="roombus"):
        cid = hub.open(now=0.0, peer=NGINX)
        data = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
        hub.receive(cid, data, now=0.0, timestamp=0)
    assert status(hub, cid) == 404
    (record,) = [r for r in caplog.records if "refused with 404" in r.getMessage()]
    assert record.__dict__["peer"] == "203.0.113.9"
    assert record.getMessage().startswith("203.0.113.9 refused")
