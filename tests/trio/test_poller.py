"""The trio adapter over real loopback sockets, read by its poller (one ``epoll`` set for
every plain TCP connection) and, where there is no ``epoll``, by a reader task per
connection: the same behaviour both ways."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from wsproto.events import AcceptConnection, CloseConnection, TextMessage

import roombus.trio._server as trio_server
import trio
from roombus import ServerConfig, Settings
from roombus.trio import Server, serve
from tests.trio.test_server import Client

pytestmark = pytest.mark.parametrize(
    "polled", [True, False], indirect=True, ids=["poller", "tasks"]
)


@pytest.fixture
def polled(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if not request.param:
        monkeypatch.setattr(trio_server, "_new_selector", lambda: None)
    return bool(request.param)


OPEN: list[trio.SocketStream] = []  # the clients' streams, closed after each test


@asynccontextmanager
async def running(polled: bool) -> AsyncIterator[Server]:
    settings = Settings(
        server=ServerConfig(host="127.0.0.1", port=0, max_connections_per_ip=0, close_timeout=0.2)
    )
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                server = await nursery.start(serve, settings)
                assert (server._selector is not None) is polled
                yield server
                nursery.cancel_scope.cancel()
    finally:
        for stream in OPEN:
            stream.socket.close()
        OPEN.clear()


async def join(server: Server, room: str, username: str) -> Client:
    assert server.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    OPEN.append(stream)
    client = Client(stream)
    assert isinstance(
        await client.handshake(f"/ws?room={room}&username={username}"), AcceptConnection
    )
    assert (await client.recv())["event"] == "join"
    assert (await client.recv())["type"] == "presence_state"
    return client


async def until_chat(client: Client) -> dict[str, Any]:
    while True:
        message = await client.recv()
        if message["type"] == "chat":
            return message


async def eventually(condition: Any) -> None:
    for _ in range(1000):  # bounded: 10 s
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("never true")


async def test_chat_and_presence_over_loopback(polled: bool) -> None:
    async with running(polled) as server:
        ann = await join(server, "lobby", "ann")
        bob = await join(server, "lobby", "bob")
        assert (await ann.recv())["username"] == "bob"
        await ann.send({"type": "chat", "content": "hi"})
        for client in (ann, bob):
            assert (await until_chat(client))["content"] == "hi"
        await bob.stream.aclose()  # the client goes: a FIN
        leave = await ann.recv()
        assert (leave["event"], leave["username"]) == ("leave", "bob")
        await eventually(lambda: server.connection_count == 1)


async def test_a_burst_in_one_write_arrives_whole_and_in_order(polled: bool) -> None:
    """Many more frames than the hub takes at once (its input batch), in one TCP write:
    the rest is handed over after each sweep, and nothing is lost or reordered."""
    async with running(polled) as server:
        ann = await join(server, "lobby", "ann")
        bob = await join(server, "lobby", "bob")
        await ann.recv()  # bob joined
        burst = b"".join(
            ann.ws.send(TextMessage(data=json.dumps({"type": "chat", "content": n})))
            for n in range(300)
        )
        await ann.stream.send_all(burst)
        for client in (bob, ann):
            got = [(await until_chat(client))["content"] for _ in range(300)]
            assert got == list(range(300))
        await ann.send({"type": "chat", "content": "after"})  # read again after the burst
        assert (await until_chat(bob))["content"] == "after"


async def test_a_reset_is_a_leave_and_the_others_go_on(polled: bool) -> None:
    async with running(polled) as server:
        ann = await join(server, "lobby", "ann")
        bob = await join(server, "lobby", "bob")
        await ann.recv()
        sock = bob.stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # an RST
        leave = await ann.recv()
        assert (leave["event"], leave["username"]) == ("leave", "bob")
        await ann.send({"type": "chat", "content": "still here"})
        assert (await until_chat(ann))["content"] == "still here"
        await eventually(lambda: server.connection_count == 1 and len(server._links) == 1)


async def test_shutdown_closes_every_socket_with_1001(polled: bool) -> None:
    closes: list[int] = []

    async def read_until_close(client: Client) -> None:
        while True:
            event = await client.next_event()
            if isinstance(event, CloseConnection):
                closes.append(event.code)
                await client.stream.send_all(client.ws.send(event.response()))
                return

    async with running(polled) as server:
        clients = [await join(server, "lobby", f"u{i}") for i in range(3)]
        with trio.fail_after(10):
            async with trio.open_nursery() as readers:
                for client in clients:
                    readers.start_soon(read_until_close, client)
                await server.drain(0)  # every WebSocket closed with 1001, then the shutdown
        assert server._links == {}
    assert closes == [1001, 1001, 1001]


async def test_a_polled_connection_costs_no_task(polled: bool) -> None:
    """The garbage collector walks every task's coroutine frames: with the poller,
    20 connections add no task; with reader tasks, one each."""
    async with running(polled) as server:
        nursery = server._nursery
        assert nursery is not None
        before = len(nursery.child_tasks)
        clients = [await join(server, "lobby", f"u{i}") for i in range(20)]
        assert server.connection_count == 20
        assert len(nursery.child_tasks) - before == (0 if polled else 20)
        for client in clients:
            await client.stream.aclose()
        await eventually(lambda: server.connection_count == 0 and not server._links)
        assert len(nursery.child_tasks) == before


async def test_a_bug_loses_one_connection_never_the_server(
    polled: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception out of the hub (a bug, not the client's doing) is logged, and drops
    that connection alone: its leave reaches the others, who go on."""
    async with running(polled) as server:
        ann = await join(server, "lobby", "ann")
        bob = await join(server, "lobby", "bob")
        await ann.recv()
        bobs = max(server._links)  # the newest connection
        receive = server.hub.receive

        def broken(cid: Any, data: Any, **kw: Any) -> None:
            if cid == bobs and data:
                raise RuntimeError("a bug")
            receive(cid, data, **kw)

        server.hub.receive = broken  # type: ignore[method-assign]
        await bob.send({"type": "chat", "content": "boom"})
        leave = await ann.recv()
        assert (leave["event"], leave["username"]) == ("leave", "bob")
        await ann.send({"type": "chat", "content": "still here"})
        assert (await until_chat(ann))["content"] == "still here"
        assert [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
        assert bobs not in server._links
