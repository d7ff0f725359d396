"""
The transports the end-to-end suite runs over: how to run each in a background thread,
and what each one can do.

Every transport serves the same protocol from the same core, so every end-to-end test
runs over each of them (the ``make_server`` fixture is parametrized by ``TRANSPORTS``).
Where a transport's server owns a part of the protocol (an ASGI server parses HTTP and
frames, pings, and decides how to shut down), the test reads the transport's
:class:`Capabilities` and asserts roombus's promise there, whatever the server's own
answer: nothing is skipped, and no test depends on a third-party server's quirks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import hypercorn.asyncio
import hypercorn.config
import hypercorn.trio
import uvicorn

import roombus.asyncio
import roombus.trio
import trio
from roombus import BrokerConfig, Notice, ServerConfig
from roombus.asgi import RoombusASGI

from .rawws import HOST, TIMEOUT, RawWS


@attrs.frozen(kw_only=True)
class Capabilities:
    """
    Who owns each part of the protocol on a transport (docs/adapters.md has the table).

    roombus's own adapters (trio, asyncio) parse HTTP and frames, ping, and run the
    close handshake themselves: there the suite asserts exactly what roombus does. Under
    an ASGI server those parts are the server's, and what it does there is its own
    choice, which may change from one release to the next. Tests then assert only
    roombus's promises (an oversized or malformed request is never upgraded, a client
    that breaks the protocol leaves its rooms, everyone else goes on being served) and
    accept any answer of the server's that keeps them; where it matters, they detect
    at run time which of those answers the server gave.

    Attributes:
        name: The transport, as tests are parametrized.
        owns_protocol: roombus parses HTTP and frames, pings, and closes connections
            itself (trio, asyncio); False under an ASGI server.
        early_frames_safe: Frames pipelined right behind the opening request can be
            sent at all. hypercorn answers 400 to data before the upgrade, racing the
            app's accept; when the accept wins, its connection task fails (with the trio
            worker, the whole server). Browsers never pipeline frames.
        handle_stream: The server serves connections handed in as trio streams.
    """

    name: str
    owns_protocol: bool = True
    early_frames_safe: bool = True
    handle_stream: bool = False


TRIO = Capabilities(name="trio", handle_stream=True)
ASYNCIO = Capabilities(name="asyncio")
UVICORN = Capabilities(name="uvicorn", owns_protocol=False)
HYPERCORN = Capabilities(name="hypercorn-asyncio", owns_protocol=False, early_frames_safe=False)
HYPERCORN_TRIO = attrs.evolve(HYPERCORN, name="hypercorn-trio")

#: The close codes an ASGI server may send its WebSockets when it shuts down (uvicorn
#: sends 1012, hypercorn's asyncio worker 1011; roombus's own servers always 1001).
SERVER_SHUTDOWN_CODES = frozenset({1001, 1011, 1012})


class _ErrorLog(logging.Handler):
    """Collects error records, but for known, harmless ones of a server."""

    #: uvicorn's websockets-sansio protocol logs this after an app refuses a WebSocket
    #: with the websocket.http.response extension, which it supports (the client gets
    #: the app's status); its wsproto protocol does not.
    IGNORED = (
        "ASGI callable returned without completing handshake.",
        # uvicorn logs a client's invalid UTF-8 (which it closes with 1007) as an error.
        "Invalid UTF-8 sequence received from client.",
    )

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() in self.IGNORED or self._hypercorn_trio_send_race(record):
            return
        self.records.append(record)

    @staticmethod
    def _hypercorn_trio_send_race(record: logging.LogRecord) -> bool:
        """hypercorn's trio worker can send twice at once on one connection (pipelined
        requests): trio refuses with BusyResourceError, which it logs as an app error."""
        exc = record.exc_info[1] if record.exc_info else None
        pending = [exc]
        while pending:
            exc = pending.pop()
            if isinstance(exc, trio.BusyResourceError):
                return True
            pending.extend(getattr(exc, "exceptions", ()))  # an exception group
        return False


class ServerThread:
    """A roombus server in a background thread, and the clients a test opened to it."""

    caps: Capabilities

    def __init__(
        self,
        broker_config: BrokerConfig,
        server_config: ServerConfig,
        on_notice: Callable[[Notice], None] | None = None,
    ) -> None:
        self.allow_crash = False  # for xfail tests of crashes: stop() then does not raise
        #: Further keyword arguments for the server (authenticator, authorizer, ...).
        self.extra: dict[str, Any] = {}
        self.broker_config = broker_config
        self.server_config = server_config
        self.notices: list[Notice] = []
        self._notice_cond = threading.Condition()
        self._user_hook = on_notice
        self.server: Any = None  # the running server object (publish, overflows, ...)
        self.port = 0
        self.error: BaseException | None = None
        self.stopped_cleanly = False
        self._ready = threading.Event()
        self._clients: list[Any] = []
        self._raws: list[RawWS] = []
        self._thread = threading.Thread(target=self._main, name="roombus-server", daemon=True)

    # -- lifecycle (per transport) ----------------------------------------------------------

    def _run(self) -> None:
        """Run the server until stopped (in the thread)."""
        raise NotImplementedError

    def _request_stop(self) -> None:
        """Ask the server to shut down gracefully (from the test's thread)."""
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous function in the server's thread (its API is loop-bound)."""
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        if self.error is not None:
            raise self.error
        return self

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def _on_notice(self, notice: Notice) -> None:
        with self._notice_cond:
            self.notices.append(notice)
            self._notice_cond.notify_all()
        if self._user_hook is not None:
            self._user_hook(notice)

    def stop(self, timeout: float = 10.0) -> float:
        """Shut the server down gracefully and wait for it; returns the seconds taken."""
        t0 = time.monotonic()
        if self._thread.is_alive():
            self._request_stop()
            self._thread.join(timeout)
            assert not self._thread.is_alive(), f"server did not stop within {timeout} s"
        if self.allow_crash:
            return time.monotonic() - t0
        if self.error is not None:
            raise self.error
        assert self.stopped_cleanly
        return time.monotonic() - t0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def publish(self, room: str, content: Any, **kw: Any) -> int:
        assert self.server is not None
        return self.call(partial(self.server.publish, room, content, **kw))

    def wait_notice(self, predicate: Callable[[Notice], bool], timeout: float = TIMEOUT) -> Notice:
        with self._notice_cond:
            found: list[Notice] = []

            def check() -> bool:
                found[:] = [n for n in self.notices if predicate(n)]
                return bool(found)

            assert self._notice_cond.wait_for(check, timeout), f"no such notice: {self.notices}"
            return found[0]

    # -- clients, closed at teardown -----------------------------------------------------

    def connect(self, room: str = "lobby", username: str = "ann", **kw: Any) -> Any:
        from .conftest import open_client

        client = open_client(self.port, room, username, **kw)
        self._clients.append(client)
        return client

    def room(self, room: str, *usernames: str) -> list[Any]:
        """Connect each user in turn; earlier members see (and consume) later joins."""
        clients: list[Any] = []
        for name in usernames:
            client = self.connect(room, name)
            for other in clients:
                other.expect(type="presence", event="join", username=name, room=room)
            clients.append(client)
        return clients

    def raw(self, room: str = "lobby", username: str = "raw", **kw: Any) -> RawWS:
        raw = RawWS.connect(self.port, room, username, **kw)
        self._raws.append(raw)
        return raw

    def track(self, raw: RawWS) -> RawWS:
        self._raws.append(raw)
        return raw

    def close_clients(self) -> None:
        for raw in self._raws:
            raw.close()
        for client in self._clients:
            client.close()

    def assert_serving(self) -> None:
        """A fresh client can still connect and chat: the server survived."""
        from .conftest import Client, open_client

        assert self.alive, self.error
        with open_client(self.port, "health-check", "probe").ws as ws:
            client = Client(ws, "health-check", "probe")
            client.chat("still here?")
            msg = client.expect(type="chat", content="still here?", username="probe")
            assert msg["seq"] >= 1


# -- trio ---------------------------------------------------------------------------------


class TrioServer(ServerThread):
    """``roombus.trio.serve`` (or ``run_server`` plus ``handle_stream``) in ``trio.run``."""

    caps = TRIO

    def __init__(self, *args: Any, via_stream: bool = False) -> None:
        super().__init__(*args)
        self.via_stream = via_stream
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    def _run(self) -> None:
        trio.run(self._amain)

    async def _amain(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                if self.via_stream:
                    await self._start_via_stream(nursery)
                else:
                    serve = partial(
                        roombus.trio.serve,
                        self.broker_config,
                        self.server_config,
                        on_notice=self._on_notice,
                        **self.extra,
                    )
                    self.server = await nursery.start(serve)
                    self.port = self.server.port
                self._ready.set()
        self.stopped_cleanly = True

    async def _start_via_stream(self, nursery: trio.Nursery) -> None:
        """No listener of its own: trio.serve_tcp hands each stream to handle_stream."""
        server = roombus.trio.Server(
            self.broker_config, self.server_config, on_notice=self._on_notice, **self.extra
        )
        await nursery.start(roombus.trio.run_server, server)
        self.server = server

        async def handler(stream: trio.SocketStream) -> None:
            await server.handle_stream(stream, "tcp")

        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
        self.port = listeners[0].socket.getsockname()[1]

    def _request_stop(self) -> None:
        assert self._scope is not None
        try:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)


# -- asyncio ------------------------------------------------------------------------------


class _AsyncioThread(ServerThread):
    """Shared by servers that run in ``asyncio.run``."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        asyncio.run(self._amain())

    async def _amain(self) -> None:
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(TIMEOUT)


class AsyncioServer(_AsyncioThread):
    """``roombus.asyncio.serve`` as an async context manager in ``asyncio.run``."""

    caps = ASYNCIO

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        async with roombus.asyncio.serve(
            self.broker_config, self.server_config, on_notice=self._on_notice, **self.extra
        ) as server:
            self.server = server
            self.port = server.port
            self._ready.set()
            await self._stop_event.wait()
        self.stopped_cleanly = True

    def _request_stop(self) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        except RuntimeError:  # the loop is closed: it stopped already
            pass


# -- ASGI ---------------------------------------------------------------------------------


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(1024)
    return sock


class _Asgi:
    """The app, wrapped to tell when the server has started it (its lifespan)."""

    def __init__(self, app: RoombusASGI, started: Callable[[], None]) -> None:
        self.app = app
        self.started = started

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def tell(message: Any) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                self.started()

        return await self.app(scope, receive, tell)


def _app(st: ServerThread) -> RoombusASGI:
    # The server pings instead of the core: the suite's heartbeat settings go to it.
    broker = attrs.evolve(st.broker_config, heartbeat=False)
    return RoombusASGI(broker, st.server_config, on_notice=st._on_notice, **st.extra)


class UvicornServer(_AsyncioThread):
    """``uvicorn.Server`` with the app, on a socket bound beforehand, in ``asyncio.run``."""

    caps = UVICORN

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = _listening_socket()
        self.port = sock.getsockname()[1]
        self.server = _app(self)
        broker, config = self.broker_config, self.server_config
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                _Asgi(self.server, self._ready.set),
                loop="asyncio",
                lifespan="on",
                log_config=None,
                access_log=False,
                ws_ping_interval=broker.ping_interval,
                ws_ping_timeout=broker.ping_timeout,
                ws_max_size=broker.max_message_bytes,
                h11_max_incomplete_event_size=config.max_header_bytes,
                timeout_graceful_shutdown=int(max(1, config.close_timeout)),
            )
        )
        with sock:
            await self._uvicorn.serve(sockets=[sock])
        self.stopped_cleanly = True

    def _request_stop(self) -> None:
        self._uvicorn.should_exit = True  # polled by uvicorn's main loop


def _hypercorn_config(st: ServerThread, sock: socket.socket) -> hypercorn.config.Config:
    broker, server = st.broker_config, st.server_config
    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = server.close_timeout
    # hypercorn's ping task outlives a closed WebSocket by up to one interval, which
    # holds its shutdown for the graceful timeout: ping only when a test asks for it.
    if broker.ping_interval != BrokerConfig().ping_interval:
        config.websocket_ping_interval = broker.ping_interval
    config.websocket_max_message_size = broker.max_message_bytes
    config.h11_max_incomplete_size = server.max_header_bytes
    # hypercorn's idle timeout also ends a connection that never completes its request.
    config.keep_alive_timeout = server.handshake_timeout
    return config


class HypercornServer(_AsyncioThread):
    """``hypercorn.asyncio.serve`` with the app, in ``asyncio.run``."""

    caps = HYPERCORN

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        sock = _listening_socket()
        self.port = sock.getsockname()[1]
        self.server = _app(self)
        config = _hypercorn_config(self, sock)
        await hypercorn.asyncio.serve(
            _Asgi(self.server, self._ready.set),
            config,
            shutdown_trigger=self._stop_event.wait,
        )
        self.stopped_cleanly = True

    def _request_stop(self) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        except RuntimeError:
            pass


class HypercornTrioServer(ServerThread):
    """``hypercorn.trio.serve`` with the app, in ``trio.run`` (hypercorn's trio worker)."""

    caps = HYPERCORN_TRIO

    def _run(self) -> None:
        trio.run(self._amain)

    async def _amain(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop_event = trio.Event()
        sock = _listening_socket()
        self.port = sock.getsockname()[1]
        self.server = _app(self)
        config = _hypercorn_config(self, sock)
        await hypercorn.trio.serve(
            _Asgi(self.server, self._ready.set),
            config,
            shutdown_trigger=self._stop_event.wait,
        )
        self.stopped_cleanly = True

    def _request_stop(self) -> None:
        try:
            trio.from_thread.run_sync(self._stop_event.set, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)


#: Every transport the end-to-end suite runs over.
TRANSPORTS: dict[str, type[ServerThread]] = {
    "trio": TrioServer,
    "asyncio": AsyncioServer,
    "uvicorn": UvicornServer,
    "hypercorn-asyncio": HypercornServer,
    "hypercorn-trio": HypercornTrioServer,
}
