"""The limits table: close codes, dead peers, slow consumers, shutdown."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import struct
import threading
import time
import warnings

import pytest
from websockets.exceptions import ConnectionClosed

from .rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Eof,
    Frame,
    RawWS,
    client_frame,
    close_payload,
    open_socket,
    read_to_eof,
    upgrade_request,
)
from .servers import SERVER_SHUTDOWN_CODES, Capabilities


def joined_raw(srv, watcher, username="raw", room="lobby", **kw) -> RawWS:
    """A raw client in *room*, past its join and presence_state; *watcher* saw it join."""
    raw = srv.raw(room, username, **kw)
    assert raw.recv_json()["type"] == "presence"
    assert raw.recv_json()["type"] == "presence_state"
    watcher.expect(type="presence", event="join", username=username)
    return raw


def assert_closed_with(raw: RawWS, code: int, caps: Capabilities) -> None:
    """
    The server's close frame carries *code*, and then the TCP connection ends. An ASGI
    server may wait for the client's answer instead (and may not end it even then): the
    client answers and hangs up, as RFC 6455 7.1.1 allows.
    """
    if not caps.owns_protocol:
        close = raw.recv_close()
        assert close.close_code == code, close
        raw.send_frame(OP_CLOSE, close.payload[:2])
        raw.close()
        return
    frames = raw.wait_eof()
    closes = [f for f in frames if f.opcode == OP_CLOSE]
    assert closes, f"no close frame, only {frames}"
    assert closes[0].close_code == code, closes[0]
    assert frames[-1].opcode == OP_CLOSE, "nothing may follow a close frame"


def frames_until_close(raw: RawWS, timeout: float = 5.0) -> list[Frame]:
    """The frames the server sends, up to its close frame or the end of the stream."""
    deadline = time.monotonic() + timeout
    frames: list[Frame] = []
    while not frames or frames[-1].opcode != OP_CLOSE:
        try:
            frames.append(raw.recv_frame(max(deadline - time.monotonic(), 0.001)))
        except Eof:
            break
    return frames


def assert_frame_refused(
    raw: RawWS, code: int, caps: Capabilities, frames: list[Frame] | None = None
) -> None:
    """
    A frame that breaks RFC 6455: roombus closes with *code* (1002, or 1007 for bad
    UTF-8). An ASGI server parses frames itself: it may close with a code of its own
    choosing or end the connection without a close frame; the connection ends either way.
    """
    if caps.owns_protocol:
        assert_closed_with(raw, code, caps)
        return
    if frames is None:
        frames = frames_until_close(raw)
    if frames and frames[-1].opcode == OP_CLOSE:
        assert frames[-1].close_code not in (None, 1000), frames[-1]
        with contextlib.suppress(OSError):
            raw.send_frame(OP_CLOSE, frames[-1].payload[:2])
    raw.close()


# -- close codes for bad input --------------------------------------------------------------

BAD_UTF8 = [
    b'{"type":"chat","content":"\xff"}',
    b'{"type":"chat","content":"\xc0\xaf"}',  # overlong
    b'{"type":"chat","content":"\xed\xa0\x80"}',  # a surrogate
    b'{"type":"chat","content":"\xf4\x90\x80\x80"}',  # beyond U+10FFFF
]


@pytest.mark.parametrize("payload", BAD_UTF8, ids=["ff", "overlong", "surrogate", "too-high"])
def test_invalid_utf8_text_closes_1007(server, caps, payload):
    (ann,) = server.room("lobby", "ann")
    raw = joined_raw(server, ann)
    raw.send_frame(OP_TEXT, payload)
    assert_frame_refused(raw, 1007, caps)
    ann.expect(type="presence", event="leave", username="raw")
    server.assert_serving()


def test_invalid_utf8_in_a_later_fragment_closes_1007(server, caps):
    (ann,) = server.room("lobby", "ann")
    raw = joined_raw(server, ann)
    raw.send_frame(OP_TEXT, b'{"type":"chat",', fin=False)
    raw.send_frame(OP_CONT, b'"content":"\xe2\x82"}')  # a truncated euro sign
    assert_frame_refused(raw, 1007, caps)
    ann.expect(type="presence", event="leave", username="raw")


def small(make_server):
    return make_server(max_message_bytes=1024, send_queue_bytes=4096)


def chat_of_size(n: int, char: str = "x") -> bytes:
    """A chat message whose UTF-8 encoding is exactly *n* bytes."""
    head, tail = b'{"type":"chat","content":"', b'"}'
    body = n - len(head) - len(tail)
    width = len(char.encode())
    assert body % width == 0
    return head + (char * (body // width)).encode() + tail


def test_message_at_the_limit_passes_one_byte_over_closes_1009(make_server, caps):
    srv = small(make_server)
    (ann,) = srv.room("lobby", "ann")
    raw = joined_raw(srv, ann)
    raw.send_frame(OP_TEXT, chat_of_size(1024))
    assert len(raw.recv_json()["content"]) == 1024 - 28
    ann.expect(type="chat", username="raw")
    raw.send_frame(OP_TEXT, chat_of_size(1025))
    assert_closed_with(raw, 1009, caps)
    ann.expect(type="presence", event="leave", username="raw")
    srv.assert_serving()


def test_multibyte_message_over_the_limit_in_bytes_closes_1009(make_server, caps):
    """400 characters are under 1024, but 1200 UTF-8 bytes are not."""
    srv = small(make_server)
    (ann,) = srv.room("lobby", "ann")
    raw = joined_raw(srv, ann)
    raw.send_frame(OP_TEXT, chat_of_size(28 + 3 * 400, "€"))
    assert_closed_with(raw, 1009, caps)
    ann.expect(type="presence", event="leave", username="raw")


def test_fragmented_message_over_the_limit_closes_1009(make_server, caps):
    srv = small(make_server)
    (ann,) = srv.room("lobby", "ann")
    raw = joined_raw(srv, ann)
    raw.send_frame(OP_TEXT, b'{"type":"chat","content":"', fin=False)
    for _ in range(10):
        raw.send_frame(OP_CONT, b"y" * 200, fin=False)
    raw.send_frame(OP_CONT, b'"}')
    assert_closed_with(raw, 1009, caps)
    ann.expect(type="presence", event="leave", username="raw")


def test_huge_declared_length_closes_1009_without_waiting_for_the_data(make_server, caps):
    srv = small(make_server)
    (ann,) = srv.room("lobby", "ann")
    raw = joined_raw(srv, ann)
    frame = client_frame(OP_TEXT, b"x" * 2048, length=1 << 40)
    raw.send_raw(frame[: 14 + 2048])  # header, mask and the first 2 KiB only
    assert_closed_with(raw, 1009, caps)
    ann.expect(type="presence", event="leave", username="raw")


def test_websockets_client_over_the_limit_gets_1009(make_server):
    srv = small(make_server)
    ann, bob = srv.room("lobby", "ann", "bob")
    ann.chat("z" * 2000)
    with pytest.raises(ConnectionClosed) as info:
        ann.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    bob.expect(type="presence", event="leave", username="ann")


def test_binary_frame_closes_1003(server, caps):
    (ann,) = server.room("lobby", "ann")
    raw = joined_raw(server, ann)
    raw.send_frame(OP_BINARY, b'{"type":"chat","content":"x"}')
    assert_closed_with(raw, 1003, caps)
    ann.expect(type="presence", event="leave", username="raw")
    ann.ping()  # the binary frame's content was not published
    server.assert_serving()


PROTOCOL_VIOLATIONS = {
    "unmasked": lambda r: r.send_frame(OP_TEXT, b'{"type":"ping"}', mask=False),
    "reserved-opcode-3": lambda r: r.send_frame(0x3, b"x"),
    "reserved-opcode-b": lambda r: r.send_frame(0xB, b""),
    "rsv1-without-extension": lambda r: r.send_frame(OP_TEXT, b'{"type":"ping"}', rsv=4),
    "rsv3": lambda r: r.send_frame(OP_TEXT, b'{"type":"ping"}', rsv=1),
    "control-frame-too-long": lambda r: r.send_frame(OP_PING, b"p" * 126),
    "fragmented-control-frame": lambda r: r.send_frame(OP_PING, b"p", fin=False),
    "continuation-without-start": lambda r: r.send_frame(OP_CONT, b"x"),
    "text-inside-fragmented-message": lambda r: (
        r.send_frame(OP_TEXT, b'{"type":', fin=False),
        r.send_frame(OP_TEXT, b'"ping"}'),
    ),
    "close-with-1-byte-body": lambda r: r.send_frame(OP_CLOSE, b"\x03"),
    "close-code-999": lambda r: r.send_frame(OP_CLOSE, close_payload(999)),
    "close-code-1005": lambda r: r.send_frame(OP_CLOSE, close_payload(1005)),
    "close-code-1006": lambda r: r.send_frame(OP_CLOSE, close_payload(1006)),
    "non-minimal-length": lambda r: r.send_raw(
        bytes([0x81, 0x80 | 126, 0, 15]) + b"\x00\x00\x00\x00" + b'{"type":"ping"}'
    ),
}


@pytest.mark.parametrize("violate", PROTOCOL_VIOLATIONS.values(), ids=PROTOCOL_VIOLATIONS.keys())
def test_protocol_violation_closes_1002(server, caps, violate):
    (ann,) = server.room("lobby", "ann")
    raw = joined_raw(server, ann)
    violate(raw)
    if not caps.owns_protocol and violate is PROTOCOL_VIOLATIONS["non-minimal-length"]:
        # An ASGI server's frame parser may read a length in more bytes than needed as
        # it is (websockets does): then the ping passes, else the connection is refused.
        frames = []
        with contextlib.suppress(Eof):
            frames.append(raw.recv_frame(2.0))
        if frames and frames[0].opcode == OP_TEXT:
            assert json.loads(frames[0].payload) == {"type": "pong"}
            return
        if frames and frames[0].opcode != OP_CLOSE:
            frames += frames_until_close(raw)
        assert_frame_refused(raw, 1002, caps, frames)
    else:
        assert_frame_refused(raw, 1002, caps)
    ann.expect(type="presence", event="leave", username="raw")
    server.assert_serving()


# -- dead peers -------------------------------------------------------------------------------


def test_peer_that_never_answers_pings_is_dropped(make_server, caps):
    srv = make_server(ping_interval=0.3, ping_timeout=0.3, close_timeout=0.5)
    (ann,) = srv.room("lobby", "ann")  # websockets answers pings by itself
    t0 = time.monotonic()
    raw = joined_raw(srv, ann, "mute")
    if not caps.owns_protocol:
        # The ASGI server pings (the suite gives it the same interval and timeout);
        # whether it gives up on a silent peer is its choice (uvicorn does, hypercorn
        # does not). Either way roombus announces the leave once the peer is gone, and
        # ann, who answers, stays.
        assert raw.recv_frame().opcode == OP_PING
        try:
            ann.expect(timeout=2.0, type="presence", event="leave", username="mute")
            assert time.monotonic() - t0 >= 0.55  # interval + timeout, never early
        except TimeoutError:
            raw.close()
            ann.expect(type="presence", event="leave", username="mute")
        ann.chat("alive")
        ann.expect(type="chat", content="alive")
        return
    ann.expect(
        type="presence", event="leave", username="mute", room="lobby", content="mute left the room"
    )
    elapsed = time.monotonic() - t0
    assert 0.55 <= elapsed < 3.0, elapsed  # interval + timeout, never early
    frames = raw.wait_eof()
    assert frames and frames[0].opcode == OP_PING, frames  # it was pinged first
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1011, frames
    # ann, who answers, is still there after several intervals.
    ann.chat("alive")
    ann.expect(type="chat", content="alive")


def test_peer_that_answers_pings_stays(make_server):
    srv = make_server(ping_interval=0.2, ping_timeout=0.2)
    (ann,) = srv.room("lobby", "ann")
    raw = joined_raw(srv, ann, "polite")
    pings = 0
    while pings < 5:  # 5 rounds of 0.2 s: well past interval + timeout
        frame = raw.recv_frame()
        assert frame.opcode == OP_PING, frame
        raw.send_frame(OP_PONG, frame.payload)
        pings += 1
    raw.send_json({"type": "chat", "content": "still in"})
    ann.expect_chat("still in", "polite")


def test_handshake_not_completed_in_time_closes_tcp(make_server, caps):
    srv = make_server(handshake_timeout=0.3)
    (ann,) = srv.room("lobby", "ann")
    with open_socket(srv.port) as silent, open_socket(srv.port) as partial:
        partial.sendall(upgrade_request("/ws?room=lobby&username=slowpoke")[:30])
        t0 = time.monotonic()
        # Others are unaffected meanwhile: a new client joins and chats.
        bob = srv.connect("lobby", "bob")
        ann.expect(type="presence", event="join", username="bob")
        bob.chat("hi")
        ann.expect_chat("hi", "bob")
        bob.expect_chat("hi", "bob")
        if caps.owns_protocol:
            assert read_to_eof(partial, timeout=5) == b""
            assert read_to_eof(silent, timeout=5) == b""
            assert time.monotonic() - t0 >= 0.2
        else:  # the ASGI server's own request timeout, if any: never an upgrade
            for sock in (partial, silent):
                with contextlib.suppress(TimeoutError, ConnectionResetError):
                    assert not read_to_eof(sock, timeout=0.6).startswith(b"HTTP/1.1 101")
    ann.chat("after")
    bob.expect_chat("after", "ann")
    assert [n.username for n in srv.notices if type(n).__name__ == "UserJoined"] == ["ann", "bob"]


# -- slow consumers ---------------------------------------------------------------------------


def test_slow_consumer_is_closed_and_nobody_waits_for_it(make_server, caps):
    """
    A raw client joins with a tiny receive buffer and never reads; a sender floods the
    room with large messages while a receiver reads. The kernel buffers megabytes for
    the slow one, so the flood goes on until the server drops it (its leave presence),
    then a little longer. The well-behaved clients get every message, in order, quickly.
    """
    # A well-behaved sender stays at most `window` messages ahead of the readers. A
    # frame counts against the queue until its whole chunk is written, and a chunk
    # holds what was pending when it was made (at most window + 1 messages), so a
    # reader that keeps up has at most 2 * (window + 1) messages counted: 6 * 48 KiB
    # fits the 320 KiB bound however slowly the transport writes (an ASGI server's
    # sends are; the kernel takes at most socket_send_buffer). Only a reader that
    # stops reading can overflow it.
    size, window, after_drop, cap = 48 * 1024, 2, 20, 1000
    # rate_limit=0: this floods on purpose, and is about the send queue, not the limiter.
    srv = make_server(send_queue=16, send_queue_bytes=320 * 1024, close_timeout=1.0, rate_limit=0)
    sender, receiver = srv.room("lobby", "sender", "receiver")
    slow = srv.raw("lobby", "slow", rcvbuf=4096)  # joins, then never reads again
    for c in (sender, receiver):
        c.expect(type="presence", event="join", username="slow")

    errors: list[BaseException] = []
    echoes: list[int] = []
    got: list[int] = []
    progress = threading.Condition()
    slow_left = threading.Event()

    def send_all() -> None:
        try:
            pad = "p" * size
            i = 0
            stop = cap
            while i < stop:
                if slow_left.is_set():
                    stop = min(stop, i + after_drop)
                with progress:  # a well-behaved sender stays a few messages ahead
                    assert progress.wait_for(
                        lambda i=i: min(len(got), len(echoes)) >= i - window, timeout=10
                    )
                sender.chat({"i": i, "pad": pad})
                i += 1
            sender.chat({"end": i})
        except BaseException as exc:
            errors.append(exc)

    def drain_echoes() -> None:  # the sender reads its own copies, as a good client does
        try:
            while True:
                msg = sender.recv(timeout=10)
                if msg["type"] == "presence":
                    assert (msg["event"], msg["username"]) == ("leave", "slow")
                    continue
                if "end" in msg["content"]:
                    break
                with progress:
                    echoes.append(msg["content"]["i"])
                    progress.notify_all()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send_all), threading.Thread(target=drain_echoes)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        left_at = None
        while True:
            msg = receiver.recv()
            if msg["type"] == "chat":
                assert msg["seq"] == len(got) + 1
                if "end" in msg["content"]:
                    break
                with progress:
                    got.append(msg["content"]["i"])
                    progress.notify_all()
            else:
                assert msg == {**msg, "type": "presence", "event": "leave", "username": "slow"}
                left_at = len(got)
                slow_left.set()
        elapsed = time.monotonic() - t0
    finally:
        slow_left.set()
        for t in threads:
            t.join(15)
    assert not errors, errors
    assert left_at is not None, f"slow was not dropped after {cap} messages"
    assert got == list(range(len(got)))
    assert echoes == got
    assert len(got) >= left_at + after_drop
    assert elapsed < 15, f"the flood took {elapsed:.1f} s"
    assert srv.call(lambda: srv.server.overflows) == 1
    # What the slow one did get is well-formed frames, then a 1008 close or the end.
    if caps.owns_protocol:
        frames = slow.wait_eof(timeout=10)
    else:  # the server may wait for an answer to its close (uvicorn: 10 s): give it
        frames = frames_until_close(slow, timeout=10)
        if frames and frames[-1].opcode == OP_CLOSE:
            slow.send_frame(OP_CLOSE, frames[-1].payload[:2])
    assert all(f.opcode in (OP_TEXT, OP_PING, OP_CLOSE) for f in frames)
    seqs = [json.loads(f.payload).get("seq") for f in frames if f.opcode == OP_TEXT]
    chat_seqs = [s for s in seqs if s is not None]
    assert chat_seqs == list(range(1, len(chat_seqs) + 1)), "no gaps before the cut"
    closes = [f for f in frames if f.opcode == OP_CLOSE]
    if closes:
        assert closes[0].close_code == 1008
        assert frames[-1].opcode == OP_CLOSE
    srv.assert_serving()


def test_slow_consumer_that_reads_late_sees_a_1008_close(make_server):
    """Once it reads again, a slow consumer finds its backlog cut and a 1008 close."""
    srv = make_server(
        max_message_bytes=4096,
        send_queue=8,
        send_queue_bytes=16 * 1024,
        close_timeout=3.0,
        rate_limit=0,  # a flood on purpose: this is about the send queue
    )
    (sender,) = srv.room("lobby", "sender")
    slow = srv.raw("lobby", "slow", rcvbuf=4096)
    sender.expect(type="presence", event="join", username="slow")
    pad = "q" * 3000
    i = 0
    while True:  # flood until the server gives up on slow
        sender.chat({"i": i, "pad": pad})
        i += 1
        msg = sender.recv()
        if msg["type"] == "presence":
            assert (msg["event"], msg["username"]) == ("leave", "slow")
            break
        assert msg["content"]["i"] == i - 1
        assert i < 5000, "slow was never dropped"
    assert slow.close_code(timeout=5) == 1008


def test_rate_limit_refuses_then_closes_a_flooder_with_1008(make_server):
    srv = make_server(rate_limit=0.5, rate_burst=3)
    ann, bob = srv.room("lobby", "ann", "bob")
    for i in range(3):  # the burst passes
        ann.chat(i)
    for i in range(3):
        for c in (ann, bob):
            c.expect(type="chat", content=i, seq=i + 1)
    ann.chat("one too many")
    err = ann.expect(type="error", code="rate_limited")
    assert isinstance(err["content"], str)
    bob.ping()  # bob has his own allowance; and "one too many" never reached him
    for i in range(20):  # sustained flooding: refused, then closed
        try:
            ann.chat(f"flood {i}")
        except ConnectionClosed:
            break
    closed = ann.until_closed()
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    bob.expect(type="presence", event="leave", username="ann")
    bob.chat("after")
    bob.expect(type="chat", content="after", seq=4)  # none of ann's flood was published


# -- shutdown ---------------------------------------------------------------------------------


def assert_shutdown_close(caps: Capabilities, code: int | None) -> None:
    """roombus's own servers close with 1001 at a graceful shutdown; an ASGI server
    chooses its own code (``SERVER_SHUTDOWN_CODES``) or sends no close frame at all."""
    if caps.owns_protocol:
        assert code == 1001, code
    else:
        assert code is None or code in SERVER_SHUTDOWN_CODES, code


def shutdown_frames(raw: RawWS, timeout: float = 5.0) -> int | None:
    """Read *raw* up to the server's close frame (answered, as a client should) or the
    end of the stream; the close code, or None without a close frame."""
    frames = [f for f in frames_until_close(raw, timeout) if f.opcode != OP_PING]
    if frames and frames[-1].opcode == OP_CLOSE:
        with contextlib.suppress(OSError):
            raw.send_frame(OP_CLOSE, frames[-1].payload[:2])
        return frames[-1].close_code
    assert frames == [], frames
    return None


def test_shutdown_closes_everyone_with_1001(make_server, caps):
    srv = make_server(close_timeout=3.0)
    ann, bob = srv.room("lobby", "ann", "bob")
    raw = joined_raw(srv, ann)
    bob.expect(type="presence", event="join", username="raw")
    done = threading.Thread(target=srv.stop)
    t0 = time.monotonic()
    done.start()
    try:
        for c in (ann, bob):
            with pytest.raises(ConnectionClosed) as info:
                c.recv(timeout=5)
            assert_shutdown_close(caps, info.value.rcvd.code if info.value.rcvd else None)
        assert_shutdown_close(caps, shutdown_frames(raw))
    finally:
        done.join(10)
    assert not done.is_alive()
    if caps.owns_protocol:
        assert time.monotonic() - t0 < 2.0  # everyone answered: no waiting for close_timeout
    else:  # an ASGI server may wait for its graceful timeout (the suite: close_timeout)
        assert time.monotonic() - t0 < 3.0 + 2.0
    with pytest.raises(ConnectionRefusedError):
        open_socket(srv.port, timeout=1).close()


def test_shutdown_does_not_wait_forever_for_a_peer_that_ignores_close(make_server, caps):
    srv = make_server(close_timeout=0.5)
    (ann,) = srv.room("lobby", "ann")
    raw = joined_raw(srv, ann)
    took = srv.stop()
    assert took < 3.0
    frames = [f for f in raw.wait_eof() if f.opcode != OP_PING]  # raw never answered
    closes = [f.close_code for f in frames if f.opcode == OP_CLOSE]
    assert len(closes) <= 1, frames
    if closes:
        assert frames[-1].opcode == OP_CLOSE, "nothing may follow a close frame"
    assert_shutdown_close(caps, closes[0] if closes else None)


def test_handshake_arriving_during_shutdown_is_not_upgraded(make_server, caps):
    srv = make_server(close_timeout=1.0)
    (ann,) = srv.room("lobby", "ann")
    raw = joined_raw(srv, ann)
    with open_socket(srv.port) as late:
        late.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_to_eof(late).startswith(b"HTTP/1.1 200")  # accepted before the stop
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        try:
            assert_shutdown_close(caps, shutdown_frames(raw))  # the shutdown is under way
            if caps.owns_protocol:
                with pytest.raises(ConnectionRefusedError):  # the listener is gone
                    open_socket(srv.port, timeout=1).close()
            else:
                # The server closes its listener at a moment of its own choosing: the
                # kernel may still queue the connection (nobody will answer it), or the
                # listener may already be gone. Either way it is not upgraded.
                with (
                    contextlib.suppress(ConnectionRefusedError, TimeoutError),
                    open_socket(srv.port, timeout=1) as sock,
                ):
                    sock.sendall(upgrade_request("/ws?room=lobby&username=late"))
                    assert not read_to_eof(sock, timeout=1).startswith(b"HTTP/1.1 101")
        finally:
            stopper.join(10)


def test_shutdown_closes_connections_that_are_mid_handshake(make_server):
    srv = make_server(close_timeout=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with open_socket(srv.port) as half, open_socket(srv.port) as probe:
            half.sendall(b"GET /ws?room=lobby&username=half HTTP/1.1\r\nHost:")
            # Connections are accepted in order: once probe is answered, half is in.
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_to_eof(probe).startswith(b"HTTP/1.1 200")
            took = srv.stop()
            assert took < 3.0
            assert read_to_eof(half, timeout=2) == b""
        srv.server = None
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


# -- misbehaving peers never crash the server -------------------------------------------------


def _rst(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _connect_and_vanish(port):
    open_socket(port).close()


def _connect_and_reset(port):
    _rst(open_socket(port))


def _request_then_reset(port):
    s = open_socket(port)
    s.sendall(upgrade_request("/ws?room=lobby&username=x"))
    _rst(s)


def _half_request_then_close(port):
    s = open_socket(port)
    s.sendall(b"GET /ws?room=lobby&username=x HTTP/1.1\r\nHost:")
    s.close()


def _upgrade_then_reset(port):
    _rst(RawWS.connect(port, "lobby", "x").sock)


def _half_frame_then_close(port):
    with RawWS.connect(port, "lobby", "x") as r:
        r.send_raw(b"\x81\xfe\x10")


def _half_frame_then_reset(port):
    r = RawWS.connect(port, "lobby", "x")
    r.send_raw(b"\x81\xff\x00\x00\x00")
    _rst(r.sock)


def _junk_after_upgrade(port):
    with RawWS.connect(port, "lobby", "x") as r:
        r.send_raw(os.urandom(64 * 1024))
        r.wait_eof()


def _close_then_keep_sending(port):
    with RawWS.connect(port, "lobby", "x") as r:
        r.send_frame(OP_CLOSE, close_payload(1000))
        try:
            for _ in range(50):
                r.send_json({"type": "chat", "content": "after close"})
        except OSError:
            pass
        r.wait_eof()


def _many_pings_then_close(port):
    with RawWS.connect(port, "lobby", "x") as r:
        r.send_raw(client_frame(OP_PING, b"x") * 2000)


def _two_requests_in_one_packet(port):
    with open_socket(port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        read_to_eof(s)


MISBEHAVIOURS = [
    _connect_and_vanish,
    _connect_and_reset,
    _request_then_reset,
    _half_request_then_close,
    _upgrade_then_reset,
    _half_frame_then_close,
    _half_frame_then_reset,
    _junk_after_upgrade,
    _close_then_keep_sending,
    _many_pings_then_close,
    _two_requests_in_one_packet,
]


@pytest.mark.parametrize("misbehave", MISBEHAVIOURS, ids=lambda f: f.__name__.strip("_"))
def test_misbehaving_peer_never_crashes_the_server(server, misbehave):
    (ann,) = server.room("lobby", "ann")
    for _ in range(4):
        misbehave(server.port)
    server.assert_serving()
    ann.chat("still")
    # ann sees x come and go (possibly several times), then her chat.
    while (msg := ann.recv())["type"] == "presence":
        assert msg["username"] == "x"
    assert msg == {**msg, "type": "chat", "content": "still"}
