"""
End-to-end fixtures: a real roombus server on a loopback port, and real clients.

The server runs in-process in a background thread (``trio.run`` of
``roombus.trio.serve`` with port 0); tests talk to it over sockets with the
``websockets`` sync client (an independent implementation) or with raw sockets
(:mod:`.rawws`) when they need to misbehave. A few tests run the real command line
in a subprocess (:class:`CliServer`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import attrs
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

import roombus.trio
import trio
from roombus import BrokerConfig, Notice, ServerConfig

from .rawws import HOST, TIMEOUT, RawWS

_BROKER_FIELDS = set(attrs.fields_dict(BrokerConfig))
_SERVER_FIELDS = set(attrs.fields_dict(ServerConfig))


class Client:
    """A well-behaved client (websockets' sync client) speaking roombus JSON."""

    def __init__(self, ws: ClientConnection, room: str, username: str) -> None:
        self.ws = ws
        self.room = room
        self.username = username

    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def chat(self, content: Any, **fields: Any) -> None:
        self.send({"type": "chat", "content": content, **fields})

    def recv(self, timeout: float = TIMEOUT) -> Any:
        """The next message, decoded; fails the test if none comes within *timeout*."""
        return json.loads(self.ws.recv(timeout=timeout))

    def expect(self, timeout: float = TIMEOUT, **fields: Any) -> Any:
        """The next message, which must carry (at least) *fields*."""
        msg = self.recv(timeout)
        for key, value in fields.items():
            assert msg.get(key) == value, f"{self.username} expected {fields}, got {msg}"
        return msg

    def expect_chat(self, content: Any, username: str, room: str | None = None) -> Any:
        return self.expect(type="chat", content=content, username=username, room=room or self.room)

    def ping(self) -> None:
        """App-level ping; returns when the pong is the next message (a barrier)."""
        self.send({"type": "ping"})
        self.expect(type="pong")

    def until_closed(self, timeout: float = TIMEOUT) -> ConnectionClosed:
        """Read (and drop) messages until the server closes; returns how it closed."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.ws.recv(timeout=max(deadline - time.monotonic(), 0))
        except ConnectionClosed as exc:
            return exc

    def close(self) -> None:
        self.ws.close()


def open_client(
    port: int,
    room: str,
    username: str,
    *,
    expect_join: bool | None = True,
    origin: str | None = None,
    **kw: Any,
) -> Client:
    """
    Connect to ``/ws?room=&username=``. With *expect_join* True, read the client's own
    presence join and then its presence_state; with False, only the presence_state
    (a second connection of a present user); with None, read nothing.
    """
    from urllib.parse import urlencode

    kw.setdefault("compression", None)
    ws = ws_connect(
        f"ws://{HOST}:{port}/ws?" + urlencode({"room": room, "username": username}),
        open_timeout=TIMEOUT,
        close_timeout=2,
        proxy=None,
        origin=origin,  # type: ignore[arg-type]
        **kw,
    )
    # Entering the connection's context is how websockets >= 17.1 wants a direct
    # connection to be used (else a DeprecationWarning); Client.close() ends it.
    ws.__enter__()
    client = Client(ws, room, username)
    try:
        if expect_join is not None:
            if expect_join:
                msg = client.expect(type="presence", event="join", username=username, room=room)
                assert msg["content"] == f"{username} joined the room"
            state = client.expect(type="presence_state", room=room)
            assert username in state["users"]
    except BaseException:
        client.close()
        raise
    return client


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ServerThread:
    """A roombus server running ``trio.run`` in a background thread."""

    def __init__(
        self,
        broker_config: BrokerConfig,
        server_config: ServerConfig,
        on_notice: Callable[[Notice], None] | None = None,
        *,
        via_stream: bool = False,
    ) -> None:
        self.via_stream = via_stream
        self.allow_crash = False  # for xfail tests of crashes: stop() then does not raise
        self.broker_config = broker_config
        self.server_config = server_config
        self.notices: list[Notice] = []
        self._notice_cond = threading.Condition()
        self._user_hook = on_notice
        self.server: roombus.trio.Server | None = None
        self.port = 0
        self.error: BaseException | None = None
        self.stopped_cleanly = False
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._clients: list[Client] = []
        self._raws: list[RawWS] = []
        self._thread = threading.Thread(target=self._main, name="roombus-server", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        if self.error is not None:
            raise self.error
        return self

    def _main(self) -> None:
        try:
            trio.run(self._amain)
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    def _on_notice(self, notice: Notice) -> None:
        with self._notice_cond:
            self.notices.append(notice)
            self._notice_cond.notify_all()
        if self._user_hook is not None:
            self._user_hook(notice)

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
                    )
                    self.server = await nursery.start(serve)
                    self.port = self.server.port
                self._ready.set()
        self.stopped_cleanly = True

    async def _start_via_stream(self, nursery: trio.Nursery) -> None:
        """No listener of its own: trio.serve_tcp hands each stream to handle_stream."""
        server = roombus.trio.Server(
            self.broker_config, self.server_config, on_notice=self._on_notice
        )
        await nursery.start(roombus.trio.run_server, server)
        self.server = server

        async def handler(stream: trio.SocketStream) -> None:
            await server.handle_stream(stream, "tcp")

        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
        self.port = listeners[0].socket.getsockname()[1]

    def stop(self, timeout: float = 10.0) -> float:
        """Cancel the server (graceful shutdown) and wait for it; returns the seconds taken."""
        t0 = time.monotonic()
        if self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
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

    # -- running code in the server's thread ----------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous function in the trio thread (the server API is trio-bound)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

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

    def connect(self, room: str = "lobby", username: str = "ann", **kw: Any) -> Client:
        client = open_client(self.port, room, username, **kw)
        self._clients.append(client)
        return client

    def room(self, room: str, *usernames: str) -> list[Client]:
        """Connect each user in turn; earlier members see (and consume) later joins."""
        clients: list[Client] = []
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
        assert self.alive, self.error
        with open_client(self.port, "health-check", "probe").ws as ws:
            client = Client(ws, "health-check", "probe")
            client.chat("still here?")
            msg = client.expect(type="chat", content="still here?", username="probe")
            assert msg["seq"] >= 1


def split_config(**settings: Any) -> tuple[BrokerConfig, ServerConfig]:
    """Route keyword settings to BrokerConfig or ServerConfig by field name."""
    unknown = set(settings) - _BROKER_FIELDS - _SERVER_FIELDS
    assert not unknown, f"unknown settings {unknown}"
    server_settings = {"host": HOST, "port": 0, "close_timeout": 2.0}
    server_settings.update({k: v for k, v in settings.items() if k in _SERVER_FIELDS})
    broker = BrokerConfig(**{k: v for k, v in settings.items() if k in _BROKER_FIELDS})
    return broker, ServerConfig(**server_settings)


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    """
    A factory: ``make_server(max_message_bytes=1024, handshake_timeout=0.3, ...)``
    starts a server with those settings (BrokerConfig or ServerConfig fields, by name).
    At teardown its clients are closed, it is stopped, and the test fails if it
    crashed or logged an error.
    """
    servers: list[ServerThread] = []
    errors = _ErrorLog()
    logger = logging.getLogger("roombus")
    logger.addHandler(errors)

    def make(
        *,
        on_notice: Callable[[Notice], None] | None = None,
        via_stream: bool = False,
        **settings: Any,
    ) -> ServerThread:
        broker, server = split_config(**settings)
        st = ServerThread(broker, server, on_notice, via_stream=via_stream)
        servers.append(st)
        return st.start()

    make.error_records = errors.records  # type: ignore[attr-defined]  # tests may clear it
    try:
        yield make
        for st in servers:
            st.close_clients()
            st.stop()
        messages = [r.getMessage() for r in errors.records]
        assert not messages, f"the server logged errors: {messages}"
    finally:
        logger.removeHandler(errors)
        for st in servers:
            if st._thread.is_alive():  # a failed test: do not leave the thread behind
                st.close_clients()
                try:
                    st.stop()
                except BaseException:
                    pass


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    """A server with the default limits."""
    return make_server()


# -- the command line in a subprocess -------------------------------------------------------

LISTENING_RE = re.compile(r"listening on ws://([^/\s]+):(\d+)/ws")


class CliServer:
    """``python -m roombus serve`` in a subprocess; stderr is collected by a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ROOMBUS_")}
        env = {**environ, **(env or {})}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "roombus", "serve", "--host", HOST, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        self._stdout = ""
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = LISTENING_RE.search(line)
            if m and self.port is None:
                self.port = int(m.group(2))
                self._listening.set()
        self._listening.set()  # the process ended

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self._stdout = self.proc.stdout.read()

    def wait_listening(self, timeout: float = 15.0) -> int:
        assert self._listening.wait(timeout), f"no 'listening on' line: {self.stderr}"
        assert self.port is not None, f"the server exited: {self.stderr}"
        return self.port

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)  # to this PID only

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def stdout(self) -> str:
        return self._stdout

    def stop(self) -> None:
        """Make sure the process is gone (kill only our own PID)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for t in self._readers:
            t.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def cli() -> Iterator[Callable[..., CliServer]]:
    """A factory: ``cli("--port", "0", ...)`` runs ``roombus serve``; killed at teardown."""
    procs: list[CliServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliServer:
        p = CliServer(*args, env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
