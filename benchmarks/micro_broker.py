#!/usr/bin/env python3
"""
The single-node fan-out path, sans-IO: one chat to a room of N members.

Two measurements, each the best of ``--repeat`` timings of ``--number`` chats:

``broker``  ``Broker.handle(TextReceived)``: decode, rights, encode, one ``Deliver``
            (the actions are made, not carried out).
``hub``     ``FramedHub.receive`` of one masked text frame: the frame parsed, the broker's
            actions carried out (a text frame pushed to each member's send queue),
            then every queue written out as a flusher would.

    python benchmarks/micro_broker.py --members 1000

Prints microseconds per chat. Nothing here does I/O.
"""

from __future__ import annotations

import argparse
import base64
import timeit

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from roombus import BrokerConfig, ServerConfig
from roombus.core.names import ConnectionId, RoomName, Username
from roombus.lowlevel import Broker, ClientConnected, TextReceived
from roombus.server.framed import FramedHub

CHAT = '{"type":"chat","content":"hello, everyone"}'
KEY = base64.b64encode(b"0123456789abcdef")


def broker_chat(members: int) -> tuple[Broker, TextReceived]:
    """A broker with *members* connections in one room, and the chat one of them sends."""
    broker = Broker(BrokerConfig(heartbeat=False, rate_limit=0))
    for i in range(1, members + 1):
        broker.handle(
            ClientConnected(
                conn=ConnectionId(i), username=Username(f"u{i}"), room=RoomName("lobby")
            ),
            now=0.0,
            timestamp=0,
        )
    return broker, TextReceived(conn=ConnectionId(1), text=CHAT)


def hub_chat(members: int) -> tuple[FramedHub, ConnectionId, bytes]:
    """A hub with *members* open WebSockets in one room, and a frame one of them sends."""
    hub = FramedHub(
        BrokerConfig(heartbeat=False, rate_limit=0),
        ServerConfig(max_connections=0, max_connections_per_ip=0),
    )
    cids = []
    for i in range(members):
        cid = hub.open(now=0.0)
        request = (
            f"GET /ws?room=lobby&username=u{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: " + KEY.decode() + "\r\n\r\n"
        ).encode()
        hub.receive(cid, request, now=0.0, timestamp=0)
        cids.append(cid)
    drain(hub)
    frame = Connection(ConnectionType.CLIENT).send(TextMessage(data=CHAT))
    return hub, cids[0], frame


def drain(hub: FramedHub) -> None:
    for cid, queue in hub.take_dirty():
        while queue:
            queue.consume(len(queue.data()))
        hub.flushed(cid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    broker, event = broker_chat(args.members)

    def one_broker_chat() -> None:
        broker.handle(event, now=1.0, timestamp=0)

    hub, sender, frame = hub_chat(args.members)

    def one_hub_chat() -> None:
        hub.receive(sender, frame, now=1.0, timestamp=0)
        drain(hub)

    for name, fn in (("broker", one_broker_chat), ("hub", one_hub_chat)):
        best = min(timeit.repeat(fn, number=args.number, repeat=args.repeat))
        print(f"{name:6} {args.members} members: {best / args.number * 1e6:9.2f} us per chat")


if __name__ == "__main__":
    main()
