"""
Fuzzing the envelope decoder and the broker behind it: arbitrary JSON values, objects
with the protocol's field names and wild values, and arbitrary text, from several
clients sharing rooms. Every answer is an envelope of the protocol's types (an error
with a known code when refused); nothing raises; the broker stays consistent.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from roombus import RoomName, Username
from roombus.core import codec
from roombus.lowlevel import (
    Broker,
    ClientConnected,
    ClientDisconnected,
    ConnectionId,
    Deliver,
    TextReceived,
)

from ..server.pipeline import CONFIG, ENVELOPE_TYPES, ERROR_CODES, TS
from ..server.test_handshake_fuzz import FUZZ
from ..strategies import json_values

#: Lone surrogates: JSON spells them ("\\ud800"), UTF-8 cannot carry them.
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
#: Text that now and then holds a lone surrogate (json.dumps escapes it).
surrogate_text = st.text(st.characters() | st.sampled_from(LONE_SURROGATES), max_size=20)
wild = st.one_of(
    json_values,
    st.sampled_from(["chat", "join", "leave", "ping", "lobby", "r2", "", None, 0, -1, 2**64]),
    st.text(max_size=70),
    surrogate_text,
    st.lists(surrogate_text, max_size=3),
    st.dictionaries(surrogate_text, surrogate_text, max_size=2),
)


def _nested_chat(depth: int) -> str:
    return '{"type":"chat","content":' + "[" * depth + "]" * depth + "}"


#: Chats nested to around and far past the interpreter's recursion limit.
NESTED = [_nested_chat(n) for n in (64, 500, 900, 990, 1000, 1100, 5000, 60_000)]
objects = st.dictionaries(
    st.sampled_from(["type", "room", "content", "username", "seq", "timestamp", "extra"]),
    wild,
    max_size=5,
)
texts = st.one_of(
    objects.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=80),
    st.sampled_from(
        ["{", '{"type":"chat","content":1e999}', '{"type":"chat","content":NaN}', "\ud800"]
    ),
    st.sampled_from(NESTED),
    st.tuples(st.sampled_from(["chat", "join", "leave"]), surrogate_text, surrogate_text).map(
        lambda t: json.dumps({"type": t[0], "content": t[1], "room": t[2] or None})
    ),
)


def _has_lone_surrogate(value: object) -> bool:
    """Whether any string in a JSON value holds one (a walk, not a recursion: the
    value may be nested as deeply as the decoder goes)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in item):
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
    return False


@FUZZ
@given(texts)
def test_the_decoder_answers_every_text_with_a_request_or_an_error(text: str) -> None:
    request = codec.decode_request(text)
    if isinstance(request, codec.Invalid):
        assert request.code in ERROR_CODES
        assert isinstance(request.reason, str) and request.reason
    else:
        assert isinstance(request, (codec.Chat, codec.Join, codec.Leave, codec.Ping))


@FUZZ
@given(st.lists(st.tuples(st.integers(1, 3), texts), max_size=20))
def test_every_client_message_gets_envelopes_back(messages: list[tuple[int, str]]) -> None:
    broker = Broker(CONFIG)
    for c, user in ((1, "ann"), (2, "bob"), (3, "ann")):
        broker.handle(
            ClientConnected(conn=ConnectionId(c), username=Username(user), room=RoomName("lobby")),
            now=0.0,
            timestamp=TS,
        )
    for c, text in messages:
        actions = broker.handle(
            TextReceived(conn=ConnectionId(c), text=text), now=0.0, timestamp=TS
        )
        delivers = [a for a in actions if isinstance(a, Deliver)]
        for a in delivers:
            envelope = json.loads(a.payload.decode("utf-8"))
            assert envelope["type"] in ENVELOPE_TYPES
            # Text that is not Unicode is refused, never passed on (escaped or not).
            assert not _has_lone_surrogate(envelope), envelope
            if envelope["type"] == "error":
                assert envelope["code"] in ERROR_CODES
                assert a.conns == (c,)  # only the sender hears about its mistake
        # The sender always hears back, except when a leave succeeds (others are told)
        # or a second tab leaves and nobody needs telling.
        if not any(c in a.conns for a in delivers):
            assert isinstance(codec.decode_request(text), codec.Leave)
    for c in (1, 2, 3):
        broker.handle(ClientDisconnected(conn=ConnectionId(c)), now=0.0, timestamp=TS)
    assert broker.rooms == [] and broker.statistics().connections == 0
