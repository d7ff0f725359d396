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
            assert server.publish("lobby", "hello") == 1
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
