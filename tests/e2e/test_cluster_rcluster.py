"""
``roombus serve --redis redis+cluster://...``: a trio node and an asyncio node, each its
own process, on a Redis Cluster of three primaries (tests/redis/rcluster.py), chat in
three rooms whose slots are on three different primaries: presence crosses the nodes,
and every room has one order and one gapless seq on both nodes. Loopback only, every
wait bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from roombus.cluster.slots import key_slot
from tests.e2e.conftest import CliServer, open_client
from tests.e2e.test_cluster_nodes import drain, metric, wait_for
from tests.redis.rcluster import ClusterSetup, start_cluster


@pytest.fixture
def cluster() -> Iterator[ClusterSetup]:
    setup = start_cluster()
    try:
        yield setup
    finally:
        setup.close()


def test_nodes_chat_across_shards(cluster: ClusterSetup) -> None:
    rooms = []
    for port in cluster.ports:  # one room per primary
        rooms.append(
            next(
                f"room{i}"
                for i in range(10_000)
                if f"room{i}" not in rooms and cluster.owner(key_slot(f"room{i}")) == port
            )
        )
    nodes = [
        CliServer(
            "--port",
            "0",
            "--redis",
            cluster.url,
            "--node-id",
            f"node-{i}",
            "--presence-ttl",
            "1.5",
            transport="asyncio" if i % 2 else "trio",
        )
        for i in range(2)
    ]
    clients = []
    try:
        for node in nodes:
            node.wait_listening()
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        a, b = nodes
        pairs = []
        for room in rooms:
            ann = open_client(a.port, room, "ann")
            clients.append(ann)
            bob = open_client(b.port, room, "bob")
            clients.append(bob)
            ann.expect(type="presence", event="join", username="bob")
            pairs.append((ann, bob))
        n = 20
        for k in range(n):
            for ann, bob in pairs:
                ann.chat({"k": k, "from": "ann"})
                bob.chat({"k": k, "from": "bob"})
        for room, (ann, bob) in zip(rooms, pairs, strict=True):
            seen = []
            for c in (ann, bob):
                got = drain(c, until=lambda m: m.get("seq") == 2 * n, timeout=20)
                chats = [m for m in got if m["type"] == "chat"]
                assert [m["seq"] for m in chats] == list(range(1, 2 * n + 1)), room
                seen.append([(m["username"], m["content"]["k"]) for m in chats])
            assert seen[0] == seen[1]  # one order on both nodes
        # presence: bob leaves every room, ann hears it in each
        for ann, bob in pairs:
            bob.close()
            ann.expect(type="presence", event="leave", username="bob")
        for node in nodes:
            assert metric(node, "roombus_redis_errors_total") == 0
            assert metric(node, "roombus_redis_failures_total") == 0
            assert "Traceback" not in node.stderr
    finally:
        for c in clients:
            c.close()
        for node in nodes:
            node.stop()
