"""The plain HTTP answer's head: made once (roombus.server.http), the same on every transport."""

from __future__ import annotations

from typing import Any

from roombus import BrokerConfig, ServerConfig
from roombus.asgi import RoombusASGI
from roombus.hub import Hub
from roombus.server.http import HttpResponse, StaticFile, response_head
from roombus.server.wire import ServerWire


def test_the_head_lists_type_length_close_no_store_then_the_responses_own() -> None:
    response = HttpResponse(status=429, body=b"slow down\n", headers=((b"retry-after", b"5"),))
    assert response_head(response) == [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"10"),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
        (b"retry-after", b"5"),
    ]
    assert response_head(HttpResponse(status=204, body=b"", content_type=b"x/y"))[:2] == [
        (b"content-type", b"x/y"),
        (b"content-length", b"0"),
    ]


def test_cache_control_is_the_responses_own_and_a_304_has_no_content_fields() -> None:
    kept = HttpResponse(status=200, body=b"x", cache_control=b"no-cache")
    assert (b"cache-control", b"no-cache") in response_head(kept)
    assert [name for name, _ in response_head(kept)].count(b"cache-control") == 1
    not_modified = HttpResponse(status=304, body=b"", headers=((b"etag", b'"t"'),))
    assert response_head(not_modified) == [
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
        (b"etag", b'"t"'),
    ]


def test_the_framed_wire_writes_the_head_after_its_status_line() -> None:
    response = HttpResponse(status=429, body=b"slow down\n", headers=((b"retry-after", b"5"),))
    head = b"HTTP/1.1 429 Too Many Requests\r\n" + b"".join(
        name + b": " + value + b"\r\n" for name, value in response_head(response)
    )
    assert ServerWire().respond(response) == head + b"\r\n" + response.body
    assert ServerWire().respond(response, head=True) == head + b"\r\n"
    # A status with no standard phrase keeps its line's shape.
    assert ServerWire().respond(HttpResponse(status=599, body=b"")).startswith(b"HTTP/1.1 599 \r\n")


SCRIPT = StaticFile(body=b"export {};\n", content_type=b"text/javascript; charset=utf-8")
CONFIG = ServerConfig(script=SCRIPT)


async def _asgi_headers(
    method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, list[tuple[bytes, bytes]]]:
    bus = RoombusASGI(BrokerConfig(heartbeat=False), CONFIG)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": headers or [],
    }
    await bus(scope, receive, send)
    return sent[0]["status"], list(sent[0]["headers"])


def _framed_headers(request: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    hub = Hub(BrokerConfig(), CONFIG)
    cid = hub.open(now=0.0, peer="127.0.0.1:5000")
    hub.receive(cid, request, now=0.0, timestamp=0)
    ((_, queue),) = hub.take_dirty()
    head = queue.data().partition(b"\r\n\r\n")[0].split(b"\r\n")
    fields = [tuple(line.split(b": ", 1)) for line in head[1:]]
    return int(head[0].split()[1]), [(name, value) for name, value in fields]


async def test_asgi_and_the_framed_hub_send_the_same_head() -> None:
    for method, path in (("GET", "/healthz"), ("POST", "/healthz"), ("GET", "/nowhere")):
        request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        assert await _asgi_headers(method, path) == _framed_headers(request), (method, path)
    for method, conditional in (("GET", False), ("HEAD", False), ("GET", True), ("HEAD", True)):
        headers = [(b"if-none-match", SCRIPT.etag)] if conditional else []
        request = f"{method} /roombus.js HTTP/1.1\r\nHost: x\r\n".encode() + b"".join(
            name + b": " + value + b"\r\n" for name, value in headers
        )
        asgi = await _asgi_headers(method, "/roombus.js", headers)
        assert asgi == _framed_headers(request + b"\r\n"), (method, conditional)
        assert asgi[0] == (304 if conditional else 200)
        assert (b"etag", SCRIPT.etag) in asgi[1]
