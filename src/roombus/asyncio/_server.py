"""
The asyncio adapter: transports, callbacks and the loop's clock around a sans-IO
:class:`~roombus.server.framed.FramedHub`, in the image of :mod:`roombus.trio`.

Theory of operation
-------------------
Every connection is an :class:`asyncio.BufferedProtocol` (on a TCP or TLS transport,
or on an in-memory one: :meth:`Server.connect_in_memory`). Its reads land in the
server's one receive buffer and are copied out at once. What arrives goes to the hub,
and the hub's outputs are carried out (:meth:`Server.transmit`) before the callback
returns. asyncio runs one callback at a time, so the hub (and the buffer) need no lock.

Writing never blocks a broadcast, and never grows without bound. The hub frames a
broadcast once and appends the same bytes to each receiver's send queue; one *flush*
callback, scheduled once however many queues became dirty, writes every dirty queue
(frames that pile up meanwhile go out together). A burst of messages in one read is
handled a batch at a time (the hub's ``INPUT_BATCH``): reading pauses, and the rest
is read after the next flush. ``transport.write()`` never blocks:
it buffers what the kernel refuses. So the adapter writes to a connection only while
its transport has not asked to pause (``pause_writing``, past the buffer's high-water
mark); a paused connection's frames stay in its bounded send queue, where the hub's
slow-consumer policy sees them, and go out on ``resume_writing``. A timer handle
fires at the hub's next deadline (heartbeats, handshake and close timeouts), and hands
over to the hub two loop iterations later, so that input that arrived by then (after a
stall of the loop: pongs waiting unread) is read before any verdict.

Shutdown (leaving :func:`serve`'s ``async with``, or cancelling ``await serve()``)
stops accepting, has the hub close everyone with 1001, and gives the clients
``close_timeout`` to answer. A drain (:meth:`Server.drain`) comes first when asked
for: the listeners stay open (``/healthz`` answers 503, upgrades are refused with 503)
while the hub closes the WebSockets with 1001 over ``drain_seconds``, at the instants
of its schedule (the timer handle fires for them); then the shutdown.

In a cluster (``backplane=``, a :class:`roombus.asyncio.RedisBackplane`), the backplane
runs on the same loop: the hub's backplane work goes to it after every hub call (in
:meth:`Server.transmit`), and what it learns comes back through
:meth:`Server.backplane_events`. At shutdown, the goodbyes (presence leaves) go out
before the link closes, within ``close_timeout``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Final, Protocol, final

from ..core.actions import BackplaneAction
from ..core.config import BrokerConfig
from ..core.names import ConnectionId
from ..node.assemble import build_broker
from ..node.facade import ServerFacade
from ..node.facade import wall as _wall
from ..node.metrics import ServerMetrics
from ..node.settings import Settings
from ..node.tuning import BUSY_SWEEP, RECEIVE_SIZE, WRITE_DELAY
from ..server.config import ServerConfig
from ..server.framed import FramedHub
from ..server.peer import peer_label
from ..server.queues import SendQueue
from ._memory import HIGH_WATER, transport_pair


class Backplane(Protocol):
    """What the server needs of its backplane: :class:`roombus.asyncio.RedisBackplane`
    (named structurally here, so that a single node never imports it, nor hiredis)."""

    @property
    def node_id(self) -> str: ...

    def metrics(self) -> dict[str, float]: ...

    def start(self, host: Server) -> None: ...

    def submit(self, work: list[BackplaneAction]) -> None: ...

    async def wait_idle(self) -> None: ...

    async def aclose(self) -> None: ...


class _Protocol(asyncio.BufferedProtocol):
    """
    One connection: hands the loop's callbacks to the server.

    Reads land in the server's one receive buffer (:meth:`get_buffer`), and what was
    read is copied out of it at once: asyncio's own reads (``data_received``) allocate
    256 KiB per read, which glibc serves with ``mmap`` and ``munmap`` (a system call
    pair, and a page fault, per read). The in-memory transports call
    :meth:`data_received`.
    """

    def __init__(self, server: Server, api: bool = False) -> None:
        self.server = server
        self.api = api  # accepted on the API's own listener
        self.transport: asyncio.Transport | None = None
        self.cid: ConnectionId | None = None  # None once the hub let go of it
        self.paused = False  # the transport's buffer is over its high-water mark
        self.stalled: SendQueue | None = None  # frames that wait for resume_writing
        self.held = False  # reading paused: the hub has not read all of a burst yet
        self.eof = False  # the end of stream came while held

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.server._open(self, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server._buffer

    def buffer_updated(self, nbytes: int) -> None:
        server = self.server
        server._receive(self, server._buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        self.server._receive(self, data)

    def eof_received(self) -> bool:
        self.server._receive(self, None)
        return True  # keep the transport open: the last bytes may still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.server._resume(self)


@final
class Server(ServerFacade):
    """
    A running roombus server: the hub, its connections, and the way in for an app.

    Get one from :func:`serve` (one made directly listens nowhere: it serves the
    connections of :meth:`connect_in_memory` only). All methods are synchronous (but
    :meth:`aclose`) and must be called from the thread of the event loop that runs the
    server.

    Args:
        settings, config, legacy: As for :func:`serve`.

    Attributes:
        settings: What it was made of (:class:`roombus.Settings`).
        hub: The sans-IO hub (connections, send queues, broker).
        broker: The core (read-only use: ``rooms``, ``members()``, ``statistics()``).
        config: The server's transport settings.
        port: The TCP port actually bound (useful with ``port=0``).
    """

    def __init__(
        self,
        settings: Settings | BrokerConfig | None = None,
        config: ServerConfig | None = None,
        **legacy: Any,
    ) -> None:
        settings = Settings.from_legacy(settings, config, **legacy)
        #: What the server was made of.
        self.settings: Final = settings
        broker_config, config = settings.broker, settings.server
        on_notice, authenticator = settings.on_notice, settings.authenticator
        authorizer, backplane = settings.authorizer, _backplane(settings)
        self.hub: FramedHub = FramedHub(
            config=config,
            on_notice=on_notice,
            authenticator=authenticator,
            broker=build_broker(
                broker_config,
                authorizer=authorizer,
                authenticator=authenticator,
                node=backplane.node_id if backplane is not None else None,
            ),
        )
        #: The link to the other nodes of a cluster, or None for a server on its own.
        self.backplane = backplane
        if backplane is not None:
            self.hub.extra_metrics = backplane.metrics
        #: The server's Prometheus registry and ``/metrics`` text (its own registry).
        self.metrics: Final = ServerMetrics(self.hub, transport="asyncio")
        #: TLS for accepted connections (``wss://``), or None for plain TCP.
        self.ssl_context = settings.ssl_context
        self.broker = self.hub.broker
        self.config = self.hub.config
        self.port: int | None = None
        #: The port of the API's own listener (``api_port``), or None without one.
        self.api_port: int | None = None
        self._loop = asyncio.get_running_loop()
        self._links: dict[ConnectionId, _Protocol] = {}
        # Every read lands here (one callback runs at a time), and is copied out at once.
        self._buffer = memoryview(bytearray(RECEIVE_SIZE))
        self._listeners: list[asyncio.AbstractServer] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_delay = 0.0
        self._held: list[_Protocol] = []  # to read the rest of a burst after the flush
        self._timer: asyncio.TimerHandle | None = None
        self._all_closed = asyncio.Event()
        self._drained = asyncio.Event()  # a drain closed (or lost) every WebSocket
        self._stopped = asyncio.Event()  # aclose() is done

    # -- public API for the embedding app ----------------------------------------------

    def _now(self) -> float:
        return self._loop.time()

    def _waiter(self) -> asyncio.Event:
        return asyncio.Event()

    async def drain(self, seconds: float | None = None) -> None:
        """
        Shut down gracefully, spread over time, and return once the server stopped
        (``await serve()`` then returns too). What ``roombus serve`` does on SIGTERM:

        1. at once, ``/healthz`` answers 503 ``draining`` (load balancers stop
           sending clients here) and WebSocket upgrades 503 with ``Retry-After``; the
           listeners stay open to say so;
        2. the open WebSockets are closed with 1001 (``server draining``), each at a
           jittered instant spread over *seconds*, so that their clients reconnect
           elsewhere a few at a time; the others still get their messages meanwhile
           (in a cluster too: nothing is lost, clients resume from their positions);
        3. once all are closed (by the window's end), :meth:`aclose`: the listeners
           close and the clients get ``close_timeout`` to answer.

        :meth:`aclose` meanwhile (a second signal: cancel this first) closes the rest
        at once.

        Args:
            seconds: The window; None: ``config.drain_seconds``. 0: close all at once.
        """
        hub = self.hub
        loop = self._loop
        if not hub.shutting_down:
            if not hub.draining:
                hub.drain(now=loop.time(), timestamp=_wall(), seconds=seconds)
                self.transmit()
            end = hub.drain_ends
            assert end is not None
            try:
                await asyncio.wait_for(self._drained.wait(), max(0.0, end - loop.time()))
            except asyncio.TimeoutError:
                pass  # the last closes fall due now: aclose() makes them (hub.shutdown)
        await self.aclose()

    async def aclose(self) -> None:
        """
        Shut down gracefully: stop accepting, close every client with 1001, and wait at
        most ``config.close_timeout`` seconds for them (then drop the rest). Idempotent.
        """
        hub = self.hub
        if not hub.shutting_down:
            for listener in self._listeners:
                listener.close()
            hub.shutdown(now=self._loop.time(), timestamp=_wall())
            self.transmit()
        if self._links:
            try:
                await asyncio.wait_for(self._all_closed.wait(), self.config.close_timeout + 1.0)
            except asyncio.TimeoutError:
                pass  # the hub drops every transport by close_timeout; this is the backstop
            for proto in list(self._links.values()):
                if proto.transport is not None:
                    proto.transport.abort()
        for listener in self._listeners:
            await listener.wait_closed()
        if self.backplane is not None:
            # The goodbyes (presence leaves) go out before the link closes.
            try:
                await asyncio.wait_for(self.backplane.wait_idle(), self.config.close_timeout)
            except asyncio.TimeoutError:
                pass
            await self.backplane.aclose()
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._stopped.set()

    def connect_in_memory(
        self, *, peer: str = "memory", limit: int = 64 * 1024
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """
        A client connection to this server over memory, no socket: the client's reader
        and writer, as :func:`asyncio.open_connection` gives them
        (:func:`roombus.client.testing.connect` connects a client with it).

        The server serves it as a TCP connection: the same protocol, hub and send
        queues (the opening request, frames, heartbeats, presence, positions, slow
        consumers, shutdown). Only the socket is replaced, by two in-memory transports
        with a socket's flow control and endings: what the client leaves unread waits
        in the server's transport buffer, and past ``config.socket_send_buffer`` bytes
        (64 KiB if 0) the server pauses writing to it, so that its frames wait in its
        bounded send queue as for a TCP client that does not read. Closing either end
        is an end of stream for the other (after what was written), an abort a reset;
        :meth:`aclose` ends these connections as it ends TCP ones.

        A server made directly (``Server(settings)`` in a running loop, not by
        :func:`serve`) listens nowhere: it serves these only (``aclose()`` it at the end).

        Args:
            peer: The connection's peer label (as a TCP client's address, in notices).
            limit: The client reader's buffer limit (as for ``open_connection``).

        Raises:
            ConnectionRefusedError: the server is shutting down, or shut down.
        """
        if self.hub.shutting_down:
            raise ConnectionRefusedError("the server is shutting down")
        ours, theirs = transport_pair(
            self._loop,
            left={"peername": peer, "sockname": "memory"},
            right={"peername": "memory", "sockname": peer},
        )
        ours.set_write_buffer_limits(high=self.config.socket_send_buffer or HIGH_WATER)
        reader = asyncio.StreamReader(limit=limit)
        client = asyncio.StreamReaderProtocol(reader)
        theirs.set_protocol(client)
        client.connection_made(theirs)
        proto = _Protocol(self)
        ours.set_protocol(proto)
        proto.connection_made(ours)  # as a listener's: Server._open
        return reader, asyncio.StreamWriter(theirs, client, reader, self._loop)

    # -- binding -----------------------------------------------------------------------

    async def _listen(self) -> None:
        config = self.config
        listener = await self._bind(config.host, config.port, api=False)
        self.port = listener.sockets[0].getsockname()[1]
        if config.api_port is not None:
            listener = await self._bind(config.api_host, config.api_port, api=True)
            self.api_port = listener.sockets[0].getsockname()[1]

    async def _bind(self, host_name: str, port: int, *, api: bool) -> asyncio.Server:
        config = self.config
        host: str | None = host_name
        if port == 0:
            # One address only, so that ``port`` is unambiguous (as in roombus.trio).
            infos = await self._loop.getaddrinfo(
                host_name, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            host = str(infos[0][4][0])
        listener = await self._loop.create_server(
            lambda: _Protocol(self, api),
            host,
            port,
            backlog=config.backlog,
            reuse_address=True,
            ssl=self.ssl_context,
            ssl_handshake_timeout=config.handshake_timeout if self.ssl_context else None,
        )
        self._listeners.append(listener)
        return listener

    # -- the protocols' callbacks ------------------------------------------------------

    def _open(self, proto: _Protocol, transport: asyncio.Transport) -> None:
        proto.transport = transport
        addr = transport.get_extra_info("peername")
        peer = peer_label(addr)
        size = self.config.socket_send_buffer
        sock = transport.get_extra_info("socket")
        if size and sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            except OSError:  # the client already reset
                pass
        cid = self.hub.open(now=self._loop.time(), peer=peer, api=proto.api)
        proto.cid = cid
        self._links[cid] = proto
        self.transmit()

    def _receive(self, proto: _Protocol, data: bytes | None) -> None:
        cid = proto.cid
        if cid is None:
            return
        if data is None and proto.held:
            proto.eof = True  # after the rest of the burst
            return
        hub = self.hub
        hub.receive(cid, data, now=self._loop.time(), timestamp=_wall())
        self.transmit()
        if proto.cid is not None and hub.input_pending(cid):
            self._hold(proto)

    def _hold(self, proto: _Protocol) -> None:
        """
        The hub read part of a burst: stop reading, and go on with the rest after the
        next flush, so that each part's broadcasts are written before the next part
        is read (the queues' bounds are for slow readers only).
        """
        if not proto.held:
            proto.held = True
            if proto.transport is not None:
                proto.transport.pause_reading()
        self._held.append(proto)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_all)

    def _read_more(self, proto: _Protocol) -> None:
        cid = proto.cid
        if cid is None:
            return
        hub = self.hub
        hub.receive(cid, b"", now=self._loop.time(), timestamp=_wall())
        self.transmit()
        if proto.cid is None:
            return
        if hub.input_pending(cid):
            self._hold(proto)
            return
        proto.held = False
        if proto.transport is not None and not proto.transport.is_closing():
            proto.transport.resume_reading()
        if proto.eof:
            proto.eof = False
            self._receive(proto, None)

    def _lost(self, proto: _Protocol) -> None:
        cid = proto.cid
        if cid is not None:
            proto.cid = None
            del self._links[cid]
            self.hub.lost(cid, now=self._loop.time(), timestamp=_wall())
            self.transmit()

    def _resume(self, proto: _Protocol) -> None:
        queue = proto.stalled
        cid = proto.cid
        if queue is not None and cid is not None:
            proto.stalled = None
            self._write(cid, proto, queue, self._loop.time())
            self.transmit()

    # -- carrying out the hub's outputs ------------------------------------------------

    def transmit(self) -> None:
        """Carry out the hub's outputs, after every hub call: the four steps of
        :class:`~roombus.node.facade.ServerFacade`, in their order; then wake
        :meth:`aclose` once the last connection is gone."""
        hub = self.hub
        loop = self._loop
        # 1. close: the transport goes (what it buffered still goes out) and the hub
        # forgets the connection now (connection_lost comes later, or never).
        while to_close := hub.take_to_close():
            now = loop.time()
            for cid in to_close:
                proto = self._links.pop(cid, None)
                if proto is not None:
                    proto.cid = None
                    self._end(proto)
                hub.lost(cid, now=now, timestamp=_wall())
        # 2. write: one flush callback writes every dirty queue.
        if self._flush_handle is None and hub.has_dirty():
            if self._flush_delay:
                self._flush_handle = loop.call_later(self._flush_delay, self._flush_all)
            else:
                self._flush_handle = loop.call_soon(self._flush_all)
        # 3. backplane: the broker's work for the other nodes.
        if self.backplane is not None:
            work = hub.take_backplane()
            if work:
                self.backplane.submit(work)
        # 4. timer
        if hub.deadline_moved:
            hub.deadline_moved = False
            self._arm_timer()
        if hub.shutting_down and not self._links:
            self._all_closed.set()
        if hub.draining and hub.drain_done:
            self._drained.set()

    def _end(self, proto: _Protocol) -> None:
        """Close a transport the hub is done with; what it buffered still goes out."""
        transport = proto.transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            # A peer that never reads again would keep it open forever.
            self._loop.call_later(self.config.close_timeout, transport.abort)

    def _flush_all(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # a no-op when it is the handle running this
            self._flush_handle = None
        links = self._links
        dirty = self.hub.take_dirty()
        now = self._loop.time()  # the sweep's: one clock read, not one per queue
        for cid, queue in dirty:
            proto = links.get(cid)
            if proto is not None:
                self._write(cid, proto, queue, now)
        self._flush_delay = WRITE_DELAY if len(dirty) >= BUSY_SWEEP else 0.0
        self.hub.enforce_budget(now=now, timestamp=_wall())
        if self._held:
            held, self._held = self._held, []
            for proto in held:
                self._loop.call_soon(self._read_more, proto)
        self.transmit()

    def _write(self, cid: ConnectionId, proto: _Protocol, queue: SendQueue, now: float) -> None:
        """Hand the queue to the transport until it is empty or the transport pauses
        (*now*: the clock as the write began)."""
        transport = proto.transport
        if transport is None or transport.is_closing():
            return  # connection_lost follows
        while queue and not proto.paused:
            transport.write(queue.take())  # may call pause_writing() before it returns
        if queue:
            proto.stalled = queue
        else:
            self.hub.flushed(cid, now=now)

    def _arm_timer(self) -> None:
        deadline = self.hub.next_deadline()
        timer = self._timer
        if timer is not None:
            if deadline is not None and timer.when() <= deadline:
                return  # it fires first and re-arms then
            timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self, hops: int = 2) -> None:
        # Input that arrived by now is read before any verdict: after a stall of the
        # loop (a GC pause, a stopped process), a pong may be waiting unread. Two loop
        # iterations: the next one polls for I/O, and its callbacks run before ours.
        if hops:
            self._timer = self._loop.call_at(self._loop.time(), self._on_timer, hops - 1)
            return
        self._timer = None
        hub = self.hub
        now = self._loop.time()
        deadline = hub.next_deadline()
        if deadline is not None and deadline <= now:
            hub.timeout(now=now, timestamp=_wall())
        self._arm_timer()
        self.transmit()


def _backplane(settings: Settings) -> Backplane | None:
    """The backplane *settings* ask for: the one given, or one of ``settings.cluster``."""
    if settings.backplane is not None or settings.cluster is None:
        return settings.backplane  # type: ignore[no-any-return]
    from ._backplane import RedisBackplane

    return RedisBackplane(settings.cluster)


@final
class serve(Coroutine[object, object, None]):  # used like a function, as asyncio.timeout is
    """
    Run a roombus server in the running event loop.

    As an async context manager, it listens on entry and shuts down gracefully on
    exit (close 1001 to every client, at most ``config.close_timeout`` seconds)::

        async with roombus.asyncio.serve(roombus.Settings(server=ServerConfig(port=0))) as server:
            print(server.port)
            server.publish("lobby", "hello")
            await asyncio.sleep(3600)

    As a coroutine (awaited, or run as a task), it serves until cancelled, then shuts
    down the same way and lets the cancellation propagate (or until
    :meth:`Server.drain` stopped it: then it returns); *on_ready* gets the
    :class:`Server` once it listens::

        task = asyncio.create_task(roombus.asyncio.serve(settings, on_ready=print))

    Args:
        settings: What to serve (:class:`roombus.Settings`): the core's limits, the
            address, the authenticator and authorizer, the notice hook, TLS, and the
            cluster (a ``settings.cluster`` gets a
            :class:`roombus.asyncio.RedisBackplane`; ``settings.backplane``, one made
            already; the server runs it).
        config, legacy: The older signature, folded into *settings*
            (:meth:`roombus.Settings.from_legacy`): a :class:`~roombus.BrokerConfig`
            in place of *settings*, a :class:`~roombus.ServerConfig`, and the keywords
            ``on_notice``, ``authenticator``, ``authorizer``, ``ssl_context``,
            ``backplane``.
        on_ready: Called with the running :class:`Server` once it listens (when
            awaited).

    Raises:
        OSError: if the address cannot be bound (on entry, or when awaited).
        TypeError: for a keyword that is no setting.
    """

    def __init__(
        self,
        settings: Settings | BrokerConfig | None = None,
        config: ServerConfig | None = None,
        *,
        on_ready: Callable[[Server], object] | None = None,
        **legacy: Any,
    ) -> None:
        #: What the server is made of.
        self.settings: Final = Settings.from_legacy(settings, config, **legacy)
        self._on_ready = on_ready
        self._server: Server | None = None
        self._running: Coroutine[object, object, None] | None = None  # once awaited

    async def _start(self) -> Server:
        server = Server(self.settings)
        await server._listen()
        if server.backplane is not None:
            server.backplane.start(server)
        self._server = server
        return server

    async def __aenter__(self) -> Server:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        await self._server.aclose()

    async def _run(self) -> None:
        server = await self._start()
        try:
            if self._on_ready is not None:
                self._on_ready(server)
            await server._stopped.wait()  # until cancelled, or stopped by drain()
        finally:
            await server.aclose()

    # -- the coroutine protocol, so that asyncio.create_task() takes it too ------------

    def _coroutine(self) -> Coroutine[object, object, None]:
        if self._running is None:
            self._running = self._run()
        return self._running

    def __await__(self) -> Generator[object, None, None]:
        return self._coroutine().__await__()

    def send(self, value: object) -> object:
        return self._coroutine().send(value)

    def throw(  # type: ignore[override]  # the one-argument form only: it is the current one
        self, exc: BaseException | type[BaseException], /
    ) -> object:
        return self._coroutine().throw(exc)

    def close(self) -> None:
        if self._running is not None:
            self._running.close()


__all__ = ["Server", "serve"]
