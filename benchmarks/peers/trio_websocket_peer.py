#!/usr/bin/env python3
"""
roombus's wire protocol on trio-websocket, the obvious way: each member has a bounded
queue and a writer task; a broadcast puts the message in every member's queue without
waiting and drops a member whose queue is full. Usage: --port 8765 (benchmark baseline)
"""

from __future__ import annotations

import argparse
import json
import time
from urllib.parse import parse_qs, urlsplit

from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

import trio

QUEUE = 256  # messages that may wait for one member


class Room:
    def __init__(self) -> None:
        self.members: dict[object, trio.MemorySendChannel[str]] = {}
        self.users: dict[str, int] = {}  # username -> open connections
        self.seq = 0

    def broadcast(self, text: str) -> None:
        for ws, queue in list(self.members.items()):  # a copy: members change below
            try:
                queue.send_nowait(text)
            except trio.WouldBlock:  # too slow: drop it; its writer then ends
                del self.members[ws]
                queue.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.members.pop(ws, None)  # its writer is already gone


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


async def writer(
    ws: WebSocketConnection, queue: trio.MemoryReceiveChannel[str], done: trio.CancelScope
) -> None:
    try:  # each task catches its own ConnectionClosed: trio groups exceptions from a nursery
        async with queue:
            async for text in queue:
                await ws.send_message(text)
    except ConnectionClosed:
        pass
    finally:
        done.cancel()


async def reader(
    ws: WebSocketConnection, room: Room, name: str, user: str, done: trio.CancelScope
) -> None:
    try:
        while True:
            text = await ws.get_message()
            try:
                msg = json.loads(text)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("type") == "chat" and "content" in msg:
                room.seq += 1
                room.broadcast(
                    envelope(
                        type="chat",
                        username=user,
                        content=msg["content"],
                        room=name,
                        timestamp=int(time.time()),
                        seq=room.seq,
                    )
                )
    except ConnectionClosed:
        pass
    finally:
        done.cancel()


async def handler(request: WebSocketRequest) -> None:
    url = urlsplit(request.path)
    query = parse_qs(url.query)
    name = query.get("room", [""])[0]
    user = query.get("username", [""])[0]
    if url.path != "/ws" or not name or not user:
        await request.reject(400, body=b"use /ws?room=R&username=U\n")
        return
    ws = await request.accept()
    send, receive = trio.open_memory_channel[str](QUEUE)
    room = rooms.setdefault(name, Room())
    room.members[ws] = send
    room.users[user] = room.users.get(user, 0) + 1
    if room.users[user] == 1:
        room.broadcast(presence("join", user, name))
    send.send_nowait(envelope(type="presence_state", room=name, users=sorted(room.users)))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, ws, receive, nursery.cancel_scope)
            nursery.start_soon(reader, ws, room, name, user, nursery.cancel_scope)
    finally:
        room.members.pop(ws, None)
        send.close()
        room.users[user] -= 1
        if room.users[user] == 0:
            del room.users[user]
            room.broadcast(presence("leave", user, name))
        if not room.members and not room.users:
            rooms.pop(name, None)
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await ws.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    await serve_websocket(handler, args.host, args.port, ssl_context=None)


if __name__ == "__main__":
    trio.run(main)
