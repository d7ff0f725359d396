#!/usr/bin/env python3
"""
What one received message costs the load generator's client side: the raw-socket
client of loadgen.py against a client built on the `websockets` package (asyncio),
on the same fan-out load (N subscribers, 1 publisher, fixed rate), same server.

    python3 benchmarks/clientcost.py                 # roombus and the websockets peer
    python3 benchmarks/clientcost.py --subs 300 --rate 100 --seconds 4

Client CPU is the client process's user+system time during the publishing window,
divided by the messages it received. Server on the first CPU, client on the second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from websockets.asyncio.client import ClientConnection

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import DEFAULT_SERVERS, Server, pin  # noqa: E402

RX = re.compile(r"bm:1:(\d+):(\d+):(\d+):")


async def websockets_client(
    port: int, subs: int, rate: float, seconds: float, size: int
) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    received = 0
    ooo = 0
    lat: list[int] = []
    uri = f"ws://127.0.0.1:{port}/ws?room=cost"

    async def subscriber(ws: ClientConnection, ready: asyncio.Event) -> None:
        nonlocal received, ooo
        last: dict[str, int] = {}
        # The server sends text frames only; cast once, not a check per message measured.
        async for text in cast("AsyncIterator[str]", ws):
            now = time.monotonic_ns()
            if not ready.is_set() and '"presence_state"' in text:
                ready.set()
            for pub, seq, t in RX.findall(text):
                s = int(seq)
                if s <= last.get(pub, 0):
                    ooo += 1
                last[pub] = s
                lat.append(now - int(t))
                received += 1

    conns = []
    tasks = []
    for i in range(subs + 1):
        ws = await connect(f"{uri}&username=w{i}", compression=None, max_queue=None)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(subscriber(ws, ready)))
        await asyncio.wait_for(ready.wait(), 10)
        conns.append(ws)
    await asyncio.sleep(1.0)  # let the join presence settle
    pub = conns[-1]
    total = round(rate * seconds)
    cpu0 = time.process_time()
    t0 = time.monotonic_ns()
    for n in range(total):
        due = t0 + int(n / rate * 1e9)
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        content = f"bm:1:0:{n + 1}:{time.monotonic_ns()}:"
        content += "x" * max(0, size - len(content))
        await pub.send(json.dumps({"type": "chat", "content": content}))
    expected = total * (subs + 1)
    t_end = time.monotonic() + 5
    while received < expected and time.monotonic() < t_end:  # noqa: ASYNC110 (a counter, polled)
        await asyncio.sleep(0.01)
    cpu = time.process_time() - cpu0
    for t in tasks:
        t.cancel()
    for ws in conns:
        await ws.close()
    lat.sort()
    return {
        "client": "websockets (asyncio)",
        "received": received,
        "expected": expected,
        "out_of_order": ooo,
        "p99_ms": round(lat[int(len(lat) * 0.99)] / 1e6, 2) if lat else None,
        "client_cpu_us_per_message": round(1e6 * cpu / max(1, received), 2),
    }


def raw_client(
    port: int, pid: int, subs: int, rate: float, seconds: float, cpus: set[int] | None
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--scenario",
        "fanout",
        "--port",
        str(port),
        "--server-pid",
        str(pid),
        "--subs",
        str(subs),
        "--publishers",
        "1",
        "--workers",
        "1",
        "--rates",
        f"{rate},{rate}",
        "--stage-s",
        str(seconds),
        "--timeout",
        "120",
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        pin(proc.pid, cpus)
        out, _ = proc.communicate(timeout=150)
    st = json.loads(out.splitlines()[-1])["stages"][-1]  # the second stage: warmed up
    return {
        "client": "raw sockets + epoll (loadgen.py, 1 worker)",
        "received": st["received"],
        "expected": st["expected"],
        "out_of_order": st["out_of_order"],
        "p99_ms": st["p99_ms"],
        "client_cpu_us_per_message": st["loadgen_cpu_us_per_delivery"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subs", type=int, default=300)
    ap.add_argument("--rate", type=float, default=100.0, help="published msg/s")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--server", action="append", default=[], help="names from run.py's defaults")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians shown")
    ap.add_argument("--out", default=str(HERE / "results" / "clientcost.jsonl"))
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    srv_cpus, cl_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else (None, None)
    rows: list[dict[str, Any]] = []
    runs = [
        (rep, name, kind)
        for rep in range(a.reps)
        for name in a.server or ["roombus", "websockets-peer"]
        for kind in ("raw", "websockets")
    ]
    for rep, name, kind in runs:
        server = Server(name, DEFAULT_SERVERS[name], srv_cpus, Path(a.out).parent / "logs")
        try:
            if kind == "raw":
                row = raw_client(server.port, server.pid, a.subs, a.rate, a.seconds, cl_cpus)
            else:
                pin(0, cl_cpus)
                row = asyncio.run(websockets_client(server.port, a.subs, a.rate, a.seconds, a.size))
        finally:
            server.stop()
        row.update(server=name, rep=rep, subs=a.subs, rate=a.rate, time=time.strftime("%F %T"))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(
        f"\n{a.subs} subscribers + 1 publisher at {a.rate:g} msg/s for {a.seconds:g} s; "
        f"median of {a.reps}\n"
    )
    print("| server | client | client CPU per received message, us (all reps) | lost | p99 ms |")
    print("|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["client"]), []).append(r)
    for (name, client), rs in groups.items():
        cost = [r["client_cpu_us_per_message"] for r in rs]
        lost = sum(r["expected"] - r["received"] for r in rs)
        p99 = statistics.median(r["p99_ms"] or 0 for r in rs)
        print(
            f"| {name} | {client} | **{statistics.median(cost):.2f}** "
            f"({', '.join(f'{c:.2f}' for c in cost)}) | {lost} | {p99:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
