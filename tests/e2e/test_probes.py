"""
Health and metrics probes on a full server: a load balancer probing ``/healthz`` or
``/metrics`` of a node at its connection limits gets its answer, not the 429 or 503
that other requests over a limit get. (Under ASGI the server answers plain HTTP on its
own terms; the limits there count WebSockets only.)
"""

from __future__ import annotations

import pytest

from .rawws import get, http_exchange, upgrade_request


@pytest.mark.parametrize(
    ("limits", "status"),
    [
        pytest.param({"max_connections_per_ip": 2}, 429, id="per-address"),
        pytest.param({"max_connections": 2}, 503, id="total"),
    ],
)
def test_probes_are_answered_at_the_connection_limits(make_server, limits, status):
    srv = make_server(**limits)
    srv.room("lobby", "a", "b")  # the limit is reached
    refused = http_exchange(srv.port, upgrade_request("/ws?room=lobby&username=c"))
    assert refused.status == status
    for _ in range(3):  # one after another: each probe's budget slot comes back
        health = get(srv.port, "/healthz")
        assert (health.status, health.body) == (200, b"ok\n")
        metrics = get(srv.port, "/metrics")
        assert metrics.status == 200
        assert b"roombus_websocket_connections 2.0" in metrics.body
        assert get(srv.port, "/healthz", method="HEAD").status == 200
    assert http_exchange(srv.port, upgrade_request("/ws?room=lobby&username=c")).status == status
