"""
``GET /metrics``: a hub's gauges and counters, and their Prometheus text. Sans-IO.

:func:`collect` reads them from a hub's public state; :func:`render_prometheus` writes
them out. ``Hub.metrics()`` and ``Hub.metrics_response()`` are these two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from .http import HttpResponse

if TYPE_CHECKING:
    from .hub import HubBase

#: The media type of the Prometheus text exposition format.
CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"


def collect(hub: HubBase) -> dict[str, float]:
    """Gauges and counters of *hub*, by Prometheus name (what ``GET /metrics`` shows)."""
    broker = hub.broker
    stats = broker.statistics()
    values: dict[str, float] = {
        "roombus_transport_connections": hub.connection_count,
        "roombus_websocket_connections": stats.connections,
        "roombus_rooms": stats.rooms,
        "roombus_messages_published_total": stats.messages_published,
        "roombus_deliveries_total": stats.deliveries,
        "roombus_slow_consumers_closed_total": hub.overflows,
        "roombus_queued_bytes": hub.budget.used,
        "roombus_queued_bytes_closed_total": hub.budget_closes,
        "roombus_limit_refusals_total": hub.admission.refusals,
        "roombus_draining": int(hub.draining),
    }
    if hub.config.proxy_protocol:
        values["roombus_proxy_header_errors_total"] = hub.proxy_header_errors
    if broker.node is not None:
        values["roombus_backplane_online"] = int(stats.backplane_online)
        values["roombus_relay_unconfirmed_total"] = stats.relay_unconfirmed
        values["roombus_presence_gaps_total"] = stats.presence_gaps
        values["roombus_resets_total"] = stats.resets
        values["roombus_gap_repairs_total"] = stats.repairs
    if hub.extra_metrics is not None:
        values.update(hub.extra_metrics())
    return values


def render_prometheus(values: Mapping[str, float]) -> HttpResponse:
    """*values* in the Prometheus text format: a ``_total`` name is a counter, the rest gauges."""
    lines = []
    for name, value in values.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# TYPE {name} {kind}\n{name} {value:g}\n")
    return HttpResponse(status=200, body="".join(lines).encode(), content_type=CONTENT_TYPE)
