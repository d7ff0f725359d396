"""The in-memory transport: a client of a trio or asyncio server in the same process, no sockets."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import pytest

import roombus
import roombus.asyncio
import roombus.trio
import trio
from roombus import BrokerConfig, ServerConfig
from roombus.client import (
    ClientOptions,
    Connected,
    Disconnected,
    Joined,
    Message,
    Presence,
    testing,
)


async def until(client: Any, want: Any) -> list[Any]:
    got: list[Any] = []
    with trio.fail_after(10):
        async for event in client:
            got.append(event)
            if want(got):
                return got
    raise AssertionError(got)


async def test_two_clients_chat_in_memory(autojump_clock: Any) -> None:
    server = roombus.trio.Server(roombus.Settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(roombus.trio.run_server, server)
        async with (
            testing.connect(server, ["lobby"], username="ann") as ann,
            testing.connect(server, ["lobby"], username="bob") as bob,
        ):
            await until(ann, lambda g: any(isinstance(e, Joined) for e in g))
            await until(bob, lambda g: any(isinstance(e, Joined) for e in g))
            position = await bob.publish("lobby", {"text": "hi"})
            got = await until(ann, lambda g: any(isinstance(e, Message) for e in g))
            (message,) = [e for e in got if isinstance(e, Message)]
            assert (message.username, message.content, message.seq) == (
                "bob",
                {"text": "hi"},
                position.seq,
            )
            assert ann.presence("lobby") == {"ann", "bob"}
        nursery.cancel_scope.cancel()


# -- asyncio: a roombus.asyncio.Server, its connections in memory ----------------------

KEY = base64.b64encode(b"k" * 16)
FAST = ClientOptions(backoff_initial=0.05, backoff_max=0.2)


def arun(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 20))


def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way the asyncio client or server could open a socket fails the test."""

    def boom(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(asyncio, "open_connection", boom)
    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", boom)
    monkeypatch.setattr(asyncio.BaseEventLoop, "create_server", boom)


async def aio_until(client: Any, want: Callable[[list[Any]], bool]) -> list[Any]:
    """The events up to the first that makes *want* true (arun bounds the wait)."""
    got: list[Any] = []
    async for event in client:
        got.append(event)
        if want(got):
            return got
    raise AssertionError(got)


def joined(got: list[Any]) -> bool:
    return any(isinstance(e, Joined) for e in got)


def messages(got: list[Any]) -> list[Message]:
    return [e for e in got if isinstance(e, Message)]


async def eventually(check: Callable[[], bool]) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("never true")


async def raw_join(server: roombus.asyncio.Server, username: str, **kw: Any) -> Any:
    """A WebSocket client by hand over ``connect_in_memory()``: the reader and writer
    once the server answered the upgrade (101)."""
    reader, writer = server.connect_in_memory(**kw)
    writer.write(
        b"GET /ws?room=lobby&username=" + username.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + KEY + b"\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of each whole server frame (unmasked) in *data*."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i + 2 <= len(data):
        size, at = data[i + 1] & 0x7F, i + 2
        if size == 126:
            size, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        if at + size > len(data):
            break
        out.append((data[i] & 0x0F, data[at : at + size]))
        i = at + size
    return out


def test_asyncio_two_clients_chat_and_see_each_other_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_sockets(monkeypatch)

    async def main() -> None:
        server = roombus.asyncio.Server(roombus.Settings())
        try:
            async with testing.connect(server, ["lobby"], username="ann") as ann:
                await aio_until(ann, joined)
                async with testing.connect(server, ["lobby"], username="bob") as bob:
                    await aio_until(bob, joined)
                    got = await aio_until(
                        ann, lambda g: any(isinstance(e, Presence) and e.event == "join" for e in g)
                    )
                    assert got[-1].username == "bob"
                    assert ann.presence("lobby") == bob.presence("lobby") == {"ann", "bob"}
                    assert server.connection_count == 2

                    position = await bob.publish("lobby", {"text": "hi"})
                    (message,) = messages(await aio_until(ann, messages))
                    assert (message.username, message.content) == ("bob", {"text": "hi"})
                    assert (message.epoch, message.seq) == (position.epoch, position.seq)
                    assert server.port is None  # it listens nowhere
                got = await aio_until(
                    ann, lambda g: any(isinstance(e, Presence) and e.event == "leave" for e in g)
                )
                assert got[-1].username == "bob"
                assert ann.presence("lobby") == {"ann"}
                await eventually(lambda: server.connection_count == 1)
        finally:
            await server.aclose()

    arun(main)


def test_asyncio_publish_returns_the_position_the_server_acknowledged() -> None:
    async def main() -> None:
        server = roombus.asyncio.Server(roombus.Settings())
        try:
            async with testing.connect(server, ["lobby"], username="ann") as ann:
                await aio_until(ann, joined)
                first = server.publish("lobby", "from the app").position
                positions = [await ann.publish("lobby", n) for n in range(3)]
                assert first is not None
                assert [p.seq for p in positions] == [first.seq + 1, first.seq + 2, first.seq + 3]
                assert {p.epoch for p in positions} == {first.epoch}
                got = await aio_until(ann, lambda g: len(messages(g)) == 4)
                assert [(m.seq, m.content) for m in messages(got)] == [
                    (first.seq, "from the app"),
                    *((p.seq, n) for n, p in enumerate(positions)),
                ]
        finally:
            await server.aclose()

    arun(main)


@pytest.mark.parametrize("how", ["close", "abort"])
def test_asyncio_a_reconnect_after_the_server_dropped_it_resumes_without_loss_or_duplicate(
    how: str,
) -> None:
    async def main() -> None:
        server = roombus.asyncio.Server(roombus.Settings())
        try:
            async with testing.connect(server, ["lobby"], username="ann", options=FAST) as ann:
                await aio_until(ann, joined)
                for n in range(1, 4):
                    server.publish("lobby", n)
                await aio_until(ann, lambda g: len(messages(g)) == 3)
                (link,) = server._links.values()
                assert link.transport is not None
                getattr(link.transport, how)()  # FIN or reset: the client sees it end
                for n in range(4, 7):  # while it is away: only a replay can bring them
                    assert server.publish("lobby", n).delivered <= 1
                got = await aio_until(ann, joined)
                (rejoin,) = [e for e in got if isinstance(e, Joined)]
                assert rejoin.recovered is True
                assert any(isinstance(e, Disconnected) and not e.final for e in got)
                assert sum(isinstance(e, Connected) for e in got) == 1
                for n in range(7, 10):
                    server.publish("lobby", n)
                got += await aio_until(ann, lambda g: len(messages(got + g)) >= 6)
                assert [m.content for m in messages(got)] == list(range(4, 10))
                assert [m.seq for m in messages(got)] == list(range(4, 10))
                assert [m.replayed for m in messages(got)][:3] == [True] * 3
                assert server.connection_count == 1
        finally:
            await server.aclose()

    arun(main)


def test_asyncio_a_client_that_does_not_read_is_paused_then_closed_not_buffered() -> None:
    broker = BrokerConfig(max_message_bytes=1024, send_queue_bytes=16 * 1024)
    settings = roombus.Settings(
        broker=broker, server=ServerConfig(socket_send_buffer=8 * 1024, close_timeout=0.5)
    )

    async def main() -> None:
        server = roombus.asyncio.Server(settings)
        try:
            reader, writer = await raw_join(server, "slow", limit=4096)
            (link,) = server._links.values()
            assert link.transport is not None
            content = "x" * 900
            most = published = 0
            paused = False
            while server.overflows == 0:
                assert published < 1000, "never closed"
                server.publish("lobby", content)
                published += 1
                await asyncio.sleep(0)  # the flush, and the memory transport's pump
                most = max(most, link.transport.get_write_buffer_size())
                paused = paused or link.paused
            # The server was paused (pause_writing): its transport held the high-water
            # mark (8 KiB) and a frame more at most, the rest waited in the send queue.
            assert paused
            # What the client reads now: what was buffered for it, then the 1008 close;
            # the rest waited in the send queue, and was dropped with the connection.
            data = await reader.read()
            kinds = frames(data)
            chats = [p for opcode, p in kinds if opcode == 1 and content.encode() in p]
            frame = max(map(len, chats)) + 4
            assert 8 * 1024 < most <= 8 * 1024 + frame
            assert published * frame > 16 * 1024 + most  # more than the transport took
            assert len(data) <= 2 * 4096 + 2 * (8 * 1024 + frame) + 64, len(data)
            assert len(chats) < published
            opcode, payload = kinds[-1]
            assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1008, kinds[-1]
            assert reader.at_eof()
            await eventually(lambda: server.connection_count == 0 and not server._links)
            writer.close()
        finally:
            await server.aclose()

    arun(main)


def test_asyncio_a_client_that_closes_its_end_is_gone_for_the_server_and_the_room() -> None:
    async def main() -> None:
        server = roombus.asyncio.Server(roombus.Settings())
        try:
            async with testing.connect(server, ["lobby"], username="ann") as ann:
                await aio_until(ann, joined)
                _, writer = await raw_join(server, "bob")
                await aio_until(ann, lambda g: ann.presence("lobby") == {"ann", "bob"})
                writer.close()  # no close frame: an end of stream
                await writer.wait_closed()
                await aio_until(ann, lambda g: ann.presence("lobby") == {"ann"})
                await eventually(lambda: server.connection_count == 1)
        finally:
            await server.aclose()

    arun(main)


def test_asyncio_a_shutdown_ends_the_memory_connections_and_refuses_new_ones() -> None:
    async def main() -> None:
        server = roombus.asyncio.Server(roombus.Settings(server=ServerConfig(close_timeout=1.0)))
        async with testing.connect(server, ["lobby"], username="ann", options=FAST) as ann:
            await aio_until(ann, joined)
            reader, writer = await raw_join(server, "bob")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await server.aclose()
            # ann answers the 1001 at once; bob (by hand) never answers it, so he is
            # dropped at close_timeout, as over TCP.
            assert 0.9 < loop.time() - started < 1.5
            assert server.connection_count == 0 and not server._links
            got = await aio_until(ann, lambda g: any(isinstance(e, Disconnected) for e in g))
            assert got[-1].code == 1001
            data = await reader.read()
            assert frames(data)[-1][0] == 8
            assert int.from_bytes(frames(data)[-1][1][:2], "big") == 1001
            assert reader.at_eof()
            writer.close()
            with pytest.raises(ConnectionRefusedError):
                server.connect_in_memory()
            await aio_until(  # its reconnects are refused, as by a closed listener
                ann,
                lambda g: any(
                    isinstance(e, Disconnected) and "cannot connect" in e.reason for e in g
                ),
            )

    arun(main)


def test_asyncio_connect_wants_an_asyncio_server() -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match=r"roombus\.asyncio\.Server"):
            async with testing.connect(object(), ["lobby"]):  # type: ignore[arg-type]
                pass

    arun(main)
