"""Redis Cluster routing without Redis: slots, the slot map, redirections, the router."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import RoomName, Username
from roombus.cluster import Announce, Relay
from roombus.cluster.resp import RedisError, cluster_node, parse_redis_url
from roombus.cluster.schema import (
    command_for,
    control_command,
    refresh_command,
    snapshot_command,
)
from roombus.cluster.slots import (
    ASKING,
    MAX_REDIRECTS,
    SLOTS,
    Redirect,
    Router,
    SlotMap,
    command_keys,
    command_slot,
    crc16,
    hash_tag,
    is_retry,
    key_slot,
    parse_redirect,
    slot_map_from_shards,
    slot_map_from_slots,
)
from roombus.core.actions import ReadStream

from ..strategies import rooms

A, B, C = ("127.0.0.1", 7000), ("127.0.0.1", 7001), ("127.0.0.1", 7002)
THREE = SlotMap(((0, 5460, A), (5461, 10922, B), (10923, 16383, C)))

# --------------------------------------------------------------------------------------
# Slots


def test_crc16_vector() -> None:
    # The vector of Redis's own src/crc16.c.
    assert crc16(b"123456789") == 0x31C3
    assert crc16(b"") == 0


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        # What redis-cli CLUSTER KEYSLOT answers.
        ("foo", 12182),
        ("bar", 5061),
        ("123456789", 12739),
        ("{user1000}.following", key_slot("user1000")),
        ("foo{}{bar}", crc16(b"foo{}{bar}") % SLOTS),  # an empty tag: the whole key
        ("foo{{bar}}zap", key_slot("{bar")),
        ("foo{bar}{zap}", key_slot("bar")),
        ("", 0),
    ],
)
def test_key_slot_vectors(key: str, slot: int) -> None:
    assert key_slot(key) == slot
    assert key_slot(key.encode()) == slot


_no_brace = st.binary(max_size=20).filter(lambda b: b"{" not in b)
_tag = st.binary(min_size=1, max_size=20).filter(lambda b: b"}" not in b)


@given(_no_brace, _tag, st.binary(max_size=20))
def test_hash_tag_decides(before: bytes, tag: bytes, after: bytes) -> None:
    key = before + b"{" + tag + b"}" + after
    assert hash_tag(key) == tag
    assert key_slot(key) == key_slot(tag)


@given(st.binary(max_size=40).filter(lambda b: b"{" not in b))
def test_no_tag_whole_key(key: bytes) -> None:
    assert hash_tag(key) == key
    assert 0 <= key_slot(key) < SLOTS


@given(_no_brace, st.binary(max_size=20))
def test_empty_tag_whole_key(before: bytes, after: bytes) -> None:
    key = before + b"{}" + after
    assert hash_tag(key) == key


# --------------------------------------------------------------------------------------
# The schema keeps each script's keys in one slot


@given(rooms, st.text(min_size=1, max_size=8), st.booleans())
def test_every_script_call_is_one_slot(room: str, user: str, dedup: bool) -> None:
    shas = {n: b"x" * 40 for n in ("relay", "read", "announce", "refresh", "snapshot")}
    r = RoomName(room)
    actions = [
        Relay(room=r, ref=1, prefix=b"{", dedup=(user, "id1") if dedup else None, answer=True),
        ReadStream(room=r, ticket=1, after=0, count=3, keep=10, keep_ms=1),
        Announce(room=r, username=Username("bob"), present=True),
    ]
    commands = [command_for(a, prefix="rb", node="n1", shas=shas, lifetime=10) for a in actions] + [
        refresh_command(r, ["bob", "ann"], prefix="rb", node="n1", shas=shas, lifetime=10),
        snapshot_command(r, prefix="rb", shas=shas),
    ]
    for command in commands:
        keys = command_keys(command)
        assert keys  # every script names its keys
        assert {key_slot(k) for k in keys} == {key_slot(room)}
        assert command_slot(command) == key_slot(room)
    # The room's channel (published by the scripts, listened to with SSUBSCRIBE) too.
    assert command_slot((b"SSUBSCRIBE", f"rb:{{{room}}}:c")) == key_slot(room)


def test_command_keys() -> None:
    assert command_keys((b"EVALSHA", b"s", 2, b"k1", b"k2", b"arg")) == (b"k1", b"k2")
    assert command_keys(("SPUBLISH", "ch", b"data")) == (b"ch",)
    assert command_keys((b"PING",)) == ()
    assert command_keys((b"SCRIPT", b"LOAD", b"return 1")) == ()
    assert command_slot(control_command("rb", b"x", sharded=True)) == key_slot("rb:ctl")
    with pytest.raises(ValueError, match="2 slots"):
        command_slot((b"EVALSHA", b"s", 2, b"foo", b"bar"))


# --------------------------------------------------------------------------------------
# The slot map


def _node(id_: bytes, port: int, role: bytes, health: bytes = b"online") -> list[object]:
    return [
        b"id", id_, b"port", port, b"ip", b"127.0.0.1", b"endpoint", b"127.0.0.1",
        b"role", role, b"replication-offset", 10, b"health", health,
    ]  # fmt: skip


def test_slot_map_from_shards() -> None:
    reply = [
        [b"slots", [0, 5460], b"nodes", [_node(b"a", 7000, b"master"), _node(b"d", 7003, b"replica")]],
        [b"slots", [5461, 10922], b"nodes", [_node(b"e", 7004, b"replica"), _node(b"b", 7001, b"master")]],
        [b"slots", [10923, 16000, 16001, 16383], b"nodes", [_node(b"c", 7002, b"master")]],
        [b"slots", [], b"nodes", [_node(b"f", 7005, b"master")]],  # no slot: not a primary here
    ]  # fmt: skip
    slot_map = slot_map_from_shards(reply, default_host="h")
    assert slot_map == THREE
    assert slot_map.complete
    assert slot_map.primaries == (A, B, C)
    assert slot_map.node_of(0) == A and slot_map.node_of(5461) == B
    assert slot_map.node_of(16383) == C


def test_slot_map_from_shards_unknown_endpoint_and_failed_primary() -> None:
    node = _node(b"a", 7000, b"master")
    node[7] = b"?"
    reply = [
        [b"slots", [0, 100], b"nodes", [node]],
        [b"slots", [101, 200], b"nodes", [_node(b"b", 7001, b"master", b"fail")]],
    ]
    slot_map = slot_map_from_shards(reply, default_host="seed")
    assert slot_map.ranges == ((0, 100, ("seed", 7000)),)
    assert not slot_map.complete
    assert slot_map.node_of(150) is None
    with pytest.raises(ValueError, match="unreadable"):
        slot_map_from_shards(RedisError("ERR unknown subcommand"), default_host="h")
    with pytest.raises(ValueError, match="bad slot range"):
        slot_map_from_shards([[b"slots", [5, 1], b"nodes", [node]]], default_host="h")


def test_slot_map_from_slots() -> None:
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, b"a"], [b"127.0.0.1", 7003, b"d"]],
        [10923, 16383, [b"127.0.0.1", 7002, b"c"]],
        [5461, 10922, [b"", 7001, b"b"]],
    ]
    assert slot_map_from_slots(reply, default_host="127.0.0.1") == THREE
    with pytest.raises(ValueError, match="unreadable"):
        slot_map_from_slots([[0, 1]], default_host="h")


@given(st.integers(0, SLOTS - 1), st.sampled_from([A, B, C, ("10.0.0.1", 1)]))
def test_moved_updates_one_slot(slot: int, node: tuple[str, int]) -> None:
    moved = THREE.moved(slot, node)
    assert moved.node_of(slot) == node
    assert moved.complete
    for other in {0, 5460, 5461, 10922, 10923, 16383, max(0, slot - 1), min(SLOTS - 1, slot + 1)}:
        if other != slot:
            assert moved.node_of(other) == THREE.node_of(other)


# --------------------------------------------------------------------------------------
# Redirections


def test_parse_redirect() -> None:
    assert parse_redirect(RedisError("MOVED 3999 127.0.0.1:6381")) == Redirect(
        False, 3999, ("127.0.0.1", 6381)
    )
    assert parse_redirect(RedisError("ASK 3999 10.0.0.2:7000")) == Redirect(
        True, 3999, ("10.0.0.2", 7000)
    )
    assert parse_redirect(RedisError("MOVED 1 :7000"), default_host="h") == Redirect(
        False, 1, ("h", 7000)
    )
    assert parse_redirect(RedisError("ERR wrong")) is None
    assert parse_redirect(b"MOVED 1 h:1") is None
    assert is_retry(RedisError("TRYAGAIN Multiple keys request during rehashing of slot"))
    assert is_retry(RedisError("CLUSTERDOWN The cluster is down"))
    assert not is_retry(RedisError("ERR x")) and not is_retry(b"TRYAGAIN")


# --------------------------------------------------------------------------------------
# The router


def _key_on(node: tuple[str, int]) -> bytes:
    for i in range(1000):
        key = f"k{i}".encode()
        if THREE.node_of(key_slot(key)) == node:
            return key
    raise AssertionError


def _get(key: bytes) -> tuple[bytes, ...]:
    return (b"EVALSHA", b"sha", 1, key)


def test_router_splits_by_primary_and_keeps_order() -> None:
    ka, kb, kc = _key_on(A), _key_on(B), _key_on(C)
    commands = [_get(ka), _get(kb), (b"PING",), _get(ka), _get(kc)]
    router = Router(commands, THREE)
    sends = {s.node: s for s in router.plan()}
    assert set(sends) == {A, B, C}
    assert sends[A].indices == (0, 2, 3)  # the keyless PING to the first primary
    assert router.plan() == []  # sends are out
    for node, send in sends.items():
        router.feed(send, [f"{node[1]}:{i}".encode() for i in send.indices])
    assert router.done
    assert router.replies == [b"7000:0", b"7001:1", b"7000:2", b"7000:3", b"7002:4"]
    assert not router.refresh


def test_router_broadcasts_script_load() -> None:
    router = Router([(b"SCRIPT", b"LOAD", b"return 1"), (b"INFO", b"server")], THREE)
    sends = router.plan()
    assert sorted(s.node for s in sends) == [A, B, C]
    for send in sends:
        replies = [b"sha" if c[0] == b"SCRIPT" else b"info" for c in send.commands]
        if send.node == B:
            replies[0] = RedisError("ERR busy")
        router.feed(send, replies)
    assert router.done
    assert isinstance(router.replies[0], RedisError)  # one node refused: the error stands
    assert router.replies[1] == b"info"


def test_router_follows_moved() -> None:
    ka = _key_on(A)
    slot = key_slot(ka)
    router = Router([_get(ka), _get(_key_on(B))], THREE)
    sends = {s.node: s for s in router.plan()}
    router.feed(sends[A], [RedisError(f"MOVED {slot} 127.0.0.1:7002")])
    router.feed(sends[B], [b"b"])
    assert not router.done and router.refresh
    assert router.slot_map.node_of(slot) == C
    (again,) = router.plan()
    assert again.node == C and again.indices == (0,) and again.commands == (_get(ka),)
    router.feed(again, [b"a"])
    assert router.done and router.replies == [b"a", b"b"]
    assert router.delay == 0


def test_router_follows_ask_once() -> None:
    ka = _key_on(A)
    slot = key_slot(ka)
    router = Router([_get(ka), _get(ka)], THREE)
    (send,) = router.plan()
    router.feed(send, [RedisError(f"ASK {slot} 127.0.0.1:7001"), b"second"])
    (ask,) = router.plan()
    assert ask.node == B
    assert ask.indices == (ASKING, 0)
    assert ask.commands == ((b"ASKING",), _get(ka))
    router.feed(ask, [b"OK", b"first"])
    assert router.done and router.replies == [b"first", b"second"]
    assert router.slot_map == THREE and not router.refresh  # ASK changes no map
    # A later command of that slot goes to the owner again.
    (later,) = Router([_get(ka)], router.slot_map).plan()
    assert later.node == A


def test_router_backs_off_on_tryagain_then_gives_up() -> None:
    ka = _key_on(A)
    router = Router([_get(ka)], THREE)
    delays = []
    for _ in range(MAX_REDIRECTS):
        (send,) = router.plan()
        router.feed(send, [RedisError("TRYAGAIN Multiple keys request during rehashing")])
        assert not router.done
        delays.append(router.delay)
    assert delays[0] > 0 and delays == sorted(delays)
    (send,) = router.plan()
    router.feed(send, [RedisError("CLUSTERDOWN The cluster is down")])
    assert router.done and isinstance(router.replies[0], RedisError)


def test_router_refuses_cross_slot_and_unowned() -> None:
    with pytest.raises(ValueError, match="2 slots"):
        Router([(b"EVALSHA", b"s", 2, b"foo", b"bar")], THREE)
    half = SlotMap(((0, 100, A),))
    with pytest.raises(ValueError, match="owns slot"):
        Router([_get(b"foo")], half).plan()


# --------------------------------------------------------------------------------------
# The URL


def test_cluster_url() -> None:
    address = parse_redis_url("redis+cluster://:pw@h1:7000,h2,[::1]:7002")
    assert address.cluster == (("h1", 7000), ("h2", 6379), ("::1", 7002))
    assert (address.host, address.port, address.password, address.db) == ("h1", 7000, "pw", 0)
    assert address.tls is None
    assert str(address) == "cluster h1:7000,h2:6379,[::1]:7002"
    assert "pw" not in repr(address)
    node = cluster_node(address, ("10.0.0.1", 7005))
    assert (node.host, node.port, node.cluster, node.password) == ("10.0.0.1", 7005, (), "pw")
    tls = parse_redis_url("rediss+cluster://u:p@h1:7000")
    assert tls.tls is not None and tls.username == "u" and tls.cluster == (("h1", 7000),)
    for bad, why in [
        ("redis+cluster://h1:7000/1", "no db"),
        ("redis+cluster://h1:7000?db=1", "no db"),
        ("redis+cluster://h1,,h2", "cluster node without a host"),
        ("redis+cluster://h1:0", "port"),
        ("redis+cluster://u@h1", "username needs a password"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_redis_url(bad)
