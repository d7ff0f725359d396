"""BrokerConfig: every limit and interval of the core, validated once."""

from __future__ import annotations

import math

import attrs

from .errors import ConfigError
from .streams import RoomPolicy

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
        history_size: Chat messages kept per room for clients that rejoin with a
            position or ask for ``history`` (0: none). Each costs its envelope's size
            plus about 120 bytes.
        history_ttl: Seconds each kept message is kept.
        history_max_bytes: Bytes all rooms' history (with positions and
            acknowledgements) may take on this node; beyond, the least recently
            active rooms lose their history first.
        position_ttl: Seconds a room's epoch and seq outlive its last message once it
            has no members (a join with an older position is told ``epoch_changed``).
            At least ``history_ttl``.
        recovery_max: Most messages one join may be replayed; at most ``send_queue``,
            so a replay never gets its own client closed as slow. Default: 100, or
            ``send_queue`` if that is smaller.
        dedup_window: Seconds an acknowledged chat ``id`` is remembered, so a resend
            within it is not published twice.
        room_history: ``(pattern, RoomPolicy)`` pairs: rooms whose name matches the
            shell-style pattern (``tenant-*``) keep history by that policy instead;
            the first match wins.
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
    history_size: int = 100
    history_ttl: float = 300.0
    history_max_bytes: int = 64 * 1024 * 1024
    position_ttl: float = 24 * 3600.0
    recovery_max: int = attrs.field(
        default=attrs.Factory(lambda self: min(100, self.send_queue), takes_self=True)
    )
    dedup_window: float = 300.0
    room_history: tuple[tuple[str, RoomPolicy], ...] = ()

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
        _non_negative_int("history-size", self.history_size)
        _positive_finite("history-ttl", self.history_ttl)
        _positive_int("history-max-bytes", self.history_max_bytes)
        _positive_finite("position-ttl", self.position_ttl)
        _positive_int("recovery-max", self.recovery_max)
        _positive_finite("dedup-window", self.dedup_window)
        if self.position_ttl < self.history_ttl:
            raise ConfigError(
                "position-ttl",
                f"must be at least history-ttl ({self.history_ttl}), not {self.position_ttl}",
            )
        if self.recovery_max > self.send_queue:
            raise ConfigError(
                "recovery-max",
                f"must be at most send-queue ({self.send_queue}) so that a replay fits in "
                f"a client's queue, not {self.recovery_max}",
            )
        for pattern, policy in self.room_history:
            if not (isinstance(pattern, str) and pattern):
                raise ConfigError(
                    "rooms", f"a room pattern must be a non-empty string: {pattern!r}"
                )
            if not isinstance(policy, RoomPolicy):
                raise ConfigError("rooms", f"not a RoomPolicy: {policy!r}")
            _non_negative_int(f"rooms.{pattern}.history-size", policy.size)
            _positive_finite(f"rooms.{pattern}.history-ttl", policy.ttl)
            if policy.ttl > self.position_ttl:
                raise ConfigError(
                    f"rooms.{pattern}.history-ttl",
                    f"must be at most position-ttl ({self.position_ttl}), not {policy.ttl}",
                )
        if self.send_queue_bytes < self.max_message_bytes + ENVELOPE_OVERHEAD:
            raise ConfigError(
                "send-queue-bytes",
                f"must be at least max-message-bytes + {ENVELOPE_OVERHEAD} "
                f"({self.max_message_bytes + ENVELOPE_OVERHEAD}) so that one maximal "
                f"message fits, not {self.send_queue_bytes}",
            )
