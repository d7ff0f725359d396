"""TLS to Redis (``rediss://``) against a real ``redis-server --tls-port P --port 0``.

Certificates are made by trustme (:class:`~tests.redis.conftest.TLSFiles`). Both
clients (trio, asyncio) and both backplane drivers, on loopback only, every test
bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import attrs
import pytest

from roombus.asyncio import _redis as asyncio_redis
from roombus.cluster.config import ClusterConfig
from roombus.cluster.resp import RedisTLS, parse_redis_url
from roombus.core.actions import Relay, Subscribe
from roombus.core.errors import ConfigError
from roombus.core.events import RecordReceived, RoomSynced
from roombus.core.names import RoomName
from roombus.node.cluster import redis_ssl_context
from roombus.node.options import settings_from
from roombus.trio import _redis as trio_redis

from .conftest import RedisProcess, TLSFiles, start_tls_redis
from .test_backplane_drivers import Harness, Host, closing, of

TIMEOUT = 10.0
LOBBY = RoomName("lobby")


@pytest.fixture
def tls_redis(tls_files: TLSFiles) -> Iterator[RedisProcess]:
    server = start_tls_redis(tls_files)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mtls_redis(tls_files: TLSFiles) -> Iterator[RedisProcess]:
    """A TLS server that requires a client certificate (``--tls-auth-clients yes``)."""
    server = start_tls_redis(tls_files, auth_clients=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["trio", "asyncio"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(driver: str, main: Callable[[Any], Awaitable[None]]) -> None:
    module = trio_redis if driver == "trio" else asyncio_redis

    async def bounded() -> None:
        with anyio.fail_after(TIMEOUT):
            await main(module)

    anyio.run(bounded, backend=driver)


def tls_address(server: RedisProcess, **tls: Any) -> Any:
    return attrs.evolve(parse_redis_url(server.url), tls=RedisTLS(**tls))


# --------------------------------------------------------------------------------------
# The clients


def test_a_tls_connection_runs_commands_and_pipelines(
    driver: str, tls_redis: RedisProcess, tls_files: TLSFiles
) -> None:
    address = tls_address(tls_redis, ca_file=tls_files.ca_file)
    assert str(address) == f"127.0.0.1:{tls_redis.port} (TLS)"
    big = b"x" * 3_000_000  # many TLS records, many partial sends

    async def main(redis: Any) -> None:
        conn = await redis.connect(address)
        try:
            assert await conn.execute("SET", "k", big) == b"OK"
            assert await conn.execute("GET", "k") == big
            replies = await conn.pipeline([("INCR", "n")] * 500)
            assert replies == list(range(1, 501))
        finally:
            await conn.aclose()

    run(driver, main)


def test_the_server_name_is_verified(
    driver: str, tls_redis: RedisProcess, tls_files: TLSFiles
) -> None:
    good = tls_address(tls_redis, ca_file=tls_files.ca_file, server_name="redis.test")
    bad = tls_address(tls_redis, ca_file=tls_files.ca_file, server_name="other.test")

    async def main(redis: Any) -> None:
        conn = await redis.connect(good)
        await conn.aclose()
        with pytest.raises(redis.RedisConnectionError, match=r"not trusted.*other\.test"):
            await redis.connect(bad)

    run(driver, main)


def test_a_wrong_ca_is_refused_with_a_clear_error(
    driver: str, tls_redis: RedisProcess, tls_files: TLSFiles
) -> None:
    address = tls_address(tls_redis, ca_file=tls_files.other_ca_file)

    async def main(redis: Any) -> None:
        with pytest.raises(redis.RedisConnectionError) as info:
            await redis.connect(address)
        message = str(info.value)
        assert message.startswith(f"TLS with Redis at 127.0.0.1:{tls_redis.port} (TLS) failed")
        assert "the server's certificate is not trusted" in message
        assert "\n" not in message

    run(driver, main)


def test_plain_redis_to_a_tls_port_fails_cleanly(driver: str, tls_redis: RedisProcess) -> None:
    async def main(redis: Any) -> None:
        with pytest.raises(redis.RedisConnectionError):
            await redis.connect(f"redis://127.0.0.1:{tls_redis.port}", connect_timeout=2)

    run(driver, main)


@pytest.mark.parametrize("combined", [True, False], ids=["cert-with-key", "cert-and-key"])
def test_a_client_certificate_where_one_is_required(
    driver: str, mtls_redis: RedisProcess, tls_files: TLSFiles, combined: bool
) -> None:
    files = (
        {"cert_file": tls_files.client_pem}
        if combined
        else {"cert_file": tls_files.client_cert, "key_file": tls_files.client_key}
    )
    address = tls_address(mtls_redis, ca_file=tls_files.ca_file, **files)

    async def main(redis: Any) -> None:
        conn = await redis.connect(address)
        try:
            assert await conn.execute("PING") == b"PONG"
        finally:
            await conn.aclose()

    run(driver, main)


def test_no_client_certificate_where_one_is_required(
    driver: str, mtls_redis: RedisProcess, tls_files: TLSFiles
) -> None:
    address = tls_address(mtls_redis, ca_file=tls_files.ca_file)

    async def main(redis: Any) -> None:
        with pytest.raises(redis.RedisConnectionError) as info:
            await redis.connect(address)
        message = str(info.value)
        # the TLS alert if it came before the reset, else the likely cause
        assert (
            "alert certificate required" in message
            or "require a client certificate? see redis-cert" in message
        ), message
        assert "\n" not in message

    run(driver, main)


# --------------------------------------------------------------------------------------
# The backplane drivers


@pytest.fixture(params=["trio", "asyncio"])
def harness(request: pytest.FixtureRequest) -> Harness:
    return Harness(request.param)


def tls_config(server: RedisProcess, node: str, **tls: Any) -> ClusterConfig:
    return ClusterConfig(url=server.url, node_id=node, presence_ttl=1.5, **tls)


def test_backplanes_over_tls_exchange_records(
    harness: Harness, mtls_redis: RedisProcess, tls_files: TLSFiles
) -> None:
    tls = {"tls_ca_file": tls_files.ca_file, "tls_cert_file": tls_files.client_pem}

    async def main(h: Harness) -> None:
        a, host_a = await h.start(tls_config(mtls_redis, "node-a", **tls))
        b, host_b = await h.start(tls_config(mtls_redis, "node-b", **tls))
        async with closing(h, a, b):
            assert a.ssl_context is not None
            for backplane, host in ((a, host_a), (b, host_b)):
                backplane.submit([Subscribe(room=LOBBY, gen=1)])
                await host.wait_for(of(RoomSynced))
            a.submit([Relay(room=LOBBY, ref=ref, prefix=b"p") for ref in range(20)])
            for host in (host_a, host_b):
                await host.wait_for(of(RecordReceived), 20)
                assert len([r for r in host.records() if r.startswith(b"m ")]) == 20

    harness.run(main)


def test_a_backplane_with_the_wrong_ca_logs_and_keeps_retrying(
    harness: Harness,
    tls_redis: RedisProcess,
    tls_files: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tls_config(tls_redis, "node-a", tls_ca_file=tls_files.other_ca_file)

    async def main(h: Harness) -> None:
        backplane = h.cls(config)
        host = Host()
        async with anyio.create_task_group() as group:
            if h.driver == "trio":
                group.start_soon(backplane.run, host)
            else:
                backplane.start(host)
            with anyio.fail_after(8):
                while backplane.statistics.failures < 3:  # backoff 0.1, 0.2, 0.4 s  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert not backplane.statistics.online
            if h.driver == "trio":
                group.cancel_scope.cancel()
            else:
                await backplane.aclose()

    with caplog.at_level(logging.INFO, logger="roombus.backplane"):
        harness.run(main)
    failures = [r for r in caplog.records if "not trusted" in r.getMessage()]
    assert len(failures) >= 3
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in failures)
    assert not [r for r in caplog.records if r.exc_info]


# --------------------------------------------------------------------------------------
# Settings


def test_tls_settings_go_to_the_address() -> None:
    config = ClusterConfig(
        url="rediss://cache.example:6380",
        tls_ca_file="ca.pem",
        tls_cert_file="c.pem",
        tls_key_file="k.pem",
        tls_server_name="redis.internal",
    )
    assert config.address.tls == RedisTLS("ca.pem", "c.pem", "k.pem", "redis.internal")
    assert config.address.server_name == "redis.internal"
    assert ClusterConfig(url="rediss://h").address.tls == RedisTLS()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"url": "redis://h", "tls_ca_file": "ca.pem"}, "redis-ca: needs a rediss:// URL"),
        ({"url": "unix:///s", "tls_cert_file": "c"}, "redis-cert: needs a rediss:// URL"),
        ({"url": "rediss://h", "tls_key_file": "k"}, "redis-key: needs --redis-cert"),
        ({"url": "rediss://h", "tls_ca_file": ""}, "redis-ca: must be a non-empty text"),
        ({"url": "rediss://h", "tls_server_name": "a b"}, "redis-server-name: must be a host"),
    ],
)
def test_bad_tls_settings_are_config_errors(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        ClusterConfig(**kwargs)
    assert str(info.value).startswith(error)


def test_unreadable_or_unusable_files_are_config_errors(tmp_path: Any, tls_files: TLSFiles) -> None:
    missing = str(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        (RedisTLS(ca_file=missing), "redis-ca: cannot read"),
        (RedisTLS(ca_file=str(junk)), "redis-ca: not a PEM file"),
        (RedisTLS(cert_file=str(junk)), "redis-cert: not a usable certificate"),
        (RedisTLS(cert_file=tls_files.client_cert, key_file=missing), "redis-key: cannot read"),
        (
            RedisTLS(cert_file=tls_files.client_cert, key_file=tls_files.server_key),
            "redis-key: not a usable certificate and private key",
        ),
    ]
    for tls, error in cases:
        with pytest.raises(ConfigError) as info:
            redis_ssl_context(tls)
        assert str(info.value).startswith(error), (tls, str(info.value))
        assert "\n" not in str(info.value)
    context = redis_ssl_context(RedisTLS(ca_file=tls_files.ca_file, cert_file=tls_files.client_pem))
    assert context.check_hostname


def test_the_options_of_roombus_serve(tls_files: TLSFiles) -> None:
    settings = settings_from(
        {"redis": "rediss://127.0.0.1:6380", "redis_ca": tls_files.ca_file},
        {
            "ROOMBUS_REDIS_CERT": tls_files.client_cert,
            "ROOMBUS_REDIS_KEY": tls_files.client_key,
            "ROOMBUS_REDIS_SERVER_NAME": "redis.test",
        },
    )
    assert settings.cluster is not None
    assert settings.cluster.address.tls == RedisTLS(
        tls_files.ca_file, tls_files.client_cert, tls_files.client_key, "redis.test"
    )
    with pytest.raises(ConfigError, match=r"^redis-ca: needs --redis"):
        settings_from({"redis_ca": tls_files.ca_file}, {})
    with pytest.raises(ConfigError, match=r"^redis-ca: cannot read /nonexistent"):
        settings_from({"redis": "rediss://h", "redis_ca": "/nonexistent/ca.pem"}, {})
    with pytest.raises(ConfigError, match=r"^redis-server-name: needs a rediss:// URL"):
        settings_from({"redis": "redis://h"}, {"ROOMBUS_REDIS_SERVER_NAME": "x"})
