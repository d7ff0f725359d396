"""The wire layer, bytes in and bytes out, with no network and no trio."""

from __future__ import annotations

import base64
import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from roombus.server.handshake import Upgrade, route_request
from roombus.server.http import HttpResponse
from roombus.server.wire import (
    FRAGMENT_OVERHEAD,
    BadRequest,
    Closed,
    FragmentReceived,
    MessageReceived,
    PongFrameReceived,
    Reply,
    RequestReceived,
    ServerWire,
    WireState,
    close_frame,
    text_frame,
)

KEY = base64.b64encode(b"0123456789abcdef")
REQUEST = (
    b"GET /ws?room=lobby&username=ann HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n\r\n"
)


def raw_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame with an all-zero mask (payload bytes unchanged)."""
    assert len(payload) < 126
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def opened(**kw: int) -> tuple[ServerWire, Connection]:
    wire = ServerWire(**kw)
    (event,) = wire.receive_data(REQUEST)
    assert isinstance(event, RequestReceived)
    decision = route_request(event.method, event.target, event.headers)
    assert isinstance(decision, Upgrade)
    response = wire.accept(decision)
    assert response.startswith(b"HTTP/1.1 101 ")
    assert wire.receive_data(b"") == []
    return wire, Connection(ConnectionType.CLIENT)


def test_request_in_pieces_then_messages() -> None:
    wire = ServerWire()
    assert wire.receive_data(REQUEST[:10]) == []
    (event,) = wire.receive_data(REQUEST[10:])
    assert isinstance(event, RequestReceived)
    assert event.target == b"/ws?room=lobby&username=ann"


def test_bytes_that_came_with_the_request_are_not_lost() -> None:
    wire = ServerWire()
    client = Connection(ConnectionType.CLIENT)
    (event,) = wire.receive_data(REQUEST + client.send(TextMessage(data="early")))
    decision = route_request(event.method, event.target, event.headers)  # type: ignore[union-attr]
    wire.accept(decision)  # type: ignore[arg-type]
    assert wire.receive_data(b"") == [MessageReceived("early")]


def test_text_fragments_ping_pong() -> None:
    wire, client = opened()
    data = client.send(TextMessage(data="hel", message_finished=False))
    data += client.send(TextMessage(data="lo ☃", message_finished=True))
    data += client.send(Ping(payload=b"p"))
    data += raw_frame(0xA, b"")
    events = wire.receive_data(data)
    assert events[0] == FragmentReceived()
    assert events[1] == MessageReceived("hello ☃")
    assert isinstance(events[2], Reply)
    assert events[2].data == b"\x8a\x01p"
    assert events[3] == PongFrameReceived()


def test_peer_close_is_answered() -> None:
    wire, client = opened()
    (event,) = wire.receive_data(client.send(CloseConnection(code=1000, reason="bye")))
    assert event == Closed(code=1000, data=close_frame(1000, "bye"), by_peer=True)
    assert wire.receive_data(b"more") == []


def test_end_of_stream() -> None:
    wire, _ = opened()
    (event,) = wire.receive_data(None)
    assert isinstance(event, Closed) and event.code == 1006 and event.by_peer


def closing_code(wire: ServerWire, data: bytes) -> int:
    events = wire.receive_data(data)
    closed = [e for e in events if isinstance(e, Closed)]
    assert closed, events
    assert not closed[0].by_peer
    assert closed[0].data[:1] == b"\x88"
    return int.from_bytes(closed[0].data[2:4], "big")


def test_invalid_utf8_closes_1007() -> None:
    wire, _ = opened()
    assert closing_code(wire, raw_frame(0x1, b"ok \xff\xfe")) == 1007


def test_binary_closes_1003() -> None:
    wire, client = opened()
    assert closing_code(wire, client.send(BytesMessage(data=b"\x00"))) == 1003


def test_too_big_closes_1009_also_when_fragmented() -> None:
    limit = 100 + FRAGMENT_OVERHEAD  # one fragment's overhead and 100 bytes
    wire, client = opened(max_message_bytes=limit)
    assert wire.receive_data(client.send(TextMessage(data="x" * limit))) == [
        MessageReceived("x" * limit)
    ]
    data = client.send(TextMessage(data="é" * 30, message_finished=False))  # 60 bytes
    assert wire.receive_data(data) == [FragmentReceived()]
    data = client.send(TextMessage(data="é" * 21, message_finished=True))  # 102 in all
    assert closing_code(wire, data) == 1009


def test_protocol_violations_close_1002() -> None:
    wire, _ = opened()
    assert closing_code(wire, b"\x81\x02hi") == 1002  # unmasked client frame
    wire, _ = opened()
    assert closing_code(wire, raw_frame(0x3, b"")) == 1002  # reserved opcode
    wire, _ = opened()
    assert closing_code(wire, raw_frame(0x0, b"x")) == 1002  # continuation of nothing


def test_bad_and_oversized_requests() -> None:
    (event,) = ServerWire().receive_data(b"\x16\x03\x01 not http\r\n\r\n")
    assert isinstance(event, BadRequest) and event.response.status == 400
    (event,) = ServerWire(max_header_bytes=100).receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200 + b"\r\n\r\n"
    )
    assert isinstance(event, BadRequest) and event.response.status == 431
    (event,) = ServerWire().receive_data(None)
    assert isinstance(event, Closed)


def test_responses_and_frames() -> None:
    wire = ServerWire()
    wire.receive_data(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    decision = route_request(b"GET", b"/nope", [])
    assert not isinstance(decision, Upgrade)
    out = wire.respond(decision)
    assert out.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert out.endswith(b"\r\n\r\nnot found\n")
    assert wire.state is WireState.CLOSED
    assert wire.respond(decision, head=True).endswith(b"\r\n\r\n")
    for size in (0, 125, 126, 65535, 65536):
        client = Connection(ConnectionType.CLIENT)
        client.receive_data(text_frame(b"a" * size))
        (event,) = client.events()
        assert event == TextMessage(data="a" * size)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_before_the_handshake(data: bytes) -> None:
    wire = ServerWire(max_header_bytes=256)
    for event in wire.receive_data(data) + wire.receive_data(None):
        assert isinstance(event, (RequestReceived, BadRequest, Closed))


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_arbitrary_bytes_after_the_handshake(chunks: list[bytes]) -> None:
    wire, _ = opened(max_message_bytes=64)
    for chunk in [*chunks, None]:
        for event in wire.receive_data(chunk):
            assert isinstance(event, (MessageReceived, PongFrameReceived, Reply, Closed))
            if isinstance(event, MessageReceived):
                assert len(event.text.encode()) <= 64


def _client_frames() -> st.SearchStrategy[list[bytes]]:
    """Streams of client frames, mostly valid: fragments, control frames, some bad input."""
    text = st.text(max_size=300)
    one = st.one_of(
        text.map(lambda t: ("text", t)),
        st.tuples(st.just("frag"), st.lists(text, min_size=2, max_size=4)),
        st.just(("ping", "")),
        st.just(("pong", "")),
        st.binary(max_size=20).map(lambda b: ("rawtext", b)),
        st.binary(max_size=10).map(lambda b: ("binary", b)),
        st.binary(min_size=1, max_size=12).map(lambda b: ("garbage", b)),
        # A short text frame whose length takes 2 bytes where 1 would do (RFC 6455
        # 5.2 wants the minimal form), and a new text frame inside a fragmented message:
        # both protocol errors the fast path must leave to wsproto.
        st.binary(max_size=20).map(lambda b: ("long-length", b)),
        text.map(lambda t: ("text-in-fragments", t)),
    )

    def build(items: list[tuple[str, object]]) -> list[bytes]:
        client = Connection(ConnectionType.CLIENT)
        out = []
        for kind, arg in items:
            if kind == "text":
                out.append(client.send(TextMessage(data=arg)))  # type: ignore[arg-type]
            elif kind == "frag":
                parts = arg  # type: ignore[assignment]
                for i, part in enumerate(parts):  # type: ignore[arg-type]
                    fin = i == len(parts) - 1  # type: ignore[arg-type]
                    out.append(client.send(TextMessage(data=part, message_finished=fin)))
                    if i == 0:
                        out.append(client.send(Ping(payload=b"mid")))
            elif kind == "ping":
                out.append(client.send(Ping(payload=b"x")))
            elif kind == "pong":
                out.append(raw_frame(0xA, b""))
            elif kind == "rawtext":
                out.append(raw_frame(0x1, arg))  # type: ignore[arg-type]
            elif kind == "binary":
                out.append(client.send(BytesMessage(data=arg)))  # type: ignore[arg-type]
            elif kind == "long-length":
                payload = arg  # type: ignore[assignment]
                out.append(b"\x81\xfe" + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload)
            elif kind == "text-in-fragments":
                # Raw frames: the client object must not think a message is open.
                out.append(raw_frame(0x1, b"a", fin=False))
                out.append(raw_frame(0x1, arg.encode()[:100]))  # type: ignore[union-attr]
            else:
                out.append(arg)  # type: ignore[arg-type]
        return out

    return st.lists(one, max_size=12).map(build)


@settings(max_examples=300)
@given(frames=_client_frames(), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_fast_path_matches_wsproto_alone(frames: list[bytes], cuts: list[int]) -> None:
    """Whatever the bytes and however they are split, the fast path for simple text frames
    gives exactly the events wsproto alone gives."""
    stream = b"".join(frames)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    results = []
    for fast in (True, False):
        wire, _ = opened(max_message_bytes=200)
        if not fast:
            wire._fast_max = -1  # everything through wsproto
        events: list[object] = []
        for chunk in [*chunks, None]:
            events += wire.receive_data(chunk)
            if any(isinstance(e, Closed) for e in events):
                break
        results.append(events)
    assert results[0] == results[1]


def test_a_needlessly_long_length_and_a_text_frame_inside_a_fragmented_message_close_1002() -> None:
    wire, _ = opened()
    assert closing_code(wire, b"\x81\xfe\x00\x02\0\0\0\0hi") == 1002
    wire, client = opened()
    assert wire.receive_data(client.send(TextMessage(data="a", message_finished=False))) == [
        FragmentReceived()
    ]
    assert closing_code(wire, raw_frame(0x1, b"new")) == 1002


def masked_text_frame(payload: bytes, key: bytes) -> bytes:
    """A final, masked client text frame with the minimal length encoding."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


@functools.cache
def _hi_then_xs(n: int) -> bytes:
    key = bytes((0x78 ^ 0x81, 0x78 ^ 0x86, 0, 0))
    # After a short frame, so a long one's head is also cut past the buffer's start.
    return masked_text_frame(b"hi", b"\1\2\3\4") + masked_text_frame(b"x" * n, key)


@pytest.mark.parametrize("cut", range(24))
@pytest.mark.parametrize("n", [126, 65535, 65536])
def test_long_frames_in_pieces_whose_payload_looks_like_a_frame(n: int, cut: int) -> None:
    # Masked, the payload's first bytes read as the head of a small masked text frame
    # (0x81 0x86, a key, six NULs): only a correct length keeps the scanner out of it.
    text = "x" * n
    data = _hi_then_xs(n)
    wire, _ = opened(max_message_bytes=1 << 17)
    events = wire.receive_data(data[:cut]) + wire.receive_data(data[cut:])
    assert events == [MessageReceived("hi"), MessageReceived(text)]


def _post(length: int) -> bytes:
    return b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length


def test_a_post_body_is_read_bounded_and_its_end_reported() -> None:
    wire = ServerWire(max_body_bytes=10)
    wire.wants_body = lambda target, headers: True
    (event,) = wire.receive_data(_post(5) + b"hello")
    assert isinstance(event, RequestReceived) and event.body == b"hello"
    assert (event.method, event.target) == (b"POST", b"/api/x")
    assert (b"content-length", b"5") in event.headers
    assert wire.state is WireState.CLOSED
    # Over the limit, announced: the request without its body, nothing more read.
    wire = ServerWire(max_body_bytes=10)
    wire.wants_body = lambda target, headers: True
    (event,) = wire.receive_data(_post(11))
    assert isinstance(event, RequestReceived) and event.body is None
    assert (event.method, event.target) == (b"POST", b"/api/x")
    assert (b"content-length", b"11") in event.headers
    assert wire.state is WireState.CLOSED
    # The peer gone mid-body: a truncated request, nothing to hand on.
    wire = ServerWire(max_body_bytes=10)
    wire.wants_body = lambda target, headers: True
    assert wire.receive_data(_post(5) + b"he") == []
    (event,) = wire.receive_data(None)
    assert isinstance(event, BadRequest) and event.response.status == 400
    assert wire.state is WireState.CLOSED


def test_a_websocket_client_takes_the_accept() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    data = client.send(Request(host="x", target="/ws?room=lobby&username=ann"))
    wire = ServerWire()
    (event,) = wire.receive_data(data)
    assert isinstance(event, RequestReceived)
    decision = route_request(event.method, event.target, event.headers)
    assert isinstance(decision, Upgrade)
    client.receive_data(wire.accept(decision))
    assert [type(e) for e in client.events()] == [AcceptConnection]
    hello = client.send(Message(data="hello"))
    assert wire.receive_data(hello) == [MessageReceived("hello")]


def test_max_events_hands_out_the_rest_on_the_next_call() -> None:
    wire, client = opened(max_events=2)
    data = b"".join(client.send(TextMessage(data=f"m{i}")) for i in range(5))
    assert wire.receive_data(data) == [MessageReceived("m0"), MessageReceived("m1")]
    assert wire.more
    assert wire.receive_data(b"") == [MessageReceived("m2"), MessageReceived("m3")]
    # New bytes join what is left, after it.
    assert wire.receive_data(client.send(TextMessage(data="m5"))) == [
        MessageReceived("m4"),
        MessageReceived("m5"),
    ]
    assert not wire.more


@pytest.mark.parametrize("over", [0, 1])
def test_each_fragmented_message_is_measured_afresh_to_the_byte(over: int) -> None:
    """Messages in two fragments (UTF-8 bytes plus one fragment's overhead), one after
    another: each one exactly at the limit passes; a byte more closes 1009."""
    limit = 256
    wire, client = opened(max_message_bytes=limit)
    head = "a" * 10
    tail = "é" * ((limit - FRAGMENT_OVERHEAD - len(head)) // 2)  # 2 bytes each: 256 in all
    assert len(head) + FRAGMENT_OVERHEAD + len(tail.encode()) == limit
    for _ in range(3):
        data = client.send(TextMessage(data=head, message_finished=False))
        data += client.send(TextMessage(data=tail, message_finished=True))
        assert wire.receive_data(data) == [FragmentReceived(), MessageReceived(head + tail)]
    data = client.send(TextMessage(data=head + "b" * over, message_finished=False))
    data += client.send(TextMessage(data=tail, message_finished=True))
    if over:
        assert closing_code(wire, data) == 1009
    else:
        assert wire.receive_data(data)[-1] == MessageReceived(head + tail)


@pytest.mark.parametrize("pieces", [3, 7])
@pytest.mark.parametrize("n", [126, 65536])
def test_a_long_frame_in_many_reads_is_one_message(n: int, pieces: int) -> None:
    """A frame whose rest keeps coming over several reads (wsproto has begun it): each
    read hands it exactly the bytes that are the frame's, and the next frame follows."""
    data = _hi_then_xs(n) + masked_text_frame(b"after", b"\5\6\7\x08")
    wire, _ = opened(max_message_bytes=1 << 17)
    cuts = [8 + i * (len(data) - 8) // pieces for i in range(pieces)] + [len(data)]
    events = wire.receive_data(data[: cuts[0]])
    for a, b in itertools.pairwise(cuts):
        events += wire.receive_data(data[a:b])
    assert events == [MessageReceived("hi"), MessageReceived("x" * n), MessageReceived("after")]


def test_a_stream_that_ends_before_any_request_is_a_peer_s_abnormal_close() -> None:
    """Nothing to answer: the peer went (1006, by the peer), and the wire is closed."""
    wire = ServerWire()
    assert wire.receive_data(b"") == []
    assert wire.receive_data(None) == [Closed(code=1006, data=b"", by_peer=True)]
    assert wire.state is WireState.CLOSED


def test_a_refused_request_says_why_in_its_body() -> None:
    # Too large, whole in one read (h11 bounds only what is incomplete) or still growing.
    for pieces in (
        [b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200 + b"\r\n\r\n"],
        [b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 60, b"a" * 60],
    ):
        wire = ServerWire(max_header_bytes=100)
        events = [e for piece in pieces for e in wire.receive_data(piece)]
        assert events == [
            BadRequest(HttpResponse(status=431, body=b"request header too large\n"))
        ], pieces
    # Malformed in its head, or in its body (the peer gone mid-body).
    (event,) = ServerWire().receive_data(b"\x16\x03\x01 not http\r\n\r\n")
    assert event == BadRequest(HttpResponse(status=400, body=b"malformed HTTP request\n"))
    wire = ServerWire(max_body_bytes=10)
    wire.wants_body = lambda target, headers: True
    assert wire.receive_data(_post(5) + b"he") == []
    assert wire.receive_data(None) == [
        BadRequest(HttpResponse(status=400, body=b"malformed HTTP request\n"))
    ]


@pytest.mark.parametrize(("tail", "too_big"), [(138, False), (139, True)])
def test_a_fragmented_message_counts_the_bytes_of_parts_too_short_to_measure(
    tail: int, too_big: bool
) -> None:
    """Its first part is short enough to go by characters alone (30 of them and a
    fragment's overhead, under a quarter of the limit); once the message is long enough
    to count its UTF-8 bytes, that part's 60 bytes are counted too: 60 + 64 + 2 * tail
    against the limit of 400, to the byte."""
    wire, client = opened(max_message_bytes=400)
    first = client.send(TextMessage(data="é" * 30, message_finished=False))
    assert wire.receive_data(first) == [FragmentReceived()]
    last = client.send(TextMessage(data="é" * tail, message_finished=True))
    if too_big:
        assert closing_code(wire, last) == 1009
    else:
        assert wire.receive_data(last) == [MessageReceived("é" * (30 + tail))]
