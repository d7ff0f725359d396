"""The core's settings (roombus.core.config): a bad value is refused naming its setting."""

from __future__ import annotations

import math

import pytest

from roombus.core.config import BrokerConfig
from roombus.core.errors import ConfigError


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan])
def test_a_bad_dedup_window_names_its_setting(value: float) -> None:
    with pytest.raises(ConfigError) as info:
        BrokerConfig(dedup_window=value)
    assert "dedup-window" in str(info.value)


@pytest.mark.parametrize(
    ("field", "name"),
    [("max_message_bytes", "max-message-bytes"), ("dedup_window", "dedup-window")],
)
def test_a_bad_value_is_named_as_on_the_command_line(field: str, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        BrokerConfig(**{field: 0})  # type: ignore[arg-type]
    assert name in str(info.value)


def test_a_room_s_history_may_live_as_long_as_its_position_and_no_longer() -> None:
    from roombus.core.streams import RoomPolicy

    kept = BrokerConfig(
        position_ttl=600.0, room_history=(("news.*", RoomPolicy(size=10, ttl=600.0)),)
    )
    assert kept.room_history[0][1].ttl == 600.0
    with pytest.raises(ConfigError) as e:
        BrokerConfig(position_ttl=600.0, room_history=(("news.*", RoomPolicy(size=10, ttl=600.5)),))
    assert e.value.setting == "rooms.news.*.history-ttl"
    assert "must be at most position-ttl (600.0), not 600.5" in str(e.value)


def test_a_bad_setting_names_itself() -> None:
    for kwargs, setting, words in (
        ({"heartbeat": 1}, "heartbeat", "must be True or False, not 1"),
        ({"room_history": (("", None),)}, "rooms", "a room pattern must be a non-empty string"),
        ({"send_queue_bytes": 1000}, "send-queue-bytes", "so that one maximal message fits"),
    ):
        with pytest.raises(ConfigError) as e:
            BrokerConfig(**kwargs)  # type: ignore[arg-type]
        assert e.value.setting == setting, kwargs
        assert words in str(e.value), (kwargs, str(e.value))
