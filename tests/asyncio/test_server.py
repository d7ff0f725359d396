"""roombus.asyncio's own API: awaited or entered, ready callback, bind errors, cancellation."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import roombus.asyncio
from roombus import BrokerConfig, ServerConfig
from roombus.cluster import (
    Announce,
    BackplaneAction,
    BackplaneRestored,
    Relay,
    RoomSynced,
    Subscribe,
)

LOCAL = ServerConfig(host="127.0.0.1", port=0, close_timeout=1.0)


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def test_awaited_it_reports_ready_and_a_cancellation_is_a_graceful_shutdown() -> None:
    async def main() -> None:
        ready: asyncio.Future[roombus.asyncio.Server] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(roombus.asyncio.serve(None, LOCAL, on_ready=ready.set_result))
        server = await ready
        url = f"ws://127.0.0.1:{server.port}/ws?room=lobby&username=ann"
        async with connect(url, compression=None) as ws:
            assert json.loads(await ws.recv())["type"] == "presence"
            assert json.loads(await ws.recv())["type"] == "presence_state"
            assert server.publish("lobby", "hello").delivered == 1
            assert json.loads(await ws.recv())["content"] == "hello"
            assert server.connection_count == 1
            task.cancel()
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_entered_it_listens_and_shuts_down_on_exit() -> None:
    async def main() -> None:
        async with roombus.asyncio.serve(BrokerConfig(), LOCAL) as server:
            port = server.port
            assert port
            url = f"ws://127.0.0.1:{port}/ws?room=lobby&username=ann"
            ws = await connect(url, compression=None)
        await ws.wait_closed()
        assert ws.close_code == 1001
        with pytest.raises(ConnectionRefusedError):  # nobody listens any more
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_an_address_in_use_raises_oserror_in_either_form() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            config = ServerConfig(host="127.0.0.1", port=taken.getsockname()[1])
            with pytest.raises(OSError, match="in use"):
                async with roombus.asyncio.serve(None, config):
                    pass
            with pytest.raises(OSError, match="in use"):
                await roombus.asyncio.serve(None, config)

    run(main())


class FakeBackplane:
    """What the server asks of a backplane, recorded; answers are the test's to give."""

    node_id = "fake-node"

    def __init__(self, *, goes_idle: bool = True) -> None:
        self.host: object = None
        self.calls: list[object] = []
        self.goes_idle = goes_idle
        self.changed = asyncio.Event()

    def metrics(self) -> dict[str, float]:
        return {"roombus_fake_total": 7}

    def start(self, host: roombus.asyncio.Server) -> None:
        self.calls.append("start")
        self.host = host

    def submit(self, work: list[BackplaneAction]) -> None:
        assert work, "empty work was submitted"
        self.calls.extend(work)
        self.changed.set()

    async def next_of(self, kind: type[Subscribe | Relay]) -> Subscribe | Relay:
        """The first submitted action of *kind*, once there is one."""
        while not (found := [c for c in self.calls if isinstance(c, kind)]):
            self.changed.clear()
            await self.changed.wait()
        return found[0]

    async def wait_idle(self) -> None:
        self.calls.append("wait_idle")
        if not self.goes_idle:
            await asyncio.get_running_loop().create_future()  # never

    async def aclose(self) -> None:
        self.calls.append("aclose")


def test_a_backplane_is_started_fed_and_closed_after_the_goodbyes() -> None:
    backplane = FakeBackplane()

    async def main() -> None:
        async with roombus.asyncio.serve(None, LOCAL, backplane=backplane) as server:
            assert backplane.host is server
            assert backplane.calls == ["start"]
            metrics = server.hub.metrics_response().body.decode()
            assert "roombus_fake_total 7.0" in metrics.splitlines()
            server.backplane_events([BackplaneRestored()])
            url = f"ws://127.0.0.1:{server.port}/ws?room=lobby&username=ann"
            ws = await connect(url, compression=None)
            # The join is pending until the room's snapshot comes.
            subscribe = await backplane.next_of(Subscribe)
            assert isinstance(subscribe, Subscribe)
            assert subscribe.room == "lobby"
            server.backplane_events(
                [RoomSynced(room=subscribe.room, version=0, entries=(), gen=subscribe.gen)]
            )
            assert json.loads(await ws.recv())["type"] == "presence"
            assert json.loads(await ws.recv())["users"] == ["ann"]
            await ws.send(json.dumps({"type": "chat", "content": "to the cluster"}))
            relay = await backplane.next_of(Relay)
            assert isinstance(relay, Relay)
            assert relay.room == "lobby"
            assert Announce(room="lobby", username="ann", present=True) in backplane.calls
        await ws.wait_closed()
        calls = backplane.calls
        # The goodbye goes to the backplane before the server waits for it to be sent.
        leave = calls.index(Announce(room="lobby", username="ann", present=False))
        assert leave < calls.index("wait_idle") < calls.index("aclose") == len(calls) - 1

    run(main())


def test_a_backplane_that_never_goes_idle_delays_shutdown_by_close_timeout_only() -> None:
    backplane = FakeBackplane(goes_idle=False)
    config = ServerConfig(host="127.0.0.1", port=0, close_timeout=0.3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with roombus.asyncio.serve(None, config, backplane=backplane):
            pass
        assert backplane.calls == ["start", "wait_idle", "aclose"]
        assert 0.3 <= loop.time() - started < 1.3

    run(main())
