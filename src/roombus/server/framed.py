"""
The hub of a transport of bytes: :class:`FramedHub`. Sans-IO.

It parses the HTTP handshake (plain answers too: the page, ``/healthz``,
``/metrics``, refusals) and the WebSocket frames, answers pings, sends the
heartbeat's, and runs the close handshake. Its inputs and its own output (the rest
is :class:`~roombus.server.hub.HubBase`'s):

* A new transport connection: ``cid = hub.open(now=..., peer=...)``.
* Bytes from it: ``hub.receive(cid, data, now=..., timestamp=...)``; ``None`` at end
  of stream.
* :meth:`FramedHub.take_dirty` lists connections with bytes to write: write
  ``queue.data()`` as far as the transport takes it, report it with
  ``queue.consume(n)``, and once a queue is empty call ``hub.flushed(cid)``.
* :meth:`FramedHub.input_pending`: the hub read only part of what came (a burst);
  write the dirty queues (let the flusher run), then ``hub.receive(cid, b"", ...)``
  for the next part, and read no more from that transport until it is False.
"""

from __future__ import annotations

from typing import Final, cast

from ..core.events import PongReceived
from ..core.names import ConnectionId
from .api import MAX_BODY_BYTES, ApiError, Pending, authenticate, error_response
from .forwarded import forwarded_client, normalize_ip
from .handshake import Upgrade, route_request
from .http import HttpResponse
from .hub import HubBase, _Conn, _log_client_close, _Phase, _Step, log
from .peer import client_label
from .proxyproto import ProxyHeaderError, parse_proxy_header
from .queues import SendQueue
from .wire import (
    BadRequest,
    Closed,
    FragmentReceived,
    MessageReceived,
    PongFrameReceived,
    Reply,
    RequestReceived,
    ServerWire,
)

#: Most frames the hub reads from one connection's input per call before it returns,
#: so that the adapter writes what they produced before the rest is read: a burst of
#: messages in one TCP write then reaches each receiver's send queue this many at a
#: time, between flushes, and a receiver that keeps up never has more than a few
#: batches queued (far below ``send_queue``). The rest waits, unparsed, in the wire;
#: :meth:`FramedHub.input_pending` says so.
INPUT_BATCH: Final = 64

#: The longest PROXY protocol header accepted is ``max_header_bytes``, but at least
#: this: a version 2 header with a Unix socket's addresses.
PROXY_HEADER_MIN: Final = 16 + 216
_NOT_HERE: Final = HttpResponse(status=404, body=b"not found (the API's listener)\n")


class FramedHub(HubBase):
    """
    The hub of a transport of bytes (TCP, TLS, a stream): it parses the HTTP
    handshake and the WebSocket frames, answers pings and closes, and sends the
    heartbeat's pings. See the module docstring for the contract; the constructor's
    arguments are :class:`~roombus.server.hub.HubBase`'s.
    """

    framed = True

    # -- outputs ----------------------------------------------------------------------

    def take_dirty(self) -> list[tuple[ConnectionId, SendQueue]]:
        """Connections with new bytes to write since the last call."""
        if not self._dirty:
            return []
        dirty, self._dirty = self._dirty, {}
        self._sample_depths(dirty)
        return cast("list[tuple[ConnectionId, SendQueue]]", list(dirty.items()))

    # -- inputs -----------------------------------------------------------------------

    def open(self, *, now: float, peer: str = "", api: bool = False) -> ConnectionId:
        """
        A new transport connection; it has the handshake timeout to send its request
        (a ``POST``'s body included). *api*: accepted on the API's own listener
        (``api_port``), which serves ``/api/...``, ``/metrics`` and ``/healthz`` only.
        """
        cid = ConnectionId(next(self._ids))
        broker_config = self.broker.config
        wire = ServerWire(
            max_header_bytes=self.config.max_header_bytes,
            max_message_bytes=broker_config.max_message_bytes,
            max_events=INPUT_BATCH,
            max_body_bytes=MAX_BODY_BYTES,
        )
        queue = SendQueue(
            broker_config.send_queue, broker_config.send_queue_bytes, budget=self.budget
        )
        conn = _Conn(cid, peer, wire, queue, now)
        conn.api_only = api
        if not api:  # the API's own listener is not the balancer's: no PROXY header there
            self._behind_proxy(conn)
        if self.api_enabled(api_listener=api):
            keys = self.config.api_keys

            def wants_body(target: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
                # Only an API call with a valid key has its body read: any other POST
                # is answered (405, 401, 404) from its head, holding nothing.
                path = target.partition(b"?")[0]
                return path.startswith(b"/api/") and authenticate(headers, keys) is not None

            wire.wants_body = wants_body
        refusal = self._add(conn)
        if self.shutting_down:
            self._drop(conn)
            return cid
        if refusal is not None:
            conn.refusal = refusal
            if self.admission.far_over(conn.ip, len(self._conns)):
                # Far over a limit: not even an answer (descriptors are what is scarce).
                self._refused(conn.peer, refusal, limit=True, cid=cid)
                self._drop(conn)
                return cid
        self._set_deadline(conn, now + self.config.handshake_timeout)
        return cid

    def receive(self, cid: ConnectionId, data: bytes | None, *, now: float, timestamp: int) -> None:
        """Bytes from *cid*'s peer; None at end of stream."""
        conn = self._conns.get(cid)
        if conn is None:
            return
        phase = conn.phase
        if phase is _Phase.OPEN:
            self._receive_frames(conn, data, now, timestamp)
        elif phase is _Phase.HANDSHAKE:
            if conn.api_waiting:
                return  # the answer to its API request comes (the rest is not read)
            if conn.proxy is None:
                self._receive_request(conn, data, now, timestamp)
            else:
                self._receive_proxy_header(conn, data, now, timestamp)
        elif phase is _Phase.CLOSING:
            # Only the peer's answer to our close matters now.
            wire = conn.wire
            assert wire is not None
            for event in wire.receive_data(data):
                if type(event) is Closed:
                    self._finish(conn, event.data, now, drop_pending=False)
                    break
        # FINISHING: input no longer matters; the last bytes go out (a half-closed peer
        # can still read them) or the close timeout drops the transport.

    def input_pending(self, cid: ConnectionId) -> bool:
        """
        Whether *cid*'s last input is not all read yet (a framed hub reads at most
        :data:`INPUT_BATCH` frames per call). Then write the dirty queues, and call
        ``receive(cid, b"", ...)`` for the next batch, before reading from the
        transport again.
        """
        conn = self._conns.get(cid)
        return (
            conn is not None
            and conn.wire is not None
            and conn.wire.more
            and (conn.phase is _Phase.OPEN or conn.phase is _Phase.CLOSING)
        )

    # -- phases -----------------------------------------------------------------------

    def _receive_proxy_header(
        self, conn: _Conn, data: bytes | None, now: float, timestamp: int
    ) -> None:
        """The first bytes with ``proxy_protocol``: the PROXY header, then the request."""
        buf = conn.proxy
        assert buf is not None
        if data is None:  # the peer went away before its header
            self._drop(conn)
            return
        buf += data
        try:
            header = parse_proxy_header(
                buf, limit=max(self.config.max_header_bytes, PROXY_HEADER_MIN)
            )
        except ProxyHeaderError as exc:
            self.proxy_header_errors += 1
            log.info(
                "%s sent no valid PROXY protocol header, closed: %s",
                conn.peer,
                exc,
                extra=conn.fields(reason=str(exc)),
            )
            self._drop(conn)
            return
        if header is None:
            return
        conn.proxy = None
        label = conn.peer
        if header.source is not None:  # else LOCAL or UNKNOWN: the socket's own address
            conn.hop = normalize_ip(header.source[0])
            label = client_label(conn.hop, header.source[1])
        trusted = self.config.forwarded_allow_ips
        if trusted and trusted.trusts(conn.hop):
            conn.forwarded = True
            conn.peer = label
        elif not self._resolved(conn, conn.hop, label):
            return
        if header.rest:
            self._receive_request(conn, header.rest, now, timestamp)

    def _receive_request(self, conn: _Conn, data: bytes | None, now: float, timestamp: int) -> None:
        config = self.config
        wire = conn.wire
        assert wire is not None
        for event in wire.receive_data(data):
            if type(event) is RequestReceived:
                if conn.forwarded:
                    conn.forwarded = False
                    client = forwarded_client(conn.hop, event.headers, config.forwarded_allow_ips)
                    label = conn.peer if client == conn.hop else client_label(client)
                    if not self._resolved(conn, client, label):
                        return
                refusal = conn.refusal
                if refusal is not None and not self.admission.spared(
                    conn.cid, event.method, event.target
                ):
                    self._refused(conn.peer, refusal, limit=True, cid=conn.cid)
                    self._respond(conn, refusal, now, head=event.method == b"HEAD")
                    return
                path = event.target.partition(b"?")[0]
                if path in (b"/metrics", b"/healthz"):
                    self._probing(conn)  # no transport connection for the gauge
                if config.metrics and event.method in (b"GET", b"HEAD") and path == b"/metrics":
                    self._respond(conn, self.metrics_response(), now, head=event.method == b"HEAD")
                    return
                is_api = path == b"/api" or path.startswith(b"/api/")
                if is_api and self.api_enabled(api_listener=conn.api_only):
                    response = self.api_response(
                        event.method,
                        path,
                        event.headers,
                        event.body,
                        now=now,
                        timestamp=timestamp,
                    )
                    if isinstance(response, Pending):
                        self._await_api(conn, response, now)
                        return
                    self._respond(conn, response, now, head=event.method == b"HEAD")
                    return
                if conn.api_only and path != b"/healthz":
                    self._respond(conn, _NOT_HERE, now, head=event.method == b"HEAD")
                    return
                decision = route_request(
                    event.method,
                    event.target,
                    event.headers,
                    allowed_origins=config.allowed_origins,
                    page=config.page,
                    script=config.script,
                    authenticator=self.authenticator,
                    now=timestamp,
                    draining=self.draining,
                )
                if isinstance(decision, Upgrade):
                    decision = self._admit(decision)
                if isinstance(decision, Upgrade):
                    self._upgrade(conn, decision, now, timestamp)
                    return
                self._refused(conn.peer, decision, cid=conn.cid)
                self._respond(conn, decision, now, head=event.method == b"HEAD")
            elif type(event) is Reply:  # 100 Continue: the body may come
                queue = cast("SendQueue", conn.queue)
                queue.push_control(event.data)
                queue.data()  # handed out: never dropped
                self._dirty[conn.cid] = queue
                continue
            elif type(event) is BadRequest:
                status = event.response.status
                log.info(
                    "%s sent a bad request: %d", conn.peer, status, extra=conn.fields(status=status)
                )
                self.http_refusals.add(status)
                self._respond(conn, event.response, now, head=False)
            else:  # the peer went away mid-request
                self._drop(conn)
            return

    def _await_api(self, conn: _Conn, response: Pending[HttpResponse], now: float) -> None:
        """Hold *conn* until its API answer comes (the operations' timeout bounds it;
        the connection's own deadline is pushed past that)."""
        conn.api_waiting = True
        if conn.deadline is not None:
            self._set_deadline(
                conn, max(conn.deadline, now + self.operations.timeout + self.config.close_timeout)
            )
        cid = conn.cid

        def answer(outcome: HttpResponse | ApiError, now: float, timestamp: int) -> None:
            conn = self._conns.get(cid)
            if conn is None or conn.phase is not _Phase.HANDSHAKE:
                return  # gone meanwhile
            conn.api_waiting = False
            if isinstance(outcome, ApiError):  # (handle_api's never fails)
                outcome = error_response(outcome)
            self._respond(conn, outcome, now, head=False)

        response.then(answer)

    def _respond(self, conn: _Conn, response: HttpResponse, now: float, *, head: bool) -> None:
        wire = conn.wire
        assert wire is not None
        self._finish(conn, wire.respond(response, head=head), now, drop_pending=True)

    def _upgrade(self, conn: _Conn, upgrade: Upgrade, now: float, timestamp: int) -> None:
        queue = conn.queue
        wire = conn.wire
        assert isinstance(queue, SendQueue) and wire is not None
        queue.push_control(wire.accept(upgrade))
        # Hand the 101 out as the first chunk now: a chunk handed out is never dropped,
        # so the response goes out even if bytes that came with the request close us.
        queue.data()
        self._dirty[conn.cid] = queue
        self._set_phase(conn, _Step.UPGRADE)
        self.handshake_duration.observe(now - conn.opened)
        conn.deadline = None
        self._connect(conn, upgrade, now, timestamp)
        if conn.phase is _Phase.OPEN:
            self._receive_frames(conn, b"", now, timestamp)  # bytes sent with the request

    def _receive_frames(self, conn: _Conn, data: bytes | None, now: float, timestamp: int) -> None:
        broker = self.broker
        cid = conn.cid
        wire = conn.wire
        assert wire is not None
        for event in wire.receive_data(data):
            kind = type(event)
            if kind is MessageReceived:
                self._apply(
                    broker.handle_text(
                        cid,
                        event.text,  # type: ignore[union-attr]
                        now=now,
                        timestamp=timestamp,
                    ),
                    now,
                    timestamp,
                )
                if conn.phase is not _Phase.OPEN:
                    return  # closed by the broker (a flooder): ignore the rest
            elif kind is PongFrameReceived:
                actions = broker.handle(PongReceived(conn=cid), now=now, timestamp=timestamp)
                self.deadline_moved = True
                if actions:  # an unsolicited pong too many: closed as a flooder
                    self._apply(actions, now, timestamp)
                    return
            elif kind is Reply or kind is FragmentReceived:
                # Control frames and fragments cost rate like messages do.
                allowed, actions = broker.charge(cid, now=now, timestamp=timestamp)
                if actions:  # closed as a flooder
                    self._apply(actions, now, timestamp)
                    return
                if allowed and kind is Reply:
                    # Only the latest ping needs its pong: a ping flood cannot grow the queue.
                    queue = cast("SendQueue", conn.queue)
                    queue.push_pong(event.data)  # type: ignore[union-attr]
                    self._dirty[cid] = queue
            elif kind is Closed:
                # The peer closed (we answer), or broke the protocol (we refuse): what
                # is queued for it (its own echoes) goes out first, then the close.
                code = event.code  # type: ignore[union-attr]
                by_peer = event.by_peer  # type: ignore[union-attr]
                self._closed(code, "client" if by_peer else "server")
                if not by_peer:
                    log.info(
                        "closing conn %d (%s): %d (refused its input)",
                        cid,
                        conn.peer,
                        code,
                        extra=conn.fields(code=code, reason="refused its input"),
                    )
                else:
                    _log_client_close(conn, code)
                self._forget(conn, now, timestamp)
                self._finish(conn, event.data, now, drop_pending=False)  # type: ignore[union-attr]
                return

    def _close(
        self, conn: _Conn, code: int, reason: str, now: float, *, drop_pending: bool
    ) -> None:
        """Start closing an OPEN connection from our side."""
        queue = conn.queue
        wire = conn.wire
        assert wire is not None
        self._closed(code, "server")
        frame = wire.close(code, reason)
        if frame:
            queue.close_with(frame, drop_pending=drop_pending)  # type: ignore[arg-type]
            self._dirty[conn.cid] = queue
        self._set_phase(conn, _Step.CLOSE)
        self._set_deadline(conn, now + self.config.close_timeout)

    def _finish(self, conn: _Conn, data: bytes, now: float, *, drop_pending: bool) -> None:
        """Queue the last bytes; the transport closes once they are written."""
        self._set_phase(conn, _Step.FINISH)
        if data:
            cast("SendQueue", conn.queue).close_with(data, drop_pending=drop_pending)
        if conn.queue:
            self._dirty[conn.cid] = conn.queue
            self._set_deadline(conn, now + self.config.close_timeout)
        else:
            self._drop(conn)
