"""
A primary, a replica and a Redis Sentinel on loopback ports, for the Sentinel tests.

Each is a ``redis-server`` process of its own (the sentinel is ``redis-server
sentinel.conf --sentinel``: Debian's ``redis-sentinel`` is that same binary), signalled
by its own PID only and always reaped. :meth:`SentinelSetup.failover` asks the
sentinel to promote the replica (``SENTINEL FAILOVER``) and waits until it names the
new primary and that one says it is (``ROLE``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from .conftest import HOST, START_TIMEOUT, RedisProcess, _answers, _free_port, start_redis

MASTER = "mymaster"


def command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command to the server on *port* (inline protocol): its raw reply."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if _complete(data):
                break
        return data


def _complete(data: bytes) -> bool:
    """Whether *data* holds one whole RESP reply (enough for the replies used here)."""
    try:
        import hiredis

        reader = hiredis.Reader()
        reader.feed(data)
        return reader.gets() is not False
    except Exception:
        return False


def reply(port: int, *args: str) -> object:
    import hiredis

    reader = hiredis.Reader()
    reader.feed(command(port, *args))
    return reader.gets()


class SentinelProcess:
    """``redis-server sentinel.conf --sentinel`` monitoring *primary_port* as MASTER."""

    def __init__(self, primary_port: int, dir_: str) -> None:
        self.port = _free_port()
        self.conf = f"{dir_}/sentinel-{self.port}.conf"
        with open(self.conf, "w") as f:
            f.write(
                f"port {self.port}\nbind {HOST}\ndir {dir_}\ndaemonize no\n"
                f"sentinel monitor {MASTER} {HOST} {primary_port} 1\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server not installed"
        self.log = open(f"{dir_}/sentinel-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, self.conf, "--sentinel"], stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis-sentinel on port {self.port} did not start")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # this PID only
        self.proc.wait(START_TIMEOUT)
        self.log.close()


def _role(port: int) -> bytes | None:
    try:
        got = reply(port, "ROLE")
    except OSError:
        return None
    return got[0] if isinstance(got, list) and got else None


def wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelSetup:
    """A primary, its replica (in sync) and a sentinel that knows both."""

    def __init__(self) -> None:
        self.servers: list[RedisProcess] = []
        self.sentinels: list[SentinelProcess] = []
        primary = start_redis()
        self.servers.append(primary)
        replica = start_redis(extra_args=["--replicaof", HOST, str(primary.port)])
        self.servers.append(replica)
        wait(
            lambda: b"master_link_status:up" in command(replica.port, "INFO", "replication"),
            10,
            "the replica to sync",
        )
        self.sentinels.append(SentinelProcess(primary.port, str(primary.dir)))
        sentinel = self.sentinels[0].port
        wait(lambda: self._replica_ready(sentinel), 15, "the sentinel to know the replica")

    @staticmethod
    def _replica_ready(sentinel: int) -> bool:
        """The sentinel is connected to the replica, and sees it in sync: promotable."""
        got = reply(sentinel, "SENTINEL", "REPLICAS", MASTER)
        if not isinstance(got, list) or not got:
            return False
        fields = dict(zip(got[0][::2], got[0][1::2], strict=False))
        return fields.get(b"flags") == b"slave" and fields.get(b"master-link-status") == b"ok"

    @property
    def sentinel_port(self) -> int:
        return self.sentinels[0].port

    def primary_port(self) -> int:
        got = reply(self.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        assert isinstance(got, list), got
        return int(got[1])

    def url(self, *, dead_first: bool = True) -> str:
        """``redis+sentinel://`` naming a port nobody listens on first, then the sentinel."""
        hosts = [f"{HOST}:{self.sentinel_port}"]
        if dead_first:
            hosts.insert(0, f"{HOST}:{_free_port()}")
        return f"redis+sentinel://{','.join(hosts)}/{MASTER}"

    def failover(self, timeout: float = 20.0) -> int:
        """Promote the replica; return the new primary's port once it is one."""
        old = self.primary_port()
        wait(lambda: self._replica_ready(self.sentinel_port), timeout, "a promotable replica")
        answer = command(self.sentinel_port, "SENTINEL", "FAILOVER", MASTER)
        assert answer.startswith(b"+OK"), answer
        wait(lambda: self.primary_port() != old, timeout, "the sentinel to switch")
        new = self.primary_port()
        wait(lambda: _role(new) == b"master", timeout, "the new primary")
        return new

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()
