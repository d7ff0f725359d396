"""
Exactly once, or told, across real faults: roombus nodes in their own processes
(one on trio, one on asyncio) behind a real ``redis-server``, clients that follow
positions, and the faults the promise is about: a node killed with SIGKILL while a
client is on it, Redis restarted without persistence, Redis frozen (SIGSTOP) for 20 s
while a room chats, Redis at ``maxclients`` with the nodes cut off, and ``SCRIPT
FLUSH`` under traffic.

Each receiver checks every envelope as it comes (:class:`Follower`): a chat is the
next seq of the position it holds, never a gap, a repeat or a step back; a gap is only
ever a ``joined`` that says what it did not recover, or a ``reset``; no chat twice.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Client, CliServer, open_client
from tests.e2e.test_cluster_nodes import metric, wait_for
from tests.redis.conftest import RedisProcess

TTL = 1.5
ROOM = "live"


@pytest.fixture
def nodes(redis: RedisProcess) -> Iterator[Callable[[int], list[CliServer]]]:
    """A factory: ``nodes(3)`` starts nodes 0, 1, 2 (odd ones on asyncio) and waits."""
    started: list[CliServer] = []

    def start(n: int) -> list[CliServer]:
        for i in range(n):
            started.append(
                CliServer(
                    "--port",
                    "0",
                    "--redis",
                    redis.url,
                    "--node-id",
                    f"node-{i}",
                    "--presence-ttl",
                    str(TTL),
                    transport="asyncio" if i % 2 else "trio",
                )
            )
        for node in started:
            node.wait_listening()
        for node in started:
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        return started

    try:
        yield start
    finally:
        for node in started:
            node.stop()


class Follower:
    """A client that follows positions in one room, reading in a thread of its own."""

    def __init__(self, node: CliServer, name: str, since: str = "") -> None:
        self.name = name
        self.held: list[Any] | None = None  # [epoch, seq, joined seq]
        self.contents: list[Any] = []
        self.told: list[dict[str, Any]] = []  # joined and reset envelopes
        self.violations: list[str] = []
        self.client: Client | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.connect(node, since)

    def connect(self, node: CliServer, since: str) -> None:
        self.client = open_client(
            node.port, ROOM, self.name, expect_join=None, query={"since": since}
        )
        self._done.clear()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def position(self) -> str:
        assert self.held is not None
        return f"{self.held[0]}:{self.held[1]}"

    def _read(self) -> None:
        client = self.client
        assert client is not None
        try:
            while not self._done.is_set():
                try:
                    raw = client.ws.recv(timeout=0.2)
                except TimeoutError:
                    continue
                self.see(json.loads(raw))
        except Exception:  # the connection ended (a killed node, a close)
            return

    def see(self, m: dict[str, Any]) -> None:
        kind = m.get("type")
        if kind in ("joined", "reset"):
            self.told.append(m)
            if kind == "joined" and m.get("recovered") is True:
                if self.held is None or self.held[0] != m["epoch"]:
                    self.violations.append(f"recovered into another epoch: {m}")
                    return
                self.held[2] = m["seq"]
            else:
                self.held = [m["epoch"], m["seq"], m["seq"]]
        elif kind == "chat":
            if self.held is None:
                self.violations.append(f"a chat before joined: {m}")
                return
            if m["seq"] != self.held[1] + 1:
                self.violations.append(f"at {self.held} got seq {m['seq']} untold")
            if m.get("replayed", False) != (m["seq"] <= self.held[2]):
                self.violations.append(f"replayed flag wrong at {self.held}: {m}")
            if m["content"] in self.contents:
                self.violations.append(f"{m['content']!r} twice")
            self.held[1] = m["seq"]
            self.contents.append(m["content"])
        elif kind == "error":
            self.violations.append(f"error: {m}")

    def stop_reading(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        self.stop_reading()
        if self.client is not None:
            self.client.close()

    def wait_content(self, content: Any, timeout: float = 30.0) -> None:
        wait_for(lambda: content in self.contents, timeout=timeout)


class Publisher:
    """Chats with ids at a steady pace from a thread: ``p0, p1, ...``."""

    def __init__(self, node: CliServer, rate: float = 50.0) -> None:
        self.client = open_client(node.port, ROOM, "pub", expect_join=None)
        self.rate = rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.client.chat(f"p{self.sent}", id=f"p{self.sent}")
            self.sent += 1
            time.sleep(1 / self.rate)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def close(self) -> None:
        self.stop()
        self.client.close()


def _clean(*followers: Follower) -> None:
    for f in followers:
        assert f.violations == [], (f.name, f.violations[:5])


def test_a_client_resumes_on_another_node_after_a_kill_9_missing_nothing(nodes):
    a, b, c = nodes(3)
    ann = Follower(a, "ann")
    wait_for(lambda: ann.held is not None)
    pub = Publisher(b, rate=100)
    try:
        wait_for(lambda: len(ann.contents) >= 50)
        a.signal(signal.SIGKILL)  # ann's node dies mid-traffic
        ann.stop_reading()
        time.sleep(0.3)  # messages ann misses while it reconnects
        ann.connect(c, ann.position())
        wait_for(lambda: len(ann.contents) >= pub.sent + 20 or pub.sent > 400, timeout=20)
        pub.stop()
        last = f"p{pub.sent - 1}"
        ann.wait_content(last)
        joined = [m for m in ann.told if m["type"] == "joined"]
        assert joined[-1]["recovered"] is True, joined[-1]
        _clean(ann)
        # 0 lost, 0 duplicated: every message, once, in order.
        assert ann.contents == [f"p{i}" for i in range(pub.sent)]
    finally:
        pub.close()
        ann.close()


def test_after_redis_restarts_empty_every_resuming_client_is_told_epoch_changed(nodes, redis):
    a, b = nodes(2)
    ann, bob = Follower(a, "ann"), Follower(b, "bob")
    pub = Publisher(b, rate=20)
    try:
        wait_for(lambda: len(ann.contents) >= 10 and len(bob.contents) >= 10)
        pub.stop()
        ann.wait_content(f"p{pub.sent - 1}")
        ann.close()
        before = ann.position()
        redis.kill()
        for node in (a, b):
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 0)
        redis.restart()  # no persistence: everything is gone
        for node in (a, b):
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1, timeout=15)
        ann.connect(b, before)
        wait_for(lambda: len(ann.told) >= 2)
        joined = ann.told[-1]
        assert (joined["type"], joined["recovered"], joined["reason"]) == (
            "joined",
            False,
            "epoch_changed",
        )
        assert joined["epoch"] != before.split(":")[0]
        # bob stayed: told twice (cut off, then the new epoch), and follows it.
        wait_for(
            lambda: [m.get("reason") for m in bob.told[-2:]] == ["unavailable", "epoch_changed"]
        )
        assert bob.told[-1]["epoch"] == joined["epoch"]
        pub.client.chat("after")
        for f in (ann, bob):
            f.wait_content("after")
        _clean(ann, bob)
    finally:
        pub.close()
        ann.close()
        bob.close()


class RedisAdmin:
    """One raw connection to Redis, kept open (so it holds a slot under maxclients)."""

    def __init__(self, redis: RedisProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        self.file = self.sock.makefile("rb")

    def __call__(self, *args: str) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        line = self.file.readline()
        assert not line.startswith(b"-"), line
        return line.strip()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _fault_under_traffic(
    nodes: Callable[[int], list[CliServer]], fault: Callable[[], None]
) -> None:
    a, b = nodes(2)
    ann, bob = Follower(a, "ann"), Follower(b, "bob")
    pub = Publisher(b, rate=50)
    try:
        wait_for(lambda: len(ann.contents) >= 20 and len(bob.contents) >= 20)
        fault()
        for node in (a, b):
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1, timeout=30)
        time.sleep(1.0)
        pub.stop()
        pub.client.chat("after")
        for f in (ann, bob):
            f.wait_content("after")
        _clean(ann, bob)
        sent = pub.sent + 1
        for f in (ann, bob):
            lost = sent - len(f.contents)
            print(f"{f.name}: {len(f.contents)} of {sent} chats, {lost} lost and told")
            if lost:
                assert f.told[1:], f"{f.name} lost {lost} and was never told"
    finally:
        pub.close()
        ann.close()
        bob.close()


def test_redis_frozen_for_20_s_leaves_no_silent_gap(nodes, redis):
    def freeze() -> None:
        redis.pause()
        try:
            time.sleep(20)
        finally:
            redis.resume()

    _fault_under_traffic(nodes, freeze)


def test_redis_at_maxclients_leaves_no_silent_gap(nodes, redis):
    admin = RedisAdmin(redis)

    def full() -> None:
        admin("CONFIG", "SET", "maxclients", "1")  # this connection is the one
        admin("CLIENT", "KILL", "TYPE", "pubsub")
        admin("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        time.sleep(12)
        admin("CONFIG", "SET", "maxclients", "10000")

    try:
        _fault_under_traffic(nodes, full)
    finally:
        admin.close()


def test_script_flush_under_traffic_leaves_no_silent_gap(nodes, redis):
    admin = RedisAdmin(redis)

    def flush() -> None:
        for _ in range(3):
            assert admin("SCRIPT", "FLUSH") == b"+OK"
            time.sleep(0.5)

    try:
        _fault_under_traffic(nodes, flush)
    finally:
        admin.close()
