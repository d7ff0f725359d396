"""
The slow-consumer policy, twice: ``MessageQueue`` (for transports that frame messages
themselves) must decide exactly as ``SendQueue`` does, and a pong waiting to go out is
replaced by a newer one rather than piling up.

Both queues get the same random operations: push a message, hand out what is waiting
(as a driver starting a write), report it written, close (dropping what was not handed
out, or not). Their answers, states and counts must agree at every step, and
each must write out exactly the messages the policy keeps, in order.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from roombus.lowlevel import QueueState, SendQueue
from roombus.server.queues import ByteBudget, CloseMessage, MessageQueue

ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 60)),
        st.tuples(st.just("take"), st.just(0)),
        st.tuples(st.just("write"), st.integers(0, 5)),
        st.tuples(st.just("close"), st.booleans()),
    ),
    max_size=40,
)


@given(max_messages=st.integers(1, 5), max_bytes=st.integers(1, 150), ops=ops)
def test_message_queue_keeps_the_send_queue_policy(
    max_messages: int, max_bytes: int, ops: list[tuple[str, Any]]
) -> None:
    frames = SendQueue(max_messages, max_bytes, budget=ByteBudget())
    messages = MessageQueue(max_messages, max_bytes, budget=ByteBudget())
    handed: list[bytes] = []  # SendQueue: the frames of the chunk handed out, unwritten
    out_frames: list[bytes] = []
    out_messages: list[object] = []
    n = 0
    for op, arg in ops:
        if op == "push":
            n += 1
            payload = bytes([65 + n % 26]) * arg  # one letter per message, arg long
            assert frames.push(payload) == messages.push(payload)
        elif op == "take":
            # A driver starts a write of everything waiting.
            if not handed:
                chunk = bytes(frames.data())
                batch = messages.data()
                assert chunk == b"".join(m if type(m) is bytes else b"<close>" for m in batch)
                handed = [m if type(m) is bytes else b"<close>" for m in batch]
        elif op == "write":
            # The write reports what was handed out sent (or nothing, for arg 0). A
            # chunk's frames count until the whole chunk is written, a batch's messages
            # one by one (their documented granularities), so the two agree at chunk
            # ends; partly written chunks are tested in test_queues.py.
            k = len(handed) if arg else 0
            if k:
                frames.consume(sum(map(len, handed[:k])))
                messages.consume(k)
                out_frames += handed[:k]
                out_messages += handed[:k]
                handed = handed[k:]
        else:
            ok = frames.close_with(b"<close>", drop_pending=arg)
            assert ok == messages.close_with(CloseMessage(1008, "slow"), drop_pending=arg)
        assert frames.state is messages.state
        assert (frames.messages, frames.data_bytes) == (messages.messages, messages.data_bytes)
        assert frames.messages <= max_messages
        assert frames.data_bytes <= max_bytes or frames.messages == 1
        # A shared budget counts exactly what each queue still holds.
        assert frames.budget.used == frames.nbytes
        assert messages.budget.used == messages.data_bytes
    assert out_frames == out_messages


@given(st.lists(st.sampled_from(["ping", "take", "write", "data", "data"]), max_size=40))
def test_only_the_latest_pong_waits(ops: list[str]) -> None:
    """RFC 6455 5.5.3: a pong answers the latest ping; one not yet handed out is replaced,
    so a ping flood cannot grow the queue; one handed out goes out as it was. Pongs are
    not data: they never count against the bounds, and still queue after an overflow."""
    q = SendQueue(4, 1000)
    waiting: list[bytes] = []  # what the policy says must still go out, in order
    handed = b""
    for n, op in enumerate(ops, start=1):
        if op == "ping":
            pong = b"P" + b"%d" % n * (n % 3 + 1)  # pongs of different lengths
            assert q.push_pong(pong)
            # A pong not handed out yet is replaced in place; else this one queues.
            for i, frame in enumerate(waiting):
                if frame.startswith(b"P"):
                    waiting[i] = pong
                    break
            else:
                waiting.append(pong)
        elif op == "data":
            count = handed.count(b"d") + sum(f.startswith(b"d") for f in waiting)
            was_open = q.state is QueueState.OPEN
            assert q.push(b"d%03d" % n) == (was_open and count < 4)
            if was_open and count < 4:
                waiting.append(b"d%03d" % n)
            elif was_open:
                waiting = []  # the overflow drops what was not handed out
        elif op == "take" and not handed:
            handed = bytes(q.data())
            assert handed == b"".join(waiting)
            waiting = []
        elif op == "write" and handed:
            q.consume(len(handed))
            handed = b""
        data = [f for f in waiting if f.startswith(b"d")]
        assert sum(f.startswith(b"P") for f in waiting) <= 1
        assert q.nbytes == len(handed) + sum(map(len, waiting))
        assert q.messages == handed.count(b"d") + len(data)
        assert q.data_bytes == 4 * q.messages
    if handed:
        q.consume(len(handed))
    assert bytes(q.data()) == b"".join(waiting)


@given(st.integers(1, 50), st.integers(0, 50))
def test_a_frame_that_exactly_fills_the_bound_fits(first: int, room: int) -> None:
    """The byte bound is inclusive: a backlog of exactly ``max_bytes`` is allowed."""
    for queue in (SendQueue(10, first + room), MessageQueue(10, first + room)):
        assert queue.push(b"a" * first)
        if room:
            assert queue.push(b"b" * room)  # exactly at the bound
        assert not queue.push(b"c")  # one byte over
        assert queue.state is QueueState.OVERFLOWED


@given(st.binary(min_size=2, max_size=40), st.data())
def test_a_driver_cannot_report_more_than_it_was_handed(frame: bytes, data: st.DataObject) -> None:
    q = SendQueue(10, 1000)
    q.push(frame)
    chunk = bytes(q.data())
    k = data.draw(st.integers(1, len(chunk) - 1))
    q.consume(k)  # a partial write
    try:
        q.consume(len(chunk) - k + 1)
    except ValueError:
        pass
    else:
        raise AssertionError("consumed more than data() handed out")
    q.consume(len(chunk) - k)
    assert not q


queue_ops = st.lists(
    st.tuples(
        st.integers(0, 3),  # which queue
        st.sampled_from(["push", "pong", "control", "take", "write", "close", "detach"]),
        st.integers(1, 40),
    ),
    max_size=60,
)


@given(ops=queue_ops)
def test_a_shared_budget_is_the_sum_of_what_its_queues_hold(
    ops: list[tuple[int, str, int]],
) -> None:
    """Many queues (frames and messages) share one budget: at every step its ``used``
    is the sum of what the attached ones hold, whatever is pushed, written, dropped by
    an overflow or a close, or detached (a queue detached no longer counts)."""
    budget = ByteBudget()
    queues: list[SendQueue | MessageQueue] = [
        SendQueue(3, 100, budget=budget),
        SendQueue(5, 60, budget=budget),
        MessageQueue(3, 100, budget=budget),
        MessageQueue(5, 60, budget=budget),
    ]
    attached = [True] * 4
    handed: list[list[int]] = [[], [], [], []]  # sizes handed out, unwritten
    for i, op, n in ops:
        q = queues[i]
        if op == "push":
            q.push(b"x" * n)
        elif op in ("pong", "control") and isinstance(q, SendQueue):
            (q.push_pong if op == "pong" else q.push_control)(b"p" * min(n, 125))
        elif op == "take" and not handed[i]:
            if isinstance(q, SendQueue):
                data = q.data()
                handed[i] = [len(data)] if data else []
            else:
                handed[i] = [1] * len(q.data())
        elif op == "write" and handed[i]:
            q.consume(handed[i].pop())
        elif op == "close":
            if isinstance(q, SendQueue):
                q.close_with(b"C" * (n % 5), drop_pending=n % 2 == 0)
            else:
                q.close_with(CloseMessage(1008, "x"), drop_pending=n % 2 == 0)
        elif op == "detach" and attached[i]:
            q.detach()
            attached[i] = False
        held = [q.nbytes if isinstance(q, SendQueue) else q.data_bytes for q in queues]
        assert budget.used == sum(h for h, a in zip(held, attached, strict=True) if a)
