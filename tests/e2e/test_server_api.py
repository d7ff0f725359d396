"""The embedding app's side: Server.publish, the on_notice hook, handle_stream."""

from __future__ import annotations

import gc
import time

import pytest

from roombus import MessagePublished, Position, UserJoined, UserLeft


def test_publish_reaches_every_member(server):
    ann, bob = server.room("lobby", "ann", "bob")
    (other,) = server.room("other", "cid")
    before = int(time.time())
    sent = server.publish("lobby", {"alert": "maintenance at 5"})
    assert sent.delivered == 2 and sent.position is not None and sent.position.seq == 1
    for c in (ann, bob):
        msg = c.expect(
            type="chat",
            username="server",
            room="lobby",
            content={"alert": "maintenance at 5"},
            seq=1,
        )
        assert before <= msg["timestamp"] <= int(time.time()) + 1
    again = server.publish("lobby", "hi", username="bot")
    assert again.delivered == 2 and again.position == Position(sent.position.epoch, 2)
    ann.expect(type="chat", username="bot", content="hi", seq=2)
    # Clients and the server share the room's seq.
    bob.chat("me too")
    ann.expect(type="chat", username="bob", seq=3)
    other.ping()  # nothing reached the other room


def test_publish_to_an_empty_room_is_kept_for_who_joins_with_a_position(server):
    sent = server.publish("nobody-here", "hello?")
    assert sent.delivered == 0 and sent.position is not None and sent.position.seq == 1
    epoch = sent.position.epoch
    c = server.connect("nobody-here", "ann", query={"since": f"{epoch}:0"})
    c.expect(type="joined", room="nobody-here", epoch=epoch, seq=1, recovered=True)
    c.expect(type="chat", content="hello?", seq=1, replayed=True)
    c.chat("first")
    c.expect(type="chat", content="first", seq=2)


@pytest.mark.parametrize(
    ("room", "content", "kw"),
    [
        ("bad room", "x", {}),
        ("", "x", {}),
        ("lobby", object(), {}),
        ("lobby", float("nan"), {}),
        ("lobby", "x", {"username": ""}),
        ("lobby", "x", {"username": "a\nb"}),
    ],
    ids=["room-space", "room-empty", "content-object", "content-nan", "user-empty", "user-newline"],
)
def test_publish_refuses_bad_arguments(server, room, content, kw):
    (ann,) = server.room("lobby", "ann")
    with pytest.raises(ValueError):  # noqa: PT011
        server.publish(room, content, **kw)
    ann.ping()  # nothing was sent
    server.assert_serving()


def test_on_notice_sees_joins_messages_and_leaves(server):
    ann1 = server.connect("lobby", "ann")
    server.wait_notice(lambda n: n == UserJoined(room="lobby", username="ann"))
    ann2 = server.connect("lobby", "ann", expect_join=False)
    (bob,) = [server.connect("lobby", "bob")]
    for a in (ann1, ann2):
        a.expect(type="presence", event="join", username="bob")

    bob.chat({"k": [1, 2]})
    published = server.wait_notice(lambda n: isinstance(n, MessagePublished))
    assert published.room == "lobby"
    assert published.username == "bob"
    assert published.content == {"k": [1, 2]}
    assert published.seq == 1
    assert isinstance(published.timestamp, int)

    server.publish("lobby", "from the app")
    server.wait_notice(lambda n: isinstance(n, MessagePublished) and n.username == "server")

    bob.expect(type="chat", content={"k": [1, 2]})
    bob.expect(type="chat", content="from the app")
    bob.send({"type": "join", "room": "side"})
    bob.expect(type="presence", event="join", room="side")
    bob.expect(type="presence_state", room="side")
    server.wait_notice(lambda n: n == UserJoined(room="side", username="bob"))

    ann1.close()
    ann2.chat("barrier")  # once bob sees this, ann1's disconnect has been handled
    bob.expect(type="chat", content="barrier")
    assert UserLeft(room="lobby", username="ann") not in server.notices
    ann2.close()
    server.wait_notice(lambda n: n == UserLeft(room="lobby", username="ann"))
    bob.close()
    server.wait_notice(lambda n: n == UserLeft(room="side", username="bob"))

    joined = [n for n in server.notices if isinstance(n, UserJoined)]
    assert joined == [
        UserJoined(room="lobby", username="ann"),
        UserJoined(room="lobby", username="bob"),
        UserJoined(room="side", username="bob"),
    ]
    left = [n for n in server.notices if isinstance(n, UserLeft)]
    assert left == [
        UserLeft(room="lobby", username="ann"),
        UserLeft(room="lobby", username="bob"),
        UserLeft(room="side", username="bob"),
    ] or left == [
        UserLeft(room="lobby", username="ann"),
        UserLeft(room="side", username="bob"),
        UserLeft(room="lobby", username="bob"),
    ]
    assert [n.content for n in server.notices if isinstance(n, MessagePublished)] == [
        {"k": [1, 2]},
        "from the app",
        "barrier",
    ]


def test_refused_chat_is_not_a_notice(server):
    ann = server.connect("lobby", "ann")
    ann.chat("x", room="elsewhere")
    ann.expect(type="error", code="not_joined")
    ann.send("not json")
    ann.expect(type="error", code="bad_json")
    assert not [n for n in server.notices if isinstance(n, MessagePublished)]


def test_failing_on_notice_hook_is_logged_and_does_not_break_the_server(make_server):
    def hook(notice):
        raise RuntimeError("app bug")

    srv = make_server(on_notice=hook)
    ann, bob = srv.room("lobby", "ann", "bob")
    ann.chat("still delivered")
    bob.expect_chat("still delivered", "ann")
    ann.expect_chat("still delivered", "ann")
    bob.close()
    ann.expect(type="presence", event="leave", username="bob")
    ann.close()
    srv.wait_notice(lambda n: n == UserLeft(room="lobby", username="ann"))
    records = make_server.error_records
    messages = [r.getMessage() for r in records]
    assert sum("on_notice hook failed" in m for m in messages) == 5, messages
    records.clear()  # expected: do not fail the test on them


def test_connection_count(server):
    assert server.call(lambda: server.server.connection_count) == 0
    ann, bob = server.room("lobby", "ann", "bob")
    assert server.call(lambda: server.server.connection_count) == 2
    bob.close()
    ann.expect(type="presence", event="leave", username="bob")
    assert server.call(lambda: server.server.connection_count) == 1


# -- handle_stream: the server over any trio Stream -----------------------------------------


def assert_no_handle_stream(make_server, caps) -> None:
    """Only roombus.trio serves connections handed in as streams; the others own theirs."""
    assert not caps.handle_stream
    assert not hasattr(make_server().server, "handle_stream")


def test_handle_stream_over_trio_tcp(make_server, caps):
    if not caps.handle_stream:
        assert_no_handle_stream(make_server, caps)
        return
    srv = make_server(via_stream=True)
    ann, bob = srv.room("lobby", "ann", "bob")
    ann.chat("over a stream")
    bob.expect_chat("over a stream", "ann")
    ann.expect_chat("over a stream", "ann")
    bob.close()
    ann.expect(type="presence", event="leave", username="bob")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_slow_consumer_over_a_stream_does_not_crash_the_server(make_server, caps):
    """
    Regression: over handle_stream every write goes through the drainer (send_all). A
    slow consumer overflowed while its drainer was inside send_all with a chunk the
    queue had not yet seen written; the overflow dropped that chunk; when the consumer
    read again, send_all returned and consume() got more bytes than data() then had:
    ValueError, and the whole server died (as TrioInternalError, often).
    """
    if not caps.handle_stream:
        assert_no_handle_stream(make_server, caps)
        return
    srv = make_server(via_stream=True, send_queue=16, send_queue_bytes=256 * 1024)
    srv.allow_crash = True  # if it does crash: fail in the test body, clean up here
    try:
        (sender,) = srv.room("lobby", "sender")
        slow = srv.raw("lobby", "slow", rcvbuf=4096)
        sender.expect(type="presence", event="join", username="slow")
        pad = "p" * 48_000
        for i in range(200):
            sender.chat({"i": i, "pad": pad})
            msg = sender.recv()
            if msg["type"] == "presence":
                assert (msg["event"], msg["username"]) == ("leave", "slow")
                break
        else:
            pytest.fail("slow was never dropped")
        try:
            slow.wait_eof(timeout=1)  # reading lets the stuck send_all finish
        except TimeoutError:
            pass
        assert srv.alive, f"the server crashed: {srv.error!r}"
        sender.chat("after")
        while isinstance((msg := sender.expect(type="chat"))["content"], dict):
            pass  # the echo of the last flood message may still be on its way
        assert msg["content"] == "after"
        srv.assert_serving()
    finally:
        srv.close_clients()
        srv.stop()
        # A crashed trio run leaves coroutines and sockets behind, referenced from the
        # error's traceback: free them now, inside this test.
        srv.error = srv.server = srv._token = srv._scope = None
        gc.collect()
