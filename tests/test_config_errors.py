"""
Every configuration mistake is a ConfigError that names the setting as the command line
spells it and says what is wrong (the CLI prints it as one line, exit status 2).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from roombus import BrokerConfig, ClusterConfig, ConfigError, JWTAuthenticator, ServerConfig
from roombus.cluster import ClusterBroker

CASES: list[tuple[Callable[[], object], str, str]] = [
    (lambda: ServerConfig(port=70000), "port", "must be 0-65535, not 70000"),
    (lambda: ServerConfig(handshake_timeout=0), "handshake-timeout", "positive"),
    (lambda: ServerConfig(drain_seconds=-1), "drain-seconds", "must be a number of seconds >= 0"),
    (
        lambda: ServerConfig(forwarded_allow_ips=["127.0.0.1", "10.0.0.1/8"]),
        "forwarded-allow-ips",
        "'10.0.0.1/8' is not an IP address, a CIDR network or *",
    ),
    (
        lambda: ServerConfig(allowed_origins=frozenset({"chat.example.com"})),
        "allowed-origin",
        "is not an origin like https://example.com",
    ),
    (
        lambda: BrokerConfig(max_connections_per_room=-1),
        "max-connections-per-room",
        "non-negative integer",
    ),
    (lambda: BrokerConfig(history_size=-1), "history-size", "non-negative integer"),
    (lambda: BrokerConfig(dedup_window=0), "dedup-window", "positive"),
    (
        lambda: ClusterConfig(url="redis://127.0.0.1", node_id="a b"),
        "node-id",
        "must be 1-64 characters of A-Z a-z 0-9 _ . : -",
    ),
    (lambda: ClusterBroker(node="a b"), "node-id", "must be 1-64 characters"),
    (lambda: JWTAuthenticator(secret=42), "jwt-secret", "must be a string or bytes, not int"),  # type: ignore[arg-type]
    (
        lambda: JWTAuthenticator(secret="ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC" + "x" * 40),
        "jwt-secret",
        "looks like a PEM or SSH key",
    ),
    (lambda: JWTAuthenticator(public_key=b"not a key"), "jwt-public-key", ""),
    (
        lambda: ClusterConfig(url="redis://:a@127.0.0.1?password=b"),
        "redis",
        "the password is given twice",
    ),
    (
        lambda: ClusterConfig(url="redis://user@127.0.0.1"),
        "redis",
        "a username needs a password",
    ),
]


@pytest.mark.parametrize(("build", "setting", "text"), CASES)
def test_a_config_error_names_its_setting_and_says_why(
    build: Callable[[], object], setting: str, text: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")
    assert text in str(info.value)
