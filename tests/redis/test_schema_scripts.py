"""The schema's Lua scripts on a real ``redis-server`` publish what the Python encoders write.

Random Relay/Announce sequences from two nodes into two rooms go through the scripts
(:func:`roombus.cluster.schema.command_for`); the records Redis publishes must be, in order,
``encode_chat``/``encode_presence`` of what a model of the scripts expects, and the
snapshot must read back as the model's presence. Bounded by ``trio.fail_after``;
loopback only.
"""

from __future__ import annotations

import random

import pytest

import trio
from roombus import RoomName, Username
from roombus.cluster import Announce, RecordReceived, Relay
from roombus.cluster.records import encode_chat, encode_presence, parse_record
from roombus.cluster.schema import (
    SCRIPTS,
    channel,
    command_for,
    parse_snapshot,
    records_received,
    refresh_command,
    script_source,
    snapshot_command,
)
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
    rng = random.Random(seed)
    seq = dict.fromkeys(ROOMS, 0)
    version = dict.fromkeys(ROOMS, 0)
    present: dict[RoomName, set[tuple[str, str]]] = {room: set() for room in ROOMS}
    actions: list[tuple[Relay | Announce, str]] = []
    replies: list[int | None] = []  # the relay script answers the seq
    expected: list[tuple[str, bytes]] = []
    for ref in range(1, 201):
        room, node = rng.choice(ROOMS), rng.choice(NODES)
        action: Relay | Announce
        if rng.random() < 0.5:
            action = Relay(room=room, ref=ref, prefix=rng.randbytes(rng.randrange(0, 40)))
            seq[room] += 1
            expected.append((room, encode_chat(seq[room], node, ref, action.prefix)))
            replies.append(seq[room])
        else:
            user, on = rng.choice(USERS), rng.random() < 0.6
            action = Announce(room=room, username=user, present=on)
            if on != ((node, user) in present[room]):
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
                encode_presence(False, 4, "gone", USERS[1]),
            ]
            assert await _receive(sub, len(expected)) == [(room, data) for data in expected]
