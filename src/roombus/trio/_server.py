"""
The trio adapter: sockets, tasks and the clock around a sans-IO
:class:`~roombus.server.framed.FramedHub`.

Theory of operation
-------------------
One *poller* task reads every plain TCP connection: their sockets sit in one
level-triggered ``epoll`` set of the adapter's own (a :mod:`selectors` selector), whose
file descriptor the poller waits on through trio; when it is readable, the poller reads
each ready socket once, feeds what arrived to the hub and carries out the hub's outputs
(:meth:`Server.transmit`) before the next. A connection costs no task of its own: no
trip through the scheduler and no re-arming of a one-shot registration per message, and
no coroutine frames for the garbage collector to walk. A connection over a trio Stream
(TLS, :meth:`Server.handle_stream`), or any connection where the platform has no
``epoll``, has a task of its own instead, its *reader*, which does the same for its one
stream. trio runs one task at a time, so the hub needs no lock.

Writing never blocks a broadcast. The hub frames a broadcast once and appends the same
bytes to each receiver's send queue; one *flusher* task writes every dirty queue in
one non-blocking ``send()``; frames that pile up while the flusher waits for its turn
go out together (coalescing). A burst of messages in one read is handled a batch at a
time (the hub's ``INPUT_BATCH``): the connection is read no more until the flusher's
next sweep has written what the batch produced, then the hub gets the next batch.
Only when the kernel refuses bytes does a connection get a *drainer* task, which waits
until its socket is writable. A *timer* task sleeps until the hub's next deadline
(heartbeats, handshake and close timeouts), then lets the input waiting be read before
it hands over to the hub (after a stall, pongs may be waiting unread). The hub closes a
polled connection from :meth:`Server.transmit` at once (out of the set, its socket
closed, ``hub.lost``), a reader task's connection by cancelling the task.

Shutdown (cancellation of :func:`serve`) stops accepting, has the hub close everyone
with 1001, and gives the clients ``close_timeout`` to answer. A drain
(:meth:`Server.drain`) comes first when asked for: the listeners stay open (``/healthz``
answers 503, upgrades are refused with 503) while the hub closes the WebSockets with
1001 over ``drain_seconds``, at the instants of its schedule (the timer task wakes for
them); then the shutdown, and :func:`serve` returns.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import selectors
import socket
from typing import TYPE_CHECKING, Any, Final, final

import trio

from ..core.config import BrokerConfig
from ..core.names import ConnectionId
from ..node.assemble import build_broker
from ..node.facade import ServerFacade
from ..node.facade import wall as _wall
from ..node.metrics import ServerMetrics
from ..node.settings import Settings
from ..node.tuning import ACCEPT_BATCH, ACCEPT_PAUSE, BUSY_SWEEP, RECEIVE_SIZE, WRITE_DELAY
from ..server.config import ServerConfig
from ..server.framed import FramedHub
from ..server.peer import peer_label
from ..server.queues import SendQueue

if TYPE_CHECKING:  # the backplane needs hiredis (the redis extra); a single node does not
    from ._backplane import RedisBackplane

log: Final = logging.getLogger("roombus")


class _Broken(Exception):
    """The transport is gone."""


class _SocketTransport:
    """A connected stdlib socket in non-blocking mode, driven through trio's lowlevel API."""

    __slots__ = ("peer", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer

    def try_send(self, data: bytes | memoryview) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _Broken from exc

    async def send(self, data: bytes | memoryview) -> int:
        if self.sock.fileno() < 0:
            # Closed before this drainer's first step (its connection dropped meanwhile):
            # trio would be asked to wait on descriptor -1.
            raise _Broken
        try:
            await trio.lowlevel.wait_writable(self.sock)
        except (trio.ClosedResourceError, OSError) as exc:
            raise _Broken from exc
        return self.try_send(data)

    async def receive(self) -> bytes:
        # A checkpoint, like every trio receive, but with one trip through the scheduler
        # rather than two: waiting for readability already yields.
        sock = self.sock
        yielded = False
        while True:
            try:
                data: bytes | None = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                data = None
            except OSError as exc:
                raise _Broken from exc
            if data is None:
                # Waited for outside the handler: a coroutine suspended in an except
                # block keeps the exception and its traceback alive, two objects more
                # per idle connection for the garbage collector to walk.
                try:
                    await trio.lowlevel.wait_readable(sock)
                except (trio.ClosedResourceError, OSError) as exc:
                    raise _Broken from exc
                yielded = True
                continue
            if not yielded:
                await trio.lowlevel.checkpoint()
            return data

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class _StreamTransport:
    """Any trio Stream (memory streams in tests, TLS): every write goes through a task."""

    __slots__ = ("peer", "stream")

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream = stream
        self.peer = peer

    def try_send(self, data: bytes | memoryview) -> int:
        return 0

    async def send(self, data: bytes | memoryview) -> int:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Broken from exc
        return len(data)

    async def receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Broken from exc

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


_Transport = _SocketTransport | _StreamTransport


class _Link:
    """What the adapter keeps per connection: its transport, and its reader's scope
    (a connection read by a task of its own) or its place in the poller's set."""

    __slots__ = ("cid", "draining", "reading", "scope", "transport")

    def __init__(self, transport: _Transport, cid: ConnectionId, *, polled: bool) -> None:
        self.transport = transport
        self.cid = cid
        #: None for a polled connection: the poller reads it, no task to cancel.
        self.scope: trio.CancelScope | None = None if polled else trio.CancelScope()
        self.reading = False  # in the poller's set
        self.draining = False  # a drainer task owns the writes


def _sock(link: _Link) -> socket.socket:
    """A polled connection's socket."""
    transport = link.transport
    assert isinstance(transport, _SocketTransport)
    return transport.sock


def _new_selector() -> selectors.EpollSelector | None:
    """The poller's set of sockets, or None where trio cannot wait on it (no epoll)."""
    if hasattr(select, "epoll"):
        return selectors.EpollSelector()
    return None


@final
class Server(ServerFacade):
    """
    A running roombus server: the hub, its connections, and the way in for an app.

    Get one from :func:`serve` through ``nursery.start``. All methods are synchronous
    and must be called from the trio thread that runs the server.

    Args:
        settings, config, legacy: As for :func:`serve`.

    Attributes:
        settings: What it was made of (:class:`roombus.Settings`).
        hub: The sans-IO hub (connections, send queues, broker).
        broker: The core (read-only use: ``rooms``, ``members()``, ``statistics()``).
        config: The server's transport settings.
        port: The TCP port actually bound (useful with ``port=0``), or None when
            serving no listener.
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
        self.metrics: Final = ServerMetrics(self.hub, transport="trio")
        #: TLS for accepted connections (``wss://``), or None for plain TCP.
        self.ssl_context = settings.ssl_context
        self.broker = self.hub.broker
        self.config = self.hub.config
        self.port: int | None = None
        #: The port of the API's own listener (``api_port``), or None without one.
        self.api_port: int | None = None
        self._api_listeners: list[socket.socket] = []
        self._links: dict[ConnectionId, _Link] = {}
        #: The poller's sockets, while running (None: every connection has a reader task).
        self._selector: selectors.EpollSelector | None = None
        self._held: list[_Link] = []  # polled links with the rest of a burst to handle
        self._flusher: trio.lowlevel.Task | None = None
        self._flusher_parked = False
        self._swept: trio.Event | None = None  # set after the flusher's next sweep
        self._timer_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._world = trio.CancelScope()
        self._all_closed = trio.Event()
        self._drained = trio.Event()  # a drain closed (or lost) every WebSocket
        self._stopped = trio.Event()  # the server's world is over
        self._listeners: list[socket.socket] = []

    # -- public API for the embedding app ----------------------------------------------

    def _now(self) -> float:
        return trio.current_time()

    def _waiter(self) -> trio.Event:
        return trio.Event()

    async def handle_stream(self, stream: trio.abc.Stream, peer: str = "stream") -> None:
        """
        Serve one client over any trio Stream until it ends (e.g. a TLS stream, or a
        memory stream in tests). Never raises for anything the client does.

        Raises:
            RuntimeError: if the server is not running (see :func:`run_server`).
        """
        if self._nursery is None or self.hub.shutting_down:
            await trio.aclose_forcefully(stream)
            raise RuntimeError("the server is not running: start it with run_server() first")
        await self._handle(_StreamTransport(stream, peer))

    async def drain(self, seconds: float | None = None) -> None:
        """
        Shut down gracefully, spread over time, and return once the server stopped
        (:func:`serve` then returns too). What ``roombus serve`` does on SIGTERM:

        1. at once, ``/healthz`` answers 503 ``draining`` (load balancers stop
           sending clients here) and WebSocket upgrades 503 with ``Retry-After``; the
           listeners stay open to say so;
        2. the open WebSockets are closed with 1001 (``server draining``), each at a
           jittered instant spread over *seconds*, so that their clients reconnect
           elsewhere a few at a time; the others still get their messages meanwhile
           (in a cluster too: nothing is lost, clients resume from their positions);
        3. once all are closed (by the window's end), the shutdown: the listeners
           close and the clients get ``close_timeout`` to answer.

        Cancelling :func:`serve` meanwhile (a second signal) closes the rest at once.
        A second call waits for the first drain.

        Args:
            seconds: The window; None: ``config.drain_seconds``. 0: close all at once.

        Raises:
            RuntimeError: if the server is not running.
        """
        hub = self.hub
        if self._nursery is None:
            raise RuntimeError("the server is not running: start it with run_server() first")
        if not hub.shutting_down:
            if not hub.draining:
                hub.drain(now=trio.current_time(), timestamp=_wall(), seconds=seconds)
                self.transmit()
            end = hub.drain_ends
            assert end is not None
            with trio.move_on_at(end):
                await self._drained.wait()
            self._begin_shutdown()
        await self._stopped.wait()

    # -- the tasks ---------------------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        """The server's world: listeners, flusher, timer and every connection."""
        self._selector = _new_selector()
        try:
            await self._run_world(task_status)
        finally:
            if self._selector is not None:
                self._selector.close()
        self._stopped.set()

    async def _run_world(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope(shield=True) as world:
            self._world = world
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._timer_loop)
                if self._selector is not None:
                    nursery.start_soon(self._poll_loop)
                if self.backplane is not None:
                    nursery.start_soon(self.backplane.run, self)
                for lsock in self._listeners:
                    nursery.start_soon(self._accept_loop, lsock, lsock in self._api_listeners)
                task_status.started()
                await self._all_closed.wait()
                if self.backplane is not None:
                    # The goodbyes (presence leaves) go out before the link closes.
                    with trio.move_on_after(self.config.close_timeout):
                        await self.backplane.wait_idle()
                nursery.cancel_scope.cancel()

    def _begin_shutdown(self) -> None:
        """Stop accepting, close everyone with 1001, bound the wait for them."""
        if self.hub.shutting_down:
            return
        for lsock in self._listeners:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
        now = trio.current_time()
        self.hub.shutdown(now=now, timestamp=_wall())
        self.transmit()
        # The hub drops every transport by close_timeout; this is the backstop.
        self._world.deadline = now + self.config.close_timeout + 1.0
        self._check_all_closed()

    def _check_all_closed(self) -> None:
        if self.hub.shutting_down and not self._links:
            self._all_closed.set()

    async def _accept_loop(self, lsock: socket.socket, api: bool = False) -> None:
        nursery = self._nursery
        assert nursery is not None
        while True:
            try:
                await trio.lowlevel.wait_readable(lsock)
            except (trio.ClosedResourceError, OSError):
                return
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, addr = lsock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning(
                            "accept failed (%s); pausing accepts for %d ms",
                            exc,
                            ACCEPT_PAUSE * 1000,
                        )
                        await trio.sleep(ACCEPT_PAUSE)
                        break
                    if lsock.fileno() < 0:
                        return
                    continue  # ECONNABORTED and the like concern one client only
                sock.setblocking(False)
                _limit_send_buffer(sock, self.config.socket_send_buffer)
                if sock.family != socket.AF_UNIX:
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:  # the client already reset (seen on BSDs)
                        sock.close()
                        continue
                peer = peer_label(addr)
                if self.ssl_context is None and self._selector is not None:
                    self._open_polled(sock, peer, api)
                elif self.ssl_context is None:
                    nursery.start_soon(self._handle, _SocketTransport(sock, peer), api)
                else:
                    # The TLS handshake happens on the first receive, inside the
                    # handshake timeout like the HTTP request.
                    stream = trio.SSLStream(
                        trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
                        self.ssl_context,
                        server_side=True,
                    )
                    nursery.start_soon(self._handle, _StreamTransport(stream, peer), api)

    async def _handle(self, transport: _Transport, api: bool = False) -> None:
        """One connection's whole life; its transport is closed on every way out."""
        hub = self.hub
        cid = hub.open(now=trio.current_time(), peer=transport.peer, api=api)
        link = _Link(transport, cid, polled=False)
        self._links[cid] = link
        assert link.scope is not None
        try:
            with link.scope:
                self.transmit()
                while True:
                    data = await transport.receive()
                    hub.receive(cid, data or None, now=trio.current_time(), timestamp=_wall())
                    self.transmit()
                    while hub.input_pending(cid):
                        # A burst: what this part produced is written before the next.
                        await self._next_sweep()
                        hub.receive(cid, b"", now=trio.current_time(), timestamp=_wall())
                        self.transmit()
                    if not data:
                        # The peer sent all it will; wait until the hub is done writing.
                        await trio.sleep_forever()
        except _Broken:
            pass
        except Exception:
            # A bug, not a client's doing: lose this connection, never the server.
            log.exception(
                "internal error on %s; dropping the connection",
                transport.peer,
                extra={"conn": cid, "peer": transport.peer},
            )
        finally:
            del self._links[cid]
            hub.lost(cid, now=trio.current_time(), timestamp=_wall())
            self.transmit()
            with trio.CancelScope(shield=True):
                await transport.aclose()
            self._check_all_closed()

    async def _next_sweep(self) -> None:
        """Wait until the flusher has written what is dirty now (a checkpoint if nothing)."""
        if not self.hub.has_dirty():
            await trio.lowlevel.checkpoint()
            return
        if self._swept is None:
            self._swept = trio.Event()
        await self._swept.wait()

    def transmit(self) -> None:
        """Carry out the hub's outputs, after every hub call: the four steps of
        :class:`~roombus.node.facade.ServerFacade`, in their order."""
        hub = self.hub
        # 1. close: a polled connection at once (``hub.lost`` too, until none is left to
        # close); a reader task is cancelled, and its ``finally`` does the same.
        while to_close := hub.take_to_close():
            for cid in to_close:
                link = self._links.get(cid)
                if link is not None:
                    self._break(link)
        # 2. write: the flusher writes every dirty queue in its next sweep.
        if hub.has_dirty():
            self._wake_flusher()
        # 3. backplane: the broker's work for the other nodes.
        if self.backplane is not None:
            work = hub.take_backplane()
            if work:
                self.backplane.submit(work)
        # 4. timer: only ever earlier here; the timer task re-reads it when it wakes.
        if hub.deadline_moved:
            hub.deadline_moved = False
            deadline = hub.next_deadline()
            if deadline is not None and deadline < self._timer_scope.deadline:
                self._timer_scope.deadline = deadline
        if hub.draining and hub.drain_done:
            self._drained.set()

    async def _flush_loop(self) -> None:
        self._flusher = trio.lowlevel.current_task()
        while True:
            if not self.hub.has_dirty() and not self._held:
                self._flusher_parked = True
                await trio.lowlevel.wait_task_rescheduled(self._unpark_flusher)
                self._flusher_parked = False
            swept = self._flush_all()
            if self._swept is not None:  # readers holding back the rest of a burst
                self._swept.set()
                self._swept = None
            if self._held:  # polled connections with the rest of a burst: the next part
                self._resume_held()
            if swept >= BUSY_SWEEP:
                # Busy: give frames for the same clients a moment to pile up, so the
                # next sweep writes several per system call (the syscall is the cost).
                await trio.sleep(WRITE_DELAY)
            else:
                # Let readers run before the next sweep.
                await trio.lowlevel.checkpoint()

    def _unpark_flusher(self, _: object) -> trio.lowlevel.Abort:
        # Cancelled while parked: make sure nobody reschedules it as well.
        self._flusher_parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_flusher(self) -> None:
        if self._flusher_parked and self._flusher is not None:
            self._flusher_parked = False
            trio.lowlevel.reschedule(self._flusher)

    def _flush_all(self) -> int:
        """Write every dirty queue as far as the kernel takes it; returns how many."""
        hub = self.hub
        links = self._links
        nursery = self._nursery
        dirty = hub.take_dirty()
        now = trio.current_time()
        for cid, queue in dirty:
            link = links.get(cid)
            if link is None or link.draining:
                continue
            try_send = link.transport.try_send
            try:
                while queue:
                    data = queue.data()
                    sent = try_send(data)
                    queue.consume(sent)
                    if sent < len(data):
                        break
            except _Broken:
                self._break(link)
                continue
            if not queue:
                hub.flushed(cid, now=now)  # the sweep's clock: one read, not one per queue
            elif nursery is not None:
                link.draining = True
                nursery.start_soon(self._drain, cid, link, queue)
        hub.enforce_budget(now=now, timestamp=_wall())
        self.transmit()
        return len(dirty)

    async def _drain(self, cid: ConnectionId, link: _Link, queue: SendQueue) -> None:
        if self._links.get(cid) is not link:  # dropped before this task's first step
            link.draining = False
            return
        try:
            while queue:
                queue.consume(await link.transport.send(queue.data()))
        except _Broken:
            self._break(link)
            self.transmit()
            return
        finally:
            link.draining = False
        self.hub.flushed(cid, now=trio.current_time())
        self.transmit()

    def _break(self, link: _Link) -> None:
        """End a connection: cancel its reader, or drop a polled one at once."""
        if link.scope is not None:
            link.scope.cancel()
        else:
            self._drop(link)

    # -- the poller: every plain TCP connection, without a task each -------------------

    def _open_polled(self, sock: socket.socket, peer: str, api: bool) -> None:
        cid = self.hub.open(now=trio.current_time(), peer=peer, api=api)
        link = _Link(_SocketTransport(sock, peer), cid, polled=True)
        self._links[cid] = link
        try:
            self._start_reading(link)
        except OSError as exc:  # ENOSPC (fs.epoll.max_user_watches), ENOMEM: this one only
            log.warning(
                "cannot watch %s (%s); dropping the connection",
                peer,
                exc,
                extra={"conn": cid, "peer": peer},
            )
            self._drop(link)
        self.transmit()

    def _start_reading(self, link: _Link) -> None:
        assert self._selector is not None
        self._selector.register(_sock(link), selectors.EVENT_READ, link)
        link.reading = True

    def _stop_reading(self, link: _Link) -> None:
        if link.reading:
            assert self._selector is not None
            self._selector.unregister(_sock(link))
            link.reading = False

    def _drop(self, link: _Link) -> None:
        """A polled connection is over: out of the set, its socket closed, ``hub.lost``.
        Idempotent; the caller carries out the hub's outputs (:meth:`transmit`)."""
        if self._links.get(link.cid) is not link:
            return
        del self._links[link.cid]
        try:
            self._stop_reading(link)
            sock = _sock(link)
            trio.lowlevel.notify_closing(sock)  # a drainer waiting on it: ClosedResourceError
            sock.close()
        finally:
            self.hub.lost(link.cid, now=trio.current_time(), timestamp=_wall())
            self._check_all_closed()

    async def _poll_loop(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while True:
                await trio.lowlevel.wait_readable(selector.fileno())
                for key, _ in selector.select(0):
                    self._read(key.data)
        finally:  # the server's world is over: whoever is left goes with it
            for link in [link for link in self._links.values() if link.scope is None]:
                self._drop(link)

    def _read(self, link: _Link) -> None:
        """Read a ready socket once and hand what came to the hub."""
        if self._links.get(link.cid) is not link:
            return  # closed by an earlier one of this round
        hub = self.hub
        cid = link.cid
        try:
            data = _sock(link).recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._drop(link)
            self.transmit()
            return
        try:
            if data:
                hub.receive(cid, data, now=trio.current_time(), timestamp=_wall())
                if hub.input_pending(cid):
                    # A burst: the rest after the flusher wrote what this part produced.
                    self._stop_reading(link)
                    self._held.append(link)
                    self._wake_flusher()
            else:
                # The peer sent all it will; the hub closes it once done writing.
                self._stop_reading(link)
                hub.receive(cid, None, now=trio.current_time(), timestamp=_wall())
            self.transmit()
        except Exception:
            self._internal_error(link)

    def _resume_held(self) -> None:
        """Hand the hub the next part of each burst held since the last sweep."""
        held, self._held = self._held, []
        hub = self.hub
        for link in held:
            if self._links.get(link.cid) is not link:
                continue
            try:
                hub.receive(link.cid, b"", now=trio.current_time(), timestamp=_wall())
                if hub.input_pending(link.cid):
                    self._held.append(link)
                else:
                    self._start_reading(link)
                self.transmit()
            except Exception:
                self._internal_error(link)

    def _internal_error(self, link: _Link) -> None:
        # A bug, not a client's doing: lose this connection, never the server.
        peer = link.transport.peer
        log.exception(
            "internal error on %s; dropping the connection",
            peer,
            extra={"conn": link.cid, "peer": peer},
        )
        self._drop(link)
        self.transmit()

    async def _timer_loop(self) -> None:
        hub = self.hub
        while True:
            deadline = hub.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            # Input that arrived by now is read before any verdict: after a stall (a
            # GC pause, a stopped process), pongs may be waiting unread. Readers woken
            # with this task, or by the I/O poll after it, run before the second
            # checkpoint returns (trio shuffles each batch).
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            now = trio.current_time()
            deadline = hub.next_deadline()
            if deadline is not None and deadline <= now:
                hub.timeout(now=now, timestamp=_wall())
                self.transmit()


def _limit_send_buffer(sock: socket.socket, size: int) -> None:
    """Cap the kernel's send buffer of a client socket (``socket_send_buffer``)."""
    if size:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:  # the client already reset, or a socket type without one
            pass


def _listen(config: ServerConfig, host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in infos[:1] if port == 0 else infos:
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(config.backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve(
    settings: Settings | BrokerConfig | None = None,
    config: ServerConfig | None = None,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    **legacy: Any,
) -> None:
    """
    Run a roombus server until cancelled.

    Use it with ``nursery.start`` to get the running :class:`Server` once it listens::

        server = await nursery.start(roombus.trio.serve, roombus.Settings(...))
        print(server.port)

    Cancelling it is a graceful shutdown: no new connections, close 1001 to every
    client, then it returns (by raising the cancellation) within
    ``server.close_timeout`` seconds. :meth:`Server.drain` is one spread over
    ``drain_seconds``; it returns after it.

    Args:
        settings: What to serve (:class:`roombus.Settings`): the core's limits, the
            address, the authenticator and authorizer, the notice hook, TLS, and the
            cluster (a ``settings.cluster`` gets a :class:`roombus.trio.RedisBackplane`;
            ``settings.backplane``, one made already; the server runs it).
        config, legacy: The older signature, folded into *settings*
            (:meth:`roombus.Settings.from_legacy`): a :class:`~roombus.BrokerConfig`
            in place of *settings*, a :class:`~roombus.ServerConfig`, and the keywords
            ``on_notice``, ``authenticator``, ``authorizer``, ``ssl_context``,
            ``backplane``.

    Raises:
        OSError: if the address cannot be bound (before ``task_status.started``).
        TypeError: for a keyword that is no setting.
    """
    server = Server(settings, config, **legacy)
    config = server.config
    server._listeners = _listen(config, config.host, config.port)
    server.port = server._listeners[0].getsockname()[1]
    if config.api_port is not None:
        try:
            server._api_listeners = _listen(config, config.api_host, config.api_port)
        except BaseException:
            for sock in server._listeners:
                sock.close()
            raise
        server._listeners += server._api_listeners
        server.api_port = server._api_listeners[0].getsockname()[1]
    await run_server(server, task_status=task_status)


def _backplane(settings: Settings) -> RedisBackplane | None:
    """The backplane *settings* ask for: the one given, or one of ``settings.cluster``."""
    if settings.backplane is not None or settings.cluster is None:
        return settings.backplane  # type: ignore[no-any-return]
    from ._backplane import RedisBackplane

    return RedisBackplane(settings.cluster)


async def run_server(
    server: Server, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run an already built :class:`Server` (with or without listeners) until cancelled,
    or until it stopped after :meth:`Server.drain`."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server._run)
        task_status.started(server)
        try:
            await server._stopped.wait()
        finally:
            server._begin_shutdown()


__all__ = ["Server", "run_server", "serve"]
