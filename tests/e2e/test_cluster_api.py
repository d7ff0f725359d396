"""
The server API on a cluster: two ``roombus serve --redis`` nodes (node A on trio,
node B on asyncio) behind one real Redis, each with the API on; calls made on one
node act on, and read, the whole cluster.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Client, CliServer, open_client
from tests.e2e.test_cluster_nodes import drain, metric, wait_for
from tests.e2e.test_http_api import KEY, call
from tests.redis.conftest import RedisProcess


@pytest.fixture
def nodes(redis: RedisProcess) -> Iterator[tuple[CliServer, CliServer, list[Client]]]:
    """Node A (trio) and node B (asyncio), online; and a list of clients to close."""
    started = [
        CliServer(
            "--port",
            "0",
            "--redis",
            redis.url,
            "--node-id",
            f"node-{name}",
            "--presence-ttl",
            "3",
            "--api-key",
            KEY,
            transport=transport,
        )
        for name, transport in (("a", "trio"), ("b", "asyncio"))
    ]
    clients: list[Client] = []
    try:
        for node in started:
            node.wait_listening()
        for node in started:
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        yield started[0], started[1], clients
    finally:
        for c in clients:
            c.close()
        for node in started:
            node.stop()


def client(clients: list[Client], node: CliServer, room: str, user: str, **kw: Any) -> Client:
    c = open_client(node.port, room, user, **kw)
    clients.append(c)
    return c


def until_present(node: CliServer, room: str, users: set[str]) -> None:
    def present() -> bool:
        status, result = call(node.port, "presence", {"room": room})
        return status == 200 and {u["username"] for u in result["users"]} >= users

    wait_for(present)


def chat(c: Client, content: Any) -> dict[str, Any]:
    got = drain(c, until=lambda m: m.get("type") == "chat" and m.get("content") == content)
    return got[-1]


def test_publish_on_a_returns_the_position_both_nodes_see(nodes: Any) -> None:
    a, b, clients = nodes
    ann = client(clients, a, "lobby", "ann")
    bob = client(clients, b, "lobby", "bob")
    until_present(a, "lobby", {"ann", "bob"})
    t0 = time.monotonic()
    status, result = call(a.port, "publish", {"room": "lobby", "content": "from a"})
    assert time.monotonic() - t0 < 5
    assert status == 200 and result["epoch"] and result["seq"] >= 1, result
    for c in (ann, bob):
        assert chat(c, "from a")["seq"] == result["seq"]
    # A second one, on B, comes next, and is numbered so.
    status, again = call(b.port, "publish", {"room": "lobby", "content": "from b"})
    assert (status, again["epoch"], again["seq"]) == (200, result["epoch"], result["seq"] + 1)


def test_an_idempotency_key_is_one_publish_across_nodes(nodes: Any) -> None:
    a, b, _ = nodes
    body = {"room": "jobs", "content": 1, "idempotency_key": "job-17"}
    _, first = call(a.port, "publish", body)
    _, second = call(b.port, "publish", body)
    assert first["duplicate"] is False and second["duplicate"] is True
    assert (second["epoch"], second["seq"]) == (first["epoch"], first["seq"])


def test_history_on_a_returns_what_was_published_on_b(nodes: Any) -> None:
    a, b, clients = nodes
    client(clients, b, "h", "bob")  # (not needed: the room's stream lives in Redis)
    for i in range(4):
        status, _ = call(b.port, "publish", {"room": "h", "content": i})
        assert status == 200
    status, result = call(a.port, "history", {"room": "h", "limit": 3})
    assert status == 200, result
    assert [m["content"] for m in result["items"]] == [1, 2, 3]
    assert result["seq"] == 4
    since = {"epoch": result["epoch"], "seq": 2}
    status, later = call(a.port, "history", {"room": "h", "since": since})
    assert [m["seq"] for m in later["items"]] == [3, 4]
    # A room nobody is in, anywhere.
    call(b.port, "publish", {"room": "empty-room", "content": "kept"})
    status, kept = call(a.port, "history", {"room": "empty-room"})
    assert [m["content"] for m in kept["items"]] == ["kept"]


def test_a_batch_on_a_publishes_then_reads_in_order(nodes: Any) -> None:
    a, _, _ = nodes
    calls = [
        {"method": "publish", "params": {"room": "bt", "content": "x"}},
        {"method": "history", "params": {"room": "bt"}},
    ]
    status, result = call(a.port, "batch", {"calls": calls})
    assert status == 200
    published, history = result["results"]
    assert published["result"]["seq"] == history["result"]["seq"]
    assert [m["content"] for m in history["result"]["items"]] == ["x"]


def ids_of(node: CliServer, room: str) -> dict[str, list[str]]:
    _, result = call(node.port, "presence", {"room": room})
    return {u["username"]: u["connection_ids"] for u in result["users"]}


def test_disconnect_on_a_closes_a_client_on_b_with_the_code(nodes: Any) -> None:
    a, b, clients = nodes
    ann_b = client(clients, b, "lobby", "ann")
    ann_a = client(clients, a, "lobby", "ann", expect_join=None)  # maybe present already
    drain(ann_a, until=lambda m: m.get("type") == "presence_state")
    cat = client(clients, b, "lobby", "cat")
    until_present(a, "lobby", {"ann", "cat"})
    status, result = call(
        a.port, "disconnect", {"username": "ann", "code": 4001, "reason": "banned"}
    )
    assert status == 200 and result["cluster"] is True and len(result["disconnected"]) == 1
    for c in (ann_a, ann_b):
        closed = c.until_closed()
        assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (
            4001,
            "banned",
        )
    drain(cat, until=lambda m: m.get("event") == "leave" and m.get("username") == "ann")
    # By the id of one connection on B, as B's presence names it.
    dan = client(clients, b, "lobby", "dan")
    wait_for(lambda: "dan" in ids_of(b, "lobby"))
    (dan_id,) = ids_of(b, "lobby")["dan"]
    assert dan_id.startswith("node-b/")
    status, result = call(a.port, "disconnect", {"connection": dan_id, "code": 3001})
    assert (status, result) == (200, {"disconnected": [], "cluster": True})
    closed = dan.until_closed()
    assert closed.rcvd is not None and closed.rcvd.code == 3001


def test_kick_on_a_removes_a_user_on_b_from_the_room_everywhere(nodes: Any) -> None:
    a, b, clients = nodes
    bob = client(clients, b, "lobby", "bob")
    ann = client(clients, a, "lobby", "ann")
    until_present(a, "lobby", {"ann", "bob"})
    until_present(b, "lobby", {"ann", "bob"})
    status, result = call(a.port, "kick", {"room": "lobby", "username": "bob", "reason": "be nice"})
    assert status == 200 and result == {"room": "lobby", "kicked": [], "cluster": True}
    kicked = drain(bob, until=lambda m: m.get("type") == "error")[-1]
    assert (kicked["code"], kicked["room"], kicked["content"]) == ("kicked", "lobby", "be nice")
    drain(ann, until=lambda m: m.get("event") == "leave" and m.get("username") == "bob")
    wait_for(lambda: set(ids_of(a, "lobby")) == {"ann"})
    assert "bob" not in ids_of(b, "lobby")
    # Bob's connection stays open, and may join again.
    bob.send({"type": "join", "room": "lobby"})
    drain(ann, until=lambda m: m.get("event") == "join" and m.get("username") == "bob")


def test_presence_on_a_of_a_room_only_b_s_users_are_in(nodes: Any) -> None:
    a, b, clients = nodes
    client(clients, b, "far", "bob")
    client(clients, b, "far", "cy")
    until_present(a, "far", {"bob", "cy"})
    status, result = call(a.port, "presence", {"room": "far"})
    assert status == 200
    assert result["users"] == [
        {"username": "bob", "connections": 0, "connection_ids": [], "nodes": 1},
        {"username": "cy", "connections": 0, "connection_ids": [], "nodes": 1},
    ]
    status, stats = call(a.port, "presence_stats", {"room": "far"})
    assert (status, stats) == (200, {"room": "far", "users": 2, "connections": 0})


def test_rooms_on_a_lists_the_rooms_only_b_has_page_by_page(nodes: Any) -> None:
    a, b, clients = nodes
    client(clients, a, "t:a0", "ann")
    for i in range(5):
        client(clients, b, f"t:b{i}", "bob")
    client(clients, b, "other", "bob")
    want = ["t:a0"] + [f"t:b{i}" for i in range(5)]

    def listing() -> list[str]:
        names: list[str] = []
        body: dict[str, Any] = {"pattern": "t:*", "limit": 2}
        for _ in range(10):
            status, result = call(a.port, "rooms", body)
            assert status == 200 and len(result["rooms"]) <= 2
            names.extend(r["room"] for r in result["rooms"])
            if result["cursor"] is None:
                return names
            body = {**body, "cursor": result["cursor"]}
        raise AssertionError("the listing did not end")

    wait_for(lambda: listing() == want)
    status, result = call(a.port, "rooms", {"pattern": "t:b*", "limit": 1})
    assert status == 200
    assert result["rooms"] == [{"room": "t:b0", "users": 0, "connections": 0}]


def test_info_on_a_lists_both_nodes_and_b_leaves_within_the_ttl_of_its_death(
    nodes: Any,
) -> None:
    a, b, clients = nodes

    def listed() -> list[str]:
        status, result = call(a.port, "info", {})
        assert status == 200 and result["node"] == "node-a"
        assert result["backplane"] == {"online": True}
        return [n["node"] for n in result["nodes"]]

    # A answering is alive, though with no user it has not renewed its entry yet.
    assert "node-a" in listed()
    client(clients, b, "lobby", "bob")  # B's join renews its entry at once

    wait_for(lambda: listed() == ["node-a", "node-b"])
    status, result = call(a.port, "info", {})
    assert status == 200
    assert all(0 <= n["seen_ms_ago"] <= 3000 for n in result["nodes"])
    b.signal(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: listed() == ["node-a"], timeout=3 + 2)
    assert time.monotonic() - t0 <= 3 + 0.5  # within the presence TTL


def test_the_api_of_a_uvicorn_node_acts_on_the_cluster(redis: RedisProcess, nodes: Any) -> None:
    """The ASGI app under uvicorn in the same cluster: its API waits for Redis's answers
    (publish, history) and its disconnect reaches the other nodes."""
    from tests.e2e.test_cluster_mixed import UvicornNode

    a, b, clients = nodes
    uv = UvicornNode(redis.url, "node-u", ROOMBUS_API_KEY=KEY)
    try:
        wait_for(uv.online)
        ann = client(clients, a, "lobby", "ann")
        bob = client(clients, b, "lobby", "bob")
        until_present(a, "lobby", {"ann", "bob"})
        status, result = call(uv.port, "publish", {"room": "lobby", "content": "from uvicorn"})
        assert status == 200, result
        assert chat(ann, "from uvicorn")["seq"] == result["seq"]
        assert chat(bob, "from uvicorn")["seq"] == result["seq"]
        status, history = call(uv.port, "history", {"room": "lobby"})
        assert status == 200, history
        assert [m["content"] for m in history["items"]][-1] == "from uvicorn"
        status, presence = call(uv.port, "presence", {"room": "lobby"})
        assert status == 200 and {u["username"] for u in presence["users"]} == {"ann", "bob"}
        status, result = call(uv.port, "disconnect", {"username": "bob", "code": 4002})
        assert status == 200 and result["cluster"] is True, result
        closed = bob.until_closed()
        assert closed.rcvd is not None and closed.rcvd.code == 4002
        assert "Traceback" not in "".join(uv.lines)
    finally:
        uv.stop()
