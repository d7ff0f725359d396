"""
The chaos harness (benchmarks/chaos.py): its accounting on made-up records, and its
short preset end to end (Redis, three nodes of three transports, 240 clients, eleven
faults) with nothing lost silently, nothing duplicated, no presence ghost outliving
the TTL. What the counts mean: docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "chaos.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("roombus_chaos_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chaos = _harness()
E1, E2, LOCAL = "R1700000000000001", "R1700000000000002", "abcdefgh-1"


def _verdict(entries: list[tuple[Any, ...]], key: str, at: tuple[str, int], t: float = 5.0):
    """What the receiver with *entries* is said to have had of message *key* at *at*."""
    track = chaos.Track()
    track.replay(entries)
    if track.got[key]:
        return "once" if track.got[key] == 1 else "duplicated"
    msg = chaos.Message(key, "r", t, {at})
    return chaos.classify(msg, track, None, True)[0]


def _chats(epoch: str, first: int, last: int, t: float = 2.0) -> list[tuple[Any, ...]]:
    return [("M", t, epoch, s, f"m{epoch}{s}") for s in range(first, last + 1)]


def test_a_seq_passed_without_being_told_is_a_silent_loss():
    log = [("J", 1.0, E1, 0, None, None, None, None), *_chats(E1, 1, 3), *_chats(E1, 5, 6)]
    assert _verdict(log, f"m{E1}4", (E1, 4)) == "silent"
    assert _verdict(log, f"m{E1}3", (E1, 3)) == "once"


def test_what_a_reset_or_a_join_that_did_not_recover_moves_past_is_told():
    log = [
        ("J", 1.0, E1, 0, None, None, None, None),
        *_chats(E1, 1, 3),
        ("R", 3.0, LOCAL, 3, "unavailable"),
        *_chats(LOCAL, 4, 5),
        ("R", 4.0, E1, 9, "unavailable"),
        *_chats(E1, 10, 11),
        ("J", 6.0, E1, 20, False, (12, 18), None, "too_old"),
        *_chats(E1, 19, 20),
        ("R", 7.0, E2, 4, "epoch_changed"),
        *_chats(E2, 5, 6),
    ]
    assert _verdict(log, "x", (E1, 7)) == "told"  # between the two resets
    assert _verdict(log, "x", (E1, 15)) == "told"  # in the joined's lost range
    assert _verdict(log, "x", (E1, 25)) == "told"  # after it left E1 for good
    assert _verdict(log, "x", (E2, 3)) == "told"  # before the reset's position in E2
    assert _verdict(log, "x", (E2, 7)) == "silent"  # owed: it ended in E2, never came
    assert _verdict(log, "x", (E1, 2), t=0.5) == "before"  # before it first joined
    assert _verdict(log, "x", ("zzzzzzzz-1", 3)) == "local"  # another node's own epoch


def test_an_epoch_of_the_cluster_it_never_reached_is_a_silent_loss():
    log = [("J", 1.0, E1, 0, None, None, None, None), *_chats(E1, 1, 3)]
    assert _verdict(log, "x", (E2, 1)) == "silent"
    moved = [*log, ("R", 3.0, "R1700000000000003", 0, "epoch_changed")]
    assert _verdict(moved, "x", (E2, 1)) == "told"  # it moved past E2


def test_the_same_content_twice_is_a_duplicate_and_a_resend_in_a_new_epoch_is_named():
    log = [
        ("J", 1.0, E1, 0, None, None, None, None),
        ("M", 2.0, E1, 1, "a"),
        ("R", 3.0, E2, 0, "epoch_changed"),
        ("M", 4.0, E2, 1, "a"),
    ]
    assert _verdict(log, "a", (E2, 1)) == "duplicated"
    track = chaos.Track()
    track.replay(log)
    msg = chaos.Message("a", "r", 2.0, {(E1, 1), (E2, 1)})
    acked_again = chaos.Pub("r", 2.0, "u", E2, 1)
    assert chaos.republished(msg, track.got_at["a"], acked_again)
    assert not chaos.republished(msg, track.got_at["a"], chaos.Pub("r", 2.0, "u", E1, 1))


@pytest.mark.slow
def test_the_short_chaos_run_loses_nothing_silently_and_shows_nothing_twice(tmp_path):
    assert shutil.which("redis-server"), "redis-server is needed (.ci/run installs it)"
    out = tmp_path / "chaos.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, str(HARNESS), "--short", "--seed", "1", "--timeout", "170"]
    args += ["--json", str(out), "--logdir", str(tmp_path / "logs")]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT, check=False
    )
    print(proc.stdout)
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["deliveries_accounted"] >= 50_000
    assert summary["faults"] >= 10
    assert summary["lost_silently"] == 0
    assert summary["duplicated"] == 0  # republished copies too: the clients drop them by id
    assert summary["misnumbered"] == 0
    assert summary["client_anomalies"] == 0
    assert summary["ghosts_over_ttl"] == 0
    assert "| deliveries accounted" in proc.stdout
