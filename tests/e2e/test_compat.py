"""Drop-in compatibility with clients of the original Go room broker, and no spoofing."""

from __future__ import annotations

import time

import pytest

from .rawws import OP_TEXT, RawWS, client_frame

CHAT_FIELDS = {"type", "username", "content", "room", "timestamp", "seq"}


def assert_timestamp(value: object, before: int, after: int) -> None:
    assert type(value) is int, f"timestamp must be an int, not {value!r}"
    assert before <= value <= after


def test_chat_reaches_every_member_including_sender(server):
    ann, bob, cid = server.room("lobby", "ann", "bob", "cid")
    before = int(time.time())
    ann.chat("hi")
    msgs = [c.recv() for c in (ann, bob, cid)]
    after = int(time.time()) + 1
    for msg in msgs:
        assert set(msg) >= CHAT_FIELDS
        assert msg["type"] == "chat"
        assert msg["username"] == "ann"
        assert msg["content"] == "hi"
        assert msg["room"] == "lobby"
        assert msg["seq"] == 1
        assert_timestamp(msg["timestamp"], before, after)
    assert msgs[0] == msgs[1] == msgs[2]


def test_go_style_client_sending_every_field(server):
    """The Go client marshals its whole struct: empty username/room, zero timestamp."""
    ann, bob = server.room("lobby", "ann", "bob")
    before = int(time.time())
    bob.send({"type": "chat", "username": "", "content": "x", "room": "", "timestamp": 0})
    for c in (ann, bob):
        msg = c.expect(type="chat", username="bob", content="x", room="lobby", seq=1)
        assert_timestamp(msg["timestamp"], before, int(time.time()) + 1)


def test_presence_envelope_has_the_original_fields(server):
    (ann,) = server.room("lobby", "ann")
    before = int(time.time())
    bob = server.connect("lobby", "bob")
    msg = ann.expect(
        type="presence", event="join", username="bob", room="lobby", content="bob joined the room"
    )
    assert_timestamp(msg["timestamp"], before, int(time.time()) + 1)
    bob.close()
    msg = ann.expect(
        type="presence", event="leave", username="bob", room="lobby", content="bob left the room"
    )
    assert_timestamp(msg["timestamp"], before, int(time.time()) + 1)


@pytest.mark.parametrize(
    "content",
    ["", "ünïcødé ☃ 🎉", 0, -1.5, True, None, [1, "two", {"three": 3}], {"nested": {"a": [None]}}],
    ids=repr,
)
def test_any_json_content_round_trips(server, content):
    ann, bob = server.room("lobby", "ann", "bob")
    ann.chat(content)
    for c in (ann, bob):
        msg = c.expect(type="chat", username="ann")
        assert msg["content"] == content
        assert type(msg["content"]) is type(content)


def test_unicode_username_from_percent_encoded_query(server):
    name = "Jürgen 🎉 O'Brien"
    (ann,) = server.room("lobby", "ann")
    j = server.connect("lobby", name)
    ann.expect(type="presence", event="join", username=name, content=f"{name} joined the room")
    j.chat("moin")
    ann.expect_chat("moin", name)


def test_client_offering_permessage_deflate_still_works(server):
    """Browsers offer compression; the server may decline it, but must work."""
    ann = server.connect("lobby", "ann", compression="deflate")
    bob = server.connect("lobby", "bob", compression="deflate")
    ann.expect(type="presence", event="join", username="bob")
    ann.chat("x" * 5000)
    assert bob.expect_chat("x" * 5000, "ann")["seq"] == 1


def test_frames_sent_together_with_the_handshake_are_handled(server, caps):
    """A client may pipeline its first frames right behind the opening request."""
    (ann,) = server.room("lobby", "ann")
    extra = client_frame(OP_TEXT, b'{"type":"chat","content":"early"}')
    if not caps.early_frames_safe:
        # hypercorn answers 400 to data before the upgrade, racing the app's accept;
        # when the accept wins, its own connection task fails (and with the trio worker
        # the whole server). Browsers never pipeline frames; the table says so.
        assert not caps.owns_protocol
        return
    raw = server.track(RawWS.connect(server.port, "lobby", "eager", extra=extra))
    assert raw.recv_json()["type"] == "presence"
    assert raw.recv_json()["type"] == "presence_state"
    ann.expect(type="presence", event="join", username="eager")
    try:
        first = raw.recv_json(timeout=1.0)
    except TimeoutError:
        # An ASGI server may lose what arrived with the request (uvicorn does, and reads
        # nothing more from that connection): the early chat was never published, and
        # everyone else is served on.
        assert not caps.owns_protocol
        ann.ping()
        server.assert_serving()
        return
    assert (first["type"], first["content"], first["username"]) == ("chat", "early", "eager")
    ann.expect_chat("early", "eager")


# -- spoofing ---------------------------------------------------------------------------


def test_client_cannot_spoof_username_timestamp_or_seq(server):
    ann, bob = server.room("lobby", "ann", "bob")
    before = int(time.time())
    ann.send(
        {
            "type": "chat",
            "content": "x",
            "username": "mallory",
            "room": "lobby",
            "timestamp": 12345,
            "seq": 999,
        }
    )
    ann.send(
        {
            "type": "chat",
            "content": "y",
            "username": "bob",
            "timestamp": -1,
            "seq": "nope",
            "event": "leave",
        }
    )
    for c in (ann, bob):
        m1, m2 = c.recv(), c.recv()
        assert (m1["username"], m1["seq"], m1["content"]) == ("ann", 1, "x")
        assert (m2["username"], m2["seq"], m2["content"]) == ("ann", 2, "y")
        for m in (m1, m2):
            assert m["room"] == "lobby"
            assert_timestamp(m["timestamp"], before, int(time.time()) + 1)
            assert set(m) >= CHAT_FIELDS


def test_client_cannot_publish_into_a_room_it_is_not_in(server):
    """A spoofed room is refused (not_joined), and members of that room get nothing."""
    (ann,) = server.room("lobby", "ann")
    (vip,) = server.room("vip", "vip")
    ann.chat("sneaky", room="vip")
    err = ann.expect(type="error", code="not_joined")
    assert isinstance(err["content"], str)
    vip.chat("sentinel")
    vip.expect(type="chat", content="sentinel", seq=1)  # nothing came before, seq untouched
