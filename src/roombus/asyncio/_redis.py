"""
A minimal Redis client for asyncio, on hiredis: what a pub/sub backplane needs, no more.

:mod:`roombus.cluster.resp` does the protocol (RESP2, with hiredis's encoder and parser): URLs,
commands to bytes, bytes to replies, the login and the sharded pub/sub probe. This module
does the I/O. It needs hiredis (``pip install 'roombus[redis]'``) to be imported.

Theory of operation
-------------------
A connection is an :class:`asyncio.Protocol`; there is no task per connection and none
per reply. A caller's commands are encoded and written at once (the transport buffers
what the kernel does not take yet), and a *batch* -- how many replies it waits for, and
what to call with them -- goes into a FIFO, in the same synchronous step, so that the
order of the bytes and the order of the batches agree. ``data_received`` parses every
reply that arrived and completes the batches at the head of the FIFO in order. Commands
from any number of callers pipeline; one reply completes at most one batch.

Each operation comes in two forms: a callback one (:meth:`RedisConnection.send`,
:meth:`RedisSubscriber.request`), which calls back from ``data_received`` -- what a
driver that answers a sans-IO protocol wants -- and an awaitable one
(:meth:`~RedisConnection.execute`, :meth:`~RedisConnection.pipeline`,
:meth:`~RedisSubscriber.subscribe`, ...) built on it. A cancelled awaiter leaves its
batch in the FIFO, to swallow its replies; its command may or may not have run.

A subscriber hands the messages it receives to one callback, ``on_messages``, once per
``data_received`` with every ``(channel, data)`` pair parsed from it: a burst stays one
call. Messages that precede a confirmation in the same read are handed over before the
confirmation's callback runs, so what a subscriber reports keeps Redis's order.

Anything wrong with the transport -- the connection lost, a reply that does not parse or
that nobody asked for -- breaks the connection for good: ``closed`` becomes true, every
waiting batch and every later call gets a :class:`RedisConnectionError` (one instance,
the first cause), and ``on_lost`` is called once with it. Reconnecting (and
resubscribing) is the owner's policy, not this module's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import attrs

from ..cluster.resp import (
    SHARDED_PROBE,
    VERSION_PROBE,
    Arg,
    RedisAddress,
    RedisError,
    RespProtocolError,
    check_handshake,
    cluster_node,
    handshake_commands,
    new_reader,
    pack_commands,
    packer,
    parse,
    parse_redis_url,
    primary_address,
    sentinel_addresses,
    sentinel_query,
    sharded_from_command_info,
    sharded_from_info,
)
from ..cluster.slots import (
    SHARDS_QUERY,
    SLOTS_QUERY,
    Node,
    Router,
    Send,
    SlotMap,
    command_slot,
    slot_map_from_shards,
    slot_map_from_slots,
)
from ..node.cluster import redis_ssl_context
from ..node.tuning import RECEIVE_SIZE

__all__ = [
    "Arg",
    "ClusterConnection",
    "ClusterSubscriber",
    "connect_cluster",
    "connect_cluster_subscriber",
    "RedisAddress",
    "RedisConnection",
    "RedisConnectionError",
    "RedisError",
    "RedisSubscriber",
    "connect",
    "connect_subscriber",
    "parse_redis_url",
    "resolve_primary",
    "supports_sharded_pubsub",
]

# Here, not on first use: without hiredis, importing this module (and so the backplane)
# fails at once with a ModuleNotFoundError that names the extra to install.
_pack: Final = packer()

#: What a callback operation is answered with: the replies (an error reply as a
#: :class:`RedisError` in its place).
Replies = Callable[[list[Any]], object]
#: What a subscriber's request is answered with: None, or the error reply it got.
Confirmation = Callable[["RedisError | None"], object]
#: Where a subscriber's messages go: one call per burst.
MessagesCallback = Callable[[list[tuple[bytes, bytes]]], object]
#: Called once when the connection breaks, with the error every waiter got.
LostCallback = Callable[["RedisConnectionError"], object]


class RedisConnectionError(Exception):
    """The connection to Redis is gone: refused, timed out, reset, closed, or garbled.

    Once raised for a connection, it is raised for every later call on it too.
    """


@attrs.define(eq=False, slots=True)
class _Batch:
    """The replies one caller waits for, what to call with them, what to call on failure."""

    expected: int
    deliver: Replies
    fail: Callable[[RedisConnectionError], object] | None
    replies: list[Any] = attrs.field(factory=list)


_L = TypeVar("_L", bound="_Link")


class _Link(asyncio.BufferedProtocol):
    """What both kinds of connection share: the transport, the parser, breaking.

    Reads land in the link's own buffer (as in :mod:`roombus.asyncio`'s server: not
    256 KiB allocated per read) and are copied out at once."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._buffer = memoryview(bytearray(RECEIVE_SIZE))
        self._reader = new_reader()
        self._transport: asyncio.Transport | None = None
        self._broken: RedisConnectionError | None = None
        self._lost = asyncio.get_running_loop().create_future()
        self._pending: deque[_Batch] = deque()
        #: Called once when the connection breaks (not after :meth:`close`).
        self.on_lost: LostCallback | None = None
        self._closing = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        try:
            replies = parse(self._reader, data)
        except RespProtocolError as exc:
            self._fail(f"{self._where} does not speak the Redis protocol: {exc}")
            return
        if replies:
            self._dispatch(replies)

    def eof_received(self) -> bool:
        self._fail(f"Redis at {self._where} closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        if exc is None:
            self._fail(f"Redis at {self._where} closed the connection")
        elif isinstance(exc, ssl.SSLError):
            self._fail(f"TLS with Redis at {self._where} failed: {_tls_reason(exc)}")
        else:
            self._fail(f"lost the connection to Redis at {self._where}: {exc!r}")

    # -- both kinds --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The connection is broken or closed: every call raises RedisConnectionError."""
        return self._broken is not None

    def close(self) -> None:
        """Close the connection (idempotent). Waiting callers fail; ``on_lost`` is not called."""
        self._closing = True
        self._fail(f"the connection to Redis at {self._where} is closed")

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the transport let go of the socket."""
        self.close()
        await asyncio.shield(self._lost)

    async def __aenter__(self: _L) -> _L:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _write(self, data: bytes, batch: _Batch) -> None:
        if self._broken is not None:
            raise self._broken
        assert self._transport is not None
        self._pending.append(batch)
        self._transport.write(data)

    def _fail(self, why: str) -> None:
        """Break the connection for good (the first cause wins)."""
        if self._broken is not None:
            return
        self._broken = error = RedisConnectionError(why)
        if self._transport is None:
            if not self._lost.done():
                self._lost.set_result(None)
        elif self._closing:
            self._transport.close()  # what is buffered still goes out
        else:
            self._transport.abort()
        pending, self._pending = self._pending, deque()
        for batch in pending:
            if batch.fail is not None:
                batch.fail(error)
        if self.on_lost is not None and not self._closing:
            self.on_lost(error)

    def _dispatch(self, replies: list[Any]) -> None:
        raise NotImplementedError


def _awaitable() -> tuple[asyncio.Future[Any], Replies, Callable[[RedisConnectionError], object]]:
    """A future and the two callbacks that complete it (a cancelled one stays so)."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def deliver(value: object) -> None:
        if not future.done():
            future.set_result(value)

    def fail(error: RedisConnectionError) -> None:
        if not future.done():
            future.set_exception(error)

    return future, deliver, fail


class RedisConnection(_Link):
    """A command connection; any number of callers may use it at once, and they pipeline.

    Open it with :func:`connect`. See the module docstring for how it works.
    """

    def send(self, commands: Sequence[tuple[Arg, ...]], deliver: Replies) -> None:
        """Write *commands* as one pipeline; *deliver* gets their replies, in order.

        *deliver* is called from ``data_received``; error replies are
        :class:`RedisError` instances in their places. If the connection breaks first,
        it is never called: ``on_lost`` is.

        Raises:
            RedisConnectionError: the connection is already broken or closed.
            ValueError: an empty command, or no command.
        """
        if not commands:
            raise ValueError("no command to send")
        self._write(pack_commands(commands), _Batch(len(commands), deliver, None))

    async def execute(self, *args: Arg) -> Any:
        """Run one command; return its reply: bytes, int, list, or None.

        An error reply raises :class:`RedisError` (and the connection stays usable);
        errors nested in a list reply (``EXEC``, ``EVAL``) stay in the list as instances.
        """
        if not args:
            raise ValueError("empty command")
        (reply,) = await self._roundtrip(_pack(args), 1)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Iterable[Sequence[Arg]]) -> list[Any]:
        """Send several commands in one write; return their replies, in order.

        An error reply does not raise: its :class:`RedisError` takes the reply's place.
        The batch is written contiguously, so no other caller's command comes between its
        commands; it is still no transaction (put MULTI and EXEC in it for that).
        """
        batch = [tuple(command) for command in commands]
        data = pack_commands(batch)  # ValueError for an empty command
        if not batch:
            if self._broken is not None:
                raise self._broken
            return []
        return await self._roundtrip(data, len(batch))

    async def _roundtrip(self, data: bytes, expected: int) -> list[Any]:
        future, deliver, fail = _awaitable()
        self._write(data, _Batch(expected, deliver, fail))
        replies: list[Any] = await future
        return replies

    def _dispatch(self, replies: list[Any]) -> None:
        pending = self._pending
        for reply in replies:
            if not pending:
                self._fail(f"unexpected reply from Redis at {self._where}: {reply!r:.80}")
                return
            batch = pending[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.expected:
                pending.popleft()
                batch.deliver(batch.replies)
                if self._broken is not None:  # the callback closed the connection
                    return


# --------------------------------------------------------------------------------------
# Pub/sub

#: The pushes that carry a message: ``[kind, channel, data]``.
_MESSAGES: Final = frozenset({b"message", b"smessage"})
#: The requests that Redis confirms once per channel, ``[kind, channel, count]``: the
#: confirmation's kind is the verb in lower case.
_VERBS: Final = frozenset({b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe"})


class RedisSubscriber(_Link):
    """A connection in pub/sub mode: sharded (``SSUBSCRIBE``, Redis 7) or classic.

    Open it with :func:`connect_subscriber`. Messages go to ``on_messages``, a burst per
    call; until it is set, they are kept (and handed to it when it is). Requests
    (subscribe, unsubscribe, ping) are answered once Redis confirmed them.
    """

    def __init__(self, where: str, *, sharded: bool) -> None:
        super().__init__(where)
        self.sharded: Final = sharded
        if sharded:
            self._subscribe_verb, self._unsubscribe_verb = b"SSUBSCRIBE", b"SUNSUBSCRIBE"
        else:
            self._subscribe_verb, self._unsubscribe_verb = b"SUBSCRIBE", b"UNSUBSCRIBE"
        self._kinds: deque[bytes] = deque()  # the confirmation each pending request awaits
        self._channels: set[bytes] = set()
        self._kept: list[tuple[bytes, bytes]] = []
        self._on_messages: MessagesCallback | None = None
        self._login = False  # the first batch is the login's (see _open)
        #: A channel Redis drops unasked (its slot moved to another shard) breaks the
        #: connection (a cluster's subscriber: its owner subscribes again elsewhere).
        self.strict = False

    @property
    def on_messages(self) -> MessagesCallback | None:
        """Called with every burst of ``(channel, data)`` received, in order."""
        return self._on_messages

    @on_messages.setter
    def on_messages(self, callback: MessagesCallback | None) -> None:
        self._on_messages = callback
        if callback is not None and self._kept:
            kept, self._kept = self._kept, []
            callback(kept)

    @property
    def channels(self) -> frozenset[bytes]:
        """The channels Redis has confirmed this connection is subscribed to."""
        return frozenset(self._channels)

    # -- callback form -----------------------------------------------------------------

    def request(self, verb: bytes, channels: Sequence[bytes | str], done: Confirmation) -> None:
        """Send ``verb channel...`` (SUBSCRIBE, SSUBSCRIBE, UNSUBSCRIBE, SUNSUBSCRIBE) or
        ``PING`` (no channels); *done* is called once every channel is confirmed (or the
        pong came), with None, or with the :class:`RedisError` Redis answered.

        Raises:
            RedisConnectionError: the connection is already broken or closed.
            ValueError: an unknown verb, or channels missing (or given to PING).
        """

        def deliver(replies: list[Any]) -> None:
            done(next((r for r in replies if isinstance(r, RedisError)), None))

        self._request(verb, channels, deliver, None)

    def _request(
        self,
        verb: bytes,
        channels: Sequence[bytes | str],
        deliver: Replies,
        fail: Callable[[RedisConnectionError], object] | None,
    ) -> None:
        kind = verb.lower()
        if kind == b"ping":
            if channels:
                raise ValueError("PING takes no channel here")
            kind, count = b"pong", 1
        elif kind in _VERBS:
            if not channels:
                raise ValueError(f"{verb.decode()} needs a channel")
            count = len(channels)
        else:
            raise ValueError(f"not a pub/sub request: {verb!r}")
        self._write(_pack((verb, *channels)), _Batch(count, deliver, fail))
        self._kinds.append(kind)

    # -- awaitable form ----------------------------------------------------------------

    async def subscribe(self, *channels: bytes | str) -> None:
        """Subscribe; return once Redis confirmed every channel."""
        if channels:
            await self._await(self._subscribe_verb, channels)

    async def unsubscribe(self, *channels: bytes | str) -> None:
        """Unsubscribe (from every channel if none is named); return once confirmed."""
        channels = channels or tuple(self._channels)
        if channels:
            await self._await(self._unsubscribe_verb, channels)

    async def ping(self) -> None:
        """Round trip to Redis: a liveness check for a connection that only listens."""
        await self._await(b"PING", ())

    async def _await(self, verb: bytes, channels: Sequence[bytes | str]) -> None:
        future, _, fail = _awaitable()

        def deliver(replies: list[Any]) -> None:
            if not future.done():
                error = next((r for r in replies if isinstance(r, RedisError)), None)
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

        self._request(verb, channels, deliver, fail)
        await future

    # -- receiving ---------------------------------------------------------------------

    def _dispatch(self, replies: list[Any]) -> None:
        if self._login:
            replies = self._take_login(replies)
        burst: list[tuple[bytes, bytes]] = []
        for reply in replies:
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if kind in _MESSAGES and len(reply) == 3:
                    burst.append((reply[1], reply[2]))
                    continue
                if kind in (b"subscribe", b"ssubscribe"):
                    self._channels.add(reply[1])
                elif kind in (b"unsubscribe", b"sunsubscribe"):
                    self._channels.discard(reply[1])
                elif kind != b"pong":
                    continue  # a push we did not ask for (pmessage, ...): not ours to judge
            elif reply == b"PONG":  # PING before the first subscription
                kind = b"pong"
            elif isinstance(reply, RedisError) and self._pending:
                kind = self._kinds[0]  # the oldest request's answer: it ends it
                batch = self._pending[0]
                batch.replies.extend([reply] * (batch.expected - len(batch.replies)))
            else:
                self._deliver(burst)
                self._fail(f"unexpected reply from Redis at {self._where}: {reply!r:.80}")
                return
            # A confirmation: for the oldest request, unless Redis sent it unasked (a
            # cluster sends ``sunsubscribe`` when a slot moves away: fatal when strict).
            asked = bool(self._kinds) and self._kinds[0] == kind
            if self.strict and not asked and kind in (b"unsubscribe", b"sunsubscribe"):
                self._deliver(burst)
                self._fail(
                    f"Redis at {self._where} dropped channel {reply[1]!r:.80}: its slot moved"
                )
                return
            if asked:
                batch = self._pending[0]
                if not isinstance(reply, RedisError):
                    batch.replies.append(reply)
                if len(batch.replies) >= batch.expected:
                    self._deliver(burst)  # what came before the confirmation, first
                    burst = []
                    self._pending.popleft()
                    self._kinds.popleft()
                    batch.deliver(batch.replies)
                    if self._broken is not None:
                        return
        self._deliver(burst)

    def _take_login(self, replies: list[Any]) -> list[Any]:
        """Give the login's batch its replies (they are no confirmations); the rest after."""
        batch = self._pending[0]
        take = batch.expected - len(batch.replies)
        batch.replies += replies[:take]
        if len(batch.replies) == batch.expected:
            self._login = False
            self._pending.popleft()
            batch.deliver(batch.replies)
        return replies[take:]

    def _deliver(self, burst: list[tuple[bytes, bytes]]) -> None:
        if burst:
            if self._on_messages is not None:
                self._on_messages(burst)
            else:
                self._kept += burst


# --------------------------------------------------------------------------------------
# Connecting


def _login_failed(address: RedisAddress, why: str) -> str:
    """*why* a connection broke while logging in; over TLS without a client certificate,
    with the likely cause (Redis resets it at once, without a TLS alert)."""
    tls = address.tls
    if tls is not None and tls.cert_file is None:
        return f"{why} (does Redis require a client certificate? see redis-cert)"
    return why


def _tls_reason(exc: ssl.SSLError) -> str:
    """What went wrong, in one line: the verification's message, else OpenSSL's reason."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"the server's certificate is not trusted ({exc.verify_message})"
    return str(exc.reason or exc).replace("_", " ").lower()


async def _open(
    address: RedisAddress,
    connect_timeout: float,
    factory: Callable[[], _Link],
    context: ssl.SSLContext | None,
) -> _Link:
    """Connect (TLS for a ``rediss://`` address), log in
    (:func:`roombus.cluster.resp.handshake_commands`, pipelined) and PING."""
    loop = asyncio.get_running_loop()
    link: _Link | None = None
    if address.tls is None:
        context = None
    elif context is None:
        context = redis_ssl_context(address.tls)
    name = None if address.tls is None else address.server_name

    async def opening() -> _Link:
        nonlocal link
        try:
            if address.unix_path is not None:
                _, link = await loop.create_unix_connection(factory, address.unix_path)
            else:
                _, link = await loop.create_connection(
                    factory,
                    address.host,
                    address.port,
                    ssl=context,
                    server_hostname=name,
                    ssl_shutdown_timeout=None if context is None else connect_timeout,
                )
        except ssl.SSLError as exc:  # before OSError, of which it is a kind
            raise RedisConnectionError(
                f"TLS with Redis at {address} failed: {_tls_reason(exc)}"
            ) from exc
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {address}: {exc}") from exc
        commands = handshake_commands(address)
        future, deliver, fail = _awaitable()
        link._write(pack_commands(commands), _Batch(len(commands), deliver, fail))
        if isinstance(link, RedisSubscriber):
            link._login = True  # its replies are no confirmations
        try:
            replies = await future
        except RedisConnectionError as exc:
            raise RedisConnectionError(_login_failed(address, str(exc))) from None
        check_handshake(replies, address)
        return link

    try:
        return await asyncio.wait_for(opening(), connect_timeout)
    except asyncio.TimeoutError:
        if link is not None:
            link.close()
        raise RedisConnectionError(
            f"timed out connecting to Redis at {address} (after {connect_timeout}s)"
        ) from None
    except BaseException:
        if link is not None:
            link.close()
        raise


async def resolve_primary(
    address: RedisAddress,
    *,
    connect_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> RedisAddress:
    """The primary that the sentinels of a ``redis+sentinel://`` *address* name: asked
    in the URL's order, the first answer wins (:func:`~roombus.cluster.resp.primary_address`).

    Raises :class:`RedisConnectionError` naming each sentinel's failure when none answers.
    """
    errors: list[str] = []
    for sentinel in sentinel_addresses(address):
        try:
            conn = await connect(sentinel, connect_timeout=connect_timeout, ssl_context=ssl_context)
        except (RedisConnectionError, RedisError) as exc:
            errors.append(f"{sentinel}: {exc}")
            continue
        try:
            reply = await asyncio.wait_for(conn.execute(*sentinel_query(address)), connect_timeout)
            return primary_address(address, reply)
        except (RedisConnectionError, RedisError, ValueError, asyncio.TimeoutError) as exc:
            errors.append(f"{sentinel}: {exc or 'no answer in time'}")
        finally:
            await conn.aclose()
    raise RedisConnectionError(
        f"no sentinel named the primary {address.master_name}: {'; '.join(errors)}"
    )


async def connect(
    address: RedisAddress | str,
    *,
    connect_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> RedisConnection:
    """Open a command connection: connect, AUTH and SELECT if the address says so, PING.

    A ``rediss://`` address speaks TLS, with *ssl_context* (None: one made of
    ``address.tls`` by :func:`~roombus.node.cluster.redis_ssl_context`).

    Raises :class:`RedisConnectionError` if Redis cannot be reached within
    ``connect_timeout`` seconds (or TLS fails), :class:`RedisError` if it refuses the
    login or the db.
    """
    if isinstance(address, str):
        address = parse_redis_url(address)
    if address.sentinels:
        address = await resolve_primary(
            address, connect_timeout=connect_timeout, ssl_context=ssl_context
        )
    where = str(address)
    link = await _open(address, connect_timeout, lambda: RedisConnection(where), ssl_context)
    assert isinstance(link, RedisConnection)
    return link


async def connect_subscriber(
    address: RedisAddress | str,
    *,
    sharded: bool,
    connect_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> RedisSubscriber:
    """Open a pub/sub connection (see :func:`connect`); ``sharded`` picks ``SSUBSCRIBE``."""
    if isinstance(address, str):
        address = parse_redis_url(address)
    if address.sentinels:
        address = await resolve_primary(
            address, connect_timeout=connect_timeout, ssl_context=ssl_context
        )
    where = str(address)
    link = await _open(
        address, connect_timeout, lambda: RedisSubscriber(where, sharded=sharded), ssl_context
    )
    assert isinstance(link, RedisSubscriber)
    return link


async def supports_sharded_pubsub(conn: RedisConnection) -> bool:
    """Whether the server has sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, Redis >= 7).

    As :func:`roombus.trio._redis.supports_sharded_pubsub`: ``COMMAND INFO`` first, the
    version from ``INFO server`` where that is denied, and False where both are.
    """
    try:
        reply = await conn.execute(*SHARDED_PROBE)
    except RedisError:
        try:
            info = await conn.execute(*VERSION_PROBE)
        except RedisError:
            return False
        return sharded_from_info(info)
    return sharded_from_command_info(reply)


# --------------------------------------------------------------------------------------
# Redis Cluster (a redis+cluster:// address): one connection per primary


async def _slot_map(conn: RedisConnection, address: RedisAddress, node: Node) -> SlotMap:
    """The map as *node* sees it: ``CLUSTER SHARDS``, or ``CLUSTER SLOTS`` before Redis 7."""
    replies = await conn.pipeline([SHARDS_QUERY, SLOTS_QUERY])
    if not isinstance(replies[0], RedisError):
        return slot_map_from_shards(replies[0], default_host=node[0], tls=address.tls is not None)
    if isinstance(replies[1], RedisError):
        raise replies[1]
    return slot_map_from_slots(replies[1], default_host=node[0])


class ClusterConnection:
    """Commands to a Redis Cluster: each goes to the primary of its key's slot, on one
    :class:`RedisConnection` per primary (opened when first needed), redirections
    followed (:class:`roombus.cluster.slots.Router` decides; this class only sends).

    Open it with :func:`connect_cluster`. Its interface is :class:`RedisConnection`'s:
    :meth:`send` and ``on_lost`` (a connection to a primary that breaks, or a send
    that fails, is reported there once), :meth:`execute`, :meth:`pipeline`.
    """

    def __init__(
        self,
        address: RedisAddress,
        slot_map: SlotMap,
        *,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.address: Final = address
        #: The primary of each slot, as last read (or corrected by a MOVED).
        self.slot_map = slot_map
        self.on_lost: LostCallback | None = None
        self._conns: dict[Node, RedisConnection] = {}
        self._timeout = connect_timeout
        self._context = ssl_context
        self._broken: RedisConnectionError | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def closed(self) -> bool:
        return self._broken is not None

    def _lost(self, error: RedisConnectionError) -> None:
        if self._broken is None:
            self._broken = error
            self._close_all()
            if self.on_lost is not None:
                self.on_lost(error)

    def _close_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in self._conns.values():
            conn.close()

    def close(self) -> None:
        """Close every connection; ``on_lost`` is not called."""
        if self._broken is None:
            self._broken = RedisConnectionError(f"the connection to Redis {self.address} is closed")
        self._close_all()

    async def aclose(self) -> None:
        self.close()
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.aclose()

    def add(self, node: Node, conn: RedisConnection) -> None:
        self._conns[node] = conn
        conn.on_lost = self._lost

    async def _node(self, node: Node) -> RedisConnection:
        conn = self._conns.get(node)
        if conn is None or conn.closed:
            conn = await connect(
                cluster_node(self.address, node),
                connect_timeout=self._timeout,
                ssl_context=self._context,
            )
            if self._broken is not None:
                conn.close()
                raise self._broken
            self.add(node, conn)
        return conn

    def send(self, commands: Sequence[tuple[Arg, ...]], deliver: Replies) -> None:
        """Carry out *commands* (see :meth:`pipeline`); *deliver* gets their replies."""
        if self._broken is not None:
            raise self._broken
        if not commands:
            raise ValueError("no command to send")

        async def run() -> None:
            try:
                replies = await self.pipeline(commands)
            except (RedisConnectionError, RedisError, OSError, ValueError) as exc:
                self._lost(
                    exc
                    if isinstance(exc, RedisConnectionError)
                    else RedisConnectionError(f"Redis {self.address}: {exc}")
                )
                return
            deliver(replies)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def execute(self, *args: Arg) -> Any:
        """Run one command on the primary of its slot; an error reply raises."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Iterable[Sequence[Arg]]) -> list[Any]:
        """Several commands, one pipeline per primary, at once; the replies in order."""
        if self._broken is not None:
            raise self._broken
        router = Router([tuple(c) for c in commands], self.slot_map)
        while not router.done:
            if router.delay:
                await asyncio.sleep(router.delay)
            sends = router.plan()
            results = await asyncio.gather(*(self._send(send) for send in sends))
            for send, replies in zip(sends, results, strict=True):
                router.feed(send, replies)
        self.slot_map = router.slot_map
        if router.refresh:
            await self.refresh()
        return router.replies

    async def _send(self, send: Send) -> list[Any]:
        conn = await self._node(send.node)
        return await conn.pipeline(send.commands)

    async def refresh(self) -> None:
        """Read the slot map again (after a MOVED), from a primary already connected."""
        for node, conn in list(self._conns.items()):
            if not conn.closed:
                slot_map = await _slot_map(conn, self.address, node)
                if slot_map.ranges:
                    self.slot_map = slot_map
                return


async def _cluster_map(
    address: RedisAddress, connect_timeout: float, ssl_context: ssl.SSLContext | None
) -> tuple[SlotMap, Node, RedisConnection]:
    """Ask the seeds in turn for a complete slot map (the first that has one wins)."""
    errors: list[str] = []
    for seed in address.cluster:
        try:
            conn = await connect(
                cluster_node(address, seed),
                connect_timeout=connect_timeout,
                ssl_context=ssl_context,
            )
        except (RedisConnectionError, RedisError) as exc:
            errors.append(f"{seed[0]}:{seed[1]}: {exc}")
            continue
        try:
            slot_map = await asyncio.wait_for(_slot_map(conn, address, seed), connect_timeout)
            if slot_map.complete:
                return slot_map, seed, conn
            errors.append(f"{seed[0]}:{seed[1]}: the cluster does not cover every slot")
        except (RedisConnectionError, RedisError, ValueError, asyncio.TimeoutError) as exc:
            errors.append(f"{seed[0]}:{seed[1]}: {exc or 'no answer in time'}")
        conn.close()
    raise RedisConnectionError(f"no slot map from the Redis {address}: {'; '.join(errors)}")


async def connect_cluster(
    address: RedisAddress | str,
    *,
    connect_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> ClusterConnection:
    """Open a command connection to the Redis Cluster of a ``redis+cluster://``
    *address*: the slot map from its seeds, then a connection to every primary."""
    if isinstance(address, str):
        address = parse_redis_url(address)
    slot_map, seed, first = await _cluster_map(address, connect_timeout, ssl_context)
    cluster = ClusterConnection(
        address, slot_map, connect_timeout=connect_timeout, ssl_context=ssl_context
    )
    if seed in slot_map.primaries:
        cluster.add(seed, first)
    else:
        first.close()
    try:
        for node in slot_map.primaries:
            await cluster._node(node)
    except BaseException:
        cluster.close()
        raise
    return cluster


class ClusterSubscriber:
    """Pub/sub on a Redis Cluster: a :class:`RedisSubscriber` on every primary (as the
    map was when it opened). A sharded channel is subscribed on the primary of its slot
    (one request per slot); a classic one on the first primary (classic messages reach
    every node of a cluster). A channel whose slot moves breaks the subscriber
    (``strict``): its owner subscribes again, with a fresh map.

    Open it with :func:`connect_cluster_subscriber`. Its interface is
    :class:`RedisSubscriber`'s (``request``, ``on_messages``, ``on_lost``).
    """

    def __init__(
        self, address: RedisAddress, slot_map: SlotMap, subs: dict[Node, RedisSubscriber]
    ) -> None:
        self.address: Final = address
        self.slot_map: Final = slot_map
        self._subs = subs
        self._first = next(iter(subs.values()))
        self.sharded: Final = self._first.sharded
        self.on_lost: LostCallback | None = None
        self._on_messages: MessagesCallback | None = None
        self._broken = False
        for sub in subs.values():
            sub.strict = True
            sub.on_lost = self._lost

    def _lost(self, error: RedisConnectionError) -> None:
        if not self._broken:
            self._broken = True
            self.close()
            if self.on_lost is not None:
                self.on_lost(error)

    @property
    def closed(self) -> bool:
        return self._broken or any(sub.closed for sub in self._subs.values())

    @property
    def channels(self) -> frozenset[bytes]:
        return frozenset().union(*(sub.channels for sub in self._subs.values()))

    @property
    def on_messages(self) -> MessagesCallback | None:
        return self._on_messages

    @on_messages.setter
    def on_messages(self, callback: MessagesCallback | None) -> None:
        self._on_messages = callback
        for sub in self._subs.values():
            sub.on_messages = callback

    def close(self) -> None:
        self._broken = True
        for sub in self._subs.values():
            sub.close()

    async def aclose(self) -> None:
        self.close()
        for sub in self._subs.values():
            await sub.aclose()

    def _groups(self, channels: Sequence[bytes | str]) -> list[tuple[RedisSubscriber, list[Any]]]:
        if not self.sharded:
            return [(self._first, list(channels))]
        groups: dict[int, list[Any]] = {}
        for chan in channels:
            slot = command_slot((b"SSUBSCRIBE", chan))
            assert slot is not None
            groups.setdefault(slot, []).append(chan)
        out = []
        for slot, chans in groups.items():
            node = self.slot_map.node_of(slot)
            sub = None if node is None else self._subs.get(node)
            if sub is None:
                raise RedisConnectionError(
                    f"slot {slot} of the Redis {self.address} is on no primary connected"
                )
            out.append((sub, chans))
        return out

    def request(self, verb: bytes, channels: Sequence[bytes | str], done: Confirmation) -> None:
        """:meth:`RedisSubscriber.request` on the shards concerned (PING: on every one);
        *done* once all confirmed, with the first error reply or None."""
        if self._broken:
            raise RedisConnectionError(f"the subscriber to Redis {self.address} is closed")
        if verb.upper() == b"PING":
            parts: list[tuple[RedisSubscriber, list[Any]]] = [(s, []) for s in self._subs.values()]
        elif not channels:
            raise ValueError(f"{verb.decode()} needs a channel")
        else:
            parts = self._groups(channels)
        remaining = len(parts)
        errors: list[RedisError] = []

        def one(error: RedisError | None) -> None:
            nonlocal remaining
            remaining -= 1
            if error is not None:
                errors.append(error)
            if remaining == 0:
                done(errors[0] if errors else None)

        for sub, chans in parts:
            sub.request(verb, chans, one)

    async def _await(self, verb: bytes, channels: Sequence[bytes | str]) -> None:
        future: asyncio.Future[RedisError | None] = asyncio.get_running_loop().create_future()

        def done(error: RedisError | None) -> None:
            if not future.done():
                future.set_result(error)

        self.request(verb, channels, done)
        error = await future
        if error is not None:
            raise error

    async def subscribe(self, *channels: bytes | str) -> None:
        await self._await(b"SSUBSCRIBE" if self.sharded else b"SUBSCRIBE", channels)

    async def unsubscribe(self, *channels: bytes | str) -> None:
        await self._await(b"SUNSUBSCRIBE" if self.sharded else b"UNSUBSCRIBE", channels)

    async def ping(self) -> None:
        await self._await(b"PING", ())


async def connect_cluster_subscriber(
    address: RedisAddress | str,
    *,
    sharded: bool,
    connect_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> ClusterSubscriber:
    """Open a pub/sub connection to the Redis Cluster of a ``redis+cluster://``
    *address*: a subscriber on every primary of the map its seeds give."""
    if isinstance(address, str):
        address = parse_redis_url(address)
    slot_map, _, conn = await _cluster_map(address, connect_timeout, ssl_context)
    conn.close()
    subs: dict[Node, RedisSubscriber] = {}
    try:
        for node in slot_map.primaries:
            subs[node] = await connect_subscriber(
                cluster_node(address, node),
                sharded=sharded,
                connect_timeout=connect_timeout,
                ssl_context=ssl_context,
            )
    except BaseException:
        for sub in subs.values():
            sub.close()
        raise
    return ClusterSubscriber(address, slot_map, subs)
