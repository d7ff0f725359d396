"""The cluster's Redis schema: names, scripts, commands and replies (no Redis needed)."""

from __future__ import annotations

import hashlib
import re
from fnmatch import fnmatchcase

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from roombus import RoomName, Username
from roombus.cluster import Announce, RecordReceived, Relay, RoomSynced
from roombus.cluster.schema import (
    KEY_TTL_MS,
    ROOMS_BUDGET,
    SCRIPTS,
    channel,
    cluster_read_command,
    command_for,
    glob_to_lua,
    key,
    lifetime_ms,
    parse_cluster_read,
    parse_read,
    parse_relayed,
    parse_snapshot,
    publish_verb,
    records_received,
    refresh_command,
    room_of_channel,
    script_source,
    snapshot_command,
    touch_command,
)
from roombus.core.actions import ReadCluster, ReadStream
from roombus.core.events import ClusterRead, Relayed, StreamRead

from ..strategies import rooms

SHAS = {
    "relay": b"r" * 40,
    "read": b"h" * 40,
    "announce": b"a" * 40,
    "refresh": b"f" * 40,
    "snapshot": b"s" * 40,
}

# SHA1 of every script as loaded (Redis caches scripts by it): a change to a script is
# a change to the cluster's schema, made on purpose. announce is as the trio backplane
# loaded it before the schema had a module of its own; relay, read, snapshot and
# refresh are those of room streams (epoch, history, dedup, a held room's position);
# announce, refresh and snapshot changed again when expiries became ``x`` records and
# a leave could be forced.
LOADED = {
    (True, "relay"): "c34914c77d654a2bb191a35d2a0146d5c5eb766b",
    (True, "read"): "3ee813ac291d53a6d699b7cda8cae59d0f0d1327",
    (True, "announce"): "c9bc268860dacd7db910ccb0a3162328aa32a470",
    (True, "refresh"): "1455ae068c0c8e221d8d3ac5dfdd51e678b837eb",
    (True, "snapshot"): "1f25b63c4b23f08d5ef422fd93d41695aad0652d",
    (False, "relay"): "7e8b90c775aabdd408ef69598144eda4a506ce3e",
    (False, "read"): "3ee813ac291d53a6d699b7cda8cae59d0f0d1327",
    (False, "announce"): "29e9dde5455193b48aa9f0debbabb5f3d6f3dc28",
    (False, "refresh"): "7deb5933886fc88bfff0c89d801417c6044d7a8d",
    (False, "snapshot"): "8bb1aa567d5122d4a98c784b765c8414b859881f",
}


@pytest.mark.parametrize(("sharded", "name"), sorted(LOADED))
def test_script_sources_are_unchanged(sharded: bool, name: str) -> None:
    source = script_source(name, sharded)
    assert hashlib.sha1(source.encode()).hexdigest() == LOADED[sharded, name]
    assert "{pub}" not in source and "{key_ttl}" not in source
    if name != "read":  # the only script that publishes nothing
        assert f"redis.call('{publish_verb(sharded)}'" in source


def test_scripts_load_in_order() -> None:
    assert list(SCRIPTS) == [
        "relay",
        "read",
        "announce",
        "refresh",
        "snapshot",
        "touch",
        "rooms",
        "nodes",
        "members",
    ]
    assert publish_verb(True) == "SPUBLISH"
    assert publish_verb(False) == "PUBLISH"
    assert str(KEY_TTL_MS) in script_source("announce", True)


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
    relay = Relay(room=RoomName("r"), ref=7, prefix=b'{"x":', keep=100, keep_ms=300_000)
    assert command_for(relay, prefix="p", node="n1", shas=SHAS, lifetime=10_000) == (
        "EVALSHA",
        SHAS["relay"],
        3,
        "p:{r}:s",
        "p:{r}:e",
        "p:{r}:h",
        "p:{r}:c",
        "n1",
        7,
        b'{"x":',
        100,
        300_000,
        86_400_000,
        1,  # no dedup: a window of 1 ms is never used
        "",  # the server's run_id, unknown here
    )
    acked = attrs.evolve(relay, dedup=("bob:1", "m 1"), dedup_ms=5000, position_ms=0)
    command = command_for(acked, prefix="p", node="n1", shas=SHAS, lifetime=10_000)
    assert command[2:7] == (4, "p:{r}:s", "p:{r}:e", "p:{r}:h", "p:{r}:d:5:bob:1:m 1")
    assert command[-3:-1] == (1, 5000)  # a TTL of 0 would be an error reply: at least 1 ms
    read = ReadStream(room=RoomName("r"), ticket=3, after=4, count=10, keep=100, keep_ms=9)
    assert command_for(read, prefix="p", node="n1", shas=SHAS, lifetime=10_000) == (
        "EVALSHA",
        SHAS["read"],
        3,
        "p:{r}:s",
        "p:{r}:e",
        "p:{r}:h",
        4,
        0,
        10,
        100,
        9,
        86_400_000,
        "0",
        "",
    )
    oldest = attrs.evolve(read, oldest=True, upto=8)
    command = command_for(oldest, prefix="p", node="n1", shas=SHAS, lifetime=10_000, run="ab")
    assert (command[7], command[-2], command[-1]) == (8, "1", "ab")
    for present, force, flag in ((True, False, "1"), (False, False, "0"), (False, True, "2")):
        announce = Announce(
            room=RoomName("r"), username=Username("bob cy"), present=present, force=force
        )
        assert command_for(announce, prefix="p", node="n1", shas=SHAS, lifetime=10_000) == (
            "EVALSHA",
            SHAS["announce"],
            3,
            "p:{r}:p",
            "p:{r}:v",
            "p:{r}:g",
            "p:{r}:c",
            "n1 bob cy",
            flag,
            10_000,
        )
    assert refresh_command("r", ["ann", "bob"], prefix="p", node="n1", shas=SHAS, lifetime=5) == (
        "EVALSHA",
        SHAS["refresh"],
        5,
        "p:{r}:p",
        "p:{r}:v",
        "p:{r}:e",
        "p:{r}:s",
        "p:{r}:g",
        "p:{r}:c",
        5,
        86_400_000,
        "n1 ann",
        "n1 bob",
    )
    assert snapshot_command("r", prefix="p", shas=SHAS, position_ms=60_000) == (
        "EVALSHA",
        SHAS["snapshot"],
        6,
        "p:{r}:p",
        "p:{r}:v",
        "p:{r}:e",
        "p:{r}:s",
        "p:{r}:h",
        "p:{r}:g",
        "p:{r}:c",
        60_000,
        "",
    )


def test_a_snapshot_reply() -> None:
    room = RoomName("r")
    reply = [5, [b"n1 ann", b"n2 bob cy", b"n3 \xff"], b"R17", 9]
    assert parse_snapshot(room, 3, reply) == RoomSynced(
        room=room,
        version=5,
        entries=(("n1", "ann"), ("n2", "bob cy"), ("n3", "\ufffd")),
        gen=3,
        epoch="R17",
        seq=9,
    )
    assert parse_snapshot(room, 1, [0, [], b"E", 0]) == RoomSynced(
        room=room, version=0, entries=(), gen=1, epoch="E", seq=0
    )
    with_gone = parse_snapshot(room, 1, [2, [b"n1 ann"], b"E", 0, [b"n2 bob", b"n1 cy"]])
    assert with_gone.entries == (("n1", "ann"),)
    assert with_gone.gone == (("n2", "bob"), ("n1", "cy"))


@pytest.mark.parametrize(
    "reply",
    [
        None,
        5,
        b"",
        [1],
        [1, 2, 3],
        [b"x", [], b"E", 0],
        [1, ["n1 ann"], b"E", 0],
        [1, None, b"E", 0],
        [None, [], b"E", 0],
        [1, [], None, 0],
        [1, [], b"E", b"x"],
        [1, [], b"E", 0, None],
        [1, [], b"E", 0, [], []],
        [1, [], b"\xff", 0],
        [1, [], b"no spaces", 0],
        [1, []],
    ],
)
def test_an_unreadable_snapshot_is_a_value_error(reply: object) -> None:
    with pytest.raises(ValueError, match="unreadable presence snapshot of room 'r'"):
        parse_snapshot(RoomName("r"), 1, reply)


def test_relay_and_read_replies() -> None:
    relay = Relay(room=RoomName("r"), ref=7, prefix=b"{", dedup=("ann", "x"))
    assert parse_relayed(relay, [4, b"R1", 0]) == Relayed(
        room=RoomName("r"), ref=7, epoch="R1", seq=4, duplicate=False
    )
    assert parse_relayed(relay, [2, b"R1", 1]).duplicate
    read = ReadStream(room=RoomName("r"), ticket=5, after=0, count=3, keep=10, keep_ms=1)
    assert parse_read(read, [b"R1", 9, 7, [7, b'{"a":', 9, b'{"b":']]) == StreamRead(
        room=RoomName("r"),
        ticket=5,
        epoch="R1",
        top=9,
        first_kept=7,
        entries=((7, b'{"a":'), (9, b'{"b":')),
    )


@pytest.mark.parametrize(
    "reply", [None, [1, b"R"], [b"x", b"R", 0], [1, None, 0], [1, b"\xff", 0], [1, b"", 0]]
)
def test_an_unreadable_relay_reply_is_a_value_error(reply: object) -> None:
    relay = Relay(room=RoomName("r"), ref=7, prefix=b"{", dedup=("ann", "x"))
    with pytest.raises(ValueError, match="unreadable relay reply for room 'r'"):
        parse_relayed(relay, reply)


@pytest.mark.parametrize(
    "reply", [None, [b"R", 1, 1], [b"R", b"x", 1, []], [None, 1, 1, []], [b"R", 1, 1, [b"x", b"p"]]]
)
def test_an_unreadable_read_reply_is_a_value_error(reply: object) -> None:
    read = ReadStream(room=RoomName("r"), ticket=5, after=0, count=3, keep=10, keep_ms=1)
    with pytest.raises(ValueError, match="unreadable stream read of room 'r'"):
        parse_read(read, reply)


@pytest.mark.parametrize(
    "reply",
    [
        [b"E1", 1, 1, [1, 2**70]],
        [b"E1", 1, 1, [1, -1]],
        [b"E1", 1, 1, [b"x", b"p"]],
        [b"E1", 1, 1, b"ab"],
        [b"E1", 1, 1, [1, 5]],
        [b"E1", 1, 1, [2**70, b"p"]],
        [b"E1", 1, 1, [1, b"p", 2]],
    ],
)
def test_a_malformed_read_reply_is_a_value_error(reply: object) -> None:
    from roombus.cluster.schema import parse_read
    from roombus.core.actions import ReadStream

    action = ReadStream(
        room=RoomName("r"), ticket=1, after=0, upto=0, count=5, keep=5, keep_ms=1000
    )
    with pytest.raises(ValueError, match="unreadable stream read"):
        parse_read(action, reply)


def lua_pattern(lua: str) -> re.Pattern[str]:
    """The Lua patterns :func:`glob_to_lua` writes (anchors, ``.``, ``.*``, sets, ``%``
    escapes) as a Python regex: Lua's matcher, for the names the room index holds."""
    out = []
    i = 0
    while i < len(lua):
        c = lua[i]
        if c == "%":
            out.append(re.escape(lua[i + 1]))
            i += 2
            continue
        out.append(r"\Z" if c == "$" else c if c in "^.*[]" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


GLOB_ALPHABET = "ab:-.*?[]!"
globs = st.text(GLOB_ALPHABET, max_size=8)
index_names = st.text("ab:-.", min_size=1, max_size=6)


@given(globs, st.lists(index_names, max_size=8))
@example("[!]]a", ["ba", "a"])  # a ']' first in a negated set
@example("a[", ["a"])  # an unclosed bracket at the end
def test_a_glob_as_lua_matches_the_names_fnmatch_does(pattern: str, names: list[str]) -> None:
    """The room index is listed by a Lua pattern (in the rooms script) and a range
    from the glob's literal prefix: both must agree with fnmatchcase on room names."""
    lua, prefix = glob_to_lua(pattern)
    assert prefix == re.split(r"[*?\[]", pattern)[0]
    regex = lua_pattern(lua)
    for name in [*names, prefix, prefix + "a", pattern]:
        if not name or not set(name) <= set("ab:-."):
            continue
        matches = regex.search(name) is not None
        assert matches == fnmatchcase(name, pattern), (pattern, lua, name)
        if matches:
            assert name.startswith(prefix)


def test_globs_as_lua() -> None:
    assert glob_to_lua("*") == ("^.*$", "")
    assert glob_to_lua("lobby") == ("^lobby$", "lobby")
    assert glob_to_lua("a.b-*") == ("^a%.b%-.*$", "a.b-")
    assert glob_to_lua("a**?b") == ("^a.*.b$", "a")  # a run of stars is one
    assert glob_to_lua("r[!a-y0]") == ("^r[" + "".join(_not_a_to_y0()) + "]$", "r")
    assert glob_to_lua("[]a]x") == ("^[a]x$", "")  # a ']' first is in the set
    assert glob_to_lua("a[b") == ("^a[%!]b$", "a")  # no closing bracket: matches nothing
    assert glob_to_lua("a[!]") == ("^a[%!][%!][%!]$", "a")  # '[', '!', ']': no room's
    assert glob_to_lua("a!b") == ("^a[%!]b$", "a!b")  # no room holds a '!'
    # A ']' first in a set is in it, also after a '!': "[!]]b" is any character but ']'.
    assert glob_to_lua("[!]]b") == ("^[" + "".join(_lua_chars_but("")) + "]b$", "")
    assert glob_to_lua("[]]") == ("^[%!]$", "")  # only ']': no room character


def _lua_chars_but(excluded: str) -> list[str]:
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"
    return [c if c.isalnum() else "%" + c for c in sorted(chars) if c not in excluded]


def _not_a_to_y0() -> list[str]:
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"
    return [
        c if c.isalnum() else "%" + c for c in sorted(chars) if not ("a" <= c <= "y" or c == "0")
    ]


CLUSTER_SHAS = {**SHAS, "touch": b"t" * 40, "rooms": b"o" * 40, "nodes": b"n" * 40}
CLUSTER_SHAS["members"] = b"m" * 40


def test_cluster_read_commands() -> None:
    def command(**kw: object) -> tuple[object, ...]:
        read = ReadCluster(ticket=1, **kw)  # type: ignore[arg-type]
        return cluster_read_command(read, prefix="p", shas=CLUSTER_SHAS, lifetime=9000)

    assert command(kind="presence", room="r") == ("EVALSHA", b"m" * 40, 1, "p:{r}:p")
    assert command(kind="nodes") == ("EVALSHA", b"n" * 40, 1, "p:{@}:nodes", 9000)
    head = ("EVALSHA", b"o" * 40, 2, "p:{@}:rooms", "p:{@}:seen", 9000)
    # the whole index, from the first name or after the last listed
    assert command(kind="rooms") == (*head, "-", "+", "^.*$", 100, ROOMS_BUDGET)
    assert command(kind="rooms", after="r7", limit=0)[6:10] == ("(r7", "+", "^.*$", 1)
    # a literal prefix bounds the range: names from it, up to any name it starts
    assert command(kind="rooms", pattern="lob*", limit=5)[6:10] == (
        "[lob",
        b"[lob\xff",
        "^lob.*$",
        5,
    )
    # after a name past the prefix: from there; before it: from the prefix still
    assert command(kind="rooms", pattern="lob*", after="lob")[6] == "(lob"
    assert command(kind="rooms", pattern="lob*", after="lobby")[6] == "(lobby"
    assert command(kind="rooms", pattern="lob*", after="la")[6] == "[lob"


def test_the_touch_command() -> None:
    assert touch_command(["r1", "r2"], prefix="p", node="n1", shas=CLUSTER_SHAS, lifetime=9000) == (
        "EVALSHA",
        b"t" * 40,
        3,
        "p:{@}:rooms",
        "p:{@}:seen",
        "p:{@}:nodes",
        9000,
        "n1",
        "r1",
        "r2",
    )


def test_cluster_read_replies() -> None:
    presence = ReadCluster(ticket=4, kind="presence", room="r")
    assert parse_cluster_read(presence, [b"n2 bob", b"n1 ann cy", b"n1 \xff"]) == ClusterRead(
        ticket=4, kind="presence", entries=(("n1", "ann cy"), ("n1", "\ufffd"), ("n2", "bob"))
    )
    nodes = ReadCluster(ticket=5, kind="nodes")
    assert parse_cluster_read(nodes, [b"n2", 30, b"n1", b"12", b"n3", -4]) == ClusterRead(
        ticket=5, kind="nodes", nodes=(("n1", 12), ("n2", 30), ("n3", 0))
    )
    assert parse_cluster_read(nodes, []) == ClusterRead(ticket=5, kind="nodes")
    rooms = ReadCluster(ticket=6, kind="rooms")
    assert parse_cluster_read(rooms, [[b"a", b"b.c"], b"b.c"]) == ClusterRead(
        ticket=6, kind="rooms", rooms=("a", "b.c"), more="b.c"
    )
    assert parse_cluster_read(rooms, [[], b""]) == ClusterRead(ticket=6, kind="rooms")


@pytest.mark.parametrize(
    ("kind", "reply"),
    [
        ("presence", None),
        ("presence", [None]),
        ("nodes", None),
        ("nodes", b"n1 3"),
        ("nodes", [b"n1"]),
        ("nodes", [b"n1", 3, b"n2"]),
        ("nodes", [b"n1", b"x"]),
        ("nodes", [b"\xff", 3]),
        ("nodes", ["n1", 3]),
        ("rooms", None),
        ("rooms", [[b"a"]]),
        ("rooms", [[b"a"], b"a", b"b"]),
        ("rooms", [[b"\xff"], b""]),
        ("rooms", [[b"a"], None]),
    ],
)
def test_an_unreadable_cluster_read_is_a_value_error(kind: str, reply: object) -> None:
    with pytest.raises(ValueError, match=f"unreadable {kind} read"):
        parse_cluster_read(ReadCluster(ticket=1, kind=kind, room="r"), reply)
