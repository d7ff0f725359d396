#!/usr/bin/env python3
"""
A multi-process WebSocket load generator for roombus and anything speaking its protocol.

Each worker process drives its share of the connections from one ``epoll`` loop over
raw non-blocking sockets, with a minimal hand-written client side of RFC 6455 (masked
client frames out, server frames parsed in place). Received chat messages are not
JSON-decoded: one regular expression run over every batch of complete frames pulls
out the publisher, sequence number and send time embedded in the content.

A coordinator (the main process) tells the workers what to do over pipes and turns
their counters into one JSON line on stdout. Progress goes to stderr.

Scenarios:
  fanout  1 room, N subscribers + P publishers; the publish rate is raised stage by stage
  rooms   R rooms x M members, every member publishing at r msg/s; r raised stage by stage
  idle    C idle connections; server VmRSS before and after
  churn   observers in rooms; workers connect and leave as fast as they can

Loopback only; every wait is bounded, and the whole run has a hard --timeout.
"""

from __future__ import annotations

import argparse
import array
import base64
import contextlib
import errno
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NoReturn, TypedDict, cast

MONO = time.monotonic_ns
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# connection states
CONNECTING, HANDSHAKE, OPEN, CLOSING, DONE = range(5)
# roles
SUB, PUB, OBS, CHURN = "sub", "pub", "obs", "churn"

RX_JOIN = re.compile(rb'"event":\s*"join"')
RX_LEAVE = re.compile(rb'"event":\s*"leave"')
RX_STATE = re.compile(rb'"type":\s*"presence_state"')
RX_ERROR = re.compile(rb'"type":\s*"error"')
RX_RATE_LIMITED = re.compile(rb'"code":\s*"rate_limited"')

# (room, username, role[, publisher id]): the arguments of a Conn
Spec = tuple[str, str, str] | tuple[str, str, str, int]
# one stage's (or a ramp's, or a scenario's) result: a JSON object
Result = dict[str, Any]


class Status(TypedDict):
    """A worker's counters (Worker.status), or their sums over the workers (Pool.status)."""

    opened: int
    ready: int
    failed: int
    dropped: int
    drop_codes: dict[int, int]
    pending: int
    joins: int
    leaves: int
    obs_presence: int
    received: int
    sent: int
    sending: bool
    rx_bytes: int
    cycles: int
    churn_active: int
    churn_last_end: int
    open_conns: int
    closed_done: int


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a fresh random key (RFC 6455 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    key = random.getrandbits(32).to_bytes(4, "little")
    if n:
        k = int.from_bytes(key * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
        payload = (int.from_bytes(payload, "little") ^ k).to_bytes(n, "little")
    return head + key + payload


def chat_payload(sid: int, pub: int, seq: int, size: int) -> bytes:
    """A chat request whose content carries stage, publisher, sequence and send time."""
    content = b"bm:%d:%d:%d:%d:" % (sid, pub, seq, MONO())
    if len(content) < size:
        content += b"x" * (size - len(content))
    return b'{"type":"chat","content":"' + content + b'"}'


def complete_frames(buf: bytes, data: bytes) -> tuple[bytes, bytes, bool]:
    """
    Split ``buf + data`` (server frames, unmasked) into the complete frames and the
    rest; the flag says whether any of the complete ones is not a final text frame.
    """
    if buf:
        data = buf + data
    n = len(data)
    pos = 0
    special = False
    # Walk the frame headers to find where the last complete frame ends.
    while n - pos >= 2:
        ln = data[pos + 1]
        if ln < 126:
            end = pos + 2 + ln
        elif ln == 126:
            if n - pos < 4:
                break
            end = pos + 4 + ((data[pos + 2] << 8) | data[pos + 3])
        else:
            if n - pos < 10:
                break
            end = pos + 10 + int.from_bytes(data[pos + 2 : pos + 10], "big")
        if end > n:
            break
        if data[pos] != 0x81:
            special = True
        pos = end
    if pos < n:
        return data[:pos], data[pos:], special
    return data, b"", special


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


class Conn:
    __slots__ = (
        "buf",
        "code",
        "fd",
        "key",
        "last",
        "out",
        "pubid",
        "ready",
        "role",
        "room",
        "slot",
        "sock",
        "state",
        "t_open",
        "user",
    )

    def __init__(self, room: str, user: str, role: str, pubid: int = -1, slot: int = -1):
        self.room = room
        self.user = user
        self.role = role
        self.pubid = pubid
        self.slot = slot
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.last: dict[bytes, int] = {}
        self.ready = False
        self.code = 0
        self.t_open = 0
        self.key = b""


# ---------------------------------------------------------------------------------------
# worker process


class Worker:
    def __init__(
        self, wid: int, pipe: Connection[Any, Any], host: str, port: int, size: int, inflight: int
    ):
        self.wid = wid
        self.pipe = pipe
        self.host = host
        self.port = port
        self.size = size
        self.max_inflight = inflight
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.pending: list[Conn] = []  # waiting to be dialled
        self.inflight = 0
        self.pubs: list[Conn] = []
        self.dropped: list[Conn] = []
        self.exit = False
        self.pause = 0.0  # set by worker_main
        self.parent = os.getppid()
        # totals (never reset)
        self.opened = 0
        self.ready = 0
        self.connect_failed = 0
        self.joins = 0
        self.leaves = 0
        self.obs_presence = 0
        self.rx_bytes = 0
        self.ndropped = 0
        self.drop_codes: dict[int, int] = {}
        self.closed_done = 0
        # per stage
        self.chat_re: re.Pattern[bytes] | None = None
        self.reset_stage()
        # publishing
        self.sending = False
        # churn
        self.churn_end = 0
        self.churn_rooms: list[str] = []
        self.churn_n = 0
        self.cycles = 0
        self.churn_active = 0
        self.churn_last_end = 0

    def reset_stage(self) -> None:
        self.received = 0
        self.ooo = 0
        self.gaps = 0
        self.errors = 0
        self.rate_limited = 0
        self.lat = array.array("q")
        self.sent = 0
        self.lag_max = 0
        self.send_end = 0
        self.stage_dropped = 0
        self.cpu0 = time.process_time()
        self.user0 = os.times().user

    # -- connecting ---------------------------------------------------------------------

    def dial(self, c: Conn) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.connect_failed += 1
            self.after_close(c, failed=True)
            return
        c.sock = s
        c.fd = s.fileno()
        c.state = CONNECTING
        c.buf = c.out = b""
        c.ready = False
        c.t_open = MONO()
        self.conns[c.fd] = c
        self.inflight += 1
        self.ep.register(c.fd, EPOLLOUT)

    def on_connected(self, c: Conn) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(c)
            return
        key = c.key = base64.b64encode(random.getrandbits(128).to_bytes(16, "big"))
        req = (
            b"GET /ws?room=%s&username=%s HTTP/1.1\r\n"
            b"Host: %s:%d\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (c.room.encode(), c.user.encode(), self.host.encode(), self.port, key)
        )
        try:
            c.sock.send(req)
        except OSError:
            self.fail(c)
            return
        c.state = HANDSHAKE
        c.buf = b""
        self.ep.modify(c.fd, EPOLLIN)

    def on_handshake(self, c: Conn, now: int) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.fail(c)
            return
        if not data:
            self.fail(c)
            return
        buf = c.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            c.buf = buf
            return
        head = buf[:end]
        want = base64.b64encode(hashlib.sha1(c.key + WS_GUID).digest())
        if not head.startswith(b"HTTP/1.1 101") or want.lower() not in head.lower():
            self.fail(c)
            return
        c.state = OPEN
        c.last = {}
        c.buf = b""
        self.inflight -= 1
        self.opened += 1
        if c.role == PUB:
            self.pubs.append(c)
        rest = buf[end + 4 :]
        if rest:
            self.on_data(c, rest, now)

    def fail(self, c: Conn) -> None:
        self.connect_failed += 1
        self.inflight -= 1
        self.forget(c)
        self.after_close(c, failed=True)

    def forget(self, c: Conn) -> None:
        if c.sock is not None:
            self.conns.pop(c.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(c.fd)
            c.sock.close()
            c.sock = None
        c.state = DONE

    def after_close(self, c: Conn, *, failed: bool = False) -> None:
        """A churner's cycle ended (or its dial failed): start the next one."""
        if c.role != CHURN:
            if failed:
                self.dropped.append(c)
            return
        self.churn_active -= 1
        if not failed:
            self.cycles += 1
            self.churn_last_end = MONO()
        if MONO() < self.churn_end:
            self.start_churner(c.slot)

    def start_churner(self, slot: int) -> None:
        self.churn_n += 1
        room = self.churn_rooms[slot % len(self.churn_rooms)]
        c = Conn(room, f"c{self.wid}x{self.churn_n}", CHURN, slot=slot)
        self.churn_active += 1
        self.dial(c)

    # -- reading ------------------------------------------------------------------------

    def on_readable(self, c: Conn) -> None:
        assert c.sock is not None  # run() checks
        try:
            data = c.sock.recv(65536)  # < malloc's mmap threshold
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.lost(c, 1006)
            return
        self.on_data(c, data, MONO())

    def on_data(self, c: Conn, data: bytes, now: int) -> None:
        self.rx_bytes += len(data)
        data, c.buf, special = complete_frames(c.buf, data)
        if not data:
            return
        rx = self.chat_re
        if rx is not None:
            found = rx.findall(data)
            if found:
                last = c.last
                append = self.lat.append
                for pub, seq, t in found:
                    s = int(seq)
                    p = last.get(pub, 0)
                    if s > p:
                        if s != p + 1:
                            self.gaps += 1
                        last[pub] = s
                    else:
                        self.ooo += 1
                    append(now - int(t))
                self.received += len(found)
        if b'"presence' in data or b'"error"' in data:
            self.on_rare(c, data)
        if special:
            self.on_control(c, data)

    def on_rare(self, c: Conn, data: bytes) -> None:
        joins = len(RX_JOIN.findall(data))
        leaves = len(RX_LEAVE.findall(data))
        self.joins += joins
        self.leaves += leaves
        if c.role == OBS:
            self.obs_presence += joins + leaves
        if not c.ready and RX_STATE.search(data):
            c.ready = True
            self.ready += 1
            if c.role == CHURN and c.state == OPEN:
                self.send(c, client_frame(0x8, (1000).to_bytes(2, "big")))
                c.state = CLOSING
        if b'"error"' in data:
            self.errors += len(RX_ERROR.findall(data))
            self.rate_limited += len(RX_RATE_LIMITED.findall(data))

    def on_control(self, c: Conn, data: bytes) -> None:
        n = len(data)
        pos = 0
        while pos < n:
            sock = c.sock
            if sock is None:  # lost (maybe while answering an earlier ping of this batch)
                return
            b0 = data[pos]
            ln = data[pos + 1] & 0x7F
            head = 2
            if ln == 126:
                ln = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif ln == 127:
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            payload = data[pos + head : pos + head + ln]
            pos += head + ln
            op = b0 & 0x0F
            if op == 0x9:  # ping
                self.send(c, client_frame(0xA, payload))
            elif op == 0x8:  # close
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if c.state == CLOSING:
                    self.closed_ok(c)
                else:
                    with contextlib.suppress(OSError):
                        sock.send(client_frame(0x8, payload[:2]))
                    self.lost(c, code)
                return

    def lost(self, c: Conn, code: int) -> None:
        if c.state == CLOSING:
            self.closed_ok(c)
            return
        if c.role == CHURN:  # refused or cut before it was in: a failed cycle
            self.connect_failed += 1
            self.forget(c)
            self.after_close(c, failed=True)
            return
        self.ndropped += 1
        self.stage_dropped += 1
        self.drop_codes[code] = self.drop_codes.get(code, 0) + 1
        if c.ready:
            self.ready -= 1
        if c in self.pubs:
            self.pubs.remove(c)
        self.forget(c)
        self.after_close(c, failed=True)

    def closed_ok(self, c: Conn) -> None:
        if c.ready:
            self.ready -= 1
        self.closed_done += 1
        self.forget(c)
        self.after_close(c)

    # -- writing ------------------------------------------------------------------------

    def send(self, c: Conn, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        assert c.sock is not None  # only open connections are written to
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.lost(c, 1006)
            return
        if n < len(data):
            c.out = data[n:]
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    def on_writable(self, c: Conn) -> None:
        assert c.sock is not None  # run() only calls it for open connections
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self.lost(c, 1006)
            return
        c.out = c.out[n:]
        if not c.out:
            self.ep.modify(c.fd, EPOLLIN)

    # -- publishing ---------------------------------------------------------------------

    def start_stage(self, sid: int, rate: float, t0: int, dur: float, phase: float) -> None:
        self.reset_stage()
        self.chat_re = re.compile(rb"bm:%d:(\d+):(\d+):(\d+):" % sid)
        for c in self.conns.values():
            c.last = {}
        self.sid = sid
        k = len(self.pubs)
        if k and rate > 0:
            self.pub_order = sorted(self.pubs, key=lambda c: c.pubid)
            self.local_rate = k * rate  # messages per second from this worker
            self.total = max(1, round(dur * self.local_rate))
            self.t0 = t0 + int(phase / self.local_rate * 1e9)
            self.sending = True

    def publish(self, now: int) -> float:
        """Send every message that is due; returns seconds until the next one."""
        sent = self.sent
        t0 = self.t0
        if now < t0:
            return (t0 - now) / 1e9
        r = self.local_rate
        due = min(self.total, int((now - t0) * r / 1e9) + 1)
        pubs = self.pub_order
        k = len(pubs)
        sid = self.sid
        size = self.size
        if due > sent:
            lag = now - (t0 + int(sent / r * 1e9))
            if lag > self.lag_max:
                self.lag_max = lag
        while sent < due:
            c = pubs[sent % k]
            if c.state == OPEN:
                self.send(c, client_frame(0x1, chat_payload(sid, c.pubid, sent // k + 1, size)))
            sent += 1
        self.sent = sent
        if sent >= self.total:
            self.sending = False
            self.send_end = MONO()
            return 0.1
        return max(0.0, (t0 + sent / r * 1e9 - MONO()) / 1e9)

    # -- commands -----------------------------------------------------------------------

    def status(self) -> Status:
        return {
            "opened": self.opened,
            "ready": self.ready,
            "failed": self.connect_failed,
            "dropped": self.ndropped,
            "drop_codes": self.drop_codes,
            "pending": len(self.pending) + self.inflight,
            "joins": self.joins,
            "leaves": self.leaves,
            "obs_presence": self.obs_presence,
            "received": self.received,
            "sent": self.sent,
            "sending": self.sending,
            "rx_bytes": self.rx_bytes,
            "cycles": self.cycles,
            "churn_active": self.churn_active,
            "churn_last_end": self.churn_last_end,
            "open_conns": len(self.conns),
            "closed_done": self.closed_done,
        }

    def command(self) -> None:
        try:
            msg = self.pipe.recv()
        except EOFError:
            self.exit = True
            return
        self.handle(msg)

    def handle(self, msg: tuple[Any, ...]) -> None:
        op = msg[0]
        if op == "open":
            self.pending.extend(Conn(*spec) for spec in msg[1])
        elif op == "reopen":  # up to msg[1] of the dropped connections
            again, self.dropped = self.dropped[: msg[1]], self.dropped[msg[1] :]
            self.pending.extend(Conn(c.room, c.user, c.role, c.pubid) for c in again)
            self.pipe.send(len(again))
        elif op == "status":
            self.pipe.send(self.status())
        elif op == "stage":
            self.start_stage(*msg[1:])
        elif op == "collect":
            out: dict[str, Any] = dict(self.status())
            out.update(
                ooo=self.ooo,
                gaps=self.gaps,
                errors=self.errors,
                rate_limited=self.rate_limited,
                stage_dropped=self.stage_dropped,
                lag_max=self.lag_max,
                send_end=self.send_end,
                cpu=time.process_time() - self.cpu0,
                cpu_user=os.times().user - self.user0,
                lat=self.lat.tobytes(),
            )
            self.pipe.send(out)
            self.reset_stage()
        elif op == "churn":
            _, rooms, slots, t_end = msg
            self.churn_rooms = rooms
            self.churn_end = t_end
            self.cpu0 = time.process_time()
            for slot in range(slots):
                self.start_churner(slot)
        elif op == "cpu":
            self.pipe.send(time.process_time())
        elif op == "close_all":
            for c in list(self.conns.values()):
                if c.state == OPEN:
                    c.state = CLOSING
                    self.send(c, client_frame(0x8, (1000).to_bytes(2, "big")))
                elif c.state in (CONNECTING, HANDSHAKE):
                    self.forget(c)
            self.pending = []
        elif op == "exit":
            self.exit = True

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        ep = self.ep
        conns = self.conns
        pipefd = self.pipe.fileno()
        ep.register(pipefd, EPOLLIN)
        timeout = 0.1
        last_check = MONO()
        while not self.exit:
            try:
                events = ep.poll(timeout)
            except InterruptedError:
                continue
            now = MONO()
            for fd, ev in events:
                c = conns.get(fd)
                if c is None:
                    if fd == pipefd:
                        self.command()
                    continue
                st = c.state
                if st in (OPEN, CLOSING):
                    if ev & EPOLLOUT and c.out:
                        self.on_writable(c)
                    if ev & ~EPOLLOUT and c.sock is not None:
                        self.on_readable(c)
                elif st == CONNECTING:
                    self.on_connected(c)
                elif st == HANDSHAKE:
                    self.on_handshake(c, MONO())
            timeout = 0.1
            if self.sending:
                timeout = self.publish(MONO())
            if events and self.pause:
                # Let readable sockets pile up for a moment: one epoll_wait (and one
                # wake-up) then serves many of them, and a recv() may get several frames.
                t = min(self.pause, timeout)
                if t > 0:
                    time.sleep(t)
                    if self.sending:
                        timeout = self.publish(MONO())
            while self.pending and self.inflight < self.max_inflight:
                self.dial(self.pending.pop(0))
            if now - last_check > 1_000_000_000:
                last_check = now
                if os.getppid() != self.parent:  # the coordinator is gone
                    break
        for c in list(conns.values()):
            self.forget(c)


def worker_main(
    wid: int,
    pipe: Connection[Any, Any],
    host: str,
    port: int,
    size: int,
    inflight: int,
    pause: float,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    w = Worker(wid, pipe, host, port, size, inflight)
    w.pause = pause
    w.run()


# ---------------------------------------------------------------------------------------
# coordinator


def percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[i]


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


class Pool:
    def __init__(self, args: argparse.Namespace, target: Callable[..., None] = worker_main) -> None:
        """*target*: each worker process's main, called as ``worker_main`` is."""
        self.args = args
        self.pid: int = args.server_pid
        self.k: int = args.workers
        self.pipes: list[Connection[Any, Any]] = []
        self.procs: list[mp.process.BaseProcess] = []
        inflight = max(1, math.ceil(args.inflight / self.k))
        ctx = mp.get_context("fork")
        for i in range(self.k):
            a, b = ctx.Pipe()
            p = ctx.Process(
                target=target,
                args=(i, b, args.host, args.port, args.size, inflight, args.poll_pause_ms / 1e3),
                daemon=True,
            )
            p.start()
            b.close()
            self.pipes.append(a)
            self.procs.append(p)
        self.sid = 0
        self.cpu_lg = 0.0

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        for p in self.procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()  # by its PID
                p.join(timeout=1)

    def ask(self, msg: tuple[Any, ...]) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(msg)
        out = []
        for pipe in self.pipes:
            if not pipe.poll(30):
                raise RuntimeError(f"worker did not answer {msg[0]!r} within 30 s")
            out.append(pipe.recv())
        return out

    def tell(self, msg: tuple[Any, ...], i: int | None = None) -> None:
        for j, pipe in enumerate(self.pipes):
            if i is None or i == j:
                pipe.send(msg)

    def status(self) -> Status:
        total: dict[str, Any] = {}
        for st in self.ask(("status",)):
            for key, v in st.items():
                if isinstance(v, bool):
                    total[key] = total.get(key, False) or v
                elif isinstance(v, dict):
                    d = total.setdefault(key, {})
                    for kk, vv in v.items():
                        d[kk] = d.get(kk, 0) + vv
                elif key == "churn_last_end":
                    total[key] = max(total.get(key, 0), v)
                else:
                    total[key] = total.get(key, 0) + v
        return cast("Status", total)  # every worker's keys, summed

    def server_cpu(self) -> float:
        return proc_cpu_seconds(self.pid) if self.pid else float("nan")

    def server_rss(self) -> int:
        return proc_rss_kb(self.pid) if self.pid else 0

    # -- setup ----------------------------------------------------------------------

    def open_members(
        self,
        specs: list[Spec],
        batch: int,
        expected_joins: Callable[[dict[str, int]], int],
        timeout: float = 60.0,
    ) -> Result:
        """Open *specs* in batches; after each, wait until every join presence has arrived."""
        t_start = time.monotonic()
        st = self.status()
        base_ready = st["ready"]
        base_joins = st["joins"]
        done = 0
        members: dict[str, int] = {}
        joins_goal = 0
        while done < len(specs):
            chunk = specs[done : done + batch]
            per: list[list[Spec]] = [[] for _ in range(self.k)]
            for j, spec in enumerate(chunk):
                per[(done + j) % self.k].append(spec)
                members[spec[0]] = members.get(spec[0], 0) + 1
            for i, lst in enumerate(per):
                if lst:
                    self.tell(("open", lst), i)
            done += len(chunk)
            joins_goal = expected_joins(members)
            while True:
                st = self.status()
                if st["ready"] - base_ready >= done and st["joins"] - base_joins >= joins_goal:
                    break
                if st["failed"] or st["dropped"]:
                    raise RuntimeError(f"setup: connections failed or dropped: {st}")
                if time.monotonic() - t_start > timeout:
                    raise RuntimeError(
                        f"setup timed out: ready {st['ready'] - base_ready}/{done}, "
                        f"joins {st['joins'] - base_joins}/{joins_goal}"
                    )
                time.sleep(0.02)
        return {"setup_s": round(time.monotonic() - t_start, 3)}

    def close_all(self, limit_s: float = 3.0) -> None:
        """Close every connection with a close handshake (bounded), as a polite client."""
        self.tell(("close_all",))
        t_end = time.monotonic() + limit_s
        while time.monotonic() < t_end and self.status()["open_conns"]:
            time.sleep(0.05)

    def wait_quiet(self, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
        t_end = time.monotonic() + limit_s
        last = self.status()["rx_bytes"]
        t_last = time.monotonic()
        while time.monotonic() < t_end:
            time.sleep(0.05)
            rx = self.status()["rx_bytes"]
            if rx != last:
                last = rx
                t_last = time.monotonic()
            elif time.monotonic() - t_last >= quiet_s:
                return

    def reopen(self, timeout: float = 60.0) -> None:
        """Reconnect dropped connections, paced like the setup (--join-batch at a time)."""
        t_end = time.monotonic() + timeout
        per = max(1, self.args.join_batch // self.k)
        while time.monotonic() < t_end:
            st0 = self.status()
            n = sum(self.ask(("reopen", per)))
            if not n:
                break
            while time.monotonic() < t_end:
                time.sleep(0.05)
                st = self.status()
                failed = st["failed"] - st0["failed"]
                if st["pending"] == 0 and st["ready"] - st0["ready"] >= n - failed:
                    break
            self.wait_quiet(quiet_s=0.2)
        self.wait_quiet()

    # -- one stage --------------------------------------------------------------------

    def stage(self, rate_per_pub: float, fan: int, dur: float, drain: float) -> Result:
        self.sid += 1
        sid = self.sid
        t0 = MONO() + 150_000_000
        for i in range(self.k):  # workers' schedules interleave evenly
            self.tell(("stage", sid, rate_per_pub, t0, dur, i / self.k), i)
        time.sleep(max(0.0, (t0 - MONO()) / 1e9))
        cpu0 = self.server_cpu()
        w0 = time.monotonic()
        time.sleep(dur)
        deadline = time.monotonic() + drain + 0.5
        while True:
            st = self.status()
            expected = st["sent"] * fan
            if not st["sending"] and st["received"] >= expected:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        cpu1 = self.server_cpu()
        w1 = time.monotonic()
        parts: list[dict[str, Any]] = self.ask(("collect",))
        lat = array.array("q")
        for p in parts:
            lat.frombytes(p["lat"])
        lat_sorted = sorted(lat)
        sent = sum(p["sent"] for p in parts)
        received = sum(p["received"] for p in parts)
        expected = sent * fan
        send_end = max(p["send_end"] for p in parts) or MONO()
        send_span = (send_end - t0) / 1e9
        lg_cpu = sum(p["cpu"] for p in parts)
        res: Result = {
            "sid": sid,
            "sent": sent,
            "expected": expected,
            "received": received,
            "lost": max(0, expected - received),
            "extra": max(0, received - expected),
            "out_of_order": sum(p["ooo"] for p in parts),
            "gaps": sum(p["gaps"] for p in parts),
            "errors": sum(p["errors"] for p in parts),
            "rate_limited": sum(p["rate_limited"] for p in parts),
            "dropped": sum(p["stage_dropped"] for p in parts),
            "p50_ms": round(percentile(lat_sorted, 0.50) / 1e6, 3),
            "p99_ms": round(percentile(lat_sorted, 0.99) / 1e6, 3),
            "p999_ms": round(percentile(lat_sorted, 0.999) / 1e6, 3),
            "max_ms": round(lat_sorted[-1] / 1e6, 3) if lat_sorted else None,
            "deliveries_per_s": round(received / dur),
            "send_lag_max_ms": round(max(p["lag_max"] for p in parts) / 1e6, 2),
            "send_span_s": round(send_span, 3),
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "server_cpu_pct": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
            "server_cpu_us_per_delivery": round(1e6 * (cpu1 - cpu0) / received, 3)
            if received
            else None,
            "loadgen_cpu_pct": round(100 * lg_cpu / (w1 - w0 + 0.15), 1),
            "loadgen_cpu_us_per_delivery": round(1e6 * lg_cpu / received, 3) if received else None,
            "loadgen_user_us_per_delivery": round(
                1e6 * sum(p["cpu_user"] for p in parts) / received, 3
            )
            if received
            else None,
        }
        behind = send_span > dur * 1.1 + 0.05
        res["loadgen_behind"] = behind
        res["passed"] = (
            res["lost"] == 0
            and res["dropped"] == 0
            and res["errors"] == 0
            and received > 0
            and res["p99_ms"] <= self.args.p99_limit_ms
            and not behind
        )
        return res


def ramp(
    pool: Pool,
    label: str,
    start: float,
    rmax: float,
    rmin: float,
    run_stage: Callable[[float], Result],
) -> Result:
    """
    Raise the rate by doubling until a stage fails (a failure is retried once), then
    narrow the gap between the last pass and the first fail by geometric bisection.
    """
    stages: list[Result] = []
    best: Result | None = None
    fail: float | None = None

    def attempt(rate: float) -> bool:
        nonlocal best
        for tri in range(2):
            res = run_stage(rate)
            res["rate"] = round(rate, 3)
            res["try"] = tri + 1
            stages.append(res)
            log(
                f"  [{label}] rate {rate:9.2f} msg/s: {res['deliveries_per_s']:>9,} deliv/s "
                f"p99 {res['p99_ms']:8.2f} ms lost {res['lost']} drop {res['dropped']} "
                f"ooo {res['out_of_order']} err {res['errors']} srv {res['server_cpu_pct']}% "
                f"lg {res['loadgen_cpu_pct']}% {'PASS' if res['passed'] else 'fail'}"
            )
            if res["dropped"]:
                pool.reopen()
            if res["passed"]:
                if best is None or rate > best["rate"]:
                    best = res
                return True
            pool.wait_quiet()
        return False

    r = min(start, rmax)
    while True:
        if not attempt(r):
            fail = r
            break
        if r >= rmax:
            break
        r = min(r * 2, rmax)
    if best is None and fail is not None:  # the first stage failed: look lower
        r = fail / 2
        while r >= rmin and best is None:
            if attempt(r):
                break
            fail = r
            r /= 2
    if best is not None and fail is not None:
        lo, hi = best["rate"], fail
        for _ in range(pool.args.refine):
            mid = math.sqrt(lo * hi)
            if attempt(mid):
                lo = mid
            else:
                hi = mid
    out: Result = {"stages": stages, "capped": fail is None}
    if best is not None:
        out.update(
            max_rate=best["rate"],
            max_sustainable_deliveries_per_s=best["deliveries_per_s"],
            p50_ms=best["p50_ms"],
            p99_ms=best["p99_ms"],
            server_cpu_pct=best["server_cpu_pct"],
            server_cpu_us_per_delivery=best["server_cpu_us_per_delivery"],
            loadgen_cpu_pct=best["loadgen_cpu_pct"],
            loadgen_cpu_us_per_delivery=best["loadgen_cpu_us_per_delivery"],
        )
    else:
        out.update(max_rate=0, max_sustainable_deliveries_per_s=0)
    out["out_of_order_total"] = sum(s["out_of_order"] for s in stages)
    out["stages_run"] = len(stages)
    return out


def joins_in(members: dict[str, int]) -> int:
    """Join presences delivered when rooms fill up one user at a time: 1 + 2 + ... + m."""
    return sum(m * (m + 1) // 2 for m in members.values())


def scenario_fanout(pool: Pool, a: argparse.Namespace) -> Result:
    p = a.publishers or max(1, math.ceil(a.max_deliveries / a.subs / a.per_publisher_max))
    specs: list[Spec] = [("fan", f"s{i}", SUB) for i in range(a.subs)]
    specs += [("fan", f"p{j}", PUB, j) for j in range(p)]
    members = a.subs + p
    setup = pool.open_members(specs, a.join_batch, joins_in)
    pool.wait_quiet()
    start = max(a.start_deliveries / members, 0.5)
    rmax = a.max_deliveries / members
    if a.rates:
        stages = []
        for r in (float(x) for x in a.rates.split(",")):
            st = pool.stage(r / p, members, a.stage_s, a.drain_s)
            st["rate"] = r
            log(f"  rate {r}: {st}")
            stages.append(st)
        return {"stages": stages, **setup, "subs": a.subs, "publishers": p}
    res = ramp(
        pool,
        f"fanout {a.subs}",
        start,
        rmax,
        start / 16,
        lambda r: pool.stage(r / p, members, a.stage_s, a.drain_s),
    )
    res.update(setup, subs=a.subs, publishers=p, members=members)
    return res


def scenario_rooms(pool: Pool, a: argparse.Namespace) -> Result:
    specs: list[Spec] = [
        (f"r{r}", f"m{r}x{m}", PUB, r * a.members + m)
        for m in range(a.members)
        for r in range(a.rooms)
    ]
    setup = pool.open_members(specs, max(a.join_batch, a.rooms * 2), joins_in)
    pool.wait_quiet()
    res = ramp(
        pool,
        f"rooms {a.rooms}x{a.members}",
        a.start_rate,
        a.max_rate,
        a.start_rate / 8,
        lambda r: pool.stage(r, a.members, a.stage_s, a.drain_s),
    )
    res.update(setup, rooms=a.rooms, members=a.members)
    return res


def scenario_idle(pool: Pool, a: argparse.Namespace) -> Result:
    n_rooms = max(1, a.conns // a.room_size)
    rss0 = pool.server_rss()
    cpu0 = pool.server_cpu()
    specs: list[Spec] = [(f"i{i % n_rooms}", f"u{i}", SUB) for i in range(a.conns)]
    t0 = time.monotonic()
    setup = pool.open_members(specs, len(specs), joins_in, timeout=120)
    t_conn = time.monotonic() - t0
    cpu1 = pool.server_cpu()
    rss_peak = pool.server_rss()
    t_end = time.monotonic() + a.hold_s
    while time.monotonic() < t_end:
        time.sleep(0.25)
        rss_peak = max(rss_peak, pool.server_rss())
    rss1 = pool.server_rss()
    st = pool.status()
    return {
        "conns": a.conns,
        "rooms": n_rooms,
        "rss_before_kb": rss0,
        "rss_after_kb": rss1,
        "rss_peak_kb": rss_peak,
        "server_bytes_per_conn": round((rss1 - rss0) * 1024 / a.conns),
        "connect_s": round(t_conn, 3),
        "connects_per_s": round(a.conns / t_conn),
        "server_cpu_us_per_connect": round(1e6 * (cpu1 - cpu0) / a.conns, 1),
        "dropped": st["dropped"],
        "failed": st["failed"],
        **setup,
    }


def scenario_churn(pool: Pool, a: argparse.Namespace) -> Result:
    rooms = [f"c{r}" for r in range(a.rooms)]
    specs: list[Spec] = [
        (room, f"o{r}x{m}", OBS) for m in range(a.observers) for r, room in enumerate(rooms)
    ]
    setup = pool.open_members(specs, len(specs), joins_in)
    pool.wait_quiet()
    st0 = pool.status()
    cpu0 = pool.server_cpu()
    lg0 = sum(pool.ask(("cpu",)))
    t0 = MONO()
    t_end = t0 + int(a.churn_s * 1e9)
    per = [a.churners // pool.k + (1 if i < a.churners % pool.k else 0) for i in range(pool.k)]
    for i, n in enumerate(per):
        pool.tell(("churn", rooms, n, t_end), i)
    time.sleep(a.churn_s)
    limit = time.monotonic() + 10
    while True:
        st = pool.status()
        if st["churn_active"] == 0 or time.monotonic() > limit:
            break
        time.sleep(0.02)
    t_last = st["churn_last_end"] or MONO()
    cpu1 = pool.server_cpu()
    lg1 = sum(pool.ask(("cpu",)))
    span = (t_last - t0) / 1e9
    cycles = st["cycles"] - st0["cycles"]
    expected = 2 * a.observers * cycles
    limit = time.monotonic() + 3
    while True:
        st = pool.status()
        got = st["obs_presence"] - st0["obs_presence"]
        if got >= expected or time.monotonic() > limit:
            break
        time.sleep(0.02)
    return {
        "rooms": a.rooms,
        "observers_per_room": a.observers,
        "churners": a.churners,
        "cycles": cycles,
        "span_s": round(span, 3),
        "connects_per_s": round(cycles / span) if span > 0 else 0,
        "presence_expected": expected,
        "presence_received": got,
        "presence_lost": max(0, expected - got),
        "presence_per_s": round(got / span) if span > 0 else 0,
        "failed": st["failed"] - st0["failed"],
        "observers_dropped": st["dropped"] - st0["dropped"],
        "server_cpu_us_per_cycle": round(1e6 * (cpu1 - cpu0) / cycles, 1) if cycles else None,
        "loadgen_cpu_us_per_cycle": round(1e6 * (lg1 - lg0) / cycles, 1) if cycles else None,
        **setup,
    }


SCENARIOS: dict[str, Callable[[Pool, argparse.Namespace], Result]] = {
    "fanout": scenario_fanout,
    "rooms": scenario_rooms,
    "idle": scenario_idle,
    "churn": scenario_churn,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    ap.add_argument("--host", default="127.0.0.1", help="must be a loopback address")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server-pid", type=int, default=0, help="for server CPU and VmRSS")
    ap.add_argument("--workers", type=int, default=0, help="processes (default: usable CPUs, >= 2)")
    ap.add_argument("--inflight", type=int, default=50, help="parallel dials over all workers")
    ap.add_argument("--size", type=int, default=48, help="bytes of chat content")
    ap.add_argument(
        "--poll-pause-ms",
        type=float,
        default=1.0,
        help="pause after a busy "
        "poll round so the next one serves more sockets (adds <= this to latency)",
    )
    ap.add_argument("--timeout", type=float, default=300, help="hard limit for the whole run, s")
    ap.add_argument("--p99-limit-ms", type=float, default=100.0)
    ap.add_argument("--stage-s", type=float, default=1.5, help="seconds each stage publishes")
    ap.add_argument("--drain-s", type=float, default=1.0, help="extra wait for stragglers")
    ap.add_argument("--refine", type=int, default=3, help="bisection steps after the first fail")
    ap.add_argument("--join-batch", type=int, default=100, help="joins per paced setup batch")
    g = ap.add_argument_group("fanout")
    g.add_argument("--subs", type=int, default=1000)
    g.add_argument(
        "--publishers",
        type=int,
        default=0,
        help="default: enough to stay under --per-publisher-max msg/s each at --max-deliveries",
    )
    g.add_argument(
        "--per-publisher-max",
        type=float,
        default=800.0,
        help="roombus rate-limits one connection to 1000 msg/s by default",
    )
    g.add_argument("--start-deliveries", type=float, default=8000.0)
    g.add_argument(
        "--rates",
        default="",
        help="comma-separated total publish rates: run "
        "exactly these stages (no ramp); for measuring the client",
    )
    g.add_argument("--max-deliveries", type=float, default=1_600_000.0)
    g = ap.add_argument_group("rooms / churn")
    g.add_argument("--rooms", type=int, default=0, help="default 100 (rooms), 10 (churn)")
    g.add_argument("--members", type=int, default=10)
    g.add_argument("--start-rate", type=float, default=1.0, help="msg/s per member")
    g.add_argument("--max-rate", type=float, default=256.0)
    g.add_argument("--observers", type=int, default=10, help="per room (churn)")
    g.add_argument("--churners", type=int, default=20)
    g.add_argument("--churn-s", type=float, default=5.0)
    g = ap.add_argument_group("idle")
    g.add_argument("--conns", type=int, default=5000)
    g.add_argument("--room-size", type=int, default=10)
    g.add_argument("--hold-s", type=float, default=5.0)
    a = ap.parse_args(argv)
    if not a.host.startswith("127.") and a.host not in ("localhost", "::1"):
        ap.error("the load generator only targets loopback addresses")
    if not a.rooms:
        a.rooms = 100 if a.scenario == "rooms" else 10
    if not a.workers:
        a.workers = max(2, len(os.sched_getaffinity(0)))
    if a.scenario == "rooms":
        a.stage_s = max(a.stage_s, 2.0)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with contextlib.suppress(ValueError, OSError):
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_alarm(*_: object) -> NoReturn:
        raise TimeoutError(f"load generator hit its --timeout of {a.timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(math.ceil(a.timeout))
    pool = Pool(a)
    t0 = time.monotonic()
    out: Result = {"scenario": a.scenario, "workers": a.workers, "size": a.size}
    try:
        out.update(SCENARIOS[a.scenario](pool, a))
        out["ok"] = True
        pool.close_all()
    except Exception as exc:  # reported in the JSON line, not as a traceback
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
        log("loadgen error:", out["error"])
    finally:
        signal.alarm(0)
        pool.close()
    out["wall_s"] = round(time.monotonic() - t0, 2)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
