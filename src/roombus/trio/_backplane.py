"""
The Redis backplane for trio: several roombus nodes serving the same rooms.

The broker (in cluster mode) asks for backplane work as actions and takes what the
other nodes did as events. :class:`roombus.cluster.protocol.BackplaneProtocol` decides
everything about the link to Redis (the session sequence, reconnecting with backoff,
batching, keepalive, refresh; see its docstring, and :mod:`roombus.cluster.schema` for the
keys, scripts and records); this module is its driver: the sockets
(:mod:`roombus.trio._redis`), the tasks and the clock, nothing else.

One routine, :meth:`RedisBackplane._transmit`, runs after every call into the protocol:
it takes the protocol's commands and carries them out (start a task, cancel the
session), hands its events to the server, loops while either came back (handing events
on can submit new work), and re-arms the timer from ``get_timer()``. The one exception
is the server's :meth:`~RedisBackplane.submit`: its ``_transmit`` is run by the command
link's worker on its next turn, so that the work of one scheduler turn (many readers'
chats) leaves in one pipeline.

Tasks: one timer task for the backplane's life; per session, a nursery (cancelled by
``CloseLinks``) holding the link openers, one worker per link that carries out its
commands in order (``Execute`` pipelines on the command link; ``Listen``,
``Unlisten`` and ``Ping`` on the subscriber), and one reader of the subscriber
(``receive_many()`` -> ``messages()``, one call per burst).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

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
from ..cluster.resp import RedisError
from ..node.cluster import cluster_config, generate_node_id, redis_ssl_context
from ._redis import (
    ClusterConnection,
    ClusterSubscriber,
    RedisConnection,
    RedisConnectionError,
    RedisSubscriber,
    connect,
    connect_cluster,
    connect_cluster_subscriber,
    connect_subscriber,
)

if TYPE_CHECKING:
    from ..core.actions import BackplaneAction
    from ..core.events import Event
    from ..core.names import RoomName
    from ._redis import RedisAddress

log: Final = logging.getLogger("roombus.backplane")

#: What a link's task may fail with: each ends the session (``link_failed``).
_IO_ERRORS: Final = (RedisConnectionError, RedisError, OSError, trio.TooSlowError)


class BackplaneHost(Protocol):
    """What the backplane needs of the server it serves."""

    def backplane_events(self, events: list[Event]) -> None: ...

    def local_presence(self) -> list[tuple[RoomName, list[str]]]: ...


class RedisBackplane:
    """
    Connects a trio roombus server to the other nodes through Redis.

    Give it to :func:`roombus.trio.serve` (``backplane=``); the server runs it.

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
        self._host: BackplaneHost | None = None
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
        proto = self.protocol
        self.address: Final[RedisAddress] = proto.address
        self.node_id: Final = proto.node_id
        self.presence_ttl: Final = proto.presence_ttl
        self.prefix: Final = proto.prefix
        self.connect_timeout: Final = proto.connect_timeout
        tls = proto.address.tls
        #: The TLS context of a rediss:// address, made once (ConfigError for a bad file).
        self.ssl_context: Final = None if tls is None else redis_ssl_context(tls)
        self.statistics: Final[BackplaneStatistics] = proto.statistics
        self.metrics: Final = proto.metrics
        self._transmitting = False
        self._idle: trio.Event | None = None
        self._timer_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        # The session: its cancel scope (CloseLinks cancels it), whether the protocol
        # asked for that (then it is answered links_closed), and its links.
        self._session: trio.CancelScope | None = None
        self._session_nursery: trio.Nursery | None = None
        self._closing = False
        self._cmd: RedisConnection | ClusterConnection | None = None
        self._sub: RedisSubscriber | ClusterSubscriber | None = None
        self._cmd_work: deque[Execute] = deque()
        self._cmd_wake = trio.Event()
        self._sub_work: deque[Listen | Unlisten | Ping] = deque()
        self._sub_wake = trio.Event()
        self._armed = math.inf  # the timer's deadline as last set

    def __repr__(self) -> str:
        return f"<RedisBackplane node={self.node_id!r} {self.address!r}>"

    # -- the server's side ------------------------------------------------------------

    def submit(self, work: list[BackplaneAction]) -> None:
        """Queue the broker's backplane work (from the server's trio thread)."""
        self.protocol.submit(work, trio.current_time())
        # The batch is taken by the command worker when it next runs (or by the
        # _transmit under way): the rest of this scheduler turn's work joins it.
        self._cmd_wake.set()

    async def wait_idle(self) -> None:
        """Until every queued piece of work was sent (or dropped for an outage)."""
        if not self.protocol.idle:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def run(self, host: BackplaneHost) -> None:
        """Stay connected to Redis until cancelled, feeding *host* the other nodes' doings."""
        self._host = host
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                self._call(self.protocol.start)
                try:
                    await trio.sleep_forever()
                finally:
                    # Cancelled (the server is done, after waiting for wait_idle()).
                    self._call(self.protocol.abort)
        finally:
            self._nursery = None
            if self._idle is not None:
                self._idle.set()

    def _local_presence(self) -> list[tuple[RoomName, list[str]]]:
        return [] if self._host is None else self._host.local_presence()

    # -- the one routine --------------------------------------------------------------

    def _call(self, method: Callable[..., None], *args: Any) -> None:
        """Feed the protocol one input (with the time), then :meth:`_transmit`."""
        method(*args, trio.current_time())
        self._transmit()

    def _transmit(self) -> None:
        """
        Carry out what the protocol asks, after every call into it: its commands, in
        order; its events, to the host (which may submit work: hence the loop, and the
        guard against running twice at once); then re-arm the timer and, when idle,
        wake :meth:`wait_idle`.
        """
        if self._transmitting:
            return  # the outer call loops over what this one would do
        proto = self.protocol
        self._transmitting = True
        try:
            while True:
                commands = proto.take_commands()
                events = proto.take_events()
                if not commands and not events:
                    break
                for command in commands:
                    self._carry_out(command)
                if events and self._host is not None:
                    self._host.backplane_events(events)
        finally:
            self._transmitting = False
        deadline = proto.get_timer()
        armed = math.inf if deadline is None else deadline
        if armed != self._armed:
            self._armed = self._timer_scope.deadline = armed
        if self._idle is not None and proto.idle:
            self._idle.set()
            self._idle = None

    def _carry_out(self, command: DriverCommand) -> None:
        if isinstance(command, Execute):
            self._cmd_work.append(command)
            self._cmd_wake.set()
        elif isinstance(command, (Listen, Unlisten, Ping)):
            self._sub_work.append(command)
            self._sub_wake.set()
        elif isinstance(command, OpenLink):
            if command.link is Link.COMMAND:
                assert self._nursery is not None and self._session is None
                self._session = trio.CancelScope()
                self._closing = False
                self._nursery.start_soon(self._run_session, self._session, command)
            else:
                assert self._session_nursery is not None
                self._session_nursery.start_soon(self._open_subscriber, command)
        elif isinstance(command, CloseLinks):
            if self._session is None:
                self.protocol.links_closed(trio.current_time())  # nothing open
            else:
                self._closing = True
                self._session.cancel()

    # -- the tasks --------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope() as scope:
                deadline = self.protocol.get_timer()
                self._armed = scope.deadline = math.inf if deadline is None else deadline
                self._timer_scope = scope
                await trio.sleep_forever()
            due = self.protocol.get_timer()
            if due is not None and trio.current_time() >= due:
                self._call(self.protocol.handle_timer)

    async def _run_session(self, scope: trio.CancelScope, command: OpenLink) -> None:
        """One session's nursery: its tasks run in it; CloseLinks cancels it."""
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    self._session_nursery = nursery
                    nursery.start_soon(self._open_command, command)
                    await trio.sleep_forever()
        finally:
            self._session_nursery = None
            with trio.CancelScope(shield=True):
                for link in (self._sub, self._cmd):
                    if link is not None:
                        await link.aclose()
            self._cmd = self._sub = None
            self._sub_work.clear()
            self._cmd_work.clear()
            self._session = None
            if self._closing:  # asked for: answer it (else the backplane is being cancelled)
                self._call(self.protocol.links_closed)

    async def _guard(self, link: Link, what: Callable[[], Any]) -> None:
        try:
            await what()
        except _IO_ERRORS as exc:
            self._call(self.protocol.link_failed, link, str(exc) or repr(exc))
        except Exception as exc:
            # A bug (or a reply we cannot read): end this session, not the server.
            log.exception("redis backplane session failed")
            self._call(self.protocol.link_failed, link, f"internal error: {exc!r}")

    async def _open_command(self, command: OpenLink) -> None:
        async def open_it() -> None:
            # A redis+cluster:// address: a connection per primary, commands routed.
            opener = connect_cluster if command.address.cluster else connect
            self._cmd = await opener(
                command.address, connect_timeout=command.timeout, ssl_context=self.ssl_context
            )
            assert self._session_nursery is not None
            self._session_nursery.start_soon(self._guard, Link.COMMAND, self._cmd_worker)
            self._call(self.protocol.link_opened, Link.COMMAND)

        await self._guard(Link.COMMAND, open_it)

    async def _open_subscriber(self, command: OpenLink) -> None:
        async def open_it() -> None:
            opener = connect_cluster_subscriber if command.address.cluster else connect_subscriber
            self._sub = await opener(
                command.address,
                sharded=self.protocol.sharded,
                connect_timeout=command.timeout,
                ssl_context=self.ssl_context,
            )
            assert self._session_nursery is not None
            self._session_nursery.start_soon(self._guard, Link.SUBSCRIBER, self._read)
            self._session_nursery.start_soon(self._guard, Link.SUBSCRIBER, self._sub_worker)
            self._call(self.protocol.link_opened, Link.SUBSCRIBER)

        await self._guard(Link.SUBSCRIBER, open_it)

    async def _cmd_worker(self) -> None:
        """Each Execute's pipeline, in turn. The protocol keeps one in flight, and its
        answer queues the next one synchronously: this task sends it at once, without
        waiting for a turn of the scheduler."""
        cmd = self._cmd
        assert cmd is not None
        work = self._cmd_work
        replies = self.protocol.replies
        while True:
            if not work:
                self._transmit()  # what was submitted since it last looked
            if not work:
                self._cmd_wake = trio.Event()
                await self._cmd_wake.wait()
                continue
            command = work.popleft()
            self._call(replies, command.batch, await cmd.pipeline(command.commands))

    async def _read(self) -> None:
        sub = self._sub
        assert sub is not None
        messages = self.protocol.messages
        while True:
            # A burst at once: the server then writes each client's share in one go.
            self._call(messages, await sub.receive_many())

    async def _sub_worker(self) -> None:
        """Listen, Unlisten and Ping on the subscriber, in the order asked."""
        sub = self._sub
        assert sub is not None
        work = self._sub_work
        while True:
            if not work:
                self._sub_wake = trio.Event()
                await self._sub_wake.wait()
                continue
            command = work.popleft()
            if isinstance(command, Listen):
                await sub.subscribe(*command.channels)
                self._call(self.protocol.confirmed, command.batch)
            elif isinstance(command, Unlisten):
                await sub.unsubscribe(*command.channels)
            else:
                await sub.ping()
                self._call(self.protocol.confirmed, command.batch)


__all__ = ["BackplaneStatistics", "RedisBackplane", "generate_node_id"]
