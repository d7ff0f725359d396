"""
The Redis backplane for asyncio: a driver of :class:`roombus.cluster.protocol.BackplaneProtocol`.

Every decision -- when to connect and back off, what to send, what a reply means, when a
link is dead -- is the protocol's (see :mod:`roombus.cluster.protocol`; the keys, scripts and
records are :mod:`roombus.cluster.schema`'s and :mod:`roombus.cluster.records`'s). This module owns
what the protocol cannot: two connections (:mod:`roombus.asyncio._redis`, an
:class:`asyncio.Protocol` each), one ``loop.call_at`` timer, and the loop's clock.

Theory of operation
-------------------
Every protocol input -- :meth:`RedisBackplane.submit` from the server, a link opened or
lost, replies, confirmations, a burst of messages, the timer -- is followed by one call
of :meth:`RedisBackplane.transmit`, the only routine that carries out outputs:

1. take the protocol's commands and carry each out (start connecting, write a pipeline,
   listen, ping, close);
2. hand the protocol's events to the host (``host.backplane_events(events)``): the
   broker's answer to them comes back through :meth:`~RedisBackplane.submit`, whose own
   ``transmit`` returns at once (one runs at a time), so
3. loop while the protocol has more commands or events;
4. re-arm the timer at ``get_timer()``, and wake :meth:`~RedisBackplane.wait_idle` once
   the protocol is idle.

Replies and messages arrive in the connections' ``data_received``, so there is no task
per reply and none per link: the only tasks are the connects. A burst of messages (one
read's worth) is one ``messages()`` call and so one ``backplane_events`` call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final, Protocol

from ..cluster.config import ClusterConfig
from ..cluster.protocol import (
    BackplaneProtocol,
    BackplaneStatistics,
    CloseLinks,
    DriverCommand,
    Execute,
    Link,
    Listen,
    OpenLink,
    Ping,
    Unlisten,
)
from ..cluster.resp import RedisAddress
from ..core.actions import BackplaneAction
from ..core.events import Event
from ..core.names import RoomName
from ..node.cluster import cluster_config, generate_node_id, redis_ssl_context
from ._redis import (
    ClusterConnection,
    ClusterSubscriber,
    Confirmation,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    RedisSubscriber,
    Replies,
    connect,
    connect_cluster,
    connect_cluster_subscriber,
    connect_subscriber,
)

log: Final = logging.getLogger("roombus.backplane")


class BackplaneHost(Protocol):
    """What the backplane needs of the server it serves."""

    def backplane_events(self, events: list[Event]) -> None: ...

    def local_presence(self) -> list[tuple[RoomName, list[str]]]: ...


class RedisBackplane:
    """
    Connects an asyncio roombus server to the other nodes through Redis.

    Give it to :func:`roombus.asyncio.serve` (``backplane=``); the server starts it on its
    loop and closes it. The arguments are those of :class:`roombus.trio.RedisBackplane`.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path``; or a
            :class:`~roombus.cluster.config.ClusterConfig` holding every setting
            (then give no other argument).
        node_id: This node's id, unique in the cluster (1-64 characters of
            ``A-Z a-z 0-9 _ . : -``); generated if None.
        presence_ttl: Seconds within which the users of a node that died (without
            a goodbye) leave everywhere.
        prefix: Prefix of every Redis key and channel.
        connect_timeout: Seconds to connect (and log in) to Redis.

    Raises:
        ConfigError: for a bad URL, node id, TTL or prefix.
    """

    def __init__(
        self,
        url: str | ClusterConfig,
        *,
        node_id: str | None = None,
        presence_ttl: float = 15.0,
        prefix: str = "roombus",
        connect_timeout: float = 5.0,
    ) -> None:
        #: The sans-IO protocol this drives.
        self.protocol: Final = BackplaneProtocol(
            cluster_config(
                url,
                node_id=node_id,
                presence_ttl=presence_ttl,
                prefix=prefix,
                connect_timeout=connect_timeout,
            ),
            local_presence=self._local_presence,
        )
        self._proto = proto = self.protocol
        self.address: Final[RedisAddress] = proto.address
        self.node_id: Final = proto.node_id
        self.presence_ttl: Final = proto.presence_ttl
        self.prefix: Final = proto.prefix
        self.connect_timeout: Final = proto.connect_timeout
        tls = proto.address.tls
        #: The TLS context of a rediss:// address, made once (ConfigError for a bad file).
        self.ssl_context: Final = None if tls is None else redis_ssl_context(tls)
        self._host: BackplaneHost | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._command: RedisConnection | ClusterConnection | None = None
        self._subscriber: RedisSubscriber | ClusterSubscriber | None = None
        self._connecting: dict[Link, asyncio.Task[None]] = {}
        self._session = 0  # +1 at every CloseLinks: a late connect of an older one is dropped
        self._timer: asyncio.TimerHandle | None = None
        self._transmitting = False
        self._idle: asyncio.Event | None = None
        self._closed = False

    @property
    def statistics(self) -> BackplaneStatistics:
        """The counters since the backplane started."""
        return self._proto.statistics

    def metrics(self) -> dict[str, float]:
        """The counters, by Prometheus name (for ``GET /metrics``)."""
        return self._proto.metrics()

    def __repr__(self) -> str:
        return f"<RedisBackplane node={self.node_id!r} {self.address!r} (asyncio)>"

    # -- the server's side ------------------------------------------------------------

    def start(self, host: BackplaneHost) -> None:
        """Start on the running loop, feeding *host* the other nodes' doings."""
        if self._loop is not None:
            raise RuntimeError("the backplane is already started")
        self._loop = asyncio.get_running_loop()
        self._host = host
        self._idle = asyncio.Event()
        self._proto.start(self._loop.time())
        self.transmit()

    def submit(self, work: Sequence[BackplaneAction]) -> None:
        """Queue the broker's backplane work (from the loop's thread)."""
        if self._loop is None or self._closed:
            return
        self._proto.submit(work, self._loop.time())
        self.transmit()

    async def wait_idle(self) -> None:
        """Until every queued piece of work was sent (or dropped for an outage)."""
        while self._idle is not None and not self._proto.idle and not self._closed:
            self._idle.clear()
            await self._idle.wait()

    async def aclose(self) -> None:
        """Leave Redis now: close both links and stop the timer; what is still queued
        is dropped (and counted): wait for :meth:`wait_idle` first. Idempotent."""
        if self._loop is None or self._closed:
            self._closed = True
            return
        links = [link for link in (self._command, self._subscriber) if link is not None]
        self._proto.abort(self._loop.time())
        self.transmit()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._connecting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Closed by the abort already; wait until the transports let go (a TLS one
        # says goodbye first, within the connect timeout).
        for link in links:
            await link.aclose()
        self._command = self._subscriber = None
        if self._idle is not None:
            self._idle.set()

    # -- the one routine that carries out outputs -------------------------------------

    def transmit(self) -> None:
        """Carry out what the protocol asks, until it asks nothing more (see the module
        docstring); re-entrant calls return at once, the running one loops."""
        if self._transmitting or self._loop is None:
            return
        proto, host = self._proto, self._host
        assert host is not None
        self._transmitting = True
        try:
            while True:
                commands, events = proto.take_commands(), proto.take_events()
                if not commands and not events:
                    break
                for command in commands:
                    self._carry_out(command)
                if events:
                    host.backplane_events(events)
        finally:
            self._transmitting = False
        if self._closed:
            return
        self._arm(proto.get_timer())
        if proto.idle and self._idle is not None:
            self._idle.set()

    def _carry_out(self, command: DriverCommand) -> None:
        assert self._loop is not None
        try:
            if isinstance(command, Execute):
                if self._command is None:
                    self._fail(Link.COMMAND, "no command link")
                else:
                    self._command.send(command.commands, self._replied(command.batch))
            elif isinstance(command, (Listen, Unlisten, Ping)):
                if self._subscriber is None:
                    self._fail(Link.SUBSCRIBER, "no subscriber link")
                elif isinstance(command, Ping):
                    self._subscriber.request(b"PING", (), self._confirmed(command.batch))
                elif isinstance(command, Listen):
                    done = self._confirmed(command.batch)
                    self._subscriber.request(command.verb, command.channels, done)
                else:
                    done = self._confirmed(None)
                    self._subscriber.request(command.verb, command.channels, done)
            elif isinstance(command, OpenLink):
                task = self._loop.create_task(self._open(command))
                self._connecting[command.link] = task
            elif isinstance(command, CloseLinks):
                self._close_links()
            else:  # pragma: no cover - the protocol's commands are the ones above
                raise AssertionError(f"unknown driver command {command!r}")
        except RedisConnectionError:
            pass  # the link broke: its on_lost has told the protocol

    def _arm(self, when: float | None) -> None:
        timer = self._timer
        if timer is not None:
            if when is not None and timer.when() == when:
                return
            timer.cancel()
            self._timer = None
        if when is not None:
            assert self._loop is not None
            self._timer = self._loop.call_at(when, self._on_timer)

    # -- protocol inputs ----------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_timer(self) -> None:
        self._timer = None
        self._proto.handle_timer(self._now())
        self.transmit()

    def _local_presence(self) -> list[tuple[RoomName, list[str]]]:
        return self._host.local_presence() if self._host is not None else []

    async def _open(self, command: OpenLink) -> None:
        link, session = command.link, self._session
        try:
            if link is Link.COMMAND:
                opener = connect_cluster if command.address.cluster else connect
                conn: Any = await opener(
                    command.address, connect_timeout=command.timeout, ssl_context=self.ssl_context
                )
            else:
                sub_opener = (
                    connect_cluster_subscriber if command.address.cluster else connect_subscriber
                )
                conn = await sub_opener(
                    command.address,
                    sharded=self._proto.sharded,
                    connect_timeout=command.timeout,
                    ssl_context=self.ssl_context,
                )
        except (RedisConnectionError, RedisError, OSError) as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: end this attempt, not the server
            log.exception("redis backplane: connecting failed")
            reason = f"internal error: {exc!r}"
        else:
            if self._closed or session != self._session:
                conn.close()  # the links were closed meanwhile
                return
            self._connecting.pop(link, None)
            conn.on_lost = lambda error: self._lost(link, conn, error)
            if isinstance(conn, (RedisSubscriber, ClusterSubscriber)):
                self._subscriber = conn
                conn.on_messages = self._messages
            else:
                self._command = conn
            self._proto.link_opened(link, self._now())
            self.transmit()
            return
        if session == self._session:
            self._connecting.pop(link, None)
            self._fail(link, reason)

    def _lost(self, link: Link, conn: object, error: RedisConnectionError) -> None:
        if conn is self._command or conn is self._subscriber:
            self._fail(link, str(error))

    def _fail(self, link: Link, reason: str) -> None:
        if self._closed:
            return
        self._proto.link_failed(link, reason, self._now())
        self.transmit()

    def _replied(self, batch: int) -> Replies:
        def replied(replies: list[Any]) -> None:
            self._proto.replies(batch, replies, self._now())
            self.transmit()

        return replied

    def _confirmed(self, batch: int | None) -> Confirmation:
        def confirmed(error: RedisError | None) -> None:
            if error is not None:
                self._fail(Link.SUBSCRIBER, f"Redis refused a subscription: {error}")
            elif batch is not None:
                self._proto.confirmed(batch, self._now())
                self.transmit()

        return confirmed

    def _messages(self, burst: list[tuple[bytes, bytes]]) -> None:
        self._proto.messages(burst, self._now())
        self.transmit()

    def _close_links(self) -> None:
        """Close both links and cancel their connects; answer once the connects ended
        (after that, nothing of theirs can call back)."""
        self._session += 1
        tasks = list(self._connecting.values())
        self._connecting.clear()
        for task in tasks:
            task.cancel()
        for conn in (self._command, self._subscriber):
            if conn is not None:
                conn.close()  # no on_lost: the protocol asked for it
        self._command = self._subscriber = None
        assert self._loop is not None
        if tasks:
            self._loop.create_task(self._links_closed(tasks))
        else:
            self._loop.call_soon(self._answer_closed)

    async def _links_closed(self, tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        self._answer_closed()

    def _answer_closed(self) -> None:
        if not self._closed:
            self._proto.links_closed(self._now())
            self.transmit()


__all__ = ["BackplaneHost", "BackplaneStatistics", "RedisBackplane", "generate_node_id"]
