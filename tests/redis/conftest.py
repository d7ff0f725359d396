"""
A throwaway ``redis-server`` per test, on a free loopback port.

:func:`start_redis` is a plain function so that other suites (multi-process cluster
tests) can start as many servers as they need; the ``redis_server`` fixture wraps it
for one test. Every process is signalled by its own PID only, and always reaped: a
server outlives neither its test nor a failure to start. Fault tests use
:meth:`RedisProcess.kill` (a crash), :meth:`~RedisProcess.pause` (a hung server: it
accepts connections, as the kernel does that, but answers nothing) and
:meth:`~RedisProcess.restart` (same port).

There is no skipping: without ``redis-server`` these tests fail, so that a CI image that
lacks it cannot pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

HOST = "127.0.0.1"
#: Seconds to wait for a server to start or stop.
START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    """Whether a Redis server on *port* answers PING (NOAUTH counts: it is up)."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")
    except OSError:
        return False


class RedisProcess:
    """One ``redis-server`` subprocess: no persistence, loopback only.

    ``extra_args`` are passed on the command line (``["--requirepass", "s3cret"]``).
    """

    def __init__(self, port: int, extra_args: Sequence[str] = (), password: str | None = None):
        self.port = port
        self.extra_args = list(extra_args)
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="roombus-redis-"))
        self.unix_path = str(self.dir / "redis.sock")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not running"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING; fail the test otherwise."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not installed: apt-get install redis-server")
        assert self._proc is None, "already started"
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        args += ["--daemonize", "no", "--dir", str(self.dir), "--unixsocket", self.unix_path]
        if self.password is not None:
            args += ["--requirepass", self.password]
        with open(self.dir / "redis.log", "ab") as log:
            self._proc = subprocess.Popen([*args, *self.extra_args], stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._reap(signal.SIGKILL)
                log_text = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log_text}")
            time.sleep(0.01)

    def _reap(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if sig != signal.SIGKILL:  # a paused server cannot act on SIGTERM
                os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, sig)
            try:
                proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            proc.wait()

    def stop(self) -> None:
        """Shut the server down cleanly (SIGTERM) and wait for it."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """Crash the server (SIGKILL to its PID) and wait for it."""
        self._reap(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop the server if it runs, and start a fresh, empty one on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(
    port: int | None = None, extra_args: Sequence[str] = (), password: str | None = None
) -> RedisProcess:
    """Start a ``redis-server`` on *port* (a free one if None); the caller must ``close()`` it.

    With a free port chosen here, a lost race for it (another process took it between
    our probe and the server's bind) is retried on a new one.
    """
    for attempt in range(3):
        server = RedisProcess(port or _free_port(), extra_args, password)
        try:
            server.start()
        except RuntimeError:
            server.close()
            if port is not None or attempt == 2:
                raise
        except BaseException:  # pytest.fail (no redis-server), KeyboardInterrupt
            server.close()
            raise
        else:
            return server
    raise AssertionError("unreachable")


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A fresh ``redis-server`` for one test; killed at teardown, whatever happened."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()
