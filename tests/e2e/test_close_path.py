"""
The close path over roombus's own transports (trio, asyncio): when the server closes a
client for anything but being slow, what was already queued for it (its own echoes,
the ``error`` that explains the close) is written before the close frame.
"""

from __future__ import annotations

import json

import pytest

from .rawws import OP_BINARY, OP_CLOSE, OP_TEXT, Frame, RawWS, client_frame

pytestmark = pytest.mark.parametrize("transport", ["trio", "asyncio"], indirect=True)


def _chat(text: str) -> bytes:
    return client_frame(OP_TEXT, json.dumps({"type": "chat", "content": text}).encode())


def _until_close(ws: RawWS) -> tuple[list[dict[str, object]], Frame]:
    """Every text message up to the server's close frame, and that frame."""
    messages = []
    while True:
        frame = ws.recv_frame()
        if frame.opcode == OP_CLOSE:
            return messages, frame
        if frame.opcode == OP_TEXT:
            messages.append(json.loads(frame.payload))


BAD_FRAMES = {
    "unmasked": (client_frame(OP_TEXT, b'{"type":"ping"}', mask=False), 1002),
    "invalid utf-8": (client_frame(OP_TEXT, b"\xff\xfe"), 1007),
    "binary": (client_frame(OP_BINARY, b"\x00"), 1003),
    "bad opcode": (client_frame(0x3, b""), 1002),
}


@pytest.mark.parametrize("bad", list(BAD_FRAMES))
def test_echoes_queued_before_a_protocol_error_reach_the_sender(make_server, bad):
    server = make_server()
    observer = server.raw(username="observer")
    observer.recv_json()  # join
    observer.recv_json()  # presence_state
    sender = server.raw(username="sender")
    observer.recv_json()  # the sender's join
    sender.recv_json()
    sender.recv_json()
    frame, code = BAD_FRAMES[bad]
    sender.send_raw(_chat("a") + _chat("b") + _chat("c") + frame)
    messages, close = _until_close(sender)
    assert [m["content"] for m in messages if m["type"] == "chat"] == ["a", "b", "c"]
    assert close.close_code == code
    assert [observer.recv_json()["content"] for _ in range(3)] == ["a", "b", "c"]


def test_a_rate_limited_sender_gets_its_echoes_and_the_reason(make_server):
    server = make_server(rate_limit=1, rate_burst=5)
    observer = server.raw(username="observer")
    observer.recv_json()
    observer.recv_json()
    sender = server.raw(username="sender")
    observer.recv_json()
    sender.recv_json()
    sender.recv_json()
    # 5 accepted, then refusals until the flood closes it (twice the burst refused).
    sender.send_raw(b"".join(_chat(str(i)) for i in range(40)))
    messages, close = _until_close(sender)
    assert close.close_code == 1008
    chats = [m["content"] for m in messages if m["type"] == "chat"]
    assert chats == ["0", "1", "2", "3", "4"]
    assert any(m["type"] == "error" and m.get("code") == "rate_limited" for m in messages)
