"""
The wire layer against input meant to hurt: fragment runs, request-smuggling shapes,
codec messages in close reasons. Bytes in, bytes out, no network.
"""

from __future__ import annotations

from wsproto.events import TextMessage

from roombus._wire import (
    FRAGMENT_OVERHEAD,
    MAX_FRAGMENTS,
    Closed,
    FragmentReceived,
    MessageReceived,
    close_frame,
)

from .test_wire import closing_code, opened, raw_frame

# -- fragments: a message is bounded by its frames too -----------------------------------


def test_an_endless_run_of_empty_continuations_closes_1009() -> None:
    """FIN=0, length-0 continuation frames carry no bytes, yet each one is held: the
    message is bounded by its frames too, and the run ends with 1009 long before the
    wire holds much."""
    wire, _ = opened()
    events = wire.receive_data(raw_frame(0x1, b"a", fin=False))
    empty = raw_frame(0x0, b"", fin=False)
    sent = 0
    while not any(isinstance(e, Closed) for e in events) and sent < 50_000:
        events += wire.receive_data(empty * 10)
        sent += 10
    (closed,) = [e for e in events if isinstance(e, Closed)]
    assert closed.code == 1009 and not closed.by_peer
    assert closed.data == close_frame(1009, "message too big")
    # 64 KiB at 64 bytes a frame: about a thousand frames, nothing near the fragment cap.
    assert sent <= 65536 // FRAGMENT_OVERHEAD + 10 < MAX_FRAGMENTS
    assert len(wire._parts) <= 1


def test_each_fragment_counts_its_overhead_toward_the_size() -> None:
    wire, _ = opened(max_message_bytes=1000)
    frames = [raw_frame(0x1, b"x", fin=False)]
    frames += [raw_frame(0x0, b"x", fin=False)] * (1000 // (1 + FRAGMENT_OVERHEAD))
    code = closing_code(wire, b"".join(frames))
    assert code == 1009
    # The same bytes in one frame are far within the limit.
    wire, _ = opened(max_message_bytes=1000)
    n = len(frames)
    assert wire.receive_data(raw_frame(0x1, b"x" * n)) == [MessageReceived("x" * n)]


def test_the_fragment_cap_holds_whatever_the_size_limit() -> None:
    wire, _ = opened(max_message_bytes=10 * 1024 * 1024)
    data = raw_frame(0x1, b"", fin=False) + raw_frame(0x0, b"", fin=False) * MAX_FRAGMENTS
    assert closing_code(wire, data) == 1009


def test_a_fragmented_message_within_the_bounds_is_whole_and_each_frame_reported() -> None:
    """Every frame but the last of a fragmented message is reported (the hub charges it
    to the rate limit); the counters start again with the next message."""
    wire, client = opened()
    for _ in range(3):
        data = client.send(TextMessage(data="ab", message_finished=False))
        data += client.send(TextMessage(data="", message_finished=False))
        data += client.send(TextMessage(data="c", message_finished=True))
        assert wire.receive_data(data) == [
            FragmentReceived(),
            FragmentReceived(),
            MessageReceived("abc"),
        ]
    # A frame arriving in pieces is one fragment.
    data = client.send(TextMessage(data="x" * 100, message_finished=False))
    events = []
    for i in range(len(data)):
        events += wire.receive_data(data[i : i + 1])
    assert events.count(FragmentReceived()) == 1
    assert all(e == FragmentReceived() for e in events)


def test_invalid_utf8_says_so_in_plain_words() -> None:
    """The 1007 reason is ours, not Python's codec message."""
    for frames in (
        [raw_frame(0x1, b"ok \xff\xfe")],
        [raw_frame(0x1, b"ok", fin=False), raw_frame(0x0, b"\xed\xa0\x80")],
    ):
        wire, _ = opened()
        (event,) = [e for e in wire.receive_data(b"".join(frames)) if isinstance(e, Closed)]
        assert event.data == close_frame(1007, "invalid UTF-8")
