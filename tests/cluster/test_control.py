"""The control channel's messages (roombus.cluster.control): round trip, and any bytes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from roombus.cluster.control import MAX_REASON_BYTES, encode_control, parse_control
from roombus.core.actions import DisconnectCommand, KickCommand
from roombus.core.names import RoomName, Username

nodes = st.text("abcAZ09_.:-", min_size=1, max_size=64)
rooms = st.text("abcXYZ019_.:-", min_size=1, max_size=64).map(RoomName)
usernames = (
    st.text(st.characters(exclude_categories=("Cc", "Cf", "Cs")), min_size=1, max_size=64)
    .filter(lambda u: len(u) <= 64)
    .map(Username)
)
reasons = st.text(st.characters(exclude_categories=("Cs",)), max_size=60).filter(
    lambda r: len(r.encode()) <= MAX_REASON_BYTES
)
codes = st.one_of(st.just(1000), st.integers(3000, 4999))
connections = st.builds(lambda n, i: f"{n}/{i}", nodes, st.integers(1, 2**40))
commands = st.one_of(
    st.builds(DisconnectCommand, username=usernames, code=codes, reason=reasons),
    st.builds(DisconnectCommand, connection=connections, code=codes, reason=reasons),
    st.builds(KickCommand, room=rooms, username=usernames, reason=reasons),
)


@given(nodes, commands)
def test_round_trip(origin: str, command: DisconnectCommand | KickCommand) -> None:
    assert parse_control(encode_control(origin, command)) == (origin, command)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused_without_raising(data: bytes) -> None:
    parsed = parse_control(data)
    if parsed is not None:  # then it is exactly what the encoder writes
        assert json.loads(encode_control(*parsed)) == json.loads(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@given(
    nodes,
    commands,
    st.sampled_from(
        ["v", "from", "op", "room", "username", "connection", "code", "reason", "extra"]
    ),
    json_values,
)
def test_a_field_changed_to_anything_is_refused_or_still_valid(
    origin: str, command: DisconnectCommand | KickCommand, field: str, value: object
) -> None:
    body = json.loads(encode_control(origin, command))
    body[field] = value
    parsed = parse_control(json.dumps(body).encode())
    if parsed is not None:
        assert json.loads(encode_control(*parsed)) == body


def test_what_is_refused() -> None:
    good = json.loads(encode_control("n1", KickCommand(room=RoomName("r"), username=Username("u"))))
    for change in (
        {"v": 2},
        {"v": True},
        {"from": "bad node"},
        {"op": "explode"},
        {"room": "no spaces"},
        {"username": ""},
        {"reason": "x" * (MAX_REASON_BYTES + 1)},
        {"code": 1000},  # a kick has no code
    ):
        assert parse_control(json.dumps(good | change).encode()) is None, change
    bye = json.loads(encode_control("n1", DisconnectCommand(username="u", code=4000)))
    for change in ({"code": 1001}, {"code": 4000.0}, {"code": "4000"}, {"connection": "n/1"}):
        assert parse_control(json.dumps(bye | change).encode()) is None, change
    assert parse_control(b"\xff") is None and parse_control(b"[" * 10_000) is None
    assert parse_control(b"{}" + b" " * 5000) is None
