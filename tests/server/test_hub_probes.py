"""
Health and metrics probes on a full node: ``GET /healthz`` and ``GET /metrics`` are
answered beyond the connection limits, within a budget of their own
(:data:`roombus.server.admission.PROBE_BUDGET` answers in flight at once); everything else over a
limit is refused as before, and connections far over a limit are still dropped unread.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub
from roombus.server.admission import PROBE_BUDGET

KEY = base64.b64encode(b"k" * 16)
UPGRADE = (
    b"GET /ws?room=lobby&username=u HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n\r\n"
)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD_HEALTHZ = b"HEAD /healthz?lb=1 HTTP/1.1\r\nHost: x\r\n\r\n"


def _answer(hub: Hub, cid: int, request: bytes) -> bytes:
    """The status line *cid* is answered with (its bytes stay queued: not flushed)."""
    hub.receive(cid, request, now=0.0, timestamp=0)
    queue = hub.queue(cid)
    assert queue is not None and queue, "no answer"
    return bytes(queue.data()).split(b"\r\n", 1)[0]


def _full_hub(**limits: int) -> tuple[Hub, str]:
    """A hub at its limit: per address (2) or total (2), by *limits*."""
    hub = Hub(BrokerConfig(), ServerConfig(**limits))
    for cid in (hub.open(now=0.0, peer="192.0.2.1:1"), hub.open(now=0.0, peer="192.0.2.1:2")):
        assert _answer(hub, cid, UPGRADE) == b"HTTP/1.1 101 Switching Protocols"
    return hub, "192.0.2.1:3"


LIMITS = [
    pytest.param({"max_connections_per_ip": 2, "max_connections": 0}, 429, id="per-address"),
    pytest.param({"max_connections_per_ip": 0, "max_connections": 2}, 503, id="total"),
]


@pytest.mark.parametrize(("limits", "status"), LIMITS)
@pytest.mark.parametrize(
    "probe", [HEALTHZ, METRICS, HEAD_HEALTHZ], ids=["healthz", "metrics", "head"]
)
def test_a_probe_over_a_connection_limit_is_answered(
    limits: dict[str, int], status: int, probe: bytes
) -> None:
    hub, peer = _full_hub(**limits)
    refusals = hub.limit_refusals
    assert _answer(hub, hub.open(now=0.0, peer=peer), probe) == b"HTTP/1.1 200 OK"
    assert hub.limit_refusals == refusals  # not refused, so not counted as refused
    # Anything else over the limit is refused as before, and counted.
    assert _answer(hub, hub.open(now=0.0, peer=peer), UPGRADE).startswith(b"HTTP/1.1 %d" % status)
    assert hub.limit_refusals == refusals + 1
    for other in (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        assert _answer(hub, hub.open(now=0.0, peer=peer), other).startswith(b"HTTP/1.1 %d" % status)


def test_metrics_off_is_not_a_probe() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections_per_ip=1, metrics=False))
    _answer(hub, hub.open(now=0.0, peer="192.0.2.1:1"), UPGRADE)
    assert _answer(hub, hub.open(now=0.0, peer="192.0.2.1:2"), METRICS).startswith(b"HTTP/1.1 429")


@pytest.mark.parametrize(("limits", "status"), LIMITS)
def test_probes_over_a_limit_have_a_budget_of_their_own(
    limits: dict[str, int], status: int
) -> None:
    hub, peer = _full_hub(**limits)
    probes = [hub.open(now=0.0, peer=peer) for _ in range(PROBE_BUDGET)]
    for cid in probes:  # answered, and not yet written out: all in flight
        assert _answer(hub, cid, HEALTHZ) == b"HTTP/1.1 200 OK"
    extra = hub.open(now=0.0, peer=peer)
    assert _answer(hub, extra, HEALTHZ).startswith(b"HTTP/1.1 %d" % status)
    hub.lost(probes[0], now=1.0, timestamp=0)  # one answer done: room for one more
    assert _answer(hub, hub.open(now=1.0, peer=peer), HEALTHZ) == b"HTTP/1.1 200 OK"


def test_probes_within_the_limits_do_not_use_the_budget() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections_per_ip=PROBE_BUDGET + 10))
    for i in range(PROBE_BUDGET + 5):
        assert _answer(hub, hub.open(now=0.0, peer=f"192.0.2.1:{i}"), HEALTHZ) == b"HTTP/1.1 200 OK"


def test_far_over_a_limit_even_a_probe_is_dropped_unread() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(max_connections=10, max_connections_per_ip=0))
    cids = [hub.open(now=0.0, peer=f"10.0.0.{i}:1") for i in range(10 + 64 + 1)]
    assert hub.take_to_close() == [cids[-1]]
    hub.receive(cids[-1], HEALTHZ, now=0.0, timestamp=0)
    queue = hub.queue(cids[-1])
    assert queue is not None and not queue


@given(st.lists(st.sampled_from(["probe", "other", "lost", "flush"]), max_size=60))
def test_probes_in_flight_never_exceed_the_budget(steps: list[str]) -> None:
    """Whatever the order of probes, other requests and ends, the over-limit probes
    answered and not yet gone never exceed the budget, and every over-limit request
    gets an answer (200 for a probe within the budget, else 429)."""
    hub, peer = _full_hub(max_connections_per_ip=2, max_connections=0)
    in_flight: list[int] = []
    answered: list[int] = []
    for step in steps:
        if step in ("probe", "other"):
            cid = hub.open(now=0.0, peer=peer)
            status = _answer(hub, cid, HEALTHZ if step == "probe" else UPGRADE)
            if step == "probe" and len(in_flight) < PROBE_BUDGET:
                assert status == b"HTTP/1.1 200 OK"
                in_flight.append(cid)
            else:
                assert status == b"HTTP/1.1 429 Too Many Requests"
                answered.append(cid)
        elif step == "lost" and in_flight:
            hub.lost(in_flight.pop(0), now=0.0, timestamp=0)
        elif step == "flush" and in_flight:
            cid = in_flight.pop()
            queue = hub.queue(cid)
            assert queue is not None
            queue.consume(len(queue.data()))
            hub.flushed(cid)  # written out: the hub drops it, the adapter closes it
            assert cid in hub.take_to_close()
            hub.lost(cid, now=0.0, timestamp=0)
        for cid in answered:  # refused ones go too, freeing nothing of the budget
            hub.lost(cid, now=0.0, timestamp=0)
        answered.clear()
