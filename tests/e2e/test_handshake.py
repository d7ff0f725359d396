"""The opening handshake: what is accepted, and what is refused before any upgrade."""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest
from websockets.exceptions import InvalidStatus

from roombus.node.options import settings_from

from .conftest import open_client
from .rawws import (
    Eof,
    RawWS,
    get,
    http_exchange,
    open_socket,
    parse_response_head,
    read_response,
    read_to_eof,
    read_until,
    response_head,
    upgrade_request,
)


def assert_refused(
    port: int, target: str, status: int, headers: dict[str, str] | None = None
) -> None:
    resp = http_exchange(port, upgrade_request(target, headers))
    assert resp.status == status, resp
    assert "sec-websocket-accept" not in resp.headers
    assert resp.headers.get("connection", "").lower() == "close"


ROOM_OK = "room=lobby"
USER_OK = "username=ann"


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(USER_OK, id="room-missing"),
        pytest.param(f"room=&{USER_OK}", id="room-empty"),
        pytest.param(f"room={'r' * 65}&{USER_OK}", id="room-65-chars"),
        pytest.param(f"room=a%20b&{USER_OK}", id="room-space"),
        pytest.param(f"room=a+b&{USER_OK}", id="room-plus-is-space"),
        pytest.param(f"room=caf%C3%A9&{USER_OK}", id="room-non-ascii"),
        pytest.param(f"room=a/b&{USER_OK}", id="room-slash"),
        pytest.param(f"room=a%0A&{USER_OK}", id="room-newline"),
        pytest.param(ROOM_OK, id="username-missing"),
        pytest.param(f"{ROOM_OK}&username=", id="username-empty"),
        pytest.param(f"{ROOM_OK}&username={'u' * 65}", id="username-65-chars"),
        pytest.param(f"{ROOM_OK}&username={'%C3%A9' * 65}", id="username-65-multibyte-chars"),
        pytest.param(f"{ROOM_OK}&username=a%00b", id="username-nul"),
        pytest.param(f"{ROOM_OK}&username=a%0Ab", id="username-newline"),
        pytest.param(f"{ROOM_OK}&username=a%09b", id="username-tab"),
        pytest.param(f"{ROOM_OK}&username=a%7Fb", id="username-del"),
        pytest.param(f"{ROOM_OK}&username=a%C2%85b", id="username-c1-control"),
        pytest.param(f"{ROOM_OK}&username=%FF%FE", id="username-invalid-utf8"),
        pytest.param("", id="no-query"),
    ],
)
def test_invalid_room_or_username_is_400_without_upgrade(server, query):
    assert_refused(server.port, f"/ws?{query}", 400)


@pytest.mark.parametrize(
    ("room", "username"),
    [
        ("r" * 64, "u" * 64),
        ("A-Z_a.z:0-9", "a b"),
        ("x", "é" * 64),
        ("lobby", "日本語"),
    ],
    ids=["64-chars", "all-room-chars", "64-multibyte-chars", "cjk"],
)
def test_names_at_the_limits_are_accepted(server, room, username):
    client = server.connect(room, username)
    client.chat("ok")
    client.expect(type="chat", username=username, room=room, content="ok")


def test_repeated_query_parameters_first_wins(server):
    # /ws?room=a&room=b&username=x&username=y
    with RawWS.connect(server.port, "a&room=b", "x&username=y") as raw:
        join = raw.recv_json()
        assert (join["room"], join["username"]) == ("a", "x")


@pytest.mark.parametrize(
    "headers",
    [
        {"Upgrade": "", "Connection": "keep-alive"},
        {"Upgrade": "h2c", "Connection": "Upgrade"},
        {"Upgrade": "websocket", "Connection": "keep-alive"},
    ],
    ids=["no-upgrade", "other-protocol", "no-connection-upgrade"],
)
def test_non_upgrade_request_to_ws_is_400_or_426(server, caps, headers):
    request = upgrade_request(f"/ws?{ROOM_OK}&{USER_OK}", headers)
    with open_socket(server.port) as sock:
        sock.sendall(request)
        head = read_until(sock, b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 101 "):
            # An ASGI server may honour Upgrade: h2c (RFC 7540 3.2) and answer the
            # request over HTTP/2: roombus still refuses it there.
            assert not caps.owns_protocol and headers["Upgrade"] == "h2c"
            marker = b"this endpoint speaks WebSocket only"
            if marker not in head:
                read_until(sock, marker)
            return
    status = parse_response_head(head)[0]
    assert status in (400, 426), head


def test_plain_get_of_ws_is_400_or_426(server):
    assert get(server.port, f"/ws?{ROOM_OK}&{USER_OK}").status in (400, 426)


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-WebSocket-Version": "8"},
        {"Sec-WebSocket-Key": "too-short"},
        {"Sec-WebSocket-Key": "!!!!not base64 at all!!!!"},
    ],
    ids=["version-8", "short-key", "bad-key"],
)
def test_bad_websocket_headers_are_refused(server, caps, headers):
    request = upgrade_request(f"/ws?{ROOM_OK}&{USER_OK}", headers)
    if caps.owns_protocol:
        resp = http_exchange(server.port, request)  # answered, then closed
    else:
        resp = read_response(server.port, request)  # the server may keep the TCP open
    assert resp.status in (400, 426), resp
    assert "sec-websocket-accept" not in resp.headers


@pytest.mark.parametrize("path", ["/nope", "/ws/extra", "/WS", "/healthz/x"])
def test_unknown_path_is_404(server, path):
    assert get(server.port, path).status == 404
    assert http_exchange(server.port, upgrade_request(f"{path}?{ROOM_OK}&{USER_OK}")).status == 404


def test_healthz_and_head(server):
    resp = get(server.port, "/healthz")
    assert resp.status == 200
    head = get(server.port, "/healthz", method="HEAD")
    assert head.status == 200
    assert head.body == b""


def test_root_without_a_page_is_404(server):
    assert get(server.port, "/").status == 404


def test_root_serves_the_configured_page(make_server):
    srv = make_server(page=b"<!doctype html><title>hi</title>")
    resp = get(srv.port, "/")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.body == b"<!doctype html><title>hi</title>"


def test_the_javascript_client_is_served_with_an_etag_and_revalidated(make_server):
    """``/roombus.js`` (as ``roombus serve`` configures it) is the package's file, byte
    for byte; a conditional GET or HEAD naming its tag gets 304 and nothing after the
    head."""
    body = resources.files("roombus").joinpath("js/roombus.js").read_bytes()
    tag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    srv = make_server(script=settings_from({}, {}).server.script)
    resp = get(srv.port, "/roombus.js")
    assert resp.status == 200
    assert resp.headers["content-type"] == "text/javascript; charset=utf-8"
    assert resp.headers["etag"] == tag
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["content-length"] == str(len(body))
    assert resp.body == body
    head = get(srv.port, "/roombus.js", method="HEAD")
    assert (head.status, head.headers["etag"], head.body) == (200, tag, b"")
    assert head.headers["content-length"] == str(len(body))
    for method in ("GET", "HEAD"):
        for value in (tag, f'W/"0", W/{tag}', "*"):
            cached = get(srv.port, "/roombus.js", method=method, headers={"If-None-Match": value})
            assert cached.status == 304, (method, value)
            assert cached.body == b""
            assert cached.headers["etag"] == tag
            assert cached.headers["cache-control"] == "no-cache"
            assert "content-length" not in cached.headers
            assert "content-type" not in cached.headers
    stale = get(srv.port, "/roombus.js", headers={"If-None-Match": '"0000000000000000"'})
    assert (stale.status, stale.body) == (200, body)


def test_without_a_script_the_javascript_client_is_404(make_server):
    srv = make_server(script=settings_from({"no_script": "1"}, {}).server.script)
    assert get(srv.port, "/roombus.js").status == 404


def test_origin_allow_list(make_server):
    srv = make_server(allowed_origins=["https://chat.example.com"])
    target = f"/ws?{ROOM_OK}&{USER_OK}"
    assert_refused(srv.port, target, 403, {"Origin": "https://evil.example.com"})
    assert_refused(srv.port, target, 403, {"Origin": "http://chat.example.com"})
    assert_refused(srv.port, target, 403, {"Origin": "null"})
    assert_refused(srv.port, target, 403)  # no Origin at all
    with pytest.raises(InvalidStatus) as info:
        open_client(srv.port, "lobby", "ann", origin="https://evil.example.com")
    assert info.value.response.status_code == 403
    ok = srv.connect("lobby", "ann", origin="https://chat.example.com")
    ok.chat("allowed")
    ok.expect(type="chat", content="allowed")


def test_without_allow_list_any_origin_works(server):
    c = server.connect("lobby", "ann", origin="https://anything.example")
    c.ping()


def test_oversized_request_headers_get_431(server, caps):
    """Default max_header_bytes is 16 KiB; send 32 KiB of headers in one go."""
    request = upgrade_request(f"/ws?{ROOM_OK}&{USER_OK}", {"X-Big": "a" * 32768})
    if caps.owns_protocol:
        resp = http_exchange(server.port, request)
        assert resp.status == 431
    else:
        # The ASGI server reads the request: it may refuse it itself, or hand it on to
        # roombus, which refuses it (431 where the server can send an app's response,
        # else its own refusal). Either way it is never upgraded.
        status = refusal_status(server.port, request)
        assert status != 101, status
    server.assert_serving()


def test_oversized_request_line_gets_431_with_a_small_limit(make_server, caps):
    srv = make_server(max_header_bytes=1024)
    request = upgrade_request(f"/ws?{ROOM_OK}&username={'u' * 2000}")
    if caps.owns_protocol:
        assert http_exchange(srv.port, request).status == 431
    else:
        assert refusal_status(srv.port, request) != 101
    # Just under the limit is fine.
    request = upgrade_request(f"/ws?{ROOM_OK}&{USER_OK}", {"X-Pad": "p" * 500})
    assert response_head(srv.port, request) == 101


def refusal_status(port: int, request: bytes) -> int | None:
    """The status a server answers *request* with, or None if it never answers (or
    ends the connection unanswered) within a short wait."""
    with open_socket(port, timeout=1.0) as sock:
        sock.sendall(request)
        try:
            head = read_until(sock, b"\r\n\r\n", timeout=1.0)
        except (TimeoutError, Eof, ConnectionResetError):
            return None
    return parse_response_head(head)[0]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage \x01\x02\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /ws HTTX/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / ws HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["binary", "no-target", "bad-protocol", "bad-header", "no-host", "space-in-target"],
)
def test_garbage_instead_of_http_is_400_and_others_are_served(server, garbage):
    (ann,) = server.room("lobby", "ann")
    resp = http_exchange(server.port, garbage)
    assert resp.status == 400, resp
    ann.chat("still fine")
    ann.expect(type="chat", content="still fine")
    server.assert_serving()


def test_non_get_method(server):
    resp = http_exchange(
        server.port, b"POST /ws?room=a&username=b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert 400 <= resp.status < 500
    server.assert_serving()


def test_tls_client_hello_on_plain_port_is_dropped(make_server):
    """A TLS ClientHello has no line ending: the handshake timeout must end it."""
    srv = make_server(handshake_timeout=0.3)
    hello = bytes.fromhex("16030100a5010000a10303") + bytes(range(32)) + b"\x00" * 64
    with open_socket(srv.port) as sock:
        sock.sendall(hello)
        read_to_eof(sock, timeout=5)
    srv.assert_serving()
