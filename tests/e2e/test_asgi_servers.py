"""
The ASGI app as users run it: ``uvicorn --factory roombus.asgi:create_app`` and
hypercorn configured by ``ROOMBUS_*`` variables, mounted in Starlette, and the examples.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from websockets.exceptions import InvalidStatus

from roombus.asgi import RoombusASGI

from .conftest import open_client
from .rawws import HOST, get, http_exchange, upgrade_request

ROOT = Path(__file__).resolve().parents[2]
EXIT_BOUND = 10.0


class Served:
    """A server in a subprocess on a socket bound here (so its port is known at once)."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None, fd: bool = True) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        fileno = str(self.sock.fileno())
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ROOMBUS_")}
        self.proc = subprocess.Popen(
            [sys.executable, *(a.replace("{fd}", fileno) for a in argv)],
            cwd=ROOT,
            env={**environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=(self.sock.fileno(),) if fd else (),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_serving(self) -> None:
        """Until /healthz answers (the listening socket queues connections meanwhile)."""
        assert get(self.port, "/healthz").status == 200, self.output

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)  # to this PID only
        rc = self.proc.wait(EXIT_BOUND)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.sock.close()


@pytest.fixture
def served() -> Iterator[Any]:
    procs: list[Served] = []

    def start(*argv: str, **kw: Any) -> Served:
        p = Served(*argv, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


SETTINGS = {
    "ROOMBUS_MAX_MESSAGE_BYTES": "1024",
    "ROOMBUS_SEND_QUEUE_BYTES": "4096",
    "ROOMBUS_ALLOWED_ORIGIN": "https://ok.example",
}

SERVER_COMMANDS = {
    "uvicorn": ["-m", "uvicorn", "--factory", "roombus.asgi:create_app", "--fd", "{fd}"],
    "hypercorn-asyncio": ["-m", "hypercorn", "--bind", "fd://{fd}", "roombus.asgi:create_app()"],
    "hypercorn-trio": [
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--bind",
        "fd://{fd}",
        "roombus.asgi:create_app()",
    ],
}


@pytest.mark.parametrize("server", SERVER_COMMANDS)
def test_the_server_serves_the_whole_protocol_configured_by_variables(served, server):
    proc = served(*SERVER_COMMANDS[server], env=SETTINGS)
    proc.wait_serving()
    page = get(proc.port, "/")
    assert page.status == 200 and b"<html" in page.body.lower()  # the bundled chat page
    target = "/ws?room=lobby&username=ann"
    refused = http_exchange(proc.port, upgrade_request(target, {"Origin": "https://bad.example"}))
    assert refused.status == 403
    with pytest.raises(InvalidStatus):
        open_client(proc.port, "lobby", "ann", origin="https://bad.example")
    ann = open_client(proc.port, "lobby", "ann", origin="https://ok.example")
    bob = open_client(proc.port, "lobby", "bob", origin="https://ok.example")
    try:
        ann.expect(type="presence", event="join", username="bob")
        ann.chat("hi")
        bob.expect_chat("hi", "ann")
        ann.chat("x" * 2000)  # over ROOMBUS_MAX_MESSAGE_BYTES
        closed = ann.until_closed()
        assert closed.rcvd is not None and closed.rcvd.code == 1009
        bob.expect(type="presence", event="leave", username="ann")
    finally:
        ann.close()
        bob.close()
    # uvicorn re-raises SIGTERM once its graceful shutdown is done.
    assert proc.stop() in (0, -signal.SIGTERM), proc.output
    assert "Application shutdown complete" in proc.output or "uvicorn" not in server
    assert "Traceback" not in proc.output


def test_an_invalid_variable_stops_the_server_naming_it(served):
    proc = served(*SERVER_COMMANDS["uvicorn"], env={"ROOMBUS_PING_TIMEOUT": "soon"})
    assert proc.proc.wait(EXIT_BOUND) != 0
    assert "ROOMBUS_PING_TIMEOUT" in proc.output


# -- mounted in a framework, in-process -------------------------------------------------------


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[int]:
    """*app* under uvicorn in a thread; yields the port; stops it gracefully."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_mounted_under_a_path_in_starlette():
    bus = RoombusASGI()
    app = Starlette(routes=[Mount("/bus", app=bus)], lifespan=bus.lifespan)
    with uvicorn_thread(app) as port:
        assert get(port, "/bus/healthz").status == 200
        assert get(port, "/healthz").status == 404  # Starlette's, outside the mount
        from websockets.sync.client import connect

        with connect(f"ws://{HOST}:{port}/bus/ws?room=lobby&username=ann", proxy=None) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "presence"
            assert json.loads(ws.recv(timeout=5))["type"] == "presence_state"
            ws.send('{"type":"chat","content":"mounted"}')
            assert json.loads(ws.recv(timeout=5))["content"] == "mounted"


# -- the examples, as documented --------------------------------------------------------------


def test_example_fastapi_app_under_uvicorn(served):
    proc = served("-m", "uvicorn", "examples.fastapi_app:app", "--fd", "{fd}")
    proc.wait_serving()
    ann = open_client(proc.port, "lobby", "ann")
    try:
        with urllib.request.urlopen(f"http://{HOST}:{proc.port}/api/rooms", timeout=5) as resp:
            assert json.load(resp) == {"rooms": {"lobby": ["ann"]}}
        request = urllib.request.Request(
            f"http://{HOST}:{proc.port}/api/announce?text=hello", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            answer = json.load(resp)
            assert answer["delivered"] == 1 and answer["position"]["seq"] == 1
        ann.expect(type="chat", username="server", content={"announcement": "hello"})
        bad = urllib.request.Request(
            f"http://{HOST}:{proc.port}/api/announce?text=hello&room=bad%20room", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=5)
        assert refused.value.code == 400
        assert "invalid room name" in json.load(refused.value)["detail"]
        ann.ping()  # nothing was published
    finally:
        ann.close()
    assert proc.stop(signal.SIGINT) == 0, proc.output
    assert "Traceback" not in proc.output
    assert "notice: UserJoined(room='lobby', username='ann')" in proc.output


def test_example_asyncio_server(served):
    proc = served("examples/asyncio_server.py", "0", fd=False)
    for _ in range(100):
        m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/ws", proc.output)
        if m or proc.proc.poll() is not None:
            break
        threading.Event().wait(0.05)
    assert m, proc.output
    port = int(m.group(1))
    ann = open_client(port, "lobby", "ann")
    try:
        ann.chat("hello")
        ann.expect_chat("hello", "ann")
        assert proc.stop(signal.SIGINT) == 0
        closed = ann.until_closed()
        assert closed.rcvd is not None and closed.rcvd.code == 1001
    finally:
        ann.close()
    assert "stopped" in proc.output
