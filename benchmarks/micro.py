"""
Micro-benchmarks of the sans-IO hub's hot paths (no sockets, one process, timeit).

* ``fanout``: a 1000-member room; one chat frame in through ``Hub.receive``, the
  broker's Deliver applied (one frame pushed onto 1000 send queues).
* ``churn``: a connection's whole life with its admission: ``open`` (with the
  per-address and total limits on), the upgrade request, the queues written,
  ``lost``.
* ``open-lost``: ``open`` then ``lost`` with no request, the admission counting alone.
* ``fanout-write``: ``fanout`` and then its 1000 queues taken and written out, each
  reported with ``flushed(cid, now=...)`` (what the metrics observe: the send-queue
  depth per queue taken, the publish-to-write latency per queue written).
* ``rooms``: 100 rooms of 10, every member chatting; the queues written out every
  100 chats. Microseconds per chat (its 10 deliveries included).
* ``observe``: one ``Histogram.observe`` (what each of those observations costs), in ns.

Run: ``python benchmarks/micro.py [--repeat 7]``. Prints the best of the repeats, in
microseconds per operation, as one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import timeit

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from roombus import BrokerConfig, ServerConfig
from roombus.core.names import ConnectionId
from roombus.core.stats import Histogram
from roombus.hub import Hub
from roombus.server.metrics import LATENCY_BUCKETS

TS = 1_700_000_000
ROOM = 1000
KEY = base64.b64encode(b"0123456789abcdef").decode()


def request(room: str, user: str) -> bytes:
    return (
        f"GET /ws?room={room}&username={user} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def drain(hub: Hub, now: float | None = None) -> None:
    """Write every dirty queue out completely, as a flusher whose kernel takes it all."""
    for cid, queue in hub.take_dirty():
        data = queue.data()
        while data:
            queue.consume(len(data))
            data = queue.data()
        hub.flushed(cid, now=now)
    for cid in hub.take_to_close():
        hub.lost(cid, now=0.0, timestamp=TS)


def fanout(repeat: int, number: int = 50, *, write: bool = False) -> float:
    hub = Hub(
        BrokerConfig(rate_limit=0, heartbeat=False, max_connections_per_room=0),
        ServerConfig(max_connections=0, max_connections_per_ip=0, max_queued_bytes=0),
    )
    cids = []
    for i in range(ROOM):
        cid = hub.open(now=0.0, peer=f"127.0.0.1:{i}")
        hub.receive(cid, request("lobby", f"u{i}"), now=0.0, timestamp=TS)
        cids.append(cid)
    drain(hub)
    sender = cids[0]
    frame = Connection(ConnectionType.CLIENT).send(TextMessage('{"type":"chat","content":"hi"}'))

    def chat() -> None:
        hub.receive(sender, frame, now=0.0, timestamp=TS)

    def chat_written() -> None:
        hub.receive(sender, frame, now=0.0, timestamp=TS)
        drain(hub, 0.001)

    if write:
        times = timeit.Timer(chat_written).repeat(repeat, number)
    else:
        times = timeit.Timer(chat, setup=lambda: drain(hub)).repeat(repeat, number)
    assert hub.websocket_count == ROOM
    return min(times) / number * 1e6


def churn(repeat: int, number: int = 2000, *, handshake: bool = True) -> float:
    hub = Hub(BrokerConfig(heartbeat=False), ServerConfig())
    # A steady population, so the tables are not empty (as on a live server).
    for i in range(200):
        cid = hub.open(now=0.0, peer=f"10.0.{i % 4}.1:{i}")
        hub.receive(cid, request("lobby", f"s{i}"), now=0.0, timestamp=TS)
    drain(hub)
    req = request("churn", "c")
    ports = iter(range(10**9))

    def life() -> None:
        cid = hub.open(now=0.0, peer=f"10.0.1.1:{next(ports)}")
        if handshake:
            hub.receive(cid, req, now=0.0, timestamp=TS)
            drain(hub)
        hub.lost(cid, now=0.0, timestamp=TS)

    times = timeit.Timer(life).repeat(repeat, number)
    assert hub.connection_count == 200
    return min(times) / number * 1e6


def rooms(repeat: int, rounds: int = 5) -> float:
    """100 rooms of 10; every member sends a chat, the queues are written out every
    100 chats (as a busy flusher's sweep finds them). Microseconds per chat."""
    hub = Hub(
        BrokerConfig(rate_limit=0, heartbeat=False),
        ServerConfig(max_connections=0, max_connections_per_ip=0),
    )
    cids: list[ConnectionId] = []
    for r in range(100):
        for m in range(10):
            cid = hub.open(now=0.0, peer=f"127.0.0.1:{len(cids)}")
            hub.receive(cid, request(f"room{r}", f"u{r}_{m}"), now=0.0, timestamp=TS)
            cids.append(cid)
    drain(hub)
    frame = Connection(ConnectionType.CLIENT).send(
        TextMessage('{"type":"chat","content":"hello from the benchmark, a typical chat line"}')
    )
    clock = [0.0]

    def round_() -> None:
        clock[0] += 0.001
        now = clock[0]
        for i, cid in enumerate(cids):
            hub.receive(cid, frame, now=now, timestamp=TS)
            if i % 100 == 99:
                drain(hub, now)

    times = timeit.Timer(round_).repeat(repeat, rounds)
    return min(times) / (rounds * len(cids)) * 1e6


def observe(repeat: int, number: int = 200_000) -> float:
    histogram = Histogram(LATENCY_BUCKETS)
    times = timeit.Timer(lambda: histogram.observe(0.003)).repeat(repeat, number)
    empty = timeit.Timer(lambda: None).repeat(repeat, number)  # the call's own cost
    return (min(times) - min(empty)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    gc.collect()
    print(
        json.dumps(
            {
                "fanout_us": round(fanout(args.repeat), 2),
                "churn_us": round(churn(args.repeat), 2),
                "open_lost_us": round(churn(args.repeat, handshake=False), 3),
                "fanout_write_us": round(fanout(args.repeat, write=True), 2),
                "rooms_chat_us": round(rooms(args.repeat), 2),
                "observe_ns": round(observe(args.repeat), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
