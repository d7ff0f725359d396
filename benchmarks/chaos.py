#!/usr/bin/env python3
"""
Nothing lost under faults and load, measured: a chaos run of a roombus cluster.

    PYTHONPATH=src python3 benchmarks/chaos.py --short            # CI: ~2 minutes
    PYTHONPATH=src python3 benchmarks/chaos.py --duration 1800 --clients 400 --seed 7

What runs (loopback only, every process a child of this one, ended by its PID):

* one ``redis-server`` (AOF on, ``appendfsync everysec``, in a temporary directory);
* ``--nodes`` roombus nodes (default 3) on fixed loopback ports, of mixed transports:
  node 0 ``roombus serve`` (trio), node 1 ``roombus serve --transport asyncio``,
  node 2 the ASGI app under uvicorn (``ROOMBUS_REDIS``), and so on round;
* between each node and Redis, a TCP proxy of its own (this script, ``--proxy``) that
  the harness can stall (SIGSTOP of the proxy) or make drop every connection and
  refuse new ones (SIGUSR1, until SIGUSR2);
* ``--clients`` clients of ``roombus.client`` (asyncio, in this process), each in 2 of
  ``--rooms`` rooms, each with a home node; its ``stream_factory`` dials the home node
  and, when that one refuses (killed), the others: a client always reaches a live
  node. Every client publishes (``--rate`` messages/s in all) with ids, content
  ``{"k": "<user>:<n>"}``, and records every ``Joined``, ``Reset``, ``Gap`` and
  ``Message`` it is handed, and every ack.

Faults, on a schedule drawn from ``--seed`` (the cluster faults one after the other,
each once the previous one has healed; the client faults at any time):

* ``node-kill``: ``kill -9`` of a node, restarted 1-5 s later on the same port (with
  the same node id or a new one); its *mortal* clients (15 %) die with it for good;
* ``redis-stop``: SIGSTOP of Redis for 10-30 s (``--short``: 10-12 s), then SIGCONT;
* ``redis-restart-empty`` / ``redis-restart-persist``: ``kill -9`` of Redis, restarted
  on the same port without its data (files removed) or with them (its AOF);
* ``link-stall`` / ``link-drop``: one node's Redis link stalled (8-20 s) or dropped and
  refused (2-10 s);
* ``slow-clients``: some clients (of ``max_events`` 32) read their events at 5/s for
  5-15 s, so their queue overflows and they catch up by joining again;
* ``stalled-clients``: some clients stop reading their socket for 8-25 s (the client's
  and the server's pings and send queues end their connections; they resume).

Besides the faults, clients leave for good (a clean close) and new ones join, so that
departures can be timed (presence ghosts) and first joins are exercised throughout.
Clock jumps are not injected: no transport lets its clock be set from outside, and the
nodes' logic reads monotonic clocks only.

The accounting (what the numbers mean) is in docs/reliability.md. In short, for every
receiver and room and every message of that room (known by its publisher's ack and by
every delivery): delivered once; duplicated (the same content handed over twice);
lost and told (its position is in a range the receiver was told about: a ``Joined``
with ``recovered`` not True, a ``Reset``, which move the receiver's position past it);
lost silently (anything else the receiver was owed: a seq it passed without being
told, or a message it never got although it ended in that epoch, or an epoch of the
cluster it never reached); or not owed (published before the receiver first joined,
after it left, or in another node's own epoch while that node was cut off from
Redis). "Deliveries accounted" is the number of (receiver, room, message) pairs owed:
once + duplicated + told + silent.

Presence: the harness reads each node's ``/metrics`` every 0.15 s (is it on Redis?).
A *ghost* (a departed user still shown) must be gone by its bound: a presence TTL
after the latest of the departure and the return to Redis of the departed user's
node (unless killed with it) and of the observer's. An *absence* (a live user missing
from a screen, by a ``leave`` or from a ``presence_state``) is explained by the user
being away itself (reconnecting, stalled), by its node's partition (its own link cut
long enough), or by its node back on Redis more than a TTL after the observer's;
otherwise it is a *flicker*.

It prints a table and exits 1 on any silent loss, duplicate, misnumbered message,
presence ghost past its bound (+1 s of measuring slack; observers slow, stalled or
reconnecting not timed), or flicker; 2 if the run itself failed (a process did not
start, the hard ``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
INF = math.inf
TRANSPORTS = ("trio", "asyncio", "asgi")
#: A ghost may outlive its bound by this much before it counts (the harness's own
#: delay in reading events on a busy machine); presence windows are widened by as much.
GHOST_SLACK = 1.0
#: Seconds between two reads of each node's /metrics (is it on Redis?).
LINK_POLL = 0.15
#: Clients with this event queue are the ones that can be made slow.
SLOW_MAX_EVENTS = 32
SLOW_DELAY = 0.2
MORTAL_SHARE = 0.15
SLOW_SHARE = 0.1


class RunFailed(Exception):
    """The run could not be carried out (not a finding about roombus)."""


def log(*args: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------
# processes


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the harness dies (Linux's PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class Children:
    """Every process this run started, by PID; all of them are killed at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        with open(self.logdir / f"{name}.log", "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,  # a Ctrl-C reaches this script only
                preexec_fn=_die_with_parent,
            )
        self.procs[proc.pid] = proc
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)  # by its PID
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.procs.pop(proc.pid, None)

    def signal(self, proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def kill_all(self) -> None:
        for proc in list(self.procs.values()):
            self.kill(proc)


def tcp_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def redis_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
    return False


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RunFailed(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.05)


async def http_get(port: int, path: str, timeout: float = 2.0) -> str:
    async def get() -> str:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            return (await reader.read()).decode("utf-8", "replace")
        finally:
            writer.close()

    return await asyncio.wait_for(get(), timeout)


async def metrics(port: int, timeout: float = 2.0) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, asyncio.TimeoutError, TimeoutError):
        text = await http_get(port, "/metrics", timeout)
        for line in text.partition("\r\n\r\n")[2].splitlines():
            name, _, value = line.partition(" ")
            if name and not name.startswith("#"):
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
    return out


class Redis:
    """The cluster's Redis: AOF on, restarted on the same port with or without its data."""

    def __init__(self, children: Children, binary: str, workdir: Path) -> None:
        self.children = children
        self.binary = binary
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self.proc = self.children.spawn("redis", args)
        deadline = time.monotonic() + 10
        while not redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"redis-server did not start (see {self.children.logdir})")
            time.sleep(0.02)

    def kill9(self) -> None:
        if self.proc is not None:
            self.children.kill(self.proc)
            self.proc = None

    def wipe(self) -> None:
        for entry in self.dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@dataclass
class Node:
    k: int
    transport: str
    port: int
    proxy_port: int
    proc: Any = None
    proxy: Any = None
    incarnation: int = 0
    node_id: str = ""
    up: bool = False


class Cluster:
    def __init__(self, children: Children, redis: Redis, n: int, ttl: float, send_queue: int):
        self.children = children
        self.redis = redis
        self.ttl = ttl
        self.send_queue = send_queue
        self.nodes = [
            Node(k, TRANSPORTS[k % len(TRANSPORTS)], free_port(), free_port()) for k in range(n)
        ]

    def start_proxy(self, node: Node) -> None:
        args = [sys.executable, str(HERE / "chaos.py"), "--proxy"]
        args += [str(node.proxy_port), str(self.redis.port)]
        node.proxy = self.children.spawn(f"proxy{node.k}", args)
        deadline = time.monotonic() + 10
        while not tcp_answers(node.proxy_port):
            if node.proxy.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"the Redis proxy of node {node.k} did not start")
            time.sleep(0.02)

    def start_node(self, node: Node, same_id: bool = False) -> None:
        if not same_id or not node.node_id:
            node.incarnation += 1
            node.node_id = f"n{node.k}-{node.incarnation}"
        url = f"redis://{HOST}:{node.proxy_port}/0"
        name = f"node{node.k}"
        if node.transport == "asgi":
            env = {
                "ROOMBUS_REDIS": url,
                "ROOMBUS_NODE_ID": node.node_id,
                "ROOMBUS_PRESENCE_TTL": f"{self.ttl:g}",
                "ROOMBUS_MAX_CONNECTIONS_PER_IP": "0",
                "ROOMBUS_SEND_QUEUE": str(self.send_queue),
                "ROOMBUS_LOG_LEVEL": "warning",
            }
            args = [sys.executable, "-m", "uvicorn", "--factory", "roombus.asgi:create_app"]
            args += ["--host", HOST, "--port", str(node.port), "--log-level", "warning"]
            node.proc = self.children.spawn(name, args, env)
        else:
            args = [sys.executable, "-m", "roombus", "serve", "--transport", node.transport]
            args += ["--host", HOST, "--port", str(node.port), "--redis", url]
            args += ["--node-id", node.node_id, "--presence-ttl", f"{self.ttl:g}"]
            args += ["--max-connections-per-ip", "0", "--send-queue", str(self.send_queue)]
            args += ["--log-level", "warning"]
            node.proc = self.children.spawn(name, args)
        deadline = time.monotonic() + 20
        while not tcp_answers(node.port):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"node {node.k} ({node.transport}) did not listen")
            time.sleep(0.05)
        node.up = True

    def kill_node(self, node: Node) -> None:
        node.up = False
        if node.proc is not None:
            self.children.kill(node.proc)
            node.proc = None

    async def online(self, timeout: float = 45.0) -> None:
        """Until every node that is up says it is connected to Redis."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while node.up:
                if (await metrics(node.port)).get("roombus_backplane_online") == 1:
                    break
                if time.monotonic() > deadline:
                    raise RunFailed(f"node {node.k} not back on Redis within {timeout:g} s")
                await asyncio.sleep(0.1)

    async def totals(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for node in self.nodes:
            if node.up:
                for key, value in (await metrics(node.port)).items():
                    if key.startswith("roombus_") and key.endswith("_total") and "{" not in key:
                        out[key.removeprefix("roombus_")] += value
        return dict(out)


@dataclass
class Outage:
    """
    A node off Redis, as its ``/metrics`` (``roombus_backplane_online``) showed it, with
    the uncertainty of polling: it began after ``start_lo`` (when the last read that
    found it online was sent) and by ``start_hi`` (when the first that found it offline
    came back); it ended after ``end_lo`` (the last read that found it offline was
    sent) and by ``end_hi`` (the first that found it online again came back; INF: not
    seen back). ``killed``: its process was killed (``kill -9``) and started again.
    """

    start_lo: float
    start_hi: float
    end_lo: float
    end_hi: float = INF
    killed: bool = False


class Link:
    """One node's Redis link through the run: its outages, from reads of its /metrics."""

    def __init__(self) -> None:
        self.outages: list[Outage] = []
        self.online_sent = 0.0  # when the last read that found it online was sent
        self.failures: float | None = None  # roombus_redis_failures_total then
        self.open: Outage | None = None

    def observe(self, sent: float, got: float, online: bool, failures: float | None) -> None:
        """A read of /metrics sent at *sent*, answered at *got*."""
        if not online:
            if self.open is None:
                self.open = Outage(self.online_sent, got, sent)
                self.outages.append(self.open)
            self.open.end_lo = max(self.open.end_lo, sent)
            return
        if self.open is not None:
            self.open.end_hi = got
            self.open = None
        elif failures is not None and self.failures is not None and failures > self.failures:
            # Lost and back between two reads: its count of lost connections moved.
            self.outages.append(Outage(self.online_sent, got, self.online_sent, got))
        self.online_sent = sent
        self.failures = failures

    def kill(self, t: float) -> None:
        """Its process was killed at *t* (it is offline until a read finds it online)."""
        if self.open is None:
            self.open = Outage(t, t, t)
            self.outages.append(self.open)
        self.open.killed = True
        self.open.end_lo = max(self.open.end_lo, t)
        self.failures = None  # a new process counts from 0


# ---------------------------------------------------------------------------------------
# the Redis link proxy (a process of its own: python3 benchmarks/chaos.py --proxy L T)


async def proxy_main(listen: int, target: int) -> None:
    loop = asyncio.get_running_loop()
    state = {"refusing": False}
    writers: set[asyncio.StreamWriter] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if state["refusing"]:
            cw.transport.abort()
            return
        try:
            rr, rw = await asyncio.open_connection(HOST, target)
        except OSError:
            cw.transport.abort()
            return
        writers.update((cw, rw))
        try:
            await asyncio.gather(pipe(cr, rw), pipe(rr, cw))
        finally:
            writers.difference_update((cw, rw))

    def drop() -> None:
        state["refusing"] = True
        for w in list(writers):
            w.transport.abort()

    def accept() -> None:
        state["refusing"] = False

    loop.add_signal_handler(signal.SIGUSR1, drop)
    loop.add_signal_handler(signal.SIGUSR2, accept)
    server = await asyncio.start_server(handle, HOST, listen, reuse_address=True)
    parent = os.getppid()
    async with server:
        while os.getppid() == parent:  # noqa: ASYNC110 (the parent died: stop)
            await asyncio.sleep(1.0)


# ---------------------------------------------------------------------------------------
# the clients


@dataclass
class Pub:
    room: str
    t: float
    user: str
    epoch: str | None = None
    seq: int | None = None
    failed: str | None = None


@dataclass
class Peer:
    i: int
    name: str
    rooms: list[str]
    home: int
    mortal: bool
    slow_capable: bool
    rng: random.Random
    logs: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    slow: bool = False
    node: int | None = None
    nodes: list[tuple[float, int]] = field(default_factory=list)  # (since, node it dialed)
    died: bool = False  # killed with its node (else it left cleanly, or lived on)
    task: asyncio.Task[None] | None = None
    client: Any = None
    born: float = 0.0
    ended: float | None = None  # when it died or left (None: alive at the end)
    impaired: list[list[float]] = field(default_factory=list)  # [start, end] of episodes
    away: list[list[float]] = field(default_factory=list)  # stalled or reconnecting
    shown: dict[str, frozenset[str]] = field(default_factory=dict)
    next_n: int = 0
    connected_since: float | None = None
    errors: list[str] = field(default_factory=list)
    seen: list[tuple[Any, ...]] = field(default_factory=list)  # presence changes (--dump)


class StallableReader(asyncio.StreamReader):
    """A socket's reader that reads only while *gate* is set (a client that stops reading)."""

    def __init__(self, inner: asyncio.StreamReader, gate: asyncio.Event) -> None:
        super().__init__()
        self._inner = inner
        self._gate = gate

    async def read(self, n: int = -1) -> bytes:
        await self._gate.wait()
        return await self._inner.read(n)


@dataclass
class Ghost:
    observer: str
    room: str
    user: str
    start: float
    end: float | None
    healthy: bool  # the departure happened with Redis and every link fine
    impaired: bool  # the observer was slow, stalled or reconnecting meanwhile
    still_shown: bool = False
    bound: float = INF  # when it had to be gone by (presence_bound)


@dataclass
class Absence:
    """
    A live user (not departed) missing from an observer's presence of a room: a
    ``leave``, or not in a ``presence_state`` (the observer joined again), until it is
    back on that screen (a ``join``, or in a later state), the user departs, the
    observer does, or the run ends.
    """

    observer: str
    room: str
    user: str
    start: float
    via: str  # "leave" or "state"
    end: float | None = None
    back: bool = False  # it came back on the observer's screen
    cause: str = ""  # ABSENCE_CAUSES


class Harness:
    def __init__(self, a: argparse.Namespace, cluster: Cluster) -> None:
        self.a = a
        self.cluster = cluster
        self.rng = random.Random(a.seed)
        self.rooms = [f"chaos-{r}" for r in range(a.rooms)]
        self.peers: list[Peer] = []
        self.pubs: dict[str, Pub] = {}
        self.pending: set[asyncio.Task[None]] = set()
        self.publishing = True
        self.t0 = time.monotonic()
        self.gone: dict[str, tuple[float, bool]] = {}  # user -> (when, in a healthy cluster)
        self.ghosts: dict[tuple[str, str, str], Ghost] = {}
        self.closed_ghosts: list[Ghost] = []
        self.absences: dict[tuple[str, str, str], Absence] = {}  # (observer, room, user)
        self.closed_absences: list[Absence] = []
        self.links = [Link() for _ in cluster.nodes]
        self.cuts: dict[int, list[list[float]]] = defaultdict(list)  # node: [start, end]
        self.unhealthy: list[list[float]] = []  # [start, end] of cluster faults (Redis side)
        self.faults: list[dict[str, Any]] = []
        self.lag: list[float] = []
        self.rate = a.rate / a.clients
        self.unacked_at_end = 0
        self.t_end = 0.0
        self.metrics: dict[str, float] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- peers ----------------------------------------------------------------------------

    def new_peer(self) -> Peer:
        i = len(self.peers)
        rng = random.Random(f"{self.a.seed}-{i}")
        peer = Peer(
            i=i,
            name=f"u{i}",
            rooms=rng.sample(self.rooms, 2),
            home=i % len(self.cluster.nodes),
            mortal=rng.random() < MORTAL_SHARE,
            slow_capable=rng.random() < SLOW_SHARE,
            rng=rng,
        )
        peer.reading.set()
        peer.logs = {room: [] for room in peer.rooms}
        peer.born = self.now()
        self.peers.append(peer)
        peer.task = asyncio.create_task(self.run_peer(peer))
        return peer

    def live_peers(self) -> list[Peer]:
        return [p for p in self.peers if p.ended is None]

    async def run_peer(self, peer: Peer) -> None:
        import roombus.client as rc

        nodes = self.cluster.nodes

        async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            others = [k for k in range(len(nodes)) if k != peer.home]
            peer.rng.shuffle(others)
            for k in [peer.home, *others]:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, nodes[k].port), 3.0
                    )
                except (OSError, asyncio.TimeoutError, TimeoutError):
                    continue
                peer.node = k
                peer.nodes.append((self.now(), k))
                return StallableReader(reader, peer.reading), writer
            raise OSError("no node answers")

        options = rc.ClientOptions(
            max_events=SLOW_MAX_EVENTS if peer.slow_capable else 1024,
        )
        url = f"ws://{HOST}:{nodes[peer.home].port}/ws"
        publisher: asyncio.Task[None] | None = None
        try:
            async with rc.connect(
                url,
                peer.rooms,
                username=peer.name,
                options=options,
                stream_factory=dial,
                rng=random.Random(f"{self.a.seed}-c{peer.i}"),
            ) as client:
                peer.client = client
                publisher = asyncio.create_task(self.publisher(peer, client))
                async for event in client:
                    self.on_event(peer, event, rc)
                    if peer.slow:
                        await asyncio.sleep(SLOW_DELAY)
        finally:
            if publisher is not None:
                publisher.cancel()

    def on_event(self, peer: Peer, ev: Any, rc: Any) -> None:
        t = self.now()
        if isinstance(ev, rc.Message):
            content = ev.content
            key = content.get("k") if isinstance(content, dict) else None
            peer.logs[ev.room].append(("M", t, ev.epoch, ev.seq, key))
        elif isinstance(ev, rc.Joined):
            lost = (ev.lost.first, ev.lost.last) if ev.lost else None
            skipped = (ev.skipped.first, ev.skipped.last) if ev.skipped else None
            entry = ("J", t, ev.epoch, ev.seq, ev.recovered, lost, skipped, ev.reason)
            peer.logs[ev.room].append(entry)
            if peer.connected_since is not None and all(
                any(e[0] == "J" and e[1] >= peer.connected_since for e in peer.logs[r])
                for r in peer.rooms
            ):
                peer.impaired.append([peer.connected_since, t])
                peer.away.append([peer.connected_since, t])
                peer.connected_since = None
        elif isinstance(ev, rc.Reset):
            peer.logs[ev.room].append(("R", t, ev.epoch, ev.seq, ev.reason))
        elif isinstance(ev, rc.Gap):
            peer.logs[ev.room].append(("G", t, ev.first, ev.last))
        elif isinstance(ev, rc.Presence):
            self.on_presence(peer, ev.room, ev.users, t, ev.event)
        elif isinstance(ev, (rc.Disconnected, rc.Connecting)):
            if peer.connected_since is None:
                peer.connected_since = t
            if isinstance(ev, rc.Disconnected) and ev.final:
                peer.errors.append(f"final disconnect: {ev.code} {ev.reason} {ev.status}")
        elif isinstance(ev, (rc.JoinRefused, rc.ServerError)):
            peer.errors.append(repr(ev))

    # -- publishing -----------------------------------------------------------------------

    async def publisher(self, peer: Peer, client: Any) -> None:
        while True:
            await asyncio.sleep(peer.rng.expovariate(self.rate))
            if not self.publishing or peer.ended is not None:
                continue
            room = peer.rng.choice(peer.rooms)
            key = f"{peer.name}:{peer.next_n}"
            peer.next_n += 1
            task = asyncio.create_task(self.publish(client, peer, room, key))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def publish(self, client: Any, peer: Peer, room: str, key: str) -> None:
        import roombus.client as rc

        pub = Pub(room, self.now(), peer.name)
        try:
            pos = await client.publish(room, {"k": key})
        except rc.OutboxFull:
            return  # never sent
        except (rc.PublishError, rc.ClientClosed) as exc:
            pub.failed = type(exc).__name__ + ": " + str(exc)
            self.pubs[key] = pub
            return
        pub.epoch, pub.seq = pos.epoch, pos.seq
        self.pubs[key] = pub

    # -- presence -------------------------------------------------------------------------

    def on_presence(
        self, peer: Peer, room: str, users: frozenset[str], t: float, via: str = "leave"
    ) -> None:
        before = peer.shown.get(room, frozenset())
        if self.a.dump:
            peer.seen.append((t, room, peer.node, sorted(before ^ users), len(users)))
        peer.shown[room] = users
        for user in before - users:
            ghost = self.ghosts.pop((peer.name, room, user), None)
            if ghost is not None:
                ghost.end = t
                self.closed_ghosts.append(ghost)
            elif user not in self.gone and user != peer.name:
                key = (peer.name, room, user)
                self.absences.setdefault(key, Absence(peer.name, room, user, t, via))
        for user in users - before:
            absence = self.absences.pop((peer.name, room, user), None)
            if absence is not None:
                absence.end, absence.back = t, True
                self.closed_absences.append(absence)
            if user in self.gone and (peer.name, room, user) not in self.ghosts:
                healthy = self.gone[user][1]
                self.ghosts[(peer.name, room, user)] = Ghost(
                    peer.name, room, user, t, None, healthy, False
                )

    def depart(self, peer: Peer, t: float) -> None:
        """*peer* is gone for good at *t*: whoever still shows it is seeing a ghost."""
        peer.ended = t
        for key in [k for k in self.ghosts if k[0] == peer.name]:
            del self.ghosts[key]  # what a departed client still showed does not matter
        for key in [k for k in self.absences if peer.name in (k[0], k[2])]:
            absence = self.absences.pop(key)  # it left, or the observer did
            absence.end = t
            self.closed_absences.append(absence)
        healthy = not self.cluster_fault_near(t)
        self.gone[peer.name] = (t, healthy)
        for obs in self.live_peers():
            if obs is peer:
                continue
            for room, users in obs.shown.items():
                if peer.name in users:
                    self.ghosts[(obs.name, room, peer.name)] = Ghost(
                        obs.name, room, peer.name, t, None, healthy, False
                    )

    def cluster_fault_near(self, t: float) -> bool:
        """Whether a departure at *t* may see Redis or a link fail within its TTL."""
        ttl = self.a.presence_ttl
        return any(s - ttl - 1 <= t <= (e or INF) + ttl / 3 + 2 for s, e in self.unhealthy)

    async def leave(self, peer: Peer) -> None:
        """A clean departure: the client closes (the node says goodbye)."""
        self.depart(peer, self.now())
        if peer.task is not None:
            peer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await peer.task

    # -- faults ---------------------------------------------------------------------------

    def fault(self, kind: str, **info: Any) -> dict[str, Any]:
        rec = {"kind": kind, "t": round(self.now(), 1), **info}
        self.faults.append(rec)
        log(f"t={rec['t']:6.1f} fault {kind} {info}")
        return rec

    async def node_kill(self, rng: random.Random) -> None:
        up = [n for n in self.cluster.nodes if n.up]
        node = rng.choice(up)
        down = rng.uniform(1, 5)
        same_id = rng.random() < 0.5
        rec = self.fault("node-kill", node=node.k, transport=node.transport, down_s=round(down, 1))
        victims = [p for p in self.live_peers() if p.node == node.k and p.mortal]
        self.cluster.kill_node(node)
        t = self.now()
        self.links[node.k].kill(t)
        for peer in victims:  # they die with their node: no goodbye, no reconnect
            peer.died = True
            self.depart(peer, t)
            if peer.task is not None:
                peer.task.cancel()
        rec["mortal_clients"] = len(victims)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.cluster.start_node, node, same_id)
        rec["same_id"] = same_id
        await self.cluster.online()
        for _ in victims:
            self.new_peer()

    async def redis_stop(self, rng: random.Random) -> None:
        d = rng.uniform(*self.a.redis_stop)
        self.fault("redis-stop", seconds=round(d, 1))
        span = [self.now(), 0.0]
        self.unhealthy.append(span)
        proc = self.cluster.redis.proc
        assert proc is not None
        self.cluster.children.signal(proc, signal.SIGSTOP)
        try:
            await asyncio.sleep(d)
        finally:
            self.cluster.children.signal(proc, signal.SIGCONT)
        await self.cluster.online()
        span[1] = self.now()

    async def redis_restart(self, rng: random.Random, keep: bool) -> None:
        down = rng.uniform(0.5, 3)
        self.fault(
            "redis-restart-persist" if keep else "redis-restart-empty", down_s=round(down, 1)
        )
        span = [self.now(), 0.0]
        self.unhealthy.append(span)
        redis = self.cluster.redis
        redis.kill9()
        if not keep:
            redis.wipe()
        await asyncio.sleep(down)
        await asyncio.to_thread(redis.start)
        await self.cluster.online()
        span[1] = self.now()

    async def link(self, rng: random.Random, stall: bool) -> None:
        node = rng.choice([n for n in self.cluster.nodes if n.up])
        d = rng.uniform(8, 20) if stall else rng.uniform(2, 10)
        if self.a.short:
            d = rng.uniform(8, 11) if stall else rng.uniform(2, 5)
        self.fault("link-stall" if stall else "link-drop", node=node.k, seconds=round(d, 1))
        span = [self.now(), 0.0]
        self.unhealthy.append(span)
        cut = [self.now(), INF]
        self.cuts[node.k].append(cut)
        ch = self.cluster.children
        ch.signal(node.proxy, signal.SIGSTOP if stall else signal.SIGUSR1)
        try:
            await asyncio.sleep(d)
        finally:
            ch.signal(node.proxy, signal.SIGCONT if stall else signal.SIGUSR2)
            cut[1] = self.now()
        await self.cluster.online()
        span[1] = self.now()

    async def client_fault(self, rng: random.Random, slow: bool) -> None:
        if slow:
            pool = [p for p in self.live_peers() if p.slow_capable and not p.slow]
            d = rng.uniform(5, 15)
        else:
            pool = [p for p in self.live_peers() if p.reading.is_set() and not p.slow]
            d = rng.uniform(8, 25)
        chosen = rng.sample(pool, min(len(pool), max(1, len(self.live_peers()) // 25)))
        self.fault(
            "slow-clients" if slow else "stalled-clients",
            clients=len(chosen),
            seconds=round(d, 1),
        )
        t = self.now()
        for p in chosen:
            if slow:
                p.slow = True
            else:
                p.reading.clear()
        await asyncio.sleep(d)
        for p in chosen:
            p.slow = False
            p.reading.set()
            p.impaired.append([t, self.now() + 5])
            if not slow:  # its node may have ended its connection meanwhile
                p.away.append([t, self.now()])

    def schedule(self) -> tuple[list[str], list[tuple[float, str]]]:
        """The cluster faults in order, and the client faults' times: from the seed alone."""
        rng = random.Random(f"{self.a.seed}-schedule")
        required = [
            "node-kill",
            "node-kill",
            "redis-stop",
            "redis-restart-empty",
            "redis-restart-persist",
            "link-stall",
            "link-drop",
        ]
        rng.shuffle(required)
        kinds = [*required]
        if not self.a.short:
            while len(kinds) < 1000:
                kinds.append(rng.choice(required))
        span = self.a.duration - 10
        n_client = 4 if self.a.short else max(4, int(self.a.duration / 20))
        client = sorted(
            (5 + rng.uniform(0, span - 20), "slow-clients" if k % 2 else "stalled-clients")
            for k in range(n_client)
        )
        return kinds, client

    async def cluster_faults(self, kinds: list[str], stop_at: float) -> None:
        rng = random.Random(f"{self.a.seed}-faults")
        await asyncio.sleep(self.a.warmup)
        for kind in kinds:
            if self.now() > stop_at:
                break
            if kind == "node-kill":
                await self.node_kill(rng)
            elif kind == "redis-stop":
                await self.redis_stop(rng)
            elif kind.startswith("redis-restart"):
                await self.redis_restart(rng, keep=kind.endswith("persist"))
            else:
                await self.link(rng, stall=kind == "link-stall")
            pause = rng.uniform(*self.a.gap)
            if kind == "node-kill":  # time its clients' departures in a healthy cluster
                pause += self.a.presence_ttl + 2
            await asyncio.sleep(pause)

    async def client_faults(self, times: list[tuple[float, str]]) -> None:
        rng = random.Random(f"{self.a.seed}-clients")
        running: list[asyncio.Task[None]] = []
        for at, kind in times:
            await asyncio.sleep(max(0.0, at - self.now()))
            running.append(asyncio.create_task(self.client_fault(rng, kind == "slow-clients")))
        await asyncio.gather(*running)

    async def churn(self, stop_at: float) -> None:
        rng = random.Random(f"{self.a.seed}-churn")
        while self.now() < stop_at:
            await asyncio.sleep(rng.uniform(3, 8))
            pool = [p for p in self.live_peers() if not p.slow and p.reading.is_set()]
            if pool:
                await self.leave(rng.choice(pool))
                self.new_peer()

    async def watch_link(self, node: Node) -> None:
        """Read *node*'s /metrics every LINK_POLL s: when is it on Redis."""
        link = self.links[node.k]
        while True:
            sent = self.now()
            if node.up:
                values = await metrics(node.port, timeout=1.0)
                online = values.get("roombus_backplane_online")
                # Not answered (busy, or killed meanwhile): nothing learned.
                if online is not None and node.up:
                    failures = values.get("roombus_redis_failures_total")
                    link.observe(sent, self.now(), online == 1, failures)
            else:
                link.observe(sent, sent, False, None)
            await asyncio.sleep(LINK_POLL)

    async def watch_lag(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.1)
            self.lag.append(time.monotonic() - t - 0.1)

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> None:
        a = self.a
        lag = asyncio.create_task(self.watch_lag())
        watchers = [asyncio.create_task(self.watch_link(n)) for n in self.cluster.nodes]
        for _ in range(a.clients):
            self.new_peer()
            await asyncio.sleep(a.ramp / a.clients)
        await wait_until(
            lambda: all(all(p.logs[r] for r in p.rooms) for p in self.live_peers()),
            60,
            "every client joined",
        )
        log(f"t={self.now():6.1f} {len(self.peers)} clients joined; chaos for {a.duration:g} s")
        kinds, client_times = self.schedule()
        start = self.now()
        for i, (at, kind) in enumerate(client_times):
            client_times[i] = (start + at, kind)
        stop_at = start + a.duration - a.tail
        jobs = [
            asyncio.create_task(self.cluster_faults(kinds, stop_at)),
            asyncio.create_task(self.client_faults(client_times)),
            asyncio.create_task(self.churn(stop_at)),
        ]
        await asyncio.gather(*jobs)
        await asyncio.sleep(max(0.0, start + a.duration - self.now()))
        self.publishing = False
        log(f"t={self.now():6.1f} publishing stopped; draining")
        await self.cluster.online()
        for p in self.live_peers():
            p.slow = False
            p.reading.set()
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.pending, return_exceptions=True), 60)
        self.unacked_at_end = len(self.pending)
        # A last message per room: every live client must get it (it has caught up).
        for room in self.rooms:
            peer = next(p for p in self.live_peers() if room in p.rooms)
            key = f"marker:{room}"
            task = asyncio.create_task(self.publish(peer.client, peer, room, key))
            await asyncio.wait_for(task, 30)

        def caught_up() -> bool:
            return all(
                any(e[0] == "M" and e[4] == f"marker:{r}" for e in p.logs[r])
                for p in self.live_peers()
                for r in p.rooms
            )

        with contextlib.suppress(RunFailed):
            await wait_until(caught_up, 45, "every client got the last message")
        self.t_end = self.now()
        self.metrics = await self.cluster.totals()
        log(f"t={self.t_end:6.1f} done; closing the clients")
        lag.cancel()
        for w in watchers:
            w.cancel()
        for p in self.live_peers():
            if p.task is not None:
                p.task.cancel()
        await asyncio.gather(*(p.task for p in self.peers if p.task), return_exceptions=True)


# ---------------------------------------------------------------------------------------
# the accounting


def is_cluster_epoch(epoch: str) -> bool:
    return epoch.startswith("R") and epoch[1:].isdigit()


@dataclass
class Track:
    """One receiver's view of one room, replayed from what it was handed."""

    told: dict[str, list[list[Any]]] = field(default_factory=lambda: defaultdict(list))
    silent: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    before: dict[str, int] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)
    got: Counter[str] = field(default_factory=Counter)
    got_at: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    pos: tuple[str, int] | None = None
    first_t: float = INF
    anomalies: list[str] = field(default_factory=list)
    stepbacks: int = 0
    gaps: int = 0
    cut_off: list[list[float]] = field(default_factory=list)  # [from, to]: in its node's epoch

    def replay(self, entries: list[tuple[Any, ...]]) -> None:
        for e in entries:
            kind = e[0]
            if kind == "M":
                _, _t, epoch, seq, key = e
                if key is not None:
                    self.got[key] += 1
                    self.got_at[key].append((epoch, seq))
                if self.pos is None or epoch != self.pos[0] or seq is None:
                    self.anomalies.append(f"chat {e} at {self.pos}")
                    continue
                if seq > self.pos[1] + 1:
                    self.silent[epoch].append((self.pos[1] + 1, seq - 1))
                elif seq <= self.pos[1]:
                    self.anomalies.append(f"chat {e} not after {self.pos}")
                self.pos = (epoch, seq)
            elif kind == "G":
                self.gaps += 1
            elif kind == "J":
                _, t, epoch, seq, recovered, lost, skipped, reason = e
                self.first_t = min(self.first_t, t)
                if recovered is True and self.pos is not None and self.pos[0] == epoch:
                    continue
                floor = max((s[1] for s in (lost, skipped) if s is not None), default=seq)
                self.move((epoch, min(floor, seq)), f"joined {reason}", t)
            elif kind == "R":
                _, t, epoch, seq, reason = e
                self.move((epoch, seq), f"reset {reason}", t)

    def move(self, new: tuple[str, int], reason: str, t: float) -> None:
        old = self.pos
        if old is not None and not is_cluster_epoch(old[0]) and self.cut_off:
            self.cut_off[-1][1] = t
        if not is_cluster_epoch(new[0]) and (old is None or is_cluster_epoch(old[0])):
            self.cut_off.append([t, INF])
        self.pos = new
        epoch, seq = new
        if old is None:
            self.before[epoch] = seq
        elif old[0] == epoch:
            if seq > old[1]:
                self.told[epoch].append([old[1] + 1, seq, reason])
            elif seq < old[1]:
                self.stepbacks += 1
        else:
            self.told[old[0]].append([old[1] + 1, INF, reason])
            if epoch in self.held:
                for rng in self.told[epoch]:
                    if rng[1] == INF:
                        rng[1] = max(seq, rng[0] - 1)  # (left, back]: maybe empty
                        if seq < rng[0] - 1:
                            self.stepbacks += 1  # back into it, below where it left
            else:
                self.told[epoch].append([1, seq, reason])
        self.held.add(epoch)


@dataclass
class Message:
    key: str
    room: str
    t: float
    positions: set[tuple[str, int]]


def classify(
    msg: Message, tr: Track, ended: float | None, caught_up: bool
) -> tuple[str, str | None]:
    """(category, detail) of *msg* for the receiver of *tr* (not delivered to it)."""
    if msg.t < tr.first_t:
        return "before", None
    if ended is not None and msg.t >= ended:
        return "after", None
    found: list[tuple[str, str | None]] = []
    clusters = [int(e[1:]) for e in tr.held if is_cluster_epoch(e)]
    for epoch, seq in msg.positions:
        if epoch in tr.held:
            if any(a <= seq <= b for a, b in tr.silent[epoch]):
                found.append(("silent", "a seq passed untold"))
            elif told := [r for r in tr.told[epoch] if r[0] <= seq <= r[1]]:
                found.append(("told", told[0][2]))
            elif seq <= tr.before.get(epoch, 0):
                found.append(("before", None))
            elif tr.pos is not None and epoch == tr.pos[0] and seq > tr.pos[1]:
                if ended is not None:
                    found.append(("after", None))
                else:
                    detail = "not caught up at the end" if not caught_up else "never delivered"
                    found.append(("silent", detail))
            else:
                found.append(("silent", "unexplained"))
        elif not is_cluster_epoch(epoch):
            if any(a <= msg.t <= b for a, b in tr.cut_off):
                found.append(("local", "told"))  # its own node was cut off too then
            else:
                found.append(("local", "untold"))
        elif any(c > int(epoch[1:]) for c in clusters):
            found.append(("told", "an epoch it moved past"))
        elif ended is not None:
            found.append(("after", None))
        else:
            found.append(("silent", "an epoch it never reached"))
    order = ["silent", "told", "local", "after", "before"]
    found.sort(key=lambda f: order.index(f[0]))
    return found[0] if found else ("before", None)


def republished(msg: Message, got: list[tuple[str, int]], pub: Pub | None) -> bool:
    """
    Whether a receiver's copies of *msg* are one publish made twice because its first ack
    never reached the publisher: the copies are in different epochs, and the ack the
    publisher did get names the last of them (its resend, published again in a new
    epoch: roombus keeps acknowledgements per epoch).
    """
    if pub is None or pub.epoch is None or len({e for e, _ in got}) != len(got):
        return False
    return (pub.epoch, pub.seq) == got[-1]


# -- presence -----------------------------------------------------------------------------

#: Why a live user was missing from an observer's screen (Absence.cause), in the order
#: they are looked for: the user's own connection had ended, or may have (it was
#: reconnecting or stalled: not a live user then); its node was partitioned (its own Redis link
#: cut while Redis ran, long enough for its entries to expire); its node came back on
#: Redis more than a TTL after the observer's; none of these: a flicker.
ABSENCE_CAUSES = ("user", "partition", "late node", "flicker")


@dataclass
class Client:
    """What the presence accounting knows of one client."""

    impaired: list[tuple[float, float]]  # slow, stalled, reconnecting: [start, end]
    nodes: list[tuple[float, int]]  # (since, the node it dialed)
    ended: float | None = None  # when it left or died
    died: bool = False  # killed with its node
    away: list[tuple[float, float]] = field(default_factory=list)  # stalled, reconnecting


@dataclass
class World:
    """The presence accounting's input: the clients, the nodes' outages, the link cuts."""

    ttl: float
    clients: dict[str, Client]
    outages: dict[int, list[Outage]]
    cuts: dict[int, list[tuple[float, float]]]  # a node's own link stalled or dropped
    t_end: float


def node_at(nodes: list[tuple[float, int]], t: float) -> int | None:
    """The node a client was on (or dialing last) at *t*."""
    at = None
    for since, k in nodes:
        if since > t:
            break
        at = k
    return at


def nodes_between(nodes: list[tuple[float, int]], a: float, b: float) -> set[int]:
    """The nodes a client was on at some time in [a, b]."""
    out = {k for since, k in nodes if a < since <= b}
    first = node_at(nodes, a)
    if first is not None:
        out.add(first)
    return out


def presence_bound(departed: float, ttl: float, outages: list[Outage]) -> float:
    """
    When a departure at *departed* must be gone from a screen, given the *outages* of
    the departed user's node and of the observer's: a TTL after the latest of the
    departure and the end (the node seen back on Redis) of every outage that began
    before that time, i.e. that the departure's news may have met.
    """
    bound = departed + ttl
    for o in sorted(outages, key=lambda o: o.start_lo):
        if o.start_lo > bound:
            break
        bound = max(bound, o.end_hi + ttl)
    return bound


def ghost_bound(g: Ghost, departed: float, w: World) -> float:
    """*g*'s bound: from its user's node (unless killed with it) and the observer's."""
    user, obs = w.clients[g.user], w.clients[g.observer]
    outages: list[Outage] = []
    if not user.died:
        # A node killed after the departure does not come back for it: its entry
        # expires (within the TTL), unless the observer's node holds expiries back.
        k = node_at(user.nodes, departed)
        outages += [o for o in w.outages.get(k, []) if not o.killed] if k is not None else []
    k = node_at(obs.nodes, g.end if g.end is not None else w.t_end)
    outages += w.outages.get(k, []) if k is not None else []
    return presence_bound(departed, w.ttl, outages)


def cut_off(w: World, k: int) -> list[tuple[float, float]]:
    """[start, back] of node *k*'s own link cuts: back, when it was first seen on Redis."""
    out = []
    for start, end in w.cuts.get(k, []):
        back = end
        for o in w.outages.get(k, []):
            if o.start_lo <= end and o.end_hi >= start:
                back = max(back, o.end_hi)
        out.append((start, back))
    return out


def absence_cause(a: Absence, w: World) -> str:
    """Why *a*'s user was missing from its observer's screen (ABSENCE_CAUSES)."""
    obs, user = w.clients[a.observer], w.clients[a.user]
    # The leave (or the state without the user) was sent by the observer's node in
    # [lo, hi]: at hi, when it was read, or earlier if the observer was slow, stalled
    # or reconnecting then (as early as that episode's start).
    hi = a.start
    lo = min((s for s, e in obs.impaired if s <= hi <= e), default=hi)
    slack, ttl = GHOST_SLACK, w.ttl
    if any(s - slack <= hi and lo <= e + slack for s, e in user.away):
        return "user"
    user_nodes = nodes_between(user.nodes, lo - ttl - slack, hi)
    for k in user_nodes:
        for start, back in cut_off(w, k):
            # Its entries can expire a third of a TTL after its last refresh at the
            # soonest; the others see its users leave then, and join when it is back.
            if back - start > ttl / 3 and start <= hi and lo <= back + ttl + slack:
                return "partition"
    obs_nodes = nodes_between(obs.nodes, lo, hi)
    for k in user_nodes:
        for j in obs_nodes - {k}:
            for ou in w.outages.get(k, []):
                for oo in w.outages.get(j, []):
                    # The observer's node settles a TTL after it is back; the user's
                    # node, later still, announces its users when it is.
                    overlap = ou.start_lo <= oo.end_hi and oo.start_lo <= ou.end_hi
                    late = ou.end_hi - oo.end_lo > ttl
                    if overlap and late and oo.end_lo <= hi and lo <= ou.end_hi + ttl + slack:
                        return "late node"
    return "flicker"


def world(h: Harness) -> World:
    clients = {}
    for p in h.peers:
        impaired = [(s, e) for s, e in p.impaired]
        away = [(s, e) for s, e in p.away]
        if p.connected_since is not None:  # reconnecting at the end
            impaired.append((p.connected_since, INF))
            away.append((p.connected_since, INF))
        clients[p.name] = Client(impaired, p.nodes, p.ended, p.died, away)
    return World(
        h.a.presence_ttl,
        clients,
        {k: link.outages for k, link in enumerate(h.links)},
        {k: [(s, e) for s, e in cuts] for k, cuts in h.cuts.items()},
        h.t_end,
    )


def account(h: Harness) -> dict[str, Any]:
    messages: dict[str, Message] = {}
    by_pos: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    for key, pub in h.pubs.items():
        msg = messages[key] = Message(key, pub.room, pub.t, set())
        if pub.epoch is not None and pub.seq is not None:
            msg.positions.add((pub.epoch, pub.seq))
    tracks: dict[tuple[int, str], Track] = {}
    for p in h.peers:
        for room, entries in p.logs.items():
            tr = tracks[(p.i, room)] = Track()
            tr.replay(entries)
            for e in entries:
                if e[0] == "M" and e[4] is not None:
                    key = e[4]
                    seen = messages.get(key)
                    if seen is None:  # never acked, but delivered: it was published
                        seen = messages[key] = Message(key, room, e[1], set())
                    seen.t = min(seen.t, e[1])
                    seen.positions.add((e[2], e[3]))
    conflicts: list[str] = []
    for msg in messages.values():
        epochs = Counter(epoch for epoch, _ in msg.positions)
        if any(n > 1 for n in epochs.values()):
            conflicts.append(f"{msg.key} at {sorted(msg.positions)}")
        for epoch, seq in msg.positions:
            by_pos[(msg.room, epoch, seq)].add(msg.key)
    conflicts += [f"{k} holds {sorted(v)}" for k, v in by_pos.items() if len(v) > 1]
    per_room: dict[str, list[Message]] = defaultdict(list)
    for msg in messages.values():
        per_room[msg.room].append(msg)
    counts: Counter[str] = Counter()
    told_why: Counter[str] = Counter()
    silent_why: Counter[str] = Counter()
    examples: list[str] = []
    dup_examples: list[str] = []
    anomalies: list[str] = []
    stepbacks = gaps = 0
    for p in h.peers:
        for room in p.rooms:
            tr = tracks[(p.i, room)]
            anomalies += [f"{p.name} {room}: {x}" for x in tr.anomalies[:3]]
            stepbacks += tr.stepbacks
            gaps += tr.gaps
            caught = any(e[0] == "M" and e[4] == f"marker:{room}" for e in p.logs[room])
            for msg in per_room[room]:
                n = tr.got[msg.key]
                if n == 1:
                    counts["once"] += 1
                elif n > 1:
                    counts["duplicated"] += 1
                    if republished(msg, tr.got_at[msg.key], h.pubs.get(msg.key)):
                        counts["republished"] += 1
                    elif len(dup_examples) < 10:
                        dup_examples.append(
                            f"{p.name} in {room}: {msg.key} at {tr.got_at[msg.key]}"
                        )
                else:
                    cat, detail = classify(msg, tr, p.ended, caught)
                    counts[cat] += 1
                    if cat == "local":
                        counts[f"local {detail}"] += 1
                    if cat == "told":
                        told_why[detail or ""] += 1
                    elif cat == "silent":
                        silent_why[detail or ""] += 1
                        if len(examples) < 10:
                            examples.append(
                                f"{p.name} in {room}: {msg.key} at {sorted(msg.positions)} "
                                f"(t={msg.t:.1f}): {detail}; held {sorted(tr.held)}, "
                                f"told {dict(tr.told)}, at {tr.pos}"
                            )
    owed = counts["once"] + counts["duplicated"] + counts["told"] + counts["silent"]
    acked = sum(1 for q in h.pubs.values() if q.epoch is not None)
    local_acked = sum(
        1 for q in h.pubs.values() if q.epoch is not None and not is_cluster_epoch(q.epoch)
    )
    # presence ghosts
    t_end = h.t_end
    ghosts = list(h.closed_ghosts)
    for g in h.ghosts.values():
        g.end, g.still_shown = t_end, True
        ghosts.append(g)
    w = world(h)
    for g in ghosts:
        departed = h.gone[g.user][0]
        g.healthy = not h.cluster_fault_near(departed)
        obs = w.clients[g.observer]
        end = g.end if g.end is not None else t_end
        # Excused only if the observer's own view may be stale when the ghost is
        # measured: it was slow, stalled or reconnecting then, or gone itself.
        g.impaired = any(s <= end <= e for s, e in obs.impaired) or (
            obs.ended is not None and obs.ended <= end
        )
        g.bound = ghost_bound(g, departed, w)
    timed = [g for g in ghosts if not g.impaired]
    counted = [g for g in timed if g.healthy]
    in_outages = [g for g in timed if not g.healthy]
    limit = h.a.presence_ttl + GHOST_SLACK
    durations = [(g.end or t_end) - g.start for g in counted]
    over = [g for g in counted if (g.end or t_end) - g.start > limit]
    excess = {id(g): (g.end or t_end) - g.bound for g in timed}
    over_bound = [g for g in timed if excess[id(g)] > GHOST_SLACK]
    over_bound.sort(key=lambda g: -excess[id(g)])
    departures = len(h.gone)
    # presence flickers: a live user missing from a screen
    absences = list(h.closed_absences)
    for a in h.absences.values():
        a.end = None  # still missing at the end
        absences.append(a)
    for a in absences:
        a.cause = absence_cause(a, w)
    by_cause: dict[str, list[Absence]] = {c: [] for c in ABSENCE_CAUSES}
    for a in absences:
        by_cause[a.cause].append(a)

    def longest(items: list[Absence]) -> float:
        return round(max(((x.end or t_end) - x.start for x in items), default=0.0), 2)

    def told(a: Absence) -> str:
        node = node_at(w.clients[a.user].nodes, a.start)
        obs = node_at(w.clients[a.observer].nodes, a.start)
        gone = (
            f"back after {(a.end or t_end) - a.start:.1f} s"
            if a.back
            else "still missing at the end"
            if a.end is None
            else f"until {'it' if w.clients[a.user].ended == a.end else 'the observer'} left"
        )
        return (
            f"{a.observer} (node {obs}) lost {a.user} (node {node}) in {a.room} at "
            f"t={a.start:.1f} ({a.via}), {gone}"
        )

    missing = [a for a in absences if a.cause != "user"]
    lag = sorted(h.lag) or [0.0]
    return {
        "seed": h.a.seed,
        "duration_s": h.a.duration,
        "clients": h.a.clients,
        "clients_total": len(h.peers),
        "rooms": h.a.rooms,
        "nodes": [n.transport for n in h.cluster.nodes],
        "presence_ttl": h.a.presence_ttl,
        "faults": len(h.faults),
        "fault_kinds": dict(Counter(f["kind"] for f in h.faults)),
        "fault_log": h.faults,
        "published": len(h.pubs),
        "acked": acked,
        "acked_in_a_local_epoch": local_acked,
        "publish_failed": sum(1 for q in h.pubs.values() if q.failed),
        "unacked_at_end": h.unacked_at_end,
        "messages_known": len(messages),
        "deliveries_accounted": owed,
        "delivered_once": counts["once"],
        "duplicated": counts["duplicated"],
        "duplicated_republished": counts["republished"],
        "duplicated_unexplained": counts["duplicated"] - counts["republished"],
        "lost_told": counts["told"],
        "lost_told_by": dict(told_why.most_common()),
        "lost_silently": counts["silent"],
        "lost_silently_by": dict(silent_why.most_common()),
        "not_owed_before_join": counts["before"],
        "not_owed_after_leaving": counts["after"],
        "not_owed_local_epoch": counts["local"],
        "not_owed_local_epoch_untold": counts["local untold"],
        "misnumbered": len(conflicts),
        "stepbacks": stepbacks,
        "gap_events": gaps,
        "client_anomalies": len(anomalies),
        "departures": departures,
        "ghosts_counted": len(counted),
        "ghosts_timed_in_outages": len(in_outages),
        "ghosts_not_timed": len(ghosts) - len(timed),
        "ghost_max_s": round(max(durations, default=0.0), 2),
        "ghost_p99_s": round(quantile(durations, 0.99), 2),
        "ghosts_over_ttl": len(over),
        "ghost_outage_max_s": round(
            max(((g.end or t_end) - g.start for g in in_outages), default=0), 2
        ),
        "ghost_excess_max_s": round(max(excess.values(), default=-h.a.presence_ttl), 2),
        "ghosts_over_bound": len(over_bound),
        "ghost_max_any_s": round(max(((g.end or t_end) - g.start for g in ghosts), default=0), 2),
        "presence_absences": len(missing),
        "presence_absences_back": sum(1 for a in missing if a.back),
        "absences_user_reconnecting": len(by_cause["user"]),
        "flickers_partition": len(by_cause["partition"]),
        "flickers_partition_max_s": longest(by_cause["partition"]),
        "flickers_late_node": len(by_cause["late node"]),
        "flickers_late_node_max_s": longest(by_cause["late node"]),
        "flickers": len(by_cause["flicker"]),
        "flicker_max_s": longest(by_cause["flicker"]),
        "node_outages": {
            str(k): [[round(o.start_lo, 2), round(o.end_hi, 2)] for o in outs]
            for k, outs in w.outages.items()
        },
        "loop_lag_p99_ms": round(1000 * quantile(lag, 0.99), 1),
        "loop_lag_max_ms": round(1000 * lag[-1], 1),
        "node_metrics": {k: v for k, v in sorted(h.metrics.items()) if v},
        "client_errors": sum(len(p.errors) for p in h.peers),
        "examples": {
            "silent": examples,
            "duplicated": dup_examples,
            "misnumbered": conflicts[:10],
            "anomalies": anomalies[:10],
            "ghosts_over_ttl": [
                f"{g.observer} saw {g.user} in {g.room} {(g.end or t_end) - g.start:.1f} s "
                f"after it left (t={g.start:.1f}{', still at the end' if g.still_shown else ''})"
                for g in over[:10]
            ],
            "ghosts_over_bound": [
                f"{g.observer} (node {node_at(w.clients[g.observer].nodes, g.end or t_end)}) "
                f"saw {g.user} (node {node_at(w.clients[g.user].nodes, h.gone[g.user][0])}"
                f"{', killed' if w.clients[g.user].died else ''}) in {g.room} until "
                f"t={g.end or t_end:.1f}, {excess[id(g)]:.1f} s past its bound "
                f"t={g.bound:.1f} (left t={h.gone[g.user][0]:.1f}"
                f"{', still at the end' if g.still_shown else ''})"
                for g in over_bound[:10]
            ],
            "flickers": [told(a) for a in by_cause["flicker"][:10]],
            "flickers_partition": [told(a) for a in by_cause["partition"][:3]],
            "flickers_late_node": [told(a) for a in by_cause["late node"][:3]],
            "client_errors": [e for p in h.peers for e in p.errors][:10],
            "ghosts_not_timed_over_ttl": [
                f"{g.observer} saw {g.user} in {g.room} {(g.end or t_end) - g.start:.1f} s "
                f"after it left (t={g.start:.1f}; {'healthy' if g.healthy else 'outage'}, "
                f"observer impaired{', still at the end' if g.still_shown else ''})"
                for g in sorted(ghosts, key=lambda g: g.start - (g.end or t_end))
                if g.impaired and (g.end or t_end) - g.start > limit
            ][:10],
        },
    }


def dump(h: Harness, path: Path) -> None:
    peers = [
        {
            "name": p.name,
            "rooms": p.rooms,
            "home": p.home,
            "mortal": p.mortal,
            "born": p.born,
            "ended": p.ended,
            "impaired": p.impaired,
            "away": p.away,
            "nodes": p.nodes,
            "died": p.died,
            "errors": p.errors,
            "logs": p.logs,
            "presence": p.seen,
        }
        for p in h.peers
    ]
    pubs = {k: vars(v) for k, v in h.pubs.items()}
    data = {
        "peers": peers,
        "pubs": pubs,
        "faults": h.faults,
        "unhealthy": h.unhealthy,
        "presence_ttl": h.a.presence_ttl,
        "outages": {k: [vars(o) for o in link.outages] for k, link in enumerate(h.links)},
        "cuts": h.cuts,
        "gone": h.gone,
        "ghosts": [vars(g) for g in [*h.closed_ghosts, *h.ghosts.values()]],
        "absences": [vars(a) for a in [*h.closed_absences, *h.absences.values()]],
    }
    path.write_text(json.dumps(data, default=str))


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def table(r: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["fault_kinds"].items()))
    told_by = ", ".join(f"{k}: {v:,}" for k, v in r["lost_told_by"].items()) or "-"
    silent_by = ", ".join(f"{k}: {v:,}" for k, v in r["lost_silently_by"].items()) or "-"
    rows = [
        ("faults injected", f"{r['faults']} ({kinds})"),
        ("messages published (acked)", f"{r['published']:,} ({r['acked']:,})"),
        ("  acked in a node's own epoch (cut off)", f"{r['acked_in_a_local_epoch']:,}"),
        (
            "  publishes failed / unacked at the end",
            f"{r['publish_failed']} / {r['unacked_at_end']}",
        ),
        ("deliveries accounted (receiver x message owed)", f"{r['deliveries_accounted']:,}"),
        ("  delivered once", f"{r['delivered_once']:,}"),
        ("  duplicated", f"{r['duplicated']:,}"),
        (
            "    published twice: its ack lost across an epoch change",
            f"{r['duplicated_republished']:,}",
        ),
        ("    otherwise", f"{r['duplicated_unexplained']:,}"),
        ("  lost, told", f"{r['lost_told']:,} ({told_by})"),
        ("  lost silently", f"{r['lost_silently']:,} ({silent_by})"),
        ("not owed: published before the receiver joined", f"{r['not_owed_before_join']:,}"),
        ("not owed: published after the receiver left", f"{r['not_owed_after_leaving']:,}"),
        (
            "not owed: in a node's own epoch (it was cut off from Redis)",
            f"{r['not_owed_local_epoch']:,}",
        ),
        (
            "  of which the receiver was not told (it was on the cluster)",
            f"{r['not_owed_local_epoch_untold']:,}",
        ),
        ("misnumbered (one message at two seqs of an epoch, or two at one)", f"{r['misnumbered']}"),
        (
            "client anomalies (step back, chat out of place, Gap)",
            f"{r['client_anomalies']} / {r['stepbacks']} / {r['gap_events']}",
        ),
        ("departures (clean leaves + clients killed with their node)", f"{r['departures']}"),
        ("presence ghosts timed (healthy cluster, observer reading)", f"{r['ghosts_counted']:,}"),
        (
            "  longest, p99",
            f"{r['ghost_max_s']} s, {r['ghost_p99_s']} s (TTL {r['presence_ttl']:g} s)",
        ),
        ("  outliving the TTL (+1 s)", f"{r['ghosts_over_ttl']}"),
        (
            "presence ghosts timed in outages (observer reading)",
            f"{r['ghosts_timed_in_outages']:,} (longest {r['ghost_outage_max_s']} s)",
        ),
        (
            "  past their bound (+1 s): every ghost timed; longest excess",
            f"{r['ghosts_over_bound']}; {r['ghost_excess_max_s']} s",
        ),
        (
            "  not timed: the observer impaired",
            f"{r['ghosts_not_timed']:,} (longest {r['ghost_max_any_s']} s)",
        ),
        (
            "live users missing from a screen (observer x user), back",
            f"{r['presence_absences']:,}, {r['presence_absences_back']:,}",
        ),
        (
            "  their node partitioned (own link cut), longest",
            f"{r['flickers_partition']:,}, {r['flickers_partition_max_s']} s",
        ),
        (
            "  their node back on Redis > TTL after the observer's, longest",
            f"{r['flickers_late_node']}, {r['flickers_late_node_max_s']} s",
        ),
        ("  flickers (none of these), longest", f"{r['flickers']}, {r['flicker_max_s']} s"),
        (
            "missing while reconnecting or stalled themselves (not live)",
            f"{r['absences_user_reconnecting']:,}",
        ),
        ("harness event-loop lag p99 / max", f"{r['loop_lag_p99_ms']} / {r['loop_lag_max_ms']} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    head = (
        f"roombus chaos run: seed {r['seed']}, {r['duration_s']:g} s, {r['clients']} clients "
        f"({r['clients_total']} over the run), {r['rooms']} rooms, nodes "
        f"{'/'.join(r['nodes'])}, presence TTL {r['presence_ttl']:g} s"
    )
    lines = [head, "", f"| {'what'.ljust(width)} | count |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def verdict(r: dict[str, Any], allow_republished: bool) -> list[str]:
    bad = []
    dup = "duplicated_unexplained" if allow_republished else "duplicated"
    keys = ("lost_silently", dup, "misnumbered", "client_anomalies", "ghosts_over_ttl")
    for key in (*keys, "ghosts_over_bound", "flickers"):
        if r[key]:
            bad.append(f"{key}: {r[key]}")
    return bad


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=None, help="seconds of chaos (600)")
    ap.add_argument("--clients", type=int, default=None, help="(300)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rooms", type=int, default=0, help="default: one per 40 clients (>= 3)")
    ap.add_argument("--rate", type=float, default=None, help="messages/s published in all (40)")
    ap.add_argument("--presence-ttl", type=float, default=5.0)
    ap.add_argument("--send-queue", type=int, default=256, help="each node's --send-queue")
    ap.add_argument("--short", action="store_true", help="the CI preset: ~2 minutes")
    ap.add_argument(
        "--timeout", type=float, default=0, help="hard limit, s (default: duration + 240)"
    )
    ap.add_argument(
        "--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server"
    )
    ap.add_argument("--logdir", default="", help="default: a temporary directory")
    ap.add_argument(
        "--allow-republished",
        action="store_true",
        help="do not fail on duplicates that are one publish made twice because its ack "
        "was lost across an epoch change (counted and shown all the same)",
    )
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument(
        "--dump",
        default="",
        help="write every client's records, the nodes' outages, the ghosts and absences "
        "here (JSON)",
    )
    ap.add_argument(
        "--proxy", nargs=2, type=int, metavar=("LISTEN", "TARGET"), help=argparse.SUPPRESS
    )
    a = ap.parse_args(argv)
    preset = (95.0, 240, 30.0) if a.short else (600.0, 300, 40.0)
    a.duration = a.duration if a.duration is not None else preset[0]
    a.clients = a.clients if a.clients is not None else preset[1]
    a.rate = a.rate if a.rate is not None else preset[2]
    a.rooms = a.rooms or max(3, a.clients // 40)
    a.timeout = a.timeout or a.duration + 240
    a.warmup, a.tail, a.ramp = 5.0, 8.0, min(10.0, a.clients / 40)
    a.gap = (2.0, 4.0) if a.short else (5.0, 20.0)
    a.redis_stop = (10.0, 12.0) if a.short else (10.0, 30.0)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.proxy:
        asyncio.run(proxy_main(*a.proxy))
        return 0
    logdir = Path(a.logdir or tempfile.mkdtemp(prefix="roombus-chaos-"))
    logdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="roombus-chaos-redis-"))
    children = Children(logdir)

    def on_signal(signum: int, _frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(*_: object) -> NoReturn:
        raise RunFailed(f"the run hit its --timeout of {a.timeout:g} s")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(math.ceil(a.timeout))
    with contextlib.suppress(ValueError, OSError):
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log(f"seed {a.seed}: {a.clients} clients, {a.rooms} rooms, {a.nodes} nodes; logs in {logdir}")
    result: dict[str, Any] | None = None
    try:
        redis = Redis(children, a.redis_server, workdir)
        redis.start()
        cluster = Cluster(children, redis, a.nodes, a.presence_ttl, a.send_queue)
        for node in cluster.nodes:
            cluster.start_proxy(node)
        for node in cluster.nodes:
            cluster.start_node(node)

        async def body() -> Harness:
            await cluster.online()
            h = Harness(a, cluster)
            await asyncio.wait_for(h.run(), a.timeout)
            return h

        h = asyncio.run(body())
        children.kill_all()
        result = account(h)
        if a.dump:
            dump(h, Path(a.dump))
    except (RunFailed, KeyboardInterrupt, asyncio.TimeoutError, TimeoutError) as exc:
        log(f"the run failed: {exc!r} (logs in {logdir})")
        return 2
    finally:
        signal.alarm(0)
        children.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(result))
    bad = verdict(result, a.allow_republished)
    for what, items in result["examples"].items():
        if items:
            print(f"\n{what}:")
            for item in items:
                print(f"  {item}")
    print("\nfaults:")
    for f in result["fault_log"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in f.items()))
    print("\nnode counters:", json.dumps(result["node_metrics"]))
    summary = {k: v for k, v in result.items() if k not in ("examples", "fault_log")}
    print("\nCHAOS-SUMMARY " + json.dumps(summary, sort_keys=True))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("\nverdict:", "FAIL: " + "; ".join(bad) if bad else "PASS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
