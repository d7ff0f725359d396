"""
roombus.client: join a room, print what arrives (with its position), and publish each
line typed on stdin once the server acknowledges it.

    python3 -m roombus serve &           # a server on ws://127.0.0.1:8765/ws
    python3 examples/python_client.py lobby ann

Stop the server and start it again while this runs: the client reconnects by itself
and says what it could recover; lines typed meanwhile are sent once it is back.
"""

from __future__ import annotations

import os
import sys

import roombus.client as rc
import trio


async def main(room: str, username: str) -> None:
    url = os.environ.get("ROOMBUS_URL", "ws://127.0.0.1:8765/ws")
    async with rc.connect(url, [room], username=username) as client, trio.open_nursery() as n:

        async def type_lines() -> None:
            while line := await trio.to_thread.run_sync(sys.stdin.readline):
                n.start_soon(send, line.rstrip("\n"))
            client.close()

        async def send(text: str) -> None:
            try:
                pos = await client.publish(room, text)
                print(f"* acknowledged as {pos.epoch}:{pos.seq}")
            except rc.PublishError as exc:
                print(f"* not sent: {exc}")

        n.start_soon(type_lines)
        async for event in client:
            if isinstance(event, rc.Message):
                note = " (replayed)" if event.replayed else ""
                print(f"{event.seq} <{event.username}> {event.content!r}{note}")
            elif isinstance(event, rc.Joined):
                if event.recovered is False:
                    print(f"* could not recover everything: {event.reason} {event.lost or ''}")
                print(f"* in {event.room} at {event.epoch}:{event.seq}")
            elif isinstance(event, rc.Presence):
                print(f"* {event.room}: {', '.join(sorted(event.users))}")
            elif isinstance(event, rc.Disconnected):
                wait = f"reconnecting in {event.reconnect_in:.1f} s"
                print("* closed" if event.final else f"* {wait}")
        n.cancel_scope.cancel()


if __name__ == "__main__":
    args = sys.argv[1:]
    trio.run(main, args[0] if args else "lobby", args[1] if len(args) > 1 else "python")
