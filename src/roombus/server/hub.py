"""
The hub: every connection's wire, send queue and lifecycle around one broker. Sans-IO.

An adapter (trio, asyncio, your own) owns the sockets and the clock; the hub owns
everything else. The contract, in full:

* A new transport connection: ``cid = hub.open(now=..., peer=...)``.
* Bytes from it: ``hub.receive(cid, data, now=..., timestamp=...)``; ``None`` at end
  of stream.
* After **every** hub call, carry out its outputs:

  - :meth:`Hub.take_dirty` lists connections with bytes to write: write
    ``queue.data()`` as far as the transport takes it, report it with
    ``queue.consume(n)``, and once a queue is empty call :meth:`Hub.flushed`.
  - :meth:`Hub.take_to_close` lists connections whose transport must be closed now
    (whatever is still queued). Then call :meth:`Hub.lost`.
  - :meth:`Hub.next_deadline` is when to call :meth:`Hub.timeout` next.
  - :meth:`Hub.input_pending`: the hub read only part of what came (a burst); write
    the dirty queues (let the flusher run), then ``hub.receive(cid, b"", ...)`` for
    the next part, and read no more from that transport until it is False.

* A transport that breaks or ends: :meth:`Hub.lost` (idempotent).
* Shutdown: :meth:`Hub.shutdown`; done when :attr:`Hub.connection_count` is zero.

A transport that already speaks WebSocket *messages* (an ASGI server: it parses the
handshake, frames, pings and the close handshake itself) drives a hub made with
``framed=False`` instead, through two other inputs and one other output:

* An upgrade request: ``hub.open_websocket(target, headers, now=..., ...)`` returns
  the :class:`~roombus.server.handshake.HttpResponse` to refuse it with, or the id of an
  open connection: accept the WebSocket, then send its queue.
* A whole message from it: :meth:`Hub.receive_message` (``str`` for text, ``bytes``
  for binary). Its end: :meth:`Hub.lost`.
* :meth:`Hub.take_dirty_messages` (not ``take_dirty``) lists connections with
  messages to send: a :class:`~roombus.server.queues.MessageQueue` of UTF-8 payloads and,
  last, a :class:`~roombus.server.queues.CloseMessage`. Report each one sent with
  ``queue.consume(1)``, and call :meth:`Hub.flushed` once the queue is empty.

Such a hub has no heartbeat (the server pings; ``BrokerConfig.heartbeat`` must be
off) and no HANDSHAKE or FINISHING phase: a connection starts OPEN, and once its
close is queued it is CLOSING until the server reports the peer gone (:meth:`Hub.lost`,
on the peer's answer) or the close timeout drops it.

Connection lifecycle (``_Phase``; every move is a row of :data:`PHASES`):

=========== ============================================ ==========================
phase        what happens                                 ends
=========== ============================================ ==========================
HANDSHAKE    the HTTP request arrives                     upgrade -> OPEN; plain
                                                          answer -> FINISHING;
                                                          handshake timeout -> gone
OPEN         frames in, broker actions out                we close -> CLOSING; the
                                                          peer closes or breaks the
                                                          protocol -> FINISHING
CLOSING      our close frame is queued; wait for the      peer's close -> FINISHING;
             peer's answer                                close timeout -> gone
FINISHING    last bytes queued (an HTTP answer, a close   queue empty or close
             frame); then the transport is closed         timeout -> gone
=========== ============================================ ==========================

The broker forgets a connection as soon as it leaves OPEN, so the rest of its rooms
learn of the departure at once, not after the close handshake.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import itertools
import logging
from collections.abc import Callable
from typing import Final, cast

from ..core.actions import (
    Action,
    BackplaneAction,
    Close,
    Deliver,
    MessagePublished,
    Notice,
    SendPing,
    UserJoined,
    UserLeft,
)
from ..core.auth import Authorizer, ClaimsAuthorizer
from ..core.broker import Broker
from ..core.config import BrokerConfig
from ..core.errors import ConfigError, LocalProtocolError
from ..core.events import ClientConnected, ClientDisconnected, Event, PongReceived, TextReceived
from ..core.names import ConnectionId
from ..core.registry import worth_shrinking
from .admission import Admission
from .auth import Authenticator
from .config import ServerConfig
from .handshake import Upgrade, route_request, route_websocket
from .http import HttpResponse
from .metrics import collect, render_prometheus
from .queues import ByteBudget, CloseMessage, MessageQueue, QueueState, SendQueue
from .typing import Headers
from .wire import (
    GOING_AWAY,
    MESSAGE_TOO_BIG,
    PING_FRAME,
    POLICY_VIOLATION,
    UNSUPPORTED_DATA,
    BadRequest,
    Closed,
    FragmentReceived,
    MessageReceived,
    PongFrameReceived,
    Reply,
    RequestReceived,
    ServerWire,
    text_frame,
)

log: Final = logging.getLogger("roombus")

NoticeHook = Callable[[Notice], None]

#: Most frames the hub reads from one connection's input per call before it returns,
#: so that the adapter writes what they produced before the rest is read: a burst of
#: messages in one TCP write then reaches each receiver's send queue this many at a
#: time, between flushes, and a receiver that keeps up never has more than a few
#: batches queued (far below ``send_queue``). The rest waits, unparsed, in the wire;
#: :meth:`Hub.input_pending` says so.
INPUT_BATCH: Final = 64


class _Phase(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    FINISHING = "finishing"
    DROPPED = "dropped"  # the adapter must close the transport; input is ignored


class _Step(enum.Enum):
    """What moves a connection from one phase to the next (see :data:`PHASES`)."""

    UPGRADE = "upgrade"  # the handshake succeeded (a message connection: accepted)
    CLOSE = "close"  # we queued a close frame; the peer's answer is awaited
    FINISH = "finish"  # the last bytes are queued (an HTTP answer, the close's answer)
    DROP = "drop"  # the transport must close now (a timeout, a peer gone, all written)


#: Every move a connection may make: ``(phase, step) -> next phase``, applied by
#: ``Hub._set_phase`` only. Anything else is a bug in the hub, and raises.
#: ``docs/design.md`` ("Connection phases") carries this table, tested.
PHASES: Final[dict[tuple[_Phase, _Step], _Phase]] = {
    (_Phase.HANDSHAKE, _Step.UPGRADE): _Phase.OPEN,
    (_Phase.HANDSHAKE, _Step.FINISH): _Phase.FINISHING,
    (_Phase.HANDSHAKE, _Step.DROP): _Phase.DROPPED,
    (_Phase.OPEN, _Step.CLOSE): _Phase.CLOSING,
    (_Phase.OPEN, _Step.FINISH): _Phase.FINISHING,
    (_Phase.CLOSING, _Step.FINISH): _Phase.FINISHING,
    (_Phase.CLOSING, _Step.DROP): _Phase.DROPPED,
    (_Phase.FINISHING, _Step.DROP): _Phase.DROPPED,
}


def _set_phase(conn: _Conn, step: _Step) -> None:
    """Move *conn* on by *step*, as :data:`PHASES` allows."""
    try:
        conn.phase = PHASES[conn.phase, step]
    except KeyError:
        raise LocalProtocolError(
            f"conn {conn.cid}: no move from {conn.phase.name} by {step.name}"
        ) from None


class _Conn:
    __slots__ = ("cid", "deadline", "ip", "peer", "phase", "queue", "refusal", "wire")

    def __init__(
        self,
        cid: ConnectionId,
        peer: str,
        wire: ServerWire | None,  # None: the transport frames messages itself
        queue: SendQueue | MessageQueue,
    ) -> None:
        self.cid = cid
        self.peer = peer
        # None when the transport knows no address (a Unix socket, a stream handed
        # in): such connections are not counted against one address's limit.
        self.ip = peer_address(peer)
        self.wire = wire
        self.queue = queue
        self.phase = _Phase.HANDSHAKE
        self.deadline: float | None = None  # when the transport is dropped regardless
        # The answer to its request, decided before it arrived (a connection limit).
        self.refusal: HttpResponse | None = None


def peer_address(peer: str) -> str | None:
    """
    The client address in a peer label such as ``"203.0.113.9:51234"`` or
    ``"::1:80"``; None if the label holds no IP address.
    """
    host, sep, _ = peer.rpartition(":")
    try:
        return str(ipaddress.ip_address(host.strip("[]") if sep else peer))
    except ValueError:
        return None


class Hub:
    """
    Connections, their wires and send queues, and the broker: a server minus the I/O.

    Args:
        broker_config: The core's limits and intervals.
        config: Transport-level settings (timeouts, origins, page, header limit).
        on_notice: Called with every notice (a user joined or left, a message was
            published), synchronously; an exception it raises is logged and ignored.
        framed: True for a transport of bytes (the hub parses HTTP and frames); False
            for one that speaks WebSocket messages itself (an ASGI server). See the
            module docstring for each contract.
        authenticator: Decides who a client is from its request (401/403 before the
            upgrade otherwise); without one, the query's ``username`` is taken as is.
        authorizer: Decides per room who may join, publish and see presence. With an
            authenticator and no authorizer, the identity's room rules (the token's
            ``rooms`` claim) decide.
        node: This node's id in a cluster: the broker then asks for backplane work
            (:meth:`take_backplane`) and takes backplane events
            (:meth:`backplane_event`). None: a broker on its own.

    Raises:
        ConfigError: if *framed* is False and the broker's heartbeat is on: such a
            transport never reports pongs.
    """

    def __init__(
        self,
        broker_config: BrokerConfig | None = None,
        config: ServerConfig | None = None,
        *,
        on_notice: NoticeHook | None = None,
        framed: bool = True,
        authenticator: Authenticator | None = None,
        authorizer: Authorizer | None = None,
        node: str | None = None,
    ) -> None:
        if not framed and (broker_config is None or broker_config.heartbeat):
            raise ConfigError(
                "heartbeat",
                "must be off for a transport that owns pings (framed=False): "
                "use the server's own ping setting",
            )
        self.framed = framed
        if authorizer is None and authenticator is not None:
            authorizer = ClaimsAuthorizer()
        self.authenticator = authenticator
        self.broker = Broker(broker_config, authorizer=authorizer, node=node)
        self._backplane: list[BackplaneAction] = []
        self.config = config if config is not None else ServerConfig()
        #: The connection limits: per-address and total counts, the probe budget.
        self.admission = Admission(self.config)
        #: Further gauges and counters for ``GET /metrics`` (an adapter's backplane).
        self.extra_metrics: Callable[[], dict[str, float]] | None = None
        self.on_notice = on_notice
        self.shutting_down = False
        #: Slow consumers closed since the start (the budget's included).
        self.overflows = 0
        #: Of those, the ones closed because all queues together held too much.
        self.budget_closes = 0
        #: Bytes waiting in every send queue together, against ``max_queued_bytes``.
        self.budget = ByteBudget(self.config.max_queued_bytes)
        self._conns: dict[ConnectionId, _Conn] = {}
        self._peak = 0  # most connections since the table was last copied
        self._ids = itertools.count(1)
        self._dirty: dict[ConnectionId, SendQueue | MessageQueue] = {}
        self._to_close: list[ConnectionId] = []
        self._overflowed: list[_Conn] = []  # slow consumers still to close
        self._handling_overflow = False
        # (deadline, cid): an entry is live while it equals the connection's deadline.
        self._deadlines: list[tuple[float, ConnectionId]] = []
        #: Set when :meth:`next_deadline` may have moved earlier; an adapter may clear it
        #: after re-reading the deadline, to skip that work after most calls.
        self.deadline_moved = False

    # -- introspection ----------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        """Transport connections the hub still tracks, handshakes included."""
        return len(self._conns)

    @property
    def websocket_count(self) -> int:
        """Connections that completed the upgrade and are open."""
        return self.broker.statistics().connections

    def queue(self, cid: ConnectionId) -> SendQueue | MessageQueue | None:
        """The send queue of *cid*, or None if the hub no longer knows it."""
        conn = self._conns.get(cid)
        return conn.queue if conn is not None else None

    # -- outputs ----------------------------------------------------------------------

    def take_dirty(self) -> list[tuple[ConnectionId, SendQueue]]:
        """Connections with new bytes to write since the last call (a framed hub)."""
        if not self._dirty:
            return []
        dirty, self._dirty = self._dirty, {}
        return cast("list[tuple[ConnectionId, SendQueue]]", list(dirty.items()))

    def take_dirty_messages(self) -> list[tuple[ConnectionId, MessageQueue]]:
        """Connections with new messages to send since the last call (``framed=False``)."""
        if not self._dirty:
            return []
        dirty, self._dirty = self._dirty, {}
        return cast("list[tuple[ConnectionId, MessageQueue]]", list(dirty.items()))

    @property
    def limit_refusals(self) -> int:
        """Requests refused because of a connection limit since the start."""
        return self.admission.refusals

    def metrics(self) -> dict[str, float]:
        """Gauges and counters, by Prometheus name (what ``GET /metrics`` shows)."""
        return collect(self)

    def metrics_response(self) -> HttpResponse:
        """``GET /metrics``: :meth:`metrics` in the Prometheus text format."""
        return render_prometheus(collect(self))

    def take_backplane(self) -> list[BackplaneAction]:
        """Backplane work the broker asked for since the last call, in order."""
        if not self._backplane:
            return []
        work, self._backplane = self._backplane, []
        return work

    def has_dirty(self) -> bool:
        """Whether :meth:`take_dirty` has anything."""
        return bool(self._dirty)

    def take_to_close(self) -> list[ConnectionId]:
        """Connections whose transport must be closed now."""
        if not self._to_close:
            return []
        to_close, self._to_close = self._to_close, []
        return to_close

    def next_deadline(self) -> float | None:
        """When :meth:`timeout` next has work: a heartbeat, or a handshake or close timeout."""
        deadlines = self._deadlines
        conns = self._conns
        while deadlines:
            at, cid = deadlines[0]
            conn = conns.get(cid)
            if conn is not None and conn.deadline == at:
                break
            heapq.heappop(deadlines)
        own = deadlines[0][0] if deadlines else None
        beat = self.broker.next_deadline()
        if own is None:
            return beat
        return own if beat is None else min(own, beat)

    # -- inputs -----------------------------------------------------------------------

    def open(self, *, now: float, peer: str = "") -> ConnectionId:
        """
        A new transport connection; it has the handshake timeout to send its request.

        Raises:
            LocalProtocolError: in a hub made with ``framed=False``.
        """
        if not self.framed:
            raise LocalProtocolError("a hub with framed=False opens with open_websocket()")
        cid = ConnectionId(next(self._ids))
        broker_config = self.broker.config
        wire = ServerWire(
            max_header_bytes=self.config.max_header_bytes,
            max_message_bytes=broker_config.max_message_bytes,
            max_events=INPUT_BATCH,
        )
        queue = SendQueue(
            broker_config.send_queue, broker_config.send_queue_bytes, budget=self.budget
        )
        conn = _Conn(cid, peer, wire, queue)
        refusal = self._add(conn)
        if self.shutting_down:
            self._drop(conn)
            return cid
        if refusal is not None:
            conn.refusal = refusal
            if self.admission.far_over(conn.ip, len(self._conns)):
                # Far over a limit: not even an answer (descriptors are what is scarce).
                self.admission.refused(conn.peer, refusal)
                self._drop(conn)
                return cid
        self._set_deadline(conn, now + self.config.handshake_timeout)
        return cid

    def _add(self, conn: _Conn) -> HttpResponse | None:
        """Track *conn*; the answer for it if it is over a connection limit."""
        conns = self._conns
        conns[conn.cid] = conn
        if len(conns) > self._peak:
            self._peak = len(conns)
        return self.admission.add(conn.ip, len(conns))

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
            400 for a bad room or username, 404 for another path, 503 during shutdown),
            or the id of the new, open connection: accept the WebSocket, then send
            its queue (its presence messages are already in it).

        Raises:
            LocalProtocolError: in a framed hub.
        """
        if self.framed:
            raise LocalProtocolError("a framed hub opens with open() and receive()")
        if self.shutting_down:
            return HttpResponse(status=503, body=b"server shutting down\n")
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
            _log_refusal(peer, decision)
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
        )
        refusal = self._add(conn)
        if refusal is not None:
            self.admission.refused(peer, refusal)
            self.lost(cid, now=now, timestamp=timestamp)
            return refusal
        _set_phase(conn, _Step.UPGRADE)
        self._connect(conn, decision, now, timestamp)
        return cid

    def _admit(self, upgrade: Upgrade) -> Upgrade | HttpResponse:
        """The room's checks (authorization, size) before a WebSocket opens."""
        reason = self.broker.refusal(upgrade.room, upgrade.username, upgrade.identity)
        if reason is not None:
            return HttpResponse(status=403, body=reason.encode() + b"\n")
        return upgrade

    def receive_message(
        self, cid: ConnectionId, message: str | bytes, *, now: float, timestamp: int
    ) -> None:
        """
        A whole message from *cid*'s peer (``framed=False``): ``str`` for a text
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
            self.broker.handle(TextReceived(conn=cid, text=message), now=now, timestamp=timestamp),
            now,
            timestamp,
        )

    def receive(self, cid: ConnectionId, data: bytes | None, *, now: float, timestamp: int) -> None:
        """Bytes from *cid*'s peer; None at end of stream (a framed hub)."""
        conn = self._conns.get(cid)
        if conn is None:
            return
        phase = conn.phase
        if phase is _Phase.OPEN:
            self._receive_frames(conn, data, now, timestamp)
        elif phase is _Phase.HANDSHAKE:
            self._receive_request(conn, data, now, timestamp)
        elif phase is _Phase.CLOSING:
            # Only the peer's answer to our close matters now.
            wire = conn.wire
            assert wire is not None  # message connections are never CLOSING
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

    def lost(self, cid: ConnectionId, *, now: float, timestamp: int) -> None:
        """*cid*'s transport is closed or broken; forget it (no-op if unknown)."""
        conns = self._conns
        conn = conns.pop(cid, None)
        if conn is None:
            return
        if worth_shrinking(len(conns), self._peak):
            # Many connections left: copy the table smaller (a dict never shrinks by
            # deletions), and drop the deadlines they left behind.
            self._conns = dict(conns)
            self._peak = len(conns)
            self._deadlines = [(c.deadline, k) for k, c in conns.items() if c.deadline is not None]
            heapq.heapify(self._deadlines)
        self.admission.remove(cid, conn.ip)
        self._dirty.pop(cid, None)
        conn.queue.detach()
        self._forget(conn, now, timestamp)

    def enforce_budget(self, *, now: float, timestamp: int) -> None:
        """
        Call after writing the dirty queues: if they still hold more than
        ``max_queued_bytes`` together, close the connections with the most bytes
        waiting (the slowest readers) with 1008, until 7/8 of it is left. Checked after
        writes, not as frames are queued: a broadcast counts against every receiver
        until the kernel takes it, and readers that keep up are not the problem.
        """
        budget = self.budget
        if not budget.limit or budget.used <= budget.limit:
            return
        target = budget.limit - budget.limit // 8
        used = budget.used
        victims = sorted(
            (c for c in self._conns.values() if c.phase is _Phase.OPEN and c.queue),
            key=lambda c: _queued(c.queue),
            reverse=True,
        )
        for conn in victims:
            if used <= target:
                break
            used -= _queued(conn.queue)
            self._overflowed.append(conn)
        log.warning(
            "send queues hold %d bytes together, over max-queued-bytes (%d): closing the "
            "%d slowest readers",
            budget.used,
            budget.limit,
            len(self._overflowed),
        )
        self._apply([], now, timestamp)

    def flushed(self, cid: ConnectionId) -> None:
        """*cid*'s queue was written out completely."""
        conn = self._conns.get(cid)
        if conn is not None and conn.phase is _Phase.FINISHING and not conn.queue:
            self._drop(conn)

    def timeout(self, *, now: float, timestamp: int) -> None:
        """Let time pass up to *now*: heartbeats, handshake and close timeouts."""
        self._apply(self.broker.handle_timeout(now=now, timestamp=timestamp), now, timestamp)
        deadlines = self._deadlines
        conns = self._conns
        while deadlines and deadlines[0][0] <= now:
            at, cid = heapq.heappop(deadlines)
            conn = conns.get(cid)
            if conn is None or conn.deadline != at:
                continue
            if conn.phase is _Phase.HANDSHAKE:
                log.info("%s did not complete its handshake in time", conn.peer)
            self._drop(conn)

    def backplane_event(self, event: Event, *, now: float, timestamp: int) -> None:
        """A backplane event (a record, a room's snapshot, the link lost or back)."""
        self._apply(self.broker.handle(event, now=now, timestamp=timestamp), now, timestamp)

    def publish(
        self, room: str, content: object, *, username: str, now: float, timestamp: int
    ) -> int:
        """
        Publish a chat message from server-side code; returns how many receivers.

        Raises:
            ValueError: if the room or username is invalid or content is not JSON.
        """
        actions = self.broker.publish(room, content, username=username, timestamp=timestamp)
        self._apply(actions, now, timestamp)
        return sum(len(a.conns) for a in actions if type(a) is Deliver)

    def shutdown(self, *, now: float, timestamp: int) -> None:
        """Close every connection (1001 for clients; handshakes are dropped)."""
        self.shutting_down = True
        for conn in list(self._conns.values()):
            if conn.phase is _Phase.HANDSHAKE:
                self._drop(conn)
            elif conn.phase is _Phase.OPEN:
                self._close(conn, GOING_AWAY, "server shutting down", now, drop_pending=False)
        # Only then tell the broker: every queue is closing, so nobody gets a leave
        # between their last message and the close.
        for conn in list(self._conns.values()):
            self._forget(conn, now, timestamp)

    # -- phases -----------------------------------------------------------------------

    def _receive_request(self, conn: _Conn, data: bytes | None, now: float, timestamp: int) -> None:
        config = self.config
        wire = conn.wire
        assert wire is not None  # message connections start OPEN
        for event in wire.receive_data(data):
            if type(event) is RequestReceived:
                refusal = conn.refusal
                if refusal is not None and not self.admission.spared(
                    conn.cid, event.method, event.target
                ):
                    self.admission.refused(conn.peer, refusal)
                    self._respond(conn, refusal, now, head=event.method == b"HEAD")
                    return
                if (
                    config.metrics
                    and event.method in (b"GET", b"HEAD")
                    and event.target.partition(b"?")[0] == b"/metrics"
                ):
                    self._respond(conn, self.metrics_response(), now, head=event.method == b"HEAD")
                    return
                decision = route_request(
                    event.method,
                    event.target,
                    event.headers,
                    allowed_origins=config.allowed_origins,
                    page=config.page,
                    authenticator=self.authenticator,
                    now=timestamp,
                )
                if isinstance(decision, Upgrade):
                    decision = self._admit(decision)
                if isinstance(decision, Upgrade):
                    self._upgrade(conn, decision, now, timestamp)
                    return
                _log_refusal(conn.peer, decision)
                self._respond(conn, decision, now, head=event.method == b"HEAD")
            elif type(event) is BadRequest:
                log.info("%s sent a bad request: %d", conn.peer, event.response.status)
                self._respond(conn, event.response, now, head=False)
            else:  # the peer went away mid-request
                self._drop(conn)
            return

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
        _set_phase(conn, _Step.UPGRADE)
        conn.deadline = None
        self._connect(conn, upgrade, now, timestamp)
        if conn.phase is _Phase.OPEN:
            self._receive_frames(conn, b"", now, timestamp)  # bytes sent with the request

    def _connect(self, conn: _Conn, upgrade: Upgrade, now: float, timestamp: int) -> None:
        """An OPEN connection joins the broker (and its room)."""
        cid = conn.cid
        self.deadline_moved = True  # its heartbeat starts
        log.debug(
            "%s connected as %r in %r (conn %d)", conn.peer, upgrade.username, upgrade.room, cid
        )
        identity = upgrade.identity
        expires = None
        if identity is not None and identity.expires_at is not None:
            # The credentials' wall-clock expiry (plus the clock skew the authenticator
            # allows, as it admitted them), on the driver's clock.
            leeway = getattr(self.authenticator, "leeway", 0.0)
            expires = now + max(0.0, identity.expires_at + leeway - timestamp)
        self._apply(
            self.broker.handle(
                ClientConnected(
                    conn=cid,
                    username=upgrade.username,
                    room=upgrade.room,
                    identity=identity,
                    expires=expires,
                ),
                now=now,
                timestamp=timestamp,
            ),
            now,
            timestamp,
        )

    def _refuse(self, conn: _Conn, code: int, reason: str, now: float, timestamp: int) -> None:
        """Close an OPEN message connection for what its peer sent."""
        log.info("closing conn %d (%s): %d %s", conn.cid, conn.peer, code, reason)
        self._forget(conn, now, timestamp)
        self._close(conn, code, reason, now, drop_pending=False)

    def _receive_frames(self, conn: _Conn, data: bytes | None, now: float, timestamp: int) -> None:
        broker = self.broker
        cid = conn.cid
        wire = conn.wire
        if wire is None:
            raise LocalProtocolError("a hub with framed=False takes receive_message()")
        for event in wire.receive_data(data):
            kind = type(event)
            if kind is MessageReceived:
                self._apply(
                    broker.handle(
                        TextReceived(conn=cid, text=event.text),  # type: ignore[union-attr]
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
                self._forget(conn, now, timestamp)
                self._finish(conn, event.data, now, drop_pending=False)  # type: ignore[union-attr]
                return

    def _forget(self, conn: _Conn, now: float, timestamp: int) -> None:
        """Tell the broker *conn* is gone (it stops getting messages at once)."""
        if conn.cid in self.broker:
            self._apply(
                self.broker.handle(ClientDisconnected(conn=conn.cid), now=now, timestamp=timestamp),
                now,
                timestamp,
            )

    def _close(
        self, conn: _Conn, code: int, reason: str, now: float, *, drop_pending: bool
    ) -> None:
        """Start closing an OPEN connection from our side."""
        queue = conn.queue
        if isinstance(queue, MessageQueue):
            # The server frames the close and answers the peer's; the connection is
            # CLOSING until the server reports the peer gone (lost()), since some
            # servers end the TCP connection as soon as the app returns.
            queue.close_with(CloseMessage(code, reason[:120]), drop_pending=drop_pending)
            self._dirty[conn.cid] = queue
            _set_phase(conn, _Step.CLOSE)
            self._set_deadline(conn, now + self.config.close_timeout)
            return
        wire = conn.wire
        assert wire is not None
        frame = wire.close(code, reason)
        if frame:
            queue.close_with(frame, drop_pending=drop_pending)
            self._dirty[conn.cid] = queue
        _set_phase(conn, _Step.CLOSE)
        self._set_deadline(conn, now + self.config.close_timeout)

    def _finish(self, conn: _Conn, data: bytes, now: float, *, drop_pending: bool) -> None:
        """Queue the last bytes; the transport closes once they are written."""
        _set_phase(conn, _Step.FINISH)
        if data:
            cast("SendQueue", conn.queue).close_with(data, drop_pending=drop_pending)
        if conn.queue:
            self._dirty[conn.cid] = conn.queue
            self._set_deadline(conn, now + self.config.close_timeout)
        else:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        """The transport must close now; nothing it sends matters any more."""
        if conn.phase is not _Phase.DROPPED:
            _set_phase(conn, _Step.DROP)
            conn.deadline = None
            self._to_close.append(conn.cid)

    def _set_deadline(self, conn: _Conn, at: float) -> None:
        self.deadline_moved = True
        conn.deadline = at
        heapq.heappush(self._deadlines, (at, conn.cid))

    # -- carrying out the broker's actions --------------------------------------------

    def _apply(self, actions: list[Action], now: float, timestamp: int) -> None:
        conns = self._conns
        dirty = self._dirty
        overflowed = self._overflowed
        for action in actions:
            if isinstance(action, Deliver):
                # Framed once for every receiver; a message transport frames it itself.
                frame = text_frame(action.payload) if self.framed else action.payload
                for cid in action.conns:
                    conn = conns.get(cid)
                    if conn is None:
                        continue
                    queue = conn.queue
                    if queue.push(frame):
                        dirty[cid] = queue
                    elif queue.state is QueueState.OVERFLOWED and conn.phase is _Phase.OPEN:
                        overflowed.append(conn)
            elif isinstance(action, SendPing):
                conn = conns.get(action.conn)
                if conn is not None and cast("SendQueue", conn.queue).push_control(PING_FRAME):
                    dirty[conn.cid] = conn.queue
            elif isinstance(action, Close):
                conn = conns.get(action.conn)
                if conn is not None and conn.phase is _Phase.OPEN:
                    log.info(
                        "closing conn %d (%s): %d %s",
                        conn.cid,
                        conn.peer,
                        action.code,
                        action.reason,
                    )
                    # Not slow (rate limit, expired credentials, kick): what is queued
                    # (its echoes, the error explaining the close) goes out first.
                    self._close(conn, action.code, action.reason, now, drop_pending=False)
            elif isinstance(action, (UserJoined, UserLeft, MessagePublished)):
                if self.on_notice is not None:
                    try:
                        self.on_notice(action)
                    except Exception:
                        log.exception("on_notice hook failed for %r", action)
            else:
                self._backplane.append(action)
        if self._handling_overflow or not overflowed:
            return
        # Slow consumers are closed here, at the outermost call: telling the broker one
        # is gone sends leaves that may overflow others, which join the worklist rather
        # than recurse (a thousand slow clients in one room must not blow the stack).
        self._handling_overflow = True
        try:
            while overflowed:
                batch = overflowed[:]
                overflowed.clear()
                for conn in batch:
                    if conn.phase is not _Phase.OPEN:
                        continue
                    self.overflows += 1
                    if conn.queue.state is QueueState.OVERFLOWED:
                        log.warning(
                            "conn %d (%s) fell behind (send queue full); closing with 1008",
                            conn.cid,
                            conn.peer,
                        )
                        reason = "send queue full: reading too slowly"
                    else:  # chosen by enforce_budget()
                        self.budget_closes += 1
                        log.info("conn %d (%s) closed over max-queued-bytes", conn.cid, conn.peer)
                        reason = "server send queues full: reading too slowly"
                    self._close(conn, POLICY_VIOLATION, reason, now, drop_pending=True)
                    # What it still holds (a chunk in flight, the close) goes within the
                    # close timeout; it is no longer counted against everyone else.
                    conn.queue.detach()
                for conn in batch:
                    self._forget(conn, now, timestamp)
        finally:
            self._handling_overflow = False


def _queued(queue: SendQueue | MessageQueue) -> int:
    """Bytes waiting in *queue*, as its budget counts them."""
    return queue.nbytes if type(queue) is SendQueue else queue.data_bytes


def _log_refusal(peer: str, response: HttpResponse) -> None:
    if response.status >= 400:
        log.info(
            "%s refused with %d: %s",
            peer,
            response.status,
            response.body.decode(errors="replace").strip(),
        )
