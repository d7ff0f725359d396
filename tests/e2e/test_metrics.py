"""``GET /metrics``: counters and gauges in the Prometheus text format."""

from __future__ import annotations

from .rawws import get


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
    ann, bob = srv.room("lobby", "ann", "bob")
    ann.chat("hi")
    ann.expect_chat("hi", "ann")
    bob.expect_chat("hi", "ann")
    resp = get(srv.port, "/metrics")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse(resp.body)
    assert after["roombus_websocket_connections"] == 2
    assert after["roombus_rooms"] == 1
    assert (
        after["roombus_messages_published_total"] == before["roombus_messages_published_total"] + 1
    )
    assert b"# TYPE roombus_deliveries_total counter" in resp.body


def test_metrics_can_be_turned_off(make_server):
    srv = make_server(metrics=False)
    assert get(srv.port, "/metrics").status == 404
