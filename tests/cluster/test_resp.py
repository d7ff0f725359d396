"""The sans-IO RESP module (roombus.cluster.resp): no server, no sockets.

The client over it (tests/redis) runs against a real ``redis-server``; here are the
pieces that need none: encoding, parsing split at any byte, the login commands and the
sharded pub/sub decision, and that hiredis is needed only to encode or parse.
"""

from __future__ import annotations

import ast
import itertools
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus.cluster.resp import (
    HIREDIS_MISSING,
    INCOMPLETE,
    SENTINEL_PORT,
    SHARDED_PROBE,
    VERSION_PROBE,
    RedisAddress,
    RedisError,
    RedisTLS,
    RespProtocolError,
    check_handshake,
    cluster_node,
    handshake_commands,
    new_reader,
    pack_commands,
    packer,
    parse,
    parse_redis_url,
    primary_address,
    require_hiredis,
    sentinel_addresses,
    sentinel_query,
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
    with pytest.raises(ValueError, match=match) as info:
        parse_redis_url(url)
    assert str(info.value).startswith("bad Redis URL: ")  # what the settings error shows


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
# Sentinel and Cluster URLs (tests/redis runs them against real servers; these need none)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1/mymaster",
            RedisAddress(host="s1", port=26379, sentinels=(("s1", 26379),), master_name="mymaster"),
        ),
        (
            "redis+sentinel://:pw@10.0.0.1:26380,[::1],s3:1/my.master-1/2",
            RedisAddress(
                host="10.0.0.1",
                port=26380,
                db=2,
                password="pw",
                sentinels=(("10.0.0.1", 26380), ("::1", 26379), ("s3", 1)),
                master_name="my.master-1",
            ),
        ),
        (
            "redis+sentinel://al:p%40w@[::1]:26381/m?db=4",
            RedisAddress(
                host="::1",
                port=26381,
                db=4,
                username="al",
                password="p@w",
                sentinels=(("::1", 26381),),
                master_name="m",
            ),
        ),
        (  # spaces around a host, an empty port, a trailing slash, a quoted name
            "redis+sentinel://s1:, [::1]:26380 /%6D%31/",
            RedisAddress(
                host="s1",
                port=SENTINEL_PORT,
                sentinels=(("s1", SENTINEL_PORT), ("::1", 26380)),
                master_name="m1",
            ),
        ),
        (
            "REDISS+SENTINEL://u:p:q@s/m/3",
            RedisAddress(
                host="s",
                port=26379,
                db=3,
                username="u",
                password="p:q",
                tls=RedisTLS(),
                sentinels=(("s", 26379),),
                master_name="m",
            ),
        ),
        (  # an empty login is none
            "redis+sentinel://:@s:65535/m",
            RedisAddress(host="s", port=65535, sentinels=(("s", 65535),), master_name="m"),
        ),
        (
            "redis+cluster://h1,h1:6379,h2:7000/",  # the seeds once each, in order
            RedisAddress(host="h1", cluster=(("h1", 6379), ("h2", 7000))),
        ),
        (
            "rediss+cluster://%61l:pw@[::1]:7001,h",
            RedisAddress(
                host="::1",
                port=7001,
                username="al",
                password="pw",
                tls=RedisTLS(),
                cluster=(("::1", 7001), ("h", 6379)),
            ),
        ),
    ],
)
def test_parse_good_sentinel_and_cluster_urls(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis+sentinel://s1,s2", "needs the primary's name as its path"),
        ("redis+sentinel://s1/", "needs the primary's name"),
        ("redis+sentinel://s1/a/1/x", "needs the primary's name"),
        ("redis+sentinel://s/bad%20name", "the primary's name is 1-128 of"),
        ("redis+sentinel://s/" + "a" * 129, "the primary's name is 1-128 of"),
        ("redis+sentinel://s/m/x", "the db must be a number >= 0, not 'x'"),
        ("redis+sentinel://s/m/1?db=2", "unknown or repeated query parameter 'db'"),
        ("redis+sentinel://s/m?password=x", "unknown or repeated query parameter 'password'"),
        ("redis+sentinel://s/m?db=x", "the db must be a number"),
        ("redis+sentinel://s:0/m", "the port must be a number from 1 to 65535"),
        ("redis+sentinel://s:65536/m", "the port must be a number from 1 to 65535"),
        ("redis+sentinel://s:x/m", "the port must be a number from 1 to 65535"),
        ("redis+sentinel://s:+1/m", "the port must be a number"),
        ("redis+sentinel://s1,,s2/m", "^bad Redis URL: a sentinel without a host$"),
        ("redis+sentinel://s1,:26379/m", "a sentinel without a host"),
        ("redis+sentinel://s1,[::1]x/m", "an unbalanced \\[ in a sentinel's address"),
        ("redis+sentinel://u@s/m", "a username needs a password"),
        ("redis+sentinel://u:@s/m", "a username needs a password"),
        ("redis+cluster://h,:7000", "^bad Redis URL: a cluster node without a host$"),
        ("redis+cluster://h/0", "takes no db or query"),
        ("redis+cluster://h?x=1", "takes no db or query"),
    ],
)
def test_parse_bad_sentinel_and_cluster_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_redis_url(url)
    assert str(info.value).startswith("bad Redis URL: ")


def test_a_sentinel_url_s_password_is_not_shown() -> None:
    address = parse_redis_url("redis+sentinel://al:hunter2@s1/m")
    assert "hunter2" not in repr(address) and "hunter2" not in str(address)
    with pytest.raises(ValueError, match="port") as info:
        parse_redis_url("redis+sentinel://al:hunter2@s1:0/m")
    assert "hunter2" not in str(info.value)


def test_the_sentinels_are_asked_for_the_primary_without_its_login() -> None:
    address = parse_redis_url("rediss+sentinel://al:pw@s1:26380,s2/mymaster/2")
    assert sentinel_query(address) == (b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", "mymaster")
    assert sentinel_addresses(address) == [
        RedisAddress(host="s1", port=26380, tls=RedisTLS()),
        RedisAddress(host="s2", port=26379, tls=RedisTLS()),
    ]
    plain = parse_redis_url("redis+sentinel://s1/m")
    assert sentinel_addresses(plain) == [RedisAddress(host="s1", port=26379)]


def test_the_primary_a_sentinel_names_keeps_the_login_and_checks_its_role() -> None:
    address = parse_redis_url("rediss+sentinel://al:pw@s1,s2/mymaster/2")
    resolved = primary_address(address, [b"10.0.0.9", b"6380"])
    assert resolved == RedisAddress(
        host="10.0.0.9",
        port=6380,
        db=2,
        username="al",
        password="pw",
        tls=RedisTLS(),
        master_name="mymaster",
    )
    assert str(resolved) == "10.0.0.9:6380 (primary mymaster) (TLS) db 2"
    assert str(address) == "mymaster via sentinel s1:26379,s2:26379 (TLS) db 2"
    assert handshake_commands(resolved) == [
        (b"AUTH", "al", "pw"),
        (b"SELECT", 2),
        (b"PING",),
        (b"ROLE",),
    ]
    # The sentinels' own addresses, and the unresolved one, do not ask for a role.
    assert handshake_commands(address) == [(b"AUTH", "al", "pw"), (b"SELECT", 2), (b"PING",)]
    assert handshake_commands(sentinel_addresses(address)[0]) == [(b"PING",)]


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (None, "^the sentinel knows no primary named 'm'$"),
        (RedisError("NOAUTH no"), "^the sentinel refused: NOAUTH no$"),
        ([b"h"], "^unreadable sentinel reply"),
        ([b"h", b"1", b"2"], "unreadable sentinel reply"),
        ([b"h", 6379], "unreadable sentinel reply"),
        ([b"h", b"x"], "unreadable sentinel reply"),
        ([b"h", b"-1"], "unreadable sentinel reply"),
        (b"h:6379", "unreadable sentinel reply"),
    ],
)
def test_what_a_sentinel_answers_that_names_no_primary(reply: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        primary_address(parse_redis_url("redis+sentinel://s/m"), reply)


def test_a_primary_found_through_sentinels_must_say_it_is_the_primary() -> None:
    resolved = primary_address(parse_redis_url("redis+sentinel://s/m"), [b"h", b"1"])
    check_handshake([b"PONG", [b"master", 0, []]], resolved)
    with pytest.raises(RedisError, match=r"^READONLY h:1 \(primary m\) is a slave, not the"):
        check_handshake([b"PONG", [b"slave", b"h2", 1, b"connected", 0]], resolved)
    for role, shown in [([], "[]"), (b"master", "b'master'"), (None, "None")]:
        with pytest.raises(RedisError, match=f"is a {re.escape(shown)}, not the primary"):
            check_handshake([b"PONG", role], resolved)
    with pytest.raises(RedisError, match="is a None, not the primary"):
        check_handshake([], resolved)
    error = RedisError("WRONGPASS")
    with pytest.raises(RedisError) as caught:  # a refused login comes first
        check_handshake([error, b"PONG", [b"slave"]], resolved)
    assert caught.value is error
    # No role to check: a plain address, the sentinels' address, none given.
    for address in (RedisAddress(), parse_redis_url("redis+sentinel://s/m"), None):
        check_handshake([b"PONG"], address)


def test_a_node_of_a_cluster_keeps_the_login_and_tls_of_its_seeds() -> None:
    seeds = parse_redis_url("rediss+cluster://al:pw@h1:7000,[::1]:7002")
    assert str(seeds) == "cluster h1:7000,[::1]:7002 (TLS)"
    node = cluster_node(seeds, ("10.0.0.1", 7005))
    assert node == RedisAddress(
        host="10.0.0.1", port=7005, username="al", password="pw", tls=RedisTLS()
    )
    assert str(node) == "10.0.0.1:7005 (TLS)"


def test_the_tls_server_name_is_the_setting_s_or_the_host() -> None:
    assert RedisAddress(host="h").server_name == "h"
    assert RedisAddress(host="h", tls=RedisTLS()).server_name == "h"
    assert RedisAddress(host="h", tls=RedisTLS(server_name="cache.example")).server_name == (
        "cache.example"
    )


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


def test_without_hiredis_each_maker_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same in this process (the subprocess above imports the installed package)."""
    monkeypatch.setitem(sys.modules, "hiredis", None)
    for make in (require_hiredis, packer, new_reader):
        with pytest.raises(ModuleNotFoundError) as info:
            make()
        assert info.value.name == "hiredis"
        assert str(info.value).startswith(f"{HIREDIS_MISSING} (")


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
