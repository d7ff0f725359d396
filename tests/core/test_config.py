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
