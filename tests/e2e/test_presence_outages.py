"""
Presence through Redis outages, against a real ``redis-server``: three nodes (trio,
asyncio, trio), a user on each who stays connected throughout, and one who leaves
during the outage. Redis is paused (SIGSTOP), at ``maxclients`` with the nodes let back
in one by one, or out of memory, for longer than the presence TTL.

The promises (docs/scaling.md, "Presence through an outage"): no watcher is ever told
that a live user left (so none is told it joined again); the user who left is gone
for every watcher, once, within the TTL of the latest of its node's and the watcher's
node's reconnection. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.conftest import Client, CliServer, open_client
from tests.e2e.test_cluster_faults import RedisAdmin
from tests.e2e.test_cluster_nodes import metric, wait_for
from tests.redis.conftest import RedisProcess

#: Keepalive 0.5 s (an eighth), entries live 2.7 s, renewed every 1.3 s.
TTL = 4.0
#: Longer than the TTL: every entry expires during it.
OUTAGE = 6.0
ROOM = "lobby"
LIVE = ("w0", "w1", "w2")


class Watcher:
    """A live user on one node, recording every presence event with its time."""

    def __init__(self, node: CliServer, name: str) -> None:
        self.name = name
        self.client: Client = open_client(node.port, ROOM, name, expect_join=None)
        self.events: list[tuple[float, str, str]] = []
        self.state: set[str] = set()  # the presence_state on joining
        self.closed = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._done.is_set():
                try:
                    raw = self.client.ws.recv(timeout=0.1)
                except TimeoutError:
                    continue
                m = json.loads(raw)
                if m.get("type") == "presence":
                    self.events.append((time.monotonic(), m["event"], m["username"]))
                elif m.get("type") == "presence_state":
                    self.state = set(m["users"])
        except Exception:
            self.closed = True  # the connection ended: a failure the test reports

    def saw(self, event: str, user: str) -> list[float]:
        return [t for t, e, u in self.events if e == event and u == user]

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.client.close()


@pytest.fixture
def cluster(redis: RedisProcess) -> Iterator[list[CliServer]]:
    nodes = [
        CliServer(
            "--port",
            "0",
            "--redis",
            redis.url,
            "--node-id",
            f"node-{i}",
            "--presence-ttl",
            str(TTL),
            transport="asyncio" if i == 1 else "trio",
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.wait_listening()
        for node in nodes:
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class OnlineSince:
    """When each node is first seen connected to Redis again from now on (polled in a
    thread, so that a node back while the outage is being ended is timed then)."""

    def __init__(self, nodes: list[CliServer], timeout: float = 30.0) -> None:
        self.t0 = time.monotonic()
        self._nodes = nodes
        self._seen: list[float | None] = [None] * len(nodes)
        self._deadline = self.t0 + timeout
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while None in self._seen and time.monotonic() < self._deadline:
            for i, node in enumerate(self._nodes):
                if self._seen[i] is None and metric(node, "roombus_backplane_online") == 1:
                    self._seen[i] = time.monotonic()
            time.sleep(0.05)

    def result(self) -> list[float]:
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1)
        assert None not in self._seen, f"nodes not back: {self._seen}"
        return [t for t in self._seen if t is not None]


def run_outage(nodes: list[CliServer], start: Callable[[], None], end: Callable[[], None]) -> None:
    watchers = [Watcher(node, name) for node, name in zip(nodes, LIVE, strict=True)]
    dan: Client | None = None
    try:
        dan = open_client(nodes[0].port, ROOM, "dan", expect_join=None)
        for w in watchers:  # everyone sees everyone before the fault
            ok = lambda w=w: "dan" in w.state or bool(w.saw("join", "dan"))  # noqa: E731
            assert wait_until(ok, 10), (w.name, w.state, w.events)
        time.sleep(TTL)  # settled: every node past its read a TTL after connecting
        for w in watchers:
            w.events.clear()
        start()
        for node in nodes:  # every node noticed (a stall: within two keepalives)
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 0, timeout=10)
        dan.close()
        dan = None
        left = time.monotonic()
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - left)))
        since = OnlineSince(nodes)
        back = since.t0
        end()
        online = since.result()
        # The precondition of the promise: the nodes reconnect within a quarter of
        # the TTL of Redis taking them (the backoff's cap), so within the TTL of
        # each other.
        spread = max(online) - min(online)
        print(f"nodes back {[round(t - back, 2) for t in online]} s after the outage")
        assert spread < TTL, f"nodes back {spread:.2f} s apart"
        time.sleep(2 * TTL + 1)  # every settling read done, and then some
        for w in watchers:
            assert not w.closed, f"{w.name}'s connection ended"
            flickers = [(t, e, u) for t, e, u in w.events if u in LIVE]
            assert flickers == [], f"{w.name} saw live users come and go: {flickers}"
        assert watchers[0].saw("leave", "dan") and watchers[0].saw("leave", "dan")[0] < back
        for i, w in ((1, watchers[1]), (2, watchers[2])):
            leaves = w.saw("leave", "dan")
            assert len(leaves) == 1, (w.name, w.events)
            ghost = leaves[0] - max(online[0], online[i])
            print(f"{w.name}: dan gone {ghost:+.2f} s after both nodes were back")
            assert ghost <= TTL + 1.0, (w.name, ghost)
    finally:
        if dan is not None:
            dan.close()
        for w in watchers:
            w.close()


def test_redis_paused_longer_than_the_ttl(cluster: list[CliServer], redis: RedisProcess) -> None:
    run_outage(cluster, redis.pause, redis.resume)


def test_redis_at_maxclients_letting_the_nodes_back_one_by_one(
    cluster: list[CliServer], redis: RedisProcess
) -> None:
    admin = RedisAdmin(redis)

    def full() -> None:
        admin("CONFIG", "SET", "maxclients", "1")  # this connection is the one
        admin("CLIENT", "KILL", "TYPE", "pubsub")
        admin("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    def one_by_one() -> None:
        for slots in (3, 5):  # a node's two links at a time, half a second apart
            admin("CONFIG", "SET", "maxclients", str(slots))
            time.sleep(0.5)
        admin("CONFIG", "SET", "maxclients", "10000")

    try:
        run_outage(cluster, full, one_by_one)
    finally:
        admin.close()


def test_redis_out_of_memory(cluster: list[CliServer], redis: RedisProcess) -> None:
    admin = RedisAdmin(redis)

    def full() -> None:
        admin("CONFIG", "SET", "maxmemory-policy", "noeviction")
        admin("CONFIG", "SET", "maxmemory", "1")

    def freed() -> None:
        admin("CONFIG", "SET", "maxmemory", "0")

    try:
        run_outage(cluster, full, freed)
    finally:
        admin.close()
