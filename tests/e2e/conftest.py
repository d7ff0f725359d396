"""
End-to-end fixtures: a real roombus server on a loopback port, and real clients.

The server runs in-process in a background thread, over each transport in turn (see
:mod:`.servers`: trio, asyncio, and the ASGI app under uvicorn and hypercorn); tests
talk to it over sockets with the ``websockets`` sync client (an independent
implementation) or with raw sockets (:mod:`.rawws`) when they need to misbehave. A few
tests run the real command line in a subprocess (:class:`CliServer`), with each of its
transports.
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
from typing import Any

import attrs
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from roombus import BrokerConfig, Notice, ServerConfig
from tests.redis.conftest import RedisProcess, start_redis

from .rawws import HOST, TIMEOUT
from .servers import TRANSPORTS, Capabilities, ServerThread, TrioServer, _ErrorLog

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
    query: dict[str, str] | None = None,
    **kw: Any,
) -> Client:
    """
    Connect to ``/ws?room=&username=`` (plus *query*). With *expect_join* True, read
    the client's own presence join and then its presence_state; with False, only the
    presence_state (a second connection of a present user); with None, read nothing.
    """
    from urllib.parse import urlencode

    kw.setdefault("compression", None)
    params = {"room": room, "username": username, **(query or {})}
    ws = ws_connect(
        f"ws://{HOST}:{port}/ws?" + urlencode(params),
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


def split_config(**settings: Any) -> tuple[BrokerConfig, ServerConfig]:
    """Route keyword settings to BrokerConfig or ServerConfig by field name."""
    unknown = set(settings) - _BROKER_FIELDS - _SERVER_FIELDS
    assert not unknown, f"unknown settings {unknown}"
    server_settings = {"host": HOST, "port": 0, "close_timeout": 2.0}
    server_settings.update({k: v for k, v in settings.items() if k in _SERVER_FIELDS})
    broker = BrokerConfig(**{k: v for k, v in settings.items() if k in _BROKER_FIELDS})
    return broker, ServerConfig(**server_settings)


@pytest.fixture(params=list(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport in turn: every test that starts a server runs over all of them."""
    return str(request.param)


@pytest.fixture
def caps(transport: str) -> Capabilities:
    """What the transport under test declares it does where transports differ."""
    return TRANSPORTS[transport].caps


@pytest.fixture
def make_server(transport: str) -> Iterator[Callable[..., ServerThread]]:
    """
    A factory: ``make_server(max_message_bytes=1024, handshake_timeout=0.3, ...)``
    starts a server over the transport under test with those settings (BrokerConfig or
    ServerConfig fields, by name). At teardown its clients are closed, it is stopped,
    and the test fails if it crashed or logged an error (roombus's, or its server's).
    """
    servers: list[ServerThread] = []
    errors = _ErrorLog()
    loggers = [logging.getLogger(name) for name in ("roombus", "uvicorn.error", "hypercorn.error")]
    for logger in loggers:
        logger.addHandler(errors)

    def make(
        *,
        on_notice: Callable[[Notice], None] | None = None,
        via_stream: bool = False,
        extra: dict[str, Any] | None = None,
        **settings: Any,
    ) -> ServerThread:
        broker, server = split_config(**settings)
        st: ServerThread
        if via_stream:
            assert transport == "trio", "handle_stream is the trio adapter's"
            st = TrioServer(broker, server, on_notice, via_stream=True)
        else:
            st = TRANSPORTS[transport](broker, server, on_notice)
        st.extra = extra or {}
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
        for logger in loggers:
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

LISTENING_RE = re.compile(r"listening on wss?://([^/\s]+):(\d+)/ws")


class CliServer:
    """``python -m roombus serve`` in a subprocess; stderr is collected by a thread."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        transport: str = "trio",
        code: str | None = None,
    ) -> None:
        """*code*: run this Python program (with *args*) instead of ``roombus serve``."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ROOMBUS_")}
        env = {**environ, **(env or {})}
        env["PYTHONUNBUFFERED"] = "1"
        env["ROOMBUS_TRANSPORT"] = transport  # the variable: a test may still give the flag
        # SIGTERM closes every connection at once unless a test drains (--drain-seconds)
        env.setdefault("ROOMBUS_DRAIN_SECONDS", "0")
        self.transport = transport
        command = ["-m", "roombus", "serve", "--host", HOST] if code is None else ["-c", code]
        self.proc = subprocess.Popen(
            [sys.executable, *command, *args],
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
def redis() -> Iterator[RedisProcess]:
    """A real ``redis-server`` of the test's own (the cluster tests' backplane)."""
    proc = start_redis()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(params=["trio", "asyncio"])
def cli(request: pytest.FixtureRequest) -> Iterator[Callable[..., CliServer]]:
    """
    A factory: ``cli("--port", "0", ...)`` runs ``roombus serve`` with each of its
    transports in turn (``ROOMBUS_TRANSPORT``); killed at teardown.
    """
    procs: list[CliServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliServer:
        p = CliServer(*args, env=env, transport=request.param)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
