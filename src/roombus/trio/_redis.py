"""
A minimal Redis client for trio, on hiredis: what a pub/sub backplane needs, no more.

:mod:`roombus.cluster.resp` does the protocol (RESP2, with hiredis's encoder and parser): URLs,
commands to bytes, bytes to replies, the login and the sharded pub/sub probe. This module
does the I/O. It needs hiredis (``pip install 'roombus[redis]'``) to be imported.

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

TLS (a ``rediss://`` address) is done here too, on the same socket, with an
:class:`ssl.SSLObject` over memory buffers rather than :class:`trio.SSLStream`: a
sender encrypts the whole output buffer at once into a second buffer of TLS records,
which goes out with ``socket.send`` as before, so a cancelled sender still leaves the
rest for the next one (a cancelled ``SSLStream.send_all`` would break the stream).
What is received is decrypted before it is parsed; TLS records that carry no data
(session tickets) wake nobody.

Anything wrong with the transport -- a socket error, a TLS error, EOF, a reply that
does not parse or that nobody asked for -- breaks the connection for good: ``closed``
becomes true and every waiting and later caller gets :class:`RedisConnectionError`.
Reconnecting (and resubscribing) is the owner's policy, not this module's.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

import trio

from ..cluster.resp import (
    INCOMPLETE,
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

RECEIVE_SIZE: Final = 65536

# Here, not on first use: without hiredis, importing this module (and so the backplane)
# fails at once with a ModuleNotFoundError that names the extra to install.
_pack: Final = packer()


class RedisConnectionError(Exception):
    """The connection to Redis is gone: refused, timed out, reset, closed, or garbled.

    Once raised for a connection, it is raised for every later call on it too.
    """


# --------------------------------------------------------------------------------------
# TLS over the socket


class _TLS:
    """An :class:`ssl.SSLObject` over two memory buffers: plain bytes <-> TLS records."""

    def __init__(self, context: ssl.SSLContext, server_name: str) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.object = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_name)

    def encrypt(self, data: bytes | bytearray) -> bytes:
        """The TLS records of *data* (and of anything else the session has to say)."""
        plain = bytes(data)  # no view: the caller's bytearray must stay resizable
        while plain:
            plain = plain[self.object.write(plain) :]
        return self._outgoing.read()

    def decrypt(self, data: bytes) -> bytes:
        """The plain bytes that *data* completes (maybe none). ``ssl.SSLError`` if garbled;
        :class:`EOFError` if the server ended the session (close_notify)."""
        self._incoming.write(data)
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self.object.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise EOFError from None
            if not chunk:
                raise EOFError
            chunks.append(chunk)
        return b"".join(chunks)

    def pending(self) -> bytes:
        """What the session wants sent without being asked (a key update's answer)."""
        return self._outgoing.read()

    async def handshake(self, stream: trio.SocketStream) -> None:
        """Run the TLS handshake over *stream* (ssl.SSLError, OSError, EOFError if refused)."""
        while True:
            try:
                self.object.do_handshake()
            except ssl.SSLWantReadError:
                out = self._outgoing.read()
                if out:
                    await stream.send_all(out)
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise EOFError from None
                self._incoming.write(data)
            else:
                out = self._outgoing.read()
                if out:
                    await stream.send_all(out)
                return


# --------------------------------------------------------------------------------------
# The transport shared by both kinds of connection


class _Wire(trio.abc.AsyncResource):
    """A socket, its output buffer, its parser, and who currently sends and receives.

    Subclasses queue work and wait for it in the loop described in the module docstring;
    they say how replies are dispatched and whom to wake.
    """

    def __init__(self, stream: trio.SocketStream, where: str, tls: _TLS | None = None) -> None:
        self._stream = stream
        self._sock = stream.socket
        self._where = where
        self._parser = new_reader()
        self._out = bytearray()
        #: With TLS: the records of what left ``_out``, not all sent yet.
        self._tls = tls
        self._records = bytearray()
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
        self._records.clear()
        self._sock.close()
        self._on_fail()

    def _on_fail(self) -> None:
        raise NotImplementedError

    def _dispatch(self, reply: Any) -> None:
        raise NotImplementedError

    @property
    def _unsent(self) -> bool:
        """Bytes wait to go out (commands, or TLS records of them)."""
        return bool(self._out or self._records)

    async def _send(self) -> None:
        """Take the sender role; write the output buffer until it is empty."""
        self._sending = True
        try:
            tls = self._tls
            while self._out or self._records:
                if tls is None:
                    buffer = self._out
                else:
                    if self._out:  # all of it: records, not commands, are what is cut
                        self._records += tls.encrypt(self._out)
                        self._out.clear()
                    buffer = self._records
                # The bytearray itself, not a memoryview of it: a view would forbid other
                # tasks to append while we wait for the socket. Retries send the longer buffer.
                sent = await self._sock.send(buffer)
                del buffer[:sent]
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
        if self._tls is not None:
            try:
                data = self._tls.decrypt(data)
            except EOFError:
                self._fail(f"Redis at {self._where} closed the connection")
                return
            except ssl.SSLError as exc:
                self._fail(f"TLS error from Redis at {self._where}: {exc}", exc)
                return
            self._records += self._tls.pending()
            if not data:
                return
        parser = self._parser
        parser.feed(data)
        try:
            while self._broken is None:
                reply = parser.gets()
                if reply is INCOMPLETE:
                    break
                self._dispatch(reply)
        except RespProtocolError as exc:
            self._fail(f"garbled reply from Redis at {self._where}: {exc}", exc)

    def _interrupt_receiver(self) -> None:
        """If bytes wait to be sent and nobody sends, stop the receiver so it sends them.

        Otherwise the last live caller could wait in ``recv`` for the reply to a command
        that a cancelled sender left in the buffer.
        """
        if self._unsent and not self._sending and self._receive_scope is not None:
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

    def __init__(
        self, stream: trio.SocketStream, where: str = "redis", tls: _TLS | None = None
    ) -> None:
        super().__init__(stream, where, tls)
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
        data = pack_commands(batch)  # ValueError for an empty command
        if not batch:
            await trio.lowlevel.checkpoint()
            return []
        return await self._roundtrip(data, len(batch))

    async def _roundtrip(self, data: bytes, expected: int) -> list[Any]:
        await self._raise_if_closed()
        slot = _Slot(expected)
        self._out += data
        self._pending.append(slot)
        try:
            while not slot.done:
                if self._broken is not None:
                    raise self._error()
                if self._unsent and not self._sending:
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
        if (self._unsent and not self._sending) or (self._pending and not self._receiving):
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

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        sharded: bool,
        where: str = "redis",
        tls: _TLS | None = None,
    ) -> None:
        super().__init__(stream, where, tls)
        self.sharded: Final = sharded
        if sharded:
            self._subscribe, self._unsubscribe = b"SSUBSCRIBE", b"SUNSUBSCRIBE"
            self._message = b"smessage"
        else:
            self._subscribe, self._unsubscribe = b"SUBSCRIBE", b"UNSUBSCRIBE"
            self._message = b"message"
        #: A channel Redis drops unasked (its slot moved to another shard) breaks the
        #: connection (a cluster's subscriber: its owner subscribes again elsewhere).
        self.strict = False
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
        if self._unsent and not self._sending:
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
        if self._broken is None and (not self._receiving or (self._unsent and not self._sending)):
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
        # sends ``sunsubscribe`` when a slot moves away: fatal when ``strict``).
        if (
            self.strict
            and kind == self._unsubscribed_kind
            and not (self._pending and self._pending[0].kind == kind)
        ):
            self._fail(f"Redis at {self._where} dropped channel {reply[1]!r:.80}: its slot moved")
            return
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


async def _handshake(stream: trio.SocketStream, address: RedisAddress, tls: _TLS | None) -> None:
    """Log in, select the db and PING (:func:`roombus.cluster.resp.handshake_commands`), pipelined
    in one round trip (after the TLS handshake, with TLS); raise the first error reply.
    """
    commands = handshake_commands(address)
    parser = new_reader()
    replies: list[Any] = []
    try:
        data = pack_commands(commands)
        if tls is not None:
            await tls.handshake(stream)
            data = tls.encrypt(data)
        await stream.send_all(data)
        while len(replies) < len(commands):
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise EOFError
            if tls is not None:
                data = tls.decrypt(data)
                pending = tls.pending()
                if pending:
                    await stream.send_all(pending)
            replies += parse(parser, data)
    except EOFError:
        raise RedisConnectionError(
            _login_failed(address, f"Redis at {address} closed the connection while logging in")
        ) from None
    except ssl.SSLError as exc:  # before OSError, of which it is a kind
        reason = _tls_reason(exc)
        raise RedisConnectionError(f"TLS with Redis at {address} failed: {reason}") from exc
    except (OSError, trio.BrokenResourceError) as exc:
        raise RedisConnectionError(
            _login_failed(address, f"lost the connection to Redis at {address}: {exc!r}")
        ) from exc
    except RespProtocolError as exc:
        raise RedisConnectionError(f"{address} does not speak the Redis protocol: {exc}") from exc
    check_handshake(replies, address)


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
    address: RedisAddress, connect_timeout: float, context: ssl.SSLContext | None
) -> tuple[trio.SocketStream, _TLS | None]:
    tls = None
    if address.tls is not None:
        if context is None:
            context = redis_ssl_context(address.tls)
        tls = _TLS(context, address.server_name)
    with trio.move_on_after(connect_timeout):
        try:
            if address.unix_path is not None:
                stream = await trio.open_unix_socket(address.unix_path)
            else:
                stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {address}: {exc}") from exc
        try:
            await _handshake(stream, address, tls)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream, tls
    raise RedisConnectionError(
        f"timed out connecting to Redis at {address} (after {connect_timeout}s)"
    )


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
            with trio.fail_after(connect_timeout):
                reply = await conn.execute(*sentinel_query(address))
            return primary_address(address, reply)
        except (RedisConnectionError, RedisError, ValueError, trio.TooSlowError) as exc:
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
    stream, tls = await _open(address, connect_timeout, ssl_context)
    return RedisConnection(stream, str(address), tls)


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
    stream, tls = await _open(address, connect_timeout, ssl_context)
    return RedisSubscriber(stream, sharded=sharded, where=str(address), tls=tls)


async def supports_sharded_pubsub(conn: RedisConnection) -> bool:
    """Whether the server has sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, Redis >= 7).

    ``COMMAND INFO`` answers ``[nil]`` for an unknown command; where ``COMMAND`` is
    disabled (some hosted services), the version from ``INFO server`` decides, and where
    that is denied too, the answer is False: classic pub/sub works everywhere.
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

    Open it with :func:`connect_cluster`. Its interface is :class:`RedisConnection`'s.
    """

    def __init__(
        self,
        address: RedisAddress,
        slot_map: SlotMap,
        conns: dict[Node, RedisConnection],
        *,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.address: Final = address
        #: The primary of each slot, as last read (or corrected by a MOVED).
        self.slot_map = slot_map
        self._conns = conns
        self._timeout = connect_timeout
        self._context = ssl_context
        self._broken: str | None = None

    @property
    def closed(self) -> bool:
        """A connection to a primary broke (or :meth:`aclose`): unusable for good."""
        return self._broken is not None or any(c.closed for c in self._conns.values())

    async def _node(self, node: Node) -> RedisConnection:
        conn = self._conns.get(node)
        if conn is None or conn.closed:
            conn = await connect(
                cluster_node(self.address, node),
                connect_timeout=self._timeout,
                ssl_context=self._context,
            )
            if self._broken is not None:
                await conn.aclose()
                raise RedisConnectionError(self._broken)
            self._conns[node] = conn
        return conn

    async def execute(self, *args: Arg) -> Any:
        """Run one command on the primary of its slot; an error reply raises."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Iterable[Sequence[Arg]]) -> list[Any]:
        """Several commands, one pipeline per primary, at once; the replies in order
        (error replies in their places, as :meth:`RedisConnection.pipeline`)."""
        if self._broken is not None:
            await trio.lowlevel.checkpoint()
            raise RedisConnectionError(self._broken)
        router = Router([tuple(c) for c in commands], self.slot_map)
        while not router.done:
            if router.delay:
                await trio.sleep(router.delay)
            sends = router.plan()
            results: dict[int, list[Any] | BaseException] = {}
            async with trio.open_nursery() as nursery:
                for i, send in enumerate(sends):
                    nursery.start_soon(self._send, i, send, results)
            for i, send in enumerate(sends):
                result = results[i]
                if isinstance(result, BaseException):
                    raise result
                router.feed(send, result)
        self.slot_map = router.slot_map
        if router.refresh:
            await self.refresh()
        return router.replies

    async def _send(
        self, i: int, send: Send, results: dict[int, list[Any] | BaseException]
    ) -> None:
        try:
            conn = await self._node(send.node)
            results[i] = await conn.pipeline(send.commands)
        except (RedisConnectionError, RedisError) as exc:
            results[i] = exc

    async def refresh(self) -> None:
        """Read the slot map again (after a MOVED), from a primary already connected."""
        for node, conn in list(self._conns.items()):
            if conn.closed:
                continue
            slot_map = await _slot_map(conn, self.address, node)
            if slot_map.ranges:
                self.slot_map = slot_map
                return

    async def aclose(self) -> None:
        """Close every connection."""
        self._broken = f"the connection to Redis {self.address} is closed"
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.aclose()


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
            with trio.fail_after(connect_timeout):
                slot_map = await _slot_map(conn, address, seed)
            if slot_map.complete:
                return slot_map, seed, conn
            errors.append(f"{seed[0]}:{seed[1]}: the cluster does not cover every slot")
        except (RedisConnectionError, RedisError, ValueError, trio.TooSlowError) as exc:
            errors.append(f"{seed[0]}:{seed[1]}: {exc or 'no answer in time'}")
        await conn.aclose()
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
    conns = {seed: first} if seed in slot_map.primaries else {}
    if not conns:
        await first.aclose()
    cluster = ClusterConnection(
        address, slot_map, conns, connect_timeout=connect_timeout, ssl_context=ssl_context
    )
    try:
        for node in slot_map.primaries:
            await cluster._node(node)
    except BaseException:
        with trio.CancelScope(shield=True):
            await cluster.aclose()
        raise
    return cluster


class ClusterSubscriber:
    """Pub/sub on a Redis Cluster: a :class:`RedisSubscriber` on every primary (as the
    map was when it opened). A sharded channel is subscribed on the primary of its slot
    (one ``SSUBSCRIBE`` per slot); a classic one on the first primary (classic messages
    reach every node of a cluster). A channel whose slot moves breaks the subscriber
    (``strict``): its owner subscribes again, with a fresh map.

    Open it with :func:`connect_cluster_subscriber`. Its interface is
    :class:`RedisSubscriber`'s.
    """

    def __init__(
        self, address: RedisAddress, slot_map: SlotMap, subs: dict[Node, RedisSubscriber]
    ) -> None:
        self.address: Final = address
        self.slot_map: Final = slot_map
        self.sharded: Final = next(iter(subs.values())).sharded
        self._subs = subs
        self._first = next(iter(subs.values()))
        self._messages: deque[tuple[bytes, bytes]] = deque()
        self._error: BaseException | None = None
        for sub in subs.values():
            sub.strict = True

    @property
    def closed(self) -> bool:
        return any(sub.closed for sub in self._subs.values())

    @property
    def channels(self) -> frozenset[bytes]:
        return frozenset().union(*(sub.channels for sub in self._subs.values()))

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

    async def _all(self, calls: list[tuple[Any, tuple[Any, ...]]]) -> None:
        errors: list[BaseException] = []

        async def run(call: Any, args: tuple[Any, ...]) -> None:
            try:
                await call(*args)
            except (RedisConnectionError, RedisError) as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for call, args in calls:
                nursery.start_soon(run, call, args)
        if errors:
            raise errors[0]

    async def subscribe(self, *channels: bytes | str) -> None:
        """Subscribe each channel on its shard; return once every one is confirmed."""
        await self._all([(sub.subscribe, tuple(c)) for sub, c in self._groups(channels)])

    async def unsubscribe(self, *channels: bytes | str) -> None:
        """Unsubscribe the channels (every one if none is named)."""
        if not channels:
            await self._all([(sub.unsubscribe, ()) for sub in self._subs.values()])
            return
        await self._all([(sub.unsubscribe, tuple(c)) for sub, c in self._groups(channels)])

    async def ping(self) -> None:
        """PING every primary's subscriber."""
        await self._all([(sub.ping, ()) for sub in self._subs.values()])

    async def receive_many(self) -> list[tuple[bytes, bytes]]:
        """The next burst of messages of any shard (a reader per shard while it waits;
        the others are cancelled, which loses nothing)."""
        if not self._messages and self._error is None:
            async with trio.open_nursery() as nursery:
                for sub in self._subs.values():
                    nursery.start_soon(self._read, sub, nursery.cancel_scope)
        if self._messages:
            batch = list(self._messages)
            self._messages.clear()
            return batch
        assert self._error is not None
        raise self._error

    async def _read(self, sub: RedisSubscriber, scope: trio.CancelScope) -> None:
        try:
            self._messages.extend(await sub.receive_many())
        except RedisConnectionError as exc:
            if self._error is None:
                self._error = exc
        scope.cancel()

    async def aclose(self) -> None:
        for sub in self._subs.values():
            await sub.aclose()


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
    await conn.aclose()
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
        with trio.CancelScope(shield=True):
            for sub in subs.values():
                await sub.aclose()
        raise
    return ClusterSubscriber(address, slot_map, subs)
