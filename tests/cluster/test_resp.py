"""The sans-IO RESP module (roombus.cluster.resp): no server, no sockets.

The client over it (tests/redis) runs against a real ``redis-server``; here are the
pieces that need none: encoding, parsing split at any byte, the login commands and the
sharded pub/sub decision, and that hiredis is needed only to encode or parse.
"""

from __future__ import annotations

import ast
import itertools
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus.cluster.resp import (
    INCOMPLETE,
    SHARDED_PROBE,
    VERSION_PROBE,
    RedisAddress,
    RedisError,
    RedisTLS,
    RespProtocolError,
    check_handshake,
    handshake_commands,
    new_reader,
    pack_commands,
    packer,
    parse,
    parse_redis_url,
    sharded_from_command_info,
    sharded_from_info,
)

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "roombus"


# --------------------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisAddress()),
        ("redis://127.0.0.1:7000/3", RedisAddress(host="127.0.0.1", port=7000, db=3)),
        ("redis://h/", RedisAddress(host="h")),
        ("redis://h?db=5", RedisAddress(host="h", db=5)),
        ("redis://:s3cret@h", RedisAddress(host="h", password="s3cret")),
        (
            "redis://alice:p%40ss%3Aw@h:1/2",
            RedisAddress(host="h", port=1, db=2, username="alice", password="p@ss:w"),
        ),
        ("REDIS://[::1]:6380", RedisAddress(host="::1", port=6380)),
        ("unix:///tmp/redis.sock", RedisAddress(unix_path="/tmp/redis.sock")),
        (
            "unix:///tmp/r%20s.sock?db=2&password=pw",
            RedisAddress(unix_path="/tmp/r s.sock", db=2, password="pw"),
        ),
        ("unix://:pw@/tmp/r.sock", RedisAddress(unix_path="/tmp/r.sock", password="pw")),
    ],
)
def test_parse_good_urls(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


def test_rediss_is_tls() -> None:
    address = parse_redis_url("rediss://:pw@cache.example:6380/2")
    assert address == RedisAddress(
        host="cache.example", port=6380, db=2, password="pw", tls=RedisTLS()
    )
    assert str(address) == "cache.example:6380 (TLS) db 2"
    assert address.server_name == "cache.example"
    assert parse_redis_url("redis://h").tls is None


@pytest.mark.parametrize(
    ("url", "match"),
    [
        (
            "http://h",
            "scheme must be redis://, rediss://, redis\\+sentinel://, redis\\+cluster:// or unix://, not http://",
        ),
        ("localhost:6379", "scheme"),
        (
            "",
            "scheme must be redis://, rediss://, redis\\+sentinel://, redis\\+cluster:// or unix://, not none",
        ),
        ("redis://h:port", "port must be a number"),
        ("redis://h:70000", "port must be a number"),
        ("redis://h:0", "port must be a number"),
        ("redis://h/x", "db must be a number >= 0, not 'x'"),
        ("redis://h/-1", "db must be a number"),
        ("redis://h/1/2", "db must be a number"),
        ("redis://h?db=", "db must be a number"),
        ("redis://h/1?db=2", "db is given twice"),
        ("redis://", "no host"),
        ("redis://:pw@:6379", "no host"),
        ("redis://h?timeout=3", "unknown query parameter 'timeout'"),
        ("redis://h?db=1&db=2", "'db' given twice"),
        ("redis://alice@h", "a username needs a password"),
        ("redis://:a@h?password=b", "password is given twice"),
        ("redis://[::1", "bad Redis URL"),
        ("unix://host/tmp/redis.sock", "names no host"),
        ("unix://", "needs a socket path"),
    ],
)
def test_parse_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_redis_url(url)


def test_passwords_are_not_shown() -> None:
    address = parse_redis_url("redis://alice:hunter2@h:1/2")
    assert "hunter2" not in repr(address)
    assert "hunter2" not in str(address)
    with pytest.raises(ValueError, match="port") as info:
        parse_redis_url("redis://alice:hunter2@h:nope")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        (RedisAddress(), "localhost:6379"),
        (RedisAddress(host="10.0.0.2", port=7000, db=0), "10.0.0.2:7000"),
        (RedisAddress(host="::1", port=6380), "[::1]:6380"),
        (RedisAddress(host="h", db=3), "h:6379 db 3"),
        (RedisAddress(host="h", port=1, unix_path="/run/r.sock"), "unix:/run/r.sock"),
        (RedisAddress(unix_path="/run/r.sock", db=1), "unix:/run/r.sock db 1"),
    ],
)
def test_an_address_shows_where_it_is(address: RedisAddress, shown: str) -> None:
    assert str(address) == shown


# --------------------------------------------------------------------------------------
# Commands out


def test_pack_encodes_a_command_as_a_resp_array_of_bulk_strings() -> None:
    pack = packer()
    assert pack((b"SET", "k\u00e9", 12)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$2\r\n12\r\n"
    assert pack((b"PING",)) == b"*1\r\n$4\r\nPING\r\n"


def test_pack_commands_is_the_commands_back_to_back() -> None:
    pack = packer()
    commands = [(b"PING",), ("GET", b"a b"), (b"EVALSHA", b"f" * 40, 0)]
    assert pack_commands(commands) == b"".join(pack(c) for c in commands)
    assert pack_commands([]) == b""


@pytest.mark.parametrize("commands", [[()], [(b"PING",), ()]])
def test_pack_commands_refuses_an_empty_command(commands: list[tuple[Any, ...]]) -> None:
    # Redis never answers an empty command: the pipeline would wait forever.
    with pytest.raises(ValueError, match="empty command"):
        pack_commands(commands)


# --------------------------------------------------------------------------------------
# Replies in


def _encode(reply: Any) -> bytes:
    """RESP2 for a reply as the parser gives it back (test oracle, written independently)."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, RedisError):
        return b"-" + str(reply).encode() + b"\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    assert isinstance(reply, list)
    return b"*%d\r\n" % len(reply) + b"".join(map(_encode, reply))


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, RedisError):
        return type(got) is RedisError and str(got) == str(want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    return type(got) is type(want) and got == want


_error_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20
).filter(lambda t: t.strip() == t)
_scalars = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=40),
    _error_text.map(lambda t: RedisError(f"ERR {t}")),
)
_replies = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=12)


@given(
    replies=st.lists(_replies, min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_replies_split_anywhere_parse_whole_and_in_order(
    replies: list[Any], cuts: list[int]
) -> None:
    data = b"".join(map(_encode, replies))
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    reader = new_reader()
    got: list[Any] = []
    for start, end in itertools.pairwise(points):
        got += parse(reader, data[start:end])
    assert len(got) == len(replies)
    assert all(map(_same, got, replies)), (got, replies)
    assert parse(reader, b"") == []
    assert reader.gets() is INCOMPLETE


def test_an_incomplete_reply_gives_nothing_until_it_is_whole() -> None:
    reader = new_reader()
    assert parse(reader, b"$5\r\nhel") == []
    reader.feed(b"lo\r\n:4")
    assert reader.gets() == b"hello"
    assert reader.gets() is INCOMPLETE
    assert parse(reader, b"2\r\n") == [42]


def test_error_replies_are_redis_error_instances_also_nested() -> None:
    top, nested = parse(new_reader(), b"-WRONGPASS invalid\r\n*2\r\n:1\r\n-ERR no script\r\n")
    assert type(top) is RedisError and str(top) == "WRONGPASS invalid"
    assert nested[0] == 1
    assert type(nested[1]) is RedisError and str(nested[1]) == "ERR no script"


def test_garbage_raises_after_the_replies_before_it_and_for_good() -> None:
    reader = new_reader()
    reader.feed(b"+OK\r\n:7\r\nHTTP/1.1 400 Bad Request\r\n\r\n")
    assert reader.gets() == b"OK"
    assert reader.gets() == 7
    with pytest.raises(RespProtocolError, match='got "H"'):
        reader.gets()
    with pytest.raises(RespProtocolError):
        reader.gets()
    with pytest.raises(RespProtocolError):
        parse(new_reader(), b"HTTP/1.1 400 Bad Request\r\n")


# --------------------------------------------------------------------------------------
# Opening a connection


@pytest.mark.parametrize(
    ("url", "commands"),
    [
        ("redis://h", [(b"PING",)]),
        ("redis://h/0", [(b"PING",)]),
        ("redis://h/3", [(b"SELECT", 3), (b"PING",)]),
        ("redis://:pw@h", [(b"AUTH", "pw"), (b"PING",)]),
        ("redis://al:pw@h/2", [(b"AUTH", "al", "pw"), (b"SELECT", 2), (b"PING",)]),
        ("unix:///run/r.sock?db=1&password=pw", [(b"AUTH", "pw"), (b"SELECT", 1), (b"PING",)]),
    ],
)
def test_handshake_commands(url: str, commands: list[tuple[Any, ...]]) -> None:
    assert handshake_commands(parse_redis_url(url)) == commands


def test_check_handshake_raises_the_first_error_reply() -> None:
    check_handshake([b"OK", b"OK", b"PONG"])
    first, second = RedisError("WRONGPASS nope"), RedisError("ERR DB index is out of range")
    with pytest.raises(RedisError) as caught:
        check_handshake([first, second, b"PONG"])
    assert caught.value is first
    with pytest.raises(RedisError) as caught:
        check_handshake([b"OK", second, b"PONG"])
    assert caught.value is second


def test_an_address_without_a_url_logs_in_with_nothing_but_ping() -> None:
    assert handshake_commands(RedisAddress()) == [(b"PING",)]


# --------------------------------------------------------------------------------------
# Sharded pub/sub


def test_the_probes_are_the_commands_the_decisions_read() -> None:
    assert SHARDED_PROBE == (b"COMMAND", b"INFO", b"SPUBLISH")
    assert VERSION_PROBE == (b"INFO", b"server")


@pytest.mark.parametrize(
    ("reply", "sharded"),
    [
        ([[b"spublish", 3, [b"pubsub", b"fast"], 1, 1, 1]], True),  # Redis 7: described
        ([None], False),  # Redis 6: an unknown command
        ([], False),
        (None, False),
        (b"OK", False),
    ],
)
def test_sharded_from_command_info(reply: Any, sharded: bool) -> None:
    assert sharded_from_command_info(reply) is sharded


@pytest.mark.parametrize(
    ("info", "sharded"),
    [
        (b"# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n", True),
        (b"# Server\r\nredis_version:7.2.4\r\n", True),
        (b"# Server\r\nredis_version:10.0.1\r\n", True),
        (b"# Server\r\nredis_version:6.2.14\r\n", False),
        (b"# Server\r\nredis_version:6.9.9\r\n", False),
        (b"# Server\r\nredis_git_sha1:00000000\r\n", False),  # no version line
        (b"# Server\r\nold_redis_version:7.0.0\r\n", False),  # not at a line start
        (b"redis_version:7\r\n", False),  # no minor: unreadable
        (None, False),
        ([b"redis_version:7.0.0"], False),
    ],
)
def test_sharded_from_info(info: Any, sharded: bool) -> None:
    assert sharded_from_info(info) is sharded


# --------------------------------------------------------------------------------------
# hiredis: optional, and imported here only


def test_addresses_need_no_hiredis_and_encoding_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['hiredis'] = None\n"
        "from roombus.cluster import resp as _resp\n"
        "assert str(_resp.parse_redis_url('redis://h:1/2')) == 'h:1 db 2'\n"
        "assert _resp.handshake_commands(_resp.parse_redis_url('redis://h/2'))\n"
        "for make in (_resp.new_reader, _resp.packer, _resp.require_hiredis):\n"
        "    try:\n"
        "        make()\n"
        "    except ModuleNotFoundError as exc:\n"
        "        assert exc.name == 'hiredis', exc.name\n"
        "        print(str(exc).splitlines()[0])\n"
        "    else:\n"
        "        raise AssertionError(make)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.startswith("the Redis backplane needs hiredis: pip install 'roombus[redis]'")


def test_only_the_resp_module_imports_hiredis() -> None:
    importers = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "hiredis" for name in names):
                importers.add(path.relative_to(SRC).as_posix())
    assert importers == {"cluster/resp.py"}
