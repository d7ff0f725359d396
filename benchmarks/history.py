#!/usr/bin/env python3
"""
What room history costs in memory, and whether its cap holds.

Sans-IO, with tracemalloc: a broker on its own gets ``--rooms`` rooms, each filled
with more chats than ``--history-size`` keeps (so every history is full), from one
member per room. Printed: the bytes the history cap counts (``streams.used_bytes``),
the bytes Python really allocated for the streams (tracemalloc, after the members
left), per kept message and per room, and the same with a cap (``--max-bytes``) below
what full histories would take: the count must stay within the cap, and the real
memory with it.

    python benchmarks/history.py --rooms 10000 --history-size 100 --content-bytes 100

It opens no socket and starts no process.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

from roombus import BrokerConfig, RoomName, Username
from roombus.lowlevel import Broker, ClientConnected, ClientDisconnected, ConnectionId, TextReceived

TS = 1_700_000_000


def fill(broker: Broker, rooms: int, per_room: int, content: str) -> float:
    """Every room gets a member who publishes *per_room* chats, then leaves. CPU s."""
    text = json.dumps({"type": "chat", "content": content})
    start = time.process_time()
    now = 0.0
    for r in range(rooms):
        conn = ConnectionId(r + 1)
        room = RoomName(f"room-{r}")
        broker.handle(
            ClientConnected(conn=conn, username=Username(f"user-{r}"), room=room),
            now=now,
            timestamp=TS,
        )
        for _ in range(per_room):
            broker.handle(TextReceived(conn=conn, text=text), now=now, timestamp=TS)
        broker.handle(ClientDisconnected(conn=conn), now=now, timestamp=TS)
        now += 0.0001
    return time.process_time() - start


def measure(rooms: int, size: int, content_bytes: int, max_bytes: int) -> dict[str, float]:
    config = BrokerConfig(
        history_size=size,
        history_max_bytes=max_bytes,
        rate_limit=0,
        heartbeat=False,
    )
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    broker = Broker(config, epoch_prefix="bench")
    cpu = fill(broker, rooms, size + 10, "x" * content_bytes)
    gc.collect()
    real = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    streams = broker.streams
    kept = sum(
        len(broker.streams.history(RoomName(f"room-{r}"), None, size, 0.0)[1]) for r in range(rooms)
    )
    return {
        "rooms": rooms,
        "cap": max_bytes,
        "counted": streams.used_bytes,
        "real": real,
        "kept": kept,
        "evicted_rooms": streams.evicted_rooms,
        "cpu_s": cpu,
        "publishes": rooms * (size + 10),
    }


def show(label: str, m: dict[str, float]) -> None:
    kept = max(m["kept"], 1)
    print(
        f"{label:>10}: cap {m['cap'] / 2**20:8.1f} MiB  counted {m['counted'] / 2**20:8.1f} MiB"
        f"  real {m['real'] / 2**20:8.1f} MiB  kept {m['kept']:>9,} msgs"
        f"  real/kept {m['real'] / kept:6.0f} B  evicted rooms {m['evicted_rooms']:>6,}"
        f"  publish {m['cpu_s'] / m['publishes'] * 1e6:5.2f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--history-size", type=int, default=100)
    parser.add_argument("--content-bytes", type=int, default=100)
    parser.add_argument(
        "--max-bytes", type=int, default=64 << 20, help="the capped run's cap (default 64 MiB)"
    )
    args = parser.parse_args()
    big = 1 << 40
    print(
        f"{args.rooms:,} rooms x {args.history_size} kept chats of {args.content_bytes}-byte"
        " content, one member each (left), sans-IO, tracemalloc"
    )
    show("uncapped", measure(args.rooms, args.history_size, args.content_bytes, big))
    capped = measure(args.rooms, args.history_size, args.content_bytes, args.max_bytes)
    show("capped", capped)
    print(
        f"cap held: {capped['counted'] <= args.max_bytes}; real memory within"
        f" {capped['real'] / args.max_bytes:.2f}x of the cap"
    )
    off = measure(args.rooms, 0, args.content_bytes, big)
    show("no history", off)


if __name__ == "__main__":
    main()
