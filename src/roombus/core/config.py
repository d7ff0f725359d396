"""BrokerConfig: every limit and interval of the core, validated once."""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from ..server.handshake import normalize_origin
from .errors import ConfigError

#: Room for the envelope around content of the maximum inbound size
#: (username, room, timestamp, seq and JSON escaping of the short fields).
ENVELOPE_OVERHEAD = 1024


def _positive_finite(setting: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(setting, f"must be a positive number of seconds, not {value!r}")


def _positive_int(setting: str, value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(setting, f"must be a positive integer, not {value!r}")


def _non_negative_int(setting: str, value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(setting, f"must be a non-negative integer, not {value!r}")


@attrs.frozen(kw_only=True)
class BrokerConfig:
    """
    The core's settings. Every field has a production default.

    Attributes:
        ping_interval: Seconds of silence (no pong) after which a connection is pinged.
        ping_timeout: Seconds a pinged connection has to answer before it is closed.
            A connection is therefore closed exactly ``ping_interval + ping_timeout``
            seconds after its last pong (or its connect).
        max_message_bytes: Largest inbound message, in UTF-8 bytes; larger ones close
            the connection with 1009.
        send_queue: Most messages that may wait for one slow receiver.
        send_queue_bytes: Most bytes that may wait for one slow receiver.
        max_rooms_per_connection: Rooms one connection may be in at once.
        max_connections_per_room: Connections one room may hold; a join beyond it is
            refused (``forbidden``, or 403 for the room of the URL). 0: no limit.
        rate_limit: Messages per second one connection may send on average; 0 turns
            rate limiting off. Over it, messages are refused with ``rate_limited``;
            sustained abuse (more than twice the rate, for long enough to pile up
            ``rate_burst`` refusals) closes the connection with 1008.
        rate_burst: Messages one connection may send at once above the average.
        heartbeat: Whether the core pings connections (``ping_interval``,
            ``ping_timeout``) and closes those that stop answering. Turn it off when the
            transport owns pings and never reports pongs, as an ASGI server does
            (uvicorn's ``--ws-ping-interval``); the two intervals are then ignored.
    """

    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    max_message_bytes: int = 64 * 1024
    send_queue: int = 1024
    send_queue_bytes: int = 4 * 1024 * 1024
    max_rooms_per_connection: int = 100
    max_connections_per_room: int = 10_000
    rate_limit: float = 1000.0
    rate_burst: int = 1000
    heartbeat: bool = True

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.heartbeat, bool):
            raise ConfigError("heartbeat", f"must be True or False, not {self.heartbeat!r}")
        if not (
            isinstance(self.rate_limit, (int, float))
            and math.isfinite(self.rate_limit)
            and self.rate_limit >= 0
        ):
            raise ConfigError(
                "rate-limit", f"must be a non-negative number (0: off), not {self.rate_limit!r}"
            )
        _positive_int("rate-burst", self.rate_burst)
        _positive_finite("ping-interval", self.ping_interval)
        _positive_finite("ping-timeout", self.ping_timeout)
        _positive_int("max-message-bytes", self.max_message_bytes)
        _positive_int("send-queue", self.send_queue)
        _positive_int("send-queue-bytes", self.send_queue_bytes)
        _positive_int("max-rooms-per-connection", self.max_rooms_per_connection)
        _non_negative_int("max-connections-per-room", self.max_connections_per_room)
        if self.send_queue_bytes < self.max_message_bytes + ENVELOPE_OVERHEAD:
            raise ConfigError(
                "send-queue-bytes",
                f"must be at least max-message-bytes + {ENVELOPE_OVERHEAD} "
                f"({self.max_message_bytes + ENVELOPE_OVERHEAD}) so that one maximal "
                f"message fits, not {self.send_queue_bytes}",
            )


def _origins(values: Iterable[str]) -> frozenset[str]:
    return frozenset(normalize_origin(v) for v in values)


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
    metrics: bool = True
    backlog: int = 1024
    max_queued_bytes: int = 256 * 1024 * 1024
    socket_send_buffer: int = 64 * 1024

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ConfigError("port", f"must be 0-65535, not {self.port!r}")
        _positive_finite("handshake-timeout", self.handshake_timeout)
        _positive_finite("close-timeout", self.close_timeout)
        _positive_int("max-header-bytes", self.max_header_bytes)
        _non_negative_int("backlog", self.backlog)
        _non_negative_int("max-connections", self.max_connections)
        _non_negative_int("max-connections-per-ip", self.max_connections_per_ip)
        _non_negative_int("max-queued-bytes", self.max_queued_bytes)
        _non_negative_int("socket-send-buffer", self.socket_send_buffer)
        for origin in self.allowed_origins:
            if "://" not in origin:
                raise ConfigError(
                    "allowed-origin", f"{origin!r} is not an origin like https://example.com"
                )
