"""
The opening handshake's decisions, as pure functions of a parsed HTTP request.

Given a request's method, target and headers, :func:`route_request` decides: upgrade
to a WebSocket for a room and user, or answer with a plain HTTP response (the chat
page, the JavaScript client at ``/roombus.js``, ``/healthz``, or a refusal with the
status the protocol names). Parsing HTTP and writing bytes belong to the wire layer;
nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Collection
from urllib.parse import parse_qsl

import attrs

from ..core.auth import Identity
from ..core.names import RoomName, Username, is_valid_room, is_valid_username
from ..core.streams import Position, is_valid_epoch
from .auth import Authenticator, Refusal, selected_subprotocol
from .http import HttpResponse as HttpResponse
from .http import StaticFile, serve_file
from .typing import Headers

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: The headers of a WebSocket refused while the server drains: when to try again, in
#: seconds (by then a load balancer has taken this node out: another one answers).
DRAINING_RETRY_AFTER = ((b"retry-after", b"5"),)


def draining_refusal() -> HttpResponse:
    """The answer to a WebSocket upgrade while the server drains: 503, Retry-After."""
    return _refuse(503, "server draining: connect to another node", *DRAINING_RETRY_AFTER)


@attrs.frozen(kw_only=True)
class Upgrade:
    """
    Accept the WebSocket upgrade.

    Attributes:
        room: The room to join on connect.
        username: The user: the authenticated identity's, else the query string's.
        accept: The ``Sec-WebSocket-Accept`` value for the response.
        identity: What the authenticator established, or None without one.
        subprotocol: The ``Sec-WebSocket-Protocol`` to answer with, or None.
        positioned: Whether the query named a position (``since=E:N``, or
            ``since=`` for none yet): the join is answered with ``joined``.
        since: That position, or None.
        partial: Whether the query asked for a partial replay (``partial=1``).
    """

    room: RoomName
    username: Username
    accept: bytes
    identity: Identity | None = attrs.field(default=None, repr=False)
    subprotocol: bytes | None = None
    positioned: bool = False
    since: Position | None = None
    partial: bool = False


def parse_since(value: str) -> Position | None:
    """
    The query form of a position: ``EPOCH:SEQ``, or empty for None.

    Raises:
        ValueError: if *value* is neither.
    """
    if not value:
        return None
    epoch, colon, seq = value.rpartition(":")
    if colon and is_valid_epoch(epoch) and seq.isdigit() and seq.isascii() and len(seq) <= 19:
        return Position(epoch, int(seq))
    raise ValueError(value)


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def _refuse(status: int, text: str, *headers: tuple[bytes, bytes]) -> HttpResponse:
    return HttpResponse(status=status, body=text.encode() + b"\n", headers=headers)


def _tokens(headers: Headers, name: bytes) -> set[bytes]:
    found: set[bytes] = set()
    for key, value in headers:
        if key == name:
            found.update(t.strip().lower() for t in value.split(b","))
    return found


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def normalize_origin(origin: str) -> str:
    """
    An origin as compared against the allow-list: lower case, no trailing slash, and
    without surrounding SP and HTAB (HTTP's whitespace; no other character, such as
    U+00A0, is whitespace in a header).
    """
    return origin.strip(" \t").rstrip("/").lower()


def route_request(
    method: bytes,
    target: bytes,
    headers: Headers,
    *,
    allowed_origins: Collection[str] = (),
    page: bytes | None = None,
    script: StaticFile | None = None,
    authenticator: Authenticator | None = None,
    now: float = 0.0,
    draining: bool = False,
) -> Upgrade | HttpResponse:
    """
    Decide what to do with one HTTP request.

    Args:
        method: The request method, e.g. ``b"GET"``.
        target: The request target, e.g. ``b"/ws?room=lobby&username=ann"``.
        headers: The headers, names in lower case (as h11 gives them).
        allowed_origins: If not empty, the only ``Origin`` values (normalized with
            :func:`normalize_origin`) an upgrade may carry; others get 403.
        page: An HTML page to serve at ``/``, if any.
        script: The JavaScript client to serve at ``/roombus.js``, if any: 200 with
            its ``ETag``, or 304 for an ``If-None-Match`` naming it (for ``HEAD``
            too; the transport leaves out the body of a ``HEAD``).
        authenticator: If given, it decides who the client is (the query's
            ``username`` is then ignored); its refusal is the answer (401/403).
        now: Wall-clock Unix seconds, for the authenticator's expiry checks.
        draining: Whether the server drains: ``/healthz`` then answers 503
            ``draining`` (load balancers stop sending clients), and a WebSocket
            upgrade 503 with ``Retry-After`` (:func:`draining_refusal`).
    """
    path, _, query = target.partition(b"?")
    if method not in (b"GET", b"HEAD"):
        return _refuse(405, "method not allowed", (b"allow", b"GET, HEAD"))
    if path == b"/healthz":
        if draining:
            return HttpResponse(status=503, body=b"draining\n")
        return HttpResponse(status=200, body=b"ok\n")
    if path == b"/" and page is not None:
        return HttpResponse(status=200, body=page, content_type=b"text/html; charset=utf-8")
    if path == b"/roombus.js" and script is not None:
        return serve_file(script, headers)
    if path != b"/ws":
        return _refuse(404, "not found")
    if draining:
        return draining_refusal()

    if b"websocket" not in _tokens(headers, b"upgrade") or b"upgrade" not in _tokens(
        headers, b"connection"
    ):
        return _refuse(
            426,
            "this endpoint speaks WebSocket only",
            (b"upgrade", b"websocket"),
        )
    if method != b"GET":
        return _refuse(405, "a WebSocket upgrade must be a GET", (b"allow", b"GET"))
    if _header(headers, b"sec-websocket-version") != b"13":
        return _refuse(
            426, "unsupported WebSocket version (13 only)", (b"sec-websocket-version", b"13")
        )
    key = _header(headers, b"sec-websocket-key")
    if key is None or not _valid_key(key):
        return _refuse(400, "missing or invalid Sec-WebSocket-Key")
    return _admit(path, query, headers, allowed_origins, accept_token(key), authenticator, now)


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def route_websocket(
    target: bytes,
    headers: Headers,
    *,
    allowed_origins: Collection[str] = (),
    authenticator: Authenticator | None = None,
    now: float = 0.0,
) -> Upgrade | HttpResponse:
    """
    Decide on a WebSocket whose handshake a server has already checked (an ASGI server
    does): the path, the ``Origin`` allow-list, and the room and username.

    The arguments and refusals are those of :func:`route_request`; an :class:`Upgrade`
    has an empty ``accept``, since the server answers the handshake itself. A
    ``Sec-WebSocket-Key`` is checked again if there is one, as not every server does.
    """
    path, _, query = target.partition(b"?")
    if path != b"/ws":
        return _refuse(404, "not found")
    key = _header(headers, b"sec-websocket-key")
    if key is not None and not _valid_key(key):
        return _refuse(400, "missing or invalid Sec-WebSocket-Key")
    return _admit(path, query, headers, allowed_origins, b"", authenticator, now)


def _admit(
    path: bytes,
    query: bytes,
    headers: Headers,
    allowed_origins: Collection[str],
    accept: bytes,
    authenticator: Authenticator | None,
    now: float,
) -> Upgrade | HttpResponse:
    """The checks every WebSocket passes, however its handshake is done."""
    if _header(headers, b"content-length") is not None or (
        _header(headers, b"transfer-encoding") is not None
    ):
        # What follows the head is frames here, but a body to a proxy that honours these.
        return _refuse(400, "a WebSocket upgrade has no body (Content-Length, Transfer-Encoding)")
    if allowed_origins:
        origins = [value for name, value in headers if name == b"origin"]
        if len(origins) > 1:  # another reader may take another one: none decides
            return _refuse(403, "more than one Origin header")
        if not origins or normalize_origin(origins[0].decode("latin-1")) not in allowed_origins:
            return _refuse(403, "origin not allowed")

    try:
        params = parse_qsl(query.decode("ascii"), keep_blank_values=True, errors="strict")
    except UnicodeError:
        return _refuse(400, "query string is not valid UTF-8")
    room: str | None = None
    username: str | None = None
    since: str | None = None
    partial: str | None = None
    for name, value in params:  # the first of repeated parameters wins
        if name == "room" and room is None:
            room = value
        elif name == "username" and username is None:
            username = value
        elif name == "since" and since is None:
            since = value
        elif name == "partial" and partial is None:
            partial = value
    try:
        position = parse_since(since) if since is not None else None
    except ValueError:
        return _refuse(400, "since must be EPOCH:SEQ (or empty for no position yet)")
    if partial not in (None, "", "0", "1", "true", "false"):
        return _refuse(400, "partial must be 1 or 0")
    identity: Identity | None = None
    if authenticator is not None:
        verdict = authenticator.authenticate(path=path, query=query, headers=headers, now=now)
        if isinstance(verdict, Refusal):
            if verdict.status == 401:
                return _refuse(401, verdict.reason, (b"www-authenticate", b"Bearer"))
            return _refuse(verdict.status, verdict.reason)
        identity = verdict
        username = verdict.username
    if not is_valid_room(room):
        return _refuse(400, "room must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    if not is_valid_username(username):
        return _refuse(400, "username must be 1-64 characters, no control or format characters")
    return Upgrade(
        room=RoomName(room),  # type: ignore[arg-type]
        username=Username(username),  # type: ignore[arg-type]
        accept=accept,
        identity=identity,
        subprotocol=selected_subprotocol(headers),
        positioned=since is not None,
        since=position,
        partial=partial in ("1", "true"),
    )
