"""The connection limits on their own (roombus.server.admission), no hub."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from hypothesis import given
from hypothesis import strategies as st

from roombus import ServerConfig
from roombus.core.names import ConnectionId
from roombus.server.admission import PROBE_BUDGET, RETRY_AFTER, Admission

if TYPE_CHECKING:
    import pytest


def test_within_the_limits_there_is_no_answer_to_give() -> None:
    admission = Admission(ServerConfig(max_connections=3, max_connections_per_ip=2))
    assert admission.add("10.0.0.1", 1) is None
    assert admission.add("10.0.0.1", 2) is None
    assert admission.add(None, 3) is None  # no address: only the total counts
    assert admission.count("10.0.0.1") == 2


def test_over_a_limit_the_answer_names_it_and_says_when_to_retry() -> None:
    admission = Admission(ServerConfig(max_connections=3, max_connections_per_ip=2))
    admission.add("10.0.0.1", 1)
    admission.add("10.0.0.1", 2)
    per_ip = admission.add("10.0.0.1", 3)
    assert per_ip is not None and (per_ip.status, per_ip.headers) == (429, RETRY_AFTER)
    total = admission.add("10.0.0.1", 4)  # both over: the total is named
    assert total is not None and (total.status, total.headers) == (503, RETRY_AFTER)
    assert admission.count("10.0.0.1") == 4  # counted even when refused, until removed
    off = Admission(ServerConfig(max_connections=0, max_connections_per_ip=0))
    for total in range(1, 100):
        assert off.add("10.0.0.1", total * 10**4) is None  # 0: no limit


def test_refusals_are_counted_when_given() -> None:
    admission = Admission(ServerConfig(max_connections=1))
    admission.add(None, 1)
    refusal = admission.add(None, 2)
    assert refusal is not None and admission.refusals == 0  # not yet given
    admission.refused("peer", refusal)
    assert admission.refusals == 1


def test_far_over_is_twice_the_address_limit_or_an_eighth_over_the_total() -> None:
    admission = Admission(ServerConfig(max_connections=1000, max_connections_per_ip=100))
    for _ in range(200):
        admission.add("10.0.0.1", 1)
    assert not admission.far_over("10.0.0.1", 1125)
    admission.add("10.0.0.1", 1)
    assert admission.far_over("10.0.0.1", 1125)  # 201 > 2 * 100
    assert not admission.far_over(None, 1125)
    assert admission.far_over(None, 1126)  # 1126 > 1000 + 125
    small = Admission(ServerConfig(max_connections=10, max_connections_per_ip=2))
    for _ in range(128):
        small.add("10.0.0.2", 1)
    assert not small.far_over("10.0.0.2", 74)  # at least 64 over, either way
    small.add("10.0.0.2", 1)
    assert small.far_over("10.0.0.2", 0)
    assert small.far_over(None, 75)


def test_probes_are_spared_within_their_budget_until_they_are_gone() -> None:
    admission = Admission(ServerConfig(metrics=False))
    assert not admission.spared(ConnectionId(100), b"POST", b"/healthz")
    assert not admission.spared(ConnectionId(100), b"GET", b"/metrics")  # metrics off
    assert not admission.spared(ConnectionId(100), b"GET", b"/ws?room=a")
    for cid in range(PROBE_BUDGET):
        assert admission.spared(ConnectionId(cid), b"HEAD", b"/healthz?x=1")
    assert not admission.spared(ConnectionId(100), b"GET", b"/healthz")  # budget spent
    admission.remove(ConnectionId(0), None)
    assert admission.spared(ConnectionId(100), b"GET", b"/healthz")
    assert Admission(ServerConfig(metrics=True)).spared(ConnectionId(1), b"GET", b"/metrics")


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["10.0.0.1", "::1", None]))))
def test_counts_follow_opens_and_losses(steps: list[tuple[bool, str | None]]) -> None:
    admission = Admission(ServerConfig(max_connections_per_ip=2))
    model: Counter[str | None] = Counter()
    for cid, (opens, ip) in enumerate(steps):
        if opens:
            model[ip] += 1
            refused = admission.add(ip, 0)
            assert (refused is not None) == (ip is not None and model[ip] > 2)
        elif model[ip]:
            admission.remove(ConnectionId(cid), ip)
            model[ip] -= 1
        for address in ("10.0.0.1", "::1"):
            assert admission.count(address) == model[address]
    assert set(admission._per_ip) == {ip for ip, n in model.items() if n and ip is not None}


def test_each_refusal_says_which_limit_in_its_body_and_its_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission = Admission(ServerConfig(max_connections=3, max_connections_per_ip=1))
    admission.add("10.0.0.1", 1)
    per_ip = admission.add("10.0.0.1", 2)
    total = admission.add("10.0.0.2", 4)
    assert per_ip is not None and per_ip.body == b"too many connections from your address\n"
    assert total is not None and total.body == b"server full: too many connections\n"
    with caplog.at_level(logging.INFO, logger="roombus"):
        admission.refused("10.0.0.1:5000", per_ip, cid=ConnectionId(2))
        admission.refused("10.0.0.2:5000", total)
    assert [r.getMessage() for r in caplog.records] == [
        "10.0.0.1:5000 refused: over max-connections-per-ip (1)",
        "10.0.0.2:5000 refused: over max-connections (3)",
    ]
    first, second = (
        {k: r.__dict__.get(k) for k in ("peer", "status", "reason", "conn")} for r in caplog.records
    )
    assert first == {
        "peer": "10.0.0.1:5000",
        "status": 429,
        "reason": "max-connections-per-ip",
        "conn": 2,
    }
    assert second == {
        "peer": "10.0.0.2:5000",
        "status": 503,
        "reason": "max-connections",
        "conn": None,
    }
