"""The framed hub's send queues driven by hand: bursts, the close path, the byte budget."""

from __future__ import annotations

import json

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage
from wsproto.frame_protocol import Opcode

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub

from .test_hub import connect, written


class Peer:
    """A client's wsproto connection: builds its frames, parses what the hub wrote."""

    def __init__(self) -> None:
        self.ws = Connection(ConnectionType.CLIENT)

    def chat(self, content: object) -> bytes:
        return self.ws.send(TextMessage(data=json.dumps({"type": "chat", "content": content})))

    def read(self, data: bytes) -> tuple[list[dict[str, object]], int | None]:
        """The messages in *data* (after the 101), and the close code if one came."""
        if data.startswith(b"HTTP/1.1 101"):
            data = data.partition(b"\r\n\r\n")[2]
        self.ws.receive_data(data)
        messages, code = [], None
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                messages.append(json.loads(event.data))
            elif isinstance(event, CloseConnection):
                code = event.code
        return messages, code


def chats(messages: list[dict[str, object]]) -> list[object]:
    return [m["content"] for m in messages if m["type"] == "chat"]


# -- the close path ---------------------------------------------------------------------


def test_a_rate_limited_sender_gets_its_echoes_and_the_reason_before_the_close() -> None:
    hub = Hub(BrokerConfig(rate_limit=1, rate_burst=3), ServerConfig())
    peer = Peer()
    sender = connect(hub, "lobby", "ann")
    connect(hub, "lobby", "bob")
    peer.read(written(hub)[sender])
    burst = b"".join(peer.chat(i) for i in range(20))
    hub.receive(sender, burst, now=0.0, timestamp=0)
    messages, code = peer.read(written(hub)[sender])
    assert code == 1008
    assert chats(messages) == [0, 1, 2]
    assert next(m.get("code") for m in messages if m["type"] == "error") == "rate_limited"


def test_echoes_queued_before_a_protocol_error_go_out_before_its_close() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    peer = Peer()
    sender = connect(hub, "lobby", "ann")
    peer.read(written(hub)[sender])
    bad = Connection(ConnectionType.CLIENT).send(TextMessage(data="x"))
    bad = bytes([0x80 | Opcode.BINARY]) + bad[1:]  # the same frame, as binary
    hub.receive(sender, peer.chat("a") + peer.chat("b") + bad, now=0.0, timestamp=0)
    messages, code = peer.read(written(hub)[sender])
    assert chats(messages) == ["a", "b"]
    assert code == 1003
