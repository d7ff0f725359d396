"""BrokerConfig: every limit and interval of the core, validated once."""

from __future__ import annotations

import math

import attrs

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
