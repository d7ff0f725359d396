"""ClusterConfig (roombus.cluster.config): each setting checked once, named when wrong.

The settings' own tests (tests/node) go through the command line; these build the
config directly, as an embedding application does, and need no server.
"""

from __future__ import annotations

from typing import Any

import pytest

from roombus import ConfigError
from roombus.cluster.config import ClusterConfig
from roombus.cluster.resp import RedisAddress, RedisTLS

TLS_SETTINGS = {
    "tls_ca_file": "redis-ca",
    "tls_cert_file": "redis-cert",
    "tls_key_file": "redis-key",
    "tls_server_name": "redis-server-name",
}


def refused(**kwargs: Any) -> ConfigError:
    kwargs.setdefault("url", "rediss://cache.example")
    with pytest.raises(ConfigError) as info:
        ClusterConfig(**kwargs)
    return info.value


def test_the_tls_settings_go_into_the_address() -> None:
    config = ClusterConfig(
        url="rediss://:pw@cache.example:6380/1",
        tls_ca_file="ca.pem",
        tls_cert_file="client.pem",
        tls_key_file="client.key",
        tls_server_name="redis.internal",
    )
    assert config.address == RedisAddress(
        host="cache.example",
        port=6380,
        db=1,
        password="pw",
        tls=RedisTLS(
            ca_file="ca.pem",
            cert_file="client.pem",
            key_file="client.key",
            server_name="redis.internal",
        ),
    )
    assert config.address.server_name == "redis.internal"
    # A certificate may hold its key; every setting may be left to its default.
    only_cert = ClusterConfig(url="rediss://h", tls_cert_file="both.pem")
    assert only_cert.address.tls == RedisTLS(cert_file="both.pem")
    assert ClusterConfig(url="rediss://h").address.tls == RedisTLS()
    assert ClusterConfig(url="redis://h").address.tls is None


def test_the_tls_settings_of_a_sentinel_or_cluster_url_go_into_its_address() -> None:
    sentinel = ClusterConfig(url="rediss+sentinel://s1,s2/m", tls_ca_file="ca.pem")
    assert sentinel.address.tls == RedisTLS(ca_file="ca.pem")
    assert sentinel.address.sentinels == (("s1", 26379), ("s2", 26379))
    cluster = ClusterConfig(url="rediss+cluster://h1:7000", tls_server_name="10.0.0.1")
    assert cluster.address.tls == RedisTLS(server_name="10.0.0.1")


@pytest.mark.parametrize("field", sorted(TLS_SETTINGS))
def test_a_tls_setting_needs_a_tls_url(field: str) -> None:
    kwargs = {field: "x"}
    if field == "tls_key_file":
        kwargs["tls_cert_file"] = "c.pem"
    for url in ("redis://h", "unix:///run/r.sock", "redis+sentinel://s/m"):
        error = refused(url=url, **kwargs)
        setting = "redis-cert" if field == "tls_key_file" else TLS_SETTINGS[field]
        assert str(error) == f"{setting}: needs a rediss:// URL (TLS)"
        assert error.setting == setting


@pytest.mark.parametrize("field", sorted(TLS_SETTINGS))
@pytest.mark.parametrize("value", ["", "  ", 5, b"ca.pem"])
def test_a_tls_setting_is_a_non_empty_text(field: str, value: object) -> None:
    error = refused(**{field: value})
    assert str(error) == f"{TLS_SETTINGS[field]}: must be a non-empty text, not {value!r}"


def test_a_key_needs_its_certificate() -> None:
    assert str(refused(tls_key_file="k.pem")) == "redis-key: needs --redis-cert"


@pytest.mark.parametrize("name", ["a" * 253, "10.0.0.1", "::1", "redis-1.internal", "x_y"])
def test_a_server_name_is_a_host_name_or_address(name: str) -> None:
    assert ClusterConfig(url="rediss://h", tls_server_name=name).address.server_name == name


@pytest.mark.parametrize("name", ["a" * 254, "bad name", "h/x", "é.example", "h\n"])
def test_what_is_no_server_name(name: str) -> None:
    error = refused(tls_server_name=name)
    assert str(error) == f"redis-server-name: must be a host name or address, not {name!r}"


@pytest.mark.parametrize("url", [None, 6379, b"redis://h"])
def test_the_url_is_a_text(url: object) -> None:
    error = refused(url=url)
    assert error.setting == "redis"
    assert str(error) == (
        "redis: must be a redis://, rediss://, redis+sentinel://, redis+cluster:// or "
        f"unix:// URL, not {url!r}"
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://h", "redis: bad Redis URL: the scheme must be"),
        ("redis://h:0", "redis: bad Redis URL: the port must be a number from 1 to 65535"),
        ("redis+sentinel://s", "redis: bad Redis URL: redis+sentinel:// needs the primary's"),
        ("redis://[::1", "redis: bad Redis URL: "),
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, why: str) -> None:
    error = refused(url=url)
    assert str(error).startswith(why), str(error)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("presence_ttl", 0.29, "presence-ttl: must be 0.3 to 86400 seconds, not 0.29"),
        ("presence_ttl", 86400.5, "presence-ttl: must be 0.3 to 86400 seconds, not 86400.5"),
        ("presence_ttl", None, "presence-ttl: must be 0.3 to 86400 seconds, not None"),
        ("presence_ttl", False, "presence-ttl: must be 0.3 to 86400 seconds, not False"),
        ("presence_ttl", float("nan"), "presence-ttl: must be 0.3 to 86400 seconds, not nan"),
        ("connect_timeout", 0, "redis-connect-timeout: must be above 0 to 3600 seconds, not 0"),
        (
            "connect_timeout",
            -1.0,
            "redis-connect-timeout: must be above 0 to 3600 seconds, not -1.0",
        ),
        (
            "connect_timeout",
            3600.5,
            "redis-connect-timeout: must be above 0 to 3600 seconds, not 3600.5",
        ),
        ("connect_timeout", "5", "redis-connect-timeout: must be above 0 to 3600 seconds, not '5'"),
        (
            "connect_timeout",
            float("inf"),
            "redis-connect-timeout: must be above 0 to 3600 seconds, not inf",
        ),
        ("node_id", "a b", "node-id: must be 1-64 characters of A-Z a-z 0-9 _ . : -, not 'a b'"),
        ("node_id", 7, "node-id: must be 1-64 characters of A-Z a-z 0-9 _ . : -, not 7"),
        ("prefix", "a/b", "redis-prefix: must be 1-64 of A-Z a-z 0-9 _ . : -, not 'a/b'"),
        ("prefix", None, "redis-prefix: must be 1-64 of A-Z a-z 0-9 _ . : -, not None"),
    ],
)
def test_a_bad_setting_is_named_with_its_range(field: str, value: object, message: str) -> None:
    assert str(refused(url="redis://h", **{field: value})) == message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_ttl", 0.3),
        ("presence_ttl", 86400),
        ("connect_timeout", 0.001),
        ("connect_timeout", 3600),
    ],
)
def test_the_bounds_of_a_range_are_in_it(field: str, value: float) -> None:
    config = ClusterConfig(url="redis://h", **{field: value})
    got = getattr(config, field)
    assert got == value and type(got) is float


def test_the_defaults_and_what_a_config_shows() -> None:
    config = ClusterConfig(url="redis://:secret@h", node_id="n-1.a:b_c")
    assert (config.node_id, config.presence_ttl, config.prefix, config.connect_timeout) == (
        "n-1.a:b_c",
        15.0,
        "roombus",
        5.0,
    )
    assert config.address == RedisAddress(host="h", password="secret")
    assert "secret" not in repr(config)
    assert config == ClusterConfig(url="redis://:secret@h", node_id="n-1.a:b_c")
