"""
The envelope decoder against the protocol page's table of client messages.

Objects are assembled from fields that may be right, wrong or missing, and the decoded
request must be what docs/protocol.md says: a chat, join, leave or ping, or an error
with the code the page names. The reason text is for people: any non-empty string.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from roombus.core import codec

from ..strategies import json_values

MISSING = object()
VALID_ROOMS = ["lobby", "a" * 64, "x:y.z-_9"]
INVALID_ROOMS = ["a" * 65, "bad room", "é", 5, ["lobby"], {"r": 1}, True]


def spec(obj: object) -> object:
    """What docs/protocol.md says a client message means (errors as their code)."""
    if not isinstance(obj, dict):
        return "bad_message"
    kind = obj.get("type")
    if kind == "chat":
        if "content" not in obj:
            return "bad_message"
        room = obj.get("room")
        if room is None or room == "":
            return codec.Chat(None, obj["content"])
        return codec.Chat(room, obj["content"]) if room in VALID_ROOMS else "invalid_room"
    if kind in ("join", "leave"):
        if "room" not in obj:
            return "bad_message"
        room = obj["room"]
        if room not in VALID_ROOMS or type(room) is not str:
            return "invalid_room"
        return codec.Join(room) if kind == "join" else codec.Leave(room)
    if kind == "ping":
        return codec.Ping()
    return "bad_message"


def field(values: list[Any]) -> st.SearchStrategy[Any]:
    return st.sampled_from([MISSING, *values])


@st.composite
def messages(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # mostly not an object at all
    obj: dict[str, Any] = {}
    for name, value in [
        (
            "type",
            draw(field(["chat", "join", "leave", "ping", "dance", "Chat", 7, None, ["chat"]])),
        ),
        ("room", draw(field([None, "", *VALID_ROOMS, *INVALID_ROOMS]))),
        ("content", draw(field([None, 0, "hi", [], {}]) | json_values)),
        ("username", draw(field(["mallory"]))),
        ("seq", draw(field([99]))),
    ]:
        if value is not MISSING:
            obj[name] = value
    return obj


def decoded(request: object) -> object:
    if isinstance(request, codec.Invalid):
        assert isinstance(request.reason, str) and request.reason
        return request.code
    return request


@given(messages())
def test_client_messages_mean_what_the_protocol_says(obj: object) -> None:
    assert decoded(codec.decode_request(json.dumps(obj))) == spec(obj)


@given(st.sampled_from(["NaN", "Infinity", "-Infinity", "{", "", "nul", "'x'", "[1,]"]))
def test_what_is_not_json_is_bad_json(bad: str) -> None:
    for text in (bad, '{"type": "chat", "content": ' + bad + "}"):
        assert decoded(codec.decode_request(text)) == "bad_json"


@given(st.sampled_from(["1e999", "-1e999", "[1e400]", '{"a": 1e309}']))
def test_numbers_json_cannot_carry_back_out_are_not_forwarded(number: str) -> None:
    """Valid JSON, but no float holds it: decoded, then refused when re-encoded."""
    request = codec.decode_request('{"type": "chat", "content": ' + number + "}")
    assert isinstance(request, codec.Chat)
    assert codec.encode_chat("ann", request.content, "lobby", 0, 1) is None


@given(content=json_values, seq=st.integers(1, 2**53), ts=st.integers(0, 2**40))
def test_server_envelopes_are_compact_utf8_json(content: object, seq: int, ts: int) -> None:
    chat = codec.encode_chat("zoë", content, "lobby", ts, seq)
    assert chat is not None
    for payload in (
        chat,
        codec.encode_presence("join", "zoë", "lobby", ts),
        codec.encode_presence("leave", "zoë", "lobby", ts),
        codec.encode_presence_state("lobby", ["ann", "zoë"]),
        codec.encode_error("bad_json", "message is not valid JSON"),
        codec.PONG,
    ):
        # Compact UTF-8 JSON: exactly what a canonical encoder writes.
        assert (
            payload
            == json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False).encode()
        )
    assert json.loads(chat)["content"] == content
    assert (
        json.loads(codec.encode_presence("leave", "zoë", "lobby", ts))["content"]
        == "zoë left the room"
    )


def _decoded(parse: Any, text: str) -> object:
    """What *parse* makes of *text*: the value, or the kind of error it raised."""
    try:
        return ("value", parse(text))
    except (ValueError, RecursionError) as e:
        return ("error", type(e).__name__)


_WHITESPACE = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])
_TEXTS = st.one_of(
    st.tuples(_WHITESPACE, json_values, _WHITESPACE, st.sampled_from(["", "", "x", "}", "1"])).map(
        lambda t: t[0] + json.dumps(t[1], ensure_ascii=False) + t[2] + t[3]
    ),
    st.text(max_size=40),
    st.sampled_from(["NaN", "[Infinity]", '{"a": -Infinity}', "[" * 3000, '{"a": }', "{", ""]),
)


@given(_TEXTS)
def test_the_decoders_fast_path_decodes_as_json_does(text: str) -> None:
    """The C scanner called directly agrees with ``JSONDecoder.decode``, errors included."""
    assert _decoded(codec._parse, text) == _decoded(codec._decoder.decode, text)
