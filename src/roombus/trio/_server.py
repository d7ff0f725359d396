"""
The trio adapter: accept connections, move bytes, carry out the core's actions.

Theory of operation
-------------------
Every connection has one task, its *reader*: it runs the opening handshake, then
feeds what arrives to the wire layer and the broker, and carries out the actions
that come back (:meth:`Server._apply`) before its next ``await``. trio runs one
task at a time, so the broker needs no lock.

Writing never blocks a broadcast. :meth:`Server._apply` frames a broadcast once and
appends the same bytes to each receiver's :class:`~roombus.SendQueue`, then marks the
receiver *dirty*. One *flusher* task writes every dirty connection's pending frames
in one non-blocking ``send()`` each; frames that pile up while the flusher waits for
its turn go out together (coalescing). Only when the kernel refuses bytes does a
connection get a *drainer* task, which waits until the socket is writable. A queue
over its bound means a slow consumer: it is closed with 1008 (see SendQueue), and
nobody else waits for it.

One *timer* task sleeps until the broker's next deadline and then calls
``handle_timeout``. Shutdown (cancellation of :func:`serve`) stops accepting, sends
close 1001 to everyone, and waits at most ``close_timeout`` for the close handshakes.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, final

import trio

from .._actions import Close, Deliver, Notice, SendPing
from .._broker import Broker
from .._config import BrokerConfig, ServerConfig
from .._events import ClientConnected, ClientDisconnected, PongReceived, TextReceived
from .._handshake import HttpResponse, Upgrade, route_request
from .._sendqueue import QueueState, SendQueue
from .._types import ConnectionId
from .._wire import (
    GOING_AWAY,
    PING_FRAME,
    POLICY_VIOLATION,
    BadRequest,
    Closed,
    MessageReceived,
    PongFrameReceived,
    Reply,
    RequestReceived,
    ServerWire,
    text_frame,
)

if TYPE_CHECKING:
    from .._actions import Action

log: Final = logging.getLogger("roombus")

RECEIVE_SIZE: Final = 65536

NoticeHook = Callable[[Notice], None]


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
        try:
            await trio.lowlevel.wait_writable(self.sock)
        except (trio.ClosedResourceError, OSError) as exc:
            raise _Broken from exc
        return self.try_send(data)

    async def receive(self) -> bytes:
        sock = self.sock
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except (trio.ClosedResourceError, OSError) as exc:
                    raise _Broken from exc
                continue
            except OSError as exc:
                raise _Broken from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
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


class _Connection:
    __slots__ = (
        "cid",
        "closing",
        "drained",
        "draining",
        "queue",
        "reader_scope",
        "transport",
        "wire",
    )

    def __init__(self, cid: ConnectionId, transport: _Transport, wire: ServerWire) -> None:
        self.cid = cid
        self.transport = transport
        self.wire = wire
        self.queue: SendQueue | None = None
        self.reader_scope = trio.CancelScope()
        self.draining = False  # a drainer task owns the writes
        self.drained = trio.Event()  # set when the current drainer ends
        self.closing = False  # a close frame is queued; the reader ends soon


@final
class Server:
    """
    A running roombus server: the broker, its connections, and the way in for an app.

    Get one from :func:`serve` through ``nursery.start``. All methods are synchronous
    and must be called from the trio thread that runs the server.

    Attributes:
        broker: The core (read-only use: ``rooms``, ``members()``, ``statistics()``).
        config: The server's transport settings.
        port: The TCP port actually bound (useful with ``port=0``), or None when
            serving no listener.
    """

    def __init__(
        self,
        broker_config: BrokerConfig | None = None,
        config: ServerConfig | None = None,
        *,
        on_notice: NoticeHook | None = None,
    ) -> None:
        self.broker = Broker(broker_config)
        self.config = config if config is not None else ServerConfig()
        self.port: int | None = None
        self._on_notice = on_notice
        self._conns: dict[ConnectionId, _Connection] = {}
        self._ids = itertools.count(1)
        self._dirty: dict[ConnectionId, _Connection] = {}
        self._flusher: trio.lowlevel.Task | None = None
        self._flusher_parked = False
        self._timer_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._shutting_down = False
        self._handshaking: set[trio.CancelScope] = set()  # handshakes in progress
        self._all_closed = trio.Event()
        self._listeners: list[socket.socket] = []
        self.overflows = 0  # slow consumers closed

    # -- public API for the embedding app ----------------------------------------------

    def publish(self, room: str, content: object, *, username: str = "server") -> int:
        """
        Publish a chat message to every member of *room*, as *username*.

        Returns:
            How many connections it was delivered to (0 if the room has no members).

        Raises:
            ValueError: if the room or username is invalid or content is not JSON.
        """
        actions = self.broker.publish(room, content, username=username, timestamp=_wall())
        self._apply(actions)
        return sum(len(a.conns) for a in actions if type(a) is Deliver)

    @property
    def connection_count(self) -> int:
        """Open WebSocket connections."""
        return len(self._conns)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str = "stream") -> None:
        """
        Serve one client over any trio Stream until it ends (e.g. a TLS stream, or a
        memory stream in tests). Never raises for anything the client does.

        Raises:
            RuntimeError: if the server is not running (see :func:`run_server`).
        """
        if self._nursery is None or self._shutting_down:
            await trio.aclose_forcefully(stream)
            raise RuntimeError("the server is not running: start it with run_server() first")
        await self._handle(_StreamTransport(stream, peer))

    # -- the tasks ---------------------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        """The server's world: listeners, flusher, timer and every connection."""
        with trio.CancelScope(shield=True) as world:
            self._world = world
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._timer_loop)
                for lsock in self._listeners:
                    nursery.start_soon(self._accept_loop, lsock)
                task_status.started()
                await self._all_closed.wait()
                nursery.cancel_scope.cancel()

    def _begin_shutdown(self) -> None:
        """Stop accepting, close everyone with 1001, bound the wait for them."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for lsock in self._listeners:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
        for scope in self._handshaking:
            scope.cancel()  # not a client yet: just drop it
        for conn in list(self._conns.values()):
            self._close(conn, GOING_AWAY, "server shutting down", drop_pending=False)
        self._world.deadline = trio.current_time() + self.config.close_timeout
        self._check_all_closed()

    def _check_all_closed(self) -> None:
        if self._shutting_down and not self._conns and not self._handshaking:
            self._all_closed.set()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        nursery = self._nursery
        assert nursery is not None
        while True:
            try:
                await trio.lowlevel.wait_readable(lsock)
            except (trio.ClosedResourceError, OSError):
                return
            for _ in range(64):
                try:
                    sock, addr = lsock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("accept failed (%s); pausing accepts for 100 ms", exc)
                        await trio.sleep(0.1)
                        break
                    if lsock.fileno() < 0:
                        return
                    continue  # ECONNABORTED and the like concern one client only
                sock.setblocking(False)
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
                nursery.start_soon(self._handle, _SocketTransport(sock, peer))

    async def _flush_loop(self) -> None:
        self._flusher = trio.lowlevel.current_task()
        while True:
            if not self._dirty:
                self._flusher_parked = True
                await trio.lowlevel.wait_task_rescheduled(self._unpark_flusher)
                self._flusher_parked = False
            dirty, self._dirty = self._dirty, {}
            for conn in dirty.values():
                self._flush(conn)
            # Let readers run before the next sweep, so frames can pile up and be
            # written together.
            await trio.lowlevel.checkpoint()

    def _unpark_flusher(self, _: object) -> trio.lowlevel.Abort:
        # Cancelled while parked: make sure nobody reschedules it as well.
        self._flusher_parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    async def _timer_loop(self) -> None:
        broker = self.broker
        while True:
            deadline = broker.next_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            now = trio.current_time()
            deadline = broker.next_deadline()
            if deadline is not None and deadline <= now:
                self._apply(broker.handle_timeout(now=now, timestamp=_wall()))

    def _rearm_timer(self) -> None:
        deadline = self.broker.next_deadline()
        if deadline is not None and deadline < self._timer_scope.deadline:
            self._timer_scope.deadline = deadline

    # -- one connection ----------------------------------------------------------------

    async def _handle(self, transport: _Transport) -> None:
        """One connection's whole life; its transport is closed on every way out."""
        try:
            await self._serve_connection(transport)
        except _Broken:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await transport.aclose()
            self._check_all_closed()

    async def _serve_connection(self, transport: _Transport) -> None:
        config = self.config
        broker_config = self.broker.config
        wire = ServerWire(
            max_header_bytes=config.max_header_bytes,
            max_message_bytes=broker_config.max_message_bytes,
        )
        scope = trio.CancelScope()
        self._handshaking.add(scope)
        try:
            with scope:
                decision = await self._handshake(transport, wire)
        finally:
            self._handshaking.discard(scope)
        if scope.cancelled_caught or decision is None:
            return
        if not isinstance(decision, Upgrade):
            with trio.move_on_after(config.close_timeout):
                data: bytes = wire.respond(decision[0], head=decision[1])
                while data:
                    data = data[await transport.send(data) :]
            return

        cid = ConnectionId(next(self._ids))
        conn = _Connection(cid, transport, wire)
        conn.queue = SendQueue(broker_config.send_queue, broker_config.send_queue_bytes)
        conn.queue.push_control(wire.accept(decision))
        # Hand the 101 out as the first chunk now: a chunk handed out is never dropped,
        # so the response goes out even if bytes that came with the request close us.
        conn.queue.data()
        self._conns[cid] = conn
        self._mark_dirty(conn)
        log.debug(
            "%s connected as %r in %r (conn %d)",
            transport.peer,
            decision.username,
            decision.room,
            cid,
        )
        try:
            self._apply(
                self.broker.handle(
                    ClientConnected(conn=cid, username=decision.username, room=decision.room),
                    now=trio.current_time(),
                    timestamp=_wall(),
                )
            )
            self._rearm_timer()
            if self._shutting_down:
                self._close(conn, GOING_AWAY, "server shutting down", drop_pending=False)
            with conn.reader_scope:
                if self._receive(conn, b""):
                    while True:
                        data = await transport.receive()
                        if not self._receive(conn, data or None):
                            break
                # Our close is queued or the peer's answered: let it reach the wire.
                await self._wait_flushed(conn)
        finally:
            self._conns.pop(cid, None)
            self._dirty.pop(cid, None)
            if cid in self.broker:
                self._apply(
                    self.broker.handle(
                        ClientDisconnected(conn=cid), now=trio.current_time(), timestamp=_wall()
                    )
                )

    async def _handshake(
        self, transport: _Transport, wire: ServerWire
    ) -> Upgrade | tuple[HttpResponse, bool] | None:
        config = self.config
        with trio.move_on_after(config.handshake_timeout):
            while True:
                try:
                    data = await transport.receive()
                except _Broken:
                    return None
                for event in wire.receive_data(data or None):
                    if type(event) is RequestReceived:
                        decision = route_request(
                            event.method,
                            event.target,
                            event.headers,
                            allowed_origins=config.allowed_origins,
                            page=config.page,
                        )
                        if self._shutting_down and isinstance(decision, Upgrade):
                            decision = HttpResponse(status=503, body=b"shutting down\n")
                        if isinstance(decision, Upgrade):
                            return decision
                        if decision.status >= 400:
                            log.info(
                                "%s refused with %d: %s",
                                transport.peer,
                                decision.status,
                                decision.body.decode(errors="replace").strip(),
                            )
                        return decision, event.method == b"HEAD"
                    if type(event) is BadRequest:
                        log.info("%s sent a bad request: %d", transport.peer, event.response.status)
                        return event.response, False
                    return None  # the peer went away mid-request
        log.info(
            "%s did not complete its handshake in %s s", transport.peer, config.handshake_timeout
        )
        return None

    def _receive(self, conn: _Connection, data: bytes | None) -> bool:
        """Handle bytes from *conn*; False once its reading is over."""
        broker = self.broker
        cid = conn.cid
        for event in conn.wire.receive_data(data):
            kind = type(event)
            if kind is MessageReceived:
                if not conn.closing:
                    self._apply(
                        broker.handle(
                            TextReceived(conn=cid, text=event.text),  # type: ignore[union-attr]
                            now=trio.current_time(),
                            timestamp=_wall(),
                        )
                    )
            elif kind is PongFrameReceived:
                broker.handle(PongReceived(conn=cid), now=trio.current_time(), timestamp=0)
                self._rearm_timer()
            elif kind is Reply:
                assert conn.queue is not None
                conn.queue.push_control(event.data)  # type: ignore[union-attr]
                self._mark_dirty(conn)
            elif kind is Closed:
                assert conn.queue is not None
                if event.data:  # type: ignore[union-attr]
                    # Our answer to the peer's close, or our refusal of its input.
                    conn.queue.close_with(event.data, drop_pending=not event.by_peer)  # type: ignore[union-attr]
                    self._mark_dirty(conn)
                conn.closing = True
                self._forget(conn)
                return False
        return True

    async def _wait_flushed(self, conn: _Connection) -> None:
        """Write what is left for *conn* (its close frame), within the close timeout."""
        conn.reader_scope.deadline = min(
            conn.reader_scope.deadline, trio.current_time() + self.config.close_timeout
        )
        self._flush(conn)
        if conn.draining:
            await conn.drained.wait()

    def _forget(self, conn: _Connection) -> None:
        """Tell the broker *conn* is gone (it stops getting messages at once)."""
        if conn.cid in self.broker:
            self._apply(
                self.broker.handle(
                    ClientDisconnected(conn=conn.cid), now=trio.current_time(), timestamp=_wall()
                )
            )

    def _close(self, conn: _Connection, code: int, reason: str, *, drop_pending: bool) -> None:
        """Start closing *conn* from our side; its reader ends within close_timeout."""
        if conn.closing:
            return
        conn.closing = True
        frame = conn.wire.close(code, reason)
        assert conn.queue is not None
        if frame:
            conn.queue.close_with(frame, drop_pending=drop_pending)
            self._mark_dirty(conn)
        conn.reader_scope.deadline = min(
            conn.reader_scope.deadline, trio.current_time() + self.config.close_timeout
        )

    # -- carrying out actions ----------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        conns = self._conns
        overflowed: list[_Connection] = []
        for action in actions:
            if isinstance(action, Deliver):
                frame = text_frame(action.payload)
                dirty = self._dirty
                for cid in action.conns:
                    conn = conns.get(cid)
                    if conn is None:
                        continue
                    queue = conn.queue
                    assert queue is not None
                    if queue.push(frame):
                        dirty[cid] = conn
                    elif queue.state is QueueState.OVERFLOWED and not conn.closing:
                        overflowed.append(conn)
            elif isinstance(action, SendPing):
                conn = conns.get(action.conn)
                if conn is not None and conn.queue is not None:
                    conn.queue.push_control(PING_FRAME)
                    self._dirty[conn.cid] = conn
            elif isinstance(action, Close):
                conn = conns.get(action.conn)
                if conn is not None:
                    log.info(
                        "closing conn %d (%s): %d %s",
                        conn.cid,
                        conn.transport.peer,
                        action.code,
                        action.reason,
                    )
                    self._close(conn, action.code, action.reason, drop_pending=True)
            elif self._on_notice is not None:
                try:
                    self._on_notice(action)
                except Exception:
                    log.exception("on_notice hook failed for %r", action)
        if self._dirty:
            self._wake_flusher()
        for conn in overflowed:
            self.overflows += 1
            log.warning(
                "conn %d (%s) fell behind (send queue full); closing with 1008",
                conn.cid,
                conn.transport.peer,
            )
            self._close(
                conn, POLICY_VIOLATION, "send queue full: reading too slowly", drop_pending=True
            )
            self._forget(conn)

    def _mark_dirty(self, conn: _Connection) -> None:
        self._dirty[conn.cid] = conn
        self._wake_flusher()

    def _wake_flusher(self) -> None:
        if self._flusher_parked and self._flusher is not None:
            self._flusher_parked = False
            trio.lowlevel.reschedule(self._flusher)

    def _flush(self, conn: _Connection) -> None:
        if conn.draining:
            return
        queue = conn.queue
        assert queue is not None
        try:
            while queue:
                data = queue.data()
                sent = conn.transport.try_send(data)
                queue.consume(sent)
                if sent < len(data):
                    break
        except _Broken:
            conn.reader_scope.cancel()
            return
        if queue and self._nursery is not None:
            conn.draining = True
            conn.drained = trio.Event()
            self._nursery.start_soon(self._drain, conn)

    async def _drain(self, conn: _Connection) -> None:
        queue = conn.queue
        assert queue is not None
        try:
            while queue:
                queue.consume(await conn.transport.send(queue.data()))
        except _Broken:
            conn.reader_scope.cancel()
        finally:
            conn.draining = False
            conn.drained.set()


def _wall() -> int:
    return int(time.time())


def _listen(config: ServerConfig) -> list[socket.socket]:
    infos = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    port = config.port
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
    broker_config: BrokerConfig | None = None,
    config: ServerConfig | None = None,
    *,
    on_notice: NoticeHook | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run a roombus server until cancelled.

    Use it with ``nursery.start`` to get the running :class:`Server` once it listens::

        server = await nursery.start(roombus.trio.serve)
        print(server.port)

    Cancelling it is a graceful shutdown: no new connections, close 1001 to every
    client, then it returns (by raising the cancellation) within
    ``config.close_timeout`` seconds.

    Args:
        broker_config: The core's limits and intervals.
        config: Address and transport settings.
        on_notice: Called with every :data:`~roombus.Notice` (a user joined or left,
            a message was published), synchronously; an exception it raises is logged.

    Raises:
        OSError: if the address cannot be bound (before ``task_status.started``).
    """
    server = Server(broker_config, config, on_notice=on_notice)
    server._listeners = _listen(server.config)
    server.port = server._listeners[0].getsockname()[1]
    await run_server(server, task_status=task_status)


async def run_server(
    server: Server, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run an already built :class:`Server` (with or without listeners) until cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server._run)
        task_status.started(server)
        try:
            await trio.sleep_forever()
        finally:
            server._begin_shutdown()


__all__ = ["Server", "run_server", "serve"]
