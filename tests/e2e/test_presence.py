"""Presence: what a joiner sees first, who hears of joins and leaves, and when."""

from __future__ import annotations

import threading


def test_joiner_gets_its_join_then_presence_state(server):
    (ann,) = server.room("lobby", "ann")
    bob = server.connect("lobby", "bob", expect_join=None)
    first, second = bob.recv(), bob.recv()
    assert first == {
        **first,
        "type": "presence",
        "event": "join",
        "username": "bob",
        "room": "lobby",
        "content": "bob joined the room",
    }
    assert isinstance(first["timestamp"], int)
    assert second == {"type": "presence_state", "room": "lobby", "users": ["ann", "bob"]}
    ann.expect(
        type="presence", event="join", username="bob", room="lobby", content="bob joined the room"
    )


def test_first_member_sees_only_itself(server):
    ann = server.connect("lobby", "ann", expect_join=None)
    assert ann.recv()["type"] == "presence"
    assert ann.recv() == {"type": "presence_state", "room": "lobby", "users": ["ann"]}


def test_presence_state_users_are_sorted_and_unique(server):
    names = ["zed", "Amy", "bob", "Émile", "_x", "10"]
    server.room("lobby", *names)
    server.connect("lobby", "bob", expect_join=False)  # bob's second connection
    last = server.connect("lobby", "mid", expect_join=None)
    last.expect(type="presence", event="join", username="mid")
    state = last.expect(type="presence_state", room="lobby")
    assert state["users"] == sorted([*names, "mid"])


def test_presence_state_comes_before_any_chat_while_the_room_is_busy(server):
    """A joiner sees join, presence_state, then chats with gap-free seq, under traffic."""
    (ann,) = server.room("lobby", "ann")
    total = 400
    bob_in = threading.Event()
    errors: list[BaseException] = []

    def chatter() -> None:
        try:
            for i in range(total):
                if i == total // 2:
                    assert bob_in.wait(5)
                ann.chat(i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=chatter)
    t.start()
    try:
        bob = server.connect("lobby", "bob", expect_join=None)
        bob_in.set()
        bob.expect(type="presence", event="join", username="bob")
        bob.expect(type="presence_state", room="lobby", users=["ann", "bob"])
        first = bob.expect(type="chat", username="ann")
        assert first["content"] <= total // 2  # bob was in before the second half
        expected = first["seq"]
        assert first["content"] == expected - 1
        while expected < total:
            expected += 1
            bob.expect(type="chat", seq=expected, content=expected - 1)
    finally:
        bob_in.set()
        t.join(10)
    assert not errors, errors
    # ann's own view: every chat, with bob's join somewhere in between.
    seen = [ann.recv() for _ in range(total + 1)]
    assert [m["seq"] for m in seen if m["type"] == "chat"] == list(range(1, total + 1))
    assert [m["username"] for m in seen if m["type"] == "presence"] == ["bob"]


def test_second_connection_of_a_user_is_silent_and_leave_waits_for_the_last(server):
    ann1, bob = server.room("lobby", "ann", "bob")
    ann2 = server.connect("lobby", "ann", expect_join=False)  # presence_state only
    # bob heard no second join: the next thing bob gets is this chat.
    ann2.chat("from tab 2")
    bob.expect_chat("from tab 2", "ann")
    ann1.expect_chat("from tab 2", "ann")  # both tabs get it
    ann2.expect_chat("from tab 2", "ann")

    ann1.close()  # ann is still present through ann2: no leave
    ann2.chat("still here")
    bob.expect_chat("still here", "ann")
    ann2.expect_chat("still here", "ann")

    ann2.close()  # the last one: now bob hears the leave
    msg = bob.expect(
        type="presence", event="leave", username="ann", room="lobby", content="ann left the room"
    )
    assert isinstance(msg["timestamp"], int)


def test_leave_goes_to_the_rest_only(server):
    ann, bob, cid = server.room("lobby", "ann", "bob", "cid")
    bob.close()
    for c in (ann, cid):
        c.expect(type="presence", event="leave", username="bob")
    cid.send({"type": "leave", "room": "lobby"})
    ann.expect(type="presence", event="leave", username="cid")
    cid.ping()  # cid got no presence about itself before the pong
    ann.chat("only me")
    ann.expect_chat("only me", "ann")


def test_rejoin_after_leave_announces_again(server):
    ann, bob = server.room("lobby", "ann", "bob")
    bob.send({"type": "leave", "room": "lobby"})
    ann.expect(type="presence", event="leave", username="bob")
    bob.send({"type": "join", "room": "lobby"})
    bob.expect(type="presence", event="join", username="bob", room="lobby")
    bob.expect(type="presence_state", room="lobby", users=["ann", "bob"])
    ann.expect(type="presence", event="join", username="bob")


def test_abrupt_disconnect_sends_leave(server):
    """A client that vanishes without a close frame still leaves the room."""
    (ann,) = server.room("lobby", "ann")
    raw = server.raw("lobby", "ghost")
    ann.expect(type="presence", event="join", username="ghost")
    raw.close()
    ann.expect(type="presence", event="leave", username="ghost")
