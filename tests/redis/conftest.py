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


def _answers(port: int | str) -> bool:
    """Whether a Redis server on *port* (or the unix socket at that path) answers PING
    (NOAUTH counts: it is up)."""
    try:
        if isinstance(port, str):
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.settimeout(0.5)
                sock.connect(port)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((HOST, port), timeout=0.5)
        with sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")
    except OSError:
        return False


class TLSFiles:
    """Certificates made by trustme in *directory*: a CA, the server's (for 127.0.0.1
    and ``redis.test``), a client's (certificate and key in one file), and a CA that
    signed none of them."""

    def __init__(self, directory: Path) -> None:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        ca = trustme.CA()
        server = ca.issue_cert(HOST, "redis.test")
        client = ca.issue_cert("roombus-node")
        self.ca_file = str(directory / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        self.server_cert = str(directory / "server.pem")
        self.server_key = str(directory / "server.key")
        server.cert_chain_pems[0].write_to_path(self.server_cert)
        server.private_key_pem.write_to_path(self.server_key)
        self.client_pem = str(directory / "client.pem")  # certificate and key
        self.client_cert = str(directory / "client-cert.pem")
        self.client_key = str(directory / "client.key")
        client.private_key_and_cert_chain_pem.write_to_path(self.client_pem)
        client.cert_chain_pems[0].write_to_path(self.client_cert)
        client.private_key_pem.write_to_path(self.client_key)
        self.other_ca_file = str(directory / "other-ca.pem")
        trustme.CA().cert_pem.write_to_path(self.other_ca_file)

    def server_args(self, *, auth_clients: bool) -> list[str]:
        return [
            "--tls-cert-file",
            self.server_cert,
            "--tls-key-file",
            self.server_key,
            "--tls-ca-cert-file",
            self.ca_file,
            "--tls-auth-clients",
            "yes" if auth_clients else "no",
        ]


class RedisProcess:
    """One ``redis-server`` subprocess: no persistence, loopback only.

    ``extra_args`` are passed on the command line (``["--requirepass", "s3cret"]``).
    """

    def __init__(
        self,
        port: int,
        extra_args: Sequence[str] = (),
        password: str | None = None,
        *,
        tls: bool = False,
    ):
        self.port = port
        self.extra_args = list(extra_args)
        self.password = password
        #: *port* is a TLS port (``--tls-port``); plain TCP is off (``--port 0``).
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="roombus-redis-"))
        self.unix_path = str(self.dir / "redis.sock")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{HOST}:{self.port}"

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
        ports = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        args = [
            binary,
            *ports,
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
        while not _answers(self.unix_path if self.tls else self.port):
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
    port: int | None = None,
    extra_args: Sequence[str] = (),
    password: str | None = None,
    *,
    tls: bool = False,
) -> RedisProcess:
    """Start a ``redis-server`` on *port* (a free one if None); the caller must ``close()`` it.

    With a free port chosen here, a lost race for it (another process took it between
    our probe and the server's bind) is retried on a new one.
    """
    for attempt in range(3):
        server = RedisProcess(port or _free_port(), extra_args, password, tls=tls)
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


def start_tls_redis(files: TLSFiles, *, auth_clients: bool = False) -> RedisProcess:
    """A ``redis-server`` that speaks TLS only (``--port 0 --tls-port P``), with the
    certificates of *files*; ``auth_clients``: it requires a client certificate."""
    return start_redis(extra_args=files.server_args(auth_clients=auth_clients), tls=True)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles(tmp_path_factory.mktemp("redis-tls"))
