"""
``GET /metrics``: a hub's counters, gauges and histograms, as plain numbers. Sans-IO.

:data:`CATALOGUE` names every family roombus exposes (Prometheus name, type, help,
labels); :func:`families` reads their values from a hub's public state at scrape time
(nothing on the hot path but the hub's own counters and :class:`Histogram`
observations); :func:`collect` is the unlabelled counters and gauges by name
(``Hub.metrics()``). The Prometheus binding (a ``CollectorRegistry`` per server,
the process collectors) is ``roombus.node.metrics``: an adapter installs its
rendering as :attr:`HubBase.exposition`. :func:`render_prometheus` is the fallback for
a hub with none (an adapter of your own): the same families in the text format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import attrs

from .._version import __version__
from ..core.stats import Histogram
from .http import HttpResponse

if TYPE_CHECKING:
    from .hub import HubBase

#: The media type of the Prometheus text exposition format.
CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"

#: Seconds from a message's arrival to its write to a receiver's transport.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
#: Messages waiting in a send queue when the adapter starts writing it.
DEPTH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
#: Seconds from a transport connection's opening to its upgrade.
HANDSHAKE_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip


@attrs.frozen
class Family:
    """
    One metric family as exposed.

    Attributes:
        name: The Prometheus name (a counter's ends in ``_total``).
        kind: ``counter``, ``gauge`` or ``histogram``.
        help: The ``# HELP`` text.
        labels: The label names of its samples.
        when: When it is present (``always``, ``cluster``: a node with a backplane;
            ``process``: servers of ``roombus serve`` / ``roombus.run()``).
    """

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    when: str = "always"


def _f(name: str, kind: str, help: str, *labels: str, when: str = "always") -> Family:
    return Family(name, kind, help, labels, when)


#: Every family of roombus's own, in the order exposed. docs/configuration.md carries the
#: table :func:`render_table` makes of it (tested).
CATALOGUE: Final[dict[str, Family]] = {
    f.name: f
    for f in (
        _f(
            "roombus_server_info",
            "gauge",
            "Always 1: the server's transport, node id (empty on its own) and roombus version.",
            "transport",
            "node",
            "version",
        ),
        _f(
            "roombus_transport_connections",
            "gauge",
            "Transport connections the hub tracks, handshakes and closing ones included; "
            "not those of /metrics and /healthz requests.",
        ),
        _f("roombus_websocket_connections", "gauge", "Open WebSocket connections."),
        _f("roombus_rooms", "gauge", "Rooms with at least one member on this node."),
        _f(
            "roombus_messages_published_total",
            "counter",
            "Chat messages published through this node.",
        ),
        _f(
            "roombus_deliveries_total",
            "counter",
            "Envelopes handed to send queues, one per receiver.",
        ),
        _f(
            "roombus_slow_consumers_closed_total",
            "counter",
            "Connections closed with 1008 for reading too slowly (the queued-bytes "
            "budget's included).",
        ),
        _f("roombus_queued_bytes", "gauge", "Bytes waiting in every send queue together."),
        _f(
            "roombus_queued_bytes_closed_total",
            "counter",
            "Connections closed because all send queues together held over max-queued-bytes.",
        ),
        _f(
            "roombus_limit_refusals_total",
            "counter",
            "Requests refused for a connection limit (total, per address).",
        ),
        _f(
            "roombus_draining",
            "gauge",
            "1 while the server drains (SIGTERM, drain()): /healthz answers 503, new "
            "WebSockets are refused; else 0.",
        ),
        _f(
            "roombus_proxy_header_errors_total",
            "counter",
            "Connections closed for a missing or invalid PROXY protocol header.",
            when="with --proxy-protocol",
        ),
        _f(
            "roombus_error_replies_total",
            "counter",
            "error envelopes sent to clients, by their code (bad_json, forbidden, ...).",
            "code",
        ),
        _f(
            "roombus_closes_total",
            "counter",
            "WebSocket closes by close code, and by who started them (server: roombus "
            "closed, or refused the peer's input; client: the peer closed or vanished).",
            "code",
            "side",
        ),
        _f(
            "roombus_handshake_refusals_total",
            "counter",
            "Requests answered with an HTTP error instead of an upgrade, by status.",
            "status",
        ),
        _f(
            "roombus_publish_write_latency_seconds",
            "histogram",
            "Seconds from the arrival of the oldest message waiting in a receiver's send "
            "queue to the queue's write to its transport; one queue write in 8 sampled.",
        ),
        _f(
            "roombus_send_queue_depth_messages",
            "histogram",
            "Messages waiting in a send queue when its write starts; one in 8 sampled.",
        ),
        _f(
            "roombus_handshake_duration_seconds",
            "histogram",
            "Seconds from a transport connection's opening to its WebSocket upgrade "
            "(transports of bytes: trio, asyncio; an ASGI server does its own).",
        ),
        _f(
            "roombus_replay_messages",
            "histogram",
            "Messages replayed per join with a position (0: nothing to replay, or lost).",
        ),
        _f(
            "roombus_backplane_online",
            "gauge",
            "1 while the backplane (Redis) is connected.",
            when="cluster",
        ),
        _f(
            "roombus_relay_unconfirmed_total",
            "counter",
            "Messages published here while the backplane was down or not yet back: "
            "delivered here, maybe not on other nodes.",
            when="cluster",
        ),
        _f(
            "roombus_presence_gaps_total",
            "counter",
            "Times a room's presence records had a gap and the room's presence was read again.",
            when="cluster",
        ),
        _f(
            "roombus_resets_total",
            "counter",
            "reset envelopes sent: a member following positions told the numbering restarted.",
            when="cluster",
        ),
        _f(
            "roombus_gap_repairs_total",
            "counter",
            "Gaps in a room's records read back from its stream.",
            when="cluster",
        ),
        _f(
            "roombus_redis_connects_total",
            "counter",
            "Successful connections to Redis (the first one included).",
            when="cluster",
        ),
        _f(
            "roombus_redis_failures_total",
            "counter",
            "Connections to Redis lost or refused.",
            when="cluster",
        ),
        _f(
            "roombus_redis_dropped_total",
            "counter",
            "Backplane work discarded while Redis was unreachable (relays, presence changes).",
            when="cluster",
        ),
        _f(
            "roombus_redis_relayed_total",
            "counter",
            "Messages published to Redis.",
            when="cluster",
        ),
        _f(
            "roombus_redis_received_total",
            "counter",
            "Records received from Redis.",
            when="cluster",
        ),
        _f(
            "roombus_redis_errors_total",
            "counter",
            "Commands Redis answered with an error.",
            when="cluster",
        ),
    )
}

#: Labelled counter samples: label values -> value.
Samples = dict[tuple[str, ...], float]


def collect(hub: HubBase) -> dict[str, float]:
    """The unlabelled counters and gauges of *hub*, by Prometheus name (``Hub.metrics()``)."""
    broker = hub.broker
    stats = broker.statistics()
    values: dict[str, float] = {
        "roombus_transport_connections": hub.connection_count - hub.probe_count,
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


def families(hub: HubBase, *, transport: str) -> list[tuple[Family, Samples | Histogram]]:
    """
    Every family of *hub* with its values, read now: a counter's or gauge's samples by
    label values, or a histogram. *transport* names the adapter (``roombus_server_info``).
    """
    broker = hub.broker
    out: list[tuple[Family, Samples | Histogram]] = [
        (
            CATALOGUE["roombus_server_info"],
            {(transport, broker.node or "", __version__): 1},
        )
    ]
    for name, value in collect(hub).items():
        family = CATALOGUE.get(name) or Family(
            name,
            "counter" if name.endswith("_total") else "gauge",
            f"{name} (from the server's extra_metrics).",
        )
        out.append((family, {(): value}))
    labelled: list[tuple[str, Samples]] = [
        ("roombus_error_replies_total", {(k,): v for k, v in broker.error_replies.items()}),
        ("roombus_closes_total", {(str(c), s): v for (c, s), v in hub.closes.items()}),
        ("roombus_handshake_refusals_total", {(str(k),): v for k, v in hub.http_refusals.items()}),
    ]
    out.extend((CATALOGUE[name], samples) for name, samples in labelled)
    histograms: list[tuple[str, Histogram]] = [
        ("roombus_publish_write_latency_seconds", hub.write_latency),
        ("roombus_send_queue_depth_messages", hub.queue_depth),
        ("roombus_handshake_duration_seconds", hub.handshake_duration),
        ("roombus_replay_messages", broker.replay_sizes),
    ]
    out.extend((CATALOGUE[name], histogram) for name, histogram in histograms)
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


def render_text(found: list[tuple[Family, Samples | Histogram]]) -> str:
    """*found* (from :func:`families`) in the Prometheus text format, version 0.0.4."""
    lines: list[str] = []
    for family, values in found:
        text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {family.name} {text}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        if isinstance(values, Histogram):
            for bound, n in values.cumulative():
                le = f'le="{_number(bound)}"'
                lines.append(f"{family.name}_bucket{_labels((), (), le)} {_number(n)}")
            lines.append(f"{family.name}_count {_number(values.count)}")
            lines.append(f"{family.name}_sum {_number(values.sum)}")
            continue
        for label_values, value in values.items():
            lines.append(f"{family.name}{_labels(family.labels, label_values)} {_number(value)}")
    return "\n".join(lines) + "\n"


def render_prometheus(hub: HubBase) -> HttpResponse:
    """*hub*'s families in the Prometheus text format: for a hub with no exposition."""
    transport = "framed" if hub.framed else "messages"
    body = render_text(families(hub, transport=transport)).encode()
    return HttpResponse(status=200, body=body, content_type=CONTENT_TYPE)


def render_table(catalogue: Mapping[str, Family] = CATALOGUE) -> str:
    """The metrics table of docs/configuration.md, from :data:`CATALOGUE`."""
    rows = ["| metric | type | labels | when | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in catalogue.values():
        labels = ", ".join(f"`{n}`" for n in f.labels) or "-"
        rows.append(f"| `{f.name}` | {f.kind} | {labels} | {f.when} | {f.help} |")
    return "\n".join(rows) + "\n"
