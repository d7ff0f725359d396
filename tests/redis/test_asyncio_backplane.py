"""The asyncio backplane driver against a real ``redis-server``, with recording hosts.

Two backplanes on one Redis: listening and snapshots, records both ways (as
:mod:`roombus.cluster.records` encodes them), the link lost and restored with the server,
and the goodbyes before close. (A node killed, and its users reaped by the others'
refresh, is in tests/cluster/test_nodes.py, with real processes.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from roombus import (
    Announce,
    BackplaneLost,
    BackplaneRestored,
    ConfigError,
    Relay,
    RoomSynced,
    Subscribe,
)
from roombus.asyncio import RedisBackplane
from roombus.cluster.records import encode_chat, encode_presence
from roombus.core.events import Event, RecordReceived
from roombus.core.names import RoomName, Username

from .conftest import RedisProcess

TIMEOUT = 15.0
LOBBY = RoomName("lobby")


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), TIMEOUT)

    asyncio.run(bounded())


class Host:
    """A server as the backplane sees it: every event recorded, presence given."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.calls = 0
        self.presence: list[tuple[RoomName, list[str]]] = []
        self._changed = asyncio.Event()

    def backplane_events(self, events: list[Event]) -> None:
        assert events, "an empty list of events"
        self.calls += 1
        self.events += events
        self._changed.set()

    def local_presence(self) -> list[tuple[RoomName, list[str]]]:
        return self.presence

    async def wait_for(self, predicate: Callable[[Event], bool], count: int = 1) -> list[Event]:
        while len(found := [e for e in self.events if predicate(e)]) < count:
            self._changed.clear()
            await self._changed.wait()
        return found

    def records(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, RecordReceived)]


def of(kind: type) -> Callable[[Any], bool]:
    return lambda event: isinstance(event, kind)


async def started(url: str, node: str, **options: Any) -> tuple[RedisBackplane, Host]:
    backplane = RedisBackplane(url, node_id=node, presence_ttl=1.5, **options)
    host = Host()
    backplane.start(host)
    await host.wait_for(of(BackplaneRestored))
    return backplane, host


def test_records_go_both_ways_in_one_order(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a, host_a = await started(redis_server.url, "node-a")
        b, host_b = await started(redis_server.url, "node-b")
        try:
            for backplane, host in ((a, host_a), (b, host_b)):
                backplane.submit([Subscribe(room=LOBBY, gen=1)])
                (synced,) = await host.wait_for(of(RoomSynced))
                assert synced == RoomSynced(room=LOBBY, version=0, entries=(), gen=1)
            b.submit([Announce(room=LOBBY, username=Username("bob"), present=True)])
            prefix = b'{"type":"chat","seq":'
            work: list[Any] = [Relay(room=LOBBY, ref=ref, prefix=prefix) for ref in range(50)]
            a.submit(work)
            for host in (host_a, host_b):
                await host.wait_for(of(RecordReceived), 51)
            expected_chats = [encode_chat(seq, "node-a", seq - 1, prefix) for seq in range(1, 51)]
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
            assert synced == RoomSynced(room=LOBBY, version=1, entries=(("node-b", "bob"),), gen=2)
        finally:
            await a.aclose()
            await b.aclose()

    run(main)


def test_the_goodbye_goes_out_before_close(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a, host_a = await started(redis_server.url, "node-a")
        b, _ = await started(redis_server.url, "node-b")
        a.submit([Subscribe(room=LOBBY, gen=1)])
        await host_a.wait_for(of(RoomSynced))
        b.submit([Announce(room=LOBBY, username=Username("bob"), present=True)])
        b.submit([Announce(room=LOBBY, username=Username("bob"), present=False)])
        await b.wait_idle()
        await b.aclose()
        await b.aclose()  # idempotent
        await host_a.wait_for(of(RecordReceived), 2)
        assert host_a.records() == [
            encode_presence(True, 1, "node-b", "bob"),
            encode_presence(False, 2, "node-b", "bob"),
        ]
        await a.aclose()

    run(main)


def test_redis_killed_and_restarted(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a, host_a = await started(redis_server.url, "node-a")
        try:
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
            await asyncio.wait_for(host_a.wait_for(of(BackplaneRestored), 2), 10)
            assert a.statistics.online
            assert a.statistics.connects == 2
            assert a.statistics.failures >= 1
        finally:
            await a.aclose()

    run(main)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"url": "http://127.0.0.1"}, "redis"),
        ({"url": "redis://127.0.0.1", "node_id": "has space"}, "node-id"),
        ({"url": "redis://127.0.0.1", "presence_ttl": 0}, "presence-ttl"),
        ({"url": "redis://127.0.0.1", "prefix": ""}, "redis-prefix"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, Any], setting: str) -> None:
    url = kwargs.pop("url")
    with pytest.raises(ConfigError) as info:
        RedisBackplane(url, **kwargs)
    assert str(info.value).startswith(f"{setting}:")
