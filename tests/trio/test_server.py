"""The trio adapter over in-memory streams, on a mock clock: no sockets, no waiting."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio.lowlevel
import trio.testing
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

import trio
from roombus import BrokerConfig, MessagePublished, ServerConfig, Settings, UserJoined
from roombus.trio import Server, run_server, serve


class Client:
    """A wsproto client over one end of an in-memory stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []
        self.answer_pings = True
        self.pings = 0

    async def handshake(self, target: str) -> Any:
        await self.stream.send_all(self.ws.send(Request(host="test", target=target)))
        return await self.next_event()

    async def next_event(self) -> Any:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    self.pings += 1
                    if self.answer_pings:
                        await self.stream.send_all(self.ws.send(event.response()))
                    continue
                self.events.append(event)
        return self.events.pop(0)

    async def recv(self) -> dict[str, Any]:
        event = await self.next_event()
        assert isinstance(event, TextMessage), event
        return json.loads(event.data)  # type: ignore[no-any-return]

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))


@asynccontextmanager
async def running(
    broker_config: BrokerConfig | None = None, config: ServerConfig | None = None, **kw: Any
) -> AsyncIterator[tuple[Server, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        server = Server(broker_config, config, **kw)
        await nursery.start(run_server, server)
        yield server, nursery
        nursery.cancel_scope.cancel()


async def connect(server: Server, nursery: trio.Nursery, target: str, pair: Any = None) -> Client:
    client_end, server_end = (pair or trio.testing.memory_stream_pair)()
    nursery.start_soon(server.handle_stream, server_end)
    client = Client(client_end)
    assert isinstance(await client.handshake(target), AcceptConnection)
    return client


async def test_chat_and_presence_over_streams() -> None:
    notices: list[Any] = []
    async with running(on_notice=notices.append) as (server, nursery):
        ann = await connect(server, nursery, "/ws?room=lobby&username=ann")
        assert (await ann.recv())["event"] == "join"
        assert (await ann.recv())["type"] == "presence_state"
        bob = await connect(server, nursery, "/ws?room=lobby&username=bob")
        await bob.recv()
        await bob.recv()
        assert (await ann.recv())["username"] == "bob"
        await ann.send({"type": "chat", "content": "hi"})
        for client in (ann, bob):
            message = await client.recv()
            assert (message["type"], message["content"], message["seq"]) == ("chat", "hi", 1)
        assert server.publish("lobby", {"tick": 1}).delivered == 2
        assert (await bob.recv())["username"] == "server"
        assert any(isinstance(n, UserJoined) for n in notices)
        assert any(isinstance(n, MessagePublished) for n in notices)
        assert server.connection_count == 2


async def test_refused_handshake_gets_its_status() -> None:
    async with running() as (server, nursery):
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_end)
        client = Client(client_end)
        event = await client.handshake("/ws?room=bad%20room&username=ann")
        assert isinstance(event, RejectConnection)
        assert event.status_code == 400
        body = await client.next_event()
        assert isinstance(body, RejectData)


async def test_silent_peer_is_closed_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BrokerConfig(ping_interval=20, ping_timeout=10)
    async with running(config) as (server, nursery):
        start = trio.current_time()
        ann = await connect(server, nursery, "/ws?room=lobby&username=ann")
        ann.answer_pings = False
        bob = await connect(server, nursery, "/ws?room=lobby&username=bob")
        for _ in range(3):
            await ann.recv()
        for _ in range(2):
            await bob.recv()
        # bob answers pings and stays; ann goes at exactly 30 s.
        nursery.start_soon(_keep_reading, bob)
        close = await ann.next_event()
        assert isinstance(close, CloseConnection)
        assert close.code == 1011
        assert trio.current_time() - start == pytest.approx(30, abs=0.01)
        assert ann.pings == 1
        assert server.broker.members("lobby") == ["bob"]


async def _keep_reading(client: Client) -> None:
    while True:
        await client.next_event()


async def test_pongs_keep_a_peer_alive(autojump_clock: trio.testing.MockClock) -> None:
    async with running(BrokerConfig(ping_interval=5, ping_timeout=5)) as (server, nursery):
        ann = await connect(server, nursery, "/ws?room=lobby&username=ann")
        nursery.start_soon(_keep_reading, ann)
        await trio.sleep(120)
        assert ann.pings >= 20
        assert server.broker.members("lobby") == ["ann"]


async def test_shutdown_closes_everyone_with_1001(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as outer:
        server = Server()
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await run_server(server)

        outer.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        clients = [await connect(server, outer, f"/ws?room=lobby&username=u{i}") for i in range(3)]
        scope.cancel()
        for client in clients:
            event = await client.next_event()
            while not isinstance(event, CloseConnection):
                event = await client.next_event()
            assert event.code == 1001
            await client.stream.send_all(client.ws.send(event.response()))
        with trio.fail_after(10):
            while server.connection_count:  # noqa: ASYNC110 - polling the mock clock is instant
                await trio.sleep(0.1)


async def test_stalled_reader_is_closed_and_others_unaffected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = BrokerConfig(send_queue=8, send_queue_bytes=64 * 1024 + 1024)
    async with running(config, ServerConfig(close_timeout=2)) as (server, nursery):
        stalled = await connect(
            server, nursery, "/ws?room=lobby&username=slow", pair=trio.testing.lockstep_stream_pair
        )
        fast = await connect(server, nursery, "/ws?room=lobby&username=fast")
        got: list[dict[str, Any]] = []

        async def read_fast() -> None:
            while True:
                got.append(await fast.recv())

        nursery.start_soon(read_fast)
        for i in range(100):
            server.publish("lobby", i)
            await trio.lowlevel.checkpoint()
        with trio.fail_after(5):
            while len([m for m in got if m["type"] == "chat"]) < 100:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert [m["content"] for m in got if m["type"] == "chat"] == list(range(100))
        assert server.overflows == 1
        assert server.broker.members("lobby") == ["fast"]
        # The fast one was told the slow one left.
        assert any(m.get("event") == "leave" and m["username"] == "slow" for m in got)
        del stalled


async def test_idle_connections_hold_no_exception() -> None:
    """A connection waiting for its socket keeps no BlockingIOError (nor its traceback)
    alive: at 10,000 connections that is 20,000 objects more for every full garbage
    collection to walk."""
    import gc

    async with trio.open_nursery() as nursery:
        settings = Settings(server=ServerConfig(host="127.0.0.1", port=0))
        server = await nursery.start(serve, settings)
        streams = []
        for i in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            client = Client(stream)
            await client.handshake(f"/ws?room=lobby&username=u{i}")
            streams.append(stream)
        await trio.sleep(0.2)  # every connection's reader waiting for its socket
        held = [o for o in gc.get_objects() if issubclass(type(o), BlockingIOError)]
        assert held == []
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()
