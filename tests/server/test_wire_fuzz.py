"""
Fuzzing the frame path: after a valid upgrade, arbitrary bytes and random frames
(any opcode, RSV bits, masking, length encoding, payload, fragmentation), cut
anywhere, into the wire layer and the broker behind it.

What the client reads back is always well-formed: JSON envelopes of the protocol's
types, pongs, and at most one close frame, last, with a valid code. Nothing raises, and
once the stream ends the broker holds nothing.
"""

from __future__ import annotations

import json
import struct

from hypothesis import given
from hypothesis import strategies as st

from .pipeline import PEER_CLOSE_CODES, SERVER_CLOSE_CODES, Pipeline, WebSocketAnswer, read_answer
from .test_handshake_fuzz import FUZZ, VALID, chunked

protocol_texts = st.sampled_from(
    [
        '{"type": "chat", "content": "hi"}',
        '{"type": "chat", "room": "r2", "content": 1}',
        '{"type": "join", "room": "r2"}',
        '{"type": "leave", "room": "lobby"}',
        '{"type": "leave", "room": "nowhere"}',
        '{"type": "ping"}',
        '{"type": "join", "room": "bad room"}',
        "not json",
        "[]",
    ]
) | st.text(max_size=40)


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    """One client frame, mostly valid, each header field sometimes wrong."""
    opcode = draw(st.sampled_from([0x1] * 6 + [0x0, 0x2, 0x8, 0x8, 0x9, 0xA, 0x3, 0xB]))
    fin = draw(st.sampled_from([True] * 5 + [False]))
    rsv = draw(st.sampled_from([0] * 8 + [0x40, 0x20, 0x10]))
    if opcode in (0x0, 0x1):
        payload = draw(
            protocol_texts.map(str.encode)
            | st.binary(max_size=40)
            | st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", "é".encode() * 200])
        )
    elif opcode == 0x8:
        code = draw(
            st.sampled_from([1000, 1001, 1002, 1005, 1006, 1015, 999, 2999, 3000, 4999, 5000])
        )
        payload = draw(st.sampled_from([b"", b"x"])) or struct.pack("!H", code) + draw(
            st.sampled_from([b"", b"bye", b"\xff", b"r" * 124])
        )
    else:
        payload = draw(st.binary(max_size=130))
    masked = draw(st.sampled_from([True] * 8 + [False]))
    n = len(payload)
    length_form = draw(st.sampled_from(["minimal"] * 6 + ["16", "64"]))
    if length_form == "minimal" and n < 126:
        length = bytes([n])
    elif length_form == "64":
        length = bytes([127]) + struct.pack("!Q", n)
    else:
        length = (
            bytes([126]) + struct.pack("!H", n)
            if n < 65536
            else bytes([127]) + struct.pack("!Q", n)
        )
    first = bytes([(0x80 if fin else 0) | rsv | opcode])
    if not masked:
        return first + length + payload
    key = draw(st.binary(min_size=4, max_size=4))
    masked_payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first + bytes([length[0] | 0x80]) + length[1:] + key + masked_payload


def check(pipeline: Pipeline) -> WebSocketAnswer:
    answer = read_answer(pipeline.out)
    assert isinstance(answer, WebSocketAnswer)
    if answer.close_code is not None:
        assert answer.close_code in SERVER_CLOSE_CODES | PEER_CLOSE_CODES
    # The stream ended: the client is gone and nothing is left behind.
    assert pipeline.broker.statistics().connections == 0
    assert pipeline.broker.rooms == []
    return answer


def opened() -> Pipeline:
    pipeline = Pipeline()
    pipeline.feed(VALID)
    assert pipeline.wire.state.name == "OPEN"
    return pipeline


@FUZZ
@given(st.lists(frame(), max_size=10), st.lists(st.integers(0, 3000), max_size=8))
def test_random_frames_get_envelopes_pongs_or_a_close_code(
    frames: list[bytes], cuts: list[int]
) -> None:
    pipeline = opened()
    for chunk in chunked(b"".join(frames), cuts):
        pipeline.feed(chunk)
    pipeline.feed(None)
    check(pipeline)


@FUZZ
@given(st.lists(st.binary(max_size=120), max_size=6))
def test_arbitrary_bytes_after_the_upgrade(chunks: list[bytes]) -> None:
    pipeline = opened()
    for chunk in chunks:
        pipeline.feed(chunk)
    pipeline.feed(None)
    check(pipeline)


@FUZZ
@given(st.lists(protocol_texts, max_size=8), st.lists(st.integers(0, 3000), max_size=8))
def test_valid_frames_each_get_their_answer(texts: list[str], cuts: list[int]) -> None:
    """Well-formed frames, however they are cut: every message is handled, in order, and
    the close handshake completes with 1000."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import CloseConnection, TextMessage

    client = Connection(ConnectionType.CLIENT)
    data = b"".join(client.send(TextMessage(data=t)) for t in texts)
    data += client.send(CloseConnection(code=1000))
    pipeline = opened()
    for chunk in chunked(data, cuts):
        pipeline.feed(chunk)
    answer = check(pipeline)
    assert answer.close_code == 1000
    # join, presence_state, then one answer per message (a chat's own copy, an error,
    # a pong, a presence_state ...), except a leave that succeeds silently.
    replies = answer.envelopes[2:]
    pings = [t for t in texts if _kind(t) == "ping"]
    assert sum(e["type"] == "pong" for e in replies) == len(pings)


def _kind(text: str) -> str | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj.get("type") if isinstance(obj, dict) else None
