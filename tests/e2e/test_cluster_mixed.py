"""
One room across three kinds of node behind one real Redis: ``roombus serve`` on trio,
``roombus serve --transport asyncio``, and ``uvicorn --factory roombus.asgi:create_app``
(its settings from ``ROOMBUS_REDIS`` and friends), each its own process.

The uvicorn node serves a socket the test bound (``--fd``), so there is no race for a
port. Each process is stopped by its own PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import attrs
import pytest

from tests.e2e.conftest import Client, CliServer, open_client
from tests.e2e.rawws import HOST, get
from tests.redis.conftest import RedisProcess

TTL = 1.5
BOUND = 15.0


def metric(port: int, name: str) -> float | None:
    for line in get(port, "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return None


def wait_for(predicate: Callable[[], bool], timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class UvicornNode:
    """``uvicorn --factory roombus.asgi:create_app`` on a socket bound here."""

    def __init__(self, redis_url: str, node_id: str, **env: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ROOMBUS_")}
        environ.update(
            ROOMBUS_REDIS=redis_url,
            ROOMBUS_NODE_ID=node_id,
            ROOMBUS_PRESENCE_TTL=str(TTL),
            PYTHONUNBUFFERED="1",
        )
        environ.update(env)
        fd = self.sock.fileno()
        app = ("--factory", "roombus.asgi:create_app", "--ws-ping-interval", "20")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *app, "--fd", str(fd), "--log-level", "warning"],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def online(self) -> bool:
        assert self.proc.poll() is None, "".join(self.lines)
        try:
            return metric(self.port, "roombus_backplane_online") == 1
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # our own PID only
        self.proc.wait(BOUND)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.sock.close()


@attrs.define
class Kinds:
    """One node of each kind on one Redis, online, and the clients a test opened."""

    trio_node: CliServer
    asyncio_node: CliServer
    uvicorn_node: UvicornNode
    ports: list[int]
    clients: list[Client]


@pytest.fixture
def kinds(redis: RedisProcess) -> Iterator[Kinds]:
    options = ("--port", "0", "--redis", redis.url, "--presence-ttl", str(TTL))
    trio_node = CliServer(*options, "--node-id", "n-trio", transport="trio")
    asyncio_node = CliServer(*options, "--node-id", "n-asyncio", transport="asyncio")
    uvicorn_node = UvicornNode(redis.url, "n-uvicorn")
    clients: list[Client] = []
    try:
        ports = [trio_node.wait_listening(), asyncio_node.wait_listening(), uvicorn_node.port]
        for port in ports[:2]:
            wait_for(lambda port=port: metric(port, "roombus_backplane_online") == 1)
        wait_for(uvicorn_node.online)
        yield Kinds(trio_node, asyncio_node, uvicorn_node, ports, clients)
    finally:
        for client in clients:
            client.close()
        for node in (trio_node, asyncio_node):
            node.stop()
        uvicorn_node.stop()


def test_trio_asyncio_and_uvicorn_nodes_share_one_room(kinds: Kinds) -> None:
    trio_node, asyncio_node = kinds.trio_node, kinds.asyncio_node
    uvicorn_node = kinds.uvicorn_node
    ports, clients = kinds.ports, kinds.clients
    names = ["ann", "bob", "cid"]
    for i, (port, name) in enumerate(zip(ports, names, strict=True)):
        client = open_client(port, "lobby", name, expect_join=None)
        clients.append(client)
        client.expect(type="presence", event="join", username=name)
        assert client.expect(type="presence_state")["users"] == sorted(names[: i + 1])
        for earlier in clients[:-1]:
            earlier.expect(type="presence", event="join", username=name)
    rounds = 15
    for k in range(rounds):
        for client in clients:
            client.chat(f"{client.username}{k}")
    orders = []
    for client in clients:
        chats: list[tuple[str, str, int]] = []
        while len(chats) < 3 * rounds:
            msg = client.recv(timeout=BOUND)
            if msg["type"] == "chat":
                chats.append((msg["username"], msg["content"], msg["seq"]))
        assert [seq for _, _, seq in chats] == list(range(1, 3 * rounds + 1))
        for name in names:
            sent = [content for user, content, _ in chats if user == name]
            assert sent == [f"{name}{k}" for k in range(rounds)]
        orders.append(chats)
    assert orders[0] == orders[1] == orders[2]  # one order on every node
    assert "Traceback" not in "".join(uvicorn_node.lines)
    # The uvicorn node dies: its user leaves the others within the TTL.
    uvicorn_node.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    for client in clients[:2]:
        client.expect(type="presence", event="leave", username="cid", timeout=TTL + 3)
    assert time.monotonic() - t0 <= TTL + 0.5
    for client in clients[:2]:
        client.ping()  # one leave each, nothing more
    for node in (trio_node, asyncio_node):
        assert node.proc.poll() is None
        assert "Traceback" not in node.stderr


def _chats_until(client: Client, last: str) -> list[dict[str, object]]:
    got = []
    while True:
        msg = client.recv(timeout=BOUND)
        got.append(msg)
        if msg.get("content") == last:
            return got


def test_a_client_resumes_across_trio_asyncio_and_uvicorn_nodes(kinds: Kinds) -> None:
    """Positions are the cluster's: a client that leaves one kind of node resumes on
    another, with an acknowledged publish deduplicated across them."""
    uvicorn_node = kinds.uvicorn_node
    ports, clients = kinds.ports, kinds.clients
    pub = open_client(ports[1], "lobby", "pub", expect_join=None)
    clients.append(pub)
    sent = 0

    def publish_three() -> None:
        nonlocal sent
        for _ in range(3):
            pub.chat(f"m{sent}", id=f"m{sent}")
            sent += 1
        pub.chat(f"m{sent - 1}", id=f"m{sent - 1}")  # a resend: acknowledged, not sent
        acks = []
        while len(acks) < 4:
            msg = pub.recv(timeout=BOUND)
            if msg["type"] == "ack":
                acks.append(msg)
        assert acks[-1] == acks[-2]  # the resend got the first ack

    ann = open_client(ports[0], "lobby", "ann", expect_join=None, query={"since": ""})
    clients.append(ann)
    joined = ann.recv(timeout=BOUND)
    while joined["type"] != "joined":  # its position first: then the chats come
        joined = ann.recv(timeout=BOUND)
    publish_three()
    got = _chats_until(ann, "m2")
    assert [m["content"] for m in got if m["type"] == "chat"] == ["m0", "m1", "m2"]
    position = f"{joined['epoch']}:{got[-1]['seq']}"
    for port in ports[1:]:  # ann leaves, misses three, and comes back on another kind
        ann.close()
        clients.remove(ann)
        publish_three()
        ann = open_client(port, "lobby", "ann", expect_join=None, query={"since": position})
        clients.append(ann)
        got = _chats_until(ann, f"m{sent - 1}")
        (joined,) = [m for m in got if m["type"] == "joined"]
        chats = [m for m in got if m["type"] == "chat"]
        assert joined["recovered"] is True, joined
        assert [m["content"] for m in chats] == [f"m{k}" for k in range(sent - 3, sent)]
        assert all(m.get("replayed") for m in chats)
        position = f"{joined['epoch']}:{chats[-1]['seq']}"
    assert "Traceback" not in "".join(uvicorn_node.lines)
