"""
A hub that drains (``HubBase.drain``), in memory: ``/healthz`` answers 503 and new
WebSockets are refused at once; the open ones are closed with 1001 at the schedule's
instants, by ``timeout()``, and get messages until then; a second thought
(``shutdown()``) closes the rest at once.
"""

from __future__ import annotations

import itertools

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub
from roombus.server.http import HttpResponse
from roombus.server.messages import MessageHub

from .test_hub import connect, written

DRAINED = b"\x03\xe9server draining"  # a close frame's payload: 1001 and the reason
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def fair() -> float:
    return 0.5


def answer(hub: Hub, request: bytes) -> bytes:
    cid = hub.open(now=0.0)
    hub.receive(cid, request, now=0.0, timestamp=0)
    return written(hub)[cid]


def test_healthz_and_upgrades_answer_503_once_draining() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    assert answer(hub, HEALTHZ).startswith(b"HTTP/1.1 200 ")
    assert hub.metrics()["roombus_draining"] == 0
    hub.drain(now=0.0, timestamp=0)
    assert hub.draining and hub.metrics()["roombus_draining"] == 1
    health = answer(hub, HEALTHZ)
    assert health.startswith(b"HTTP/1.1 503 ") and health.endswith(b"\r\n\r\ndraining\n")
    upgrade = answer(hub, b"GET /ws?room=lobby&username=ann HTTP/1.1\r\nHost: x\r\n\r\n")
    assert upgrade.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nretry-after: 5\r\n" in upgrade.lower()
    assert hub.websocket_count == 0


def test_the_closes_follow_the_schedule_and_the_rest_still_get_messages() -> None:
    hub = Hub(BrokerConfig(heartbeat=False), ServerConfig(drain_seconds=10.0))
    cids = [connect(hub, "lobby", f"u{i}") for i in range(4)]
    written(hub)
    hub.drain(now=100.0, timestamp=0, random=fair)
    assert hub.drain_ends == 110.0
    assert hub.take_dirty() == []  # nobody closed yet
    closed: list[tuple[float, int]] = []
    while (at := hub.next_deadline()) is not None and at <= hub.drain_ends:
        before = hub.websocket_count
        sent = hub.publish("lobby", "still here", username="server", now=at, timestamp=0)
        assert sent.delivered == before
        hub.timeout(now=at, timestamp=0)
        for cid, data in written(hub).items():
            if DRAINED in data:
                closed.append((at, cid))
    # One slot of 2.5 s each, the middle of each (the source says 0.5).
    assert [at for at, _ in closed] == [101.25, 103.75, 106.25, 108.75]
    assert sorted(cid for _, cid in closed) == sorted(cids)
    assert hub.drain_done and hub.websocket_count == 0 and hub.broker.rooms == []


def test_a_window_of_zero_closes_everyone_at_once() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(drain_seconds=0))
    cids = [connect(hub, "lobby", f"u{i}") for i in range(3)]
    written(hub)
    hub.drain(now=0.0, timestamp=0)
    out = written(hub)
    assert all(out[cid].endswith(DRAINED) for cid in cids)
    assert hub.drain_done


def test_a_client_that_leaves_by_itself_is_not_waited_for() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    ann, bob = connect(hub, "lobby", "ann"), connect(hub, "lobby", "bob")
    written(hub)
    values = itertools.cycle([0.0, 0.0])  # no shuffle; each close at its slot's start
    hub.drain(now=0.0, timestamp=0, seconds=10.0, random=values.__next__)
    first = next(cid for cid, data in written(hub).items() if DRAINED in data)  # due now
    assert hub.next_deadline() == 5.0
    other = bob if first == ann else ann
    assert not hub.drain_done
    hub.lost(other, now=1.0, timestamp=0)
    assert hub.drain_done


def test_shutdown_during_a_drain_closes_the_rest_at_once() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cids = [connect(hub, "lobby", f"u{i}") for i in range(5)]
    written(hub)
    hub.drain(now=0.0, timestamp=0, seconds=60.0)
    hub.shutdown(now=1.0, timestamp=0)
    assert hub.websocket_count == 0
    out = written(hub)
    assert all(out[cid].endswith(DRAINED) for cid in cids)  # as the drain would close them
    hub.drain(now=2.0, timestamp=0)  # too late: no-op


def test_a_message_hub_refuses_websockets_while_draining() -> None:
    hub = MessageHub(BrokerConfig(heartbeat=False), ServerConfig())
    ann = hub.open_websocket(b"/ws?room=lobby&username=ann", [], now=0.0, timestamp=0)
    assert not isinstance(ann, HttpResponse)
    hub.drain(now=0.0, timestamp=0, seconds=5.0)
    refused = hub.open_websocket(b"/ws?room=lobby&username=bob", [], now=0.0, timestamp=0)
    assert isinstance(refused, HttpResponse) and refused.status == 503
    assert (b"retry-after", b"5") in refused.headers
    at = hub.next_deadline()
    assert at is not None and 0.0 <= at <= 5.0
    hub.timeout(now=at, timestamp=0)
    queues = dict(hub.take_dirty_messages())
    close = queues[ann].data()[-1]
    assert (getattr(close, "code", None), getattr(close, "reason", None)) == (
        1001,
        "server draining",
    )
