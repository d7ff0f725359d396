"""
Embed a roombus server in a trio program.

It listens on 127.0.0.1 (port 8765, or the first argument; 0 picks a free one),
logs who joins and leaves, and every 5 seconds publishes a "tick" to the room
"lobby" as the user "server". Stop it with Ctrl-C. Try it with:

    python examples/trio_server.py 8765
    python -m websockets 'ws://127.0.0.1:8765/ws?room=lobby&username=ann'
"""

from __future__ import annotations

import itertools
import signal
import sys
from functools import partial

import roombus
import roombus.trio
import trio
from roombus import BrokerConfig, ServerConfig


def on_notice(notice: roombus.Notice) -> None:
    # Called synchronously for every UserJoined, UserLeft and MessagePublished.
    print("notice:", notice, flush=True)


async def tick(server: roombus.trio.Server) -> None:
    for n in itertools.count(1):
        await trio.sleep(5)
        sent = server.publish("lobby", {"tick": n}, username="server")
        print(f"tick {n} delivered to {sent.delivered} connection(s)", flush=True)


async def main(port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            # nursery.start passes positional arguments only: keywords go through partial.
            server = await nursery.start(
                partial(roombus.trio.serve, on_notice=on_notice),
                BrokerConfig(ping_interval=20.0, ping_timeout=10.0),
                ServerConfig(host="127.0.0.1", port=port),
            )
            print(
                f"listening on ws://127.0.0.1:{server.port}/ws?room=lobby&username=...", flush=True
            )
            nursery.start_soon(tick, server)
            async for _ in signals:  # Ctrl-C: clients get close 1001, then we return
                nursery.cancel_scope.cancel()
                break
    print("stopped")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
