"""
The hub of a transport that speaks WebSocket messages: :class:`MessageHub`. Sans-IO.

Its server (an ASGI server) parses the handshake and the frames, and owns pings and
the close handshake; the hub gets whole messages. Its inputs and its own output (the
rest is :class:`~roombus.server.hub.HubBase`'s):

* An upgrade request: ``hub.open_websocket(target, headers, now=..., ...)`` returns
  the :class:`~roombus.server.http.HttpResponse` to refuse it with, or the id of an
  open connection: accept the WebSocket, then send its queue.
* A whole message from it: :meth:`MessageHub.receive_message` (``str`` for text,
  ``bytes`` for binary). Its end: ``hub.lost(cid, ...)``.
* :meth:`MessageHub.take_dirty_messages` lists connections with messages to send: a
  :class:`~roombus.server.queues.MessageQueue` of UTF-8 payloads and, last, a
  :class:`~roombus.server.queues.CloseMessage`. Report each one sent with
  ``queue.consume(1)``, and call ``hub.flushed(cid)`` once the queue is empty.

Such a hub has no heartbeat (the server pings; ``BrokerConfig.heartbeat`` must be
off) and no HANDSHAKE or FINISHING phase: a connection starts OPEN, and once its
close is queued it is CLOSING until the server reports the peer gone (``lost()``, on
the peer's answer) or the close timeout drops it.
"""

from __future__ import annotations

from typing import cast

from ..core.names import ConnectionId
from .forwarded import forwarded_client
from .handshake import Upgrade, draining_refusal, route_websocket
from .http import HttpResponse
from .hub import HubBase, _Conn, _Phase, _Step, log
from .peer import client_label
from .queues import CloseMessage, MessageQueue
from .typing import Headers
from .wire import MESSAGE_TOO_BIG, UNSUPPORTED_DATA


class MessageHub(HubBase):
    """
    The hub of a transport that speaks WebSocket messages itself (an ASGI server: it
    parses the handshake and the frames, and owns pings and the close handshake).
    See the module docstring for the contract; the constructor's arguments are
    :class:`~roombus.server.hub.HubBase`'s, and the broker's heartbeat must be off.
    """

    framed = False

    # -- outputs ----------------------------------------------------------------------

    def take_dirty_messages(self) -> list[tuple[ConnectionId, MessageQueue]]:
        """Connections with new messages to send since the last call."""
        if not self._dirty:
            return []
        dirty, self._dirty = self._dirty, {}
        self._sample_depths(dirty)
        return cast("list[tuple[ConnectionId, MessageQueue]]", list(dirty.items()))

    # -- inputs -----------------------------------------------------------------------

    def open_websocket(
        self, target: bytes, headers: Headers, *, now: float, timestamp: int, peer: str = ""
    ) -> ConnectionId | HttpResponse:
        """
        A WebSocket handshake a message transport has checked and not yet answered.

        Args:
            target: The request target (``b"/ws?room=lobby&username=ann"``).
            headers: The request headers, names in lower case.

        Returns:
            The response to refuse it with (before accepting: a 403 for a bad origin,
            400 for a bad room or username, 404 for another path, 503 while draining or
            during shutdown),
            or the id of the new, open connection: accept the WebSocket, then send
            its queue (its presence messages are already in it).
        """
        if self.shutting_down:
            self.http_refusals.add(503)
            return HttpResponse(status=503, body=b"server shutting down\n")
        if self.draining:
            return draining_refusal()
        decision = route_websocket(
            target,
            headers,
            allowed_origins=self.config.allowed_origins,
            authenticator=self.authenticator,
            now=timestamp,
        )
        if isinstance(decision, Upgrade):
            decision = self._admit(decision)
        if isinstance(decision, HttpResponse):
            self._refused(peer, decision)
            return decision
        cid = ConnectionId(next(self._ids))
        broker_config = self.broker.config
        conn = _Conn(
            cid,
            peer,
            None,
            MessageQueue(
                broker_config.send_queue, broker_config.send_queue_bytes, budget=self.budget
            ),
            now,
        )
        trusted = self.config.forwarded_allow_ips
        if trusted and trusted.trusts(conn.hop):
            # The ASGI server's client is a trusted proxy (its own --proxy-headers
            # did not resolve it): the headers name the client.
            client = forwarded_client(conn.hop, headers, trusted)
            if client != conn.hop:
                conn.ip = client
                conn.peer = peer = client_label(client)
        refusal = self._add(conn)
        if refusal is not None:
            self._refused(peer, refusal, limit=True, cid=cid)
            self.lost(cid, now=now, timestamp=timestamp)
            return refusal
        self._set_phase(conn, _Step.UPGRADE)
        self._connect(conn, decision, now, timestamp)
        return cid

    def receive_message(
        self, cid: ConnectionId, message: str | bytes, *, now: float, timestamp: int
    ) -> None:
        """
        A whole message from *cid*'s peer: ``str`` for a text
        message, ``bytes`` for a binary one (refused with 1003). A text message over
        ``max_message_bytes`` closes with 1009.
        """
        conn = self._conns.get(cid)
        if conn is None or conn.phase is not _Phase.OPEN:
            return
        if type(message) is not str:
            self._refuse(conn, UNSUPPORTED_DATA, "binary frames are not supported", now, timestamp)
            return
        limit = self.broker.config.max_message_bytes
        # A character is at most 4 UTF-8 bytes: count bytes only when it may matter.
        if len(message) > limit or (
            len(message) * 4 > limit and len(message.encode("utf-8", "surrogatepass")) > limit
        ):
            self._refuse(conn, MESSAGE_TOO_BIG, "message too big", now, timestamp)
            return
        self._apply(
            self.broker.handle_text(cid, message, now=now, timestamp=timestamp),
            now,
            timestamp,
        )

    # -- phases -----------------------------------------------------------------------

    def _refuse(self, conn: _Conn, code: int, reason: str, now: float, timestamp: int) -> None:
        """Close an OPEN message connection for what its peer sent."""
        log.info(
            "closing conn %d (%s): %d %s",
            conn.cid,
            conn.peer,
            code,
            reason,
            extra=conn.fields(code=code, reason=reason),
        )
        self._forget(conn, now, timestamp)
        self._close(conn, code, reason, now, drop_pending=False)

    def _close(
        self, conn: _Conn, code: int, reason: str, now: float, *, drop_pending: bool
    ) -> None:
        """Start closing an OPEN connection from our side."""
        # The server frames the close and answers the peer's; the connection is
        # CLOSING until the server reports the peer gone (lost()), since some
        # servers end the TCP connection as soon as the app returns.
        self._closed(code, "server")
        queue = conn.queue
        queue.close_with(CloseMessage(code, reason[:120]), drop_pending=drop_pending)  # type: ignore[arg-type]
        self._dirty[conn.cid] = queue
        self._set_phase(conn, _Step.CLOSE)
        self._set_deadline(conn, now + self.config.close_timeout)
