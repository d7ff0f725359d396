"""
Properties of the core that the state machine (test_broker_stateful) does not reach well:
a slow receiver compared against a run where it keeps up, state that must not grow
with traffic, content too deep to re-encode, and the validation of names and of
server-side publishing.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import (
    BrokerConfig,
    LocalProtocolError,
    RoomName,
    Username,
    is_valid_room,
    is_valid_username,
)
from roombus.lowlevel import (
    Broker,
    ClientConnected,
    ClientDisconnected,
    ConnectionId,
    Deliver,
    PongReceived,
    QueueState,
    SendQueue,
    TextReceived,
)

from .test_broker_stateful import footprint

TS = 1_700_000_000
CONFIG = BrokerConfig(max_message_bytes=64, send_queue=4, send_queue_bytes=64 + 1024)
SLOW = 9  # the listener that falls behind in one run and keeps up in the other


class Driver:
    """Broker + one SendQueue per connection, carried out as the trio adapter does."""

    def __init__(self, slow: set[int]) -> None:
        self.broker = Broker(CONFIG)
        self.queues: dict[int, SendQueue] = {}
        self.read: dict[int, bytes] = defaultdict(bytes)
        self.slow = slow

    def connect(self, c: int, user: str, room: str) -> None:
        self.queues[c] = SendQueue(CONFIG.send_queue, CONFIG.send_queue_bytes)
        self.handle(
            ClientConnected(conn=ConnectionId(c), username=Username(user), room=RoomName(room))
        )

    def handle(self, event: Any) -> None:
        self.apply(self.broker.handle(event, now=0.0, timestamp=TS))

    def apply(self, actions: list[Any]) -> None:
        overflowed: dict[int, None] = {}
        for a in actions:
            if isinstance(a, Deliver):
                for c in a.conns:
                    q = self.queues[c]
                    if not q.push(a.payload + b"\n") and q.state is QueueState.OVERFLOWED:
                        overflowed[c] = None
        for c in overflowed:
            self.queues[c].close_with(b"", drop_pending=True)
            self.handle(ClientDisconnected(conn=ConnectionId(c)))
        for c, q in self.queues.items():
            while q and c not in self.slow:
                data = q.data()
                assert data, "bytes pending, yet nothing to write"
                pending = q.nbytes
                q.consume(len(data))
                assert q.nbytes == pending - len(data), "consume() did not count what was written"
                self.read[c] += data

    def inbox(self, c: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read[c].split(b"\n") if line]


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("chat"),
            st.sampled_from([1, 2, 3]),
            st.sampled_from(["lobby", "r2"]),
            st.integers(0, 300),
        ),
        st.tuples(
            st.sampled_from(["join", "leave"]),
            st.sampled_from([1, 2, 3]),
            st.just("r2"),
            st.just(0),
        ),
        st.tuples(st.just("publish"), st.just(0), st.sampled_from(["lobby", "r2"]), st.just(0)),
    ),
    max_size=30,
)


def run(script: list[tuple[str, int, str, int]], slow: set[int]) -> Driver:
    d = Driver(slow)
    d.connect(1, "ann", "lobby")
    d.connect(2, "bob", "lobby")
    d.connect(SLOW, "zed", "lobby")
    d.connect(3, "ann", "lobby")  # ann's second tab
    for n, (op, c, room, pad) in enumerate(script):
        if op == "publish":
            d.apply(d.broker.publish(room, {"n": n}, username="server", timestamp=TS))
        elif op == "chat":
            message = {"type": "chat", "room": room, "content": {"n": n, "pad": "x" * pad}}
            d.handle(TextReceived(conn=ConnectionId(c), text=json.dumps(message)))
        else:
            d.handle(
                TextReceived(conn=ConnectionId(c), text=json.dumps({"type": op, "room": room}))
            )
    for n in range(CONFIG.send_queue + 1):  # enough to overflow a listener that never reads
        d.apply(d.broker.publish("lobby", {"tail": n}, username="server", timestamp=TS))
    return d


def without(user: str, inbox: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An inbox as it would read had *user* never been there."""
    out = []
    for envelope in inbox:
        if envelope["type"] == "presence" and envelope["username"] == user:
            continue
        if envelope["type"] == "presence_state":
            envelope = {**envelope, "users": [u for u in envelope["users"] if u != user]}
        out.append(envelope)
    return out


@given(ops)
def test_a_slow_receiver_changes_nothing_for_anyone_else(script: list[Any]) -> None:
    behind, keeping_up = run(script, slow={SLOW}), run(script, slow=set())
    # The slow one was closed as the policy says; the one that kept up was not.
    assert ConnectionId(SLOW) not in behind.broker
    assert ConnectionId(SLOW) in keeping_up.broker
    for c in (1, 2, 3):
        assert without("zed", behind.inbox(c)) == without("zed", keeping_up.inbox(c))
    # What the slow one did get is the start of what the other run got, cut short.
    got, full = behind.inbox(SLOW), keeping_up.inbox(SLOW)
    assert got == full[: len(got)]
    assert len(got) < len(full)


@given(
    conns=st.integers(2, 4),
    steps=st.lists(
        st.tuples(st.sampled_from(["pong", "chat", "tick"]), st.integers(1, 4)),
        min_size=200,
        max_size=400,
    ),
)
def test_state_grows_with_connections_not_with_traffic(conns: int, steps: list[Any]) -> None:
    b = Broker(BrokerConfig(ping_interval=100.0, ping_timeout=100.0))
    for c in range(1, conns + 1):
        b.handle(
            ClientConnected(conn=ConnectionId(c), username=Username(f"u{c}"), room=RoomName("r")),
            now=0.0,
            timestamp=TS,
        )
    baseline = footprint(b, {id(b.streams)})
    now = 0.0
    for kind, c in steps:
        now += 0.01
        if kind == "tick":
            b.handle_timeout(now=now, timestamp=TS)
        # Everyone but conn 1 answers all the time, so its timer stays first and theirs
        # pile up behind it, stale, unless they are pruned. (Nobody expires.)
        for k in range(2, conns + 1):
            b.handle(PongReceived(conn=ConnectionId(k)), now=now, timestamp=TS)
        if kind == "chat":
            text = json.dumps({"type": "chat", "content": "x"})
            b.handle(
                TextReceived(conn=ConnectionId((c - 1) % conns + 1), text=text),
                now=now,
                timestamp=TS,
            )
        b.next_deadline()
        if kind == "tick":
            assert footprint(b, {id(b.streams)}) <= baseline + 400
    for c in range(1, conns + 1):
        b.handle(ClientDisconnected(conn=ConnectionId(c)), now=now, timestamp=TS)
    assert b.next_deadline() is None
    # Room streams are bounded by their own limits (tests/core/test_streams.py), and a
    # room's position outlives its members: counted apart.
    assert footprint(b, {id(b.streams)}) == 0
    assert len(b.streams) == 1
    assert b.streams.used_bytes <= b.config.history_max_bytes


def nested(depth: int) -> str:
    return '{"type": "chat", "content": ' + "[" * depth + "]" * depth + "}"


def test_content_too_deep_to_forward_is_refused_not_raised() -> None:
    """Content the decoder takes but the encoder cannot nest once more (inside the chat
    envelope, deeper in the stack) gets bad_message, and seq does not move."""
    b = Broker()
    b.handle(
        ClientConnected(conn=ConnectionId(1), username=Username("ann"), room=RoomName("lobby")),
        now=0.0,
        timestamp=TS,
    )
    outcomes = []
    depth = sys.getrecursionlimit() + 10
    while not outcomes or outcomes[-1] != "chat":
        depth -= 1
        seq = b.seq("lobby")
        (deliver, *notices) = b.handle(
            TextReceived(conn=ConnectionId(1), text=nested(depth)), now=0.0, timestamp=TS
        )
        assert isinstance(deliver, Deliver)
        envelope = json.loads(deliver.payload)
        if envelope["type"] == "chat":
            assert b.seq("lobby") == seq + 1
        else:
            # Refused: an error to the sender alone; nothing published.
            assert deliver.conns == (1,)
            assert envelope["code"] in ("bad_json", "bad_message")
            assert isinstance(envelope["content"], str) and envelope["content"]
            assert notices == []
            assert b.seq("lobby") == seq
        outcomes.append(envelope.get("code", envelope["type"]))
    # Deepest first: not JSON at all (bad_json), maybe JSON that cannot be forwarded
    # (bad_message), then a chat; never the other way round.
    assert outcomes[0] == "bad_json"
    assert outcomes[-1] == "chat"
    assert outcomes == sorted(outcomes, key=["bad_json", "bad_message", "chat"].index)


ROOM_CHARS = "ABCXYZabcxyz0189_.:-"
NOT_ROOM_CHARS = " /?#&=é\x00\t+%"


@given(st.text(ROOM_CHARS + NOT_ROOM_CHARS, max_size=70))
def test_room_names_are_1_to_64_of_the_protocol_alphabet(name: str) -> None:
    expected = 1 <= len(name) <= 64 and all(ch in ROOM_CHARS for ch in name)
    assert is_valid_room(name) == expected


CONTROLS = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))


#: Format characters (Cf) and lone surrogates (Cs), refused like controls.
FORMATS_AND_SURROGATES = "\u202e\u200b\u200d\ufeff\u00ad\U000e0001\ud800\udfff"


@given(
    st.text(st.sampled_from("ab é😀" + CONTROLS[::7] + FORMATS_AND_SURROGATES), max_size=70)
    | st.text(max_size=70)
)
def test_usernames_are_1_to_64_characters_without_controls(name: str) -> None:
    refused = CONTROLS + FORMATS_AND_SURROGATES
    expected = (
        1 <= len(name) <= 64
        and not any(ch in refused for ch in name)
        and not any(unicodedata.category(ch) == "Cf" for ch in name)
    )
    assert is_valid_username(name) == expected


@pytest.mark.parametrize(("name", "ok"), [("a" * 64, True), ("a" * 65, False), ("", False)])
def test_name_length_boundaries(name: str, ok: bool) -> None:
    assert is_valid_room(name) == ok
    assert is_valid_username(name) == ok


@pytest.mark.parametrize("name", [None, 5, b"lobby", ["lobby"]])
def test_names_must_be_str(name: object) -> None:
    assert not is_valid_room(name)
    assert not is_valid_username(name)


@given(
    room=st.text(ROOM_CHARS + " ", max_size=66),
    username=st.text(max_size=66),
    content=st.sampled_from([1, "x", None, {"a": [1]}, float("nan"), object(), {1: 2}]),
)
def test_server_publish_validates_its_arguments_and_changes_nothing_when_refused(
    room: str, username: str, content: object
) -> None:
    b = Broker()
    b.handle(
        ClientConnected(conn=ConnectionId(1), username=Username("ann"), room=RoomName(room))
        if is_valid_room(room)
        else ClientConnected(conn=ConnectionId(1), username=Username("ann")),
        now=0.0,
        timestamp=TS,
    )
    encodable = not (isinstance(content, float) or type(content) is object)
    before = (b.seq(room), b.statistics())
    if is_valid_room(room) and is_valid_username(username) and encodable:
        actions = b.publish(room, content, username=username, timestamp=TS)
        (deliver, published) = actions
        assert isinstance(deliver, Deliver) and deliver.conns == (1,)
        assert json.loads(deliver.payload)["username"] == username
        assert published.seq == before[0] + 1  # type: ignore[union-attr]
    else:
        with pytest.raises(ValueError, match=r"room|username|JSON"):
            b.publish(room, content, username=username, timestamp=TS)
        assert (b.seq(room), b.statistics()) == before


def test_driver_mistakes_raise_and_say_what_was_wrong() -> None:
    b = Broker()
    event = ClientConnected(conn=ConnectionId(7), username=Username("ann"))
    b.handle(event, now=0.0, timestamp=TS)
    with pytest.raises(LocalProtocolError, match="7"):
        b.handle(event, now=0.0, timestamp=TS)
    with pytest.raises(LocalProtocolError, match="nonsense"):
        b.handle("nonsense", now=0.0, timestamp=TS)  # type: ignore[arg-type]
    assert b.statistics().connections == 1
