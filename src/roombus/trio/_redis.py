"""
A minimal Redis client for trio, on hiredis: what a pub/sub backplane needs, no more.

hiredis does the protocol (RESP2): :func:`hiredis.pack_command` encodes a command and a
:class:`hiredis.Reader` parses replies. This module does the I/O.

Theory of operation
-------------------
There are no background tasks. A connection needs no nursery, and nothing keeps running
once it is dropped; the tasks that wait on a connection drive it themselves.

A connection has two *roles*, the sender and the receiver, and its waiting tasks take
them in turn (leader/follower). A caller appends its encoded command to the output
buffer and a *slot* to the FIFO of pending replies -- synchronously, so the order of the
bytes and the order of the slots agree. Then, until its slot is complete, it

* sends the output buffer, if nobody is sending. Commands that other tasks append while
  the sender waits for the socket go out with the next write: under load, many commands
  per system call;
* else receives, if nobody is receiving: it parses every reply that arrived, gives each
  to the slot at the head of the FIFO and wakes that slot's task;
* else sleeps until its slot is complete or it is asked to take over a role.

A task that leaves (its reply arrived, or it was cancelled) hands the roles it leaves
unattended to the oldest task still waiting. One reply wakes one task and any number of
tasks pipeline at once, so throughput is bounded by Redis and parsing, not round trips.
A lock held across write and read would allow one command per round trip instead; a
reader task would need a nursery, and would outlive a forgotten connection.

Cancellation is safe. The socket is written with ``socket.send``, which reports exactly
what went out, so a cancelled sender leaves the rest in the buffer for the next one (and
interrupts the receiver if nobody else is left to send it). A cancelled caller leaves its
slot in the FIFO, abandoned, to swallow its reply; its command may or may not have run.

Anything wrong with the transport -- a socket error, EOF, a reply that does not parse or
that nobody asked for -- breaks the connection for good: ``closed`` becomes true and
every waiting and later caller gets :class:`RedisConnectionError`. Reconnecting (and
resubscribing) is the owner's policy, not this module's.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import hiredis

import trio

__all__ = [
    "Arg",
    "RedisAddress",
    "RedisConnection",
    "RedisConnectionError",
    "RedisError",
    "RedisSubscriber",
    "connect",
    "connect_subscriber",
    "parse_redis_url",
    "supports_sharded_pubsub",
]

#: A command argument, as :func:`hiredis.pack_command` accepts it (str is sent as UTF-8).
Arg: TypeAlias = "bytes | memoryview | str | int | float"

DEFAULT_PORT: Final = 6379
RECEIVE_SIZE: Final = 65536

# hiredis's stub types the argument as a 1-tuple and leaves the result untyped.
_pack = cast("Callable[[tuple[Arg, ...]], bytes]", hiredis.pack_command)


class _Incomplete:
    """What ``Reader.gets()`` returns when no whole reply is buffered.

    Its default, False, would be indistinguishable from a RESP3 boolean; a private
    sentinel cannot be confused with any reply.
    """


_INCOMPLETE: Final = _Incomplete()


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-WRONGPASS ...``): ``str(exc)`` is its text.

    The connection that received it is still fine.
    """


class RedisConnectionError(Exception):
    """The connection to Redis is gone: refused, timed out, reset, closed, or garbled.

    Once raised for a connection, it is raised for every later call on it too.
    """


def _parser() -> hiredis.Reader:
    return hiredis.Reader(replyError=RedisError, notEnoughData=_INCOMPLETE)


# --------------------------------------------------------------------------------------
# Addresses


@attrs.frozen
class RedisAddress:
    """Where a Redis server is and how to log in: what a ``redis://`` URL says.

    With ``unix_path`` set, ``host`` and ``port`` are ignored. The password is left out of
    ``repr()`` so that logging an address does not leak it.
    """

    host: str = "localhost"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            where = f"unix:{self.unix_path}"
        elif ":" in self.host:
            where = f"[{self.host}]:{self.port}"
        else:
            where = f"{self.host}:{self.port}"
        return where if self.db == 0 else f"{where} db {self.db}"


_DIGITS: Final = re.compile(r"[0-9]+")


def _parse_db(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"bad Redis URL: the db must be a number >= 0, not {text!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path[?db=N]``.

    ``?db=N`` and ``?password=...`` are accepted in the query of either form (the unix form
    has no other place for them). Anything unexpected is a :class:`ValueError` that says
    what is wrong -- without echoing the URL, which may hold a password.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise ValueError(f"bad Redis URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "rediss":
        raise ValueError("TLS to Redis is not supported (rediss://): use redis:// or unix://")
    if scheme not in ("redis", "unix"):
        shown = f"{scheme}://" if scheme else "none"
        raise ValueError(f"bad Redis URL: the scheme must be redis:// or unix://, not {shown}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("bad Redis URL: the port must be a number from 1 to 65535")

    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("db", "password"):
            raise ValueError(f"bad Redis URL: unknown query parameter {name!r}")
        if name in query:
            raise ValueError(f"bad Redis URL: query parameter {name!r} given twice")
        query[name] = value

    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if "password" in query:
        if password is not None:
            raise ValueError("bad Redis URL: the password is given twice")
        password = query["password"] or None
    if username is not None and password is None:
        raise ValueError("bad Redis URL: a username needs a password (redis://user:password@host)")

    db = _parse_db(query["db"]) if "db" in query else 0

    if scheme == "unix":
        if parts.hostname or port is not None:
            raise ValueError(
                "bad Redis URL: a unix:// URL names no host; write unix:///path/to/socket"
            )
        path = unquote(parts.path)
        if not path or path == "/":
            raise ValueError("bad Redis URL: unix:// needs a socket path (unix:///path/to/socket)")
        return RedisAddress(db=db, username=username, password=password, unix_path=path)

    if not parts.hostname:
        raise ValueError("bad Redis URL: no host (redis://host[:port][/db])")
    path = parts.path.removeprefix("/")
    if path:
        if "db" in query:
            raise ValueError("bad Redis URL: the db is given twice (path and ?db=)")
        db = _parse_db(path)
    return RedisAddress(
        host=parts.hostname,
        port=DEFAULT_PORT if port is None else port,
        db=db,
        username=username,
        password=password,
    )


# --------------------------------------------------------------------------------------
# The transport shared by both kinds of connection


class _Wire(trio.abc.AsyncResource):
    """A socket, its output buffer, its parser, and who currently sends and receives.

    Subclasses queue work and wait for it in the loop described in the module docstring;
    they say how replies are dispatched and whom to wake.
    """

    def __init__(self, stream: trio.SocketStream, where: str) -> None:
        self._stream = stream
        self._sock = stream.socket
        self._where = where
        self._parser = _parser()
        self._out = bytearray()
        self._sending = False
        self._receiving = False
        self._receive_scope: trio.CancelScope | None = None
        self._broken: str | None = None
        self._cause: BaseException | None = None

    @property
    def closed(self) -> bool:
        """True once the connection is unusable: closed, or broken by an error."""
        return self._broken is not None

    def _error(self) -> RedisConnectionError:
        # A new exception for each caller: one instance raised in several tasks would
        # collect all their tracebacks.
        error = RedisConnectionError(self._broken)
        error.__cause__ = self._cause
        return error

    async def _raise_if_closed(self) -> None:
        if self._broken is not None:
            await trio.lowlevel.checkpoint()
            raise self._error()

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        """Break the connection: close the socket, which wakes a task blocked on it."""
        if self._broken is not None:
            return
        self._broken = message
        self._cause = cause
        self._out.clear()
        self._sock.close()
        self._on_fail()

    def _on_fail(self) -> None:
        raise NotImplementedError

    def _dispatch(self, reply: Any) -> None:
        raise NotImplementedError

    async def _send(self) -> None:
        """Take the sender role; write the output buffer until it is empty."""
        self._sending = True
        try:
            while self._out:
                # The bytearray itself, not a memoryview of it: a view would forbid other
                # tasks to append while we wait for the socket. Retries send the longer buffer.
                sent = await self._sock.send(self._out)
                del self._out[:sent]
        except (OSError, trio.ClosedResourceError) as exc:
            self._fail(f"lost the connection to Redis at {self._where}: {exc!r}", exc)
        finally:
            self._sending = False

    async def _receive(self) -> None:
        """Take the receiver role; read once and dispatch every complete reply."""
        self._receiving = True
        data = b""
        try:
            # A cancel scope of our own, so that a sender that gives up can make the
            # receiver come back and send (see _interrupt_receiver). An interrupted recv
            # has received nothing.
            with trio.CancelScope() as scope:
                self._receive_scope = scope
                data = await self._sock.recv(RECEIVE_SIZE)
            if scope.cancelled_caught:
                return
        except (OSError, trio.ClosedResourceError) as exc:
            self._fail(f"lost the connection to Redis at {self._where}: {exc!r}", exc)
            return
        finally:
            self._receive_scope = None
            self._receiving = False
        if self._broken is not None:
            return
        if not data:
            self._fail(f"Redis at {self._where} closed the connection")
            return
        parser = self._parser
        parser.feed(data)
        try:
            while self._broken is None:
                reply = parser.gets()
                if reply is _INCOMPLETE:
                    break
                self._dispatch(reply)
        except hiredis.ProtocolError as exc:
            self._fail(f"garbled reply from Redis at {self._where}: {exc}", exc)

    def _interrupt_receiver(self) -> None:
        """If bytes wait to be sent and nobody sends, stop the receiver so it sends them.

        Otherwise the last live caller could wait in ``recv`` for the reply to a command
        that a cancelled sender left in the buffer.
        """
        if self._out and not self._sending and self._receive_scope is not None:
            self._receive_scope.cancel()

    async def aclose(self) -> None:
        """Close the connection. Waiting callers get :class:`RedisConnectionError`."""
        self._fail(f"the connection to Redis at {self._where} is closed")
        await self._stream.aclose()


# --------------------------------------------------------------------------------------
# Commands


@attrs.define(eq=False)
class _Slot:
    """The replies that one caller waits for, and how to wake it."""

    expected: int
    replies: list[Any] = attrs.field(factory=list)
    done: bool = False
    #: The caller gave up (cancelled); the slot only swallows its replies.
    abandoned: bool = False
    #: Set to wake the caller; replaced each time it goes to sleep.
    wake: trio.Event | None = None


class RedisConnection(_Wire):
    """A command connection; many tasks may use it at once, and their commands pipeline.

    Open it with :func:`connect`. See the module docstring for how it works.
    """

    def __init__(self, stream: trio.SocketStream, where: str = "redis") -> None:
        super().__init__(stream, where)
        self._pending: deque[_Slot] = deque()

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
        if not all(batch):  # Redis would never answer an empty command
            raise ValueError("empty command in pipeline")
        if not batch:
            await trio.lowlevel.checkpoint()
            return []
        return await self._roundtrip(b"".join(map(_pack, batch)), len(batch))

    async def _roundtrip(self, data: bytes, expected: int) -> list[Any]:
        await self._raise_if_closed()
        slot = _Slot(expected)
        self._out += data
        self._pending.append(slot)
        try:
            while not slot.done:
                if self._broken is not None:
                    raise self._error()
                if self._out and not self._sending:
                    await self._send()
                elif not self._receiving:
                    await self._receive()
                else:
                    # No checkpoint between the checks above and this wait: whoever
                    # changes the roles or completes the slot sees this event.
                    slot.wake = wake = trio.Event()
                    await wake.wait()
        finally:
            if not slot.done:
                slot.abandoned = True
            self._hand_over()
        return slot.replies

    def _hand_over(self) -> None:
        """Wake the oldest live caller if a role is needed and nobody holds it."""
        if self._broken is not None:
            return
        if (self._out and not self._sending) or (self._pending and not self._receiving):
            for slot in self._pending:
                if not slot.abandoned:
                    if slot.wake is not None:
                        slot.wake.set()
                    break
            self._interrupt_receiver()

    def _dispatch(self, reply: Any) -> None:
        if not self._pending:
            self._fail(f"unexpected reply from Redis at {self._where}: {reply!r:.80}")
            return
        slot = self._pending[0]
        slot.replies.append(reply)
        if len(slot.replies) == slot.expected:
            self._pending.popleft()
            slot.done = True
            if slot.wake is not None:
                slot.wake.set()

    def _on_fail(self) -> None:
        for slot in self._pending:
            if slot.wake is not None:
                slot.wake.set()
        self._pending.clear()


# --------------------------------------------------------------------------------------
# Pub/sub


@attrs.define(eq=False)
class _Request:
    """A (un)subscribe or ping waiting for its confirmations, which arrive in order."""

    kind: bytes
    remaining: int
    done: bool = False
    error: RedisError | None = None


class RedisSubscriber(_Wire):
    """A connection in pub/sub mode: sharded (``SSUBSCRIBE``, Redis 7) or classic.

    Open it with :func:`connect_subscriber`. Receive-driven: there is no reader task.
    Whoever calls :meth:`receive`, :meth:`subscribe`, :meth:`unsubscribe` or :meth:`ping`
    reads the socket while it waits (one at a time, as in the module docstring). Messages
    read while waiting for a confirmation are queued, never dropped, and :meth:`receive`
    returns them in order, before reporting a lost connection.

    The queue is unbounded: keep a task in :meth:`receive` (or ``async for`` over
    :meth:`messages`). If nobody reads, Redis buffers and, past its
    ``client-output-buffer-limit pubsub``, disconnects the subscriber.
    """

    def __init__(self, stream: trio.SocketStream, *, sharded: bool, where: str = "redis") -> None:
        super().__init__(stream, where)
        self.sharded: Final = sharded
        if sharded:
            self._subscribe, self._unsubscribe = b"SSUBSCRIBE", b"SUNSUBSCRIBE"
            self._message = b"smessage"
        else:
            self._subscribe, self._unsubscribe = b"SUBSCRIBE", b"UNSUBSCRIBE"
            self._message = b"message"
        self._subscribed_kind = self._subscribe.lower()
        self._unsubscribed_kind = self._unsubscribe.lower()
        self._messages: deque[tuple[bytes, bytes]] = deque()
        self._pending: deque[_Request] = deque()
        self._channels: set[bytes] = set()
        self._changed = trio.Event()

    @property
    def channels(self) -> frozenset[bytes]:
        """The channels Redis has confirmed this connection is subscribed to."""
        return frozenset(self._channels)

    async def subscribe(self, *channels: bytes | str) -> None:
        """Subscribe; return once Redis confirmed every channel.

        From then on, whatever is published to these channels will be received.
        """
        if not channels:
            await trio.lowlevel.checkpoint()
            return
        await self._request((self._subscribe, *channels), self._subscribed_kind, len(channels))

    async def unsubscribe(self, *channels: bytes | str) -> None:
        """Unsubscribe (from every channel if none is named); return once confirmed.

        Messages already queued are still delivered.
        """
        if not channels:
            channels = tuple(self._channels)
            if not channels:
                await trio.lowlevel.checkpoint()
                return
        await self._request((self._unsubscribe, *channels), self._unsubscribed_kind, len(channels))

    async def ping(self) -> None:
        """Round trip to Redis: a liveness check for a connection that only listens."""
        await self._request((b"PING",), b"pong", 1)

    async def receive(self) -> tuple[bytes, bytes]:
        """Return the next ``(channel, data)``; raise :class:`RedisConnectionError` when lost."""
        await trio.lowlevel.checkpoint()
        try:
            while not self._messages:
                if self._broken is not None:
                    raise self._error()
                await self._step()
        finally:
            self._hand_over()
        return self._messages.popleft()

    async def receive_many(self) -> list[tuple[bytes, bytes]]:
        """Wait for the next message, then return it with every one already read after it.

        A consumer that hands a whole burst on at once lets its own writes coalesce.
        """
        batch = [await self.receive()]
        messages = self._messages
        while messages:
            batch.append(messages.popleft())
        return batch

    def messages(self) -> RedisSubscriber:
        """``async for channel, data in sub.messages()``: :meth:`receive` until lost."""
        return self

    def __aiter__(self) -> RedisSubscriber:
        return self

    async def __anext__(self) -> tuple[bytes, bytes]:
        return await self.receive()

    async def _request(self, args: tuple[Arg, ...], kind: bytes, count: int) -> None:
        await self._raise_if_closed()
        request = _Request(kind, count)
        self._out += _pack(args)
        self._pending.append(request)
        try:
            while not request.done:
                if self._broken is not None:
                    raise self._error()
                await self._step()
        finally:
            self._hand_over()
        if request.error is not None:
            raise request.error

    async def _step(self) -> None:
        """Take a free role, or sleep until something changes."""
        if self._out and not self._sending:
            await self._send()
        elif not self._receiving:
            await self._receive()
        else:
            await self._changed.wait()

    def _notify(self) -> None:
        # A broadcast: a subscriber has few waiters (a consumer, a few subscribe calls).
        self._changed.set()
        self._changed = trio.Event()

    def _hand_over(self) -> None:
        # Unlike a command connection, a subscriber has waiters that no pending request
        # records (receive() calls), so any unattended role is worth a broadcast.
        if self._broken is None and (not self._receiving or (self._out and not self._sending)):
            self._notify()
            self._interrupt_receiver()

    def _dispatch(self, reply: Any) -> None:
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == self._message and len(reply) == 3:
                self._messages.append((reply[1], reply[2]))
                self._notify()
                return
            if kind == self._subscribed_kind:
                self._channels.add(reply[1])
            elif kind == self._unsubscribed_kind:
                self._channels.discard(reply[1])
            elif kind != b"pong":
                return  # a push we did not ask for (pmessage, ...): not ours to judge
        elif reply == b"PONG":  # PING before the first subscription
            kind = b"pong"
        elif isinstance(reply, RedisError):
            if not self._pending:
                self._fail(f"unexpected error from Redis at {self._where}: {reply}")
                return
            request = self._pending.popleft()
            request.error = reply
            request.done = True
            self._notify()
            return
        else:
            self._fail(f"unexpected reply from Redis at {self._where}: {reply!r:.80}")
            return
        # A confirmation: for the oldest request, unless Redis sent it unasked (a cluster
        # sends ``sunsubscribe`` when a slot moves away).
        if self._pending and self._pending[0].kind == kind:
            request = self._pending[0]
            request.remaining -= 1
            if request.remaining == 0:
                self._pending.popleft()
                request.done = True
                self._notify()

    def _on_fail(self) -> None:
        self._notify()


# --------------------------------------------------------------------------------------
# Connecting


async def _handshake(stream: trio.SocketStream, address: RedisAddress) -> None:
    """Log in, select the db and PING, pipelined in one round trip.

    The PING makes :func:`connect` prove that a Redis server answers (and accepts us),
    rather than leave that to the first command.
    """
    commands: list[tuple[Arg, ...]] = []
    if address.password is not None:
        if address.username is None:
            commands.append((b"AUTH", address.password))
        else:
            commands.append((b"AUTH", address.username, address.password))
    if address.db:
        commands.append((b"SELECT", address.db))
    commands.append((b"PING",))
    parser = _parser()
    replies: list[Any] = []
    try:
        await stream.send_all(b"".join(_pack(command) for command in commands))
        while len(replies) < len(commands):
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise RedisConnectionError(
                    f"Redis at {address} closed the connection while logging in"
                )
            parser.feed(data)
            while (reply := parser.gets()) is not _INCOMPLETE:
                replies.append(reply)
    except (OSError, trio.BrokenResourceError) as exc:
        raise RedisConnectionError(f"lost the connection to Redis at {address}: {exc!r}") from exc
    except hiredis.ProtocolError as exc:
        raise RedisConnectionError(f"{address} does not speak the Redis protocol: {exc}") from exc
    for reply in replies:
        if isinstance(reply, RedisError):
            raise reply


async def _open(address: RedisAddress, connect_timeout: float) -> trio.SocketStream:
    with trio.move_on_after(connect_timeout):
        try:
            if address.unix_path is not None:
                stream = await trio.open_unix_socket(address.unix_path)
            else:
                stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {address}: {exc}") from exc
        try:
            await _handshake(stream, address)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream
    raise RedisConnectionError(
        f"timed out connecting to Redis at {address} (after {connect_timeout}s)"
    )


async def connect(address: RedisAddress | str, *, connect_timeout: float = 5.0) -> RedisConnection:
    """Open a command connection: connect, AUTH and SELECT if the address says so, PING.

    Raises :class:`RedisConnectionError` if Redis cannot be reached within
    ``connect_timeout`` seconds, :class:`RedisError` if it refuses the login or the db.
    """
    if isinstance(address, str):
        address = parse_redis_url(address)
    return RedisConnection(await _open(address, connect_timeout), str(address))


async def connect_subscriber(
    address: RedisAddress | str, *, sharded: bool, connect_timeout: float = 5.0
) -> RedisSubscriber:
    """Open a pub/sub connection (see :func:`connect`); ``sharded`` picks ``SSUBSCRIBE``."""
    if isinstance(address, str):
        address = parse_redis_url(address)
    stream = await _open(address, connect_timeout)
    return RedisSubscriber(stream, sharded=sharded, where=str(address))


_VERSION: Final = re.compile(rb"^redis_version:(\d+)\.(\d+)", re.MULTILINE)


async def supports_sharded_pubsub(conn: RedisConnection) -> bool:
    """Whether the server has sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, Redis >= 7).

    ``COMMAND INFO`` answers ``[nil]`` for an unknown command; where ``COMMAND`` is
    disabled (some hosted services), the version from ``INFO server`` decides, and where
    that is denied too, the answer is False: classic pub/sub works everywhere.
    """
    try:
        reply = await conn.execute(b"COMMAND", b"INFO", b"SPUBLISH")
    except RedisError:
        try:
            info = await conn.execute(b"INFO", b"server")
        except RedisError:
            return False
        found = _VERSION.search(info) if isinstance(info, bytes) else None
        return found is not None and (int(found[1]), int(found[2])) >= (7, 0)
    return isinstance(reply, list) and bool(reply) and reply[0] is not None
