"""The broker as transcripts: events in, actions out, no I/O."""

from __future__ import annotations

import pytest

from roombus import (
    LocalProtocolError,
    MessagePublished,
    RoomName,
    UserJoined,
    UserLeft,
    Username,
)
from roombus.core.streams import Position
from roombus.lowlevel import (
    PING_TIMEOUT_CODE,
    Broker,
    ClientConnected,
    Close,
    ConnectionId,
    PongReceived,
    SendPing,
)

from ..helpers import TS, cid, connect, deliveries, disconnect, inbox, make_broker, send


def test_first_join_sends_presence_then_state() -> None:
    b = Broker()
    actions = connect(b, 1, "ann")
    assert deliveries(actions) == [
        (
            (1,),
            {
                "type": "presence",
                "event": "join",
                "username": "ann",
                "content": "ann joined the room",
                "room": "lobby",
                "timestamp": TS,
            },
        ),
        ((1,), {"type": "presence_state", "room": "lobby", "users": ["ann"]}),
    ]
    assert UserJoined(room=RoomName("lobby"), username=Username("ann")) in actions


def test_second_user_join_reaches_everyone_and_state_is_sorted() -> None:
    b = Broker()
    connect(b, 1, "zed")
    actions = connect(b, 2, "ann")
    assert deliveries(actions)[0][0] == (1, 2)
    assert deliveries(actions)[0][1]["event"] == "join"
    assert inbox(actions, 2)[-1] == {
        "type": "presence_state",
        "room": "lobby",
        "users": ["ann", "zed"],
    }
    assert inbox(actions, 1) == [deliveries(actions)[0][1]]


def test_presence_is_per_user_not_per_connection() -> None:
    b = Broker()
    connect(b, 1, "ann")
    connect(b, 2, "bob")
    second_tab = connect(b, 3, "ann")
    # No join event for a user already present: only the state, to the new tab.
    assert deliveries(second_tab) == [
        ((3,), {"type": "presence_state", "room": "lobby", "users": ["ann", "bob"]})
    ]
    assert not any(isinstance(a, UserJoined) for a in second_tab)
    # One tab closing: ann stays present, nobody is told anything.
    assert disconnect(b, 1) == []
    assert b.members("lobby") == ["ann", "bob"]
    # The last tab closing: leave to the rest.
    last = disconnect(b, 3)
    assert deliveries(last) == [
        (
            (2,),
            {
                "type": "presence",
                "event": "leave",
                "username": "ann",
                "content": "ann left the room",
                "room": "lobby",
                "timestamp": TS,
            },
        )
    ]
    assert UserLeft(room=RoomName("lobby"), username=Username("ann")) in last


def test_empty_rooms_are_freed() -> None:
    b = Broker()
    connect(b, 1, "ann")
    send(b, 1, {"type": "join", "room": "other"})
    assert b.rooms == ["lobby", "other"]
    assert disconnect(b, 1) == [
        UserLeft(room=RoomName("lobby"), username=Username("ann")),
        UserLeft(room=RoomName("other"), username=Username("ann")),
    ]
    assert b.rooms == []
    assert b.statistics().connections == 0
    assert b.next_deadline() is None


def test_chat_reaches_every_member_with_server_fields() -> None:
    b = Broker()
    connect(b, 1, "ann")
    connect(b, 2, "bob")
    actions = send(
        b,
        1,
        {"type": "chat", "content": "hi", "username": "eve", "room": "", "seq": 99, "timestamp": 1},
    )
    assert deliveries(actions) == [
        (
            (1, 2),
            {
                "type": "chat",
                "username": "ann",
                "content": "hi",
                "room": "lobby",
                "timestamp": TS,
                "seq": 1,
            },
        )
    ]
    assert actions[-1] == MessagePublished(
        room=RoomName("lobby"),
        username=Username("ann"),
        content="hi",
        seq=1,
        timestamp=TS,
        epoch=b.position("lobby").epoch,
    )
    second = send(b, 2, {"type": "chat", "content": {"any": ["json", 1, None]}})
    assert deliveries(second)[0][1]["seq"] == 2
    assert deliveries(second)[0][1]["content"] == {"any": ["json", 1, None]}


def test_several_rooms_and_isolation() -> None:
    b = Broker()
    connect(b, 1, "ann")
    connect(b, 2, "bob", room="other")
    joined = send(b, 1, {"type": "join", "room": "other"})
    assert [e["type"] for e in inbox(joined, 1)] == ["presence", "presence_state"]
    in_other = send(b, 1, {"type": "chat", "room": "other", "content": "x"})
    assert deliveries(in_other)[0][0] == (2, 1)
    in_lobby = send(b, 1, {"type": "chat", "content": "y"})
    assert deliveries(in_lobby)[0][0] == (1,)
    refused = send(b, 2, {"type": "chat", "room": "lobby", "content": "z"})
    assert deliveries(refused) == [
        ((2,), {"type": "error", "code": "not_joined", "content": "not in room 'lobby'"})
    ]
    assert b.seq("lobby") == 1
    left = send(b, 1, {"type": "leave", "room": "other"})
    assert inbox(left, 2)[0]["event"] == "leave"
    assert inbox(left, 1) == []
    assert (
        deliveries(send(b, 1, {"type": "chat", "room": "other", "content": 1}))[0][1]["code"]
        == "not_joined"
    )


def test_rejoining_a_joined_room_answers_with_state_only() -> None:
    b = Broker()
    connect(b, 1, "ann")
    assert deliveries(send(b, 1, {"type": "join", "room": "lobby"})) == [
        ((1,), {"type": "presence_state", "room": "lobby", "users": ["ann"]})
    ]


def test_default_room_after_leaving_it_is_not_joined() -> None:
    b = Broker()
    connect(b, 1, "ann")
    send(b, 1, {"type": "leave", "room": "lobby"})
    assert b.rooms == []
    assert inbox(send(b, 1, {"type": "chat", "content": "x"}), 1)[0]["code"] == "not_joined"


def test_connect_without_a_room() -> None:
    b = Broker()
    assert connect(b, 1, "ann", room=None) == []
    assert inbox(send(b, 1, {"type": "chat", "content": "x"}), 1)[0]["code"] == "not_joined"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "bad_json"),
        ("", "bad_json"),
        ("[1,2]", "bad_message"),
        ('"chat"', "bad_message"),
        ("{}", "bad_message"),
        ('{"type": 3}', "bad_message"),
        ('{"type": "dance"}', "bad_message"),
        ('{"type": "chat"}', "bad_message"),
        ('{"type": "join"}', "bad_message"),
        ('{"type": "join", "room": "no spaces"}', "invalid_room"),
        ('{"type": "join", "room": 5}', "invalid_room"),
        ('{"type": "leave", "room": "x" }', "not_joined"),
        ('{"type": "chat", "content": 1, "room": "a/b"}', "invalid_room"),
        ('{"type": "chat", "content": NaN}', "bad_json"),
        ('{"type": "chat", "content": 1e999}', "bad_message"),
        ("[" * 100_000, "bad_json"),
    ],
)
def test_refused_messages_get_an_error_and_change_nothing(text: str, code: str) -> None:
    b = Broker()
    connect(b, 1, "ann")
    connect(b, 2, "bob")
    actions = send(b, 1, text)
    assert len(actions) == 1
    ((receivers, envelope),) = deliveries(actions)
    assert receivers == (1,)
    assert envelope["type"] == "error"
    assert envelope["code"] == code
    assert isinstance(envelope["content"], str)
    assert b.seq("lobby") == 0
    assert b.rooms_of(cid(1)) == ["lobby"]


def test_app_ping_is_answered_with_pong() -> None:
    b = Broker()
    connect(b, 1, "ann")
    assert deliveries(send(b, 1, {"type": "ping"})) == [((1,), {"type": "pong"})]


def test_room_limit_per_connection() -> None:
    b = make_broker(max_rooms_per_connection=2)
    connect(b, 1, "ann")
    send(b, 1, {"type": "join", "room": "r2"})
    refused = send(b, 1, {"type": "join", "room": "r3"})
    assert inbox(refused, 1)[0]["code"] == "forbidden"
    assert b.rooms_of(cid(1)) == ["lobby", "r2"]


def test_heartbeat_pings_then_closes_a_silent_peer() -> None:
    b = make_broker(ping_interval=20, ping_timeout=10)
    connect(b, 1, "ann", now=0)
    connect(b, 2, "bob", now=5)
    assert b.next_deadline() == 20
    assert b.handle_timeout(now=19.9, timestamp=TS) == []
    assert b.handle_timeout(now=20, timestamp=TS) == [SendPing(conn=cid(1))]
    assert b.next_deadline() == 25
    assert b.handle_timeout(now=25, timestamp=TS) == [SendPing(conn=cid(2))]
    b.handle(PongReceived(conn=cid(2)), now=26, timestamp=TS)
    assert b.next_deadline() == 30
    actions = b.handle_timeout(now=30, timestamp=TS)
    assert actions[0] == Close(conn=cid(1), code=PING_TIMEOUT_CODE, reason="ping timeout")
    assert inbox(actions, 2)[0]["event"] == "leave"
    assert cid(1) not in b
    assert b.next_deadline() == 46


def test_a_late_timer_pings_a_peer_never_pinged_rather_than_closing_it() -> None:
    b = make_broker(ping_interval=1, ping_timeout=1)
    connect(b, 1, "ann")
    assert b.handle_timeout(now=100, timestamp=TS) == [SendPing(conn=cid(1))]
    assert b.next_deadline() == 101
    b.handle(PongReceived(conn=cid(1)), now=100.5, timestamp=TS)
    assert cid(1) in b


def test_after_a_stall_every_pinged_peer_gets_a_full_timeout_to_answer() -> None:
    b = make_broker(ping_interval=20, ping_timeout=10)
    connect(b, 1, "ann", now=0)
    connect(b, 2, "bob", now=5)
    assert b.handle_timeout(now=20, timestamp=TS) == [SendPing(conn=cid(1))]
    assert b.handle_timeout(now=25, timestamp=TS) == [SendPing(conn=cid(2))]
    # Stopped from 26 to 33: ann's give-up instant (30) passed meanwhile; bob's (35)
    # did not, but his pong may be waiting unread as well.
    assert b.handle_timeout(now=33, timestamp=TS) == []
    assert b.next_deadline() == 35
    assert b.handle_timeout(now=35, timestamp=TS) == []
    assert b.next_deadline() == 43
    b.handle(PongReceived(conn=cid(2)), now=35.1, timestamp=TS)  # read after the stall
    actions = b.handle_timeout(now=43, timestamp=TS)
    assert actions[0] == Close(conn=cid(1), code=PING_TIMEOUT_CODE, reason="ping timeout")
    assert cid(2) in b


def test_a_timer_a_little_late_is_not_a_stall() -> None:
    b = make_broker(ping_interval=20, ping_timeout=10)
    connect(b, 1, "ann", now=0)
    b.handle_timeout(now=20, timestamp=TS)
    actions = b.handle_timeout(now=30.5, timestamp=TS)  # within min(1 s, timeout / 2)
    assert actions[0] == Close(conn=cid(1), code=PING_TIMEOUT_CODE, reason="ping timeout")


def test_events_for_unknown_connections_are_ignored() -> None:
    b = Broker()
    assert send(b, 9, {"type": "chat", "content": 1}) == []
    assert b.handle(PongReceived(conn=cid(9)), now=0, timestamp=TS) == []
    assert disconnect(b, 9) == []


def test_connecting_an_id_twice_is_a_driver_error() -> None:
    b = Broker()
    connect(b, 1, "ann")
    with pytest.raises(LocalProtocolError):
        b.handle(ClientConnected(conn=ConnectionId(1), username=Username("x")), now=0, timestamp=TS)
    with pytest.raises(LocalProtocolError):
        b.handle("nonsense", now=0, timestamp=TS)  # type: ignore[arg-type]


def test_server_publish() -> None:
    b = Broker()
    # Nobody is in the room: nothing is delivered, but the message is numbered and
    # kept, for clients that join with a position.
    (notice,) = b.publish("lobby", "nobody here", username="server", timestamp=TS)
    assert isinstance(notice, MessagePublished) and notice.seq == 1
    assert b.position("lobby") == Position(notice.epoch, 1)
    connect(b, 1, "ann")
    actions = b.publish("lobby", {"n": 1}, username="server", timestamp=TS)
    assert deliveries(actions)[0][1] == {
        "type": "chat",
        "username": "server",
        "content": {"n": 1},
        "room": "lobby",
        "timestamp": TS,
        "seq": 2,
    }
    with pytest.raises(ValueError, match="room"):
        b.publish("bad room", 1, username="server", timestamp=TS)
    with pytest.raises(ValueError, match="username"):
        b.publish("lobby", 1, username="", timestamp=TS)
    with pytest.raises(ValueError, match="JSON"):
        b.publish("lobby", object(), username="server", timestamp=TS)


def test_statistics_count_traffic() -> None:
    b = Broker()
    connect(b, 1, "ann")
    connect(b, 2, "bob")
    send(b, 1, {"type": "chat", "content": "x"})
    stats = b.statistics()
    assert (stats.connections, stats.rooms, stats.messages_published) == (2, 1, 1)
    # ann: join+state; bob's join to both + bob's state; the chat to both.
    assert stats.deliveries == 2 + 3 + 2


def test_many_pongs_do_not_grow_timer_state_without_bound() -> None:
    b = make_broker(ping_interval=20, ping_timeout=10)
    connect(b, 1, "ann")
    for i in range(10_000):
        b.handle(PongReceived(conn=cid(1)), now=i * 0.001, timestamp=TS)
    assert len(b._timers) < 100
    assert b.next_deadline() == pytest.approx(9.999 + 20)


def test_joining_a_crowd_does_not_encode_the_member_list_again_per_join(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    N joins cost N presence broadcasts (to up to N members each: inherent), but each
    joiner's presence_state is built from pieces the room keeps, not by sorting and
    JSON-encoding all N names again: what is JSON-encoded grows with N, not N^2.
    """
    from roombus.core import codec as _codec

    encoded = 0
    dumps = _codec._dumps

    def counting(obj: object) -> str:
        nonlocal encoded
        text = dumps(obj)
        encoded += len(text)
        return text

    monkeypatch.setattr(_codec, "_dumps", counting)
    b = make_broker(max_connections_per_room=0)
    n = 1000
    for i in range(n):
        actions = connect(b, i, f"user{i:04}")
    state = inbox(actions, n - 1)[-1]
    assert state["type"] == "presence_state"
    assert state["users"] == [f"user{i:04}" for i in range(n)]
    assert encoded < 200 * n  # the join envelopes; the states would add ~5,000 * n


def test_the_tables_shrink_after_a_crowd_leaves() -> None:
    """A dict never shrinks by deletions: after most connections leave, the broker's
    and the room's tables are copied smaller, and stale timer entries dropped."""
    import sys

    b = make_broker(max_connections_per_room=0)
    n = 2000
    for i in range(n):
        connect(b, i, f"user{i}")
    small = sys.getsizeof(dict.fromkeys(range(256)))  # what a table of 256 takes
    for i in range(n - 3):
        disconnect(b, i)
    room = b._registry.rooms[RoomName("lobby")]
    for table in (b._conns, room.members, room.users):
        assert sys.getsizeof(table) <= small
    assert len(b._timers) <= 2 * 3 + 64
    assert b.members("lobby") == sorted(f"user{i}" for i in range(n - 3, n))
