"""
A Redis Cluster of three primaries on loopback ports, for the cluster tests.

Each node is a ``redis-server --cluster-enabled yes`` process of its own (a
:class:`~tests.redis.conftest.RedisProcess`, signalled by its own PID only and always
reaped); ``redis-cli --cluster create`` joins them, and :func:`start_cluster` waits for
``cluster_state:ok`` on each. :meth:`ClusterSetup.migrate` moves one slot by hand
(``CLUSTER SETSLOT ... IMPORTING/MIGRATING``, ``MIGRATE``, ``SETSLOT ... NODE``), and
can stop half way, for ASK.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from .conftest import HOST, START_TIMEOUT, RedisProcess, start_redis

#: Seconds to wait for the cluster to form or a command of redis-cli to end.
FORM_TIMEOUT = 20.0


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        try:
            with socket.socket() as bus:
                bus.bind((HOST, port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def cli(port: int, *args: str, timeout: float = FORM_TIMEOUT) -> str:
    """``redis-cli -p PORT args...``: its output (a failure raises)."""
    binary = shutil.which("redis-cli")
    if binary is None:
        pytest.fail("redis-cli not installed: apt-get install redis-tools")
    done = subprocess.run(
        [binary, "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        timeout=timeout,
        check=True,
        text=True,
    )
    return done.stdout.strip()


class ClusterSetup:
    """Three primaries in one cluster; ``close()`` stops them all."""

    def __init__(self) -> None:
        self.servers: list[RedisProcess] = []

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def node_id(self, port: int) -> str:
        return cli(port, "CLUSTER", "MYID")

    def owner(self, slot: int) -> int:
        """The port of the primary that owns *slot*."""
        for line in cli(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            port = int(fields[1].split(":")[1].split("@")[0])
            for part in fields[8:]:
                if part.startswith("["):
                    continue
                first, _, last = part.partition("-")
                if int(first) <= slot <= int(last or first):
                    return port
        raise AssertionError(f"no owner of slot {slot}")

    def migrate(self, slot: int, target: int, *, finish: bool = True) -> None:
        """Move *slot* (and its keys) to the primary on port *target*; with
        ``finish=False``, stop once it is MIGRATING/IMPORTING (keys not moved: ASK)."""
        source = self.owner(slot)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        assert cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id) == "OK"
        assert cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id) == "OK"
        if not finish:
            return
        self.finish(slot, source, target)

    def finish(self, slot: int, source: int, target: int) -> None:
        """Move the keys of *slot* still on *source*, then give *slot* to *target*."""
        dst_id = self.node_id(target)
        while True:
            keys = cli(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
            if not keys:
                break
            cli(source, "MIGRATE", HOST, str(target), "", "0", "5000", "KEYS", *keys)
        for port in (target, source, *self.ports):
            cli(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        self.wait_ok()

    def wait_ok(self) -> None:
        deadline = time.monotonic() + FORM_TIMEOUT
        while True:
            states = [cli(p, "CLUSTER", "INFO") for p in self.ports]
            if all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not settle: {states}")
            time.sleep(0.05)

    def close(self) -> None:
        for server in self.servers:
            server.close()


def start_cluster(primaries: int = 3) -> ClusterSetup:
    """Start *primaries* nodes, join them with ``redis-cli --cluster create``, wait for
    ``cluster_state:ok``; the caller must ``close()`` it."""
    setup = ClusterSetup()
    try:
        for _ in range(primaries):
            port = _free_cluster_port()
            setup.servers.append(
                start_redis(
                    port,
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",  # in the server's own --dir
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            )
        cli(
            setup.ports[0],
            "--cluster",
            "create",
            *(f"{HOST}:{p}" for p in setup.ports),
            "--cluster-yes",
            timeout=START_TIMEOUT * 2,
        )
        setup.wait_ok()
        # Every node must know every other's slots (the gossip settles after "ok").
        deadline = time.monotonic() + FORM_TIMEOUT
        while any(
            len(cli(p, "CLUSTER", "SLOTS").splitlines()) < 3 * primaries for p in setup.ports
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the nodes do not agree on the slots")
            time.sleep(0.05)
    except BaseException:
        setup.close()
        raise
    return setup
