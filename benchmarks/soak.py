#!/usr/bin/env python3
"""
A soak: many connections for a long time, with churn, chat and presence; the server's
RSS and open file descriptors sampled, to see them plateau.

    PYTHONPATH=src python3 benchmarks/soak.py --duration 1800 --plot docs/soak.png
    PYTHONPATH=src python3 benchmarks/soak.py --connections 300 --duration 30 --sample 2
    python3 benchmarks/soak.py --plot-only benchmarks/results/soak-X.jsonl --plot soak.png

What runs (loopback only; every process a child of this one, ended by its PID):

* one roombus server: ``python -m roombus serve`` (``--transport trio`` or
  ``asyncio``), or the ASGI app under uvicorn (``--transport asgi``), on a free port,
  with ``--max-connections-per-ip 0`` and ``--max-connections`` raised above
  ``--connections``; with ``--redis``, a ``redis-server`` (persistence off) on a free
  port too, and the node joined to it, so that cluster presence is soaked as well;
* the clients: ``loadgen.py``'s worker processes (raw sockets, one ``epoll`` loop each,
  its framing), here with a worker class of their own (:class:`SoakWorker`).
  ``--connections`` users, each on one connection to one room of ``--room-size``
  members; every room lives in one worker, so that the worker knows, for each room,
  what was sent and who was in it when.

Traffic: member 0 of each room (its *publisher*, never churned) publishes
``--rate`` / rooms messages per second, each carrying its number in the room and its
send time (``CLOCK_MONOTONIC``, system-wide on Linux); every member, the publisher
included, measures delivery latency. Churn: ``--churn`` of the connections per minute
(default 5 %), spread evenly over the minute, leave and come back under the same user
name. ``--abrupt`` of those (default 20 %) go without a close frame, alternately:

* ``reset``: the socket is closed with ``SO_LINGER`` 0 (an RST);
* ``silent``: the client stops reading and reconnects at once, leaving its old socket
  open and unanswered (a vanished network); the server has to find it dead by its
  heartbeat (``--ping-interval`` + ``--ping-timeout``). The harness closes that socket
  ``--ghost-hold`` seconds later.

The rest close cleanly (a close frame, and the server's reply). A clean or reset
leaver comes back once the room's publisher has seen its presence ``leave`` (at most
10 s); a silent one at once (the user is then present twice for a while, so no
presence event is due).

Accounting, exact because one publisher's connection carries each room's messages in
order: a connection's session *owes* every message of its room sent after its
``presence_state`` arrived (the server had it in the room before it answered). Each
session then has to receive them in order, without a gap, up to the last message it
received before it left; a session still open at the end owes every message up to
the room's last. ``lost`` counts the owed messages that did not arrive (at the head of
a session, in a gap, or at the tail of one still open at the end); ``duplicated``
the messages received twice or out of order (a publisher closed by the server, an
error in itself, makes what it had in flight count as lost, published or not).
Presence: every session keeps the
room's member list from its ``presence_state`` and the ``join``/``leave`` events after
it; a ``join`` of a user it lists, or a ``leave`` of one it does not, is an anomaly,
and so is a clean or reset churn whose ``leave`` the room's publisher does not see
within 10 s, or whose ``join`` it does not see after the comeback. At the end every
session's list must equal the room's real members.

Every ``--sample`` seconds: the server's VmRSS and open file descriptors (its process
and any children), its CPU, its ``/metrics`` connection gauges, the clients' counters
and the delivery latency p50/p99/max of that window: one JSON line each to ``--out``,
and one progress line on stderr. The verdict (exit 0 pass, 1 fail with the reasons, 2
if the run itself failed): after the warm-up (``--warmup`` of the run after the ramp,
default 20 %), RSS and fds plateau (the least-squares slope over the second half of
the run, extrapolated over the whole run, stays under ``--rss-growth`` (10 %) and
``--rss-growth-mib`` (64 MiB), and under ``--fd-margin`` fds; open fds never exceed
those at the start + the client sockets + ``--fd-margin``), p99 latency stays under
``--p99-bound`` in every window after the ramp, nothing owed is lost, no presence
anomaly, no error and no unexpected close. The run is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import gc
import heapq
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from loadgen import (  # noqa: E402
    CLOSING,
    MONO,
    OPEN,
    SUB,
    Conn,
    Pool,
    Worker,
    client_frame,
    complete_frames,
    percentile,
    proc_cpu_seconds,
)

HOST = "127.0.0.1"
TRANSPORTS = ("trio", "asyncio", "asgi")
CLEAN, RESET, SILENT = "clean", "reset", "silent"
MODES = (CLEAN, RESET, SILENT)
#: How long a clean or reset leaver waits for its room's publisher to see it leave.
LEAVE_WAIT_S = 10.0
#: How long a comeback may take before its ``join`` not seen is an anomaly.
JOIN_WAIT_S = 10.0
#: Before reconnecting after an unexpected close or a failed dial.
RETRY_S = 1.0
SEC = 1_000_000_000

RX_CHAT = re.compile(rb'"content":"sk:(\d+):(\d+)')
RX_PRESENCE = re.compile(
    rb'"event":"(join|leave)","username":"u(\d+)"|"type":"presence_state","room":"[^"]*",'
    rb'"users":\[([^\]]*)\]'
)
RX_UID = re.compile(rb"u(\d+)")
RX_ERROR = re.compile(rb'"type":"error"')
CLOSE_1000 = (1000).to_bytes(2, "big")
LINGER_0 = struct.pack("ii", 1, 0)


class RunFailed(Exception):
    """The run could not be carried out (not a finding about roombus)."""


def log(*args: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# the verdict (pure functions of the samples)


def lsq_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of *ys* against *xs* (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass(frozen=True)
class Plateau:
    """What :func:`plateau` found: growth extrapolated over the run, and the level."""

    ok: bool
    growth: float  # slope over the second half x run length
    level: float  # median after the warm-up
    first: float  # the first value after the warm-up
    last: float
    slope_per_min: float


def plateau(
    ts: Sequence[float],
    ys: Sequence[float],
    *,
    start: float,
    end: float,
    run_s: float,
    max_frac: float,
    max_abs: float,
) -> Plateau:
    """
    Whether the series (*ts* in s, *ys*) plateaus on ``[start, end]`` (the run after
    its warm-up): the least-squares slope over the second half of that span, times
    the run's length *run_s*, must stay under ``max_frac`` of the level (the median
    after the warm-up) and under *max_abs*.
    """
    after = [(t, y) for t, y in zip(ts, ys, strict=True) if start <= t <= end]
    if len(after) < 2:
        return Plateau(False, math.nan, math.nan, math.nan, math.nan, math.nan)
    mid = (start + end) / 2
    half = [(t, y) for t, y in after if t >= mid]
    if len(half) < 2:
        half = after
    slope = lsq_slope([t for t, _ in half], [y for _, y in half])
    growth = slope * run_s
    level = statistics.median(y for _, y in after)
    ok = growth <= max_frac * level and growth <= max_abs
    return Plateau(ok, growth, level, after[0][1], after[-1][1], slope * 60)


@dataclass(frozen=True)
class Limits:
    rss_frac: float = 0.10
    rss_mib: float = 64.0
    fd_margin: int = 50
    p99_ms: float = 250.0
    warmup: float = 0.2


def verdict(
    samples: Sequence[dict[str, Any]], summary: dict[str, Any], limits: Limits
) -> tuple[bool, list[str], dict[str, Any]]:
    """
    (passed, reasons it failed, numbers) from the run's samples (after the ramp: those
    with ``phase == "soak"``) and its end-of-run *summary* counters.
    """
    why: list[str] = []
    soak = [s for s in samples if s.get("phase") == "soak"]
    nums: dict[str, Any] = {}
    if len(soak) < 4:
        return False, [f"only {len(soak)} samples after the ramp"], nums
    t_ramp = soak[0]["t"] - soak[0].get("dt", 0.0)
    t_end = soak[-1]["t"]
    start = t_ramp + limits.warmup * (t_end - t_ramp)
    ts = [s["t"] for s in soak]
    rss = [s["rss_kb"] / 1024 for s in soak]
    fds = [float(s["fds"]) for s in soak]
    run_s = t_end - t_ramp
    r = plateau(
        ts,
        rss,
        start=start,
        end=t_end,
        run_s=run_s,
        max_frac=limits.rss_frac,
        max_abs=limits.rss_mib,
    )
    nums["rss"] = r.__dict__
    if not r.ok:
        why.append(
            f"RSS does not plateau: {r.growth:+.1f} MiB over the run at the second half's "
            f"slope ({r.slope_per_min:+.3f} MiB/min; level {r.level:.1f} MiB; allowed "
            f"{min(limits.rss_frac * r.level, limits.rss_mib):.1f} MiB)"
        )
    f = plateau(
        ts, fds, start=start, end=t_end, run_s=run_s, max_frac=math.inf, max_abs=limits.fd_margin
    )
    nums["fds"] = f.__dict__
    if not f.ok:
        why.append(
            f"open fds do not plateau: {f.growth:+.0f} over the run at the second half's "
            f"slope (allowed {limits.fd_margin})"
        )
    excess = [s["fds"] - s["fds_base"] - s["client_sockets"] for s in soak if s["t"] >= start]
    nums["fd_excess_max"] = max(excess) if excess else None
    if excess and max(excess) > limits.fd_margin:
        why.append(
            f"open fds exceed the base + the clients' sockets by {max(excess)} "
            f"(allowed {limits.fd_margin})"
        )
    p99s = [s["p99_ms"] for s in soak if s.get("p99_ms") is not None]
    nums["p99_ms_median"] = statistics.median(p99s) if p99s else None
    nums["p99_ms_max"] = max(p99s) if p99s else None
    over = [s for s in soak if s.get("p99_ms") is not None and s["p99_ms"] > limits.p99_ms]
    if over:
        worst = max(over, key=lambda s: s["p99_ms"])
        why.append(
            f"p99 latency over {limits.p99_ms:g} ms in {len(over)} of {len(soak)} windows "
            f"(worst {worst['p99_ms']:.1f} ms at minute {worst['t'] / 60:.1f})"
        )
    if not p99s or not sum(s.get("received", 0) for s in soak):
        why.append("no chat was delivered")
    for key, label in (
        ("lost", "owed messages lost"),
        ("duplicated", "messages received twice or out of order"),
        ("unexpected_closes", "unexpected closes"),
        ("connect_failed", "failed connects"),
        ("error_frames", "error replies"),
        ("presence_anomalies", "presence anomalies"),
        ("presence_mismatch", "sessions whose member list ended wrong"),
        ("unfinished_cycles", "churn cycles that never came back"),
    ):
        n = summary.get(key, 0)
        if n:
            why.append(f"{n} {label}")
    want = summary.get("cycles_planned", 0)
    done = summary.get("cycles_done", 0)
    if want and done < 0.8 * want:
        why.append(f"only {done} of {want} planned churn cycles happened")
    return not why, why, nums


# ---------------------------------------------------------------------------------------
# the client side: loadgen's worker, with rooms, churn and accounting of its own


class Room:
    __slots__ = ("await_join", "await_leave", "base", "busy", "cur", "ghost", "name", "pub")

    def __init__(self, name: str, base: int, size: int) -> None:
        self.name = name
        self.base = base  # user ids base .. base + size - 1; base is the publisher
        self.pub = base
        self.cur: dict[int, Session] = {}  # each user's current session
        self.busy: set[int] = set()  # users in a churn cycle (or reconnecting)
        self.ghost: dict[int, int] = {}  # user -> when the harness closes its silent socket
        self.await_leave: dict[int, int] = {}  # user -> when its clean/reset churn started
        self.await_join: dict[int, int] = {}  # user -> when its comeback was dialled


class Session(Conn):
    """One connection of one user: its accounting from its presence_state on."""

    __slots__ = ("churn", "last_n", "n_ready", "t_churn", "uid", "view", "where")

    def __init__(self, room: Room, uid: int) -> None:
        super().__init__(room.name, f"u{uid}", SUB)
        self.where = room
        self.uid = uid
        self.n_ready = 0  # the first message number it is owed
        self.last_n = 0  # the last it received
        self.view = 0  # the members it knows of, a bit per user (uid - base)
        self.churn = ""  # the churn mode once it is leaving
        self.t_churn = 0


class SoakWorker(Worker):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rooms: list[Room] = []
        self.sent_in: dict[str, int] = {}  # room -> messages handed to its publisher
        self.members: list[tuple[Room, int]] = []  # non-publishers, to pick churners from
        self.timers: list[tuple[int, int, str, Room, int]] = []
        self.tseq = 0
        self.ghosts: dict[int, socket.socket] = {}  # by fd, unregistered, unread
        self.started = False
        self.stopped = False
        self.c_msg = 0
        self.c_churn = 0
        # counters
        self.delivered = 0
        self.owed = 0
        self.lost_head = 0
        self.lost_gap = 0
        self.lost_tail = 0
        self.dup = 0
        self.closing_all = False
        self.error_frames = 0
        self.anomalies: dict[str, int] = {}
        self.planned = 0
        self.started_by: dict[str, int] = dict.fromkeys(MODES, 0)
        self.done_by: dict[str, int] = dict.fromkeys(MODES, 0)
        self.presence_events = 0
        self.skipped = 0
        self.leave_lat = array.array("q")
        self.join_lat = array.array("q")
        self.users = 0

    # -- setup ---------------------------------------------------------------------

    def setup(self, rooms: list[tuple[str, int, int]], size: int, abrupt: float) -> None:
        self.size = size
        self.abrupt = abrupt
        for name, base, n in rooms:
            room = Room(name, base, n)
            self.rooms.append(room)
            self.sent_in[name] = 0
            for uid in range(base, base + n):
                s = Session(room, uid)
                room.cur[uid] = s
                self.pending.append(s)
                self.users += 1

    def start(self, t0: int, t_stop: int, msg_rate: float, churn_rate: float) -> None:
        """Publish *msg_rate* and churn *churn_rate* per second (this worker's share)."""
        self.t0 = t0
        self.t_stop = t_stop
        self.msg_rate = msg_rate
        self.churn_rate = churn_rate
        self.phase = self.wid / 7.0  # the workers' schedules interleave
        self.started = True
        self.sending = True  # the base loop calls publish() for every round

    # -- reading: chats, presence ----------------------------------------------------

    def on_data(self, c: Conn, data: bytes, now: int) -> None:
        self.rx_bytes += len(data)
        data, c.buf, special = complete_frames(c.buf, data)
        if not data:
            return
        assert isinstance(c, Session)
        if b'"presence' in data or b'"error"' in data:
            self.on_rare(c, data)
        found = RX_CHAT.findall(data)
        if found:
            if not c.ready:
                self.anomaly("chat_before_state", len(found))
            else:
                last = c.last_n
                first_owed = c.n_ready
                append = self.lat.append
                for ns, ts in found:
                    n = int(ns)
                    if n <= last:
                        self.dup += 1
                        continue
                    if n > last + 1:
                        # missing: last+1 .. n-1, owed from first_owed on
                        lo = max(last + 1, first_owed)
                        if n - 1 >= lo:
                            if last:
                                self.lost_gap += n - lo
                            else:
                                self.lost_head += n - lo
                    last = n
                    append(now - int(ts))
                c.last_n = last
                self.delivered += len(found)
        if special:
            self.on_control(c, data)

    def on_rare(self, c: Conn, data: bytes) -> None:
        assert isinstance(c, Session)
        room = c.where
        now = MONO()
        for m in RX_PRESENCE.finditer(data):
            ev, uid_s, users = m.groups()
            if users is not None:
                if c.ready:
                    continue  # an answer to a join again: not sent by this harness
                view = 0
                for u in RX_UID.findall(users):
                    view |= 1 << (int(u) - room.base)
                c.view = view
                c.ready = True
                c.n_ready = self.sent_in[room.name] + 1
                self.ready += 1
                self.on_ready(c, now)
                continue
            if not c.ready:
                continue  # before its presence_state: the list starts there
            self.presence_events += 1
            uid = int(uid_s)
            bit = 1 << (uid - room.base)
            if ev == b"join":
                if c.view & bit:
                    self.anomaly("join_of_present")
                c.view |= bit
                if c.uid == room.pub and self.started and uid != c.uid:
                    t = room.await_join.pop(uid, None)
                    if t is None:
                        self.anomaly("unexpected_join")
                    else:
                        self.join_lat.append(now - t)
            else:
                if not c.view & bit:
                    self.anomaly("leave_of_absent")
                c.view &= ~bit
                if c.uid == room.pub and self.started:
                    t = room.await_leave.pop(uid, None)
                    if t is None:
                        self.anomaly("unexpected_leave")
                    else:
                        self.leave_lat.append(now - t)
                        self.comeback(room, uid)
        if b'"error"' in data:
            self.error_frames += len(RX_ERROR.findall(data))

    def on_ready(self, c: Session, now: int) -> None:
        room = c.where
        if c.uid in room.busy and room.cur.get(c.uid) is c:
            room.busy.discard(c.uid)
            mode = c.churn or "retry"
            if mode in self.done_by:
                self.done_by[mode] += 1

    def anomaly(self, what: str, n: int = 1) -> None:
        self.anomalies[what] = self.anomalies.get(what, 0) + n

    # -- sessions ending ---------------------------------------------------------------

    def account(self, c: Session, end_n: int) -> None:
        """Add what session *c* was owed, through message *end_n*."""
        if c.ready:
            self.owed += max(0, end_n - c.n_ready + 1)

    def after_close(self, c: Conn, *, failed: bool = False) -> None:
        assert isinstance(c, Session)
        room = c.where
        if c.churn == CLEAN and not failed:
            self.account(c, c.last_n)
            c.ready = False
            self.comeback(room, c.uid)
            return
        # an unexpected close (the base counted it, or the failed dial): dialled again
        if c.ready:
            self.account(c, c.last_n)
            c.ready = False
        if room.cur.get(c.uid) is c and not self.closing_all:
            room.busy.add(c.uid)
            room.await_leave.pop(c.uid, None)
            self.timer(MONO() + int(RETRY_S * SEC), "retry", room, c.uid)

    def comeback(self, room: Room, uid: int) -> None:
        """Dial *uid* again once its old session is closed and its leave seen."""
        old = room.cur.get(uid)
        if old is None or uid in room.await_leave or old.sock is not None:
            return
        s = Session(room, uid)
        s.churn = old.churn
        room.cur[uid] = s
        if old.churn != SILENT:
            now = room.await_join[uid] = MONO()
            self.timer(now + int(JOIN_WAIT_S * SEC), "join", room, uid)
        self.pending.append(s)

    # -- churn --------------------------------------------------------------------------

    def churn_one(self, now: int) -> None:
        for _ in range(30):
            room, uid = random.choice(self.members)
            c = room.cur[uid]
            if (
                c.ready
                and c.state == OPEN
                and uid not in room.busy
                and uid not in room.ghost
                and uid not in room.await_join
            ):
                break
        else:
            self.anomaly("no_churner_free")
            return
        self.planned += 1
        mode = CLEAN
        if math.floor(self.planned * self.abrupt) > math.floor((self.planned - 1) * self.abrupt):
            mode = RESET if self.started_by[RESET] <= self.started_by[SILENT] else SILENT
        self.started_by[mode] += 1
        room.busy.add(uid)
        c.churn = mode
        c.t_churn = now
        if mode == CLEAN:
            room.await_leave[uid] = now
            self.timer(now + int(LEAVE_WAIT_S * SEC), "leave", room, uid)
            c.state = CLOSING
            self.send(c, client_frame(0x8, CLOSE_1000))
        elif mode == RESET:
            room.await_leave[uid] = now
            self.timer(now + int(LEAVE_WAIT_S * SEC), "leave", room, uid)
            if c.sock is not None:
                with contextlib.suppress(OSError):
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            self.end_session(c)
            self.forget(c)
        else:
            assert c.sock is not None
            sock = c.sock
            self.conns.pop(c.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(c.fd)
            self.ghosts[c.fd] = sock
            c.sock = None
            self.end_session(c)
            until = now + int(self.ghost_hold * SEC)
            room.ghost[uid] = until
            self.timer(until, "ghost", room, c.fd)
            self.comeback(room, uid)

    def end_session(self, c: Session) -> None:
        if c.ready:
            self.account(c, c.last_n)
            c.ready = False
            self.ready -= 1

    # -- timers -------------------------------------------------------------------------

    def timer(self, due: int, kind: str, room: Room, arg: int) -> None:
        self.tseq += 1
        heapq.heappush(self.timers, (due, self.tseq, kind, room, arg))

    def on_timer(self, kind: str, room: Room, arg: int, due: int) -> None:
        if kind == "leave":
            if room.await_leave.get(arg, due) + int(LEAVE_WAIT_S * SEC) <= due:
                room.await_leave.pop(arg)
                self.anomaly("leave_not_seen")
                old = room.cur[arg]
                if old.sock is not None:
                    self.end_session(old)
                    self.forget(old)
                self.comeback(room, arg)
        elif kind == "join":
            if room.await_join.get(arg, due) + int(JOIN_WAIT_S * SEC) <= due:
                room.await_join.pop(arg)
                self.anomaly("join_not_seen")
        elif kind == "ghost":
            sock = self.ghosts.pop(arg, None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
                sock.close()
            for uid, until in list(room.ghost.items()):
                if until <= MONO():
                    room.ghost.pop(uid)
        elif kind == "retry":
            old = room.cur[arg]
            if old.sock is None and not old.ready:
                s = Session(room, arg)
                s.churn = "retry"
                room.cur[arg] = s
                self.pending.append(s)

    def close_ghosts(self) -> None:
        for sock in self.ghosts.values():
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            sock.close()
        self.ghosts.clear()
        for room in self.rooms:
            room.ghost.clear()

    # -- the schedule (called by the base loop every round while self.sending) -----------

    def publish(self, now: int) -> float:
        nxt = now + SEC // 10
        while self.timers and self.timers[0][0] <= now:
            due, _, kind, room, arg = heapq.heappop(self.timers)
            self.on_timer(kind, room, arg, due)
        if self.timers:
            nxt = min(nxt, self.timers[0][0])
        if not self.started or self.stopped:
            return max(0.0, (nxt - MONO()) / 1e9)
        if now >= self.t_stop:
            self.stopped = True
            return 0.05
        t0 = self.t0
        if self.msg_rate > 0 and self.rooms:
            r = self.msg_rate
            due = math.floor((now - t0) * r / 1e9 - self.phase) + 1
            if due > self.c_msg:
                lag = now - (t0 + int((self.c_msg + self.phase) / r * 1e9))
                self.lag_max = max(self.lag_max, lag)
            k = len(self.rooms)
            while self.c_msg < due:
                room = self.rooms[self.c_msg % k]
                self.c_msg += 1
                pub = room.cur[room.pub]
                if pub.state != OPEN or not pub.ready:
                    self.skipped += 1
                    continue
                n = self.sent_in[room.name] + 1
                self.sent_in[room.name] = n
                self.sent += 1
                content = b"sk:%d:%d:" % (n, MONO())
                if len(content) < self.size:
                    content += b"x" * (self.size - len(content))
                self.send(pub, client_frame(0x1, b'{"type":"chat","content":"' + content + b'"}'))
            nxt = min(nxt, t0 + int((self.c_msg + self.phase) / r * 1e9))
        if self.churn_rate > 0 and self.members:
            r = self.churn_rate
            due = math.floor((now - t0) * r / 1e9 - self.phase) + 1
            while self.c_churn < due:
                self.c_churn += 1
                self.churn_one(now)
            nxt = min(nxt, t0 + int((self.c_churn + self.phase) / r * 1e9))
        return max(0.0, (nxt - MONO()) / 1e9)

    # -- commands -----------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        busy = sum(len(r.busy) for r in self.rooms)
        return {
            "ready": self.ready,
            "users": self.users,
            "client_sockets": len(self.conns) + len(self.ghosts),
            "ghosts": len(self.ghosts),
            "pending": len(self.pending) + self.inflight,
            "busy": busy,
            "sent": self.sent,
            "skipped": self.skipped,
            "received": self.delivered,
            "lost_head": self.lost_head,
            "lost_gap": self.lost_gap,
            "duplicated": self.dup,
            "unexpected_closes": self.ndropped,
            "connect_failed": self.connect_failed,
            "error_frames": self.error_frames,
            "presence_events": self.presence_events,
            "anomalies": dict(self.anomalies),
            "cycles_planned": self.planned,
            "started_by": dict(self.started_by),
            "done_by": dict(self.done_by),
            "send_lag_max_ms": round(self.lag_max / 1e6, 2),
            "drop_codes": dict(self.drop_codes),
        }

    def handle(self, msg: tuple[Any, ...]) -> None:
        op = msg[0]
        if op == "setup":
            self.setup(*msg[1:4])
            self.ghost_hold = float(msg[4])
            self.members = [(r, u) for r in self.rooms for u in r.cur if u != r.pub]
            self.sending = True  # the base loop calls publish(): timers run from now on
        elif op == "start":
            self.start(*msg[1:])
        elif op == "sample":
            out = self.counters()
            out["lat"] = self.lat.tobytes()
            out["leave_lat"] = self.leave_lat.tobytes()
            out["join_lat"] = self.join_lat.tobytes()
            self.lat = array.array("q")
            self.leave_lat = array.array("q")
            self.join_lat = array.array("q")
            self.pipe.send(out)
        elif op == "stop":
            self.stopped = True
            self.close_ghosts()
            self.pipe.send(True)
        elif op == "final":
            self.pipe.send(self.final())
        elif op == "close_all":
            self.closing_all = True
            super().handle(msg)
        else:
            super().handle(msg)

    def final(self) -> dict[str, Any]:
        """The tail owed to the sessions open now, and whether their member lists agree."""
        tail = 0
        owed = self.owed
        mismatch = 0
        for room in self.rooms:
            end_n = self.sent_in[room.name]
            truth = 0
            for uid, s in room.cur.items():
                if s.ready and s.state == OPEN:
                    truth |= 1 << (uid - room.base)
            for s in room.cur.values():
                if s.ready and s.state == OPEN:
                    owed += max(0, end_n - s.n_ready + 1)
                    tail += max(0, end_n - max(s.last_n, s.n_ready - 1))
                    if s.view != truth:
                        mismatch += 1
        out = self.counters()
        out.update(
            owed=owed,
            lost_tail=tail,
            presence_mismatch=mismatch,
            unfinished=sum(len(r.busy) for r in self.rooms),
        )
        return out


def soak_worker_main(
    wid: int,
    pipe: Connection[Any, Any],
    host: str,
    port: int,
    size: int,
    inflight: int,
    pause: float,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    w = SoakWorker(wid, pipe, host, port, size, inflight)
    w.pause = pause
    gc.freeze()  # what the coordinator made before the fork is never collected here
    w.run()


# ---------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the harness dies (Linux's PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class Children:
    """Every process this run started, by PID; each is ended by its PID at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        with open(self.logdir / f"{name}.log", "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} {shlex.join(args)}\n".encode())
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
        self.procs.append(proc)
        return proc

    def end_all(self) -> None:
        """SIGTERM each by its PID, then SIGKILL what is left after a few seconds."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=3)
        self.procs.clear()


def tcp_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def redis_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
    return False


def metrics(port: int, timeout: float = 3.0) -> dict[str, float]:
    """The server's /metrics, unlabelled samples and label-summed totals by name."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        text = b"".join(chunks).decode("utf-8", "replace").partition("\r\n\r\n")[2]
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                v = float(value)
                base = name.partition("{")[0]
                if base.endswith(("_bucket", "_sum", "_count")):
                    continue
                if "{" in name:
                    out[name] = v
                out[base] = out.get(base, 0.0) + v
    return out


def tree(pid: int) -> list[int]:
    """*pid* and its descendants (for uvicorn's, if it has any)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry))
    out = [pid]
    i = 0
    while i < len(out):
        out.extend(kids.get(out[i], []))
        i += 1
    return out


def proc_stats(pid: int) -> tuple[int, int, float]:
    """(VmRSS KiB, open fds, CPU seconds) of *pid* and its descendants."""
    rss = fds = 0
    cpu = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        rss += int(line.split()[1])
                        break
            fds += len(os.listdir(f"/proc/{p}/fd"))
            cpu += proc_cpu_seconds(p)
    return rss, fds, cpu


def machine_cpu() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def start_redis(children: Children, binary: str, workdir: Path) -> tuple[int, int]:
    port = free_port()
    args = [binary, "--port", str(port), "--bind", HOST, "--dir", str(workdir)]
    args += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
    args += ["--daemonize", "no", "--loglevel", "warning", "--maxclients", "1000"]
    proc = children.spawn("redis", args)
    deadline = time.monotonic() + 10
    while not redis_ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RunFailed(f"redis-server did not start (see {children.logdir})")
        time.sleep(0.02)
    return proc.pid, port


def server_settings(a: argparse.Namespace, redis_port: int) -> dict[str, str]:
    """The server's settings, as ROOMBUS_* variables (the ASGI app's) and flags."""
    env = {
        "ROOMBUS_MAX_CONNECTIONS_PER_IP": "0",
        "ROOMBUS_MAX_CONNECTIONS": str(2 * a.connections + 1000),
        "ROOMBUS_MAX_CONNECTIONS_PER_ROOM": str(max(10000, 2 * a.room_size)),
        "ROOMBUS_BACKLOG": "4096",
        "ROOMBUS_PING_INTERVAL": f"{a.ping_interval:g}",
        "ROOMBUS_PING_TIMEOUT": f"{a.ping_timeout:g}",
        "ROOMBUS_LOG_LEVEL": "warning",
    }
    if redis_port:
        env["ROOMBUS_REDIS"] = f"redis://{HOST}:{redis_port}/0"
        env["ROOMBUS_NODE_ID"] = "soak"
    return env


#: With --gc-log, the server runs under this: it notes every collection of the oldest
#: generation, and any other over 5 ms, with its duration, then runs the module. On
#: SIGUSR1 it writes a census of the objects the collector tracks, by type.
GC_HOOK = """
import collections, gc, json, os, runpy, signal, sys, time
path, module = os.environ.pop("SOAK_GC_LOG"), sys.argv.pop(1)
def census(*_):
    objs = gc.get_objects()
    top = collections.Counter(type(o).__qualname__ for o in objs).most_common(30)
    with open(path + ".census", "a") as f:
        f.write(json.dumps({"objects": len(objs), "top": top}) + "\\n")
    del objs
signal.signal(signal.SIGUSR1, census)
out = open(path, "a", buffering=1)
began = [0.0]
def note(phase, info):
    if phase == "start":
        began[0] = time.monotonic()
        return
    took = time.monotonic() - began[0]
    if info["generation"] == 2 or took > 0.005:
        out.write(f"{time.monotonic():.4f} {info['generation']} {took:.4f}\\n")
gc.callbacks.append(note)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def start_server(
    children: Children, a: argparse.Namespace, port: int, redis_port: int, gc_log: Path | None
) -> int:
    env = server_settings(a, redis_port)
    py = [sys.executable]
    if gc_log is not None:
        py += ["-c", GC_HOOK]
        env["SOAK_GC_LOG"] = str(gc_log)
    if a.transport == "asgi":
        args = [*py, "-m", "uvicorn"] if gc_log is None else [*py, "uvicorn"]
        args += ["--factory", "roombus.asgi:create_app"]
        args += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
        args += ["--backlog", "4096", "--ws-ping-interval", f"{a.ping_interval:g}"]
        args += ["--ws-ping-timeout", f"{a.ping_timeout:g}"]
        proc = children.spawn("server", args, env)
    else:
        args = [*py, "-m", "roombus"] if gc_log is None else [*py, "roombus"]
        args += ["serve", "--transport", a.transport]
        args += ["--host", HOST, "--port", str(port)]
        for key, value in env.items():
            if key.startswith("ROOMBUS_"):
                args += ["--" + key.removeprefix("ROOMBUS_").lower().replace("_", "-"), value]
        proc = children.spawn(
            "server", args, {"SOAK_GC_LOG": env["SOAK_GC_LOG"]} if gc_log else None
        )
    deadline = time.monotonic() + 30
    while not tcp_answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RunFailed(f"the server did not listen (see {children.logdir}/server.log)")
        time.sleep(0.05)
    if redis_port:
        while metrics(port).get("roombus_backplane_online") != 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RunFailed("the server did not come online on Redis")
            time.sleep(0.1)
    return proc.pid


# ---------------------------------------------------------------------------------------
# the coordinator


def plan_rooms(n: int, size: int) -> list[tuple[str, int, int]]:
    """(room, first user id, members) for *n* users in rooms of *size*."""
    return [(f"r{i}", b, min(size, n - b)) for i, b in enumerate(range(0, n, size))]


def sum_counters(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for part in parts:
        for key, v in part.items():
            if isinstance(v, bytes):
                total[key] = total.get(key, b"") + v
            elif isinstance(v, dict):
                d = total.setdefault(key, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            elif key == "send_lag_max_ms":
                total[key] = max(total.get(key, 0.0), v)
            else:
                total[key] = total.get(key, 0) + v
    return total


def ms(values: Sequence[int], q: float) -> float | None:
    return round(percentile(list(values), q) / 1e6, 2) if values else None


class Soak:
    def __init__(self, a: argparse.Namespace, children: Children) -> None:
        self.a = a
        self.children = children
        self.samples: list[dict[str, Any]] = []
        self.out = open(a.out, "a")  # noqa: SIM115 (closed in finish)
        self.t_start = time.monotonic()
        self.prev: dict[str, Any] = {}
        self.redis_pid = 0
        self.server_pid = 0
        self.pool: Pool | None = None

    def write(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, default=str) + "\n")
        self.out.flush()

    def run(self) -> dict[str, Any]:
        a = self.a
        redis_port = 0
        if a.redis:
            binary = a.redis_server
            if not shutil.which(binary):
                raise RunFailed(f"{binary} not found")
            tmp = Path(tempfile.mkdtemp(prefix="soak-redis-"))
            self.redis_pid, redis_port = start_redis(self.children, binary, tmp)
        port = free_port()
        self.gc_log = a.logdir / "server-gc.log" if a.gc_log else None
        self.gc_pos = 0
        self.server_pid = start_server(self.children, a, port, redis_port, self.gc_log)
        self.port = port
        time.sleep(1.0)
        rss0, fds0, cpu0 = proc_stats(self.server_pid)
        self.fds_base = fds0
        self.write(
            {
                "kind": "run",
                "command": a.command,
                "args": {k: v for k, v in vars(a).items() if k != "command"},
                "server_pid": self.server_pid,
                "rss0_kb": rss0,
                "fds0": fds0,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        log(f"server pid {self.server_pid} on port {port}: {rss0 / 1024:.1f} MiB, {fds0} fds")
        ns = argparse.Namespace(
            server_pid=self.server_pid,
            workers=a.workers,
            inflight=a.inflight,
            host=HOST,
            port=port,
            size=a.size,
            poll_pause_ms=a.poll_pause_ms,
        )
        pool = self.pool = Pool(ns, target=soak_worker_main)
        rooms = plan_rooms(a.connections, a.room_size)
        per: list[list[tuple[str, int, int]]] = [[] for _ in range(pool.k)]
        for i, r in enumerate(rooms):
            per[i % pool.k].append(r)
        for i, lst in enumerate(per):
            pool.tell(("setup", lst, a.size, a.abrupt, a.ghost_hold), i)
        # the ramp
        self.t_ramp0 = time.monotonic()
        self.cpu_prev = (cpu0, self.t_ramp0)
        self.machine_prev = machine_cpu()
        self.lg_prev = (self.loadgen_cpu(), self.t_ramp0)
        deadline = self.t_ramp0 + a.ramp_timeout
        next_sample = self.t_ramp0 + a.sample
        while True:
            time.sleep(0.1)
            st = sum_counters(pool.ask(("status",)))
            if st["ready"] >= a.connections:
                break
            if time.monotonic() > deadline:
                raise RunFailed(f"ramp: {st['ready']}/{a.connections} ready in {a.ramp_timeout} s")
            if time.monotonic() >= next_sample:
                self.sample("ramp")
                next_sample += a.sample
        self.ramp_s = time.monotonic() - self.t_ramp0
        log(f"ramp: {a.connections} connections ready in {self.ramp_s:.1f} s")
        # the soak
        rate_room = a.rate / len(rooms)
        churn_per_s = a.churn * a.connections / 60
        t0 = MONO() + 200_000_000
        t_stop = t0 + int(a.duration * SEC)
        for i, lst in enumerate(per):
            users = sum(n for _, _, n in lst)
            share = users / a.connections
            pool.tell(("start", t0, t_stop, rate_room * len(lst), churn_per_s * share), i)
        self.sample("ramp")
        t_soak0 = time.monotonic()
        next_sample = t_soak0 + a.sample
        t_end = t_soak0 + 0.2 + a.duration
        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            time.sleep(max(0.0, min(next_sample, t_end) - now))
            if time.monotonic() >= next_sample:
                self.sample("soak")
                next_sample += a.sample
            self.check_alive()
        self.sample("soak")
        if self.gc_log is not None:  # what the collector has to walk, by type
            os.kill(self.server_pid, signal.SIGUSR1)
        # the end: stop, let comebacks finish, drain, account
        pool.ask(("stop",))
        limit = time.monotonic() + LEAVE_WAIT_S + JOIN_WAIT_S + 5
        final: dict[str, Any] = {}
        while True:
            time.sleep(0.5)
            final = sum_counters(pool.ask(("final",)))
            settled = final["unfinished"] == 0 and final["pending"] == 0
            if (settled and final["lost_tail"] == 0) or time.monotonic() > limit:
                break
        time.sleep(2.0)  # presence in flight
        final = sum_counters(pool.ask(("final",)))
        self.sample("end")
        self.census: dict[str, Any] = {}
        if self.gc_log is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                lines = Path(str(self.gc_log) + ".census").read_text().splitlines()
                self.census = json.loads(lines[-1])
        m = metrics(self.port)
        self.server_closes = {
            k.removeprefix("roombus_closes_total"): int(v)
            for k, v in m.items()
            if k.startswith("roombus_closes_total{")
        }
        return self.summarize(final)

    def check_alive(self) -> None:
        for proc in self.children.procs:
            if proc.poll() is not None:
                raise RunFailed(f"pid {proc.pid} exited with {proc.returncode} (see the logs)")

    def loadgen_cpu(self) -> float:
        assert self.pool is not None
        total = 0.0
        for p in self.pool.procs:
            if p.pid is not None:
                with contextlib.suppress(OSError):
                    total += proc_cpu_seconds(p.pid)
        return total

    def sample(self, phase: str) -> dict[str, Any]:
        assert self.pool is not None
        a = self.a
        now = time.monotonic()
        rss, fds, cpu = proc_stats(self.server_pid)
        parts = self.pool.ask(("sample",))
        st = sum_counters(parts)
        lat = array.array("q")
        lat.frombytes(st.pop("lat", b""))
        leave = array.array("q")
        leave.frombytes(st.pop("leave_lat", b""))
        join = array.array("q")
        join.frombytes(st.pop("join_lat", b""))
        lat_s = sorted(lat)
        cpu_prev, t_prev = self.cpu_prev
        self.cpu_prev = (cpu, now)
        lg = self.loadgen_cpu()
        lg_prev, _ = self.lg_prev
        self.lg_prev = (lg, now)
        dt = max(1e-6, now - t_prev)
        m = metrics(self.port)
        prev = self.prev
        self.prev = st
        mach = machine_cpu()
        (all0, idle0), self.machine_prev = self.machine_prev, mach
        busy = 1 - (mach[1] - idle0) / max(1, mach[0] - all0)
        rec: dict[str, Any] = {
            "kind": "sample",
            "phase": phase,
            "t": round(now - self.t_ramp0, 2),
            "mono": round(now, 3),
            "dt": round(dt, 2),
            "rss_kb": rss,
            "fds": fds,
            "fds_base": self.fds_base,
            "cpu_pct": round(100 * (cpu - cpu_prev) / dt, 1),
            "loadgen_cpu_pct": round(100 * (lg - lg_prev) / dt, 1),
            # the whole machine's CPU in use, 100 per core: this run's and everyone else's
            "machine_cpu_pct": round(100 * busy * (os.cpu_count() or 1), 1),
            "connected": st["ready"],
            "client_sockets": st["client_sockets"],
            "ghosts": st["ghosts"],
            "busy": st["busy"],
            "server_ws": m.get("roombus_websocket_connections"),
            "server_transport": m.get("roombus_transport_connections"),
            "server_rooms": m.get("roombus_rooms"),
            "server_queued_bytes": m.get("roombus_queued_bytes"),
            "sent": st["sent"] - prev.get("sent", 0),
            "received": st["received"] - prev.get("received", 0),
            "cycles": sum(st["started_by"].values()) - sum(prev.get("started_by", {}).values()),
            "presence_events": st["presence_events"] - prev.get("presence_events", 0),
            "p50_ms": ms(lat_s, 0.50),
            "p99_ms": ms(lat_s, 0.99),
            "max_ms": round(lat_s[-1] / 1e6, 2) if lat_s else None,
            "leave_p99_ms": ms(sorted(leave), 0.99),
            "join_p99_ms": ms(sorted(join), 0.99),
            "lost": st["lost_head"] + st["lost_gap"],
            "duplicated": st["duplicated"],
            "errors": st["unexpected_closes"]
            + st["connect_failed"]
            + st["error_frames"]
            + sum(st["anomalies"].values()),
            "send_lag_max_ms": st["send_lag_max_ms"],
        }
        if self.gc_log is not None:
            rec.update(self.gc_window())
        if self.redis_pid:
            r_rss, _, r_cpu = proc_stats(self.redis_pid)
            rec["redis_rss_kb"] = r_rss
            rp = getattr(self, "redis_prev", (r_cpu, t_prev))
            self.redis_prev = (r_cpu, now)
            rec["redis_cpu_pct"] = round(100 * (r_cpu - rp[0]) / dt, 1)
        self.samples.append(rec)
        self.write(rec)
        p99 = rec["p99_ms"]
        log(
            f"{phase:4} {rec['t'] / 60:6.2f} min  conn {rec['connected']:>6} "
            f"(server {rec['server_ws'] or 0:.0f})  rss {rss / 1024:7.1f} MiB  fds {fds:>6}  "
            f"cpu {rec['cpu_pct']:5.1f}% lg {rec['loadgen_cpu_pct']:5.1f}%  "
            f"recv {rec['received']:>8}  p99 {p99 if p99 is not None else '-':>7} ms  "
            f"churn {rec['cycles']:>4}  lost {rec['lost']}  err {rec['errors']}"
        )
        del a
        return rec

    def gc_window(self) -> dict[str, Any]:
        """The server's collections since the last sample: oldest-generation ones, longest."""
        assert self.gc_log is not None
        with contextlib.suppress(OSError), open(self.gc_log) as f:
            f.seek(self.gc_pos)
            text = f.read()
            end = text.rfind("\n") + 1
            self.gc_pos += end
            full = [float(ln.split()[2]) for ln in text[:end].splitlines() if ln.split()[1] == "2"]
            other = [float(ln.split()[2]) for ln in text[:end].splitlines() if ln.split()[1] != "2"]
            return {
                "gc2_count": len(full),
                "gc2_max_ms": round(1000 * max(full), 1) if full else 0.0,
                "gc_other_max_ms": round(1000 * max(other), 1) if other else 0.0,
            }
        return {}

    def summarize(self, final: dict[str, Any]) -> dict[str, Any]:
        a = self.a
        anomalies: dict[str, int] = final["anomalies"]
        lost = final["lost_head"] + final["lost_gap"] + final["lost_tail"]
        planned = round(a.churn * a.connections * a.duration / 60)
        summary: dict[str, Any] = {
            "kind": "summary",
            "ramp_s": round(self.ramp_s, 1),
            "sent": final["sent"],
            "skipped": final["skipped"],
            "received": final["received"],
            "owed": final["owed"],
            "lost": lost,
            "lost_head": final["lost_head"],
            "lost_gap": final["lost_gap"],
            "lost_tail": final["lost_tail"],
            "duplicated": final["duplicated"],
            "unexpected_closes": final["unexpected_closes"],
            "drop_codes": final["drop_codes"],
            "connect_failed": final["connect_failed"],
            "error_frames": final["error_frames"],
            "presence_events": final["presence_events"],
            "presence_anomalies": sum(anomalies.values()),
            "anomalies": anomalies,
            "presence_mismatch": final["presence_mismatch"],
            "cycles_planned": planned,
            "cycles_started": final["started_by"],
            "cycles_done": sum(final["done_by"].get(m, 0) for m in MODES),
            "cycles_done_by": final["done_by"],
            "unfinished_cycles": final["unfinished"],
            "server_closes": self.server_closes,
        }
        if self.census:
            summary["gc_objects"] = self.census["objects"]
            summary["gc_objects_top"] = self.census["top"]
        full = [s for s in self.samples if s.get("gc2_count")]
        if full:
            summary["gc2_count"] = sum(s["gc2_count"] for s in full if s["phase"] == "soak")
            summary["gc2_max_ms"] = max(
                (s["gc2_max_ms"] for s in full if s["phase"] == "soak"), default=0.0
            )
        limits = Limits(
            rss_frac=a.rss_growth,
            rss_mib=a.rss_growth_mib,
            fd_margin=a.fd_margin,
            p99_ms=a.p99_bound,
            warmup=a.warmup,
        )
        ok, why, nums = verdict(self.samples, summary, limits)
        soak = [s for s in self.samples if s["phase"] == "soak"]
        cpus = [s["cpu_pct"] for s in soak]
        summary.update(
            passed=ok,
            reasons=why,
            numbers=nums,
            server_cpu_pct_median=statistics.median(cpus) if cpus else None,
            server_cpu_pct_max=max(cpus) if cpus else None,
            loadgen_cpu_pct_median=statistics.median(s["loadgen_cpu_pct"] for s in soak)
            if soak
            else None,
            rss_start_kb=soak[0]["rss_kb"] if soak else None,
            rss_end_kb=soak[-1]["rss_kb"] if soak else None,
            rss_max_kb=max(s["rss_kb"] for s in soak) if soak else None,
            fds_start=soak[0]["fds"] if soak else None,
            fds_end=soak[-1]["fds"] if soak else None,
            fds_max=max(s["fds"] for s in soak) if soak else None,
            p50_ms_median=statistics.median(s["p50_ms"] for s in soak if s["p50_ms"] is not None)
            if soak
            else None,
            max_ms_max=max((s["max_ms"] or 0) for s in soak) if soak else None,
            leave_p99_ms_max=max((s["leave_p99_ms"] or 0) for s in soak) if soak else None,
        )
        self.write(summary)
        return summary

    def close(self) -> None:
        if self.pool is not None:
            with contextlib.suppress(Exception):
                self.pool.close_all(limit_s=5.0)
            self.pool.close()  # each worker joined, or killed by its PID
            self.pool = None
        self.out.close()


def table(summary: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    soak = [s for s in samples if s.get("phase") == "soak"]
    nums = summary.get("numbers", {})
    rss = nums.get("rss", {})
    fds = nums.get("fds", {})

    def f(v: Any, fmt: str = "{:,.1f}") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    rows = [
        ("ramp: connections ready in", f(summary.get("ramp_s"), "{:.1f} s")),
        ("samples after the ramp", f(len(soak), "{}")),
        ("connected (median of samples)", f(_med(s["connected"] for s in soak), "{:,.0f}")),
        (
            "server RSS start / end / max",
            " / ".join(mib(summary.get(k)) for k in RSS_KEYS) + " MiB",
        ),
        (
            "RSS slope (2nd half) / over the run",
            f"{f(rss.get('slope_per_min'), '{:+.3f}')} MiB/min"
            f" / {f(rss.get('growth'), '{:+.1f}')} MiB",
        ),
        (
            "open fds start / end / max",
            f"{summary.get('fds_start')} / {summary.get('fds_end')} / {summary.get('fds_max')}",
        ),
        (
            "fds slope over the run / max excess",
            f"{f(fds.get('growth'), '{:+.1f}')} / {nums.get('fd_excess_max')}",
        ),
        ("p50 latency (median of windows)", f(summary.get("p50_ms_median"), "{:.1f} ms")),
        (
            "p99 latency median / max of windows",
            f"{f(nums.get('p99_ms_median'), '{:.1f}')} / {f(nums.get('p99_ms_max'), '{:.1f}')} ms",
        ),
        ("max latency", f(summary.get("max_ms_max"), "{:.1f} ms")),
        (
            "server CPU median / max",
            f"{f(summary.get('server_cpu_pct_median'))} / {f(summary.get('server_cpu_pct_max'))} %",
        ),
        ("load generator CPU median", f(summary.get("loadgen_cpu_pct_median"), "{:.1f} %")),
        ("chats sent / received", f"{summary['sent']:,} / {summary['received']:,}"),
        ("deliveries owed / lost", f"{summary['owed']:,} / {summary['lost']:,}"),
        ("duplicated or out of order", f"{summary['duplicated']}"),
        (
            "churn cycles planned / done",
            f"{summary['cycles_planned']:,} / "
            f"{summary['cycles_done']:,} {summary['cycles_done_by']}",
        ),
        ("presence events received", f"{summary['presence_events']:,}"),
        (
            "presence leave seen, p99 (max of windows)",
            f(summary.get("leave_p99_ms_max"), "{:.1f} ms"),
        ),
        (
            "presence anomalies / lists ending wrong",
            f"{summary['presence_anomalies']} "
            f"{summary['anomalies'] or ''} / {summary['presence_mismatch']}",
        ),
        (
            "unexpected closes / failed connects / errors",
            f"{summary['unexpected_closes']} / {summary['connect_failed']} / "
            f"{summary['error_frames']}",
        ),
    ]
    if "gc2_count" in summary:
        rows.append(
            (
                "server full GCs after the ramp, longest",
                f"{summary['gc2_count']}, {summary['gc2_max_ms']:.0f} ms"
                + (
                    f" ({summary['gc_objects']:,} objects tracked)"
                    if "gc_objects" in summary
                    else ""
                ),
            )
        )
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'':{w}} | |", f"| {'-' * w} | --- |"]
    lines += [f"| {k:{w}} | {v} |" for k, v in rows]
    return "\n".join(lines)


RSS_KEYS = ("rss_start_kb", "rss_end_kb", "rss_max_kb")


def mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def _med(values: Iterable[float]) -> float | None:
    vals = list(values)
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------------------
# the plot


def read_jsonl(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The last run in *path*: its header, samples and summary."""
    run: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "run":
            run, samples, summary = rec, [], {}
        elif rec.get("kind") == "sample":
            samples.append(rec)
        elif rec.get("kind") == "summary":
            summary = rec
    return run, samples, summary


def plot(
    run: dict[str, Any], samples: list[dict[str, Any]], summary: dict[str, Any], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    args = run.get("args", {})
    fig, axes = plt.subplots(5, 1, figsize=(9, 11), sharex=True)
    panels: list[tuple[str, list[tuple[str, list[float | None], str]]]] = [
        ("server RSS, MiB", [("", [s["rss_kb"] / 1024 for s in samples], "tab:blue")]),
        ("open fds", [("", [s["fds"] for s in samples], "tab:orange")]),
        (
            "connections",
            [
                ("clients joined", [s["connected"] for s in samples], "tab:green"),
                ("server's count", [s.get("server_ws") for s in samples], "tab:olive"),
            ],
        ),
        ("p99 latency, ms", [("", [s["p99_ms"] for s in samples], "tab:red")]),
        (
            "CPU, % of a core",
            [
                ("server", [s["cpu_pct"] for s in samples], "tab:purple"),
                ("load generator", [s["loadgen_cpu_pct"] for s in samples], "tab:cyan"),
                ("redis", [s.get("redis_cpu_pct") for s in samples], "tab:brown"),
                ("whole machine", [s.get("machine_cpu_pct") for s in samples], "tab:gray"),
            ],
        ),
    ]
    soak = [s for s in samples if s.get("phase") == "soak"]
    for ax, (label, lines) in zip(axes, panels, strict=True):
        top = 0.0
        for name, ys, color in lines:
            pts = [(x, y) for x, y in zip(t, ys, strict=True) if y is not None]
            if not pts:
                continue
            ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, lw=1.1, label=name)
            top = max(top, max(y for _, y in pts))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if soak:
            t_ramp = soak[0]["t"] - soak[0]["dt"]
            warm = t_ramp + args.get("warmup", 0.2) * (soak[-1]["t"] - t_ramp)
            ax.axvline(t_ramp / 60, color="grey", ls="--", lw=0.8)
            ax.axvline(warm / 60, color="grey", ls=":", lw=0.8)
        if label.startswith(("open fds", "connections")):
            ax.margins(y=0.5)  # around the level: a drift shows
        else:
            ax.set_ylim(0, top * 1.12 or 1)
        if len([n for n, _, _ in lines if n]) > 1:
            ax.legend(loc="lower right", fontsize=7, ncol=4)
    gcs = [(x, s["p99_ms"]) for x, s in zip(t, samples, strict=True) if s.get("gc2_count")]
    if gcs:
        axes[3].plot(
            [x for x, _ in gcs],
            [y or 0 for _, y in gcs],
            "kx",
            ms=5,
            label="window with a full GC in the server",
        )
        axes[3].legend(loc="upper left", fontsize=7)
    bound = args.get("p99_bound")
    if bound:
        axes[3].axhline(bound, color="grey", ls=":", lw=0.8)
    axes[4].set_xlabel("minutes (dashed: the ramp's end; dotted: the warm-up's)")
    verdict_s = ""
    if summary:
        verdict_s = "PASS" if summary.get("passed") else "FAIL"
    title = (
        f"roombus soak: {args.get('connections')} connections, {args.get('transport')}"
        f"{' + redis' if args.get('redis') else ''}, churn {args.get('churn', 0) * 100:g} %/min, "
        f"{args.get('rate')} msg/s  {verdict_s}"
    )
    fig.suptitle(title, fontsize=11)
    cmd = run.get("command", "")
    fig.text(0.01, 0.005, "$ " + cmd, fontsize=7, family="monospace", wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--transport", choices=TRANSPORTS, default="trio")
    ap.add_argument("--redis", action="store_true", help="run a redis-server and the node on it")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--room-size", type=int, default=50)
    ap.add_argument("--rate", type=float, default=200.0, help="chat messages/s in all rooms")
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds after the ramp")
    ap.add_argument("--churn", type=float, default=0.05, help="of the connections per minute")
    ap.add_argument("--abrupt", type=float, default=0.2, help="of the churn: reset or silent")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--ping-interval", type=float, default=20.0, help="the server's")
    ap.add_argument("--ping-timeout", type=float, default=10.0, help="the server's")
    ap.add_argument(
        "--ghost-hold",
        type=float,
        default=0.0,
        help="seconds a silent leaver's socket stays open (default: ping interval + timeout + 10)",
    )
    ap.add_argument("--size", type=int, default=48, help="bytes of chat content")
    ap.add_argument("--workers", type=int, default=2, help="client processes")
    ap.add_argument("--inflight", type=int, default=100, help="parallel dials over all workers")
    ap.add_argument("--poll-pause-ms", type=float, default=2.0)
    ap.add_argument("--ramp-timeout", type=float, default=300.0)
    ap.add_argument(
        "--timeout", type=float, default=0.0, help="hard limit (default duration + 600)"
    )
    g = ap.add_argument_group("verdict")
    g.add_argument("--warmup", type=float, default=0.2, help="of the run after the ramp")
    g.add_argument("--rss-growth", type=float, default=0.10, help="of the RSS level")
    g.add_argument("--rss-growth-mib", type=float, default=64.0)
    g.add_argument("--fd-margin", type=int, default=0, help="default max(32, 1 %% of connections)")
    g.add_argument("--p99-bound", type=float, default=250.0, help="ms, in every window")
    ap.add_argument(
        "--gc-log",
        action="store_true",
        help="note the server's garbage collections (oldest generation, and any over 5 ms)",
    )
    g = ap.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="JSON lines (default results/soak-*)")
    g.add_argument("--plot", type=Path, default=None, help="PNG of RSS, fds, connections, p99")
    g.add_argument("--plot-only", type=Path, default=None, help="plot this JSON lines file")
    g.add_argument("--logdir", type=Path, default=None, help="child logs (default results/logs)")
    a = ap.parse_args(argv)
    if not a.ghost_hold:
        a.ghost_hold = a.ping_interval + a.ping_timeout + 10
    if not a.fd_margin:
        a.fd_margin = max(32, a.connections // 100)
    if not a.timeout:
        a.timeout = a.duration + 600
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if a.out is None:
        a.out = HERE / "results" / f"soak-{stamp}.jsonl"
    if a.logdir is None:
        a.logdir = HERE / "results" / "logs" / f"soak-{stamp}"
    a.command = shlex.join(["python3", "benchmarks/soak.py", *(argv or sys.argv[1:])])
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.plot_only is not None:
        if a.plot is None:
            print("--plot-only needs --plot FILE.png", file=sys.stderr)
            return 2
        run, samples, done = read_jsonl(a.plot_only)
        plot(run, samples, done, a.plot)
        return 0
    with contextlib.suppress(ValueError, OSError):
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.logdir.mkdir(parents=True, exist_ok=True)

    def on_alarm(_sig: int, _frame: FrameType | None) -> None:
        raise RunFailed(f"the run hit its --timeout of {a.timeout:g} s")

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(math.ceil(a.timeout))
    children = Children(a.logdir)
    soak = Soak(a, children)
    code = 2
    summary: dict[str, Any] = {}
    try:
        summary = soak.run()
        code = 0 if summary["passed"] else 1
    except RunFailed as exc:
        log("run failed:", exc)
    except KeyboardInterrupt:
        log("interrupted")
    except Exception:  # the harness's own failure: exit 2, after ending every child
        log("run failed:\n" + traceback.format_exc())
    finally:
        signal.alarm(0)
        with contextlib.suppress(Exception):
            soak.close()
        children.end_all()
    if summary:
        print(table(summary, soak.samples))
        print()
        if summary["passed"]:
            print("PASS: RSS and fds plateau, p99 bounded, nothing owed lost, no errors")
        else:
            print("FAIL:")
            for reason in summary["reasons"]:
                print("  -", reason)
        print(f"samples: {a.out}")
        if a.plot is not None and soak.samples:
            run, samples, summ = read_jsonl(a.out)
            plot(run, samples, summ, a.plot)
            print(f"plot: {a.plot}")
    return code


if __name__ == "__main__":
    sys.exit(main())
