#!/usr/bin/env python3
"""
Benchmark driver: start each server, run the load generator against it, repeat
interleaved (A, B, C, A, B, C, ...), and print medians side by side with ratios.

    python3 benchmarks/run.py                                 # every scenario, 3 reps
    python3 benchmarks/run.py --scenario fanout --subs 100,300,1000
    python3 benchmarks/run.py --server 'mine=python3 my_server.py --port {port}' --scenario rooms
    python3 benchmarks/run.py --summarize benchmarks/results/results.jsonl

A server is a command template: {port} is replaced by a free loopback port, {py} by
this Python, {here} by this folder. It must listen on 127.0.0.1:{port}. Each server
is started afresh for every scenario run and ended by its PID (SIGTERM, then SIGKILL
after 5 s). Its output goes to results/logs/NAME.log; warnings, errors and tracebacks
found there are listed in the record and the summary.

Every run is appended as JSON lines to --out (default results/results.jsonl).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TypedDict

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import proc_cpu_seconds, proc_rss_kb  # noqa: E402

DEFAULT_SERVERS = {
    # every client comes from 127.0.0.1: the per-address limit (1000 by default) is off
    "roombus": "{py} -m roombus serve --host 127.0.0.1 --port {port} --log-level warning"
    " --max-connections-per-ip 0",
    "websockets-peer": "{py} {here}/peers/websockets_peer.py --port {port}",
    "trio-websocket-peer": "{py} {here}/peers/trio_websocket_peer.py --port {port}",
}

# metric, label, True if higher is better
METRICS: dict[str, list[tuple[str, str, bool | None]]] = {
    "fanout": [
        ("max_sustainable_deliveries_per_s", "max sustainable deliveries/s", True),
        ("max_rate", "publish rate at that point, msg/s", True),
        ("p99_ms", "p99 latency at that rate, ms", False),
        ("server_cpu_us_per_delivery", "server CPU per delivery, us", False),
        ("server_cpu_pct", "server CPU at that rate, %", None),
        ("loadgen_cpu_pct", "load generator CPU at that rate, %", None),
    ],
    "rooms": [
        ("max_sustainable_deliveries_per_s", "max sustainable deliveries/s", True),
        ("max_rate", "msg/s per member at that point", True),
        ("p99_ms", "p99 latency at that rate, ms", False),
        ("server_cpu_us_per_delivery", "server CPU per delivery, us", False),
        ("server_cpu_pct", "server CPU at that rate, %", None),
        ("loadgen_cpu_pct", "load generator CPU at that rate, %", None),
    ],
    "idle": [
        ("server_bytes_per_conn", "server RSS per idle connection, bytes", False),
        ("connects_per_s", "connects/s (50 parallel dials)", True),
        ("server_cpu_us_per_connect", "server CPU per connect, us", False),
    ],
    "churn": [
        ("connects_per_s", "connect+leave cycles/s", True),
        ("presence_per_s", "presence events delivered/s", True),
        ("presence_lost", "presence events lost", False),
        ("server_cpu_us_per_cycle", "server CPU per cycle, us", False),
    ],
}


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("roombus", "websockets", "trio", "trio-websocket", "wsproto", "h11"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


class Machine(TypedDict):
    cpus: int | None
    model: str
    kernel: str


def machine() -> Machine:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "model": model, "kernel": platform.release()}


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


class Server:
    def __init__(self, name: str, template: str, cpus: set[int] | None, logdir: Path):
        self.name = name
        self.port = free_port()
        cmd = template.format(port=self.port, py=shlex.quote(sys.executable), here=HERE)
        words = shlex.split(cmd)
        env = dict(os.environ)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        self.cmd = cmd
        logdir.mkdir(parents=True, exist_ok=True)
        self.logpath = logdir / f"{name}.log"
        self.logfile = open(self.logpath, "ab")  # noqa: SIM115
        self.log_start = self.logfile.tell()
        self.logfile.write(f"--- {dt.datetime.now().isoformat()} {cmd}\n".encode())
        self.logfile.flush()
        self.proc = subprocess.Popen(
            words,
            stdin=subprocess.DEVNULL,
            stdout=self.logfile,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches us only; we stop it by its PID
        )
        self.pid = self.proc.pid
        pin(self.pid, cpus)
        self._wait_listening()
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.logpath}"
                )
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    time.sleep(0.2)  # let it settle (and a connect-probe be forgotten)
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout} s")

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.samples.append(
                    (time.monotonic(), proc_cpu_seconds(self.pid), proc_rss_kb(self.pid))
                )

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        with contextlib.suppress(AttributeError):
            self._thread.join(timeout=1)
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=6)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.logfile.close()
        samples: list[tuple[float, float, int]] = getattr(self, "samples", [])
        out: dict[str, Any] = {"exit_code": self.proc.returncode, "log_issues": self.log_issues()}
        if len(samples) >= 2:
            (t0, c0, _), (t1, c1, _) = samples[0], samples[-1]
            out.update(
                cpu_s=round(c1 - c0, 2),
                cpu_pct_mean=round(100 * (c1 - c0) / (t1 - t0), 1),
                rss_peak_kb=max(s[2] for s in samples),
                rss_end_kb=samples[-1][2],
            )
        return out

    def log_issues(self) -> list[str]:
        """Lines of this run's log that look like trouble (tracebacks, errors, warnings)."""
        with open(self.logpath, "rb") as f:
            f.seek(self.log_start)
            text = f.read().decode(errors="replace")
        pat = re.compile(r"Traceback|Error|ERROR|WARNING|Warning|exception|Exception|CRITICAL")
        lines = [ln for ln in text.splitlines()[1:] if pat.search(ln)]
        counts: dict[str, int] = {}
        for ln in lines:
            key = re.sub(r"\d+", "N", ln)[:160]
            counts[key] = counts.get(key, 0) + 1
        return [f"{n}x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])][:10]


def variants(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(scenario, variant label, extra loadgen args) for each requested run."""
    out: list[tuple[str, str, list[str]]] = []
    for sc in args.scenario:
        if sc == "fanout":
            for n in args.subs.split(","):
                out.append((sc, f"fanout-{int(n)}", ["--subs", str(int(n))]))
        else:
            out.append((sc, sc, []))
    return out


def run_one(
    name: str,
    template: str,
    scenario: str,
    label: str,
    extra: list[str],
    rep: int,
    args: argparse.Namespace,
    cpus_srv: set[int] | None,
    cpus_lg: set[int] | None,
    run_id: str,
) -> dict[str, Any]:
    server = Server(name, template, cpus_srv, Path(args.out).parent / "logs")
    log(f"== {label} rep {rep + 1}/{args.reps}: {name} (pid {server.pid}, port {server.port})")
    cmd = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--scenario",
        scenario,
        "--port",
        str(server.port),
        "--server-pid",
        str(server.pid),
        "--timeout",
        str(args.timeout),
        *extra,
        *shlex.split(args.loadgen_args),
    ]
    t0 = time.time()
    try:
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True
        ) as proc:
            pin(proc.pid, cpus_lg)  # before it forks its workers, which inherit it
            try:
                stdout, _ = proc.communicate(timeout=args.timeout + 30)
            except BaseException:
                proc.kill()  # by its PID; its workers notice and exit by themselves
                raise
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        result: dict[str, Any] = (
            json.loads(lines[-1]) if lines else {"ok": False, "error": "no output"}
        )
    except subprocess.TimeoutExpired:
        result = {"ok": False, "error": "load generator timed out"}
    finally:
        srv = server.stop()
    rec = {
        "run_id": run_id,
        "time": dt.datetime.fromtimestamp(t0).isoformat(timespec="seconds"),
        "server": name,
        "cmd": server.cmd,
        "scenario": scenario,
        "variant": label,
        "rep": rep,
        "pinned": bool(cpus_srv),
        "cpus": {"server": sorted(cpus_srv or []), "loadgen": sorted(cpus_lg or [])},
        "machine": machine(),
        "versions": versions(),
        "result": result,
        "server_samples": srv,
    }
    head = [m for m, _, _ in METRICS[scenario]][:2]
    log(
        f"   -> {name}: "
        + ", ".join(f"{m}={result.get(m)}" for m in head)
        + ("" if result.get("ok") else f"  ERROR {result.get('error')}")
        + (f"  log: {srv['log_issues'][:3]}" if srv["log_issues"] else "")
    )
    return rec


def summarize(records: list[dict[str, Any]], baseline: str) -> str:
    """Markdown tables: per variant and metric, each server's median and ratio to baseline."""
    servers: list[str] = []
    for r in records:
        if r["server"] not in servers:
            servers.append(r["server"])
    if baseline in servers:
        servers.remove(baseline)
        servers.insert(0, baseline)
    labels: list[str] = []
    for r in records:
        if r["variant"] not in labels:
            labels.append(r["variant"])
    out = []
    head = "| metric | " + " | ".join(servers) + " |"
    out.append(head)
    out.append("|---" * (len(servers) + 1) + "|")
    notes = []
    for label in labels:
        recs = [r for r in records if r["variant"] == label]
        scenario = recs[0]["scenario"]
        out.append(f"| **{label}** |" + " |" * len(servers))
        for metric, text, _ in METRICS[scenario]:
            meds: dict[str, float | None] = {}
            cells = []
            for s in servers:
                vals = [
                    r["result"][metric]
                    for r in recs
                    if r["server"] == s
                    and r["result"].get("ok")
                    and r["result"].get(metric) is not None
                ]
                meds[s] = statistics.median(vals) if vals else None
            base = meds.get(baseline)
            for s in servers:
                m = meds[s]
                if m is None:
                    cells.append("-")
                    continue
                cell = f"{m:,.0f}" if abs(m) >= 100 else f"{m:,.3g}"
                if s != baseline and base:
                    cell += f" ({m / base:.2f}x)"
                n = sum(1 for r in recs if r["server"] == s and r["result"].get("ok"))
                if n and metric == METRICS[scenario][0][0]:
                    cell += f" [n={n}]"
                cells.append(cell)
            out.append(f"| {text} | " + " | ".join(cells) + " |")
        for r in recs:
            if not r["result"].get("ok"):
                notes.append(f"{label} {r['server']} rep {r['rep']}: {r['result'].get('error')}")
            if r["result"].get("capped"):
                notes.append(f"{label} {r['server']} rep {r['rep']}: reached the top of the ramp")
            for issue in r["server_samples"].get("log_issues", [])[:3]:
                notes.append(f"{label} {r['server']} rep {r['rep']} log: {issue}")
    text = "\n".join(out)
    if notes:
        text += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=TEMPLATE",
        help="a server command template (repeatable); default: roombus and both peers",
    )
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these of the default servers (repeatable)",
    )
    ap.add_argument("--scenario", action="append", choices=sorted(METRICS), default=[])
    ap.add_argument("--subs", default="1000", help="fanout subscriber counts, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    pin = ap.add_mutually_exclusive_group()
    pin.add_argument(
        "--pin",
        dest="pin",
        action="store_true",
        default=None,
        help="server on the first of --cpus, load generator on the others (default with 2+ CPUs)",
    )
    pin.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument(
        "--cpus", default="", help="CPUs to use, server first (default: all we may use)"
    )
    ap.add_argument("--baseline", default="roombus")
    ap.add_argument("--loadgen-args", default="", help="extra arguments for loadgen.py")
    ap.add_argument("--timeout", type=float, default=300, help="per load-generator run, s")
    ap.add_argument("--out", default=str(HERE / "results" / "results.jsonl"))
    ap.add_argument(
        "--summarize",
        nargs="*",
        metavar="FILE",
        help="print the summary of existing results (all runs, or --run-id) and exit",
    )
    ap.add_argument(
        "--run-id", action="append", default=[], help="with --summarize: these runs only"
    )
    args = ap.parse_args()

    if args.summarize is not None:
        records: list[dict[str, Any]] = []
        for path in args.summarize or [args.out]:
            with open(path) as f:
                records += [json.loads(ln) for ln in f if ln.strip()]
        if args.run_id:
            records = [r for r in records if r["run_id"] in args.run_id]
        print(summarize(records, args.baseline))
        return 0

    servers = dict(DEFAULT_SERVERS)
    if args.only:
        servers = {k: v for k, v in servers.items() if k in args.only}
    if args.server:
        servers = {}
        for spec in args.server:
            name, _, template = spec.partition("=")
            servers[name] = template
    if not args.scenario:
        args.scenario = ["fanout", "rooms", "idle", "churn"]
    cpus = [int(c) for c in args.cpus.split(",") if c] or sorted(os.sched_getaffinity(0))
    if args.pin is None:
        args.pin = len(cpus) >= 2
    cpus_srv = {cpus[0]} if args.pin else None
    cpus_lg = set(cpus[1:]) if args.pin else None
    if cpus_lg:
        os.sched_setaffinity(0, cpus_lg)  # our own sampling stays off the server's CPU

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # servers and load generator inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log(
        f"run {run_id}: servers {list(servers)}, pinned={args.pin} "
        f"(server {sorted(cpus_srv or [])}, loadgen {sorted(cpus_lg or [])}), out {args.out}"
    )
    records = []
    t_start = time.monotonic()
    for scenario, label, extra in variants(args):
        for rep in range(args.reps):
            for name, template in servers.items():
                try:
                    rec = run_one(
                        name, template, scenario, label, extra, rep, args, cpus_srv, cpus_lg, run_id
                    )
                except RuntimeError as exc:
                    log(f"   !! {name}: {exc}")
                    continue
                records.append(rec)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    log(f"done in {time.monotonic() - t_start:.0f} s; run id {run_id}")
    print(
        f"\nMedians of {args.reps} (run {run_id}, pinned={args.pin}); "
        f"ratio = server / {args.baseline}\n"
    )
    print(summarize(records, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
