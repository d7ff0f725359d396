"""
Three roombus nodes, each its own process, behind one real Redis (started by the test
from the ``redis-server`` binary; ``.ci/run`` installs it).

Cross-node delivery and order, presence across nodes, a user on two nodes, a node
killed with SIGKILL, and Redis restarted mid-traffic. Every test that starts its nodes
with the ``cluster`` fixture runs twice: all nodes on trio, and *mixed* (node 0, 2, ...
on trio, node 1, 3, ... on asyncio), so that both backplane drivers speak to each other
and each is the one killed, stopped or cut off in some test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Client, CliServer, open_client
from tests.e2e.rawws import get
from tests.redis.conftest import RedisProcess

TTL = 1.5  # presence TTL of the nodes: a killed node's users leave within it


Cluster = Callable[..., list[CliServer]]


@pytest.fixture(params=["trio", "mixed"])
def transports(request: pytest.FixtureRequest) -> Callable[[int], str]:
    """The transport of node *i*: trio, or (mixed) asyncio for every odd *i*."""
    mixed = request.param == "mixed"
    return lambda i: "asyncio" if mixed and i % 2 else "trio"


@pytest.fixture
def cluster(redis: RedisProcess, transports: Callable[[int], str]) -> Iterator[Cluster]:
    """A factory: ``cluster(3)`` starts three nodes on *redis* and waits for them."""
    nodes: list[CliServer] = []
    clients: list[Client] = []

    def start(n: int = 3, *args: str) -> list[CliServer]:
        started = [
            CliServer(
                "--port",
                "0",
                "--redis",
                redis.url,
                "--node-id",
                f"node-{len(nodes) + i}",
                "--presence-ttl",
                str(TTL),
                *args,
                transport=transports(len(nodes) + i),
            )
            for i in range(n)
        ]
        nodes.extend(started)
        for node in started:
            node.wait_listening()
        for node in started:
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        return started

    start.clients = clients  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for c in clients:
            c.close()
        for node in nodes:
            node.stop()


def connect(cluster: Cluster, node: CliServer, room: str, user: str, **kw: Any) -> Client:
    client = open_client(node.port, room, user, **kw)
    cluster.clients.append(client)  # type: ignore[attr-defined]
    return client


def metric(node: CliServer, name: str) -> float | None:
    resp = get(node.port, "/metrics")
    for line in resp.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return None


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def drain(client: Client, *, until: Callable[[Any], bool], timeout: float = 10.0) -> list[Any]:
    """Messages up to and including the first for which *until* holds."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        msg = client.recv(timeout=max(deadline - time.monotonic(), 0.01))
        got.append(msg)
        if until(msg):
            return got


def test_messages_cross_nodes_in_one_order_with_one_seq(cluster):
    nodes = cluster(3)
    users = [connect(cluster, node, "lobby", f"u{i}") for i, node in enumerate(nodes)]
    for i, c in enumerate(users):  # everyone sees everyone arrive
        for j in range(i + 1, 3):
            c.expect(type="presence", event="join", username=f"u{j}")
    n = 60
    for k in range(n):
        for i, c in enumerate(users):
            c.chat({"from": i, "k": k})
    seen = []
    for c in users:
        chats = [m for m in drain(c, until=lambda m: m.get("seq") == 3 * n) if m["type"] == "chat"]
        assert len(chats) == 3 * n
        seen.append([(m["username"], m["content"]["k"], m["seq"]) for m in chats])
        for i in range(3):  # per-sender order
            ks = [k for u, k, _ in seen[-1] if u == f"u{i}"]
            assert ks == list(range(n))
        assert [s for _, _, s in seen[-1]] == list(range(1, 3 * n + 1))  # one gapless seq
    assert seen[0] == seen[1] == seen[2]  # the same order on every node


def test_presence_spans_nodes(cluster):
    a, b, c = cluster(3)
    ann = connect(cluster, a, "lobby", "ann")
    bob = connect(cluster, b, "lobby", "bob")
    ann.expect(type="presence", event="join", username="bob")
    cid = open_client(c.port, "lobby", "cid", expect_join=None)
    cluster.clients.append(cid)
    cid.expect(type="presence", event="join", username="cid")
    assert cid.expect(type="presence_state")["users"] == ["ann", "bob", "cid"]
    for other in (ann, bob):
        other.expect(type="presence", event="join", username="cid")
    bob.close()
    ann.expect(type="presence", event="leave", username="bob")
    cid.expect(type="presence", event="leave", username="bob")
    # Another room is its own: only its members hear of it.
    connect(cluster, b, "other", "dan")
    ann.ping()
    cid.ping()


def test_a_user_on_two_nodes_joins_once_and_leaves_once(cluster):
    a, b, c = cluster(3)
    watcher = connect(cluster, c, "lobby", "watcher")
    ann_a = connect(cluster, a, "lobby", "ann")
    watcher.expect(type="presence", event="join", username="ann")
    ann_b = connect(cluster, b, "lobby", "ann", expect_join=False)  # present already
    ann_a.close()
    watcher.ping()  # no leave: ann is still on b
    ann_b.chat("still here")
    watcher.expect_chat("still here", "ann")
    ann_b.close()
    watcher.expect(type="presence", event="leave", username="ann")
    watcher.ping()  # and only one


def test_a_killed_node_s_users_leave_everywhere_within_the_ttl(cluster):
    a, b, c = cluster(3)
    ann = connect(cluster, a, "lobby", "ann")
    cid = connect(cluster, c, "lobby", "cid")
    ann.expect(type="presence", event="join", username="cid")
    connect(cluster, b, "lobby", "bob")
    for w in (ann, cid):
        w.expect(type="presence", event="join", username="bob")
    b.signal(signal.SIGKILL)
    t0 = time.monotonic()
    for w in (ann, cid):
        w.expect(type="presence", event="leave", username="bob", timeout=TTL + 3)
    converged = time.monotonic() - t0
    assert converged <= TTL + 0.5, converged
    ann.ping()
    cid.ping()  # one leave each, nothing more
    connect(cluster, a, "lobby", "eve")  # the room still works, on the living nodes
    for w in (ann, cid):
        w.expect(type="presence", event="join", username="eve")


def test_redis_restart_mid_traffic(cluster, redis):
    a, b = cluster(2)
    ann = connect(cluster, a, "lobby", "ann")
    bob = connect(cluster, b, "lobby", "bob")
    ann.expect(type="presence", event="join", username="bob")
    ann.chat("before")
    for c in (ann, bob):
        c.expect_chat("before", "ann")
    redis.kill()
    wait_for(lambda: metric(a, "roombus_backplane_online") == 0)
    # Meanwhile each node still delivers locally, and counts what it could not relay.
    ann.chat("during")
    ann.expect_chat("during", "ann")
    assert (metric(a, "roombus_relay_unconfirmed_total") or 0) >= 1
    redis.restart()
    for node in (a, b):
        wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1, timeout=15)
    # Presence was re-announced: a newcomer on either node sees both users.
    cid = open_client(b.port, "lobby", "cid", expect_join=None)
    cluster.clients.append(cid)
    cid.expect(type="presence", event="join", username="cid")
    assert cid.expect(type="presence_state")["users"] == ["ann", "bob", "cid"]
    time.sleep(TTL)  # past the nodes' second reading of the presence
    bob.chat("after")
    seen = {
        name: drain(client, until=lambda m: m.get("content") == "after")
        for name, client in (("ann", ann), ("bob", bob))
    }
    for name, msgs in seen.items():
        # Redis lost everything, yet nobody saw the other leave (and come back).
        leaves = [m for m in msgs if m.get("event") == "leave"]
        assert leaves == [], (name, leaves)
    msgs = drain(cid, until=lambda m: m.get("content") == "after")
    assert [m["content"] for m in msgs if m["type"] == "chat"] == ["after"]
    assert a.proc.poll() is None and b.proc.poll() is None  # nobody crashed
    assert "Traceback" not in a.stderr + b.stderr


def test_a_node_stopped_with_sigterm_says_goodbye_at_once(cluster):
    a, b = cluster(2)
    ann = connect(cluster, a, "lobby", "ann")
    connect(cluster, b, "lobby", "bob")
    ann.expect(type="presence", event="join", username="bob")
    b.signal(signal.SIGTERM)
    t0 = time.monotonic()
    ann.expect(type="presence", event="leave", username="bob", timeout=5)
    assert b.wait(10) == 0
    assert time.monotonic() - t0 < TTL  # not the TTL: the node said goodbye


def test_json_of_a_cross_node_chat_is_the_protocol_s(cluster):
    a, b = cluster(2)
    ann = connect(cluster, a, "lobby", "ann")
    bob = connect(cluster, b, "lobby", "bob")
    ann.expect(type="presence", event="join", username="bob")
    bob.send(json.dumps({"type": "chat", "content": {"é": [1, 2.5, None]}, "username": "x"}))
    msg = ann.expect(type="chat", username="bob", room="lobby")
    assert msg["content"] == {"é": [1, 2.5, None]}
    assert set(msg) == {"type", "username", "content", "room", "timestamp", "seq"}
    assert get(a.port, "/healthz").status == 200


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--redis", "http://127.0.0.1:6379"], "redis"),
        (["--redis", "redis://127.0.0.1:notaport"], "redis"),
        (["--redis", "redis://127.0.0.1:6379", "--node-id", "has space"], "node-id"),
        (["--redis", "redis://127.0.0.1:6379", "--presence-ttl", "0"], "presence-ttl"),
        (["--node-id", "n1"], "node-id"),
        (["--redis", "http://127.0.0.1:6379", "--transport", "asyncio"], "redis"),
        (
            ["--redis", "redis://127.0.0.1:6379", "--node-id", "", "--transport", "asyncio"],
            "node-id",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_cluster_config_errors_exit_2_naming_the_setting(args, setting):
    proc = CliServer("--port", "0", *args)
    try:
        assert proc.wait(15) == 2
        assert f"error: {setting}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        proc.stop()


def test_a_node_started_before_redis_serves_locally_then_joins(redis):
    """Redis down at start: the node serves its own clients, and joins once Redis is up."""
    redis.stop()
    node = CliServer("--port", "0", "--redis", redis.url, "--presence-ttl", str(TTL))
    other = None
    try:
        port = node.wait_listening()
        ann = open_client(port, "lobby", "ann")
        ann.chat("alone")
        ann.expect_chat("alone", "ann")
        assert metric(node, "roombus_backplane_online") == 0
        redis.restart()
        wait_for(lambda: metric(node, "roombus_backplane_online") == 1, timeout=15)
        other = CliServer("--port", "0", "--redis", redis.url, "--presence-ttl", str(TTL))
        other_port = other.wait_listening()
        wait_for(lambda: metric(other, "roombus_backplane_online") == 1)
        bob = open_client(other_port, "lobby", "bob", expect_join=None)
        bob.expect(type="presence", event="join", username="bob")
        assert bob.expect(type="presence_state")["users"] == ["ann", "bob"]
        ann.expect(type="presence", event="join", username="bob")
        ann.close()
        bob.close()
    finally:
        node.stop()
        if other is not None:
            other.stop()


def redis_cli(redis: RedisProcess, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(redis.port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()


def test_redis_refusing_commands_falls_back_to_local_delivery(cluster, redis):
    """SCRIPT FLUSH makes every relay fail: the node treats it as a lost link (serves
    locally, counts it), reconnects, reloads its scripts and carries on."""
    (a,) = cluster(1)
    ann = connect(cluster, a, "lobby", "ann")
    ann.chat("one")
    ann.expect_chat("one", "ann")
    assert redis_cli(redis, "SCRIPT", "FLUSH") == "OK"
    for k in range(3):
        ann.chat(f"during-{k}")
    for k in range(3):
        ann.expect_chat(f"during-{k}", "ann")
    wait_for(lambda: (metric(a, "roombus_redis_connects_total") or 0) >= 2, timeout=15)
    assert (metric(a, "roombus_redis_errors_total") or 0) >= 1
    ann.chat("after")
    ann.expect_chat("after", "ann")


def test_an_unreadable_snapshot_ends_the_redis_session_not_the_node(cluster, redis):
    (a,) = cluster(1)
    assert redis_cli(redis, "SET", "roombus:{X}:v", "garbage") == "OK"
    bob = open_client(a.port, "X", "bob", expect_join=None)
    cluster.clients.append(bob)
    bob.expect(type="presence", event="join", username="bob")  # served locally
    bob.expect(type="presence_state", room="X")
    bob.chat("still here")
    bob.expect_chat("still here", "bob", room="X")
    assert a.proc.poll() is None
    assert "unreadable presence snapshot" in a.stderr


def test_join_leave_join_keeps_every_message_after_the_last_join(cluster):
    a, b = cluster(2)
    carol = connect(cluster, a, "home", "carol")
    bob = connect(cluster, b, "busy", "bob")
    stop = threading.Event()

    def flood() -> None:
        k = 0
        while not stop.is_set() and k < 3000:
            bob.chat(k)
            k += 1
            time.sleep(0.001)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        for _ in range(5):
            for kind in ("join", "leave", "join", "leave"):
                carol.send({"type": kind, "room": "busy"})
        carol.send({"type": "join", "room": "busy"})
        time.sleep(1.0)
    finally:
        stop.set()
        flooder.join(10)
    bob.chat("last")
    msgs = drain(carol, until=lambda m: m.get("content") == "last")
    seqs = [m["seq"] for m in msgs if m["type"] == "chat"]
    # After the last join's presence_state, the room's messages come without a gap.
    last_state = max(i for i, m in enumerate(msgs) if m["type"] == "presence_state")
    tail = [m["seq"] for m in msgs[last_state:] if m["type"] == "chat"]
    assert tail, seqs[-5:]
    assert tail == list(range(tail[0], tail[0] + len(tail)))


def test_a_name_or_content_the_backplane_cannot_carry_is_refused_at_the_edge(cluster):
    """
    A token whose ``sub`` holds a lone surrogate (valid JSON, no UTF-8 form) once got in
    and then broke the node's backplane (every command naming the user failed to encode):
    it is refused with 401, a chat holding one gets an ``error``, and the nodes go on
    carrying each other's messages and presence.
    """
    from tests.e2e.rawws import http_exchange, upgrade_request
    from tests.e2e.test_names import SECRET, claims, signed

    a, b = cluster(2, "--jwt-secret", SECRET)

    def token_client(node: CliServer, sub: str) -> Client:
        from tests.e2e.test_security import connect as connect_with

        client = connect_with(
            node.port, {"room": "lobby", "token": signed(claims(json.dumps(sub)))}
        )
        cluster.clients.append(client)  # type: ignore[attr-defined]
        return client

    bob = token_client(b, "bob")
    bob.expect(type="presence", event="join", username="bob")
    bob.expect(type="presence_state")
    for sub_json in ('"x\\ud800"', '"\\udfff"', '"evil\\u202enimda"'):
        bad = "/ws?room=lobby&token=" + signed(claims(sub_json))
        assert http_exchange(a.port, upgrade_request(bad)).status == 401
    ann = token_client(a, "ann")
    bob.expect(type="presence", event="join", username="ann")
    ann.send('{"type":"chat","content":["x\\ud800"]}')
    ann.expect(type="presence", event="join", username="ann")
    ann.expect(type="presence_state")
    ann.expect(type="error", code="bad_message")
    ann.chat("across")
    bob.expect_chat("across", "ann")  # the first chat bob sees
    assert metric(a, "roombus_backplane_online") == 1


def test_an_asyncio_node_and_a_trio_node_share_a_room(redis):
    """The pair both ways: chats in one order, presence, and the trio node killed."""
    nodes = [
        CliServer(
            "--port",
            "0",
            "--redis",
            redis.url,
            "--node-id",
            f"n-{transport}",
            "--presence-ttl",
            str(TTL),
            transport=transport,
        )
        for transport in ("trio", "asyncio")
    ]
    clients: list[Client] = []
    try:
        for node in nodes:
            node.wait_listening()
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        on_trio, on_asyncio = nodes
        ann = open_client(on_trio.port, "lobby", "ann")
        clients.append(ann)
        bob = open_client(on_asyncio.port, "lobby", "bob", expect_join=None)
        clients.append(bob)
        bob.expect(type="presence", event="join", username="bob")
        assert bob.expect(type="presence_state")["users"] == ["ann", "bob"]
        ann.expect(type="presence", event="join", username="bob")
        for k in range(20):
            ann.chat(f"a{k}")
            bob.chat(f"b{k}")
        orders = []
        for client in (ann, bob):
            chats = drain(client, until=lambda m: m.get("seq") == 40)
            orders.append([(m["username"], m["content"], m["seq"]) for m in chats])
            assert [m[2] for m in orders[-1]] == list(range(1, 41))
            assert [c for u, c, _ in orders[-1] if u == "ann"] == [f"a{k}" for k in range(20)]
            assert [c for u, c, _ in orders[-1] if u == "bob"] == [f"b{k}" for k in range(20)]
        assert orders[0] == orders[1]
        on_trio.signal(signal.SIGKILL)
        t0 = time.monotonic()
        bob.expect(type="presence", event="leave", username="ann", timeout=TTL + 3)
        assert time.monotonic() - t0 <= TTL + 0.5
        bob.ping()
        assert on_asyncio.proc.poll() is None
        assert "Traceback" not in on_asyncio.stderr
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()
