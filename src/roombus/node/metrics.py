"""
A server's Prometheus metrics: its own ``CollectorRegistry``, read from its hub.

:class:`ServerMetrics` registers a :class:`HubCollector` (a custom collector: it reads
the hub's counters and histograms when scraped, so the hot path only counts plain
numbers) in a registry of the server's own, never the global default one, so that
several servers in one process never share or clash. :meth:`ServerMetrics.render`
is the text a scrape gets; every adapter answers ``GET /metrics`` with it, and an
application may serve it from elsewhere (``server.metrics.registry`` works with
``prometheus_client``'s own servers and push gateway too).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..core.stats import Histogram
from ..server.http import HttpResponse
from ..server.metrics import CONTENT_TYPE, families

if TYPE_CHECKING:
    from ..server.hub import HubBase


def _bound(le: float) -> str:
    """A bucket's ``le`` as prometheus_client writes its own (``+Inf``, ``0.5``, ``1.0``)."""
    return "+Inf" if le == float("inf") else repr(le)


class HubCollector:
    """
    A ``prometheus_client`` collector of one hub's families
    (:func:`roombus.server.metrics.families`), read at every scrape.

    Args:
        hub: The server's hub.
        transport: The adapter's name (``trio``, ``asyncio``, ``asgi``), the
            ``transport`` label of ``roombus_server_info``.
    """

    def __init__(self, hub: HubBase, *, transport: str) -> None:
        self.hub: Final = hub
        self.transport: Final = transport

    def collect(self) -> Iterator[Metric]:
        for family, values in families(self.hub, transport=self.transport):
            metric: Metric
            if isinstance(values, Histogram):
                hist = HistogramMetricFamily(family.name, family.help)
                hist.add_metric(
                    [],
                    [(_bound(le), n) for le, n in values.cumulative()],
                    sum_value=values.sum,
                )
                yield hist
                continue
            labels = list(family.labels)
            if family.kind == "counter":
                metric = CounterMetricFamily(family.name, family.help, labels=labels)
            else:
                metric = GaugeMetricFamily(family.name, family.help, labels=labels)
            for label_values, value in values.items():
                metric.add_metric(list(label_values), value)
            yield metric

    def describe(self) -> Iterator[Metric]:
        """What :meth:`collect` yields (so the registry knows its names: no clash)."""
        return self.collect()


class ServerMetrics:
    """
    The metrics of one server: its registry, and the hub's answer to ``GET /metrics``.

    Making one installs it as the hub's exposition (``hub.exposition``).

    Attributes:
        registry: The server's own ``CollectorRegistry``: the hub's collector, and
            the process's once :meth:`add_process_collectors` is called.
    """

    def __init__(self, hub: HubBase, *, transport: str) -> None:
        self.registry: Final = CollectorRegistry(auto_describe=True)
        self.registry.register(HubCollector(hub, transport=transport))
        self._process = False
        hub.exposition = self.response

    def add_process_collectors(self) -> None:
        """
        Add the process's metrics (``process_*``: CPU, memory, descriptors; ``python_info``;
        ``python_gc_*``): for a server that is the process, as ``roombus serve`` and
        ``roombus.run()`` run one. Idempotent.
        """
        if not self._process:
            self._process = True
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text (version 0.0.4) of everything in :attr:`registry`."""
        return generate_latest(self.registry)

    def response(self) -> HttpResponse:
        """``GET /metrics``: :meth:`render` as an HTTP answer."""
        return HttpResponse(status=200, body=self.render(), content_type=CONTENT_TYPE)
