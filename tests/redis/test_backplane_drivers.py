"""The Redis backplane drivers' contract, against a real ``redis-server``.

Every test runs once per driver (``roombus.trio.RedisBackplane`` on trio,
``roombus.asyncio.RedisBackplane`` on asyncio), written once over a small harness that
starts and stops each the way its server does. Two backplanes on one Redis: listening
and snapshots, records both ways in one order (as :mod:`roombus.cluster.records`
encodes them), a room no longer listened to, the link lost and restored with the
server, the goodbyes before close, and the settings. (Nodes killed, and their users
reaped by the others' refresh, are in tests/e2e/test_cluster_nodes.py, with real processes.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import pytest

from roombus import ClusterConfig, ConfigError
from roombus.asyncio import RedisBackplane as AsyncioBackplane
from roombus.cluster import (
    Announce,
    BackplaneLost,
    BackplaneRestored,
    Relay,
    RoomSynced,
    Subscribe,
    Unsubscribe,
)
from roombus.cluster.records import encode_chat, encode_presence
from roombus.core.actions import ReadStream
from roombus.core.events import Event, RecordReceived, Relayed, StreamRead
from roombus.core.names import RoomName, Username, is_token
from roombus.core.streams import is_valid_epoch
from roombus.trio import RedisBackplane as TrioBackplane

from .conftest import RedisProcess

TIMEOUT = 20.0
LOBBY = RoomName("lobby")
OTHER = RoomName("other")
PREFIX = b'{"type":"chat","seq":'


class Backplane(Protocol):
    node_id: str

    def submit(self, work: Any) -> None: ...

    async def wait_idle(self) -> None: ...

    @property
    def statistics(self) -> Any: ...

    def metrics(self) -> dict[str, float]: ...


class Host:
    """A server as the backplane sees it: every event recorded, presence given."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.calls = 0
        self.presence: list[tuple[RoomName, list[str]]] = []
        self._changed = anyio.Event()

    def backplane_events(self, events: list[Event]) -> None:
        assert events, "an empty list of events"
        self.calls += 1
        self.events += events
        self._changed.set()

    def local_presence(self) -> list[tuple[RoomName, list[str]]]:
        return self.presence

    async def wait_for(self, predicate: Callable[[Event], bool], count: int = 1) -> list[Event]:
        while len(found := [e for e in self.events if predicate(e)]) < count:
            self._changed = anyio.Event()
            await self._changed.wait()
        return found

    def records(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, RecordReceived)]


def of(kind: type) -> Callable[[Any], bool]:
    return lambda event: isinstance(event, kind)


class Harness:
    """Starts and stops one driver the way its server does."""

    def __init__(self, driver: str) -> None:
        self.driver = driver
        self.cls: Any = TrioBackplane if driver == "trio" else AsyncioBackplane
        self._runs: dict[int, tuple[anyio.CancelScope, anyio.Event]] = {}
        self._group: Any = None

    def run(self, main: Callable[[Harness], Awaitable[None]]) -> None:
        async def bounded() -> None:
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as group:
                    self._group = group
                    await main(self)
                    group.cancel_scope.cancel()

        anyio.run(bounded, backend=self.driver)

    async def start(self, url: str | ClusterConfig, **options: Any) -> tuple[Any, Host]:
        backplane = self.cls(url, **options)
        host = Host()
        if self.driver == "trio":
            scope, done = anyio.CancelScope(), anyio.Event()
            self._runs[id(backplane)] = scope, done

            async def run() -> None:
                with scope:
                    await backplane.run(host)
                done.set()

            self._group.start_soon(run)
        else:
            backplane.start(host)
        await host.wait_for(of(BackplaneRestored))
        return backplane, host

    async def started(self, url: str, node: str) -> tuple[Any, Host]:
        return await self.start(url, node_id=node, presence_ttl=1.5)

    async def close(self, backplane: Any) -> None:
        """Leave as a server does: the queued work written, then the links closed."""
        await backplane.wait_idle()
        if self.driver == "trio":
            scope, done = self._runs[id(backplane)]
            scope.cancel()
            await done.wait()
        else:
            await backplane.aclose()


@asynccontextmanager
async def closing(harness: Harness, *backplanes: Any) -> Any:
    try:
        yield
    finally:
        for backplane in backplanes:
            await harness.close(backplane)


@pytest.fixture(params=["trio", "asyncio"])
def harness(request: pytest.FixtureRequest) -> Harness:
    return Harness(request.param)


def test_records_go_both_ways_in_one_order(harness: Harness, redis_server: RedisProcess) -> None:
    async def main(h: Harness) -> None:
        a, host_a = await h.started(redis_server.url, "node-a")
        b, host_b = await h.started(redis_server.url, "node-b")
        async with closing(h, a, b):
            epochs = []
            for backplane, host in ((a, host_a), (b, host_b)):
                backplane.submit([Subscribe(room=LOBBY, gen=1)])
                (synced,) = await host.wait_for(of(RoomSynced))
                assert synced == RoomSynced(
                    room=LOBBY, version=0, entries=(), gen=1, epoch=synced.epoch, seq=0
                )
                epochs.append(synced.epoch)
            epoch = epochs[0]
            assert epochs == [epoch, epoch] and is_valid_epoch(epoch)  # one room, one epoch
            b.submit([Announce(room=LOBBY, username=Username("bob"), present=True)])
            a.submit([Relay(room=LOBBY, ref=ref, prefix=PREFIX) for ref in range(50)])
            for host in (host_a, host_b):
                await host.wait_for(of(RecordReceived), 51)
            expected_chats = [
                encode_chat(seq, "node-a", seq - 1, epoch, PREFIX) for seq in range(1, 51)
            ]
            for host in (host_a, host_b):
                records = host.records()
                assert encode_presence(True, 1, "node-b", "bob") in records
                assert [r for r in records if r.startswith(b"m ")] == expected_chats
                # Records come in bursts: far fewer host calls than records.
                assert host.calls < 40
            assert a.statistics.relayed == 50
            assert a.metrics()["roombus_redis_relayed_total"] == 50
            # A late listener's snapshot holds bob, at the version of his record.
            a.submit([Subscribe(room=LOBBY, gen=2)])
            synced = (await host_a.wait_for(of(RoomSynced), 2))[-1]
            assert synced == RoomSynced(
                room=LOBBY, version=1, entries=(("node-b", "bob"),), gen=2, epoch=epoch, seq=50
            )
            # An acknowledged relay and a read of the stream are answered through the
            # driver; a resend of the id publishes nothing.
            acked = Relay(
                room=LOBBY, ref=99, prefix=PREFIX, keep=10, keep_ms=60_000, dedup=("b", "x")
            )
            b.submit([acked, acked])
            first, again = await host_b.wait_for(of(Relayed), 2)
            assert (first.seq, first.duplicate, again.seq, again.duplicate) == (51, False, 51, True)
            b.submit([ReadStream(room=LOBBY, ticket=4, after=0, count=5, keep=10, keep_ms=60_000)])
            (read,) = await host_b.wait_for(of(StreamRead))
            assert (read.ticket, read.epoch, read.top, read.first_kept) == (4, epoch, 51, 51)
            assert read.entries == ((51, PREFIX),)  # the first 50 kept no history

    harness.run(main)


def test_a_room_no_longer_listened_to_sends_nothing(
    harness: Harness, redis_server: RedisProcess
) -> None:
    async def main(h: Harness) -> None:
        a, host_a = await h.started(redis_server.url, "node-a")
        b, host_b = await h.started(redis_server.url, "node-b")
        async with closing(h, a, b):
            a.submit([Subscribe(room=LOBBY, gen=1), Subscribe(room=OTHER, gen=2)])
            await host_a.wait_for(of(RoomSynced), 2)
            a.submit([Unsubscribe(room=LOBBY)])
            await a.wait_idle()
            b.submit([Relay(room=LOBBY, ref=1, prefix=PREFIX)])
            b.submit([Relay(room=OTHER, ref=2, prefix=PREFIX)])
            # OTHER's record comes after LOBBY's was published: had LOBBY's been
            # delivered, it would be here first.
            await host_a.wait_for(of(RecordReceived))
            (record,) = host_a.records()
            assert record.startswith(b"m 1 node-b 2 ") and record.endswith(PREFIX)
            assert host_b.records() == []  # b listens to neither

    harness.run(main)


def test_the_goodbye_goes_out_before_close(harness: Harness, redis_server: RedisProcess) -> None:
    async def main(h: Harness) -> None:
        a, host_a = await h.started(redis_server.url, "node-a")
        b, _ = await h.started(redis_server.url, "node-b")
        a.submit([Subscribe(room=LOBBY, gen=1)])
        await host_a.wait_for(of(RoomSynced))
        b.submit([Announce(room=LOBBY, username=Username("bob"), present=True)])
        b.submit([Announce(room=LOBBY, username=Username("bob"), present=False)])
        await h.close(b)
        await host_a.wait_for(of(RecordReceived), 2)
        assert host_a.records() == [
            encode_presence(True, 1, "node-b", "bob"),
            encode_presence(False, 2, "node-b", "bob"),
        ]
        await h.close(a)

    harness.run(main)


def test_redis_killed_and_restarted(harness: Harness, redis_server: RedisProcess) -> None:
    async def main(h: Harness) -> None:
        a, host_a = await h.started(redis_server.url, "node-a")
        async with closing(h, a):
            a.submit([Subscribe(room=LOBBY, gen=1)])
            await host_a.wait_for(of(RoomSynced))
            redis_server.kill()
            await host_a.wait_for(of(BackplaneLost))
            assert not a.statistics.online
            # Offline: work is dropped and counted, never queued.
            a.submit([Relay(room=LOBBY, ref=1, prefix=b"{")])
            assert a.statistics.dropped >= 1
            await a.wait_idle()
            redis_server.restart()
            await host_a.wait_for(of(BackplaneRestored), 2)
            assert a.statistics.online
            assert a.statistics.connects == 2
            assert a.statistics.failures >= 1

    harness.run(main)


def test_a_cluster_config_is_the_settings_one_by_one(
    harness: Harness, redis_server: RedisProcess
) -> None:
    config = ClusterConfig(url=redis_server.url, node_id="node-c", presence_ttl=2, prefix="t1")
    given = harness.cls(config)
    spelt = harness.cls(redis_server.url, node_id="node-c", presence_ttl=2, prefix="t1")
    for backplane in (given, spelt):
        assert (backplane.node_id, backplane.presence_ttl, backplane.prefix) == ("node-c", 2, "t1")
        assert backplane.address == config.address
    with pytest.raises(TypeError, match="not both"):
        harness.cls(config, prefix="t2")
    # Without a node id, each backplane makes its own, of the node id grammar.
    one, two = harness.cls(redis_server.url), harness.cls(ClusterConfig(url=redis_server.url))
    assert is_token(one.node_id) and is_token(two.node_id) and one.node_id != two.node_id

    async def main(h: Harness) -> None:
        c, host = await h.start(config)
        async with closing(h, c):
            c.submit([Subscribe(room=LOBBY, gen=1)])
            c.submit([Relay(room=LOBBY, ref=7, prefix=PREFIX)])
            (synced,) = await host.wait_for(of(RoomSynced))
            await host.wait_for(of(RecordReceived))
            assert host.records() == [encode_chat(1, "node-c", 7, synced.epoch, PREFIX)]

    harness.run(main)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"url": "http://127.0.0.1"}, "redis"),
        ({"url": "redis://127.0.0.1", "node_id": "has space"}, "node-id"),
        ({"url": "redis://127.0.0.1", "presence_ttl": 0}, "presence-ttl"),
        ({"url": "redis://127.0.0.1", "prefix": ""}, "redis-prefix"),
        ({"url": "redis://127.0.0.1", "connect_timeout": -1}, "redis-connect-timeout"),
    ],
)
def test_bad_settings_are_config_errors(
    harness: Harness, kwargs: dict[str, Any], setting: str
) -> None:
    settings = dict(kwargs)
    url = settings.pop("url")
    with pytest.raises(ConfigError) as info:
        harness.cls(url, **settings)
    assert str(info.value).startswith(f"{setting}:")
