"""The slow-consumer policy: bounded, ordered, and never cut mid-frame."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus.lowlevel import QueueState, SendQueue


def drain(q: SendQueue) -> bytes:
    """Everything the queue has to write, as a driver with a fast peer would write it."""
    out = b""
    while q:
        data = q.data()
        out += data
        q.consume(len(data))
    return out


def test_frames_are_written_together_and_in_order() -> None:
    q = SendQueue(10, 1000)
    assert q.push(b"aa")
    assert q.push(b"bbb")
    assert q.push_control(b"P")
    assert q.data() == b"aabbbP"
    q.consume(3)
    assert q.push(b"later")
    assert q.data() == b"bbP"
    assert q.messages == 3  # the chunk's frames count until the chunk is written
    q.consume(3)
    assert q.messages == 1
    assert drain(q) == b"later"
    assert not q
    assert q.messages == 0
    assert q.data() == b""


def test_overflow_by_count_drops_unstarted_frames_but_keeps_a_started_one() -> None:
    q = SendQueue(2, 1000)
    assert q.push(b"12345")
    q.consume(2)  # the head is half written
    assert q.push(b"abc")
    assert not q.push(b"too many")
    assert q.state is QueueState.OVERFLOWED
    assert q.data() == b"345"
    assert not q.push(b"x")
    assert q.close_with(b"CLOSE", drop_pending=True)
    assert drain(q) == b"345CLOSE"
    assert q.state is QueueState.CLOSING
    assert not q.push_control(b"P")
    assert not q.close_with(b"again", drop_pending=False)


def test_overflow_by_bytes() -> None:
    q = SendQueue(100, 10)
    assert q.push(b"x" * 6)
    assert not q.push(b"y" * 5)
    assert q.state is QueueState.OVERFLOWED
    assert q.data() == b""


def test_one_frame_alone_always_fits() -> None:
    q = SendQueue(100, 10)
    assert q.push(b"x" * 50)  # bigger than the bound, but nothing else waits
    assert not q.push(b"y")
    assert q.state is QueueState.OVERFLOWED


def test_only_the_latest_pong_waits() -> None:
    q = SendQueue(100, 1000)
    q.push(b"data")
    for i in range(1000):
        assert q.push_pong(b"pong%d" % i)
    assert drain(q) == b"datapong999"
    q.push_pong(b"a")
    q.data()  # handed out: a later pong queues behind it, not in its place
    q.push_pong(b"b")
    assert drain(q) == b"ab"


def test_close_keeps_pending_when_asked() -> None:
    q = SendQueue(10, 100)
    q.push(b"data")
    q.close_with(b"C", drop_pending=False)
    assert drain(q) == b"dataC"


def test_consuming_more_than_pending_is_an_error() -> None:
    q = SendQueue(10, 100)
    q.push(b"ab")
    with pytest.raises(ValueError, match="consume"):
        q.consume(3)
    with pytest.raises(ValueError, match="consume"):
        q.consume(-1)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("control"), st.binary(min_size=1, max_size=4)),
        st.tuples(st.just("write"), st.integers(min_value=0, max_value=100)),
        st.tuples(st.just("take"), st.none()),
        st.tuples(st.just("close"), st.booleans()),
    ),
    max_size=60,
)


@given(max_messages=st.integers(1, 6), max_bytes=st.integers(1, 120), ops=ops)
def test_queue_against_a_model(max_messages: int, max_bytes: int, ops: list) -> None:
    """Bounds never exceeded; the bytes written are a prefix-respecting sequence of whole
    frames, in push order; after overflow, only a started frame's rest and a close follow."""
    q = SendQueue(max_messages, max_bytes)
    written = b""
    accepted: list[bytes] = []  # every frame accepted, in order
    for op, arg in ops:
        if op == "push":
            ok = q.push(arg)
            if ok:
                accepted.append(arg)
            assert ok == (q.state is QueueState.OPEN)
        elif op == "control":
            if q.push_control(arg):
                accepted.append(arg)
        elif op == "close":
            if q.close_with(b"<CLOSE>", drop_pending=arg):
                accepted.append(b"<CLOSE>")
        elif op == "take":
            written += bytes(q.take())
        else:
            data = q.data()
            n = min(arg, len(data))
            q.consume(n)
            written += data[:n]
        assert q.messages <= max_messages
        # The byte bound holds for any backlog; one frame alone always fits.
        assert q.data_bytes <= max_bytes or q.messages == 1
        assert q.nbytes >= len(q.data())
    # Whatever was written is a concatenation of accepted frames, in order, possibly
    # skipping dropped ones, and never a frame cut and followed by another.
    rest = written
    i = 0
    while rest:
        while i < len(accepted) and not (
            rest.startswith(accepted[i])
            or (len(rest) < len(accepted[i]) and accepted[i].startswith(rest))
        ):
            i += 1
        assert i < len(accepted), f"written bytes {written!r} not made of frames {accepted!r}"
        rest = rest[len(accepted[i]) :]
        i += 1


def _state(q: SendQueue) -> tuple[object, ...]:
    return (q.state, q.messages, q.data_bytes, q.nbytes, q.budget.used, bool(q))


@given(max_messages=st.integers(1, 6), max_bytes=st.integers(1, 120), ops=ops)
def test_take_is_data_consumed_in_full(max_messages: int, max_bytes: int, ops: list) -> None:
    """``take()`` hands out what ``data()`` would and leaves the queue as
    ``consume(len(data))`` would, at every step (partial writes included)."""
    a, b = SendQueue(max_messages, max_bytes), SendQueue(max_messages, max_bytes)
    for op, arg in ops:
        for q in (a, b):
            if op == "push":
                q.push(arg)
            elif op == "control":
                q.push_control(arg)
            elif op == "close":
                q.close_with(b"<CLOSE>", drop_pending=arg)
            elif op == "write":
                data = q.data()
                q.consume(min(arg, len(data)))
        if op == "take":
            expected = bytes(b.data())
            b.consume(len(expected))
            assert bytes(a.take()) == expected
        assert _state(a) == _state(b)
