"""The roombus client on asyncio: streams, tasks and the clock around the protocol."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs

from ..core.streams import Position
from ._driver import DriverBase, TokenSource
from .protocol import ClientOptions, Event, OpenConnection, Outcome, Phase
from .wire import ClientWire

#: How long a close handshake may take before the socket is closed anyway.
CLOSE_TIMEOUT = 2.0
_READ_SIZE = 65536

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
StreamFactory = Callable[[], Awaitable[Streams]]


@attrs.define(eq=False)
class _Conn:
    action: OpenConnection
    task: asyncio.Task[None] | None = None
    wire: ClientWire | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    timer: asyncio.TimerHandle | None = None


class Client(DriverBase):
    """
    A roombus client on asyncio; made by :func:`connect`.

    Iterate it for events (:mod:`roombus.client.protocol`'s event classes); publish
    with :meth:`publish`. It reconnects by itself and resumes every room from its
    position; see docs/client.md.
    """

    def __init__(
        self,
        url: str,
        rooms: Iterable[str],
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
        self._loop = asyncio.get_running_loop()
        self._ssl = ssl_context
        self._factory = stream_factory
        self._conns: dict[int, _Conn] = {}
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._changed = asyncio.Event()
        self._readable = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._quiet = asyncio.Event()  # set while no connection task runs
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
            self._readable.clear()
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
        waiter = self._waiters[pub_id] = self._loop.create_future()
        self.transmit()
        return self._result(await asyncio.shield(waiter))

    def close(self) -> None:
        """Stop: close the connection; waiting publishes fail."""
        self.protocol.close(self._now())
        self.transmit()

    # -- the driver ---------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time()

    async def run(self) -> None:
        """The timer: runs until the client is closed."""
        proto = self.protocol
        proto.start(self._now())
        self.transmit()
        while proto.phase is not Phase.CLOSED:
            deadline = proto.next_deadline()
            self._changed.clear()
            timeout = None if deadline is None else max(deadline - self._now(), 0.0)
            with suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
            proto.handle_timer(self._now())
            self.transmit()

    def _wake(self) -> None:
        self._changed.set()
        self._readable.set()

    def _settle(self, pub_id: str, outcome: Outcome) -> None:
        waiter = self._waiters.pop(pub_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    def _open(self, action: OpenConnection) -> None:
        conn = self._conns[action.gen] = _Conn(action)
        self._quiet.clear()
        conn.task = self._spawn(self._connection(conn))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _wire(self, gen: int) -> ClientWire | None:
        conn = self._conns.get(gen)
        return conn.wire if conn is not None and conn.writer is not None else None

    def _write(self, gen: int, wire: ClientWire) -> None:
        conn = self._conns.get(gen)
        if conn is not None and conn.writer is not None:
            data = wire.take_output()
            if data and not conn.writer.is_closing():
                conn.writer.write(data)

    def _closing(self, gen: int) -> None:
        conn = self._conns.get(gen)
        if conn is not None and conn.timer is None:
            conn.timer = self._loop.call_later(CLOSE_TIMEOUT, self._abort, gen)

    def _abort(self, gen: int) -> None:
        conn = self._conns.get(gen)
        if conn is not None and conn.task is not None:
            conn.task.cancel()

    async def _streams(self) -> Streams:
        if self._factory is not None:
            return await self._factory()
        a = self.address
        if a.secure:
            context = self._ssl or ssl.create_default_context()
            return await asyncio.open_connection(a.host, a.port, ssl=context)
        return await asyncio.open_connection(a.host, a.port)

    async def _connection(self, conn: _Conn) -> None:
        gen = conn.action.gen
        proto = self.protocol
        try:
            try:
                token = await self._token()
            except Exception as exc:  # the application's callback
                proto.failed(gen, self._now(), reason=f"get_token failed: {exc!r}")
                return
            try:
                conn.reader, writer = await self._streams()
            except (OSError, ssl.SSLError) as exc:
                proto.failed(gen, self._now(), reason=f"cannot connect: {exc}")
                return
            conn.wire = wire = self._new_wire(conn.action.target, token)
            conn.writer = writer
            self._write(gen, wire)
            await self._reader(conn)
            self._write(gen, wire)  # the close reply
        except asyncio.CancelledError:
            pass  # an abort, or a close that took too long: the protocol decided
        finally:
            self._conns.pop(gen, None)
            if not self._conns:
                self._quiet.set()
            if conn.timer is not None:
                conn.timer.cancel()
            if conn.writer is not None:
                conn.writer.close()
            proto.closed(gen, self._now(), None, "connection lost")
            self.transmit()

    async def _reader(self, conn: _Conn) -> None:
        assert conn.reader is not None and conn.wire is not None
        gen = conn.action.gen
        while True:
            try:
                data = await conn.reader.read(_READ_SIZE)
            except (OSError, ssl.SSLError):
                data = b""
            events = conn.wire.receive(data or None)
            self._write(gen, conn.wire)
            ended = self._dispatch(gen, events)
            self.transmit()
            if ended or not data:
                return


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
    *stream_factory* replaces the TCP connection (it returns a reader and a writer).
    """
    client = Client(
        url,
        rooms,
        username=username,
        get_token=get_token,
        positions=positions,
        options=options,
        headers=headers,
        ssl_context=ssl_context,
        stream_factory=stream_factory,
        rng=rng,
    )
    runner = client._spawn(client.run())
    try:
        yield client
    finally:
        client.close()
        with suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(client._quiet.wait(), CLOSE_TIMEOUT + 1)
        for task in list(client._tasks):
            task.cancel()
        await asyncio.gather(runner, *client._tasks, return_exceptions=True)
