"""
The hub: every connection's send queue and lifecycle around one broker. Sans-IO.

An adapter (trio, asyncio, ASGI, your own) owns the sockets and the clock; the hub
owns everything else. It comes in two kinds, split where the transport splits:

* :class:`~roombus.server.framed.FramedHub` for a transport of **bytes** (TCP, TLS):
  it parses the HTTP handshake and the WebSocket frames itself
  (``roombus.hub.Hub`` is this class);
* :class:`~roombus.server.messages.MessageHub` for a transport that already speaks
  WebSocket **messages** (an ASGI server: it parses the handshake, frames, pings and
  the close handshake itself).

Each module's docstring gives its inputs. What :class:`HubBase` gives both, in full:

* After **every** hub call, carry out its outputs:

  - the dirty queues (``take_dirty()`` of a FramedHub, ``take_dirty_messages()`` of a
    MessageHub): write them as far as the transport takes them, and once a queue is
    empty call :meth:`HubBase.flushed`. :meth:`HubBase.has_dirty` says whether there
    are any.
  - :meth:`HubBase.take_to_close` lists connections whose transport must be closed
    now (whatever is still queued). Then call :meth:`HubBase.lost`.
  - :meth:`HubBase.next_deadline` is when to call :meth:`HubBase.timeout` next.
  - :meth:`HubBase.take_backplane`: work for a cluster's backplane, if any.

* A transport that breaks or ends: :meth:`HubBase.lost` (idempotent).
* Also: :meth:`HubBase.enforce_budget` after writing, :meth:`HubBase.publish` from
  server-side code, :meth:`HubBase.backplane_event`, :meth:`HubBase.metrics`.
* Shutdown: :meth:`HubBase.shutdown`; done when :attr:`HubBase.connection_count` is
  zero. A graceful one spread over time: :meth:`HubBase.drain` first (``/healthz``
  answers 503, new WebSockets are refused, the open ones are closed with 1001 over
  ``drain_seconds``, at :meth:`HubBase.timeout`), then :meth:`HubBase.shutdown` once
  :attr:`HubBase.drain_done` or at :attr:`HubBase.drain_ends`.

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

A MessageHub's connections have no HANDSHAKE or FINISHING phase: one starts OPEN
once its server has checked the handshake, and once its close is queued it is
CLOSING until the server reports the peer gone (:meth:`HubBase.lost`) or the close
timeout drops it.

The broker forgets a connection as soon as it leaves OPEN, so the rest of its rooms
learn of the departure at once, not after the close handshake.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import random as _random
from collections.abc import Callable
from typing import ClassVar, Final, cast

from ..core.actions import (
    Action,
    BackplaneAction,
    Close,
    ClusterAnswered,
    Deliver,
    HistoryAnswered,
    MessagePublished,
    Notice,
    PublishAnswered,
    SendPing,
    UserJoined,
    UserLeft,
)
from ..core.auth import Authorizer
from ..core.broker import Broker
from ..core.config import BrokerConfig
from ..core.errors import ConfigError, LocalProtocolError
from ..core.events import ClientConnected, ClientDisconnected, Event
from ..core.names import ConnectionId
from ..core.stats import Counts, Histogram
from ..core.streams import Position, Publication
from ..core.tables import worth_shrinking
from .admission import Admission
from .api import TOO_LARGE, Pending, handle_api
from .auth import Authenticator, authorizer_for
from .config import ServerConfig
from .drain import DrainSchedule
from .handshake import Upgrade
from .http import HttpResponse
from .metrics import (
    DEPTH_BUCKETS,
    HANDSHAKE_BUCKETS,
    LATENCY_BUCKETS,
    collect,
    render_prometheus,
)
from .operations import HubOperations
from .peer import peer_address
from .queues import ByteBudget, MessageQueue, QueueState, SendQueue
from .redact import redact
from .typing import Headers
from .wire import (
    GOING_AWAY,
    PING_FRAME,
    POLICY_VIOLATION,
    ServerWire,
    text_frame,
)

log: Final = logging.getLogger("roombus")

#: The level of the lines a connection's ordinary life makes (connected, closed by
#: its client, lost): checked with ``log.isEnabledFor`` before their fields are made.
DEBUG: Final = logging.DEBUG

#: One in this many queue writes is observed by the fan-out path's histograms (the
#: publish-to-write latency, the send-queue depth): uniformly, the first one included.
SAMPLE_EVERY: Final = 8

NoticeHook = Callable[[Notice], None]


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
#: ``HubBase._set_phase`` only. Anything else is a bug in the hub, and raises.
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


class _Conn:
    __slots__ = (
        "api_only",
        "api_waiting",
        "cid",
        "deadline",
        "forwarded",
        "hop",
        "ip",
        "opened",
        "peer",
        "phase",
        "probe",
        "proxy",
        "queue",
        "refusal",
        "room",
        "since",
        "user",
        "wire",
    )

    def __init__(
        self,
        cid: ConnectionId,
        peer: str,
        wire: ServerWire | None,  # None: the transport frames messages itself
        queue: SendQueue | MessageQueue,
        opened: float,
    ) -> None:
        self.cid = cid
        self.opened = opened  # the driver's clock when the transport connection opened
        # When the oldest message not yet written out arrived (None: nothing waits).
        self.since: float | None = None
        self.peer = peer
        # None when the transport knows no address (a Unix socket, a stream handed
        # in): such connections are not counted against one address's limit.
        self.ip = peer_address(peer)
        # Behind a proxy: the address of the hop that connected (the socket's, then
        # a PROXY header's), while ``ip`` waits (None) for the client's to be known.
        self.hop = self.ip
        # The PROXY protocol header read so far, while it is awaited.
        self.proxy: bytearray | None = None
        # The request's forwarding headers name the client (the hop is trusted).
        self.forwarded = False
        self.wire = wire
        self.queue = queue
        self.phase = _Phase.HANDSHAKE
        self.deadline: float | None = None  # when the transport is dropped regardless
        # The answer to its request, decided before it arrived (a connection limit).
        self.refusal: HttpResponse | None = None
        # Accepted on the API's own listener: /api, /metrics and /healthz only.
        self.api_only = False
        # Who it is and the room it asked for, once upgraded (for the log's fields).
        self.user: str | None = None
        self.room: str | None = None
        # Its API request's answer is awaited (the backplane's): its input is ignored.
        self.api_waiting = False
        # Its request was a probe's (/metrics, /healthz): no WebSocket transport, and
        # left out of ``roombus_transport_connections`` (a scrape would count itself).
        self.probe = False

    def fields(self, **more: object) -> dict[str, object]:
        """The structured fields of a log record about this connection (``extra=``):
        ``conn``, ``peer``, and ``user`` and ``room`` once known, then *more*."""
        out: dict[str, object] = {"conn": self.cid, "peer": self.peer}
        if self.user is not None:
            out["user"] = self.user
        if self.room is not None:
            out["room"] = self.room
        out.update(more)
        code = out.get("code")
        if code is not None:
            out["code"] = int(code)  # type: ignore[call-overload]  # a CloseCode: the number
        return out


class HubBase:
    """
    Connections, their send queues and lifecycle, and the broker: what
    :class:`~roombus.server.framed.FramedHub` (a transport of bytes) and
    :class:`~roombus.server.messages.MessageHub` (a transport of WebSocket messages)
    share. Make one of those two; see the module docstrings for each contract.

    Args:
        broker_config: The core's limits and intervals.
        config: Transport-level settings (timeouts, origins, page, header limit).
        on_notice: Called with every notice (a user joined or left, a message was
            published), synchronously; an exception it raises is logged and ignored.
            The hub turns its broker's :attr:`~roombus.lowlevel.Broker.notices` off
            while there is no hook (:attr:`on_notice` may be set later).
        framed: Needed by neither class; if given, it must be the class's own
            (:attr:`framed`), so that ``Hub(framed=False)`` names the class to use.
        authenticator: Decides who a client is from its request (401/403 before the
            upgrade otherwise); without one, the query's ``username`` is taken as is.
        authorizer: Decides per room who may join, publish and see presence. With an
            authenticator and no authorizer, the identity's room rules (the token's
            ``rooms`` claim) decide.
        broker: The broker to run, made by the caller (a node of a cluster passes a
            :class:`~roombus.cluster.ClusterBroker`: it then asks for backplane work,
            :meth:`take_backplane`, and takes backplane events, :meth:`backplane_event`).
            None: a :class:`~roombus.lowlevel.Broker` on its own, made of *broker_config* and
            *authorizer*, which must then be None.

    Raises:
        ConfigError: in a MessageHub whose broker's heartbeat is on: such a transport
            never reports pongs.
        LocalProtocolError: if *framed* is not the class's own.
        ValueError: if *broker* is given with *broker_config* or *authorizer*.
    """

    #: True for a transport of bytes (the hub parses HTTP and frames), False for one
    #: that speaks WebSocket messages itself (an ASGI server).
    framed: ClassVar[bool]

    def __init__(
        self,
        broker_config: BrokerConfig | None = None,
        config: ServerConfig | None = None,
        *,
        on_notice: NoticeHook | None = None,
        framed: bool | None = None,
        authenticator: Authenticator | None = None,
        authorizer: Authorizer | None = None,
        broker: Broker | None = None,
    ) -> None:
        if framed is not None and framed is not self.framed:
            raise LocalProtocolError(
                "a hub of WebSocket messages (framed=False) is a MessageHub, a hub of bytes "
                f"a FramedHub: {type(self).__name__}(framed={framed!r}) is neither"
            )
        if broker is None:
            broker = Broker(broker_config, authorizer=authorizer_for(authorizer, authenticator))
        elif broker_config is not None or authorizer is not None:
            raise ValueError("broker_config and authorizer are the broker's: give them to it")
        if not self.framed and broker.config.heartbeat:
            raise ConfigError(
                "heartbeat",
                "must be off for a transport that owns pings (a MessageHub): "
                "use the server's own ping setting",
            )
        self.authenticator = authenticator
        self.broker = broker
        self._backplane: list[BackplaneAction] = []
        self.config = config if config is not None else ServerConfig()
        #: The connection limits: per-address and total counts, the probe budget.
        self.admission = Admission(self.config)
        #: What the server API (``POST /api/...``) calls; the adapters' ``Server.api``
        #: calls it too.
        self.operations = HubOperations(self)
        #: Further gauges and counters for ``GET /metrics`` (an adapter's backplane).
        self.extra_metrics: Callable[[], dict[str, float]] | None = None
        #: What answers ``GET /metrics`` (the adapters install their Prometheus
        #: registry's, ``roombus.node.metrics``); None: the plain rendering of
        #: :func:`~roombus.server.metrics.render_prometheus`.
        self.exposition: Callable[[], HttpResponse] | None = None
        #: WebSocket closes by ``(code, side)``: ``server`` when the hub closed or
        #: refused the peer's input, ``client`` when the peer closed or vanished.
        self.closes: Counts[tuple[int, str]] = Counts()
        #: Requests answered with an HTTP error instead of an upgrade, by status.
        self.http_refusals: Counts[int] = Counts()
        #: Seconds from the oldest waiting message's arrival to its queue's write (per
        #: receiver per write, when the adapter reports the time to :meth:`flushed`).
        self.write_latency = Histogram(LATENCY_BUCKETS)
        #: Messages waiting in each queue handed out to be written.
        self.queue_depth = Histogram(DEPTH_BUCKETS)
        #: Seconds from a transport connection's opening to its upgrade (framed only).
        self.handshake_duration = Histogram(HANDSHAKE_BUCKETS)
        self._written = SAMPLE_EVERY - 1  # queues written out (the latency's sample)
        self._taken = 0  # queues handed out to be written (the depth's sample)
        self._on_notice: NoticeHook | None = None
        self.on_notice = on_notice
        self.shutting_down = False
        #: Set by :meth:`drain`: ``/healthz`` answers 503, new WebSockets are refused.
        self.draining = False
        self._drain: DrainSchedule | None = None
        #: Slow consumers closed since the start (the budget's included).
        self.overflows = 0
        #: Of those, the ones closed because all queues together held too much.
        self.budget_closes = 0
        #: Connections closed because their first bytes were no valid PROXY protocol
        #: header (``proxy_protocol``), since the start.
        self.proxy_header_errors = 0
        #: Bytes waiting in every send queue together, against ``max_queued_bytes``.
        self.budget = ByteBudget(self.config.max_queued_bytes)
        self._conns: dict[ConnectionId, _Conn] = {}
        self._probes = 0  # those of them whose request is a probe's (_Conn.probe)
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
    def probe_count(self) -> int:
        """Those of :attr:`connection_count` whose request is ``/metrics`` or
        ``/healthz`` (a scrape, a health check: no WebSocket transport)."""
        return self._probes

    def _probing(self, conn: _Conn) -> None:
        """*conn*'s request is a probe's (see :attr:`probe_count`)."""
        if not conn.probe:
            conn.probe = True
            self._probes += 1

    @property
    def websocket_count(self) -> int:
        """Connections that completed the upgrade and are open."""
        return self.broker.statistics().connections

    def queue(self, cid: ConnectionId) -> SendQueue | MessageQueue | None:
        """The send queue of *cid*, or None if the hub no longer knows it."""
        conn = self._conns.get(cid)
        return conn.queue if conn is not None else None

    # -- outputs ----------------------------------------------------------------------

    @property
    def limit_refusals(self) -> int:
        """Requests refused because of a connection limit since the start."""
        return self.admission.refusals

    def metrics(self) -> dict[str, float]:
        """The unlabelled gauges and counters, by Prometheus name."""
        return collect(self)

    def metrics_response(self) -> HttpResponse:
        """``GET /metrics``: :attr:`exposition`'s answer, or the plain rendering."""
        if self.exposition is not None:
            return self.exposition()
        return render_prometheus(self)

    def api_enabled(self, *, api_listener: bool) -> bool:
        """Whether ``/api/...`` is served to a connection of the main listener
        (*api_listener* False) or of the API's own one: only with an API key, and
        on the API's listener if it has one."""
        config = self.config
        return bool(config.api_keys) and api_listener == (config.api_port is not None)

    def api_response(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: bytes | None,
        *,
        now: float,
        timestamp: int,
    ) -> HttpResponse | Pending[HttpResponse]:
        """The answer to a request for ``/api/...`` (*body* None: it was too large),
        or a pending one: the backplane's answer is awaited (settled within the
        operations' ``timeout``, by a later hub call: an event, or :meth:`timeout`)."""
        if body is None:
            return TOO_LARGE
        return handle_api(
            method,
            path,
            headers,
            body,
            keys=self.config.api_keys,
            operations=self.operations,
            now=now,
            timestamp=timestamp,
        )

    def take_backplane(self) -> list[BackplaneAction]:
        """Backplane work the broker asked for since the last call, in order."""
        if not self._backplane:
            return []
        work, self._backplane = self._backplane, []
        return work

    def has_dirty(self) -> bool:
        """Whether any queue is dirty (the next ``take_dirty*`` call has something)."""
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
        if self._drain is not None:
            close_at = self._drain.next_deadline()
            if close_at is not None and (own is None or close_at < own):
                own = close_at
        waits = self.operations.next_deadline()
        if waits is not None and (own is None or waits < own):
            own = waits
        beat = self.broker.next_deadline()
        if own is None:
            return beat
        return own if beat is None else min(own, beat)

    # -- inputs -----------------------------------------------------------------------

    def _add(self, conn: _Conn) -> HttpResponse | None:
        """Track *conn*; the answer for it if it is over a connection limit."""
        conns = self._conns
        conns[conn.cid] = conn
        if len(conns) > self._peak:
            self._peak = len(conns)
        return self.admission.add(conn.ip, len(conns))

    def _behind_proxy(self, conn: _Conn) -> None:
        """
        A new connection through a proxy: it counts against the total at once, and
        against an address once its client is known (:meth:`_resolved`): the PROXY
        header's, or the request's forwarding headers' when the hop is trusted.
        """
        config = self.config
        if config.proxy_protocol:
            conn.proxy = bytearray()
        elif config.forwarded_allow_ips and config.forwarded_allow_ips.trusts(conn.hop):
            conn.forwarded = True
        if conn.proxy is not None or conn.forwarded:
            conn.ip = None

    def _resolved(self, conn: _Conn, ip: str | None, label: str) -> bool:
        """
        *conn*'s client is at *ip* (None: no address), named *label* in logs: count
        it against that address. False if that dropped it (far over the limit).
        """
        conn.peer = label
        conn.ip = ip
        if ip is None:
            return True
        refusal = self.admission.add_address(ip)
        if conn.refusal is None:
            conn.refusal = refusal
        if conn.refusal is not None and self.admission.far_over(ip, len(self._conns)):
            self.admission.refused(conn.peer, conn.refusal, cid=conn.cid)
            self._drop(conn)
            return False
        return True

    def _admit(self, upgrade: Upgrade) -> Upgrade | HttpResponse:
        """The room's checks (authorization, size) before a WebSocket opens."""
        reason = self.broker.refusal(upgrade.room, upgrade.username, upgrade.identity)
        if reason is not None:
            return HttpResponse(status=403, body=reason.encode() + b"\n")
        return upgrade

    def lost(
        self, cid: ConnectionId, *, now: float, timestamp: int, code: int | None = None
    ) -> None:
        """
        *cid*'s transport is closed or broken; forget it (no-op if unknown). *code*:
        the close code its peer sent, if the transport reports one (an ASGI server's
        ``websocket.disconnect``); a connection still open when lost counts as a
        client's close with it (1006 without).
        """
        conns = self._conns
        conn = conns.pop(cid, None)
        if conn is None:
            return
        if conn.probe:
            self._probes -= 1
        if conn.phase is _Phase.OPEN:
            closed = 1006 if code is None else code
            self._closed(closed, "client")
            _log_client_close(conn, closed)
        if worth_shrinking(len(conns), self._peak):
            # Many connections left: copy the table smaller (a dict never shrinks by
            # deletions), and drop the deadlines they left behind.
            self._conns = dict(conns)
            self._peak = len(conns)
            self._deadlines = [(c.deadline, k) for k, c in conns.items() if c.deadline is not None]
            heapq.heapify(self._deadlines)
        self.admission.remove(cid, conn.ip)
        if self._drain is not None:
            self._drain.discard(cid)
        self._dirty.pop(cid, None)
        conn.queue.detach()
        self._forget(conn, now, timestamp)

    @property
    def on_notice(self) -> NoticeHook | None:
        """The notice hook, or None. Without one the broker makes no notice of a
        client's chat (:attr:`Broker.notices <roombus.lowlevel.Broker.notices>`): no
        one would read it."""
        return self._on_notice

    @on_notice.setter
    def on_notice(self, hook: NoticeHook | None) -> None:
        self._on_notice = hook
        self.broker.notices = hook is not None

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

    def flushed(self, cid: ConnectionId, *, now: float | None = None) -> None:
        """
        *cid*'s queue was written out completely. With *now* (the driver's clock as the
        write began: a flusher passes its sweep's for every queue it writes), the time
        its oldest message waited is observed (``write_latency``; one in
        :data:`SAMPLE_EVERY` writes).
        """
        conn = self._conns.get(cid)
        if conn is None:
            return
        since = conn.since
        if since is not None:
            conn.since = None
            if now is not None:
                self._written += 1
                if not self._written % SAMPLE_EVERY:
                    self.write_latency.observe(now - since)
        if conn.phase is _Phase.FINISHING and not conn.queue:
            self._drop(conn)

    def timeout(self, *, now: float, timestamp: int) -> None:
        """Let time pass up to *now*: heartbeats, handshake and close timeouts, a
        drain's closes."""
        self._apply(self.broker.handle_timeout(now=now, timestamp=timestamp), now, timestamp)
        self.operations.expire(now, timestamp)
        if self._drain is not None:
            due = self._drain.due(now)
            if due:
                self._close_drained(due, now, timestamp)
        deadlines = self._deadlines
        conns = self._conns
        while deadlines and deadlines[0][0] <= now:
            at, cid = heapq.heappop(deadlines)
            conn = conns.get(cid)
            if conn is None or conn.deadline != at:
                continue
            if conn.phase is _Phase.HANDSHAKE:
                log.info(
                    "%s did not complete its handshake in time",
                    conn.peer,
                    extra=conn.fields(reason="handshake timeout"),
                )
            elif conn.phase is _Phase.CLOSING and log.isEnabledFor(DEBUG):
                log.debug(
                    "conn %d (%s) did not answer the close in time",
                    cid,
                    conn.peer,
                    extra=conn.fields(reason="close timeout"),
                )
            self._drop(conn)

    def backplane_event(self, event: Event, *, now: float, timestamp: int) -> None:
        """A backplane event (a record, a room's snapshot, the link lost or back)."""
        self._apply(self.broker.handle(event, now=now, timestamp=timestamp), now, timestamp)

    def publish(
        self, room: str, content: object, *, username: str, now: float, timestamp: int
    ) -> Publication:
        """
        Publish a chat message from server-side code: how many receivers here, and
        its position.

        Raises:
            ValueError: if the room or username is invalid or content is not JSON.
        """
        actions = self.broker.publish(
            room, content, username=username, timestamp=timestamp, now=now
        )
        self._apply(actions, now, timestamp)
        position = None
        for a in actions:
            if type(a) is MessagePublished and a.epoch:
                position = Position(a.epoch, a.seq)
        return Publication(
            delivered=sum(len(a.conns) for a in actions if type(a) is Deliver),
            position=position,
        )

    @property
    def drain_ends(self) -> float | None:
        """When the drain's window ends (every WebSocket closed by then), or None."""
        return self._drain.end if self._drain is not None else None

    @property
    def drain_done(self) -> bool:
        """Whether a drain began and no WebSocket it was to close is left open."""
        return self._drain is not None and self._drain.done

    def drain(
        self,
        *,
        now: float,
        timestamp: int,
        seconds: float | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """
        Begin a graceful, spread shutdown: from now on ``/healthz`` answers 503
        (``draining``) and a WebSocket upgrade 503 with ``Retry-After``; the open
        WebSockets are closed with 1001 (``server draining``, after what is queued for
        them), each at an instant of the window drawn by a
        :class:`~roombus.server.drain.DrainSchedule` (:meth:`timeout` at
        :meth:`next_deadline` closes them). Messages still reach those not closed
        yet. Then call :meth:`shutdown`, once :attr:`drain_done` or at
        :attr:`drain_ends`. No-op if already draining or shutting down.

        Args:
            seconds: The window; None: ``config.drain_seconds``. 0 closes them now.
            random: A uniform ``[0, 1)`` source for the schedule's jitter.
        """
        if self.draining or self.shutting_down:
            return
        if seconds is None:
            seconds = self.config.drain_seconds
        self.draining = True
        open_ = [cid for cid, conn in self._conns.items() if conn.phase is _Phase.OPEN]
        self._drain = DrainSchedule(open_, now=now, seconds=seconds, random=random)
        self.deadline_moved = True
        log.info("draining: closing %d WebSockets over %g s", len(open_), seconds)
        due = self._drain.due(now)
        if due:
            self._close_drained(due, now, timestamp)

    def _close_drained(self, cids: list[ConnectionId], now: float, timestamp: int) -> None:
        """Close these connections of a drain with 1001; then tell the broker."""
        conns = self._conns
        closing = []
        for cid in cids:
            conn = conns.get(cid)
            if conn is not None and conn.phase is _Phase.OPEN:
                self._close(conn, GOING_AWAY, "server draining", now, drop_pending=False)
                closing.append(conn)
        # As in shutdown(): every queue of the batch is closing before anyone's leave.
        for conn in closing:
            self._forget(conn, now, timestamp)

    def shutdown(self, *, now: float, timestamp: int) -> None:
        """Close every connection (1001 for clients; handshakes are dropped). During a
        drain, those it has not closed yet are closed as it would (``server
        draining``): its last closes fall due with the shutdown, or a second signal
        ends it early."""
        self.shutting_down = True
        reason = "server draining" if self.draining else "server shutting down"
        for conn in list(self._conns.values()):
            if conn.phase is _Phase.HANDSHAKE:
                self._drop(conn)
            elif conn.phase is _Phase.OPEN:
                self._close(conn, GOING_AWAY, reason, now, drop_pending=False)
        # Only then tell the broker: every queue is closing, so nobody gets a leave
        # between their last message and the close.
        for conn in list(self._conns.values()):
            self._forget(conn, now, timestamp)

    # -- phases -----------------------------------------------------------------------

    def _set_phase(self, conn: _Conn, step: _Step) -> None:
        """Move *conn* on by *step*, as :data:`PHASES` allows."""
        was = conn.phase
        try:
            conn.phase = PHASES[was, step]
        except KeyError:
            raise LocalProtocolError(
                f"conn {conn.cid}: no move from {was.name} by {step.name}"
            ) from None
        if was is _Phase.OPEN and self._drain is not None:
            self._drain.discard(conn.cid)  # closed otherwise: not the drain's to close

    def _connect(self, conn: _Conn, upgrade: Upgrade, now: float, timestamp: int) -> None:
        """An OPEN connection joins the broker (and its room)."""
        cid = conn.cid
        self.deadline_moved = True  # its heartbeat starts
        if self._drain is not None:
            # Not while draining (upgrades are refused then), but closed in time if so.
            self._drain.add(cid, now=now)
        conn.user = upgrade.username
        conn.room = upgrade.room
        if log.isEnabledFor(DEBUG):
            log.debug(
                "%s connected as %r in %r (conn %d)",
                conn.peer,
                upgrade.username,
                upgrade.room,
                cid,
                extra=conn.fields(),
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
                    positioned=upgrade.positioned,
                    since=upgrade.since,
                    partial=upgrade.partial,
                ),
                now=now,
                timestamp=timestamp,
            ),
            now,
            timestamp,
        )

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
        """Start closing an OPEN connection from our side (CLOSING, close timeout set)."""
        raise NotImplementedError

    def _sample_depths(self, dirty: dict[ConnectionId, SendQueue | MessageQueue]) -> None:
        """Observe the depth of one in :data:`SAMPLE_EVERY` queues handed out."""
        start = -self._taken % SAMPLE_EVERY
        self._taken += len(dirty)
        if start < len(dirty):
            sample = itertools.islice(dirty.values(), start, None, SAMPLE_EVERY)
            self.queue_depth.observe_all([queue._data_frames for queue in sample])

    def _closed(self, code: int, side: str) -> None:
        """Count a WebSocket close."""
        self.closes.add((code, side))

    def _refused(
        self,
        peer: str,
        response: HttpResponse,
        *,
        limit: bool = False,
        cid: ConnectionId | None = None,
    ) -> None:
        """Count (and log) a request answered with an error instead of an upgrade
        (*cid*: the transport connection's id, for a framed hub)."""
        status = response.status
        if status >= 400:
            self.http_refusals.add(status)
            if limit:
                self.admission.refused(peer, response, cid=cid)
            else:
                _log_refusal(peer, response, cid)

    def _drop(self, conn: _Conn) -> None:
        """The transport must close now; nothing it sends matters any more."""
        if conn.phase is not _Phase.DROPPED:
            self._set_phase(conn, _Step.DROP)
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
                        if conn.since is None:
                            conn.since = now
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
                        extra=conn.fields(code=action.code, reason=action.reason),
                    )
                    # Not slow (rate limit, expired credentials, kick): what is queued
                    # (its echoes, the error explaining the close) goes out first.
                    self._close(conn, action.code, action.reason, now, drop_pending=False)
            elif isinstance(action, (UserJoined, UserLeft, MessagePublished)):
                hook = self._on_notice
                if hook is not None:
                    try:
                        hook(action)
                    except Exception:
                        log.exception(
                            "on_notice hook failed for %r",
                            action,
                            extra={"room": action.room, "user": action.username},
                        )
            elif isinstance(action, (PublishAnswered, HistoryAnswered, ClusterAnswered)):
                self.operations.answered(action, now, timestamp)
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
                        reason = "send queue full: reading too slowly"
                        log.warning(
                            "conn %d (%s) fell behind (send queue full); closing with 1008",
                            conn.cid,
                            conn.peer,
                            extra=conn.fields(code=POLICY_VIOLATION, reason=reason),
                        )
                    else:  # chosen by enforce_budget()
                        self.budget_closes += 1
                        reason = "server send queues full: reading too slowly"
                        log.info(
                            "conn %d (%s) closed over max-queued-bytes",
                            conn.cid,
                            conn.peer,
                            extra=conn.fields(code=POLICY_VIOLATION, reason=reason),
                        )
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


def _log_client_close(conn: _Conn, code: int) -> None:
    """Log (at debug) that *conn*'s peer closed with *code*, or went away (1006)."""
    if not log.isEnabledFor(DEBUG):
        return
    if code == 1006:  # it went away without a close frame (abnormal closure)
        log.debug("conn %d (%s) lost", conn.cid, conn.peer, extra=conn.fields(code=code))
    else:
        log.debug(
            "conn %d (%s) closed by the client: %d",
            conn.cid,
            conn.peer,
            code,
            extra=conn.fields(code=code),
        )


def _log_refusal(peer: str, response: HttpResponse, cid: ConnectionId | None = None) -> None:
    if response.status >= 400:
        # The reason is ours or an authenticator's, and never holds credentials; a
        # custom authenticator's is redacted all the same.
        reason = redact(response.body.decode(errors="replace").strip())
        extra: dict[str, object] = {"peer": peer, "status": response.status, "reason": reason}
        if cid is not None:
            extra["conn"] = cid
        log.info("%s refused with %d: %s", peer, response.status, reason, extra=extra)
