"""roombus.asgi driven by hand: ASGI events in, ASGI events out, no server (trio, via anyio)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest
import trio.lowlevel

import trio
from roombus import BrokerConfig, ConfigError, ServerConfig
from roombus.asgi import RoombusASGI, create_app

Message = dict[str, Any]


def app(**server: Any) -> RoombusASGI:
    return RoombusASGI(BrokerConfig(heartbeat=False), ServerConfig(**server))


async def http(bus: RoombusASGI, method: str, path: str, **scope: Any) -> tuple[int, dict, bytes]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    base = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
    await bus({**base, **scope}, receive, send)
    start, body = sent
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    return start["status"], dict(start["headers"]), body["body"]


async def test_http_routes() -> None:
    bus = app(page=b"<html>hi</html>")
    status, headers, body = await http(bus, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers[b"connection"] == b"close"
    assert await http(bus, "HEAD", "/healthz") == (200, headers, b"")
    status, headers, body = await http(bus, "GET", "/")
    assert (status, headers[b"content-type"], body) == (
        200,
        b"text/html; charset=utf-8",
        b"<html>hi</html>",
    )
    status, headers, _ = await http(bus, "POST", "/healthz")
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")
    assert (await http(bus, "GET", "/ws"))[0] == 426  # not an upgrade
    assert (await http(app(), "GET", "/"))[0] == 404  # no page


async def test_mounted_under_a_path() -> None:
    bus = app()
    assert (await http(bus, "GET", "/bus/healthz", root_path="/bus"))[0] == 200
    # Frameworks that strip the mount path from "path" work too.
    assert (await http(bus, "GET", "/healthz", root_path="/bus"))[0] == 200


class FakeServer:
    """The server side of one WebSocket: what the app sends, and what it receives."""

    def __init__(self, *, extensions: dict[str, Any] | None = None) -> None:
        self.incoming_send, self.incoming = trio.open_memory_channel[Message](100)
        self.sent: list[Message] = []
        self.arrived = trio.Event()
        self.extensions = extensions or {}

    async def receive(self) -> Message:
        return await self.incoming.receive()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.arrived.set()

    def scope(self, query: bytes) -> Message:
        return {
            "type": "websocket",
            "path": "/ws",
            "query_string": query,
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 5000),
            "extensions": self.extensions,
        }

    async def next_sent(self) -> Message:
        with trio.fail_after(2):
            while not self.sent:
                self.arrived = trio.Event()
                await self.arrived.wait()
        return self.sent.pop(0)


async def test_a_whole_conversation() -> None:
    bus = app()
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            bus, server.scope(b"room=lobby&username=ann"), server.receive, server.send
        )
        await server.incoming_send.send({"type": "websocket.connect"})
        assert await server.next_sent() == {"type": "websocket.accept"}
        join = json.loads((await server.next_sent())["text"])
        assert (join["type"], join["username"]) == ("presence", "ann")
        assert json.loads((await server.next_sent())["text"])["type"] == "presence_state"
        await server.incoming_send.send(
            {"type": "websocket.receive", "text": '{"type":"chat","content":"hi"}'}
        )
        chat = json.loads((await server.next_sent())["text"])
        assert (chat["type"], chat["content"], chat["seq"]) == ("chat", "hi", 1)
        assert bus.publish("lobby", "from the app").delivered == 1
        assert json.loads((await server.next_sent())["text"])["content"] == "from the app"
        await server.incoming_send.send({"type": "websocket.receive", "bytes": b"\x01"})
        assert await server.next_sent() == {
            "type": "websocket.close",
            "code": 1003,
            "reason": "binary frames are not supported",
        }
        assert bus.connection_count == 0  # the broker forgot it at once
        await server.incoming_send.send({"type": "websocket.disconnect", "code": 1003})
    assert bus.hub.connection_count == 0


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        ({"websocket.http.response": {}}, "websocket.http.response.start"),
        ({}, "websocket.close"),  # the server answers 403 for it
    ],
    ids=["http-response-extension", "plain"],
)
async def test_refused_before_accept(extensions: dict[str, Any], expected: str) -> None:
    bus = app()
    server = FakeServer(extensions=extensions)
    await server.incoming_send.send({"type": "websocket.connect"})
    with trio.fail_after(2):
        await bus(server.scope(b"room=bad%20room&username=ann"), server.receive, server.send)
    assert server.sent[0]["type"] == expected
    if extensions:
        assert server.sent[0]["status"] == 400
        assert server.sent[1]["body"] == b"room must be 1-64 characters of A-Z a-z 0-9 _ . : -\n"


async def test_lifespan_shutdown_closes_everyone_with_1001() -> None:
    bus = app()
    server = FakeServer()
    life_in, life_out = trio.open_memory_channel[Message](10)
    life_sent: list[Message] = []

    async def life_send(message: Message) -> None:
        life_sent.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bus, {"type": "lifespan"}, life_out.receive, life_send)
        await life_in.send({"type": "lifespan.startup"})
        nursery.start_soon(
            bus, server.scope(b"room=lobby&username=ann"), server.receive, server.send
        )
        await server.incoming_send.send({"type": "websocket.connect"})
        for _ in range(3):  # accept, join, presence_state
            await server.next_sent()
        await life_in.send({"type": "lifespan.shutdown"})
        close = await server.next_sent()
        assert (close["type"], close["code"]) == ("websocket.close", 1001)
        await server.incoming_send.send({"type": "websocket.disconnect", "code": 1001})
    assert life_sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]


def test_the_core_heartbeat_must_be_off() -> None:
    with pytest.raises(ConfigError, match="heartbeat"):
        RoombusASGI(BrokerConfig())


def test_create_app_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("ROOMBUS_")]:
        monkeypatch.delenv(name)
    logger = logging.getLogger("roombus")
    monkeypatch.setattr(logger, "level", logger.level)  # create_app sets it
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))  # and may add one
    monkeypatch.setenv("ROOMBUS_MAX_MESSAGE_BYTES", "2048")
    monkeypatch.setenv("ROOMBUS_SEND_QUEUE_BYTES", "8192")
    monkeypatch.setenv("ROOMBUS_ALLOWED_ORIGIN", "https://a.example,https://b.example")
    monkeypatch.setenv("ROOMBUS_PING_INTERVAL", "5")  # the server's pings replace it
    bus = create_app()
    config = bus.broker.config
    assert (config.max_message_bytes, config.send_queue_bytes) == (2048, 8192)
    assert config.heartbeat is False
    assert bus.config.allowed_origins == {"https://a.example", "https://b.example"}
    assert bus.config.page is not None and b"<html" in bus.config.page.lower()  # the chat page
    monkeypatch.setenv("ROOMBUS_NO_PAGE", "1")
    assert create_app().config.page is None
    monkeypatch.setenv("ROOMBUS_RATE_LIMIT", "-1")
    with pytest.raises(SystemExit) as exited:
        create_app()
    assert exited.value.code == 2
    line = capsys.readouterr().err
    assert line.startswith("roombus: ") and "rate-limit" in line and line.count("\n") == 1


class FakeBackplane:
    """What the app asks of a backplane, recorded."""

    node_id = "fake-node"

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.host: Any = None

    def metrics(self) -> dict[str, float]:
        return {"roombus_fake_total": 3}

    def start(self, host: Any) -> None:
        self.calls.append("start")
        self.host = host

    def submit(self, work: list[Any]) -> None:
        self.calls.extend(work)

    async def wait_idle(self) -> None:
        self.calls.append("wait_idle")

    async def aclose(self) -> None:
        self.calls.append("aclose")


async def lifespan(bus: RoombusASGI, *events: str) -> list[Message]:
    """Run the lifespan protocol with *events*; what the app answered."""
    pending = [{"type": f"lifespan.{event}"} for event in events]
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await bus({"type": "lifespan"}, receive, send)
    return sent


def test_a_backplane_starts_at_lifespan_startup_on_asyncio() -> None:
    import asyncio

    backplane = FakeBackplane()
    bus = RoombusASGI(backplane=backplane)

    async def main() -> None:
        assert await lifespan(bus, "startup", "shutdown") == [
            {"type": "lifespan.startup.complete"},
            {"type": "lifespan.shutdown.complete"},
        ]

    asyncio.run(asyncio.wait_for(main(), 5))
    assert backplane.host is bus
    assert backplane.calls == ["start", "wait_idle", "aclose"]
    assert bus.hub.broker.node == "fake-node"
    assert "roombus_fake_total 3.0" in bus.hub.metrics_response().body.decode().splitlines()


async def test_a_backplane_under_trio_fails_startup_naming_the_setting() -> None:
    backplane = FakeBackplane()
    bus = RoombusASGI(backplane=backplane)
    (answer,) = await lifespan(bus, "startup")
    assert answer["type"] == "lifespan.startup.failed"
    assert answer["message"].startswith("redis: a cluster under ASGI needs an asyncio server")
    assert backplane.calls == []
    # A mounted app (no lifespan): the first WebSocket is refused, with the reason.
    server = FakeServer(extensions={"websocket.http.response": {}})
    await server.incoming_send.send({"type": "websocket.connect"})
    with trio.fail_after(2):
        await bus(server.scope(b"room=lobby&username=ann"), server.receive, server.send)
    assert server.sent[0]["status"] == 500
    assert server.sent[1]["body"].startswith(b"redis: a cluster under ASGI")
    assert backplane.calls == []


async def test_drain_answers_503_then_closes_each_with_1001_within_the_window() -> None:
    bus = app()
    assert (await http(bus, "GET", "/healthz"))[:3:2] == (200, b"ok\n")
    servers = [FakeServer() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for i, server in enumerate(servers):
            query = f"room=lobby&username=u{i}".encode()
            nursery.start_soon(bus, server.scope(query), server.receive, server.send)
            await server.incoming_send.send({"type": "websocket.connect"})
            assert await server.next_sent() == {"type": "websocket.accept"}
        t0 = trio.current_time()
        drained = trio.Event()

        async def drain() -> None:
            await bus.drain(0.5)
            drained.set()

        nursery.start_soon(drain)
        with trio.fail_after(2):
            while not bus.draining:
                await trio.lowlevel.checkpoint()
        assert (await http(bus, "GET", "/healthz"))[:3:2] == (503, b"draining\n")
        late = FakeServer(extensions={"websocket.http.response": {}})
        await late.incoming_send.send({"type": "websocket.connect"})
        await bus(late.scope(b"room=lobby&username=late"), late.receive, late.send)
        assert late.sent[0]["status"] == 503
        assert (b"retry-after", b"5") in late.sent[0]["headers"]
        for server in servers:
            with trio.fail_after(2):
                while True:
                    message = await server.next_sent()
                    if message["type"] == "websocket.close":
                        break
            assert (message["code"], message["reason"]) == (1001, "server draining")
            assert trio.current_time() - t0 <= 0.5 + 0.2
            await server.incoming_send.send({"type": "websocket.disconnect", "code": 1001})
        with trio.fail_after(2):
            await drained.wait()
    assert bus.hub.connection_count == 0 and bus.hub.shutting_down
