"""
The hub's metrics in memory: every family named, helped and typed; errors, closes and
refusals counted by code; histograms observed where the event happens; each server's
own registry (``roombus.node.metrics``); the docs' table of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage

import roombus.server.hub
from roombus import BrokerConfig, ServerConfig
from roombus.core.stats import Counts, Histogram
from roombus.hub import Hub
from roombus.node.metrics import ServerMetrics
from roombus.server.hub import SAMPLE_EVERY
from roombus.server.metrics import CATALOGUE, render_table

from .test_hub import connect, request, written

ROOT = Path(__file__).resolve().parents[2]


def scrape(hub: Hub) -> dict[str, dict[str, object]]:
    """The hub's ``/metrics`` body, parsed: family -> its type, help and samples."""
    text = hub.metrics_response().body.decode()
    out: dict[str, dict[str, object]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": [(s.name, s.labels, s.value) for s in family.samples],
        }
    return out


def value(found: dict[str, dict[str, object]], sample: str, **labels: str) -> float | None:
    for family in found.values():
        for name, got, v in family["samples"]:  # type: ignore[attr-defined]
            if name == sample and got == labels:
                return float(v)
    return None


def send(hub: Hub, cid: int, event: object) -> None:
    data = Connection(ConnectionType.CLIENT).send(event)  # type: ignore[arg-type]
    hub.receive(cid, data, now=1.0, timestamp=0)


@pytest.fixture(params=["fallback", "prometheus"])
def hub(request: pytest.FixtureRequest) -> Hub:
    """A hub answering /metrics by its plain rendering, or by its own registry."""
    hub = Hub(BrokerConfig(), ServerConfig())
    if request.param == "prometheus":
        ServerMetrics(hub, transport="trio")
    return hub


def test_every_family_has_help_and_its_catalogued_type(hub: Hub) -> None:
    connect(hub, "lobby", "ann")
    written(hub)
    found = scrape(hub)
    for name, family in CATALOGUE.items():
        if family.when != "always":
            continue
        base = name.removesuffix("_total") if family.kind == "counter" else name
        assert base in found, name
        assert found[base]["type"] == family.kind
        assert found[base]["help"] == family.help
    assert all(f["help"] for f in found.values())


def test_the_plain_rendering_and_the_registry_agree() -> None:
    plain = Hub(BrokerConfig(), ServerConfig())
    registered = Hub(BrokerConfig(), ServerConfig())
    ServerMetrics(registered, transport="framed")
    for hub in (plain, registered):
        ann = connect(hub, "lobby", "ann")
        send(hub, ann, TextMessage("{nope"))
        written(hub)
    assert scrape(plain) == scrape(registered)


def test_error_replies_are_counted_by_code(hub: Hub) -> None:
    ann = connect(hub, "lobby", "ann")
    send(hub, ann, TextMessage("{nope"))
    send(hub, ann, TextMessage("{nope"))
    send(hub, ann, TextMessage('{"type":"chat","content":"x","room":"elsewhere"}'))
    written(hub)
    found = scrape(hub)
    assert value(found, "roombus_error_replies_total", code="bad_json") == 2
    assert value(found, "roombus_error_replies_total", code="not_joined") == 1
    assert hub.broker.error_replies["bad_json"] == 2


def test_closes_are_counted_by_code_and_side(hub: Hub) -> None:
    ann = connect(hub, "lobby", "ann")
    send(hub, ann, BytesMessage(b"\x00"))  # refused with 1003
    bob = connect(hub, "lobby", "bob")
    hub.lost(bob, now=1.0, timestamp=0)  # vanished while open
    written(hub)
    found = scrape(hub)
    assert value(found, "roombus_closes_total", code="1003", side="server") == 1
    assert value(found, "roombus_closes_total", code="1006", side="client") == 1


def test_handshake_refusals_are_counted_by_status(hub: Hub) -> None:
    for target in (b"/ws?room=lobby", b"/nowhere"):
        cid = hub.open(now=0.0)
        hub.receive(cid, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    written(hub)
    found = scrape(hub)
    assert value(found, "roombus_handshake_refusals_total", status="404") == 1
    statuses = {
        labels["status"]
        for name, labels, _ in found["roombus_handshake_refusals"]["samples"]  # type: ignore[attr-defined]
    }
    assert len(statuses) == 2


def test_latency_depth_and_handshake_are_observed_where_they_happen(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(roombus.server.hub, "SAMPLE_EVERY", 1)  # every write observed
    ann = hub.open(now=10.0)
    hub.receive(ann, request("lobby", "ann"), now=10.25, timestamp=0)
    assert hub.handshake_duration.count == 1 and hub.handshake_duration.sum == 0.25
    for cid, queue in hub.take_dirty():  # written half a second after it was queued
        while queue:
            queue.consume(len(queue.data()))
        hub.flushed(cid, now=10.75)
    assert hub.write_latency.count == 1 and hub.write_latency.sum == pytest.approx(0.5)
    for i in range(3):
        hub.publish("lobby", i, username="server", now=11.0 + i, timestamp=0)
    (depth,) = [queue.messages for _, queue in hub.take_dirty()]
    assert depth == 3
    hub.flushed(ann, now=14.0)  # from the oldest one's arrival
    assert hub.write_latency.sum == pytest.approx(0.5 + 3.0)
    hub.flushed(ann, now=15.0)  # nothing waited since: nothing observed
    assert hub.write_latency.count == 2
    found = scrape(hub)
    assert value(found, "roombus_publish_write_latency_seconds_count") == 2
    assert value(found, "roombus_send_queue_depth_messages_bucket", le="4.0") == 2
    assert value(found, "roombus_send_queue_depth_messages_bucket", le="2.0") == 1
    assert value(found, "roombus_handshake_duration_seconds_count") == 1


def test_the_fan_out_histograms_sample_one_write_in_eight() -> None:
    hub = Hub(BrokerConfig(rate_limit=0), ServerConfig(max_connections_per_ip=0))

    def drain(now: float) -> None:
        for cid, queue in hub.take_dirty():
            while queue:
                queue.consume(len(queue.data()))
            hub.flushed(cid, now=now)

    connect(hub, "lobby", "u0")
    drain(0.5)  # the first write of all is in the sample
    assert hub.write_latency.count == 1 and hub.queue_depth.count == 1
    for i in range(1, 20):
        connect(hub, "lobby", f"u{i}")
    drain(1.0)
    hub.publish("lobby", "x", username="server", now=1.0, timestamp=0)
    drain(2.0)
    writes = 1 + 20 + 20  # each drain writes every dirty queue once
    assert hub.write_latency.count == (writes + SAMPLE_EVERY - 1) // SAMPLE_EVERY
    assert hub.queue_depth.count == (writes + SAMPLE_EVERY - 1) // SAMPLE_EVERY


def test_replay_sizes_are_observed_per_join_with_a_position(hub: Hub) -> None:
    connect(hub, "lobby", "ann")
    for i in range(3):
        hub.publish("lobby", i, username="server", now=1.0, timestamp=0)
    epoch = hub.broker.position("lobby").epoch  # type: ignore[union-attr]
    cid = hub.open(now=1.0)
    target = f"/ws?room=lobby&username=bob&since={epoch}:1"
    hub.receive(
        cid,
        request("lobby", "bob").replace(b"/ws?room=lobby&username=bob", target.encode()),
        now=1.0,
        timestamp=0,
    )
    written(hub)
    found = scrape(hub)
    assert value(found, "roombus_replay_messages_count") == 1
    assert value(found, "roombus_replay_messages_sum") == 2


def test_two_servers_in_one_process_keep_their_own_registries() -> None:
    a, b = Hub(), Hub()
    ma, mb = ServerMetrics(a, transport="trio"), ServerMetrics(b, transport="asyncio")
    assert ma.registry is not mb.registry
    ann = connect(a, "lobby", "ann")
    send(a, ann, TextMessage("{nope"))
    written(a)
    fa, fb = scrape(a), scrape(b)
    assert value(fa, "roombus_error_replies_total", code="bad_json") == 1
    assert value(fb, "roombus_error_replies_total", code="bad_json") is None
    assert value(fa, "roombus_websocket_connections") == 1
    assert value(fb, "roombus_websocket_connections") == 0
    info = {n: labels for n, labels, _ in fb["roombus_server_info"]["samples"]}  # type: ignore[attr-defined]
    assert info["roombus_server_info"]["transport"] == "asyncio"
    assert info["roombus_server_info"]["node"] == ""


def test_process_metrics_only_once_asked_for() -> None:
    hub = Hub()
    metrics = ServerMetrics(hub, transport="trio")
    assert not any(name.startswith("process_") for name in scrape(hub))
    metrics.add_process_collectors()
    metrics.add_process_collectors()  # idempotent: no duplicate registration
    found = scrape(hub)
    assert "python_info" in found
    assert "roombus_rooms" in found


def test_the_plain_histogram_and_counts() -> None:
    h = Histogram((1, 2, 4))
    for v in (0.5, 1, 1.5, 4, 9):
        h.observe(v)
    assert h.cumulative() == [(1.0, 2), (2.0, 3), (4.0, 4), (float("inf"), 5)]
    assert h.count == 5 and h.sum == 16
    with pytest.raises(ValueError, match="increasing"):
        Histogram((2, 1))
    c: Counts[str] = Counts()
    c.add("x")
    c.add("x")
    assert c["x"] == 2 and c["y"] == 0 and c.items() == [("x", 2)]


def test_the_docs_have_the_metrics_table() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert render_table() in text, "docs/configuration.md: paste render_table() under 'Metrics'"


def test_the_depth_sample_is_every_eighth_queue_handed_out_the_first_included() -> None:
    """Which queues are observed, across take_dirty() calls of any size: the 1st, 9th,
    17th... handed out since the start (one phase, kept from call to call)."""
    hub = Hub(BrokerConfig(rate_limit=0), ServerConfig(max_connections_per_ip=0))
    rooms = [f"r{i}" for i in range(13)]
    for room in rooms:
        connect(hub, room, "ann")
    handed: list[int] = []  # the depth of every queue handed out, in order

    def take() -> None:
        for cid, queue in hub.take_dirty():
            handed.append(queue.messages)
            while queue:
                queue.consume(len(queue.data()))
            hub.flushed(cid)

    take()
    for step in range(1, 12):  # batches of 1 to 13 queues, of 1 to 7 messages each
        for i, room in enumerate(rooms[: 1 + (step * 5) % 13]):
            for k in range(1 + (i + step) % 7):
                hub.publish(room, k, username="server", now=1.0, timestamp=0)
        take()
    sampled = handed[::SAMPLE_EVERY]
    assert len(set(handed)) > 3 and len(handed) > 4 * SAMPLE_EVERY
    assert hub.queue_depth.count == len(sampled)
    assert hub.queue_depth.sum == sum(sampled)


def test_label_values_and_help_are_escaped_as_the_text_format_says() -> None:
    from roombus.server.metrics import Family, render_text

    odd = 'a\\b\n"c"'
    family = Family("roombus_odd_total", "counter", "help with \\ and\na newline", ("v",))
    text = render_text([(family, {(odd,): 3})])
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.documentation == "help with \\ and\na newline"
    ((_, labels, v),) = [(s.name, s.labels, s.value) for s in parsed.samples]
    assert labels == {"v": odd} and v == 3


def test_extra_metrics_are_counters_by_their_total_suffix_and_say_where_from(hub: Hub) -> None:
    """A backplane's figures (``extra_metrics``) not in the catalogue: a ``_total`` is a
    counter, anything else a gauge, each with a help line naming its source."""
    hub.extra_metrics = lambda: {"roombus_widgets_total": 3.0, "roombus_widgets_open": 2.0}
    found = scrape(hub)
    assert found["roombus_widgets"]["type"] == "counter"
    assert value(found, "roombus_widgets_total") == 3.0
    assert found["roombus_widgets_open"]["type"] == "gauge"
    assert value(found, "roombus_widgets_open") == 2.0
    for name in ("roombus_widgets_total", "roombus_widgets_open"):
        base = name.removesuffix("_total")
        assert found[base]["help"] == f"{name} (from the server's extra_metrics)."
