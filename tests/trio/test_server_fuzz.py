"""
Fuzzing the trio adapter end to end: arbitrary bytes (alone, or after a valid upgrade)
into :meth:`roombus.trio.Server.handle_stream` over a memory stream, on a mock clock,
then the client's end of the stream either ends or is dropped.

``handle_stream`` returns without raising, what the client read is well-formed (an HTTP
status the protocol names, or a 101 and frames with at most one valid close code), and
the server holds nothing afterwards.
"""

from __future__ import annotations

import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import trio
from roombus import BrokerConfig, ServerConfig
from roombus.trio import Server, run_server

from ..server.pipeline import (
    PEER_CLOSE_CODES,
    SERVER_CLOSE_CODES,
    HttpAnswer,
    WebSocketAnswer,
    read_answer,
)
from ..server.test_handshake_fuzz import VALID, chunked
from ..server.test_wire_fuzz import frame

#: Each example is a whole trio run: fewer of them than for the pure fuzzers.
SERVER_FUZZ = settings(max_examples=settings.default.max_examples)


async def exchange(chunks: list[bytes], ending: str, upgrade: bool = False) -> bytes:
    server = Server(
        BrokerConfig(max_message_bytes=256, send_queue_bytes=256 + 1024),
        ServerConfig(handshake_timeout=5, close_timeout=2),
    )
    received = b""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server, server)
            client, server_end = trio.testing.memory_stream_pair()
            served = trio.Event()

            async def serve() -> None:
                await server.handle_stream(server_end)  # must not raise
                served.set()

            async def read() -> None:
                nonlocal received
                try:
                    while data := await client.receive_some(65536):
                        received += data
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            nursery.start_soon(serve)
            async with trio.open_nursery() as io:
                io.start_soon(read)
                try:
                    if upgrade:
                        # As RFC 6455 4.1 says a client must: wait for the 101 first.
                        await client.send_all(VALID)
                        while b"\r\n\r\n" not in received:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    for chunk in chunks:
                        await client.send_all(chunk)
                        await trio.sleep(0.01)
                    if ending == "eof":
                        await client.send_eof()
                    elif ending == "drop":
                        await client.aclose()
                    # "silent": the client just stops; timeouts must end it.
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the server already hung up
                await served.wait()
                io.cancel_scope.cancel()
            assert server.connection_count == 0
            assert server.broker.rooms == []
            assert server.broker.statistics().connections == 0
            nursery.cancel_scope.cancel()
    return received


def run(chunks: list[bytes], ending: str, *, upgrade: bool = False) -> bytes:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(exchange, chunks, ending, upgrade, clock=clock)


def check(received: bytes, request: bytes) -> None:
    answer = read_answer(received, head=request.startswith(b"HEAD"))
    if isinstance(answer, WebSocketAnswer) and answer.close_code is not None:
        assert answer.close_code in SERVER_CLOSE_CODES | PEER_CLOSE_CODES
    assert answer is None or isinstance(answer, (HttpAnswer, WebSocketAnswer))


@SERVER_FUZZ
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=4),
    ending=st.sampled_from(["eof", "drop", "silent"]),
)
def test_the_server_answers_arbitrary_bytes_with_a_status_or_nothing(
    data: bytes, cuts: list[int], ending: str
) -> None:
    check(run(chunked(data, cuts), ending), data)


@SERVER_FUZZ
@given(
    frames=st.lists(frame(), max_size=8),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    ending=st.sampled_from(["eof", "drop", "silent"]),
)
def test_the_server_survives_random_frames_after_an_upgrade(
    frames: list[bytes], cuts: list[int], ending: str
) -> None:
    received = run(chunked(b"".join(frames), cuts), ending, upgrade=True)
    answer = read_answer(received)
    assert isinstance(answer, WebSocketAnswer)
    if answer.close_code is not None:
        assert answer.close_code in SERVER_CLOSE_CODES | PEER_CLOSE_CODES


def test_frames_pipelined_with_the_request_come_after_the_101() -> None:
    """Bytes that come with the request are handled after the upgrade (test_wire), so the
    101 must go out first, whatever those bytes make the server do."""
    bad_frame = b"\xc1\x80\x00\x00\x00\x00"  # RSV1 set: close 1002
    received = run([VALID + bad_frame], "eof")
    assert received.startswith(b"HTTP/1.1 101 ")
    answer = read_answer(received)
    assert isinstance(answer, WebSocketAnswer) and answer.close_code == 1002
