"""
One client's bytes through the whole sans-IO stack (wire, handshake, codec, broker), as
the trio adapter drives it, and a reader for what the server wrote back.

The fuzzers feed arbitrary bytes in and check what comes out: an HTTP response with a
status the protocol names, or a 101 followed by WebSocket frames (JSON envelopes, pongs,
and at most one close frame with a valid code), or nothing when the peer left before a
whole request.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from roombus import BrokerConfig
from roombus.lowlevel import (
    Broker,
    ClientConnected,
    ClientDisconnected,
    Close,
    ConnectionId,
    Deliver,
    PongReceived,
    SendPing,
    TextReceived,
)
from roombus.server.handshake import Upgrade, route_request
from roombus.server.wire import (
    PING_FRAME,
    BadRequest,
    Closed,
    FragmentReceived,
    MessageReceived,
    PongFrameReceived,
    Reply,
    RequestReceived,
    ServerWire,
    WireState,
    text_frame,
)

MAX_MESSAGE = 256
CONFIG = BrokerConfig(max_message_bytes=MAX_MESSAGE, send_queue_bytes=MAX_MESSAGE + 1024)
TS = 1_700_000_000

#: Statuses docs/protocol.md names for a request that is not a valid upgrade, and
#: 501/505, which h11 answers requests it cannot frame with (chunked oddities, HTTP/2).
HTTP_STATUSES = {200, 400, 403, 404, 405, 426, 431, 501, 505}
#: Close codes a server may send (RFC 6455 7.4.1; 1005 is how an empty close reads).
SERVER_CLOSE_CODES = {1000, 1001, 1002, 1003, 1005, 1007, 1008, 1009, 1011}
#: Codes a peer may close with (and the server echoes).
PEER_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, *range(3000, 5000)}
ENVELOPE_TYPES = {"chat", "presence", "presence_state", "pong", "error"}
ERROR_CODES = {"bad_json", "bad_message", "not_joined", "invalid_room", "forbidden"}


class Pipeline:
    """A server for one connection, without I/O: ``feed()`` bytes, read ``out``."""

    def __init__(self, broker: Broker | None = None, cid: int = 1, **route: Any) -> None:
        self.broker = broker if broker is not None else Broker(CONFIG)
        self.wire = ServerWire(max_header_bytes=1024, max_message_bytes=MAX_MESSAGE)
        self.cid = ConnectionId(cid)
        self.route = route
        self.out = b""
        self.done = False

    def feed(self, data: bytes | None) -> None:
        """Bytes from the client; None for the end of its stream."""
        if self.done:
            return
        if self.wire.state is WireState.HANDSHAKE:
            self._handshake(data)
        else:
            self._frames(data)

    def _handshake(self, data: bytes | None) -> None:
        for event in self.wire.receive_data(data):
            if isinstance(event, RequestReceived):
                decision = route_request(event.method, event.target, event.headers, **self.route)
                if isinstance(decision, Upgrade):
                    self.out += self.wire.accept(decision)
                    self.apply(
                        self.broker.handle(
                            ClientConnected(
                                conn=self.cid, username=decision.username, room=decision.room
                            ),
                            now=0.0,
                            timestamp=TS,
                        )
                    )
                    self._frames(b"")  # bytes that came with the request
                else:
                    self.out += self.wire.respond(decision, head=event.method == b"HEAD")
                    self.done = True
            elif isinstance(event, BadRequest):
                self.out += self.wire.respond(event.response)
                self.done = True
            else:
                assert isinstance(event, Closed)
                self.done = True
            return

    def _frames(self, data: bytes | None) -> None:
        for event in self.wire.receive_data(data):
            if self.done:  # closed by the broker (a flooder): the rest is ignored
                return
            if isinstance(event, MessageReceived):
                assert len(event.text.encode()) <= MAX_MESSAGE
                self.apply(
                    self.broker.handle(
                        TextReceived(conn=self.cid, text=event.text), now=0.0, timestamp=TS
                    )
                )
            elif isinstance(event, PongFrameReceived):
                # Unsolicited (nothing here pings): charged, closed if abusive.
                self.apply(self.broker.handle(PongReceived(conn=self.cid), now=0.0, timestamp=TS))
            elif isinstance(event, (Reply, FragmentReceived)):
                # Control frames and fragments cost rate, as the hub charges them.
                allowed, actions = self.broker.charge(self.cid, now=0.0, timestamp=TS)
                self.apply(actions)
                if allowed and isinstance(event, Reply):
                    self.out += event.data
            else:
                assert isinstance(event, Closed)
                self.out += event.data
                self.apply(
                    self.broker.handle(ClientDisconnected(conn=self.cid), now=0.0, timestamp=TS)
                )
                self.done = True
                return

    def apply(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Deliver) and self.cid in a.conns:
                self.out += text_frame(a.payload)
            elif isinstance(a, SendPing) and a.conn == self.cid:
                self.out += PING_FRAME
            elif isinstance(a, Close) and a.conn == self.cid:
                self.out += self.wire.close(a.code, a.reason)
                self.done = True


@attrs.frozen
class HttpAnswer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@attrs.frozen
class WebSocketAnswer:
    envelopes: list[dict[str, Any]]
    pongs: int
    close_code: int | None


Answer = HttpAnswer | WebSocketAnswer | None

_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3})(?: [^\r\n]*)?")


def read_answer(out: bytes, *, head: bool = False) -> Answer:
    """What a client reads in the server's bytes; asserts they are well-formed."""
    if not out:
        return None
    head_bytes, sep, body = out.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {out[:80]!r}"
    status_line, *header_lines = head_bytes.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    assert match, status_line
    status = int(match.group(1))
    headers: dict[bytes, bytes] = {}
    for line in header_lines:
        name, colon, value = line.partition(b": ")
        assert colon, line
        # Repeated headers read as one comma-separated list (RFC 9110 5.3).
        key = name.lower()
        headers[key] = headers[key] + b", " + value if key in headers else value
    if status != 101:
        assert status in HTTP_STATUSES, status
        assert b"close" in [t.strip().lower() for t in headers[b"connection"].split(b",")]
        assert int(headers[b"content-length"]) == len(body) or (head and not body)
        return HttpAnswer(status, headers, body)
    assert headers[b"upgrade"].lower() == b"websocket"
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(body)
    envelopes: list[dict[str, Any]] = []
    pongs = 0
    close_code = None
    for event in client.events():
        assert close_code is None, "a frame after the close frame"
        if isinstance(event, TextMessage):
            envelope = json.loads(event.data)
            assert envelope["type"] in ENVELOPE_TYPES, envelope
            if envelope["type"] == "error":
                assert envelope["code"] in ERROR_CODES, envelope
                assert isinstance(envelope["content"], str) and envelope["content"]
            envelopes.append(envelope)
        elif isinstance(event, Pong):
            pongs += 1
        elif isinstance(event, CloseConnection):
            close_code = event.code
        else:
            assert isinstance(event, Ping), event
    return WebSocketAnswer(envelopes, pongs, close_code)
