"""Refused messages get an error envelope and the connection stays open."""

from __future__ import annotations

import pytest

from .rawws import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, close_payload

BAD = [
    ("not json", "bad_json"),
    ("{", "bad_json"),
    ("", "bad_json"),
    ('{"type":"chat","content":NaN}', "bad_json"),
    ('{"type":"chat","content":Infinity}', "bad_json"),
    ('{"type":"chat","content":1e999}', "bad_message"),
    ('{"type":"chat","content":"x"} trailing', "bad_json"),
    ("[" * 30_000 + "]" * 30_000, "bad_json"),  # under 64 KiB, over any recursion limit
    ("[1,2]", "bad_message"),
    ('"chat"', "bad_message"),
    ("42", "bad_message"),
    ("null", "bad_message"),
    ("{}", "bad_message"),
    ('{"content":"x"}', "bad_message"),
    ('{"type":"nope"}', "bad_message"),
    ('{"type":5}', "bad_message"),
    ('{"type":null,"content":"x"}', "bad_message"),
    ('{"type":"chat"}', "bad_message"),
    ('{"type":"chat","contents":"x"}', "bad_message"),
    ('{"type":"CHAT","content":"x"}', "bad_message"),
]


@pytest.mark.parametrize(("text", "code"), BAD, ids=[t[:40] for t, _ in BAD])
def test_refused_message_gets_error_and_connection_stays_usable(server, text, code):
    ann, bob = server.room("lobby", "ann", "bob")
    ann.send(text)
    err = ann.expect(type="error", code=code)
    assert isinstance(err["content"], str) and err["content"]
    ann.chat("after")
    ann.expect(type="chat", content="after", seq=1)
    bob.expect(type="chat", content="after", seq=1)  # bob got nothing before it


def test_many_errors_in_a_row_do_not_close(server):
    ann = server.connect("lobby", "ann")
    for text, code in BAD * 3:
        ann.send(text)
        ann.expect(type="error", code=code)
    ann.ping()


def test_deeply_nested_but_parsable_content(server):
    """Content near the recursion limit: echoed or refused with bad_message, never a crash."""
    ann = server.connect("lobby", "ann")
    for depth in (100, 500, 900, 990, 2000):
        ann.send('{"type":"chat","content":' + "[" * depth + "]" * depth + "}")
        msg = ann.recv()
        if msg["type"] == "chat":
            text = msg["content"]
            for _ in range(depth - 1):
                text = text[0]
            assert text == []
        else:
            assert msg["type"] == "error"
            assert msg["code"] in ("bad_json", "bad_message")
        ann.ping()
    server.assert_serving()


def test_app_ping_gets_pong(server):
    ann, bob = server.room("lobby", "ann", "bob")
    ann.send({"type": "ping"})
    assert ann.recv() == {"type": "pong"}
    ann.send({"type": "ping", "extra": [1, 2, 3]})
    assert ann.recv() == {"type": "pong"}
    ann.chat("sentinel")
    bob.expect(type="chat", content="sentinel")  # bob never saw a pong


def test_unknown_extra_fields_are_ignored(server):
    ann = server.connect("lobby", "ann")
    ann.send({"type": "chat", "content": "x", "color": "red", "v": 2})
    msg = ann.expect(type="chat", content="x")
    assert "color" not in msg


def test_large_message_under_the_default_limit(server):
    ann, bob = server.room("lobby", "ann", "bob")
    content = "x" * (60 * 1024)
    ann.chat(content)
    assert bob.expect(type="chat")["content"] == content
    assert ann.expect(type="chat")["content"] == content


# -- frame-level behaviour that is not an error ----------------------------------------------


def test_fragmented_message_with_interleaved_ping(server):
    (ann,) = server.room("lobby", "ann")
    raw = server.raw("lobby", "frag")
    ann.expect(type="presence", event="join", username="frag")
    raw.recv_json(), raw.recv_json()  # join, presence_state
    text = '{"type":"chat","content":"fragmented ☃"}'.encode()
    raw.send_frame(OP_TEXT, text[:10], fin=False)
    raw.send_frame(OP_PING, b"mid")
    raw.send_frame(OP_CONT, text[10:22], fin=False)
    raw.send_frame(OP_CONT, text[22:], fin=True)
    pong = raw.recv_frame()
    assert (pong.opcode, pong.payload) == (OP_PONG, b"mid")
    assert raw.recv_json()["content"] == "fragmented ☃"
    ann.expect_chat("fragmented ☃", "frag")


def test_utf8_split_across_fragments_is_fine(server):
    raw = server.raw("lobby", "split")
    raw.recv_json(), raw.recv_json()
    text = '{"type":"chat","content":"€"}'.encode()
    cut = text.index("€".encode()) + 1  # in the middle of the euro sign
    raw.send_frame(OP_TEXT, text[:cut], fin=False)
    raw.send_frame(OP_CONT, text[cut:])
    assert raw.recv_json()["content"] == "€"


def test_ping_frame_gets_pong_with_same_payload(server):
    raw = server.raw("lobby", "pinger")
    raw.recv_json(), raw.recv_json()
    raw.send_frame(OP_PING, b"hello" * 25)
    frame = raw.recv_frame()
    assert (frame.opcode, frame.payload) == (OP_PONG, b"hello" * 25)


def test_unsolicited_pong_is_ignored(server):
    raw = server.raw("lobby", "ponger")
    raw.recv_json(), raw.recv_json()
    raw.send_frame(OP_PONG, b"whatever")
    raw.send_json({"type": "ping"})
    assert raw.recv_json() == {"type": "pong"}


def test_client_close_is_answered_and_others_see_leave(server):
    (ann,) = server.room("lobby", "ann")
    raw = server.raw("lobby", "leaver")
    ann.expect(type="presence", event="join", username="leaver")
    raw.send_frame(OP_CLOSE, close_payload(1000, "bye"))
    frames = raw.wait_eof()
    closes = [f for f in frames if f.opcode == OP_CLOSE]
    assert len(closes) == 1 and closes[0].close_code == 1000
    ann.expect(type="presence", event="leave", username="leaver")
