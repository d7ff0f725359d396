"""The client's WebSocket wire: what a stream's bytes (or its end) mean."""

from __future__ import annotations

import pytest

from roombus.client.wire import ClientWire, Closed, Refused


@pytest.mark.parametrize(
    "before", [b"", b"HTTP/1.1 101 Switching Protocols\r\nUpgr", b"HTTP/1.1 200"]
)
def test_a_stream_that_ends_before_the_handshake_answer_is_a_lost_connection(
    before: bytes,
) -> None:
    wire = ClientWire("127.0.0.1:1", "/ws?room=lobby")
    assert wire.take_output().startswith(b"GET /ws?room=lobby HTTP/1.1\r\n")
    events = wire.receive(before) if before else []
    events += wire.receive(None)
    assert events == [Closed(None, "connection lost during the handshake")]
    assert wire.finished
    assert wire.receive(None) == []


def test_a_refused_handshake_gives_its_status() -> None:
    wire = ClientWire("127.0.0.1:1", "/ws?room=lobby")
    body = b'{"error": "bad room"}'
    answer = b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    events = wire.receive(answer) + wire.receive(None)
    assert [type(e) for e in events] == [Refused]
    assert events[0].status == 400  # type: ignore[union-attr]


def test_a_ping_after_our_close_is_not_answered() -> None:
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import AcceptConnection, Ping, Request
    from wsproto.handshake import H11Handshake

    wire = ClientWire("127.0.0.1:1", "/ws?room=lobby")
    server = H11Handshake(ConnectionType.SERVER)
    server.receive_data(wire.take_output())
    request = next(server.events())
    assert isinstance(request, Request)
    accepted = server.send(AcceptConnection(subprotocol="roombus"))
    assert wire.receive(accepted)  # Opened
    wire.close(1000, "bye")
    assert wire.take_output()  # our close frame
    peer = Connection(ConnectionType.SERVER)
    events = wire.receive(peer.send(Ping(b"late")))  # raised LocalProtocolError before
    assert events == []
    assert wire.take_output() == b""
