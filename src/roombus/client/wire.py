"""
The client's WebSocket, sans-IO: wsproto's client connection, turned into what
:class:`~roombus.client.protocol.ClientProtocol` is told.

Bytes from the socket go in (:meth:`ClientWire.receive`), :data:`WireEvent` values
come out, and :meth:`ClientWire.take_output` holds the bytes to write (the handshake,
messages, and wsproto's own answers: pongs, the close reply).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

#: The subprotocol roombus speaks; a token rides next to it as ``bearer.<token>``.
SUBPROTOCOL = "roombus"

#: The most one message from the server may hold (a ``history`` answer is the largest).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@attrs.frozen
class Opened:
    """The server accepted the upgrade."""


@attrs.frozen
class Text:
    """One whole text message."""

    text: str


@attrs.frozen
class Refused:
    """The server answered the upgrade with HTTP *status* (and *body*, cut short)."""

    status: int
    body: str


@attrs.frozen
class Closed:
    """The WebSocket closed: *code* None if it broke without a close frame."""

    code: int | None
    reason: str


WireEvent = Opened | Text | Refused | Closed


class ClientWire:
    """
    One client WebSocket connection.

    Args:
        host: The ``Host`` header (``host`` or ``host:port``).
        target: The request target (path and query).
        token: Credentials, offered as the ``bearer.<token>`` subprotocol.
        headers: More request headers.
        max_message_bytes: A longer message from the server closes with 1009.
    """

    def __init__(
        self,
        host: str,
        target: str,
        *,
        token: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._max = max_message_bytes
        self._parts: list[str] = []
        self._size = 0
        self._status = 0
        self._body = bytearray()
        self._done = False
        protocols = [SUBPROTOCOL] + ([f"bearer.{token}"] if token else [])
        self._out = bytearray(
            self._ws.send(
                Request(
                    host=host,
                    target=target,
                    subprotocols=protocols,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                )
            )
        )

    def take_output(self) -> bytes:
        """The bytes to write now (and forget)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def finished(self) -> bool:
        """Whether the connection is over (refused, closed, or broken)."""
        return self._done

    @property
    def is_open(self) -> bool:
        return self._ws.state is ConnectionState.OPEN

    def send_text(self, text: str) -> None:
        """Queue *text* as a message (dropped unless the connection is open)."""
        if self._ws.state is ConnectionState.OPEN:
            self._out += self._ws.send(TextMessage(data=text))

    def close(self, code: int, reason: str = "") -> None:
        """Begin the close handshake (if the connection is open)."""
        if self._ws.state is ConnectionState.OPEN:
            self._out += self._ws.send(CloseConnection(code=code, reason=reason))

    def receive(self, data: bytes | None) -> list[WireEvent]:
        """Bytes from the socket (None: it reached EOF); what they meant."""
        if self._done:
            return []
        out: list[WireEvent] = []
        try:
            # wsproto raises here when the stream ends before the handshake's answer
            # (a proxy with no backend, a server dying mid-handshake).
            self._ws.receive_data(data)
            for event in self._ws.events():
                self._on(event, out)
                if self.finished:
                    break
        except RemoteProtocolError as exc:
            if data is None:
                self._done = True
                out.append(Closed(None, "connection lost during the handshake"))
                return out
            self._fail(exc.event_hint, out)
        if data is None and not self.finished:
            self._done = True
            out.append(Closed(None, "connection lost"))
        return out

    def _on(self, event: object, out: list[WireEvent]) -> None:
        if isinstance(event, AcceptConnection):
            out.append(Opened())
        elif isinstance(event, TextMessage):
            self._size += len(event.data)
            if self._size > self._max:
                self._abort(1009, "message too big", out)
                return
            self._parts.append(event.data)
            if event.message_finished:
                text = "".join(self._parts)
                self._parts.clear()
                self._size = 0
                out.append(Text(text))
        elif isinstance(event, BytesMessage):
            self._abort(1003, "binary message", out)
        elif isinstance(event, Ping):
            if self._ws.state is ConnectionState.OPEN:  # not once our close is sent
                self._out += self._ws.send(event.response())
        elif isinstance(event, CloseConnection):
            try:
                self._out += self._ws.send(event.response())
            except LocalProtocolError:
                pass  # we had begun the close ourselves: this was the reply
            self._done = True
            out.append(Closed(event.code, event.reason or ""))
        elif isinstance(event, RejectConnection):
            self._status = event.status_code
            if not event.has_body:
                self._refused(out)
        elif isinstance(event, RejectData):
            if len(self._body) < 512:
                self._body += event.data[: 512 - len(self._body)]
            if event.body_finished:
                self._refused(out)

    def _refused(self, out: list[WireEvent]) -> None:
        self._done = True
        out.append(Refused(self._status, self._body.decode("utf-8", "replace")))

    def _abort(self, code: int, reason: str, out: list[WireEvent]) -> None:
        """Close because of what the server sent, and stop reading."""
        self.close(code, reason)
        self._done = True
        out.append(Closed(None, reason))  # not the server's close: as if it broke

    def _fail(self, hint: object, out: list[WireEvent]) -> None:
        if self._ws.state is ConnectionState.CONNECTING and not self._status:
            self._done = True
            out.append(Refused(0, "not a WebSocket handshake answer"))
            return
        self._abort(1002, "protocol error", out)
