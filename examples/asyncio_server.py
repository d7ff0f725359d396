"""
Embed a roombus server in an asyncio program.

It listens on 127.0.0.1 (port 8765, or the first argument; 0 picks a free one),
logs who joins and leaves, and every 5 seconds publishes a "tick" to the room
"lobby" as the user "server". Stop it with Ctrl-C (clients get close 1001). Try it:

    python examples/asyncio_server.py 8765
    python -m websockets 'ws://127.0.0.1:8765/ws?room=lobby&username=ann'
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys

import roombus
import roombus.asyncio
from roombus import BrokerConfig, ServerConfig


def on_notice(notice: roombus.Notice) -> None:
    # Called synchronously for every UserJoined, UserLeft and MessagePublished.
    print("notice:", notice, flush=True)


async def tick(server: roombus.asyncio.Server) -> None:
    for n in itertools.count(1):
        await asyncio.sleep(5)
        sent = server.publish("lobby", {"tick": n}, username="server")
        print(f"tick {n} delivered to {sent.delivered} connection(s)", flush=True)


async def main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with roombus.asyncio.serve(
        BrokerConfig(ping_interval=20.0, ping_timeout=10.0),
        ServerConfig(host="127.0.0.1", port=port),
        on_notice=on_notice,
    ) as server:
        print(f"listening on ws://127.0.0.1:{server.port}/ws?room=lobby&username=...", flush=True)
        ticker = asyncio.create_task(tick(server))
        await stop.wait()  # leaving the block closes every client with 1001
        ticker.cancel()
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8765))
