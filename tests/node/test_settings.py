"""One :class:`roombus.Settings` for every entry point, and the older keywords folded in."""

from __future__ import annotations

import asyncio
import inspect
import ssl

import pytest

import roombus
import roombus.asyncio
import roombus.trio
from roombus import BrokerConfig, ConfigError, ServerConfig, Settings
from roombus.asgi import RoombusASGI
from roombus.cluster.config import ClusterConfig

ENTRY_POINTS = [
    roombus.trio.Server,
    roombus.trio.serve,
    roombus.asyncio.Server,
    roombus.asyncio.serve,
    RoombusASGI,
]


def _notice(_: object) -> None:
    pass


def test_the_defaults_are_a_lone_open_server() -> None:
    s = Settings()
    assert (s.broker, s.server) == (BrokerConfig(), ServerConfig())
    assert (s.transport, s.log_level) == ("trio", "info")
    assert s.authenticator is s.authorizer is s.on_notice is s.ssl_context is None
    assert s.cluster is s.backplane is None


def test_from_legacy_folds_the_older_arguments_in() -> None:
    broker, server = BrokerConfig(send_queue=7), ServerConfig(port=0)
    s = Settings.from_legacy(broker, server, on_notice=_notice, authenticator=None)
    assert (s.broker, s.server, s.on_notice) == (broker, server, _notice)
    assert s.authenticator is None
    # As a keyword too, and over given settings: None keeps what they have.
    base = Settings(on_notice=_notice, transport="asyncio")
    t = Settings.from_legacy(base, None, broker_config=broker, on_notice=None)
    assert (t.broker, t.server, t.on_notice, t.transport) == (
        broker,
        ServerConfig(),
        _notice,
        "asyncio",
    )
    assert Settings.from_legacy(base) is base


def test_from_legacy_refuses_what_is_no_setting() -> None:
    with pytest.raises(TypeError, match="'backpane'"):
        Settings.from_legacy(None, None, backpane=object())
    with pytest.raises(TypeError, match="must be a Settings, not ServerConfig"):
        Settings.from_legacy(ServerConfig())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"transport": "gevent"}, "transport"),
        ({"log_level": "loud"}, "log-level"),
        ({"broker": ServerConfig()}, "broker"),
        ({"server": BrokerConfig()}, "server"),
    ],
)
def test_a_bad_field_is_a_config_error_naming_it(changes: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError, match=f"^{setting}: "):
        Settings(**changes)  # type: ignore[arg-type]


def test_every_entry_point_takes_settings_then_the_older_form() -> None:
    for entry in ENTRY_POINTS:
        params = inspect.signature(entry).parameters
        names = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD]
        assert names[:2] == ["settings", "config"], entry
        (var,) = [p for p in params.values() if p.kind is p.VAR_KEYWORD]
        assert var.name == "legacy", entry
        # the parameter list is the Settings', not spelt out again
        assert not {"on_notice", "authenticator", "authorizer", "backplane"} & set(names)


def test_the_trio_server_takes_settings_or_the_older_arguments() -> None:
    s = Settings(broker=BrokerConfig(send_queue=9), server=ServerConfig(port=0), on_notice=_notice)
    server = roombus.trio.Server(s)
    assert server.settings is s
    assert (server.broker.config, server.config) == (s.broker, s.server)
    old = roombus.trio.Server(BrokerConfig(send_queue=9), ServerConfig(port=0), on_notice=_notice)
    assert old.settings == s
    with pytest.raises(TypeError, match="'on_notcie'"):
        roombus.trio.Server(on_notcie=_notice)


def test_the_asyncio_entry_points_take_settings() -> None:
    s = Settings(server=ServerConfig(port=0), on_notice=_notice)
    assert roombus.asyncio.serve(s).settings is s
    assert roombus.asyncio.serve(None, ServerConfig(port=0), on_notice=_notice).settings == s

    async def main() -> None:
        server = roombus.asyncio.Server(s)
        assert server.settings is s and server.config is s.server

    asyncio.run(main())


def test_the_asgi_app_takes_settings_with_the_heartbeat_off() -> None:
    s = Settings(broker=BrokerConfig(heartbeat=False), server=ServerConfig(page=None))
    assert RoombusASGI(s).settings is s
    assert RoombusASGI().settings.broker == BrokerConfig(heartbeat=False)
    with pytest.raises(ConfigError, match="heartbeat"):
        RoombusASGI(Settings())
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(ConfigError, match=r"^certfile: under ASGI, TLS is the server's"):
        RoombusASGI(s, ssl_context=tls)


CLUSTER = ClusterConfig(url="redis://127.0.0.1:1", node_id="n-1", presence_ttl=3.0)


def test_a_cluster_setting_gets_the_backplane_of_each_adapter() -> None:
    # Made, not started: nothing connects until the server runs.
    trio_server = roombus.trio.Server(Settings(cluster=CLUSTER))
    assert isinstance(trio_server.backplane, roombus.trio.RedisBackplane)
    assert trio_server.broker.node == "n-1"
    asgi = RoombusASGI(Settings(broker=BrokerConfig(heartbeat=False), cluster=CLUSTER))
    assert isinstance(asgi.backplane, roombus.asyncio.RedisBackplane)
    assert asgi.broker.node == "n-1"

    async def main() -> None:
        server = roombus.asyncio.Server(Settings(cluster=CLUSTER))
        assert isinstance(server.backplane, roombus.asyncio.RedisBackplane)
        assert server.broker.node == "n-1"

    asyncio.run(main())


def test_a_backplane_given_wins_over_the_cluster_setting() -> None:
    given = roombus.trio.RedisBackplane("redis://127.0.0.1:1", node_id="given")
    server = roombus.trio.Server(Settings(cluster=CLUSTER, backplane=given))
    assert server.backplane is given
    assert server.broker.node == "given"
