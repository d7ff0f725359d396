"""
The chaos harness (benchmarks/chaos.py): its accounting on made-up records, and its
short preset end to end (Redis, three nodes of three transports, 240 clients, eleven
faults) with nothing lost silently, nothing duplicated, no presence ghost past its
bound (the TTL after the departure, or after the nodes concerned were back on Redis),
no live user leaving and coming back unexplained. What the counts mean:
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
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


def test_a_nodes_outages_are_read_from_its_metrics_with_their_uncertainty():
    link = chaos.Link()
    link.observe(1.0, 1.1, True, 0)
    link.observe(2.0, 2.1, False, 1)  # lost after 1.0, by 2.1
    link.observe(3.0, 3.1, False, 2)
    link.observe(4.0, 4.2, True, 2)  # back after 3.0, by 4.2
    link.observe(5.0, 5.1, True, 3)  # lost and back between two reads
    link.kill(6.0)
    link.observe(7.0, 7.0, False, None)
    link.observe(8.0, 8.1, True, 0)  # the new process: its count starts over
    link.observe(9.0, 9.1, True, 0)
    spans = [(o.start_lo, o.start_hi, o.end_lo, o.end_hi, o.killed) for o in link.outages]
    assert spans == [
        (1.0, 2.1, 3.0, 4.2, False),
        (4.0, 5.1, 4.0, 5.1, False),
        (6.0, 6.0, 7.0, 8.1, True),
    ]


def _outage(start: float, end: float, killed: bool = False) -> Any:
    return chaos.Outage(start, start, end, end, killed)


def test_a_departure_is_due_a_ttl_after_the_end_of_every_outage_its_news_met():
    assert chaos.presence_bound(10.0, 5.0, []) == 15.0
    assert chaos.presence_bound(10.0, 5.0, [_outage(2.0, 8.0)]) == 15.0  # over before
    assert chaos.presence_bound(10.0, 5.0, [_outage(8.0, 20.0)]) == 25.0  # in one
    # one that began before the bound moves it, and so on; one after it does not
    chain = [_outage(14.0, 17.0), _outage(21.0, 24.0), _outage(30.0, 31.0)]
    assert chaos.presence_bound(10.0, 5.0, chain) == 29.0


def _world(**clients: Any) -> Any:
    return chaos.World(5.0, clients, {}, {}, 100.0)


def _client(node: int = 0, impaired: Any = (), died: bool = False) -> Any:
    return chaos.Client(list(impaired), [(0.0, node)], None, died)


def test_a_ghost_is_bound_by_its_users_node_unless_killed_and_its_observers_node():
    w = _world(ann=_client(0), bob=_client(1), cy=_client(2, died=True))
    w.outages = {0: [_outage(9.0, 30.0)], 1: [_outage(12.0, 20.0)], 2: [_outage(10.0, 13.0, True)]}
    ghost = chaos.Ghost("bob", "r", "ann", 10.0, 40.0, False, False)
    assert chaos.ghost_bound(ghost, 10.0, w) == 35.0  # ann's node back at 30
    ghost = chaos.Ghost("bob", "r", "cy", 10.0, 40.0, False, False)
    assert chaos.ghost_bound(ghost, 10.0, w) == 25.0  # cy died with node 2: bob's node
    w.clients["bob"].nodes.append((15.0, 2))  # bob on node 2 when the ghost ended
    assert chaos.ghost_bound(ghost, 10.0, w) == 18.0


def _cause(w: Any, start: float, end: float | None, observer: str = "bob") -> str:
    return chaos.absence_cause(chaos.Absence(observer, "r", "ann", start, "leave", end), w)


def test_a_live_user_missing_from_a_screen_is_a_flicker_unless_explained():
    w = _world(ann=_client(0), bob=_client(1))
    assert _cause(w, 50.0, 51.0) == "flicker"
    assert _cause(w, 50.0, None) == "flicker"  # still missing at the end
    w.clients["ann"].impaired = [(49.5, 57.0)]  # ann slow: she stays connected
    assert _cause(w, 50.0, 51.0) == "flicker"
    w.clients["ann"].away = [(49.5, 52.0)]  # ann herself reconnecting (or stalled)
    assert _cause(w, 50.0, 51.0) == "user"
    assert _cause(w, 47.0, 51.0) == "flicker"  # she was still there when it came
    w.clients["ann"].away = []
    # node 0's own link cut for 3 s (longer than a third of the TTL), back at 43
    w.cuts = {0: [(40.0, 42.0)]}
    w.outages = {0: [_outage(40.5, 43.0)]}
    assert _cause(w, 44.0, 44.5) == "partition"
    assert _cause(w, 50.0, 51.0) == "flicker"  # well after it was back
    w.cuts = {0: [(40.0, 41.0)]}
    w.outages = {0: [_outage(40.2, 41.5)]}  # too short for its entries to expire
    assert _cause(w, 41.0, 41.5) == "flicker"


def test_a_user_whose_node_was_back_a_ttl_after_the_observers_may_leave_and_come_back():
    w = _world(ann=_client(0), bob=_client(1), cy=_client(2))
    w.outages = {0: [_outage(20.0, 32.0)], 1: [_outage(20.0, 26.0)], 2: [_outage(20.0, 28.0)]}
    assert _cause(w, 31.0, 32.2) == "late node"  # bob's node settled at 31, ann's back at 32
    assert _cause(w, 31.0, 32.2, observer="cy") == "flicker"  # back within a TTL of cy's


def test_an_impaired_observer_reads_late_and_what_it_reads_is_explained_from_then():
    w = _world(ann=_client(0), bob=_client(1, impaired=[(40.0, 50.0)]))
    w.cuts = {0: [(40.0, 42.0)]}
    w.outages = {0: [_outage(40.5, 43.0)]}
    assert _cause(w, 49.5, 50.0) == "partition"  # handed at 49.5 what node 1 said by 44


def test_a_live_user_missing_from_a_presence_state_is_an_absence_until_back():
    h = chaos.Harness.__new__(chaos.Harness)
    h.a = argparse.Namespace(dump="")
    h.gone, h.ghosts, h.closed_ghosts = {"dan": (5.0, True)}, {}, []
    h.absences, h.closed_absences = {}, []
    bob = chaos.Peer(0, "bob", ["r"], 0, False, False, random.Random(1))
    h.on_presence(bob, "r", frozenset({"ann", "bob", "cy"}), 1.0, "state")
    h.on_presence(bob, "r", frozenset({"bob", "cy", "dan"}), 2.0, "state")  # joined again
    h.on_presence(bob, "r", frozenset({"bob", "dan"}), 3.0, "leave")
    h.on_presence(bob, "r", frozenset({"ann", "bob", "dan"}), 4.0, "join")
    assert [(a.user, a.start, a.via, a.end, a.back) for a in h.closed_absences] == [
        ("ann", 2.0, "state", 4.0, True)
    ]
    assert list(h.absences) == [("bob", "r", "cy")]
    assert list(h.ghosts) == [("bob", "r", "dan")]  # dan had left: a ghost, not an absence


def test_a_ghost_past_its_bound_or_a_flicker_fails_the_run():
    keys = ("lost_silently", "duplicated", "misnumbered", "client_anomalies")
    clean = dict.fromkeys((*keys, "ghosts_over_ttl", "ghosts_over_bound", "flickers"), 0)
    assert chaos.verdict(clean, False) == []
    assert chaos.verdict({**clean, "ghosts_over_bound": 2}, False) == ["ghosts_over_bound: 2"]
    assert chaos.verdict({**clean, "flickers": 1}, False) == ["flickers: 1"]


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
    assert summary["ghosts_over_bound"] == 0  # in outages too
    assert summary["ghosts_counted"] + summary["ghosts_timed_in_outages"] > 0
    assert summary["flickers"] == 0
    assert "| deliveries accounted" in proc.stdout
