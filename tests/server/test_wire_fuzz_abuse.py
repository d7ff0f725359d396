"""
Fuzzing with the shapes an attacker sends: runs of continuation frames (empty or tiny,
with control frames in between), control-frame floods, and requests carrying
request-smuggling material (body framing on an upgrade, odd HTTP versions, bare LF,
folded headers). Through the same sans-IO pipeline as the other fuzzers.

What must hold: the answer is well-formed; a continuation run ends in 1009 once it is
over the message's bounds and holds no more than they allow meanwhile; a flood is
closed with 1008 once it is abusive, having been answered at most its allowance; a
request with smuggling material is never upgraded.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from roombus.server.wire import FRAGMENT_OVERHEAD

from .pipeline import CONFIG, MAX_MESSAGE, HttpAnswer, Pipeline, WebSocketAnswer, read_answer
from .test_handshake_fuzz import FUZZ, VALID, chunked
from .test_wire_fuzz import check
from .test_wire_fuzz import opened as opened_pipeline

MASK = b"\x00\x00\x00\x00"


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame with a zero mask; payloads under 126 bytes."""
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + MASK + payload


control = st.sampled_from([frame(0x9, b"p"), frame(0xA), frame(0x9), frame(0xA, b"u")])


@FUZZ
@given(
    first=st.binary(max_size=8).map(lambda p: p.decode("utf-8", "ignore").encode()),
    run=st.lists(
        st.tuples(st.sampled_from([b"", b"", b"", b"x", b"\xc3\xa9"]), st.none() | control),
        min_size=1,
        max_size=60,
    ),
    finish=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_continuation_runs_end_in_1009_once_over_the_bounds(
    first: bytes, run: list[tuple[bytes, bytes | None]], finish: bool, cuts: list[int]
) -> None:
    data = frame(0x1, first, fin=False)
    size = len(first) + FRAGMENT_OVERHEAD  # the bytes and frames the message is counted as
    over = size > MAX_MESSAGE
    for i, (payload, between) in enumerate(run):
        last = finish and i == len(run) - 1
        data += frame(0x0, payload, fin=last)
        size += len(payload) + (0 if last else FRAGMENT_OVERHEAD)
        over = over or size > MAX_MESSAGE
        if between is not None:
            data += between
    pipeline = opened_pipeline()
    for chunk in chunked(data, cuts):
        pipeline.feed(chunk)
        # Never more held than the bounds allow: a part per frame, each counted.
        assert len(pipeline.wire._parts) * FRAGMENT_OVERHEAD <= MAX_MESSAGE
    answer = read_answer(pipeline.out)
    assert isinstance(answer, WebSocketAnswer)
    if over:
        assert answer.close_code == 1009
    else:
        assert answer.close_code is None
        if finish:  # a whole message: it was handled (a bad_json or bad_message error)
            assert len(answer.envelopes) == 3
    pipeline.feed(None)
    check(pipeline)


@FUZZ
@given(
    frames=st.lists(control, min_size=1, max_size=8),
    repeat=st.integers(1, 1200),
    cuts=st.lists(st.integers(0, 60_000), max_size=6),
)
def test_control_floods_are_answered_within_the_allowance_then_closed(
    frames: list[bytes], repeat: int, cuts: list[int]
) -> None:
    """Pings and unsolicited pongs at one instant: each costs a message's worth of the
    rate limit (burst 2,000); once refusals reach the burst too, 1008."""
    sent = len(frames) * repeat
    pings = sum(f[0] == 0x89 for f in frames) * repeat
    pipeline = opened_pipeline()
    for chunk in chunked(b"".join(frames) * repeat, cuts):
        pipeline.feed(chunk)
    answer = read_answer(pipeline.out)
    assert isinstance(answer, WebSocketAnswer)
    burst = CONFIG.rate_burst
    assert answer.pongs <= min(pings, burst)
    if sent > 2 * burst:
        assert answer.close_code == 1008
    else:
        assert answer.close_code is None
        assert answer.pongs == min(pings, burst) or sent > burst
    pipeline.feed(None)
    check(pipeline)


SMUGGLING = [
    b"Content-Length: 0\r\n",
    b"Content-Length: 9\r\n",
    b"content-length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"X-Folded: a\r\n b\r\n",
    b"X-Folded: a\r\n\tb\r\n",
    b"X-Bare: a\n",
    b"X-Bare-Cr: a\r",
]


@FUZZ
@given(
    material=st.lists(st.sampled_from(SMUGGLING), min_size=1, max_size=3),
    where=st.integers(0, 6),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/2.0"]),
    body=st.sampled_from([b"", frame(0x1, b'{"type":"ping"}'), b"0\r\n\r\n"]),
    cuts=st.lists(st.integers(0, 400), max_size=4),
)
def test_smuggling_material_is_never_upgraded(
    material: list[bytes], where: int, version: bytes, body: bytes, cuts: list[int]
) -> None:
    head, _, _ = VALID.partition(b"\r\n\r\n")
    lines = head.replace(b"HTTP/1.1", version, 1).split(b"\r\n")
    at = 1 + where % len(lines)
    request = b"\r\n".join(lines[:at]) + b"\r\n" + b"".join(material)
    request += b"\r\n".join(lines[at:]) + (b"\r\n" if lines[at:] else b"") + b"\r\n" + body
    pipeline = Pipeline()
    for chunk in chunked(request, cuts):
        pipeline.feed(chunk)
    pipeline.feed(None)
    answer = read_answer(pipeline.out)
    # Refused with a status, or (a bare CR ending the head early) nothing at all.
    assert answer is None or isinstance(answer, HttpAnswer), answer
    if isinstance(answer, HttpAnswer):
        assert answer.status in {400, 501, 505}, answer
        assert answer.body.strip()
    assert pipeline.broker.statistics().connections == 0
