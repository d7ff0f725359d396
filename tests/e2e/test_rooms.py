"""Several rooms per connection, isolation between rooms, ordering and seq."""

from __future__ import annotations

import threading

import pytest


def test_join_chat_leave_a_second_room(server):
    ann, carol = server.room("lobby", "ann", "carol")
    (bob,) = server.room("side", "bob")

    ann.send({"type": "join", "room": "side"})
    ann.expect(
        type="presence", event="join", username="ann", room="side", content="ann joined the room"
    )
    ann.expect(type="presence_state", room="side", users=["ann", "bob"])
    bob.expect(type="presence", event="join", username="ann", room="side")

    ann.chat("to side", room="side")
    for c in (ann, bob):
        c.expect(type="chat", username="ann", room="side", content="to side", seq=1)
    bob.chat("back")
    ann.expect(type="chat", username="bob", room="side", content="back", seq=2)
    bob.expect(type="chat", room="side", seq=2)

    # The URL's room is still the default, and has its own seq.
    ann.chat("to lobby")
    for c in (ann, carol):
        c.expect(type="chat", room="lobby", content="to lobby", seq=1)

    ann.send({"type": "leave", "room": "side"})
    bob.expect(
        type="presence", event="leave", username="ann", room="side", content="ann left the room"
    )
    ann.chat("gone?", room="side")
    ann.expect(type="error", code="not_joined")
    bob.chat("sentinel")
    bob.expect(type="chat", content="sentinel", seq=3)  # nothing from ann came in between

    # carol (lobby only) never saw any of the side room's traffic.
    ann.chat("lobby again")
    carol.expect(type="chat", content="lobby again", seq=2)


def test_connection_may_join_a_room_by_message_only(server):
    ann = server.connect("r1", "ann")
    for room in ("r2", "r3"):
        ann.send({"type": "join", "room": room})
        ann.expect(type="presence", event="join", username="ann", room=room)
        ann.expect(type="presence_state", room=room, users=["ann"])
    for room in ("r1", "r2", "r3"):
        ann.chat(room, room=room)
        ann.expect(type="chat", room=room, content=room, seq=1)


def test_joining_a_joined_room_again_only_acks(server):
    ann, bob = server.room("lobby", "ann", "bob")
    ann.send({"type": "join", "room": "lobby"})
    ann.expect(type="presence_state", room="lobby", users=["ann", "bob"])
    ann.chat("x")
    bob.expect_chat("x", "ann")  # no second join announced before it


def test_chat_to_a_room_not_joined_is_an_error_and_sends_nothing(server):
    ann, bob = server.room("lobby", "ann", "bob")
    (cid,) = server.room("other", "cid")
    ann.chat("nope", room="other")
    err = ann.expect(type="error", code="not_joined")
    assert isinstance(err["content"], str) and err["content"]
    ann.chat("yes")  # the connection is still usable, and nothing went out before
    ann.expect(type="chat", content="yes", seq=1)
    bob.expect(type="chat", content="yes", seq=1)
    cid.chat("mine")
    cid.expect(type="chat", content="mine", seq=1)  # other's seq did not move


def test_leaving_the_url_room_makes_default_chat_not_joined(server):
    ann, bob = server.room("lobby", "ann", "bob")
    ann.send({"type": "leave", "room": "lobby"})
    bob.expect(type="presence", event="leave", username="ann")
    ann.chat("hello?")
    ann.expect(type="error", code="not_joined")
    ann.send({"type": "leave", "room": "lobby"})
    ann.expect(type="error", code="not_joined")
    bob.chat("sentinel")
    bob.expect(type="chat", content="sentinel", seq=1)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "join", "room": "bad room"},
        {"type": "join", "room": ""},
        {"type": "join", "room": "r" * 65},
        {"type": "join", "room": 42},
        {"type": "join", "room": None},
        {"type": "leave", "room": "é"},
        {"type": "chat", "content": "x", "room": "no/slash"},
        {"type": "chat", "content": "x", "room": ["lobby"]},
    ],
    ids=repr,
)
def test_invalid_room_is_an_error(server, message):
    ann, bob = server.room("lobby", "ann", "bob")
    ann.send(message)
    ann.expect(type="error", code="invalid_room")
    ann.chat("ok")
    ann.expect(type="chat", content="ok", seq=1)
    bob.expect(type="chat", content="ok", seq=1)


def test_join_without_room_is_bad_message(server):
    ann = server.connect("lobby", "ann")
    ann.send({"type": "join"})
    ann.expect(type="error", code="bad_message")
    ann.send({"type": "leave"})
    ann.expect(type="error", code="bad_message")
    ann.ping()


def test_too_many_rooms_is_forbidden(make_server):
    srv = make_server(max_rooms_per_connection=2)
    ann = srv.connect("r1", "ann")
    ann.send({"type": "join", "room": "r2"})
    ann.expect(type="presence", room="r2")
    ann.expect(type="presence_state", room="r2")
    ann.send({"type": "join", "room": "r3"})
    ann.expect(type="error", code="forbidden")
    ann.send({"type": "leave", "room": "r1"})
    ann.send({"type": "join", "room": "r3"})
    ann.expect(type="presence", room="r3")


def test_rooms_are_isolated(server):
    r1 = server.room("r1", "a1", "b1")
    r2 = server.room("r2", "a2", "b2")
    for i in range(20):
        r1[0].chat(f"r1-{i}")
        r2[0].chat(f"r2-{i}")
    for clients, room in ((r1, "r1"), (r2, "r2")):
        for c in clients:
            got = [c.expect(type="chat", room=room) for _ in range(20)]
            assert [m["content"] for m in got] == [f"{room}-{i}" for i in range(20)]
            assert [m["seq"] for m in got] == list(range(1, 21))
    for c in r1 + r2:
        c.ping()  # nothing else is pending: the pong is next


def test_one_sender_order_and_seq_at_every_receiver(server):
    ann, bob, cid = server.room("lobby", "ann", "bob", "cid")
    n = 500
    for i in range(n):
        ann.chat(i)
    for c in (ann, bob, cid):
        for i in range(n):
            c.expect(type="chat", username="ann", content=i, seq=i + 1)


def test_concurrent_senders_keep_their_own_order_and_seq_has_no_gaps(server):
    senders = server.room("lobby", "s0", "s1", "s2")
    (watcher,) = server.room("lobby", "watcher")
    for s in senders:
        s.expect(type="presence", event="join", username="watcher")
    per_sender = 200
    errors: list[BaseException] = []

    def send_all(client):
        try:
            for i in range(per_sender):
                client.chat({"from": client.username, "i": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send_all, args=(s,)) for s in senders]
    for t in threads:
        t.start()
    try:
        for receiver in (watcher, *senders):
            next_i = {s.username: 0 for s in senders}
            for seq in range(1, 3 * per_sender + 1):
                msg = receiver.expect(type="chat", seq=seq)
                sender, i = msg["content"]["from"], msg["content"]["i"]
                assert msg["username"] == sender
                assert i == next_i[sender], f"{receiver.username} got {sender}'s {i} out of order"
                next_i[sender] += 1
    finally:
        for t in threads:
            t.join(10)
    assert not errors, errors
