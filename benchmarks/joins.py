#!/usr/bin/env python3
"""
What joining one room costs, and what a mass disconnect leaves behind.

Four parts, each printing numbers:

``broker``  the sans-IO broker alone: N joins of one room, then N leaves; the actions
            are made (presence encoded) but not carried out. CPU of each.
``hub``     sans-IO: N clients go through the whole ``Hub`` path (HTTP upgrade, join,
            presence to every member, every queue written out after each join as a
            flusher would), then all drop at once. CPU (``time.process_time``) of the
            joins and of the drop, for each N.
``server``  a real ``roombus serve`` on loopback: N raw clients join one room (at most
            ``--inflight`` handshakes at a time, every socket read all the time), then
            all close at once. Server CPU (user + system, from /proc) of the joins and of
            the drop, for each N. Then ``--mass`` connections in rooms of 10 are dropped
            at once, twice: server RSS before, with them, after each drop.
``memory``  sans-IO again, with tracemalloc: ``--mass`` connections in rooms of 10,
            dropped at once; what is still allocated afterwards, by line.

    python benchmarks/joins.py hub --n 1000 --n 2000 --n 4000
    python benchmarks/joins.py server --n 1000 --n 2000 --n 4000 --mass 10000
    python benchmarks/joins.py memory --mass 10000

Loopback only; every wait is bounded, and the server is ended by its PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc

from roombus import BrokerConfig, RoomName, ServerConfig, Username
from roombus.hub import Hub
from roombus.lowlevel import Broker, ClientConnected, ClientDisconnected, ConnectionId

TS = 1_700_000_000
TICK = os.sysconf("SC_CLK_TCK")


def request(room: str, user: str) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        f"GET /ws?room={room}&username={user} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


# -- sans-IO --------------------------------------------------------------------------


def make_hub() -> Hub:
    return Hub(
        BrokerConfig(max_connections_per_room=0),
        ServerConfig(max_connections=0, max_connections_per_ip=0),
    )


def flush(hub: Hub) -> int:
    """Write every dirty queue out completely, as a flusher whose kernel takes it all."""
    sent = 0
    for cid, queue in hub.take_dirty():
        data = queue.data()
        while data:
            sent += len(data)
            queue.consume(len(data))
            data = queue.data()
        hub.flushed(cid)
    for cid in hub.take_to_close():
        hub.lost(cid, now=0.0, timestamp=TS)
    return sent


def hub_joins(n: int, batch: int) -> dict[str, float]:
    """N joiners of one room; queues written out every *batch* joins."""
    hub = make_hub()
    reqs = [request("lobby", f"user{i}") for i in range(n)]
    gc.collect()
    t0 = time.process_time()
    cids = []
    sent = 0
    for i, req in enumerate(reqs):
        cid = hub.open(now=0.0, peer=f"127.0.0.1:{i}")
        hub.receive(cid, req, now=0.0, timestamp=TS)
        cids.append(cid)
        if (i + 1) % batch == 0:
            sent += flush(hub)
    sent += flush(hub)
    t1 = time.process_time()
    for i, cid in enumerate(cids):
        hub.lost(cid, now=0.0, timestamp=TS)
        if (i + 1) % batch == 0:
            flush(hub)
    flush(hub)
    t2 = time.process_time()
    return {"join_s": t1 - t0, "drop_s": t2 - t1, "join_bytes": sent}


def run_hub(args: argparse.Namespace) -> None:
    print(f"hub: N joiners of one room, queues written every {args.batch} joins")
    print(f"{'N':>6} {'join CPU s':>11} {'us/join/member':>15} {'drop CPU s':>11} {'MB out':>8}")
    for n in args.n:
        r = hub_joins(n, args.batch)
        per = r["join_s"] / (n * n / 2) * 1e6
        print(
            f"{n:>6} {r['join_s']:>11.3f} {per:>15.3f} {r['drop_s']:>11.3f}"
            f" {r['join_bytes'] / 1e6:>8.1f}"
        )


def broker_joins(n: int) -> tuple[float, float]:
    """The broker alone: N joins, then N leaves, actions made but not carried out."""
    broker = Broker(BrokerConfig(max_connections_per_room=0))
    events = [
        ClientConnected(conn=ConnectionId(i), username=Username(f"user{i}"), room=RoomName("lobby"))
        for i in range(n)
    ]
    gc.collect()
    t0 = time.process_time()
    for event in events:
        broker.handle(event, now=0.0, timestamp=TS)
    t1 = time.process_time()
    for i in range(n):
        broker.handle(ClientDisconnected(conn=ConnectionId(i)), now=0.0, timestamp=TS)
    return t1 - t0, time.process_time() - t1


def run_broker(args: argparse.Namespace) -> None:
    print("broker: N joiners of one room (actions not carried out), then all leave")
    print(f"{'N':>6} {'join CPU s':>11} {'us/join':>9} {'leave CPU s':>12}")
    for n in args.n:
        join, leave = broker_joins(n)
        print(f"{n:>6} {join:>11.3f} {join / n * 1e6:>9.1f} {leave:>12.3f}")


def run_memory(args: argparse.Namespace) -> None:
    hub = make_hub()
    tracemalloc.start(3)
    gc.collect()
    before = tracemalloc.take_snapshot()
    cur0 = tracemalloc.get_traced_memory()[0]
    cids = []
    for i in range(args.mass):
        cid = hub.open(now=0.0, peer=f"127.0.0.1:{i}")
        hub.receive(cid, request(f"room{i // 10}", f"user{i}"), now=0.0, timestamp=TS)
        cids.append(cid)
        if i % 64 == 0:
            flush(hub)
    flush(hub)
    cur1 = tracemalloc.get_traced_memory()[0]
    for cid in cids:
        hub.lost(cid, now=0.0, timestamp=TS)
    flush(hub)
    del cids
    gc.collect()
    cur2 = tracemalloc.get_traced_memory()[0]
    after = tracemalloc.take_snapshot()
    print(f"memory: {args.mass} connections in rooms of 10, then all dropped")
    print(f"  traced before {cur0 / 1e6:.2f} MB, connected {cur1 / 1e6:.2f} MB,")
    print(f"  after the drop {cur2 / 1e6:.2f} MB (kept: {(cur2 - cur0) / 1e6:.2f} MB)")
    print("  kept, by line (top 8):")
    for stat in after.compare_to(before, "lineno")[:8]:
        if stat.size_diff > 0:
            print(f"    {stat.size_diff / 1e3:9.1f} kB  {stat.traceback}")


# -- a real server --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProc:
    def __init__(self, transport: str, profile: str = "") -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *(["-m", "cProfile", "-o", profile] if profile else []),
                "-m",
                "roombus",
                "serve",
                "--transport",
                transport,
                "--port",
                str(self.port),
                "--max-connections",
                "0",
                "--max-connections-per-ip",
                "0",
                "--max-connections-per-room",
                "0",
                "--backlog",
                "4096",
                "--log-level",
                "error",
            ]
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start")

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the server's CPU stops moving (it has caught up)."""
        deadline = time.monotonic() + timeout
        last = self.cpu()
        while time.monotonic() < deadline:
            time.sleep(0.3)
            cur = self.cpu()
            if cur - last < 0.02:
                return
            last = cur

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Clients:
    """Raw clients on one epoll: connect, handshake, then read and discard everything."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ep = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.state: dict[int, bytes] = {}  # fd -> unread tail until joined
        self.joined = 0

    def open(self, room: str, user: str) -> None:
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", self.port))
        self.socks[s.fileno()] = s
        self.state[s.fileno()] = b""
        self.ep.register(s.fileno(), select.EPOLLOUT)
        self._pending_req = getattr(self, "_pending_req", {})
        self._pending_req[s.fileno()] = request(room, user)

    def poll(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout, 1024):
            s = self.socks.get(fd)
            if s is None:
                continue
            if ev & select.EPOLLOUT:
                s.send(self._pending_req.pop(fd))
                self.ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self.ep.unregister(fd)
                continue
            tail = self.state.get(fd)
            if tail is not None:
                buf = tail + data
                if b'"presence_state"' in buf:
                    del self.state[fd]
                    self.joined += 1
                else:
                    self.state[fd] = buf[-32:]

    def close_all(self, *, rst: bool = True) -> None:
        for s in self.socks.values():
            if rst:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self.socks.clear()
        self.state.clear()
        self.ep.close()
        self.ep = select.epoll()


def join_all(clients: Clients, rooms: list[str], inflight: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    started = 0
    while clients.joined < len(rooms):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {clients.joined} of {len(rooms)} joined in {timeout} s")
        while started < len(rooms) and started - clients.joined < inflight:
            clients.open(rooms[started], f"u{started}")
            started += 1
        clients.poll(0.05)


def drain(clients: Clients, server: ServerProc, timeout: float = 60.0) -> None:
    """Keep reading until the server is idle."""
    deadline = time.monotonic() + timeout
    last = server.cpu()
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        clients.poll(0.05)
        cur = server.cpu()
        if cur - last > 0.02:
            last = cur
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.5:
            return


def run_server(args: argparse.Namespace) -> None:
    print(f"server ({args.transport}): N joiners of one room, then all closed at once")
    print(f"{'N':>6} {'join CPU s':>11} {'drop CPU s':>11}")
    for n in args.n:
        server = ServerProc(args.transport, args.profile and f"{args.profile}.{n}")
        try:
            clients = Clients(server.port)
            cpu0 = server.cpu()
            join_all(clients, ["lobby"] * n, args.inflight, timeout=300)
            drain(clients, server)
            cpu1 = server.cpu()
            clients.close_all()
            server.settle()
            cpu2 = server.cpu()
            print(f"{n:>6} {cpu1 - cpu0:>11.2f} {cpu2 - cpu1:>11.2f}")
        finally:
            server.stop()
    if not args.mass:
        return
    server = ServerProc(args.transport)
    try:
        size = args.room_size
        print(
            f"server ({args.transport}): {args.mass} connections in rooms of {size},"
            f" closed at once ({'RST' if args.rst else 'FIN'})"
        )
        rss = [f"start {server.rss_mb():.0f}"]
        for round_ in (1, 2):
            clients = Clients(server.port)
            join_all(clients, [f"r{i // size}" for i in range(args.mass)], args.inflight, 300)
            drain(clients, server)
            rss.append(f"connected {server.rss_mb():.0f}")
            clients.close_all(rst=args.rst)
            server.settle()
            time.sleep(1.0)
            rss.append(f"after drop {round_} {server.rss_mb():.0f}")
        print("  RSS MB: " + ", ".join(rss))
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("part", choices=["broker", "hub", "server", "memory"])
    p.add_argument("--n", type=int, action="append", help="joiners (repeatable)")
    p.add_argument("--batch", type=int, default=16, help="hub: joins between flushes")
    p.add_argument("--mass", type=int, default=10000, help="connections dropped at once")
    p.add_argument("--room-size", type=int, default=10, help="server: room size of --mass")
    p.add_argument("--rst", action="store_true", help="server: close --mass with RST, not FIN")
    p.add_argument("--inflight", type=int, default=64, help="server: handshakes at a time")
    p.add_argument("--profile", default="", help="server: cProfile output prefix, per N")
    p.add_argument("--transport", default="trio", choices=["trio", "asyncio"])
    args = p.parse_args()
    args.n = args.n or [1000, 2000, 4000]
    {"broker": run_broker, "hub": run_hub, "server": run_server, "memory": run_memory}[args.part](
        args
    )


if __name__ == "__main__":
    main()
