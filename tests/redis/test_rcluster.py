"""Redis Cluster against a real one: three primaries on loopback (tests/redis/rcluster.py).

Both clients (trio and asyncio) route commands across slots, follow a MOVED after a
slot migration and an ASK during one, and subscribe sharded channels on their shards;
two backplanes (each driver) chat across rooms whose slots are on different primaries.
The slot function is cross-checked with ``CLUSTER KEYSLOT`` of a live node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from roombus import ClusterConfig
from roombus.asyncio import _redis as asyncio_redis
from roombus.cluster import Announce, Relay, RoomSynced, Subscribe
from roombus.cluster.schema import channel
from roombus.cluster.slots import key_slot
from roombus.core.events import RecordReceived
from roombus.core.names import RoomName, Username
from roombus.trio import _redis as trio_redis

from .rcluster import ClusterSetup, cli, start_cluster
from .test_backplane_drivers import Harness, closing, of

TIMEOUT = 30


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSetup]:
    setup = start_cluster()
    try:
        yield setup
    finally:
        setup.close()


@pytest.fixture(params=["trio", "asyncio"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(driver: str, main: Any) -> None:
    module = trio_redis if driver == "trio" else asyncio_redis

    async def bounded() -> None:
        with anyio.fail_after(TIMEOUT):
            await main(module)

    anyio.run(bounded, backend=driver)


def _on(setup: ClusterSetup, port: int, prefix: str, avoid: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    """A hash tag whose slot is on the primary at *port* (and not in *avoid*)."""
    for i in range(10_000):
        tag = f"{prefix}{i}"
        slot = key_slot(tag)
        if slot not in avoid and setup.owner(slot) == port:
            return tag
    raise AssertionError


def test_key_slot_is_redis_keyslot(cluster: ClusterSetup) -> None:
    keys = ["123456789", "foo", "{user1000}.following", "foo{}{bar}", "a{b}c", "roombus:ctl"]
    keys += [f"roombus:{{room-{i}}}:s" for i in range(20)]
    for k in keys:
        assert int(cli(cluster.ports[0], "CLUSTER", "KEYSLOT", k)) == key_slot(k), k


def test_commands_go_to_their_slots_primary(driver: str, cluster: ClusterSetup) -> None:
    keys = [f"k:{i}" for i in range(60)]

    async def main(redis: Any) -> None:
        conn = await redis.connect_cluster(cluster.url, connect_timeout=2)
        try:
            assert set(conn.slot_map.primaries) == {("127.0.0.1", p) for p in cluster.ports}
            replies = await conn.pipeline([("SET", k, f"v{i}{driver}") for i, k in enumerate(keys)])
            assert replies == [b"OK"] * len(keys)
            got = await conn.pipeline([("GET", k) for k in keys] + [("PING",)])
            assert got == [f"v{i}{driver}".encode() for i in range(len(keys))] + [b"PONG"]
            # Each key really is on its slot's primary (no redirection was needed).
            for k in keys[:5]:
                port = cluster.owner(key_slot(k))
                assert cli(port, "GET", k) == f"v{keys.index(k)}{driver}"
            # A script is loaded on every primary.
            sha = await conn.execute("SCRIPT", "LOAD", "return KEYS[1]")
            for k in keys[:6]:
                assert await conn.execute("EVALSHA", sha, 1, k) == k.encode()
        finally:
            await conn.aclose()

    run(driver, main)


def test_a_moved_slot_is_followed(driver: str, cluster: ClusterSetup) -> None:
    source, target = cluster.ports[0], cluster.ports[1]
    tag = _on(cluster, source, f"moved-{driver}-")
    slot = key_slot(tag)
    key = f"{{{tag}}}:x"

    async def main(redis: Any) -> None:
        conn = await redis.connect_cluster(cluster.url, connect_timeout=2)
        try:
            assert await conn.execute("SET", key, "1") == b"OK"
            assert conn.slot_map.node_of(slot) == ("127.0.0.1", source)
            await anyio.to_thread.run_sync(lambda: cluster.migrate(slot, target))
            # The client's map is stale: the source answers MOVED, the client follows.
            assert await conn.execute("GET", key) == b"1"
            assert conn.slot_map.node_of(slot) == ("127.0.0.1", target)
            assert await conn.execute("INCR", key) == 2
        finally:
            await conn.aclose()

    run(driver, main)


def test_an_ask_during_a_migration_is_followed(driver: str, cluster: ClusterSetup) -> None:
    source, target = cluster.ports[1], cluster.ports[2]
    tag = _on(cluster, source, f"ask-{driver}-")
    slot = key_slot(tag)
    old, new = f"{{{tag}}}:old", f"{{{tag}}}:new"

    async def main(redis: Any) -> None:
        conn = await redis.connect_cluster(cluster.url, connect_timeout=2)
        try:
            assert await conn.execute("SET", old, "here") == b"OK"
            await anyio.to_thread.run_sync(lambda: cluster.migrate(slot, target, finish=False))
            # A key still on the source is served there; a new one is ASKed to the target.
            assert await conn.execute("GET", old) == b"here"
            assert await conn.execute("SET", new, "there") == b"OK"
            assert await conn.execute("GET", new) == b"there"
            assert conn.slot_map.node_of(slot) == ("127.0.0.1", source)  # ASK moves nothing
            await anyio.to_thread.run_sync(lambda: cluster.finish(slot, source, target))
            assert await conn.pipeline([("GET", old), ("GET", new)]) == [b"here", b"there"]
            assert conn.slot_map.node_of(slot) == ("127.0.0.1", target)
        finally:
            await conn.aclose()

    run(driver, main)


def test_sharded_channels_on_their_shards(driver: str, cluster: ClusterSetup) -> None:
    chans = [channel("t", _on(cluster, port, f"sub-{driver}-")) for port in cluster.ports]

    async def main(redis: Any) -> None:
        conn = await redis.connect_cluster(cluster.url, connect_timeout=2)
        sub = await redis.connect_cluster_subscriber(cluster.url, sharded=True, connect_timeout=2)
        got: list[tuple[bytes, bytes]] = []
        if driver == "asyncio":
            done = anyio.Event()

            def messages(burst: list[tuple[bytes, bytes]]) -> None:
                got.extend(burst)
                if len(got) >= len(chans):
                    done.set()

            sub.on_messages = messages
        try:
            await sub.subscribe(*chans)
            assert sub.channels == {c.encode() for c in chans}
            replies = await conn.pipeline([("SPUBLISH", c, f"m{i}") for i, c in enumerate(chans)])
            assert replies == [1, 1, 1]  # each delivered on its shard
            await sub.ping()
            if driver == "trio":
                while len(got) < len(chans):
                    got.extend(await sub.receive_many())
            else:
                await done.wait()
            assert sorted(got) == sorted(
                (c.encode(), f"m{i}".encode()) for i, c in enumerate(chans)
            )
        finally:
            await sub.aclose()
            await conn.aclose()

    run(driver, main)


@pytest.fixture(params=["trio", "asyncio"])
def harness(request: pytest.FixtureRequest) -> Harness:
    return Harness(request.param)


def test_backplanes_chat_across_shards(harness: Harness, cluster: ClusterSetup) -> None:
    rooms = [RoomName(_on(cluster, port, f"room-{harness.driver}-")) for port in cluster.ports]

    async def main(h: Harness) -> None:
        a, host_a = await h.start(
            ClusterConfig(url=cluster.url, node_id="node-a", presence_ttl=1.5)
        )
        b, host_b = await h.start(
            ClusterConfig(url=cluster.url, node_id="node-b", presence_ttl=1.5)
        )
        async with closing(h, a, b):
            for backplane, host in ((a, host_a), (b, host_b)):
                backplane.submit([Subscribe(room=room, gen=1) for room in rooms])
                await host.wait_for(of(RoomSynced), len(rooms))
            b.submit(
                [Announce(room=room, username=Username("bob"), present=True) for room in rooms]
            )
            a.submit([Relay(room=room, ref=i, prefix=b"p") for i, room in enumerate(rooms)])
            for host in (host_a, host_b):
                await host.wait_for(of(RecordReceived), 2 * len(rooms))
            records = host_a.records()
            assert sum(r.startswith(b"m 1 node-a") for r in records) == len(rooms)
            assert sum(r.startswith(b"j ") for r in records) == len(rooms)
            assert a.statistics.online and b.statistics.online
            assert a.statistics.errors == 0

    harness.run(main)
