"""``GET /metrics``: counters and gauges in the Prometheus text format."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .rawws import OP_BINARY, get
from .test_limits import assert_closed_with, joined_raw


def parse(body: bytes) -> dict[str, float]:
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split(" ")
            values[name] = float(value)
    return values


def test_metrics_count_connections_and_messages(make_server):
    srv = make_server()
    before = parse(get(srv.port, "/metrics").body)
    assert before["roombus_websocket_connections"] == 0
    assert before["roombus_transport_connections"] == 0  # a scrape is no transport
    ann, bob = srv.room("lobby", "ann", "bob")
    ann.chat("hi")
    ann.expect_chat("hi", "ann")
    bob.expect_chat("hi", "ann")
    resp = get(srv.port, "/metrics")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse(resp.body)
    assert after["roombus_websocket_connections"] == 2
    assert after["roombus_transport_connections"] == 2  # the scrape's own left out
    assert after["roombus_rooms"] == 1
    assert (
        after["roombus_messages_published_total"] == before["roombus_messages_published_total"] + 1
    )
    assert b"# TYPE roombus_deliveries_total counter" in resp.body


def test_metrics_can_be_turned_off(make_server):
    srv = make_server(metrics=False)
    assert get(srv.port, "/metrics").status == 404


def families(port: int) -> dict[str, Any]:
    """``/metrics`` parsed by prometheus_client's own parser: family name -> family."""
    text = get(port, "/metrics").body.decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(found: dict[str, Any], name: str, **labels: str) -> float | None:
    for family in found.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_every_family_has_help_and_the_new_series_count(make_server, caps):
    srv = make_server()
    ann, bob = srv.room("lobby", "ann", "bob")
    ann.send("{nope")
    ann.expect(type="error", code="bad_json")
    ann.chat("hi")
    ann.expect_chat("hi", "ann")
    bob.expect_chat("hi", "ann")
    raw = joined_raw(srv, ann)
    raw.send_frame(OP_BINARY, b"x")
    assert_closed_with(raw, 1003, caps)
    ann.expect(type="presence", event="leave", username="raw")
    found = families(srv.port)
    assert all(f.documentation for f in found.values()), [n for n, f in found.items()]
    assert sample(found, "roombus_error_replies_total", code="bad_json") == 1
    assert sample(found, "roombus_closes_total", code="1003", side="server") == 1
    assert (sample(found, "roombus_publish_write_latency_seconds_count") or 0) > 0
    assert (sample(found, "roombus_send_queue_depth_messages_count") or 0) > 0
    if caps.owns_protocol:  # under ASGI the server does the handshake
        assert (sample(found, "roombus_handshake_duration_seconds_count") or 0) >= 3
    (info,) = found["roombus_server_info"].samples
    assert info.labels["transport"] == ("asgi" if not caps.owns_protocol else caps.name)
    assert not any(name.startswith("process_") for name in found)  # embedded: not its process


def test_probes_are_not_transport_connections(make_server):
    srv = make_server()
    for _ in range(3):
        assert get(srv.port, "/healthz").status == 200
        assert parse(get(srv.port, "/metrics").body)["roombus_transport_connections"] == 0
