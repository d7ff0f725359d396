"""
The wire layer against input meant to hurt: fragment runs, request-smuggling shapes,
codec messages in close reasons. Bytes in, bytes out, no network.
"""

from __future__ import annotations

import pytest
from wsproto.events import TextMessage

from roombus.server.handshake import HttpResponse, Upgrade, route_request
from roombus.server.wire import (
    FRAGMENT_OVERHEAD,
    MAX_FRAGMENTS,
    BadRequest,
    Closed,
    FragmentReceived,
    MessageReceived,
    RequestReceived,
    ServerWire,
    close_frame,
)

from .test_wire import REQUEST, closing_code, opened, raw_frame

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


# -- requests a proxy may read differently ----------------------------------------------

UPGRADE = REQUEST.removesuffix(b"\r\n")  # the valid upgrade, open for one more header


def answer(data: bytes, **route: object) -> int:
    """What a wire plus router answer *data* with: 101 for an upgrade, else the status."""
    wire = ServerWire()
    (event,) = wire.receive_data(data)
    if isinstance(event, BadRequest):
        return event.response.status
    assert isinstance(event, RequestReceived)
    decision = route_request(event.method, event.target, event.headers, **route)  # type: ignore[arg-type]
    return 101 if isinstance(decision, Upgrade) else decision.status


def test_the_valid_upgrade_is_upgraded() -> None:
    assert answer(REQUEST) == 101
    assert answer(REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0")) == 101


@pytest.mark.parametrize(
    "header",
    [
        b"Content-Length: 5",
        b"Content-Length: 0",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: identity",
    ],
)
def test_an_upgrade_with_a_body_is_refused_400(header: bytes) -> None:
    """The bytes after the head would be read as frames here and as a body by a proxy."""
    assert answer(UPGRADE + header + b"\r\n\r\n" + b"hello") in (400, 501)
    decision = route_request(
        b"GET", b"/ws?room=lobby&username=ann", [*_headers(REQUEST), _split(header)]
    )
    assert isinstance(decision, HttpResponse) and decision.status == 400
    assert decision.body == b"a WebSocket upgrade has no body (Content-Length, Transfer-Encoding)\n"


def test_a_plain_request_may_still_carry_a_body_length() -> None:
    """Nothing reads past a plain answer (the connection closes): no ambiguity there."""
    assert answer(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n") == 200


@pytest.mark.parametrize("version", [b"HTTP/9.9", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2"])
def test_http_versions_other_than_1_0_and_1_1_get_505(version: bytes) -> None:
    assert answer(REQUEST.replace(b"HTTP/1.1", version)) == 505
    assert answer(b"GET /healthz " + version + b"\r\nHost: x\r\n\r\n") == 505


@pytest.mark.parametrize(
    "request_bytes",
    [
        REQUEST.replace(b"\r\n", b"\n"),  # bare LF throughout
        REQUEST.replace(b"Host: x\r\n", b"Host: x\n"),  # one bare LF
        REQUEST.replace(b"\r\n\r\n", b"\r\n\n"),  # the blank line
        UPGRADE + b"X-A: 1\r\n  folded\r\n\r\n",  # obs-fold
        UPGRADE + b"X-A: 1\r\n\tfolded\r\n\r\n",
        REQUEST.replace(b"\r\nHost: x", b"\r\n Host: x"),  # space before the first header
        UPGRADE + b"X-A: 1\r\r\n\r\n",  # a bare CR
    ],
)
def test_bare_lf_bare_cr_and_obs_fold_get_400(request_bytes: bytes) -> None:
    assert answer(request_bytes) == 400
    assert answer(request_bytes.replace(b"/ws?room=lobby&username=ann", b"/healthz")) == 400


def _split(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


def _headers(request: bytes) -> list[tuple[bytes, bytes]]:
    return [_split(line) for line in request.split(b"\r\n")[1:] if line]


# -- Origin ---------------------------------------------------------------------------------

ALLOWED = frozenset({"https://ok.example"})


def _upgrade_with(*extra: tuple[bytes, bytes]) -> Upgrade | HttpResponse:
    return route_request(
        b"GET",
        b"/ws?room=lobby&username=ann",
        [*_headers(REQUEST), *extra],
        allowed_origins=ALLOWED,
    )


def test_only_sp_and_htab_are_stripped_from_an_origin() -> None:
    assert isinstance(_upgrade_with((b"origin", b"https://ok.example")), Upgrade)
    assert isinstance(_upgrade_with((b"origin", b" https://ok.example\t")), Upgrade)
    for junk in ("\xa0", "\x85", "\x0b", "\x0c", "\x1c"):
        value = ("https://ok.example" + junk).encode("latin-1")
        decision = _upgrade_with((b"origin", value))
        assert isinstance(decision, HttpResponse) and decision.status == 403, junk
        value = (junk + "https://ok.example").encode("latin-1")
        decision = _upgrade_with((b"origin", value))
        assert isinstance(decision, HttpResponse) and decision.status == 403, junk


def test_two_origin_headers_are_refused_403() -> None:
    for first, second in [
        (b"https://ok.example", b"https://evil.example"),
        (b"https://evil.example", b"https://ok.example"),
        (b"https://ok.example", b"https://ok.example"),
    ]:
        decision = _upgrade_with((b"origin", first), (b"origin", second))
        assert isinstance(decision, HttpResponse) and decision.status == 403
        assert b"more than one" in decision.body
