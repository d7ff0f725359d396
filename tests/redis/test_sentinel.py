"""Redis Sentinel (``redis+sentinel://``): URLs, and both clients and both backplane
drivers against a real primary, replica and sentinel (:mod:`tests.redis.sentinel`),
through a failover. Loopback only, every wait bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from roombus.asyncio import _redis as asyncio_redis
from roombus.cluster.config import ClusterConfig
from roombus.cluster.resp import (
    RedisAddress,
    RedisError,
    check_handshake,
    handshake_commands,
    parse_redis_url,
    primary_address,
)
from roombus.core.actions import Relay, Subscribe
from roombus.core.errors import ConfigError
from roombus.core.events import BackplaneLost, BackplaneRestored, RecordReceived, RoomSynced
from roombus.core.names import RoomName
from roombus.trio import _redis as trio_redis

from .sentinel import MASTER, SentinelSetup
from .test_backplane_drivers import Harness, closing, of

TIMEOUT = 30.0
LOBBY = RoomName("lobby")


# --------------------------------------------------------------------------------------
# URLs


def test_a_sentinel_url() -> None:
    address = parse_redis_url("redis+sentinel://:pw@10.0.0.1:26380,[::1],s3/mymaster/2")
    assert address.sentinels == (("10.0.0.1", 26380), ("::1", 26379), ("s3", 26379))
    assert (address.master_name, address.db, address.password) == ("mymaster", 2, "pw")
    assert address.tls is None
    assert str(address) == "mymaster via sentinel 10.0.0.1:26380,[::1]:26379,s3:26379 db 2"
    assert parse_redis_url("rediss+sentinel://s/m?db=3").tls is not None
    assert parse_redis_url("rediss+sentinel://s/m?db=3").db == 3
    resolved = primary_address(address, [b"10.0.0.9", b"6379"])
    assert (resolved.host, resolved.port, resolved.sentinels) == ("10.0.0.9", 6379, ())
    assert str(resolved) == "10.0.0.9:6379 (primary mymaster) db 2"
    # the login of a resolved primary checks its role
    assert handshake_commands(resolved)[-1] == (b"ROLE",)
    assert (b"ROLE",) not in handshake_commands(address)
    check_handshake([b"OK", b"OK", b"PONG", [b"master", 0, []]], resolved)
    with pytest.raises(RedisError, match=r"^READONLY .* is a slave, not the primary"):
        check_handshake([b"OK", b"OK", b"PONG", [b"slave", b"h", 1, b"connected", 0]], resolved)
    with pytest.raises(ValueError, match="knows no primary named 'mymaster'"):
        primary_address(address, None)
    with pytest.raises(ValueError, match="unreadable"):
        primary_address(address, [b"h"])


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis+sentinel://s1,s2", "needs the primary's name"),
        ("redis+sentinel://s1/a/1/x", "needs the primary's name"),
        ("redis+sentinel://s1:0/m", "port must be a number"),
        ("redis+sentinel://s1,,s2/m", "a sentinel without a host"),
        ("redis+sentinel://s1/m?x=1", "unknown or repeated query parameter 'x'"),
        ("redis+sentinel://s1/bad name", "the primary's name is"),
        ("redis+sentinel://user@s1/m", "a username needs a password"),
    ],
)
def test_bad_sentinel_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_redis_url(url)
    with pytest.raises(ConfigError, match=r"^redis: "):
        ClusterConfig(url=url)


# --------------------------------------------------------------------------------------
# The clients


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    setup = SentinelSetup()
    try:
        yield setup
    finally:
        setup.close()


@pytest.fixture(params=["trio", "asyncio"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(driver: str, main: Any) -> None:
    module = trio_redis if driver == "trio" else asyncio_redis

    async def bounded() -> None:
        with anyio.fail_after(TIMEOUT):
            await main(module)

    anyio.run(bounded, backend=driver)


def test_a_client_finds_the_primary_and_follows_a_failover(
    driver: str, sentinel_setup: SentinelSetup
) -> None:
    setup = sentinel_setup
    url = setup.url()  # a dead sentinel first: the next one answers

    async def main(redis: Any) -> None:
        conn = await redis.connect(url, connect_timeout=2)
        first = setup.primary_port()
        try:
            assert await conn.execute("SET", "k", "v") == b"OK"
            assert conn._where == f"127.0.0.1:{first} (primary {MASTER})"
        finally:
            await conn.aclose()
        new = await anyio.to_thread.run_sync(setup.failover)
        assert new != first
        conn = await redis.connect(url, connect_timeout=2)
        try:
            assert await conn.execute("GET", "k") == b"v"  # replicated
            assert await conn.execute("SET", "k", "w") == b"OK"  # a primary: writable
        finally:
            await conn.aclose()

    run(driver, main)


def test_no_sentinel_answering_is_one_clear_error(driver: str) -> None:
    url = "redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster"

    async def main(redis: Any) -> None:
        with pytest.raises(redis.RedisConnectionError) as info:
            await redis.connect(url, connect_timeout=1)
        message = str(info.value)
        assert message.startswith("no sentinel named the primary mymaster: 127.0.0.1:1: ")
        assert "127.0.0.1:2: " in message and "\n" not in message

    run(driver, main)


def test_a_primary_that_is_no_longer_one_is_refused(
    driver: str, sentinel_setup: SentinelSetup
) -> None:
    setup = sentinel_setup
    replica = next(s for s in setup.servers if s.port != setup.primary_port())
    stale = RedisAddress(host="127.0.0.1", port=replica.port, master_name=MASTER)

    async def main(redis: Any) -> None:
        with pytest.raises(RedisError, match=r"^READONLY .* is a slave, not the primary"):
            await redis.connect(stale)

    run(driver, main)


# --------------------------------------------------------------------------------------
# The backplane drivers


@pytest.fixture(params=["trio", "asyncio"])
def harness(request: pytest.FixtureRequest) -> Harness:
    return Harness(request.param)


def test_backplanes_follow_a_failover(harness: Harness, sentinel_setup: SentinelSetup) -> None:
    setup = sentinel_setup
    url = setup.url()

    async def main(h: Harness) -> None:
        a, host_a = await h.start(ClusterConfig(url=url, node_id="node-a", presence_ttl=1.5))
        b, host_b = await h.start(ClusterConfig(url=url, node_id="node-b", presence_ttl=1.5))
        async with closing(h, a, b):
            for backplane, host in ((a, host_a), (b, host_b)):
                backplane.submit([Subscribe(room=LOBBY, gen=1)])
                await host.wait_for(of(RoomSynced))
            a.submit([Relay(room=LOBBY, ref=ref, prefix=b"p") for ref in range(5)])
            await host_b.wait_for(of(RecordReceived), 5)
            await anyio.to_thread.run_sync(setup.failover)
            for host in (host_a, host_b):  # the old primary dropped them; back on the new
                await host.wait_for(of(BackplaneLost))
                await host.wait_for(of(BackplaneRestored), 2)
            for backplane, host in ((a, host_a), (b, host_b)):  # as the broker does
                backplane.submit([Subscribe(room=LOBBY, gen=2)])
                await host.wait_for(of(RoomSynced), 2)
            a.submit([Relay(room=LOBBY, ref=ref, prefix=b"p") for ref in range(5, 10)])
            await host_b.wait_for(of(RecordReceived), 10)
            assert a.statistics.online and b.statistics.online

    harness.run(main)
