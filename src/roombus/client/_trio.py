"""The roombus client on trio: sockets, tasks and the clock around the protocol."""

from __future__ import annotations

import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs

import trio

from ..core.streams import Position
from ._driver import DriverBase, TokenSource
from .protocol import ClientOptions, Event, OpenConnection, Outcome, Phase
from .wire import ClientWire

#: How long a close handshake may take before the socket is closed anyway.
CLOSE_TIMEOUT = 2.0
_READ_SIZE = 65536

StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]


@attrs.define(eq=False)
class _Conn:
    action: OpenConnection
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    wire: ClientWire | None = None
    stream: trio.abc.Stream | None = None
    writable: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class _Waiter:
    done: trio.Event = attrs.field(factory=trio.Event)
    outcome: Outcome | None = None


class Client(DriverBase):
    """
    A roombus client on trio; made by :func:`connect`.

    Iterate it for events (:mod:`roombus.client.protocol`'s event classes); publish
    with :meth:`publish`. It reconnects by itself and resumes every room from its
    position; see docs/client.md.
    """

    def __init__(
        self,
        url: str,
        rooms: Iterable[str],
        nursery: trio.Nursery,
        *,
        username: str | None = None,
        get_token: TokenSource | None = None,
        positions: Mapping[str, Position] | None = None,
        options: ClientOptions | None = None,
        headers: Iterable[tuple[str, str]] = (),
        ssl_context: ssl.SSLContext | None = None,
        stream_factory: StreamFactory | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            url,
            rooms,
            username=username,
            get_token=get_token,
            positions=positions,
            options=options,
            headers=headers,
            rng=rng,
        )
        self._nursery = nursery
        self._ssl = ssl_context
        self._factory = stream_factory
        self._conns: dict[int, _Conn] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._changed = trio.Event()
        self._readable = trio.Event()
        self._quiet = trio.Event()  # set while no connection task runs
        self._quiet.set()

    # -- the application's side --------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while True:
            event = self._next()
            if event is not None:
                return event
            if self.closed:
                raise StopAsyncIteration
            self._readable = trio.Event()
            await self._readable.wait()

    async def publish(self, room: str, content: Any) -> Position:
        """
        Publish *content* to *room*; returns its position once the server acknowledged
        it. It is kept and resent (with the same id, so it is published once) across
        reconnects until then; cancelling the wait does not withdraw it.

        Raises:
            PublishError: the server refused it (``code``), or the client closed first.
            OutboxFull, NotInRoom, ClientClosed: at once, nothing is sent.
        """
        pub_id = self.protocol.publish(room, content)
        waiter = self._waiters[pub_id] = _Waiter()
        self.transmit()
        await waiter.done.wait()
        assert waiter.outcome is not None
        return self._result(waiter.outcome)

    def close(self) -> None:
        """Stop: close the connection; waiting publishes fail."""
        self.protocol.close(self._now())
        self.transmit()

    # -- the driver ---------------------------------------------------------------------

    def _now(self) -> float:
        return trio.current_time()

    async def run(self) -> None:
        """The timer: runs until the client is closed."""
        proto = self.protocol
        proto.start(self._now())
        self.transmit()
        while proto.phase is not Phase.CLOSED:
            deadline = proto.next_deadline()
            self._changed = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._changed.wait()
            proto.handle_timer(self._now())
            self.transmit()

    def _wake(self) -> None:
        self._changed.set()
        self._readable.set()

    def _settle(self, pub_id: str, outcome: Outcome) -> None:
        waiter = self._waiters.pop(pub_id, None)
        if waiter is not None:
            waiter.outcome = outcome
            waiter.done.set()

    def _open(self, action: OpenConnection) -> None:
        conn = self._conns[action.gen] = _Conn(action)
        if self._quiet.is_set():
            self._quiet = trio.Event()
        self._nursery.start_soon(self._connection, conn)

    def _wire(self, gen: int) -> ClientWire | None:
        conn = self._conns.get(gen)
        return conn.wire if conn is not None else None

    def _write(self, gen: int, wire: ClientWire) -> None:
        conn = self._conns.get(gen)
        if conn is not None:
            conn.writable.set()

    def _closing(self, gen: int) -> None:
        conn = self._conns.get(gen)
        if conn is not None:
            conn.scope.deadline = min(conn.scope.deadline, trio.current_time() + CLOSE_TIMEOUT)

    def _abort(self, gen: int) -> None:
        conn = self._conns.get(gen)
        if conn is not None:
            conn.scope.cancel()

    async def _stream(self) -> trio.abc.Stream:
        if self._factory is not None:
            return await self._factory()
        a = self.address
        stream: trio.abc.Stream = await trio.open_tcp_stream(a.host, a.port)
        if a.secure:
            tls = trio.SSLStream(
                stream, self._ssl or ssl.create_default_context(), server_hostname=a.host
            )
            await tls.do_handshake()
            stream = tls
        return stream

    async def _connection(self, conn: _Conn) -> None:
        gen = conn.action.gen
        proto = self.protocol
        try:
            with conn.scope:
                try:
                    token = await self._token()
                except Exception as exc:  # the application's callback
                    proto.failed(gen, self._now(), reason=f"get_token failed: {exc!r}")
                    return
                try:
                    conn.stream = await self._stream()
                except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                    proto.failed(gen, self._now(), reason=f"cannot connect: {exc}")
                    return
                conn.wire = self._new_wire(conn.action.target, token)
                conn.writable.set()  # the handshake request
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self._writer, conn)
                    await self._reader(conn)
                    tasks.cancel_scope.cancel()
                await self._flush(conn)
        finally:
            self._conns.pop(gen, None)
            if not self._conns:
                self._quiet.set()
            if conn.stream is not None:
                await trio.aclose_forcefully(conn.stream)
            # Cancelled (an abort, a close taking too long): the protocol decided.
            proto.closed(gen, self._now(), None, "connection lost")
            self.transmit()

    async def _reader(self, conn: _Conn) -> None:
        assert conn.stream is not None and conn.wire is not None
        gen = conn.action.gen
        while True:
            try:
                data = bytes(await conn.stream.receive_some(_READ_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            events = conn.wire.receive(data or None)
            conn.writable.set()
            ended = self._dispatch(gen, events)
            self.transmit()
            if ended or not data:
                return

    async def _writer(self, conn: _Conn) -> None:
        while True:
            await conn.writable.wait()
            conn.writable = trio.Event()
            if not await self._flush(conn):
                conn.scope.cancel()
                return

    async def _flush(self, conn: _Conn) -> bool:
        assert conn.stream is not None and conn.wire is not None
        data = conn.wire.take_output()
        if not data:
            return True
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        return True


@asynccontextmanager
async def connect(
    url: str,
    rooms: Iterable[str] = (),
    *,
    username: str | None = None,
    get_token: TokenSource | None = None,
    positions: Mapping[str, Position] | None = None,
    options: ClientOptions | None = None,
    headers: Iterable[tuple[str, str]] = (),
    ssl_context: ssl.SSLContext | None = None,
    stream_factory: StreamFactory | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[Client]:
    """
    A client of the roombus server at *url* (``ws://host:port/ws``), in *rooms*.

    The client connects in the background, and reconnects after every loss, until the
    block ends (or a final refusal: its ``Disconnected`` event has ``final=True``).
    *stream_factory* replaces the TCP connection (e.g. an in-memory stream to a server
    in the same process: :func:`roombus.client.testing.connect`).
    """
    async with trio.open_nursery() as nursery:
        client = Client(
            url,
            rooms,
            nursery,
            username=username,
            get_token=get_token,
            positions=positions,
            options=options,
            headers=headers,
            ssl_context=ssl_context,
            stream_factory=stream_factory,
            rng=rng,
        )
        nursery.start_soon(client.run)
        try:
            yield client
        finally:
            client.close()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT + 1):
                await client._quiet.wait()
            nursery.cancel_scope.cancel()
