"""ServerConfig's validation: each bad value is refused naming the setting as the
command line spells it (``ConfigError.setting``), and the edges of each range pass."""

from __future__ import annotations

from typing import Any

import pytest

from roombus import ConfigError, ServerConfig

KEY = "k" * 24


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"port": "80"}, "port"),
        ({"api_port": -1, "api_keys": [KEY]}, "api-port"),
        ({"api_port": 65536, "api_keys": [KEY]}, "api-port"),
        ({"api_port": "1", "api_keys": [KEY]}, "api-port"),
        ({"api_port": 8080}, "api-port"),  # the API is off without a key
        ({"handshake_timeout": 0}, "handshake-timeout"),
        ({"handshake_timeout": float("inf")}, "handshake-timeout"),
        ({"close_timeout": -1.0}, "close-timeout"),
        ({"close_timeout": float("nan")}, "close-timeout"),
        ({"max_header_bytes": 0}, "max-header-bytes"),
        ({"max_header_bytes": 1.5}, "max-header-bytes"),
        ({"backlog": -1}, "backlog"),
        ({"max_connections": -1}, "max-connections"),
        ({"max_connections": True}, "max-connections"),
        ({"max_connections_per_ip": -1}, "max-connections-per-ip"),
        ({"max_queued_bytes": -1}, "max-queued-bytes"),
        ({"socket_send_buffer": -1}, "socket-send-buffer"),
        ({"drain_seconds": -0.5}, "drain-seconds"),
        ({"drain_seconds": float("inf")}, "drain-seconds"),
        ({"drain_seconds": True}, "drain-seconds"),
        ({"drain_seconds": "5"}, "drain-seconds"),
        ({"allowed_origins": ["example.com"]}, "allowed-origin"),
        ({"forwarded_allow_ips": "not an address"}, "forwarded-allow-ips"),
    ],
)
def test_a_bad_value_is_refused_naming_its_setting(settings: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ServerConfig(**settings)
    assert raised.value.setting == name
    assert str(raised.value).startswith(name + ": ")


@pytest.mark.parametrize(
    "settings",
    [
        {"port": 0},
        {"port": 65535},
        {"api_port": 0, "api_keys": [KEY]},
        {"api_port": 65535, "api_keys": [KEY]},
        {"handshake_timeout": 0.001, "close_timeout": 1},
        {"max_header_bytes": 1},
        {
            "backlog": 0,
            "max_connections": 0,
            "max_connections_per_ip": 0,
            "max_queued_bytes": 0,
            "socket_send_buffer": 0,
        },
        {"drain_seconds": 0},
        {"drain_seconds": 0.5},
    ],
)
def test_the_edges_of_each_range_are_accepted(settings: dict[str, Any]) -> None:
    config = ServerConfig(**settings)
    for name, value in settings.items():
        if name != "api_keys":
            assert getattr(config, name) == value


def test_origins_are_kept_normalized() -> None:
    config = ServerConfig(allowed_origins=["HTTPS://Example.com/", " http://a.test\t"])
    assert config.allowed_origins == frozenset({"https://example.com", "http://a.test"})


def test_an_api_port_without_a_key_says_the_api_is_off_without_one() -> None:
    with pytest.raises(ConfigError) as raised:
        ServerConfig(api_port=8080)
    assert str(raised.value) == "api-port: needs --api-key (the API is off without one)"
