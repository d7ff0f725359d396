"""
Fuzzing the opening handshake: arbitrary bytes, and valid requests damaged at random,
into the wire layer and the router. The answer is always an HTTP response with a status
the protocol names, a 101 upgrade, or nothing (the peer left before a whole request);
never an exception.
"""

from __future__ import annotations

import base64
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from roombus._handshake import HttpResponse, Upgrade, route_request

from .pipeline import HttpAnswer, Pipeline, WebSocketAnswer, read_answer

#: Fuzzers get more examples than other properties (three times the profile's).
FUZZ = settings(max_examples=3 * settings.default.max_examples)

KEY = base64.b64encode(b"0123456789abcdef")
VALID = (
    b"GET /ws?room=lobby&username=ann HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n\r\n"
)
OTHER_REQUESTS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.0\r\n\r\n",
    b"GET /ws?room=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]

mutation = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 400), st.integers(0, 40)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(
        st.just("header"),
        st.integers(0, 4),
        st.binary(max_size=30)
        | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.encode),
    ),
    st.tuples(
        st.just("insert"),
        st.integers(0, 400),
        st.sampled_from(
            [
                b"\r\n",
                b"\n",
                b":",
                b" ",
                b"\x00",
                b"\xff",
                b"%",
                b"?",
                b"&room=",
                b"Upgrade: h2c\r\n",
            ]
        ),
    ),
)


HEADERS = [b"Upgrade", b"Connection", b"Sec-WebSocket-Version", b"Sec-WebSocket-Key", b"Host"]


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    for kind, at, arg in mutations:
        if kind == "header":  # replace one header's value with arbitrary bytes
            name = HEADERS[at % len(HEADERS)] + b": "
            start = data.find(name)
            if start >= 0:
                start += len(name)
                end = data.find(b"\r\n", start)
                data = data[:start] + arg + data[end if end >= 0 else len(data) :]  # type: ignore[operator]
            continue
        at = at % (len(data) + 1)
        if kind == "cut":
            data = data[:at] + data[at + arg :]  # type: ignore[operator]
        elif kind == "insert":
            data = data[:at] + arg + data[at:]  # type: ignore[operator]
        elif at < len(data):
            data = data[:at] + bytes([data[at] ^ arg]) + data[at + 1 :]  # type: ignore[operator]
    return data


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def serve(chunks: list[bytes], **route: object) -> tuple[Pipeline, bytes]:
    pipeline = Pipeline(**route)  # type: ignore[arg-type]
    for chunk in chunks:
        pipeline.feed(chunk)
    pipeline.feed(None)
    return pipeline, pipeline.out


def check(pipeline: Pipeline, out: bytes, request: bytes) -> None:
    answer = read_answer(out, head=request.startswith(b"HEAD"))
    if isinstance(answer, WebSocketAnswer):
        # Upgraded, then the stream ended: the client is gone and forgotten.
        assert answer.envelopes[-1]["type"] == "presence_state"
    # Whatever happened, nothing is left behind.
    assert pipeline.broker.statistics().connections == 0
    assert pipeline.broker.rooms == []
    # And nothing more is said once the connection is over.
    pipeline.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert pipeline.out == out


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_arbitrary_bytes_get_an_http_status_or_nothing(data: bytes, cuts: list[int]) -> None:
    pipeline, out = serve(chunked(data, cuts))
    check(pipeline, out, data)
    assert not isinstance(read_answer(out), WebSocketAnswer) or data.startswith(b"GET ")


@FUZZ
@given(
    base=st.sampled_from([VALID, VALID, *OTHER_REQUESTS]),
    mutations=st.lists(mutation, max_size=4),
    cuts=st.lists(st.integers(0, 600), max_size=6),
    origins=st.booleans(),
)
def test_damaged_requests_get_an_http_status_or_an_upgrade(
    base: bytes, mutations: list[tuple[str, int, object]], cuts: list[int], origins: bool
) -> None:
    request = mutate(base, mutations)
    route = {"allowed_origins": frozenset({"https://ok.example"})} if origins else {}
    pipeline, out = serve(chunked(request, cuts), **route)
    check(pipeline, out, request)
    answer = read_answer(out, head=request.startswith(b"HEAD"))
    if request == VALID and not origins:
        assert isinstance(answer, WebSocketAnswer)
    if isinstance(answer, HttpAnswer) and answer.status >= 400 and not request.startswith(b"HEAD"):
        assert answer.body.strip()  # a refusal says why


@FUZZ
@given(
    method=st.binary(max_size=10),
    target=st.binary(max_size=120),
    headers=st.lists(st.tuples(st.binary(max_size=24), st.binary(max_size=60)), max_size=8),
)
def test_the_router_decides_on_anything(method: bytes, target: bytes, headers: list) -> None:
    """The router itself, past h11: any method, target and header bytes at all."""
    for origins in (frozenset(), frozenset({"https://ok.example"})):
        decision = route_request(method, target, headers, allowed_origins=origins, page=b"<p>")
        assert isinstance(decision, (HttpResponse, Upgrade))
        if isinstance(decision, HttpResponse):
            assert decision.status in {200, 400, 403, 404, 405, 426}
