#!/usr/bin/env python3
"""
roombus's wire protocol on the `websockets` package (asyncio), written the way a user
would: a dict of rooms, one handler coroutine per connection, and websockets'
``broadcast()`` to write a message to every member. A baseline for the benchmarks.

    python3 benchmarks/peers/websockets_peer.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed


class Room:
    def __init__(self) -> None:
        self.conns: set[ServerConnection] = set()
        self.users: dict[str, int] = {}  # username -> open connections
        self.seq = 0


rooms: dict[str, Room] = {}


def envelope(**fields: object) -> str:
    return json.dumps(fields, separators=(",", ":"))


def presence(event: str, user: str, room: str) -> str:
    verb = "joined" if event == "join" else "left"
    return envelope(
        type="presence",
        event=event,
        username=user,
        content=f"{user} {verb} the room",
        room=room,
        timestamp=int(time.time()),
    )


async def handler(ws: ServerConnection) -> None:
    assert ws.request is not None  # set once the handshake is done, before the handler runs
    url = urlsplit(ws.request.path)
    query = parse_qs(url.query)
    name = query.get("room", [""])[0]
    user = query.get("username", [""])[0]
    if url.path != "/ws" or not name or not user:
        await ws.close(1008, "use /ws?room=R&username=U")
        return
    room = rooms.setdefault(name, Room())
    room.conns.add(ws)
    room.users[user] = room.users.get(user, 0) + 1
    try:
        if room.users[user] == 1:
            broadcast(room.conns, presence("join", user, name))
        await ws.send(envelope(type="presence_state", room=name, users=sorted(room.users)))
        async for text in ws:
            try:
                msg = json.loads(text)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("type") == "chat" and "content" in msg:
                room.seq += 1
                broadcast(
                    room.conns,
                    envelope(
                        type="chat",
                        username=user,
                        content=msg["content"],
                        room=name,
                        timestamp=int(time.time()),
                        seq=room.seq,
                    ),
                )
    except ConnectionClosed:
        pass
    finally:
        room.conns.discard(ws)
        room.users[user] -= 1
        if room.users[user] == 0:
            del room.users[user]
            broadcast(room.conns, presence("leave", user, name))
        if not room.conns:
            del rooms[name]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, args.host, args.port):
        await stop


if __name__ == "__main__":
    asyncio.run(main())
