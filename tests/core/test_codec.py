"""The envelope codec: decoding never raises, encoding round-trips."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from roombus.core import codec

from ..strategies import json_values, rooms


@given(st.text())
def test_decoding_arbitrary_text_never_raises(text: str) -> None:
    result = codec.decode_request(text)
    assert isinstance(result, (codec.Chat, codec.Join, codec.Leave, codec.Ping, codec.Invalid))


@given(json_values)
def test_decoding_arbitrary_json_never_raises(value: object) -> None:
    result = codec.decode_request(json.dumps(value))
    if not isinstance(value, dict):
        assert result == codec.Invalid(codec.BAD_MESSAGE, "message must be a JSON object")


@given(st.dictionaries(st.sampled_from(["type", "room", "content", "username"]), json_values))
def test_decoding_arbitrary_objects_never_raises(obj: dict[str, object]) -> None:
    codec.decode_request(json.dumps(obj))


@given(content=json_values, room=rooms)
def test_chat_round_trip(content: object, room: str) -> None:
    request = codec.decode_request(json.dumps({"type": "chat", "content": content, "room": room}))
    assert request == codec.Chat(room, content)  # type: ignore[arg-type]
    payload = codec.encode_chat("ann", content, room, 5, 7)
    assert payload is not None
    assert json.loads(payload) == {
        "type": "chat",
        "username": "ann",
        "content": content,
        "room": room,
        "timestamp": 5,
        "seq": 7,
    }
    payload.decode("utf-8")  # valid UTF-8 for any client, whatever the content


def test_lone_surrogates_in_content_are_refused_not_fatal() -> None:
    # Valid JSON, but not Unicode text: the chat is refused (the broker answers
    # bad_message), and the server's own envelopes still escape one if it quotes it.
    request = codec.decode_request('{"type":"chat","content":"é\\ud800", "x": ["\\udfff"]}')
    assert isinstance(request, codec.Chat)
    assert request.content == "é\ud800"
    assert codec.encode_chat("ann", request.content, "r", 0, 1) is None
    assert codec.chat_prefix("ann", ["ok", {"k": "\udfff"}], "r", 0) is None
    assert codec.encode_chat("ann", "é", "r", 0, 1) is not None
    assert codec.encode({"a": ["\udfff"]}) == b'{"a":["\\udfff"]}'


def test_non_ascii_content_is_not_inflated() -> None:
    payload = codec.encode_chat("ann", "é" * 1000, "r", 0, 1)
    assert payload is not None
    assert len(payload) < 2000 + 100


def test_original_clients_empty_and_null_room_mean_the_default() -> None:
    assert codec.decode_request('{"type":"chat","content":"x","room":""}') == codec.Chat(None, "x")
    assert codec.decode_request('{"type":"chat","content":"x","room":null}') == codec.Chat(
        None, "x"
    )


def test_encoded_envelopes() -> None:
    assert json.loads(codec.encode_presence("leave", "ann", "r", 3)) == {
        "type": "presence",
        "event": "leave",
        "username": "ann",
        "content": "ann left the room",
        "room": "r",
        "timestamp": 3,
    }
    assert json.loads(codec.encode_presence_state("r", ["a", "b"])) == {
        "type": "presence_state",
        "room": "r",
        "users": ["a", "b"],
    }
    assert json.loads(codec.encode_error("bad_json", "x")) == {
        "type": "error",
        "code": "bad_json",
        "content": "x",
    }
    assert json.loads(codec.PONG) == {"type": "pong"}


@given(rooms, st.sets(st.text(max_size=8)))
def test_presence_state_from_pieces_is_the_same_bytes(room: str, users: set[str]) -> None:
    names = sorted(users)
    pieces = [codec.user_literal(u) for u in names]
    assert codec.presence_state_of(room, pieces) == codec.encode_presence_state(room, names)


def test_refusals_say_what_is_wrong() -> None:
    """The reason a client reads in its ``error`` envelope names the problem."""
    assert codec.decode_request('{"type": "bogus"}') == codec.Invalid(
        codec.BAD_MESSAGE, "unknown message type"
    )
    assert codec.decode_request('{"type": 7}') == codec.Invalid(
        codec.BAD_MESSAGE, "message needs a string type field"
    )
    refused = codec.decode_request('{"type": "history", "room": "a", "limit": -1}')
    assert isinstance(refused, codec.Invalid)
    assert (refused.code, refused.reason) == (codec.BAD_MESSAGE, "limit must be an integer >= 0")
