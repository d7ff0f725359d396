"""
The Redis backplane: several roombus nodes serving the same rooms.

The broker (in cluster mode) asks for backplane work as actions and takes what the
other nodes did as events; this module carries them out over Redis:

The key names, the Lua scripts, the command each action becomes and what a reply
means are :mod:`roombus._schema`'s; the records, :mod:`roombus._records`'s. In short:

* Each room has a channel, ``<prefix>:{<room>}:c``, listened to (``SSUBSCRIBE``, or
  ``SUBSCRIBE`` on a server without sharded pub/sub) only while the node has members
  in the room. The ``{<room>}`` hash tag keeps a room's channel and keys on one shard
  of a Redis Cluster, and spreads rooms over shards.
* A chat message is numbered and published by one Lua script (``INCR`` of the room's
  ``seq`` key, then publish), so ``seq`` is one counter per room for the whole cluster
  and every node, the sender's included, delivers messages in the same order.
* Presence is a sorted set per room, ``<prefix>:{<room>}:p``: a member
  ``"<node> <username>"`` per user per node, scored with its expiry. A node refreshes
  its members every ``presence_ttl / 3`` seconds; members of a node that stopped
  refreshing (killed) are removed by whichever node refreshes the room next, which
  publishes their leave. A change publishes a ``j``/``l`` record numbered by the
  room's version key, so a node reading a snapshot knows which records it reflects.
* Lost connection: the broker serves locally meanwhile (see
  :class:`~roombus.BackplaneLost`); the backplane reconnects with exponential backoff
  (0.1 s doubling to 5 s, with jitter), re-listens, re-announces, and re-reads every
  room's presence.

Redis is spoken through :mod:`roombus.trio._redis` (hiredis's parser and encoder over
trio sockets).
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import attrs

import trio

from .._actions import Announce, BackplaneAction, Relay, Subscribe, Unsubscribe
from .._cluster import is_valid_node_id
from .._errors import ConfigError
from .._events import BackplaneLost, BackplaneRestored, Event
from .._schema import (
    SCRIPTS,
    channel,
    command_for,
    lifetime_ms,
    parse_snapshot,
    records_received,
    refresh_command,
    script_source,
    snapshot_command,
)
from .._types import RoomName
from ._redis import (
    Arg,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    RedisSubscriber,
    connect,
    connect_subscriber,
    parse_redis_url,
    supports_sharded_pubsub,
)

if TYPE_CHECKING:
    from ._redis import RedisAddress

log: Final = logging.getLogger("roombus.backplane")

#: Reconnection backoff, in seconds: first wait and cap.
BACKOFF_FIRST: Final = 0.1
BACKOFF_CAP: Final = 5.0
#: Seconds between liveness checks of both Redis connections, and how long each may
#: take: a Redis that stops answering (a host gone, no reset) ends the session.
KEEPALIVE: Final = 5.0


class BackplaneHost(Protocol):
    """What the backplane needs of the server it serves."""

    def backplane_events(self, events: list[Event]) -> None: ...

    def local_presence(self) -> list[tuple[RoomName, list[str]]]: ...


def generate_node_id() -> str:
    """A node id unique enough across restarts: host name, process id, random."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@attrs.define
class BackplaneStatistics:
    """
    Counters of a Redis backplane since it started.

    Attributes:
        online: Connected to Redis now.
        connects: Successful connections (the first one included).
        failures: Connections lost or refused.
        dropped: Backplane work discarded because Redis was unreachable (messages
            not relayed, presence changes not recorded; presence is re-announced on
            reconnect, messages are delivered locally only).
        relayed: Messages published to Redis.
        received: Records received from Redis.
        errors: Commands Redis answered with an error.
    """

    online: bool = False
    connects: int = 0
    failures: int = 0
    dropped: int = 0
    relayed: int = 0
    received: int = 0
    errors: int = 0


class RedisBackplane:
    """
    Connects a trio roombus server to the other nodes through Redis.

    Give it to :func:`roombus.trio.serve` (``backplane=``); the server runs it.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path``.
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
        url: str,
        *,
        node_id: str | None = None,
        presence_ttl: float = 15.0,
        prefix: str = "roombus",
        connect_timeout: float = 5.0,
    ) -> None:
        try:
            self.address: RedisAddress = parse_redis_url(url)
        except ValueError as exc:
            raise ConfigError("redis", str(exc)) from None
        if node_id is None:
            node_id = generate_node_id()
        if not is_valid_node_id(node_id):
            raise ConfigError(
                "node-id", f"must be 1-64 characters of A-Z a-z 0-9 _ . : -, not {node_id!r}"
            )
        if not (isinstance(presence_ttl, (int, float)) and 0.3 <= presence_ttl <= 86400):
            raise ConfigError("presence-ttl", f"must be 0.3 to 86400 seconds, not {presence_ttl!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix):
            raise ConfigError(
                "redis-prefix", f"must be 1-64 of A-Z a-z 0-9 _ . : -, not {prefix!r}"
            )
        self.node_id: Final = node_id
        self.presence_ttl: Final = float(presence_ttl)
        self.prefix: Final = prefix
        self.connect_timeout = connect_timeout
        self.statistics = BackplaneStatistics()
        self._work: deque[BackplaneAction] = deque()
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._scripts: dict[str, bytes] = {}
        self._sharded = True
        self._lasted = False
        # The rooms whose channel the broker wants listened to, as of the work queued:
        # an Unsubscribe followed by a Subscribe of the same room is not carried out.
        self._wanted: dict[RoomName, int] = {}  # room -> the latest Subscribe's gen

    def metrics(self) -> dict[str, float]:
        """The counters, by Prometheus name (for ``GET /metrics``)."""
        stats = self.statistics
        return {
            "roombus_redis_connects_total": stats.connects,
            "roombus_redis_failures_total": stats.failures,
            "roombus_redis_dropped_total": stats.dropped,
            "roombus_redis_relayed_total": stats.relayed,
            "roombus_redis_received_total": stats.received,
            "roombus_redis_errors_total": stats.errors,
        }

    def __repr__(self) -> str:
        return f"<RedisBackplane node={self.node_id!r} {self.address!r}>"

    # -- the server's side ------------------------------------------------------------

    def submit(self, work: list[BackplaneAction]) -> None:
        """Queue the broker's backplane work (from the server's trio thread)."""
        if not self.statistics.online:
            self.statistics.dropped += sum(isinstance(a, (Relay, Announce)) for a in work)
            return
        wanted = self._wanted
        for action in work:
            if isinstance(action, Subscribe):
                wanted[action.room] = action.gen
            elif isinstance(action, Unsubscribe):
                wanted.pop(action.room, None)
        self._work.extend(work)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    async def wait_idle(self) -> None:
        """Until every queued piece of work was sent (or dropped for an outage)."""
        await self._idle.wait()

    async def run(self, host: BackplaneHost) -> None:
        """Stay connected to Redis until cancelled, feeding *host* the other nodes' doings."""
        backoff = BACKOFF_FIRST
        while True:
            self._lasted = False
            try:
                cmd = await connect(self.address, connect_timeout=self.connect_timeout)
            except (RedisConnectionError, RedisError, OSError) as exc:
                self._failed(exc)
            else:
                try:
                    await self._session(cmd, host)
                except (RedisConnectionError, RedisError, OSError, trio.TooSlowError) as exc:
                    self._failed(exc)
                finally:
                    with trio.CancelScope(shield=True):
                        await cmd.aclose()
                    if self.statistics.online:
                        self._offline(host)
            # A session that lasted resets the backoff; flapping backs off further.
            backoff = BACKOFF_FIRST if self._lasted else min(backoff * 2, BACKOFF_CAP)
            await trio.sleep(backoff * random.uniform(0.5, 1.0))

    def _failed(self, exc: BaseException) -> None:
        self.statistics.failures += 1
        log.warning("redis backplane %s: %s", "lost" if self.statistics.online else "down", exc)

    def _offline(self, host: BackplaneHost) -> None:
        self.statistics.online = False
        self.statistics.dropped += sum(isinstance(a, (Relay, Announce)) for a in self._work)
        self._work.clear()
        self._wanted.clear()
        self._idle.set()
        host.backplane_events([BackplaneLost()])

    async def _session(self, cmd: RedisConnection, host: BackplaneHost) -> None:
        """One connection's life, until it fails (raising why)."""
        self._lasted = False
        self._sharded = await supports_sharded_pubsub(cmd)
        self._scripts = {}
        for name in SCRIPTS:
            source = script_source(name, self._sharded)
            self._scripts[name] = await cmd.execute("SCRIPT", "LOAD", source)
        sub = await connect_subscriber(
            self.address, sharded=self._sharded, connect_timeout=self.connect_timeout
        )
        try:
            self.statistics.connects += 1
            self.statistics.online = True
            log.info(
                "redis backplane connected as node %s (%s pub/sub)",
                self.node_id,
                "sharded" if self._sharded else "classic",
            )
            failure: list[BaseException] = []
            async with trio.open_nursery() as nursery:

                async def guard(task: Callable[[], Awaitable[None]]) -> None:
                    try:
                        await task()
                    except (RedisConnectionError, RedisError, OSError, trio.TooSlowError) as exc:
                        failure.append(exc)
                        nursery.cancel_scope.cancel()
                    except Exception as exc:
                        # A bug (or a reply we cannot read): end this session, not the server.
                        log.exception("redis backplane session failed")
                        failure.append(RedisError(f"internal error: {exc!r}"))
                        nursery.cancel_scope.cancel()

                nursery.start_soon(guard, partial(self._read, sub, host))
                nursery.start_soon(guard, partial(self._refresh_loop, cmd, host))
                nursery.start_soon(guard, partial(self._write, cmd, sub, host))
                nursery.start_soon(guard, partial(self._keepalive, cmd, sub))
                nursery.start_soon(self._reread_presence)
                nursery.start_soon(self._mark_lasting)
                host.backplane_events([BackplaneRestored()])
            if failure:
                raise failure[0]
        finally:
            with trio.CancelScope(shield=True):
                await sub.aclose()

    async def _keepalive(self, cmd: RedisConnection, sub: RedisSubscriber) -> None:
        while True:
            await trio.sleep(KEEPALIVE)
            with trio.fail_after(KEEPALIVE):
                await cmd.execute("PING")
                await sub.ping()

    async def _reread_presence(self) -> None:
        """
        Read every room's presence again a third of the TTL after connecting: by then
        the other nodes have re-announced their users if Redis lost its data, and
        the broker settles who really is there (it kept everyone meanwhile).
        """
        await trio.sleep(self.presence_ttl / 3)
        if self._wanted:
            self.submit(
                [Subscribe(room=room, gen=gen) for room, gen in sorted(self._wanted.items())]
            )

    async def _mark_lasting(self) -> None:
        await trio.sleep(BACKOFF_CAP)
        self._lasted = True

    # -- the tasks of one session -----------------------------------------------------

    async def _read(self, sub: RedisSubscriber, host: BackplaneHost) -> None:
        stats = self.statistics
        while True:
            # A burst at once: the server then writes each client's share in one go.
            events = records_received(await sub.receive_many())
            stats.received += len(events)
            host.backplane_events(events)

    async def _write(self, cmd: RedisConnection, sub: RedisSubscriber, host: BackplaneHost) -> None:
        work = self._work
        while True:
            if not work:
                self._idle.set()
                self._wake = trio.Event()
                await self._wake.wait()
            # Up to the next Subscribe: every command in one pipeline (in order), and
            # the rooms no longer wanted in one unsubscribe (its order does not matter:
            # it only stops records coming).
            batch: list[tuple[Arg, ...]] = []
            gone: set[str] = set()
            while work and not isinstance(work[0], Subscribe):
                action = work.popleft()
                if isinstance(action, Unsubscribe):
                    if action.room not in self._wanted:
                        gone.add(channel(self.prefix, action.room))
                elif isinstance(action, (Relay, Announce)):
                    batch.append(self._command(action))
            if batch:
                self._check(await cmd.pipeline(batch))
            if gone:
                await sub.unsubscribe(*sorted(gone))
            rooms: dict[RoomName, int] = {}  # the latest listening of each room
            while work and isinstance(work[0], Subscribe):
                subscribe = work.popleft()
                assert isinstance(subscribe, Subscribe)
                rooms[subscribe.room] = subscribe.gen
            if rooms:
                await self._subscribe(cmd, sub, rooms, host)

    def _command(self, action: Relay | Announce) -> tuple[Arg, ...]:
        if isinstance(action, Relay):
            self.statistics.relayed += 1
        return command_for(
            action,
            prefix=self.prefix,
            node=self.node_id,
            shas=self._scripts,
            lifetime=self._lifetime_ms,
        )

    @property
    def _lifetime_ms(self) -> int:
        """How long a presence member lives unrefreshed (refreshed every third of the TTL)."""
        return lifetime_ms(self.presence_ttl)

    async def _subscribe(
        self,
        cmd: RedisConnection,
        sub: RedisSubscriber,
        rooms: dict[RoomName, int],
        host: BackplaneHost,
    ) -> None:
        # Listen first: records published from now on arrive. The snapshot, read after,
        # has a version telling the broker which of them it already reflects.
        await sub.subscribe(*(channel(self.prefix, room) for room in rooms))
        replies = await cmd.pipeline(
            [snapshot_command(room, prefix=self.prefix, shas=self._scripts) for room in rooms]
        )
        events: list[Event] = []
        for (room, gen), reply in zip(rooms.items(), replies, strict=True):
            if isinstance(reply, RedisError):
                raise reply
            try:
                events.append(parse_snapshot(room, gen, reply))
            except ValueError as exc:
                raise RedisError(str(exc)) from None
        host.backplane_events(events)

    async def _refresh_loop(self, cmd: RedisConnection, host: BackplaneHost) -> None:
        period = self.presence_ttl / 3
        while True:
            await trio.sleep(period)
            commands: list[tuple[Arg, ...]] = [
                refresh_command(
                    room,
                    users,
                    prefix=self.prefix,
                    node=self.node_id,
                    shas=self._scripts,
                    lifetime=self._lifetime_ms,
                )
                for room, users in host.local_presence()
            ]
            if commands:
                self._check(await cmd.pipeline(commands))

    def _check(self, replies: list[object]) -> None:
        """
        An error reply (scripts flushed, a read-only replica, out of memory) ends the
        session: the broker then serves locally and delivers what it had relayed,
        rather than wait for records that will never come; reconnecting reloads the
        scripts.
        """
        errors = [reply for reply in replies if isinstance(reply, RedisError)]
        if errors:
            self.statistics.errors += len(errors)
            raise errors[0]


__all__ = ["BackplaneStatistics", "RedisBackplane", "generate_node_id"]
