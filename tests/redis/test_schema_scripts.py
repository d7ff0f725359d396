"""The schema's Lua scripts on a real ``redis-server`` publish what the Python encoders write.

Random Relay/Announce sequences from two nodes into two rooms go through the scripts
(:func:`roombus.cluster.schema.command_for`); the records Redis publishes must be, in order,
``encode_chat``/``encode_presence`` of what a model of the scripts expects, and the
snapshot must read back as the model's presence. Bounded by ``trio.fail_after``;
loopback only.
"""

from __future__ import annotations

import functools
import random
from fnmatch import fnmatchcase
from typing import Any

import pytest

import trio
from roombus import RoomName, Username
from roombus.cluster import Announce, RecordReceived, Relay
from roombus.cluster.records import encode_chat, encode_presence, parse_record
from roombus.cluster.schema import (
    SCRIPTS,
    channel,
    cluster_read_command,
    command_for,
    index_key,
    parse_cluster_read,
    parse_read,
    parse_relayed,
    parse_snapshot,
    records_received,
    refresh_command,
    script_source,
    snapshot_command,
    touch_command,
)
from roombus.core.actions import ReadCluster, ReadStream
from roombus.core.streams import is_valid_epoch
from roombus.trio._redis import RedisConnection, RedisSubscriber, connect, connect_subscriber

from .conftest import RedisProcess

TIMEOUT = 10.0
PREFIX = "t"
ROOMS = [RoomName("r1"), RoomName("a.b:c-d_e")]
NODES = ["n1", "host-12-ab:c"]
USERS = [Username(u) for u in ("ann", "bob cy", "zoë", "名前", "x" * 64)]
LIFETIME = 60_000


async def _load(conn: RedisConnection, sharded: bool) -> dict[str, bytes]:
    return {
        name: await conn.execute("SCRIPT", "LOAD", script_source(name, sharded)) for name in SCRIPTS
    }


async def _receive(sub: RedisSubscriber, count: int) -> list[tuple[str, bytes]]:
    """``(room, data)`` of the next *count* records."""
    out: list[tuple[str, bytes]] = []
    while len(out) < count:
        for event in records_received(await sub.receive_many()):
            assert isinstance(event, RecordReceived)
            out.append((event.room, event.data))
    return out


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "classic"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_scripts_publish_what_the_encoders_write(
    redis_server: RedisProcess, sharded: bool, seed: int
) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            # Reading a room's stream gives it an epoch (the relay would too).
            shas = await _load(conn, sharded)
            await conn.execute("FLUSHALL")
            epochs = {}
            for room in ROOMS:
                read = ReadStream(room=room, ticket=1, after=0, count=0, keep=10, keep_ms=LIFETIME)
                command = command_for(read, prefix=PREFIX, node="n1", shas=shas, lifetime=LIFETIME)
                answer = parse_read(read, await conn.execute(*command))
                assert is_valid_epoch(answer.epoch) and answer.top == 0
                assert answer.first_kept == 1 and answer.entries == ()
                epochs[room] = answer.epoch
    rng = random.Random(seed)
    seq = dict.fromkeys(ROOMS, 0)
    version = dict.fromkeys(ROOMS, 0)
    present: dict[RoomName, set[tuple[str, str]]] = {room: set() for room in ROOMS}
    actions: list[tuple[Relay | Announce, str]] = []
    replies: list[object] = []  # the relay script answers the seq and the epoch
    expected: list[tuple[str, bytes]] = []
    for ref in range(1, 201):
        room, node = rng.choice(ROOMS), rng.choice(NODES)
        action: Relay | Announce
        if rng.random() < 0.5:
            action = Relay(room=room, ref=ref, prefix=rng.randbytes(rng.randrange(0, 40)))
            seq[room] += 1
            epoch = epochs[room]
            expected.append((room, encode_chat(seq[room], node, ref, epoch, action.prefix)))
            replies.append([seq[room], epoch.encode(), 0])
        else:
            user, on = rng.choice(USERS), rng.random() < 0.6
            force = not on and rng.random() < 0.3  # published even with no entry
            action = Announce(room=room, username=user, present=on, force=force)
            if on != ((node, user) in present[room]) or force:
                (present[room].add if on else present[room].discard)((node, user))
                version[room] += 1
                expected.append((room, encode_presence(on, version[room], node, user)))
            replies.append(None)
        actions.append((action, node))
    with trio.fail_after(TIMEOUT):
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            shas = await _load(conn, sharded)
            await sub.subscribe(*(channel(PREFIX, room) for room in ROOMS))
            commands = [
                command_for(action, prefix=PREFIX, node=node, shas=shas, lifetime=LIFETIME)
                for action, node in actions
            ]
            assert await conn.pipeline(commands) == replies
            assert await _receive(sub, len(expected)) == expected
            assert all(parse_record(data) is not None for _, data in expected)
            # What the snapshot script answers reads back as the model's presence.
            snaps = await conn.pipeline(
                [snapshot_command(room, prefix=PREFIX, shas=shas) for room in ROOMS]
            )
            for gen, (room, reply) in enumerate(zip(ROOMS, snaps, strict=True)):
                synced = parse_snapshot(room, gen, reply)
                assert synced.version == version[room]
                assert set(synced.entries) == present[room]
                assert (synced.epoch, synced.seq) == (epochs[room], seq[room])


async def test_refresh_keeps_its_own_and_reaps_the_dead(redis_server: RedisProcess) -> None:
    room = ROOMS[1]
    with trio.fail_after(TIMEOUT):
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=True) as sub,
        ):
            shas = await _load(conn, True)
            await sub.subscribe(channel(PREFIX, room))
            dead = Announce(room=room, username=USERS[1], present=True)
            await conn.execute(
                *command_for(dead, prefix=PREFIX, node="gone", shas=shas, lifetime=1)
            )
            await trio.sleep(0.05)  # past the dead node's 1 ms lifetime
            await conn.execute(
                *refresh_command(
                    room,
                    [USERS[0], USERS[2]],
                    prefix=PREFIX,
                    node="n1",
                    shas=shas,
                    lifetime=LIFETIME,
                )
            )
            expected = [
                encode_presence(True, 1, "gone", USERS[1]),
                encode_presence(True, 2, "n1", USERS[0]),
                encode_presence(True, 3, "n1", USERS[2]),
                encode_presence(False, 4, "gone", USERS[1], expired=True),
            ]
            assert await _receive(sub, len(expected)) == [(room, data) for data in expected]


async def test_a_snapshot_names_the_leaves_not_the_expiries(redis_server: RedisProcess) -> None:
    """``gone``: a leave its node announced (forced or not), until the user is back; an
    expired entry is not one."""
    room = ROOMS[0]

    def announce(user: Username, present: bool, node: str = "n1", **kw: Any) -> Any:
        action = Announce(room=room, username=user, present=present, **kw)
        return command_for(action, prefix=PREFIX, node=node, shas=shas, lifetime=LIFETIME)

    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            ann, bob, cy = USERS[0], USERS[1], USERS[2]
            await conn.pipeline(
                [announce(u, True) for u in (ann, bob)]
                + [announce(ann, False), announce(cy, False, force=True)]
            )
            dead = Announce(room=room, username=USERS[3], present=True)
            await conn.execute(
                *command_for(dead, prefix=PREFIX, node="gone", shas=shas, lifetime=1)
            )
            await trio.sleep(0.05)  # past the dead node's 1 ms lifetime
            snap = snapshot_command(room, prefix=PREFIX, shas=shas)
            synced = parse_snapshot(room, 1, await conn.execute(*snap))
            assert synced.entries == (("n1", bob),)  # the dead one reaped
            assert set(synced.gone) == {("n1", ann), ("n1", cy)}
            await conn.execute(*announce(ann, True))  # back: no longer among the gone
            synced = parse_snapshot(room, 1, await conn.execute(*snap))
            assert set(synced.gone) == {("n1", cy)}
            ttl = await conn.execute("PTTL", f"{PREFIX}:{{{room}}}:g")
            assert isinstance(ttl, int) and ttl > 0  # the key expires too


async def _run(conn: RedisConnection, shas: dict[str, bytes], action: object) -> object:
    assert isinstance(action, (Relay, ReadStream))
    return await conn.execute(
        *command_for(action, prefix=PREFIX, node="n1", shas=shas, lifetime=LIFETIME)
    )


async def test_a_room_stream_keeps_dedups_and_reads(redis_server: RedisProcess) -> None:
    room = ROOMS[0]
    keep = 5

    def relay(ref: int, msg_id: str | None = None) -> Relay:
        return Relay(
            room=room,
            ref=ref,
            prefix=b'{"n":%d,"seq":' % ref,
            keep=keep,
            keep_ms=LIFETIME,
            dedup=None if msg_id is None else ("ann", msg_id),
            dedup_ms=LIFETIME,
        )

    def read(after: int, count: int, *, oldest: bool = False, upto: int = 0) -> ReadStream:
        return ReadStream(
            room=room,
            ticket=9,
            after=after,
            upto=upto,
            count=count,
            oldest=oldest,
            keep=keep,
            keep_ms=LIFETIME,
        )

    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            first = parse_relayed(relay(1, "a"), await _run(conn, shas, relay(1, "a")))
            assert (first.seq, first.duplicate) == (1, False)
            for ref in range(2, 201):  # more than MAXLEN ~ trims exactly
                await _run(conn, shas, relay(ref))
            again = parse_relayed(relay(201, "a"), await _run(conn, shas, relay(201, "a")))
            assert (again.seq, again.epoch, again.duplicate) == (1, first.epoch, True)
            top = parse_read(read(0, 0), await _run(conn, shas, read(0, 0)))
            assert (top.epoch, top.top, top.first_kept) == (first.epoch, 200, 196)
            latest = parse_read(read(190, 3), await _run(conn, shas, read(190, 3)))
            assert [seq for seq, _ in latest.entries] == [198, 199, 200]
            assert latest.entries[0][1] == b'{"n":198,"seq":'
            oldest = parse_read(
                read(190, 3, oldest=True), await _run(conn, shas, read(190, 3, oldest=True))
            )
            assert [seq for seq, _ in oldest.entries] == [196, 197, 198]  # kept: from 196
            span = parse_read(
                read(196, 10, upto=198), await _run(conn, shas, read(196, 10, upto=198))
            )
            assert [seq for seq, _ in span.entries] == [197, 198]
            # Redis loses the room (FLUSHALL is what a restart without persistence
            # looks like): a new epoch, seq and history start over, the id is new again.
            await conn.execute("FLUSHALL")
            await trio.sleep(0.002)  # epochs are made from the server's clock (us)
            fresh = parse_relayed(relay(202, "a"), await _run(conn, shas, relay(202, "a")))
            assert (fresh.seq, fresh.duplicate) == (1, False) and fresh.epoch != first.epoch


async def test_kept_messages_expire_with_the_history_ttl(redis_server: RedisProcess) -> None:
    room = ROOMS[1]
    relay = Relay(room=room, ref=1, prefix=b"{", keep=10, keep_ms=30)
    read = ReadStream(room=room, ticket=1, after=0, count=10, keep=10, keep_ms=30)
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            await _run(conn, shas, relay)
            await _run(conn, shas, relay)
            now = parse_read(read, await _run(conn, shas, read))
            assert (now.top, now.first_kept, len(now.entries)) == (2, 1, 2)
            await trio.sleep(0.1)
            later = parse_read(read, await _run(conn, shas, read))
            # The messages are gone; the position is not (it lives the position TTL).
            assert (later.epoch, later.top, later.first_kept, later.entries) == (
                now.epoch,
                2,
                3,
                (),
            )


async def test_an_epoch_is_tied_to_its_seq_and_to_the_server_s_run(
    redis_server: RedisProcess,
) -> None:
    """A seq that is gone (evicted), or a server that is another run (restarted from a
    snapshot that may be older, a failover), starts a new epoch: a position of the old
    one can never name another message."""
    room = ROOMS[0]
    relay = Relay(room=room, ref=1, prefix=b"{", keep=10, keep_ms=LIFETIME)

    async def publish(conn: RedisConnection, shas: dict[str, bytes], run: str) -> tuple[str, int]:
        command = command_for(
            relay, prefix=PREFIX, node="n1", shas=shas, lifetime=LIFETIME, run=run
        )
        seq, epoch, _ = await conn.execute(*command)
        return epoch.decode(), seq

    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            e1, _ = await publish(conn, shas, "run-a")
            assert await publish(conn, shas, "run-a") == (e1, 2)
            await trio.sleep(0.002)
            e2, seq = await publish(conn, shas, "run-b")  # the same keys, another run
            assert e2 != e1 and seq == 1
            await conn.execute("DEL", f"{PREFIX}:{{{room}}}:s")  # the seq evicted alone
            await trio.sleep(0.002)
            e3, seq = await publish(conn, shas, "run-b")
            assert e3 not in (e1, e2) and seq == 1


async def test_a_room_with_members_keeps_its_position(redis_server: RedisProcess) -> None:
    room = ROOMS[1]
    relay = Relay(room=room, ref=1, prefix=b"{", keep=0, position_ms=200)
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            await conn.execute(
                *command_for(relay, prefix=PREFIX, node="n1", shas=shas, lifetime=LIFETIME)
            )
            refresh = refresh_command(
                room,
                [USERS[0]],
                prefix=PREFIX,
                node="n1",
                shas=shas,
                lifetime=LIFETIME,
                position_ms=60_000,
            )
            await conn.execute(*refresh)
            for kind in "es":
                assert await conn.execute("PTTL", f"{PREFIX}:{{{room}}}:{kind}") > 1000


# -- the server API's cluster-wide view: touch, rooms, nodes, members -----------------


async def _cluster_read(conn: RedisConnection, shas: dict[str, bytes], read: Any) -> Any:
    reply = await conn.execute(
        *cluster_read_command(read, prefix=PREFIX, shas=shas, lifetime=LIFETIME)
    )
    return parse_cluster_read(read, reply)


async def test_the_node_list_and_the_room_index_age_out(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            touch = functools.partial(touch_command, prefix=PREFIX, shas=shas)
            await conn.execute(*touch(["r1", "r2"], node="n1", lifetime=LIFETIME))
            await conn.execute(*touch(["r2", "r3"], node="n2", lifetime=300))
            nodes = await _cluster_read(conn, shas, ReadCluster(ticket=1, kind="nodes"))
            assert [n for n, _ in nodes.nodes] == ["n1", "n2"]
            assert all(0 <= age < 1000 for _, age in nodes.nodes)
            rooms = await _cluster_read(conn, shas, ReadCluster(ticket=2, kind="rooms"))
            assert rooms.rooms == ("r1", "r2", "r3") and rooms.more == ""
            for k in ("rooms", "seen", "nodes"):
                assert await conn.execute("PTTL", index_key(PREFIX, k)) > 1000
            await trio.sleep(0.4)
            # Past a lifetime of 300 ms (this test's reader's is a minute): n2 and r3
            # are still listed; with the writer's lifetime, trimmed.
            await conn.execute(*touch(["r1"], node="n1", lifetime=300))
            nodes = await _cluster_read(conn, shas, ReadCluster(ticket=3, kind="nodes"))
            assert [n for n, _ in nodes.nodes] == ["n1"]
            rooms = await _cluster_read(conn, shas, ReadCluster(ticket=4, kind="rooms"))
            assert rooms.rooms == ("r1",)
            assert await conn.execute("ZRANGE", index_key(PREFIX, "rooms"), 0, -1) == [b"r1"]


@pytest.mark.parametrize("seed", range(3))
async def test_rooms_pages_match_fnmatch(redis_server: RedisProcess, seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab1:-._"
    names = sorted({"".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(150)})
    patterns = ["*", "a*", "a?", "*:*", "[ab]*", "[!a]*", "?-*", "a[.-]*", "*b", "[]", "x*"]
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            await conn.execute(
                *touch_command(names, prefix=PREFIX, node="n1", shas=shas, lifetime=LIFETIME)
            )
            for pattern in patterns:
                expected = [n for n in names if fnmatchcase(n, pattern)]
                got: list[str] = []
                after = ""
                for _ in range(200):
                    read = ReadCluster(
                        ticket=1, kind="rooms", pattern=pattern, after=after, limit=7
                    )
                    answer = await _cluster_read(conn, shas, read)
                    assert len(answer.rooms) <= 7
                    got.extend(answer.rooms)
                    if not answer.more:
                        break
                    after = answer.more
                assert got == expected, pattern


async def test_members_reads_the_live_presence_entries(redis_server: RedisProcess) -> None:
    room = ROOMS[0]
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            shas = await _load(conn, True)
            await conn.execute("FLUSHALL")
            for node, user, life in (
                ("n1", "ann", LIFETIME),
                ("n2", "ann", 100),
                ("n2", "bob", LIFETIME),
            ):
                announce = Announce(room=room, username=Username(user), present=True)
                await conn.execute(
                    *command_for(announce, prefix=PREFIX, node=node, shas=shas, lifetime=life)
                )
            await trio.sleep(0.2)  # n2's ann expired (not reaped: a read changes nothing)
            read = ReadCluster(ticket=5, kind="presence", room=room)
            answer = await _cluster_read(conn, shas, read)
            assert answer.ticket == 5 and answer.entries == (("n1", "ann"), ("n2", "bob"))
            assert await conn.execute("ZCARD", f"{PREFIX}:{{{room}}}:p") == 3
