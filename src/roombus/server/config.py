"""ServerConfig: every limit and timeout of the sans-IO server, validated once."""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from ..core.config import _non_negative_int, _positive_finite, _positive_int
from ..core.errors import ConfigError
from .api import ApiKey, parse_api_key
from .forwarded import TrustedProxies
from .handshake import normalize_origin
from .http import StaticFile


def _non_negative_seconds(setting: str, value: float) -> None:
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        raise ConfigError(setting, f"must be a number of seconds >= 0, not {value!r}")


def _origins(values: Iterable[str]) -> frozenset[str]:
    return frozenset(normalize_origin(v) for v in values)


def _trusted(values: TrustedProxies | Iterable[str] | str) -> TrustedProxies:
    if isinstance(values, TrustedProxies):
        return values
    try:
        return TrustedProxies.parse(values)
    except ValueError as exc:
        raise ConfigError("forwarded-allow-ips", str(exc)) from None


def _api_keys(values: Iterable[ApiKey | str]) -> tuple[ApiKey, ...]:
    return tuple(v if isinstance(v, ApiKey) else parse_api_key(v) for v in values)


@attrs.frozen(kw_only=True)
class ServerConfig:
    """
    Settings of a network server driving the core (transport-level, not the core's).

    Attributes:
        host: Address to listen on.
        port: TCP port to listen on; 0 picks a free one.
        handshake_timeout: Seconds a client has to complete its opening request;
            after that its TCP connection is closed.
        close_timeout: Seconds to wait for the close handshake (and a slow client's
            last bytes) before dropping the TCP connection; also bounds shutdown.
        max_header_bytes: Largest opening request (line and headers); larger gets 431.
        max_connections: Most transport connections at once (handshakes included);
            beyond it a request is answered 503. 0: no limit.
        max_connections_per_ip: Most transport connections at once from one client
            address; beyond it a request is answered 429. 0: no limit.
        allowed_origins: If not empty, the only ``Origin`` values an upgrade may carry
            (normalized: lower case, no trailing slash); others get 403.
        page: HTML served at ``GET /`` (the chat page), or None for 404.
        script: The JavaScript client served at ``GET /roombus.js``, with its
            ``ETag`` (``If-None-Match`` gets 304) and ``Cache-Control: no-cache``, or
            None for 404.
        metrics: Whether ``GET /metrics`` answers with counters and gauges (the
            Prometheus text format); else 404.
        backlog: The listen backlog.
        max_queued_bytes: Most bytes that may wait in all send queues together (the
            sum of every connection's ``send_queue_bytes`` is far larger); when a
            write leaves more, the connections with the most bytes waiting are closed
            with 1008 until the sum is 7/8 of it. 0: no limit.
        socket_send_buffer: The kernel's send buffer of each client socket
            (``SO_SNDBUF``; Linux doubles the value for its bookkeeping), so that a
            client that does not read pins at most this much kernel memory. 0: the
            system's default (autotuned, up to megabytes a socket).
        forwarded_allow_ips: The proxies whose ``X-Forwarded-For`` (or ``Forwarded``)
            names the client (IPs, CIDR networks, ``*`` for any; a string may hold a
            comma-separated list): per-address limits and logs then use the client's
            address. Empty (the default): the headers are never read.
        proxy_protocol: Every connection starts with a PROXY protocol header (version
            1 or 2, as HAProxy's ``send-proxy`` and cloud load balancers write it),
            whose source address is the client's; a connection without a valid one
            is closed. A ``LOCAL`` header (a balancer's health check) keeps the
            connection's own address.
        drain_seconds: Seconds over which a drain (SIGTERM to ``roombus serve``,
            ``Server.drain()``) spreads its closes (1001) of the open WebSockets,
            jittered, so that their clients do not all reconnect elsewhere at once;
            meanwhile ``/healthz`` answers 503 and new WebSockets are refused (503).
            0: close them all at once.
        api_keys: The keys of the server API (``POST /api/<method>``,
            ``docs/api-http.md``): :class:`~roombus.server.api.ApiKey` values, or
            their text (``SECRET`` or ``SECRET:publish,read``). None: no API (404).
        api_host: The address of the API's own listener (with *api_port*).
        api_port: If set, the API is served on a listener of its own at
            *api_host* and this port (0 picks one), with ``/metrics`` and
            ``/healthz``, and not on the main listener. None: on the main listener.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 10_000
    max_connections_per_ip: int = 1_000
    allowed_origins: frozenset[str] = attrs.field(default=frozenset(), converter=_origins)
    page: bytes | None = None
    script: StaticFile | None = None
    metrics: bool = True
    backlog: int = 1024
    max_queued_bytes: int = 256 * 1024 * 1024
    socket_send_buffer: int = 64 * 1024
    forwarded_allow_ips: TrustedProxies = attrs.field(factory=TrustedProxies, converter=_trusted)
    proxy_protocol: bool = False
    drain_seconds: float = 10.0
    api_keys: tuple[ApiKey, ...] = attrs.field(default=(), converter=_api_keys)
    api_host: str = "127.0.0.1"
    api_port: int | None = None

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ConfigError("port", f"must be 0-65535, not {self.port!r}")
        if self.api_port is not None and not (
            isinstance(self.api_port, int) and 0 <= self.api_port <= 65535
        ):
            raise ConfigError("api-port", f"must be 0-65535, not {self.api_port!r}")
        if self.api_port is not None and not self.api_keys:
            raise ConfigError("api-port", "needs --api-key (the API is off without one)")
        _positive_finite("handshake-timeout", self.handshake_timeout)
        _positive_finite("close-timeout", self.close_timeout)
        _positive_int("max-header-bytes", self.max_header_bytes)
        _non_negative_int("backlog", self.backlog)
        _non_negative_int("max-connections", self.max_connections)
        _non_negative_int("max-connections-per-ip", self.max_connections_per_ip)
        _non_negative_int("max-queued-bytes", self.max_queued_bytes)
        _non_negative_int("socket-send-buffer", self.socket_send_buffer)
        _non_negative_seconds("drain-seconds", self.drain_seconds)
        for origin in self.allowed_origins:
            if "://" not in origin:
                raise ConfigError(
                    "allowed-origin", f"{origin!r} is not an origin like https://example.com"
                )
