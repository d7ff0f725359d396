"""
The soak harness (benchmarks/soak.py): its verdict on made-up series (a leak fails, a
plateau passes, a latency spike fails), and a short real run with heavy churn that
passes and whose samples show the connections held and the churn done. The long run
and what it showed: docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "soak.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("roombus_soak_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = _harness()
MIB = 1024


def _samples(
    minutes: float = 30,
    every: float = 10,
    rss_mib=lambda t: 120.0,
    fds=lambda t: 10_010,
    p99=lambda t: 30.0,
) -> list[dict[str, Any]]:
    """Samples of a made-up run: a ramp sample at 0, then one every *every* s."""
    out = [
        {
            "phase": "ramp",
            "t": 0.0,
            "dt": 0.0,
            "rss_kb": 100 * MIB,
            "fds": 10_010,
            "fds_base": 10,
            "client_sockets": 10_000,
            "p99_ms": None,
            "received": 0,
        }
    ]
    t = 0.0
    while t < minutes * 60:
        t += every
        out.append(
            {
                "phase": "soak",
                "t": t,
                "dt": every,
                "rss_kb": int(rss_mib(t) * MIB),
                "fds": int(fds(t)),
                "fds_base": 10,
                "client_sockets": 10_000,
                "p99_ms": p99(t),
                "received": 100_000,
            }
        )
    return out


SUMMARY = {"cycles_planned": 900, "cycles_done": 900}


def _verdict(samples: list[dict[str, Any]], summary: dict[str, Any] | None = None):
    return soak.verdict(samples, summary or SUMMARY, soak.Limits())


def test_a_plateau_with_noise_and_a_warm_up_passes():
    def rss(t: float) -> float:  # grows in the warm-up, then flat with a wobble
        return 120 + min(t, 300) / 30 + (1.5 if int(t / 10) % 2 else -1.5)

    ok, why, nums = _verdict(_samples(rss_mib=rss, fds=lambda t: 10_010 + (t % 7)))
    assert ok, why
    assert abs(nums["rss"]["growth"]) < 2
    assert nums["p99_ms_max"] == 30.0


def test_a_slow_leak_fails_on_rss_and_a_fd_leak_on_fds():
    # 0.1 MiB/min: 3 MiB over 30 minutes is under 10 % and 64 MiB: a plateau
    ok, why, _ = _verdict(_samples(rss_mib=lambda t: 120 + t / 600))
    assert ok, why
    # 1 MiB/min: 30 MiB over the run, over 10 % of ~140 MiB
    ok, why, nums = _verdict(_samples(rss_mib=lambda t: 120 + t / 60))
    assert not ok
    assert any(r.startswith("RSS does not plateau") for r in why), why
    assert nums["rss"]["growth"] == pytest.approx(30, rel=0.01)
    # one fd every 20 s: 90 over the run, over the margin; and over base + sockets
    ok, why, _ = _verdict(_samples(fds=lambda t: 10_010 + t / 20))
    assert not ok
    assert any(r.startswith("open fds do not plateau") for r in why), why
    assert any(r.startswith("open fds exceed") for r in why), why


def test_a_latency_spike_in_one_window_fails():
    ok, why, nums = _verdict(_samples(p99=lambda t: 900.0 if 600 < t <= 610 else 30.0))
    assert not ok
    assert why == ["p99 latency over 250 ms in 1 of 180 windows (worst 900.0 ms at minute 10.2)"]
    assert nums["p99_ms_median"] == 30.0


def test_losses_errors_and_missing_churn_fail():
    ok, why, _ = _verdict(_samples(), {**SUMMARY, "lost": 3, "presence_anomalies": 1})
    assert not ok
    assert why == ["3 owed messages lost", "1 presence anomalies"]
    ok, why, _ = _verdict(_samples(), {"cycles_planned": 900, "cycles_done": 10})
    assert why == ["only 10 of 900 planned churn cycles happened"]
    ok, why, _ = _verdict(_samples(minutes=0.3))
    assert not ok and why[0].startswith("only 2 samples")


def test_the_least_squares_slope():
    assert soak.lsq_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2)
    assert soak.lsq_slope([5], [1]) == 0.0
    assert soak.lsq_slope([1, 1], [1, 2]) == 0.0
    p = soak.plateau(
        [0, 10, 20, 30, 40], [5, 5, 5, 6, 7], start=0, end=40, run_s=40, max_frac=1, max_abs=10
    )
    assert p.growth == pytest.approx(40 * 0.1)  # the second half's slope: 0.1 per s
    assert p.ok and p.level == 5


def test_rooms_are_planned_whole():
    assert soak.plan_rooms(120, 50) == [("r0", 0, 50), ("r1", 50, 50), ("r2", 100, 20)]


@pytest.mark.slow
def test_a_short_soak_with_heavy_churn_passes(tmp_path):
    out = tmp_path / "soak.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, str(HARNESS), "--connections", "300", "--room-size", "30"]
    args += ["--duration", "30", "--sample", "2", "--churn", "1.0", "--rate", "100"]
    args += ["--ping-interval", "4", "--ping-timeout", "3", "--timeout", "80"]
    args += ["--out", str(out), "--logdir", str(tmp_path / "logs")]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=90, env=env, cwd=ROOT, check=False
    )
    print(proc.stdout)
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    samples = [r for r in records if r["kind"] == "sample" and r["phase"] == "soak"]
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["passed"]
    assert len(samples) >= 12
    assert all(290 <= s["connected"] <= 300 for s in samples)
    assert all(s["server_ws"] >= 290 for s in samples)
    # 100 %/min of 300 for 30 s: 150 cycles, a fifth of them abrupt (reset or silent)
    assert summary["cycles_done"] >= 140
    assert summary["cycles_done_by"]["reset"] >= 10
    assert summary["cycles_done_by"]["silent"] >= 10
    assert sum(s["cycles"] for s in samples) >= 140
    # the silent ones were found dead by the server's heartbeat (1011), not by the RST
    assert summary["server_closes"].get('{code="1011",side="server"}', 0) >= 5
    assert summary["owed"] >= 80_000  # 100 msg/s for 30 s, each owed to ~30 members
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["presence_anomalies"] == 0 and summary["presence_mismatch"] == 0
    assert summary["presence_events"] >= 2 * 100 * 29  # leave + join of ~100 seen by 29
    assert "| deliveries owed / lost" in proc.stdout
