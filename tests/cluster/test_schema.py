"""The cluster's Redis schema: names, scripts, commands and replies (no Redis needed)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import RoomName, Username
from roombus.cluster import Announce, RecordReceived, Relay, RoomSynced
from roombus.cluster.schema import (
    KEY_TTL_MS,
    SCRIPTS,
    channel,
    command_for,
    key,
    lifetime_ms,
    parse_snapshot,
    publish_verb,
    records_received,
    refresh_command,
    room_of_channel,
    script_source,
    snapshot_command,
)

from ..strategies import rooms

SHAS = {"relay": b"r" * 40, "announce": b"a" * 40, "refresh": b"f" * 40, "snapshot": b"s" * 40}

# SHA1 of every script as the trio backplane loaded it before the schema had a module
# of its own: the scripts were moved, not changed (Redis caches scripts by this SHA).
LOADED = {
    (True, "relay"): "8ee4491c5e5b7f8afa0865798551030c377cac55",
    (True, "announce"): "b53b3697497a791736cdc2f11e74a935f2a02aa4",
    (True, "refresh"): "0f8c9373feca7f8961fdc3e54bd806a2f62c5384",
    (True, "snapshot"): "cb25442bb8cf9671d490549082309990c730bb3f",
    (False, "relay"): "fbb294d13b8f1fc44a893244c0b87de5c9ae5c4d",
    (False, "announce"): "b6456c2582df1c99fe9c203acb96d317077eb2e2",
    (False, "refresh"): "a5bbe76e5fd24c0b96aeb976b9540daa54286386",
    (False, "snapshot"): "7992d425b304df2351c5f0d0884f85c2c304b190",
}


@pytest.mark.parametrize(("sharded", "name"), sorted(LOADED))
def test_script_sources_are_unchanged(sharded: bool, name: str) -> None:
    source = script_source(name, sharded)
    assert hashlib.sha1(source.encode()).hexdigest() == LOADED[sharded, name]
    assert "{pub}" not in source and "{key_ttl}" not in source
    assert f"redis.call('{publish_verb(sharded)}'" in source


def test_scripts_load_in_order() -> None:
    assert list(SCRIPTS) == ["relay", "announce", "refresh", "snapshot"]
    assert publish_verb(True) == "SPUBLISH"
    assert publish_verb(False) == "PUBLISH"
    assert str(KEY_TTL_MS) in script_source("relay", True)


def test_key_names() -> None:
    assert key("roombus", "lobby", "s") == "roombus:{lobby}:s"
    assert key("p:x", "a.b", "p") == "p:x:{a.b}:p"
    assert channel("roombus", "lobby") == key("roombus", "lobby", "c") == "roombus:{lobby}:c"
    assert lifetime_ms(15.0) == 10_000
    assert lifetime_ms(0.3) == 200


@given(st.text("abcXYZ019_.:-", min_size=1, max_size=64), rooms)
def test_the_room_of_a_channel(prefix: str, room: str) -> None:
    assert room_of_channel(channel(prefix, room).encode()) == room
    assert room_of_channel(key(prefix, room, "p").encode()) is None


@pytest.mark.parametrize(
    "chan", [b"", b"roombus:lobby:c", b"roombus:{}:c", b"roombus:{a b}:c", b"x:{lobby}:cc"]
)
def test_what_is_no_room_channel(chan: bytes) -> None:
    assert room_of_channel(chan) is None


def test_records_received_keep_order_and_skip_strangers() -> None:
    burst = [
        (b"roombus:{a}:c", b"m 1 n 1 x"),
        (b"other", b"m 2 n 2 y"),
        (b"roombus:{b}:c", b"j 1 n bob"),
    ]
    assert records_received(burst) == [
        RecordReceived(room=RoomName("a"), data=b"m 1 n 1 x"),
        RecordReceived(room=RoomName("b"), data=b"j 1 n bob"),
    ]


def test_commands_of_the_actions() -> None:
    relay = Relay(room=RoomName("r"), ref=7, prefix=b'{"x":')
    assert command_for(relay, prefix="p", node="n1", shas=SHAS, lifetime=10_000) == (
        "EVALSHA",
        SHAS["relay"],
        1,
        "p:{r}:s",
        "p:{r}:c",
        "n1",
        7,
        b'{"x":',
    )
    for present, flag in ((True, "1"), (False, "0")):
        announce = Announce(room=RoomName("r"), username=Username("bob cy"), present=present)
        assert command_for(announce, prefix="p", node="n1", shas=SHAS, lifetime=10_000) == (
            "EVALSHA",
            SHAS["announce"],
            2,
            "p:{r}:p",
            "p:{r}:v",
            "p:{r}:c",
            "n1 bob cy",
            flag,
            10_000,
        )
    assert refresh_command("r", ["ann", "bob"], prefix="p", node="n1", shas=SHAS, lifetime=5) == (
        "EVALSHA",
        SHAS["refresh"],
        2,
        "p:{r}:p",
        "p:{r}:v",
        "p:{r}:c",
        5,
        "n1 ann",
        "n1 bob",
    )
    assert snapshot_command("r", prefix="p", shas=SHAS) == (
        "EVALSHA",
        SHAS["snapshot"],
        2,
        "p:{r}:p",
        "p:{r}:v",
        "p:{r}:c",
    )


def test_a_snapshot_reply() -> None:
    room = RoomName("r")
    assert parse_snapshot(room, 3, [5, [b"n1 ann", b"n2 bob cy", b"n3 \xff"]]) == RoomSynced(
        room=room,
        version=5,
        entries=(("n1", "ann"), ("n2", "bob cy"), ("n3", "\ufffd")),
        gen=3,
    )
    assert parse_snapshot(room, 1, [0, []]) == RoomSynced(room=room, version=0, entries=(), gen=1)


@pytest.mark.parametrize(
    "reply", [None, 5, b"", [1], [1, 2, 3], [b"x", []], [1, ["n1 ann"]], [1, None], [None, []]]
)
def test_an_unreadable_snapshot_is_a_value_error(reply: object) -> None:
    with pytest.raises(ValueError, match="unreadable presence snapshot of room 'r'"):
        parse_snapshot(RoomName("r"), 1, reply)
