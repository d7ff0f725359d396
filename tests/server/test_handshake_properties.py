"""
The opening handshake against a model written from docs/protocol.md and RFC 6455.

Requests are assembled from parts that each may be right, wrong or missing (method,
path, each upgrade header, origin, every query parameter, repeated or blank), and the
decision must be what the protocol page's status table says, with the headers the
HTTP and WebSocket RFCs require on each refusal. Bodies are for people: any text.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import unquote_to_bytes

from hypothesis import given, settings
from hypothesis import strategies as st

from roombus.server.handshake import HttpResponse, Upgrade, route_request

KEY = base64.b64encode(b"0123456789abcdef")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ALLOWED = "https://ok.example"
PAGE = b"<!doctype html><title>chat</title>"


def rfc6455_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    return {t.strip().lower() for k, v in headers if k == name for t in v.split(b",")}


def first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


def query_params(query: bytes) -> dict[str, str] | None:
    """First value of each parameter, blanks kept; None if not UTF-8 once decoded."""
    params: dict[str, str] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        try:
            decoded = [unquote_to_bytes(x.replace(b"+", b" ")).decode() for x in (name, value)]
        except UnicodeDecodeError:
            return None
        params.setdefault(decoded[0], decoded[1])
    return params


def valid_room(name: str | None) -> bool:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
    return name is not None and 1 <= len(name) <= 64 and set(name) <= allowed


def valid_username(name: str | None) -> bool:
    return (
        name is not None
        and 1 <= len(name) <= 64
        and not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in name)
    )


def expected(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], origins: bool, page: bool
) -> tuple[int, dict[bytes, bytes]] | tuple[str, str, bytes]:
    """The protocol page's decision: (status, headers that must be there), or an upgrade."""
    path, _, query = target.partition(b"?")
    if method not in (b"GET", b"HEAD"):
        return 405, {b"allow": b"GET, HEAD"}
    if path == b"/healthz":
        return 200, {}
    if path == b"/" and page:
        return 200, {}
    if path != b"/ws":
        return 404, {}
    if b"websocket" not in tokens(headers, b"upgrade") or b"upgrade" not in tokens(
        headers, b"connection"
    ):
        return 426, {b"upgrade": b"websocket"}
    if method != b"GET":
        return 405, {b"allow": b"GET"}
    if first(headers, b"sec-websocket-version") != b"13":
        return 426, {b"sec-websocket-version": b"13"}
    key = first(headers, b"sec-websocket-key")
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != 16:
            return 400, {}
    except ValueError:
        return 400, {}
    if first(headers, b"content-length") is not None:
        return 400, {}  # an upgrade has no body: what follows the head is frames
    if first(headers, b"transfer-encoding") is not None:
        return 400, {}
    if origins:
        # Exactly one Origin, compared without SP and HTAB around it (nothing else).
        values = [v for k, v in headers if k == b"origin"]
        if len(values) != 1:
            return 403, {}
        if values[0].decode("latin-1").strip(" \t").rstrip("/").lower() != ALLOWED:
            return 403, {}
    try:
        params = query_params(query) if query.isascii() else None
    except ValueError:
        params = None
    if params is None:
        return 400, {}
    room, username = params.get("room"), params.get("username")
    if not valid_room(room) or not valid_username(username):
        return 400, {}
    assert room is not None and username is not None
    return room, username, rfc6455_accept(key)


FLAWS: dict[str, list[Any]] = {
    "method": [b"POST", b"get", b"OPTIONS", b"HEAD"],
    "path": [b"/", b"/healthz", b"/ws/", b"/other", b""],
    b"upgrade": [None, [b"h2c"], [b"h2c", b"websocket"], [b"WebSocket"], [b"h2c,websocket"]],
    b"connection": [None, [b"close"], [b"keep-alive,upgrade"], [b"close", b"Upgrade"]],
    b"sec-websocket-version": [None, [b"8"], [b"13, 8"], [b"8", b"13"], [b"13", b"8"]],
    b"sec-websocket-key": [
        None,
        [base64.b64encode(b"short")],
        [b"!!not base64!!"],
        [KEY + b"="],
        [b"", KEY],
        [KEY, b""],
    ],
    b"origin": [
        None,
        [b"https://evil.example"],
        [b"https://ok.example.evil"],
        [b"HTTPS://OK.EXAMPLE/"],
        [b" https://ok.example "],
        [b"\thttps://ok.example"],
        [b"https://ok.example\xa0"],
        [b"https://ok.example\x85"],
        [b"https://evil.example", b"https://ok.example"],
        [b"https://ok.example", b"https://evil.example"],
        [b"https://ok.example", b"https://ok.example"],
    ],
    b"content-length": [None, [b"0"], [b"12"]],
    b"transfer-encoding": [None, [b"chunked"], [b"identity"]],
    "room": [
        None,
        [""],
        ["a" * 65],
        ["a" * 64],
        ["bad room"],
        ["x+y"],
        ["%ff"],
        ["%C3%A9"],
        ["", "lobby"],
        ["lobby", "bad room"],
        ["x:y.z-_9"],
    ],
    "username": [
        None,
        [""],
        ["a" * 65],
        ["a" * 64],
        ["a%01"],
        ["%ff"],
        ["zo%C3%AB+%F0%9F%99%82"],
        ["%C2%85"],
        ["", "ann"],
        ["ann", ""],
    ],
    "query": ["raw-byte", "extra", "bare-names", "empty"],
}


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """A valid upgrade request with a few flaws (or none), each in one part."""
    parts: dict[Any, Any] = {
        "method": b"GET",
        "path": b"/ws",
        b"upgrade": [b"websocket"],
        b"connection": [b"Upgrade"],
        b"sec-websocket-version": [b"13"],
        b"sec-websocket-key": [KEY],
        b"origin": [ALLOWED.encode()],
        "room": ["lobby"],
        "username": ["ann"],
        "query": None,
        b"content-length": None,
        b"transfer-encoding": None,
    }
    for part in draw(st.lists(st.sampled_from([*sorted(FLAWS, key=str), b"origin"]), max_size=3)):
        parts[part] = draw(st.sampled_from(FLAWS[part]))
    params = [
        (name, value)
        for name in draw(st.permutations(["room", "username"]))
        for value in parts[name] or []
    ]
    if parts["query"] == "extra":
        params.insert(draw(st.integers(0, len(params))), ("other", "1"))
    if parts["query"] == "bare-names":
        query = "&".join(f"{n}={v}" if v else n for n, v in params)
    else:
        query = "&".join(f"{n}={v}" for n, v in params)
    target = parts["path"] + (b"?" + query.encode() if query or parts["query"] == "empty" else b"")
    if parts["query"] == "raw-byte":
        target += b"\xe9"
    headers = [(b"host", b"x")]
    for name in (
        b"upgrade",
        b"connection",
        b"sec-websocket-version",
        b"sec-websocket-key",
        b"origin",
        b"content-length",
        b"transfer-encoding",
    ):
        headers += [(name, value) for value in parts[name] or []]
    return parts["method"], target, draw(st.permutations(headers))


@settings(max_examples=5 * settings.default.max_examples)  # cheap: 1 ms an example
@given(request=requests(), origins=st.booleans(), page=st.booleans())
def test_every_request_gets_the_decision_the_protocol_names(
    request: tuple[bytes, bytes, list[tuple[bytes, bytes]]], origins: bool, page: bool
) -> None:
    method, target, headers = request
    decision = route_request(
        method,
        target,
        headers,
        allowed_origins=frozenset({ALLOWED}) if origins else frozenset(),
        page=PAGE if page else None,
    )
    want = expected(method, target, headers, origins, page)
    if isinstance(want[0], str):
        assert decision == Upgrade(room=want[0], username=want[1], accept=want[2])  # type: ignore[arg-type]
        return
    assert isinstance(decision, HttpResponse)
    status, required = want
    assert decision.status == status
    assert dict(decision.headers).items() >= required.items()  # type: ignore[union-attr]
    if status == 200 and target.startswith(b"/healthz"):
        assert decision.body == b"ok\n"
    elif status == 200:
        assert (decision.body, decision.content_type) == (PAGE, b"text/html; charset=utf-8")
    else:
        # A refusal says why, in plain text.
        assert decision.content_type.startswith(b"text/plain")
        assert decision.body.strip() and decision.body.endswith(b"\n")
        decision.body.decode()
