"""
The wire layer: one server-side connection's bytes <-> the core's events. Still sans-IO.

h11 parses the opening HTTP request (bounded in size); wsproto parses frames after the
upgrade. Outbound data frames are built here by hand: server frames are unmasked and
no extension is negotiated, so a broadcast's frame is the same bytes for every
receiver and is built once (:func:`text_frame`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Final

import attrs
import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from ..core.codes import CloseCode
from .handshake import Upgrade
from .http import HttpResponse, response_head

# Close codes, by the names this layer has always used (their home is _codes).
NORMAL: Final = CloseCode.NORMAL_CLOSURE
GOING_AWAY: Final = CloseCode.GOING_AWAY
PROTOCOL_ERROR: Final = CloseCode.PROTOCOL_ERROR
UNSUPPORTED_DATA: Final = CloseCode.UNSUPPORTED_DATA
INVALID_DATA: Final = CloseCode.INVALID_FRAME_PAYLOAD_DATA
POLICY_VIOLATION: Final = CloseCode.POLICY_VIOLATION
MESSAGE_TOO_BIG: Final = CloseCode.MESSAGE_TOO_BIG

#: What each frame of a fragmented message counts toward ``max_message_bytes`` on top
#: of its payload: holding a fragment costs about this much (a string object and a list
#: slot) even when it carries no byte, so an endless run of empty continuation frames
#: reaches the limit like any other oversized message.
FRAGMENT_OVERHEAD = 64
#: Most frames one message may have, whatever the size limit.
MAX_FRAGMENTS = 4096


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame carrying *payload* (server to client)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


PING_FRAME = b"\x89\x00"


def close_frame(code: int, reason: str = "") -> bytes:
    """An unmasked close frame; the reason is cut to fit the 125-byte control limit."""
    body = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes((0x88, len(body))) + body


@attrs.frozen
class RequestReceived:
    """
    The opening HTTP request is complete: a ``POST``'s body too (*body*; None when it
    is over the wire's ``max_body_bytes``, of which no more is read). Every other
    method's request is complete with its head, and its *body* empty.
    """

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | None = b""


@attrs.frozen
class BadRequest:
    """The opening request is malformed or too large: answer *response* and close."""

    response: HttpResponse


@attrs.frozen
class MessageReceived:
    """A complete text message."""

    text: str


@attrs.frozen
class FragmentReceived:
    """
    A frame of a fragmented message that is not its last (the message itself comes
    as :class:`MessageReceived` once its last frame arrives). A driver charges it to
    the connection's rate limit, as it does control frames.
    """


@attrs.frozen
class PongFrameReceived:
    """A pong frame."""


@attrs.frozen
class Reply:
    """Protocol bytes the peer must get (a pong answering its ping)."""

    data: bytes


@attrs.frozen
class Closed:
    """
    The WebSocket is over. Write *data* (a close frame, possibly empty), then end the
    TCP connection.

    Attributes:
        code: The close code: the peer's, or ours when we refuse its input.
        data: The close frame to send, or empty if none is due.
        by_peer: True if the peer started the close (or vanished).
    """

    code: int
    data: bytes
    by_peer: bool


WireEvent = (
    RequestReceived
    | BadRequest
    | MessageReceived
    | FragmentReceived
    | PongFrameReceived
    | Reply
    | Closed
)


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` h11 accepted (it refuses a malformed one), if any."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


class WireState(enum.Enum):
    """Where a connection's wire stands."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


_PONG = PongFrameReceived()
_FRAGMENT = FragmentReceived()


def _misframed(version: bytes, head: bytes) -> HttpResponse | None:
    """
    The refusal for a request h11 reads leniently where a proxy may read it otherwise
    (request-smuggling material): an HTTP version other than 1.0 and 1.1 (505); a bare
    LF or CR, or an obs-fold continuation line, in the head (400; RFC 9112 2.2, 5.2).
    """
    if version not in (b"1.1", b"1.0"):
        return HttpResponse(status=505, body=b"HTTP version not supported (1.0 and 1.1 only)\n")
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        return HttpResponse(status=400, body=b"malformed HTTP request: lines must end in CRLF\n")
    if b"\n " in head or b"\n\t" in head:
        return HttpResponse(
            status=400, body=b"malformed HTTP request: folded header lines are not accepted\n"
        )
    return None


class ServerWire:
    """
    One server-side connection, from the first request byte to the close.

    Args:
        max_header_bytes: Largest opening request (line and headers) accepted; larger
            ones get 431.
        max_message_bytes: Largest inbound message; larger ones close with 1009. Each
            frame of a fragmented message counts :data:`FRAGMENT_OVERHEAD` bytes more,
            and a message of more than :data:`MAX_FRAGMENTS` frames closes with 1009 too.
        max_body_bytes: Largest body of a ``POST`` (the server API's) read; a larger
            one is reported as a request with no body (None), and no more is read.
        max_events: Most events one :meth:`receive_data` call returns for frames (0: no
            limit). The frames beyond stay buffered, unparsed, and :attr:`more` is True
            until a call (with ``b""`` or new bytes) takes them: a driver bounds how much
            one read may turn into output before it writes.
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = 16384,
        max_message_bytes: int = 65536,
        max_events: int = 0,
        max_body_bytes: int = 1024 * 1024,
    ) -> None:
        self.state = WireState.HANDSHAKE
        self._max_body = max_body_bytes
        #: Whether a ``POST``'s body is read, asked with its target and headers once
        #: its head is in (the hub: an ``/api/...`` request with a valid key). None or
        #: False: the request is reported at once with an empty body, none of which is
        #: read (and no ``100 Continue`` sent), as for every other method.
        self.wants_body: Callable[[bytes, list[tuple[bytes, bytes]]], bool] | None = None
        self._request: h11.Request | None = None  # a POST whose body is being read
        self._body = bytearray()
        self._h11: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=max_header_bytes
        )
        self._ws: Connection | None = None
        self._max_header_bytes = max_header_bytes
        self._received = 0  # bytes of the opening request so far
        self._head = bytearray()  # their first max_header_bytes + 1, to check the framing
        self._max_message = max_message_bytes
        self._quarter = max_message_bytes // 4
        self._parts: list[str] = []
        self._chars = 0  # characters of the message being received
        self._encoded = -1  # its UTF-8 bytes, once counted (-1: not yet)
        self._frames = 0  # its frames so far (each one's overhead is counted too)
        self._buf = b""  # bytes received but not yet parsed (a frame's beginning)
        self._owed = 0  # bytes wsproto still needs to finish the frame it has begun
        self._fragmented = False  # wsproto holds an unfinished fragmented message
        self._fast_max = min(max_message_bytes, 65535)
        self._max_events = max_events or -1
        self._start = 0  # where parsing resumes in _buf (after a call stopped at the limit)
        #: Complete frames may wait in the buffer: the last call stopped at ``max_events``.
        self.more = False

    # -- handshake --------------------------------------------------------------------

    def _receive_request(self, data: bytes | None) -> list[WireEvent]:
        h = self._h11
        assert h is not None
        try:
            # h11 spells end-of-stream as b"".
            if data is None:
                h.receive_data(b"")
            elif data:
                self._received += len(data)
                if len(self._head) <= self._max_header_bytes:
                    self._head += data
                h.receive_data(data)
            if self._request is not None:
                return self._read_body()
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            self.state = WireState.CLOSED
            status = exc.error_status_hint
            text = "request header too large" if status == 431 else "malformed HTTP request"
            return [BadRequest(HttpResponse(status=status, body=text.encode() + b"\n"))]
        if type(event) is h11.Request:
            # h11 bounds only a request still incomplete; bound a whole one too.
            size = self._received - len(h.trailing_data[0])
            if size > self._max_header_bytes:
                self.state = WireState.CLOSED
                return [BadRequest(HttpResponse(status=431, body=b"request header too large\n"))]
            refusal = _misframed(event.http_version, bytes(self._head[:size]))
            self._head = bytearray()
            if refusal is not None:
                self.state = WireState.CLOSED
                return [BadRequest(refusal)]
            if event.method == b"POST" and (
                self.wants_body is not None and self.wants_body(event.target, list(event.headers))
            ):
                self._request = event
                length = _content_length(event.headers)
                if length is not None and length > self._max_body:
                    return self._too_large()
                out: list[WireEvent] = []
                if h.they_are_waiting_for_100_continue:
                    out.append(Reply(b"HTTP/1.1 100 Continue\r\n\r\n"))
                return out + self._read_body()
            return [RequestReceived(event.method, event.target, list(event.headers))]
        if event is h11.NEED_DATA:
            return []
        # ConnectionClosed before a full request: nothing to answer.
        self.state = WireState.CLOSED
        return [Closed(code=CloseReason.ABNORMAL_CLOSURE, data=b"", by_peer=True)]

    def _read_body(self) -> list[WireEvent]:
        """A POST's body so far: the request once it is all there (or too large)."""
        h = self._h11
        request = self._request
        assert h is not None and request is not None
        try:
            while True:
                event = h.next_event()
                if type(event) is h11.Data:
                    self._body += event.data
                    if len(self._body) > self._max_body:
                        return self._too_large()
                elif type(event) is h11.EndOfMessage:
                    body, self._body = bytes(self._body), bytearray()
                    self._request = None
                    self.state = WireState.CLOSED  # answered, then the connection ends
                    return [
                        RequestReceived(request.method, request.target, list(request.headers), body)
                    ]
                elif event is h11.NEED_DATA:
                    return []
                else:  # the peer went away mid-body
                    self.state = WireState.CLOSED
                    return [Closed(code=CloseReason.ABNORMAL_CLOSURE, data=b"", by_peer=True)]
        except h11.RemoteProtocolError as exc:
            self.state = WireState.CLOSED
            status = exc.error_status_hint
            return [BadRequest(HttpResponse(status=status, body=b"malformed HTTP request\n"))]

    def _too_large(self) -> list[WireEvent]:
        request = self._request
        assert request is not None
        self._request = None
        self._body = bytearray()
        self.state = WireState.CLOSED
        return [RequestReceived(request.method, request.target, list(request.headers), None)]

    def respond(self, response: HttpResponse, *, head: bool = False) -> bytes:
        """The bytes of a plain HTTP *response* (no body for HEAD); the connection is then over."""
        self.state = WireState.CLOSED
        try:
            phrase = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            phrase = b""
        lines = [b"HTTP/1.1 %d %s" % (response.status, phrase)]
        lines.extend(name + b": " + value for name, value in response_head(response))
        head_bytes = b"\r\n".join(lines) + b"\r\n\r\n"
        return head_bytes if head else head_bytes + response.body

    def accept(self, upgrade: Upgrade) -> bytes:
        """Switch to WebSocket; returns the 101 response to write."""
        h = self._h11
        assert h is not None and self.state is WireState.HANDSHAKE
        self._buf = h.trailing_data[0]
        self._h11 = None
        self._ws = Connection(ConnectionType.SERVER)
        self.state = WireState.OPEN
        protocol = (
            b"Sec-WebSocket-Protocol: " + upgrade.subprotocol + b"\r\n"
            if upgrade.subprotocol is not None
            else b""
        )
        return (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + upgrade.accept + b"\r\n" + protocol + b"\r\n"
        )

    # -- frames -----------------------------------------------------------------------

    def receive_data(self, data: bytes | None) -> list[WireEvent]:
        """
        Feed bytes from the peer (None at end of stream); returns what they mean.

        After :meth:`accept`, call once with ``b""`` to process bytes that came with
        the request.
        """
        if self.state is WireState.HANDSHAKE:
            return self._receive_request(data)
        ws = self._ws
        if ws is None or ws.state is ConnectionState.CLOSED:
            return []
        out: list[WireEvent] = []
        start = self._start
        if data:
            buf = self._buf[start:] + data if start else self._buf + data
            start = 0
        else:
            buf = self._buf
        self._buf = b""
        self._start = 0
        self.more = False
        # At end of stream, whatever is left is read now.
        if buf and self._scan(buf, out, start, self._max_events if data is not None else -1):
            return out
        if data is None:
            if self._buf:
                ws.receive_data(self._buf)
                self._buf = b""
            ws.receive_data(None)
            self._drain(out)
        return out

    def _scan(self, buf: bytes, out: list[WireEvent], pos: int, limit: int) -> bool:
        """
        Split *buf* from *pos* into frames: simple text frames are decoded here,
        everything else goes to wsproto in order. Returns True once the connection is
        closing. Stops at a frame boundary once *out* holds *limit* events (-1: never),
        keeping the rest for the next call.

        The fast path takes only what wsproto would accept as it is: a final, masked
        text frame, no RSV bits, minimal length encoding, complete in *buf*, within
        the size limit, outside a fragmented message, and valid UTF-8. The property
        test ``test_fast_path_matches_wsproto_alone`` holds the two paths equal.
        """
        ws = self._ws
        assert ws is not None
        end = len(buf)
        while pos < end:
            if len(out) >= limit >= 0 and not self._owed:
                self._buf = buf
                self._start = pos
                self.more = True
                return False
            owed = self._owed
            if owed:  # the rest of a frame wsproto has begun
                take = min(owed, end - pos)
                ws.receive_data(buf[pos : pos + take])
                self._owed = owed - take
                pos += take
                if self._drain(out):
                    return True
                continue
            if end - pos < 2:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            if n < 126:
                head = 2
            elif n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            else:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                head += 4
            if end - pos < head:
                break
            total = head + n
            if (
                b0 == 0x81
                and b1 & 0x80
                and (head == 6 or (head == 8 and n >= 126))
                and n <= self._fast_max
                and pos + total <= end
                and not self._fragmented
                and ws.state is ConnectionState.OPEN
            ):
                start = pos + head
                payload = buf[start : start + n]
                if n:
                    key = buf[start - 4 : start]
                    mask = int.from_bytes(key * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
                    payload = (int.from_bytes(payload, "little") ^ mask).to_bytes(n, "little")
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    pass  # wsproto below refuses it with 1007, in its own words
                else:
                    out.append(MessageReceived(text))
                    pos += total
                    continue
            # Anything else is wsproto's: note whether a fragmented message starts or ends.
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2):
                self._fragmented = not b0 & 0x80
            elif opcode == 0x0 and b0 & 0x80:
                self._fragmented = False
            take = min(total, end - pos)
            ws.receive_data(buf[pos : pos + take])
            self._owed = total - take
            pos += take
            if self._drain(out):
                return True
        if pos < end:
            self._buf = buf[pos:]
        return False

    def _drain(self, out: list[WireEvent]) -> bool:
        """Turn wsproto's events into ours; True once the connection is closing."""
        ws = self._ws
        assert ws is not None
        for event in ws.events():
            if isinstance(event, TextMessage):
                part = event.data
                self._chars += len(part)
                fragment = event.frame_finished and not event.message_finished
                if fragment:
                    # A whole frame of a message that goes on: it costs its overhead.
                    self._frames += 1
                    self._chars += FRAGMENT_OVERHEAD
                    if self._encoded >= 0:
                        self._encoded += FRAGMENT_OVERHEAD
                # Characters under-count UTF-8 bytes by at most 4x: count bytes exactly
                # only once the message is long enough for it to matter.
                if self._frames >= MAX_FRAGMENTS or (
                    self._chars > self._quarter and self._too_big(part)
                ):
                    out.append(self._close(MESSAGE_TOO_BIG, "message too big"))
                    return True
                if not event.message_finished:
                    if part:
                        self._parts.append(part)
                    if fragment:
                        out.append(_FRAGMENT)
                    continue
                if self._parts:
                    self._parts.append(part)
                    part = "".join(self._parts)
                    self._parts = []
                self._chars = 0
                self._encoded = -1
                self._frames = 0
                out.append(MessageReceived(part))
            elif isinstance(event, Pong):
                out.append(_PONG)
            elif isinstance(event, Ping):
                # After our close frame, no pong may follow it (RFC 6455 5.5.1).
                if ws.state is ConnectionState.OPEN:
                    out.append(Reply(ws.send(event.response())))
            elif isinstance(event, BytesMessage):
                out.append(self._close(UNSUPPORTED_DATA, "binary frames are not supported"))
                return True
            elif isinstance(event, CloseConnection):
                out.append(self._on_close(event))
                return True
        return False

    def _too_big(self, part: str) -> bool:
        if self._chars > self._max_message:
            return True
        if self._encoded < 0:  # first time: count the earlier parts (and frames) too
            self._encoded = sum(len(p.encode()) for p in self._parts)
            self._encoded += self._frames * FRAGMENT_OVERHEAD
        self._encoded += len(part.encode())
        return self._encoded > self._max_message

    def _on_close(self, event: CloseConnection) -> Closed:
        ws = self._ws
        assert ws is not None
        if ws.state is ConnectionState.REMOTE_CLOSING:
            # The peer sent a close frame: answer it.
            return Closed(code=event.code, data=ws.send(event.response()), by_peer=True)
        if ws.state is ConnectionState.CLOSED:
            # The answer to our own close, or the stream ended without one.
            return Closed(code=event.code, data=b"", by_peer=True)
        # wsproto refused the peer's bytes (bad UTF-8, protocol violation). Its reason
        # for bad UTF-8 is Python's codec message: say it in the protocol's words.
        if event.code == INVALID_DATA:
            return self._close(INVALID_DATA, "invalid UTF-8")
        return self._close(event.code, event.reason or "protocol error")

    def _close(self, code: int, reason: str) -> Closed:
        # Empty data when our close frame already went out (we are LOCAL_CLOSING).
        return Closed(code=code, data=self.close(code, reason), by_peer=False)

    def close(self, code: int, reason: str = "") -> bytes:
        """Start a close from our side; returns the close frame (empty if too late)."""
        ws = self._ws
        if ws is None or ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return b""
        return ws.send(CloseConnection(code=code, reason=reason[:120]))

    @property
    def closed(self) -> bool:
        """True once no more frames may be sent."""
        ws = self._ws
        return ws is None or ws.state is not ConnectionState.OPEN
