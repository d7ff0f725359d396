#!/usr/bin/env python3
"""
What a Redis cluster costs: roombus alone, one node with --redis, and three nodes with
--redis, measured in one run, interleaved, with medians of --reps repetitions.

    python3 benchmarks/cluster.py                 # 4 setups x 3 reps, ~5 minutes
    python3 benchmarks/cluster.py --quick         # 1 rep, shorter stages, ~1 minute
    python3 benchmarks/cluster.py --subs 300 --setup alone --setup redis3

Setups (each started afresh, on free loopback ports, for every repetition):

  alone           1 node, no Redis: a chat is delivered directly
  redis1          1 node with --redis: every chat goes to Redis (a Lua script numbers it
                  and SPUBLISHes it) and is delivered when it comes back
  redis3          3 nodes with --redis; subscribers spread round-robin over the nodes,
                  every publisher on node 0
  redis3-spread   the same, with publisher k on node k % 3
  redis3-nohist   redis3 with --history-size 0: what keeping history in Redis costs

Nodes run `python3 -m roombus serve --max-connections-per-ip 0 --log-level warning`
(every client is 127.0.0.1, and the default per-IP limit of 1000 would refuse the
1000 subscribers + publishers of one node), with `--redis ... --node-id nK
--presence-ttl 3` in the Redis setups. Redis is `redis-server` with persistence off.

What is measured, per setup and repetition:

* Max sustainable deliveries/s: one room, --subs subscribers + --publishers publishers
  (the publishers are members too, and their own messages count as deliveries),
  ~100 bytes of content. The total publish rate is ramped open-loop in stages,
  exactly like loadgen.py's fanout (its Pool.stage and ramp, reused): double until a
  stage fails (a failure is retried once), then bisect. A stage passes if nothing is
  lost, nobody is dropped, no error envelope comes back, p99 <= 100 ms and the load
  generator kept to its schedule. Open-loop rather than a closed loop with an
  in-flight window: the publisher only sees its own copy come back, which says
  nothing about the other nodes' subscribers (each node has its own send queues), so
  a window on it would not bound what waits for the slowest subscriber; a fixed
  schedule with loss/latency criteria does, and measures latency without coordinated
  omission. The ramp is coarser than run.py's (shorter stages, fewer bisection steps)
  to fit four setups x three repetitions into a few minutes: read it to ~20 %
  (--quick: ~40 %). Later repetitions start the ramp at half the previous maximum.
* Latency at a fixed moderate rate (--rate, default 200 msg/s into the room, i.e.
  200 x members deliveries/s): p50/p99 from the send time embedded in the content to
  its receipt, and the CPU each process spent per delivery at that rate.
* Presence convergence: watchers in another room on node 0 and on the last node; a
  client joins on node 0 (--joins times, median): time from its TCP connect to each
  watcher's `join`; then it closes: time to each watcher's `leave`.
  In the multi-node setups, a user on node 1 is then SIGKILLed with its node: time
  until the watchers on the other nodes get its `leave` (expected: within the
  presence TTL, 3 s; members live 2 s unrefreshed and the survivors reap every 1 s).
* CPU: /proc/PID/stat utime + stime of each node and of Redis over each stage;
  the load generator's own CPU comes from its workers; /proc/stat gives how busy the
  server's and the load generator's CPUs were in all (other processes, softirq).

Room size matters: with fewer than ~128 members of the room on a node, a node of a
cluster writes each message to its members in a sweep of its own (try
`--subs 100`), so small rooms show a much larger cluster cost than the default.

Pinning (default with 2+ CPUs, like run.py): Redis and every node share the first
CPU, the load generator (and this script) the others. So the server side gets the
same one CPU in every setup, and the comparison shows what the cluster costs, not
what a second machine would add. --no-pin lets everything float.

The machine is small and shared, so absolute numbers move from run to run and are
bound by it (a load generator on one CPU reading ~1M messages/s is itself near its
limit): compare the ratios within one run. Every process started here is ended by
its PID (SIGTERM, then SIGKILL), also on Ctrl-C, errors or the --timeout.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import http.client
import json
import math
import multiprocessing as mp
import os
import re
import select
import shutil
import signal
import socket
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from loadgen import (  # noqa: E402
    MONO,
    PUB,
    SUB,
    Result,
    Spec,
    client_frame,
    joins_in,
    proc_cpu_seconds,
    ramp,
)
from run import Server, machine, pin, versions  # noqa: E402

REDIS_CMD = (
    "{redis} --port {port} --bind 127.0.0.1 --save '' --appendonly no "
    "--protected-mode yes --loglevel notice"
)
NODE_CMD = (
    "{py} -m roombus serve --host 127.0.0.1 --port {port} "
    "--max-connections-per-ip 0 --log-level warning"
)
PRESENCE_TTL = 3.0
FAN_ROOM = "fan"
PRES_ROOM = "pres"


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    nodes: int
    redis: bool
    spread: bool = False
    args: str = ""  # more options of every node


SETUPS = {
    s.key: s
    for s in (
        Setup("alone", "alone", 1, False),
        Setup("redis1", "1 node + redis", 1, True),
        Setup("redis3", "3 nodes + redis", 3, True),
        Setup("redis3-spread", "3 nodes, pubs spread", 3, True, spread=True),
        Setup("redis3-nohist", "3 nodes + redis, no history", 3, True, args="--history-size 0"),
    )
}


class RunTimeout(Exception):
    """The whole run hit --timeout (not an OSError, so that nothing takes it for a socket's)."""


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def median(vals: Iterable[float | None]) -> float | None:
    """The median of the numbers among *vals* (not None, not NaN), or None if there are none."""
    nums = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(nums) if nums else None


# ---------------------------------------------------------------------------------------
# the processes under test


def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)  # no proxy
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, http.client.HTTPException):
        status, text = http_get(port, "/metrics")
        if status == 200:
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name and not name.startswith("#"):
                    with contextlib.suppress(ValueError):
                        out[name] = float(value)
    return out


def redis_ping(port: int, timeout: float = 10.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"redis on port {port} does not answer PING")


class Cluster:
    """Redis (maybe) and the nodes of one setup, each a run.Server (pinned, sampled)."""

    def __init__(self, setup: Setup, cpus: set[int] | None, logdir: Path, redis_bin: str):
        self.setup = setup
        self.redis: Server | None = None
        self.nodes: list[Server] = []
        self.killed: set[int] = set()
        try:
            node_cmd = NODE_CMD + (f" {setup.args}" if setup.args else "")
            if setup.redis:
                self.redis = Server(
                    "cluster-redis", REDIS_CMD.replace("{redis}", redis_bin), cpus, logdir
                )
                redis_ping(self.redis.port)
                node_cmd += (
                    f" --redis redis://127.0.0.1:{self.redis.port}/0"
                    f" --presence-ttl {PRESENCE_TTL:g} --node-id n{{k}}"
                )
            for k in range(setup.nodes):
                cmd = node_cmd.replace("{k}", str(k))
                self.nodes.append(Server(f"cluster-node{k}", cmd, cpus, logdir))
            if setup.redis:
                t_end = time.monotonic() + 15
                for n in self.nodes:
                    while metrics(n.port).get("roombus_backplane_online") != 1:
                        if time.monotonic() > t_end:
                            raise RuntimeError(f"{n.name} not connected to redis")
                        time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def kill(self, k: int) -> None:
        node = self.nodes[k]
        os.kill(node.pid, signal.SIGKILL)  # by its PID
        node.proc.wait(timeout=5)
        self.killed.add(k)

    def node_metrics(self) -> list[dict[str, float]]:
        return [metrics(n.port) if k not in self.killed else {} for k, n in enumerate(self.nodes)]

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nodes": [], "redis": None}
        for n in self.nodes:
            with contextlib.suppress(Exception):
                out["nodes"].append(n.stop())
        if self.redis is not None:
            with contextlib.suppress(Exception):
                out["redis"] = self.redis.stop()
                out["redis"]["log_issues"] = redis_issues(self.redis)
        return out


def redis_issues(server: Server) -> list[str]:
    """Lines of Redis's log that mean trouble for the cluster (not its startup advice)."""
    with open(server.logpath, "rb") as f:
        f.seek(server.log_start)
        text = f.read().decode(errors="replace")
    pat = re.compile(r"output buffer|closed ASAP|error", re.IGNORECASE)
    return [ln.strip()[:160] for ln in text.splitlines() if pat.search(ln)][:10]


# ---------------------------------------------------------------------------------------
# the load generator: loadgen's workers, dialling the node named in each username


class ClusterWorker(loadgen.Worker):
    """A loadgen worker whose connections dial node k when their username ends in @k."""

    def __init__(
        self,
        wid: int,
        pipe: Connection[Any, Any],
        host: str,
        port: int,
        size: int,
        inflight: int,
        *,
        ports: list[int],
    ):
        super().__init__(wid, pipe, host, port, size, inflight)
        self.ports = ports

    def dial(self, c: loadgen.Conn) -> None:
        # Worker.dial connects to self.port (on_connected only writes it into Host:).
        self.port = self.ports[int(c.user.rpartition("@")[2] or 0)]
        super().dial(c)


def cluster_worker_main(
    wid: int,
    pipe: Connection[Any, Any],
    host: str,
    ports: list[int],
    size: int,
    inflight: int,
    pause: float,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    w = ClusterWorker(wid, pipe, host, ports[0], size, inflight, ports=ports)
    w.pause = pause
    w.run()


class ClusterPool(loadgen.Pool):
    """
    loadgen's Pool over ClusterWorkers. Its server_cpu() (called by Pool.stage at the
    start and at the end of each stage's window) also notes each node's and Redis's
    CPU, so a stage's result gets the per-process split over the same window.
    """

    def __init__(
        self, args: argparse.Namespace, cluster: Cluster, cpu_groups: dict[str, list[int]]
    ):
        self.args = args
        self.pid = 0
        self.k = args.workers
        self.pipes = []
        self.procs = []
        self.sid = 0
        self.cpu_lg = 0.0
        self.node_pids = [n.pid for n in cluster.nodes]
        self.redis_pid = cluster.redis.pid if cluster.redis else 0
        # (monotonic time, CPU s of each node, of Redis, cpu_jiffies()) at each server_cpu()
        self.marks: list[
            tuple[float, list[float], float, dict[int, tuple[int, int, int, int]]]
        ] = []
        self.cpu_groups = cpu_groups
        inflight = max(1, math.ceil(args.inflight / self.k))
        ctx = mp.get_context("fork")
        for i in range(self.k):
            a, b = ctx.Pipe()
            p = ctx.Process(
                target=cluster_worker_main,
                args=(
                    i,
                    b,
                    args.host,
                    cluster.ports,
                    args.size,
                    inflight,
                    args.poll_pause_ms / 1e3,
                ),
                daemon=True,
            )
            p.start()
            b.close()
            self.pipes.append(a)
            self.procs.append(p)

    def server_cpu(self) -> float:
        jiffies = cpu_jiffies()
        nodes = []
        for pid in self.node_pids:
            try:
                nodes.append(proc_cpu_seconds(pid))
            except OSError:
                nodes.append(float("nan"))
        redis = proc_cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        self.marks.append((time.monotonic(), nodes, redis, jiffies))
        return sum(nodes)

    def stage(self, rate_per_pub: float, fan: int, dur: float, drain: float) -> Result:
        res = super().stage(rate_per_pub, fan, dur, drain)
        (t0, n0, r0, j0), (t1, n1, r1, j1) = self.marks[-2:]
        wall = t1 - t0
        got = res["received"]
        res["node_cpu_pct"] = [round(100 * (b - a) / wall, 1) for a, b in zip(n0, n1, strict=True)]
        res["redis_cpu_pct"] = round(100 * (r1 - r0) / wall, 1)
        res["redis_cpu_us_per_delivery"] = round(1e6 * (r1 - r0) / got, 3) if got else None
        res["side_cpu_us_per_delivery"] = (
            round(1e6 * (sum(n1) - sum(n0) + r1 - r0) / got, 3) if got else None
        )
        for group, cpus in self.cpu_groups.items():
            d = [tuple(b - a for a, b in zip(j0[c], j1[c], strict=True)) for c in cpus]
            total = sum(x[3] for x in d) or 1
            for i, what in enumerate(("busy", "steal", "softirq")):
                res[f"{group}_cpus_{what}_pct"] = round(100 * sum(x[i] for x in d) / total, 1)
        return res


def cpu_jiffies() -> dict[int, tuple[int, int, int, int]]:
    """Per CPU, from /proc/stat: (busy, steal, softirq, total) jiffies, of every process."""
    out: dict[int, tuple[int, int, int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in fields[:8]]
                total = sum(v)
                out[int(name[3:])] = (total - v[3] - v[4] - v[7], v[7], v[6], total)
    return out


# ---------------------------------------------------------------------------------------
# presence: a tiny blocking client


RX_EVENT = re.compile(
    rb'"type":\s*"presence",\s*"event":\s*"(join|leave)",\s*"username":\s*"([^"]*)"'
)


class WsClient:
    """One WebSocket client on a blocking socket; frames read through feed()."""

    def __init__(self, port: int, room: str, user: str, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET /ws?room=%s&username=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (room.encode(), user.encode(), port, key)
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"{user}: closed during the handshake")
            buf += data
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"{user}: {head.splitlines()[0].decode(errors='replace')}")
        self.closed = False
        self.texts: list[bytes] = []
        self._parse()

    def fileno(self) -> int:
        return self.sock.fileno()

    def feed(self) -> None:
        """Read what is there (call when readable) into self.texts."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self.buf += data
        self._parse()

    def _parse(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, head = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, head = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < head + n:
                break
            op, payload, buf = buf[0] & 0x0F, buf[head : head + n], buf[head + n :]
            if op == 0x1:
                self.texts.append(payload)
            elif op == 0x9:
                with contextlib.suppress(OSError):
                    self.sock.sendall(client_frame(0xA, payload))
            elif op == 0x8:
                self.closed = True
        self.buf = buf

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(client_frame(0x8, (1000).to_bytes(2, "big")))
        self.sock.close()


def wait_events(
    watchers: dict[str, WsClient], want: tuple[str, str], timeout: float
) -> dict[str, int | None]:
    """Until each watcher saw presence event want = (event, username): name -> MONO() or None."""
    seen: dict[str, int | None] = dict.fromkeys(watchers)
    t_end = time.monotonic() + timeout
    while any(v is None for v in seen.values()) and time.monotonic() < t_end:
        live = [w for name, w in watchers.items() if seen[name] is None and not w.closed]
        if not live:
            break
        ready, _, _ = select.select(live, [], [], max(0.0, t_end - time.monotonic()))
        now = MONO()
        for w in ready:
            w.feed()
        for name, w in watchers.items():
            for text in w.texts:
                m = RX_EVENT.search(text)
                if m and (m.group(1).decode(), m.group(2).decode()) == want and seen[name] is None:
                    seen[name] = now
            w.texts.clear()
    return seen


def settle(watchers: dict[str, WsClient], quiet_s: float = 0.1) -> None:
    """Read and forget whatever arrives until quiet_s of silence."""
    while True:
        ready, _, _ = select.select(list(watchers.values()), [], [], quiet_s)
        if not ready:
            return
        for w in ready:
            w.feed()
            w.texts.clear()


def open_watchers(cluster: Cluster, tag: str) -> dict[str, WsClient]:
    """A watcher on node 0 ('same') and, if there are several nodes, on the last ('other')."""
    watchers = {"same": WsClient(cluster.ports[0], PRES_ROOM, f"w{tag}0")}
    if len(cluster.nodes) > 1:
        last = len(cluster.nodes) - 1
        watchers["other"] = WsClient(cluster.ports[last], PRES_ROOM, f"w{tag}{last}")
    time.sleep(0.05)
    settle(watchers, 0.2)
    return watchers


def presence_joins(cluster: Cluster, n: int) -> Result:
    """n joins on node 0 then closes: ms until each watcher got the join, and the leave."""
    watchers = open_watchers(cluster, "j")
    join: dict[str, list[float]] = {k: [] for k in watchers}
    leave: dict[str, list[float]] = {k: [] for k in watchers}
    missed = 0
    try:
        for i in range(n):
            user = f"j{i}"
            t0 = MONO()
            c = WsClient(cluster.ports[0], PRES_ROOM, user)
            seen = wait_events(watchers, ("join", user), 5.0)
            t1 = MONO()
            c.close()
            gone = wait_events(watchers, ("leave", user), 5.0)
            for k in watchers:
                t_join, t_leave = seen[k], gone[k]
                if t_join is None or t_leave is None:
                    missed += 1
                    continue
                join[k].append((t_join - t0) / 1e6)
                leave[k].append((t_leave - t1) / 1e6)
            settle(watchers, 0.02)
    finally:
        for w in watchers.values():
            w.close()
    out: Result = {"presence_missed": missed}
    for k in watchers:
        out[f"join_{k}_ms"] = round3(median(join[k]))
        out[f"leave_{k}_ms"] = round3(median(leave[k]))
    return out


def round3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def presence_kill(cluster: Cluster) -> Result:
    """A user on node 1; SIGKILL node 1; seconds until the other nodes' watchers see it leave."""
    watchers = open_watchers(cluster, "k")
    try:
        victim = WsClient(cluster.ports[1], PRES_ROOM, "victim")
        seen = wait_events(watchers, ("join", "victim"), 5.0)
        if any(v is None for v in seen.values()):
            return {"kill_error": "the victim's join did not reach every watcher"}
        time.sleep(0.3)
        t0 = MONO()
        cluster.kill(1)
        gone = wait_events(watchers, ("leave", "victim"), PRESENCE_TTL * 3 + 5)
        victim.sock.close()
    finally:
        for w in watchers.values():
            w.close()
    out: Result = {
        f"kill_leave_{k}_s": round((v - t0) / 1e9, 3) if v else None for k, v in gone.items()
    }
    if all(gone.values()):  # the later of the two watchers
        out["kill_leave_s"] = max(out.values())
    return out


# ---------------------------------------------------------------------------------------
# one setup, one repetition


def loadgen_args(a: argparse.Namespace) -> argparse.Namespace:
    la = loadgen.parse_args(
        [
            "--scenario",
            "fanout",
            "--port",
            "1",
            "--subs",
            str(a.subs),
            "--publishers",
            str(a.publishers),
            "--size",
            str(a.size),
            "--stage-s",
            str(a.stage_s),
            "--drain-s",
            str(a.drain_s),
            "--refine",
            str(a.refine),
            "--workers",
            str(a.workers),
        ]
    )
    la.join_batch = 100
    return la


def run_one(
    setup: Setup,
    rep: int,
    a: argparse.Namespace,
    cpus_srv: set[int] | None,
    prev_best: float | None,
) -> Result:
    t_start = time.monotonic()
    cluster = Cluster(setup, cpus_srv, a.logdir, a.redis_server)
    log(
        f"== {setup.label} rep {rep + 1}/{a.reps}: nodes {[n.pid for n in cluster.nodes]}"
        + (f", redis {cluster.redis.pid}" if cluster.redis else "")
    )
    res: Result = {"setup": setup.key, "label": setup.label, "rep": rep}
    pool: ClusterPool | None = None
    try:
        res.update(presence_joins(cluster, a.joins))
        log(
            f"   presence join same/other node: {res.get('join_same_ms')} / "
            f"{res.get('join_other_ms')} ms"
        )
        la = loadgen_args(a)
        pool = live = ClusterPool(la, cluster, a.cpu_groups)
        n = setup.nodes
        p = a.publishers
        specs: list[Spec] = [(FAN_ROOM, f"s{i}@{i % n}", SUB) for i in range(a.subs)]
        specs += [(FAN_ROOM, f"p{j}@{j % n if setup.spread else 0}", PUB, j) for j in range(p)]
        members = a.subs + p
        res.update(pool.open_members(specs, la.join_batch, joins_in if n == 1 else cluster_joins))
        pool.wait_quiet()

        fixed = pool.stage(a.rate / p, members, a.lat_s, a.drain_s)
        res["fixed"] = fixed
        log(
            f"   {a.rate:g} msg/s: p50 {fixed['p50_ms']} p99 {fixed['p99_ms']} ms, lost "
            f"{fixed['lost']}, nodes {fixed['node_cpu_pct']}% redis {fixed['redis_cpu_pct']}% "
            f"lg {fixed['loadgen_cpu_pct']}%; CPUs busy "
            + ", ".join(f"{g} {fixed[g + '_cpus_busy_pct']}%" for g in a.cpu_groups)
        )
        if fixed["dropped"]:
            pool.reopen()
        pool.wait_quiet()

        start = a.start_deliveries / members
        if prev_best:
            start = max(start / 4, prev_best / 2)  # the last rep's result, halved
        rmax = a.max_deliveries / members
        r = ramp(
            pool,
            setup.label,
            start,
            rmax,
            start / 16,
            lambda rate: live.stage(rate / p, members, la.stage_s, la.drain_s),
        )
        passed = [s for s in r["stages"] if s["passed"]]
        best = max(passed, key=lambda s: s["rate"]) if passed else None
        res["max"] = best
        res["ramp"] = {k: v for k, v in r.items() if k != "stages"}
        res["ramp"]["stage_rates"] = [(s["rate"], s["passed"]) for s in r["stages"]]
        res["out_of_order"] = sum(s["out_of_order"] for s in r["stages"]) + fixed["out_of_order"]
        res["gaps"] = sum(s["gaps"] for s in r["stages"]) + fixed["gaps"]
        pool.close_all()
        pool.close()
        pool = None
        res["metrics"] = cluster.node_metrics()
        if n > 1:
            res.update(presence_kill(cluster))
            log(
                f"   leave after SIGKILL of node 1: {res.get('kill_leave_same_s')} / "
                f"{res.get('kill_leave_other_s')} s"
            )
    except (RuntimeError, OSError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        log("   !!", res["error"])
    finally:
        if pool is not None:
            pool.close()
        res["processes"] = cluster.stop()
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    mx = res.get("max") or {}
    log(
        f"   -> max {mx.get('deliveries_per_s')} deliveries/s at {mx.get('rate')} msg/s "
        f"(p99 {mx.get('p99_ms')} ms) in {res['wall_s']} s"
    )
    return res


def cluster_joins(members: dict[str, int]) -> int:
    """
    Join presences to wait for while a cluster's room fills: nearly joins_in's count.
    Two users joining at once on different nodes may each get the other's join (more),
    or find each other in their presence_state (fewer); wait for 95 %, then for quiet.
    """
    return int(0.95 * joins_in(members))


# ---------------------------------------------------------------------------------------
# the table


ROWS = [
    # (label, part of the result or None for the top level, key)
    ("max sustainable deliveries/s", "max", "deliveries_per_s"),
    ("publish rate at that point, msg/s", "max", "rate"),
    ("p99 latency at that rate, ms", "max", "p99_ms"),
    ("server CPU busy at that rate (every process on it), %", "max", "server_cpus_busy_pct"),
    (
        "load generator CPU busy at that rate (every process on it), %",
        "max",
        "loadgen_cpus_busy_pct",
    ),
    ("CPUs busy at that rate (unpinned: all of them), %", "max", "all_cpus_busy_pct"),
    ("nodes CPU at that rate, % (sum)", "max", "server_cpu_pct"),
    ("redis CPU at that rate, %", "max", "redis_cpu_pct"),
    ("load generator CPU at that rate, %", "max", "loadgen_cpu_pct"),
    ("nodes CPU per delivery at that rate, us", "max", "server_cpu_us_per_delivery"),
    ("redis CPU per delivery at that rate, us", "max", "redis_cpu_us_per_delivery"),
    ("nodes + redis CPU per delivery at that rate, us", "max", "side_cpu_us_per_delivery"),
    ("{rate}: p50 latency, ms", "fixed", "p50_ms"),
    ("{rate}: p99 latency, ms", "fixed", "p99_ms"),
    ("{rate}: nodes CPU per delivery, us", "fixed", "server_cpu_us_per_delivery"),
    ("{rate}: redis CPU per delivery, us", "fixed", "redis_cpu_us_per_delivery"),
    ("{rate}: nodes + redis CPU per delivery, us", "fixed", "side_cpu_us_per_delivery"),
    ("{rate}: server CPU busy (every process on it), %", "fixed", "server_cpus_busy_pct"),
    ("{rate}: load generator CPU busy (every process on it), %", "fixed", "loadgen_cpus_busy_pct"),
    ("{rate}: CPUs busy (unpinned: all of them), %", "fixed", "all_cpus_busy_pct"),
    ("{rate}: nodes CPU, % (sum)", "fixed", "server_cpu_pct"),
    ("{rate}: redis CPU, %", "fixed", "redis_cpu_pct"),
    ("{rate}: load generator CPU, %", "fixed", "loadgen_cpu_pct"),
    ("presence join seen on node 0 (same node), ms", None, "join_same_ms"),
    ("presence join seen on the last node, ms", None, "join_other_ms"),
    ("presence leave (close) seen on node 0, ms", None, "leave_same_ms"),
    ("presence leave (close) seen on the last node, ms", None, "leave_other_ms"),
    ("leave after SIGKILL of node 1 (--presence-ttl 3) on nodes 0 and 2, s", None, "kill_leave_s"),
    ("room setup ({subs} members joining), s", None, "setup_s"),
]


def _g(r: Result, part: str | None, key: str) -> Any:
    d = r.get(part) if part else r
    return d.get(key) if d else None


def fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3g}"


def table(results: list[Result], setups: list[Setup], a: argparse.Namespace) -> str:
    base = setups[0].key
    lines = [
        "| metric | " + " | ".join(s.label for s in setups) + " |",
        "|---" * (len(setups) + 1) + "|",
    ]
    rate = f"at {a.rate:g} msg/s ({a.rate * (a.subs + a.publishers):,.0f} deliveries/s)"
    for label, part, key in ROWS:
        meds = {
            s.key: median([_g(r, part, key) for r in results if r["setup"] == s.key])
            for s in setups
        }
        if all(v is None for v in meds.values()):
            continue
        cells = []
        for s in setups:
            m = meds[s.key]
            if m is None:
                cells.append("-")
                continue
            cell = fmt(m)
            b = meds.get(base)
            if s.key != base and b:
                cell += f" ({m / b:.2f}x)"
            cells.append(cell)
        text = label.format(rate=rate, subs=a.subs + a.publishers)
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results: list[Result], setups: list[Setup]) -> str:
    out = [
        "Per repetition (to show the noise): max deliveries/s; at the fixed rate, % of the "
        "server CPU(s): each node, Redis, softirq, and busy in all (every process and the "
        "kernel; the rest is other processes and kernel time charged to no process)"
    ]
    for s in setups:
        rs = [r for r in results if r["setup"] == s.key]
        if not rs:
            continue
        maxes = " / ".join(fmt(v) if (v := _g(r, "max", "deliveries_per_s")) else "-" for r in rs)
        split = " / ".join(cpu_split(r.get("fixed")) for r in rs)
        out.append(f"- {s.label}: {maxes}; {split}")
    return "\n".join(out)


def cpu_split(st: Result | None) -> str:
    if not st:
        return "-"
    g = "server" if "server_cpus_busy_pct" in st else "all"
    return (
        "nodes "
        + "+".join(f"{x:g}" for x in st["node_cpu_pct"])
        + f", redis {st['redis_cpu_pct']:g}, softirq {st[g + '_cpus_softirq_pct']:g}"
        + (f", steal {st[g + '_cpus_steal_pct']:g}" if st[g + "_cpus_steal_pct"] else "")
        + f", busy {st[g + '_cpus_busy_pct']:g}"
    )


def notes(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        tag = f"{r['label']} rep {r['rep'] + 1}"
        if r.get("error"):
            out.append(f"{tag}: {r['error']}")
        if r.get("kill_error"):
            out.append(f"{tag}: {r['kill_error']}")
        if r.get("out_of_order") or r.get("gaps"):
            out.append(f"{tag}: {r.get('out_of_order')} out of order, {r.get('gaps')} gaps")
        if r.get("presence_missed"):
            out.append(f"{tag}: {r['presence_missed']} presence events never arrived")
        if (r.get("ramp") or {}).get("capped"):
            out.append(f"{tag}: reached the top of the ramp")
        for k, m in enumerate(r.get("metrics") or []):
            bad = {
                key.removeprefix("roombus_"): int(v)
                for key, v in m.items()
                if v
                and key
                in (
                    "roombus_redis_failures_total",
                    "roombus_redis_dropped_total",
                    "roombus_redis_errors_total",
                    "roombus_presence_gaps_total",
                    "roombus_relay_unconfirmed_total",
                    "roombus_slow_consumers_closed_total",
                )
            }
            if bad:
                out.append(f"{tag} node {k}: {bad}")
        procs = r.get("processes") or {}
        for k, node in enumerate(procs.get("nodes") or []):
            for issue in node.get("log_issues", [])[:3]:
                out.append(f"{tag} node {k} log: {issue}")
        for issue in (procs.get("redis") or {}).get("log_issues", [])[:3]:
            out.append(f"{tag} redis log: {issue}")
    return out


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--setup",
        action="append",
        choices=list(SETUPS),
        default=[],
        help="setups to run (repeatable; default all, in this order)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--quick", action="store_true", help="~1 minute: 1 rep, shorter stages, fewer joins"
    )
    ap.add_argument("--subs", type=int, default=None, help="subscribers (default 1000)")
    ap.add_argument(
        "--publishers",
        type=int,
        default=0,
        help="default: at least 3, and enough to stay under 800 msg/s each at "
        "--max-deliveries (roombus limits a connection to 1000 msg/s)",
    )
    ap.add_argument("--size", type=int, default=100, help="bytes of chat content")
    ap.add_argument("--rate", type=float, default=200.0, help="fixed rate for latency, msg/s")
    ap.add_argument("--lat-s", type=float, default=2.0, help="seconds at the fixed rate")
    ap.add_argument("--stage-s", type=float, default=1.0, help="seconds each ramp stage publishes")
    ap.add_argument("--drain-s", type=float, default=0.5)
    ap.add_argument("--refine", type=int, default=2, help="bisection steps after the first fail")
    ap.add_argument("--start-deliveries", type=float, default=100_000.0)
    ap.add_argument("--max-deliveries", type=float, default=1_600_000.0)
    ap.add_argument("--joins", type=int, default=20, help="presence joins to time per run")
    ap.add_argument("--workers", type=int, default=0, help="load generator processes")
    pin_g = ap.add_mutually_exclusive_group()
    pin_g.add_argument(
        "--pin",
        dest="pin",
        action="store_true",
        default=None,
        help="Redis and nodes on the first CPU, the rest for the load generator "
        "(default with 2+ CPUs)",
    )
    pin_g.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument(
        "--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server"
    )
    ap.add_argument("--timeout", type=float, default=900, help="hard limit for the whole run, s")
    ap.add_argument(
        "--out",
        default=str(HERE / "results" / "cluster.jsonl"),
        help="JSON lines appended, one per setup and repetition",
    )
    a = ap.parse_args(argv)
    if a.quick:
        a.reps = 1
        a.lat_s, a.stage_s, a.drain_s, a.refine, a.joins = 1.0, 0.75, 0.4, 1, 10
        a.start_deliveries = 50_000.0
    a.subs = a.subs or 1000
    if not a.publishers:
        a.publishers = max(3, math.ceil(a.max_deliveries / a.subs / 800))
    a.setups = [SETUPS[k] for k in (a.setup or list(SETUPS))]
    a.logdir = Path(a.out).parent / "logs"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if a.pin is None:
        a.pin = len(cpus) >= 2
    cpus_srv = {cpus[0]} if a.pin else None
    cpus_lg = set(cpus[1:]) if a.pin else None
    if cpus_lg:
        pin(0, cpus_lg)  # this script and the load generator's workers (forked later)
    a.cpu_groups = (
        {"server": sorted(cpus_srv), "loadgen": sorted(cpus_lg)}
        if cpus_srv is not None and cpus_lg is not None  # if a.pin
        else {"all": cpus}
    )
    if not a.workers:
        a.workers = max(2, len(cpus_lg or cpus))
    with contextlib.suppress(ValueError, OSError):
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_signal(signum: int, _frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(*_: object) -> NoReturn:
        raise RunTimeout(f"the run hit its --timeout of {a.timeout:g} s")

    signal.signal(signal.SIGINT, on_signal)  # even if started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(math.ceil(a.timeout))
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    log(
        f"run {run_id}: setups {[s.key for s in a.setups]}, {a.reps} reps, {a.subs} subs + "
        f"{a.publishers} pubs, pinned={a.pin} (servers {sorted(cpus_srv or [])}, "
        f"loadgen {sorted(cpus_lg or [])})"
    )
    results: list[Result] = []
    t0 = time.monotonic()
    best: dict[str, float] = {}
    try:
        for rep in range(a.reps):
            for setup in a.setups:
                res = run_one(setup, rep, a, cpus_srv, best.get(setup.key))
                if res.get("max"):
                    best[setup.key] = res["max"]["rate"]
                results.append(res)
                rec = {
                    "run_id": run_id,
                    "machine": machine(),
                    "versions": versions(),
                    "args": {k: v for k, v in vars(a).items() if k not in ("setups", "logdir")},
                    **res,
                }
                with open(a.out, "a") as f:
                    f.write(json.dumps(rec, default=str) + "\n")
    except (KeyboardInterrupt, RunTimeout) as exc:
        log(f"stopped: {exc!r}")  # every process was ended by run_one's cleanup
    finally:
        signal.alarm(0)
    wall = time.monotonic() - t0
    print(
        f"\nroombus cluster benchmark, run {run_id}: 1 room, {a.subs} subscribers + "
        f"{a.publishers} publishers ({a.size} B content); medians of {a.reps} interleaved "
        f"reps; {wall:.0f} s"
    )
    print(
        f"pinned={a.pin}: Redis + nodes on CPU {sorted(cpus_srv or [])}, load generator on "
        f"{sorted(cpus_lg or [])}; ratio = setup / {a.setups[0].label}"
    )
    print(
        "Absolute numbers are bound by this machine (2 shared CPUs, the load generator on "
        "one of them); compare the ratios.\n"
    )
    print(table(results, a.setups, a))
    print()
    print(details(results, a.setups))
    ns = notes(results)
    if ns:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in ns))
    return 0 if results and not any(r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
