"""
``roombus serve --redis redis+sentinel://...``: a trio node and an asyncio node, each
its own process, find the primary through a sentinel (the URL names a dead sentinel
first), and follow a failover (``SENTINEL FAILOVER``) while clients chat: the nodes
reconnect to the new primary, the chats go on, and the clients that follow positions
get every message once or are told of the gap (``reset`` / ``joined`` with
``recovered: false``): never a silent gap (:class:`Follower` checks every envelope).
Loopback only, every wait bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import CliServer
from tests.e2e.test_cluster_faults import Follower, Publisher, _clean
from tests.e2e.test_cluster_nodes import metric, wait_for
from tests.redis.sentinel import SentinelSetup


@pytest.fixture
def setup() -> Iterator[SentinelSetup]:
    s = SentinelSetup()
    try:
        yield s
    finally:
        s.close()


def test_nodes_follow_a_failover_while_clients_chat(setup: SentinelSetup) -> None:
    nodes = [
        CliServer(
            "--port",
            "0",
            "--redis",
            setup.url(),
            "--node-id",
            f"node-{i}",
            "--presence-ttl",
            "1.5",
            transport="asyncio" if i % 2 else "trio",
        )
        for i in range(2)
    ]
    followers: list[Follower] = []
    pub = None
    try:
        for node in nodes:
            node.wait_listening()
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        a, b = nodes
        ann, bob = Follower(a, "ann"), Follower(b, "bob")
        followers += [ann, bob]
        wait_for(lambda: ann.held is not None and bob.held is not None)
        pub = Publisher(b, rate=50)
        wait_for(lambda: len(ann.contents) >= 30 and len(bob.contents) >= 30)
        before = ann.position()
        setup.failover()
        for node in nodes:  # the old primary dropped them; each found the new one
            wait_for(lambda node=node: (metric(node, "roombus_redis_connects_total") or 0) >= 2, 30)
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1, 30)
        sent = pub.sent
        wait_for(lambda: f"p{sent + 50}" in ann.contents and f"p{sent + 50}" in bob.contents, 30)
        # a client that comes back with a position from before the failover
        carol = Follower(a, "carol", since=before)
        followers.append(carol)
        # Following live (a chat after her join): the last one is owed to her too. (A
        # join answered after the last chat was numbered would not be owed it.)
        wait_for(lambda: carol.held is not None and bool(carol.contents))
        pub.stop()
        last = f"p{pub.sent - 1}"
        for f in (ann, bob, carol):
            f.wait_content(last)
        _clean(ann, bob, carol)
        # the new primary is another Redis run: a new epoch, told to both as a reset
        for f in (ann, bob):
            assert [m for m in f.told if m["type"] == "reset"], f.told
        joined = [m for m in carol.told if m["type"] == "joined"]
        assert joined and joined[0]["recovered"] is False, joined
        for node in nodes:
            assert "Traceback" not in node.stderr
    finally:
        if pub is not None:
            pub.close()
        for f in followers:
            f.close()
        for node in nodes:
            node.stop()
