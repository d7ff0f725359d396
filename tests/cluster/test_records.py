"""The cluster's records: one encoder, one parser, and they agree."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from roombus import Username
from roombus.cluster.records import (
    ChatRecord,
    PresenceRecord,
    encode_chat,
    encode_presence,
    encode_record,
    lua_chat_record,
    lua_presence_record,
    member,
    parse_member,
    parse_record,
)

from ..strategies import usernames

NODE_ALPHABET = "ABCXYZabcxyz0189_.:-"
node_ids = st.text(NODE_ALPHABET, min_size=1, max_size=64)
counters = st.integers(min_value=0, max_value=2**63 - 1)

epochs = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)
chat_records = st.builds(ChatRecord, counters, node_ids, counters, epochs, st.binary(max_size=200))
#: (present, expired): a join, a leave its node said, an expiry.
_kinds = st.sampled_from([(True, False), (False, False), (False, True)])
presence_records = st.builds(
    lambda version, kind, node, user: PresenceRecord(version, kind[0], node, user, kind[1]),
    counters,
    _kinds,
    node_ids,
    usernames.map(Username),
)
records = st.one_of(chat_records, presence_records)


@given(records)
def test_parse_undoes_encode(record: ChatRecord | PresenceRecord) -> None:
    assert parse_record(encode_record(record)) == record


def test_an_expiry_is_a_leave_and_a_join_cannot_be_one() -> None:
    record = parse_record(b"x 7 n1 bob")
    assert record == PresenceRecord(7, False, "n1", Username("bob"), expired=True)
    assert parse_record(b"l 7 n1 bob") == PresenceRecord(7, False, "n1", Username("bob"))
    # a leave is one its node said unless told otherwise
    assert encode_presence(False, 7, "n1", "bob") == b"l 7 n1 bob"
    assert encode_presence(True, 7, "n1", "bob") == b"j 7 n1 bob"
    with pytest.raises(ValueError, match="join"):
        encode_presence(True, 1, "n1", "bob", expired=True)
    assert lua_presence_record(False, "v", "m", expired=True) == "'x ' .. v .. ' ' .. m"


@given(chat_records)
def test_encode_chat_is_encode_record(record: ChatRecord) -> None:
    data = encode_chat(record.seq, record.node, record.ref, record.epoch, record.prefix)
    assert data == encode_record(record)


@given(presence_records)
def test_a_presence_record_ends_with_its_member(record: PresenceRecord) -> None:
    data = encode_presence(
        record.present, record.version, record.node, record.username, expired=record.expired
    )
    assert data == encode_record(record)
    kind = b"j" if record.present else b"x" if record.expired else b"l"
    assert data == b"%s %d " % (kind, record.version) + member(record.node, record.username).encode(
        "utf-8"
    )
    assert parse_member(member(record.node, record.username).encode()) == (
        record.node,
        record.username,
    )


def _canonical(data: bytes) -> None:
    """parse_record raises nothing, and what it reads is exactly what encode writes."""
    record = parse_record(data)
    if record is not None:
        assert encode_record(record) == data


@given(st.binary(max_size=300))
def test_any_bytes_are_a_record_as_written_or_none(data: bytes) -> None:
    _canonical(data)


@given(st.sampled_from([b"m ", b"j ", b"l ", b"x "]), st.binary(max_size=100))
def test_anything_after_a_record_kind_is_a_record_as_written_or_none(
    kind: bytes, rest: bytes
) -> None:
    _canonical(kind + rest)


@given(records, st.data())
def test_a_mutated_record_is_a_record_as_written_or_none(
    record: ChatRecord | PresenceRecord, data: st.DataObject
) -> None:
    encoded = encode_record(record)
    i = data.draw(st.integers(0, len(encoded)))
    how = data.draw(st.sampled_from(["insert", "delete", "replace"]))
    byte = bytes([data.draw(st.integers(0, 255))])
    if how == "insert":
        mutated = encoded[:i] + byte + encoded[i:]
    elif how == "delete":
        assume(i < len(encoded))
        mutated = encoded[:i] + encoded[i + 1 :]
    else:
        assume(i < len(encoded))
        mutated = encoded[:i] + byte + encoded[i + 1 :]
    _canonical(mutated)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"m",
        b"m 1 n 1 E",  # no space before the prefix
        b"m 1 n 1 x",  # no epoch
        b"m +1 n 1 E x",
        b"m -1 n 1 E x",
        b"m 01 n 1 E x",
        b"m 1_0 n 1 E x",
        b"m 1 n 1_0 E x",
        b"m 12345678901234567890 n 1 E x",  # 20 digits: more than a Redis counter holds
        b"m 1  1 E x",
        b"m 1 n\x00 1 E x",
        b"m 1 " + b"n" * 65 + b" 1 E x",
        b"m 1 n\xc3\xa9 1 E x",
        b"m \xd9\xa3 n 1 E x",  # a non-ASCII digit
        b"m 1 n 1 E:1 x",  # not an epoch character
        b"m 1 n 1 " + b"E" * 33 + b" x",  # an epoch of 33 characters
        b"m 1 n 1  x",  # an empty epoch
        b"j 1 n",
        b"j 1 n ",  # no username
        b"j 1 n \xff",  # not UTF-8
        b"j 1 n a\x00b",  # a control character
        b"l 1 n a\xe2\x80\x8bb",  # a format character (zero-width space)
        b"j 01 n bob",
        b"j 1 n\x01 bob",
        b"y 1 n bob",
        b"J 1 n bob",
        b"jj 1 n bob",
    ],
)
def test_malformed_records_are_none(data: bytes) -> None:
    assert parse_record(data) is None


def test_the_documented_examples() -> None:
    assert parse_record(b'm 7 n1 3 R17 {"a":1') == ChatRecord(7, "n1", 3, "R17", b'{"a":1')
    assert parse_record(b"m 7 n1 3 e-1 ") == ChatRecord(7, "n1", 3, "e-1", b"")
    assert parse_record(b"j 2 n-1 bob cy") == PresenceRecord(2, True, "n-1", Username("bob cy"))
    assert parse_record("l 0 a.b:c zoë".encode()) == PresenceRecord(
        0, False, "a.b:c", Username("zoë")
    )


def test_lua_expressions_spell_the_same_fields() -> None:
    assert lua_chat_record("s", "ARGV[2]", "ARGV[3]", "e", "ARGV[4]") == (
        "'m ' .. s .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. e .. ' ' .. ARGV[4]"
    )
    assert lua_presence_record(True, "v", "m") == "'j ' .. v .. ' ' .. m"
    assert lua_presence_record(False, "v", "m") == "'l ' .. v .. ' ' .. m"
