"""MessageQueue: the slow-consumer policy for transports that frame messages themselves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus.lowlevel import QueueState
from roombus.server.queues import CloseMessage, MessageQueue, OutMessage

BYE = CloseMessage(1008, "bye")


def drain(q: MessageQueue) -> list[OutMessage]:
    """Everything the queue has to send, one message at a time, as a driver sends it."""
    out: list[OutMessage] = []
    while q:
        for item in q.data():
            out.append(item)
            q.consume(1)
    return out


def test_messages_are_handed_out_as_a_batch_and_counted_until_sent() -> None:
    q = MessageQueue(10, 1000)
    assert q.push(b"aa")
    assert q.push(b"bbb")
    assert q.data() == [b"aa", b"bbb"]
    assert q.push(b"later")
    q.consume(1)
    assert q.data() == [b"bbb"]  # the rest of the batch first
    assert (q.messages, q.data_bytes) == (2, 8)
    q.consume(1)
    assert drain(q) == [b"later"]
    assert not q
    assert (q.messages, q.data_bytes) == (0, 0)
    assert q.data() == []


def test_overflow_drops_what_was_not_handed_out_and_the_close_follows_the_batch() -> None:
    q = MessageQueue(2, 1000)
    assert q.push(b"one")
    assert q.data() == [b"one"]  # handed out: the driver may be sending it
    assert q.push(b"two")
    assert not q.push(b"three")
    assert q.state is QueueState.OVERFLOWED
    assert (q.messages, q.data_bytes) == (1, 3)
    assert not q.push(b"four")
    assert q.close_with(BYE, drop_pending=True)
    assert not q.close_with(CloseMessage(1000, ""), drop_pending=False)
    assert q.state is QueueState.CLOSING
    assert drain(q) == [b"one", BYE]


def test_byte_bound_but_a_lone_message_always_fits() -> None:
    q = MessageQueue(10, 10)
    assert q.push(b"x" * 25)  # alone: fits, as in SendQueue
    assert not q.push(b"y")
    assert q.state is QueueState.OVERFLOWED


def test_close_keeps_pending_messages_unless_told_to_drop_them() -> None:
    q = MessageQueue(10, 1000)
    q.push(b"a")
    q.close_with(CloseMessage(1001, "going away"), drop_pending=False)
    assert not q.push(b"b")
    assert drain(q) == [b"a", CloseMessage(1001, "going away")]


def test_consume_more_than_handed_out_is_a_driver_bug() -> None:
    q = MessageQueue(10, 1000)
    q.push(b"a")
    with pytest.raises(ValueError, match="cannot consume 2 of 1"):
        q.consume(2)
    q.consume(0)
    q.consume(1)  # without data() first: the batch is taken on the way
    assert not q


@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(1, 8), st.integers(1, 200))
def test_within_bounds_and_in_order(
    payloads: list[bytes], max_messages: int, max_bytes: int
) -> None:
    q = MessageQueue(max_messages, max_bytes)
    accepted: list[bytes] = []
    for i, payload in enumerate(payloads):
        if q.push(payload):
            accepted.append(payload)
        assert q.messages <= max_messages
        assert q.data_bytes <= max(max_bytes, len(payload))
        if i % 3 == 0:  # the driver sends now and then
            sent = drain(q)
            assert sent == accepted[: len(sent)]
            accepted = accepted[len(sent) :]
    assert drain(q) == accepted or q.state is QueueState.OVERFLOWED


def test_consume_is_bounded_by_what_is_left_of_the_batch() -> None:
    """Part of a batch sent, only the rest may be reported: a driver that counts twice
    must not make the queue's counts (and the shared budget) go below zero."""
    q = MessageQueue(10, 1000)
    for payload in (b"a", b"bb", b"ccc"):
        q.push(payload)
    assert q.data() == [b"a", b"bb", b"ccc"]
    q.consume(2)
    with pytest.raises(ValueError, match="cannot consume 2 of 1 messages"):
        q.consume(2)
    assert (q.messages, q.data_bytes, q.budget.used) == (1, 3, 3)
    q.consume(1)
    assert (q.messages, q.data_bytes, q.budget.used) == (0, 0, 0)
    assert not q
