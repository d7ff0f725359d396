"""
Protocol v2 in the core: joins with a position, replay, acknowledged and idempotent
publish, history on demand.

The property at the end is the promise itself: a client that leaves and comes back
with the last position it saw, at random moments, sees every message exactly once, or
is told exactly which ones it will not see (``lost``, ``skipped``) and why.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from roombus import BrokerConfig, RoomName, Username
from roombus.core.actions import MessagePublished
from roombus.core.errors import ConfigError
from roombus.core.streams import RoomPolicy
from roombus.lowlevel import Broker, ClientConnected

from ..helpers import TS, cid, connect, disconnect, inbox, make_broker, send


def chat(content: object, **extra: object) -> dict[str, object]:
    return {"type": "chat", "content": content, **extra}


def join(room: str, since: object, **extra: object) -> dict[str, object]:
    return {"type": "join", "room": room, "since": since, **extra}


def test_a_v1_join_gets_no_joined() -> None:
    b = make_broker()
    connect(b, 1, "ann", room=None)
    out = inbox(send(b, 1, {"type": "join", "room": "lobby"}), 1)
    assert [e["type"] for e in out] == ["presence", "presence_state"]


def test_since_null_tells_the_position_and_nothing_else() -> None:
    b = make_broker()
    connect(b, 1, "ann")
    send(b, 1, chat("a"))
    send(b, 1, chat("b"))
    connect(b, 2, "bob", room=None)
    out = inbox(send(b, 2, join("lobby", None)), 2)
    assert [e["type"] for e in out] == ["presence", "presence_state", "joined"]
    epoch = b.position("lobby").epoch
    assert out[-1] == {"type": "joined", "room": "lobby", "epoch": epoch, "seq": 2}


def test_a_rejoin_replays_what_was_missed_then_goes_live() -> None:
    b = make_broker()
    connect(b, 1, "ann")
    connect(b, 2, "bob")
    send(b, 1, chat("one"))
    epoch = b.position("lobby").epoch
    disconnect(b, 2)
    send(b, 1, chat("two"))
    send(b, 1, chat("three"))
    connect(b, 3, "bob", room=None)
    out = inbox(send(b, 3, join("lobby", {"epoch": epoch, "seq": 1})), 3)
    assert out[2] == {
        "type": "joined",
        "room": "lobby",
        "epoch": epoch,
        "seq": 3,
        "recovered": True,
    }
    assert [(e["content"], e["seq"], e.get("replayed")) for e in out[3:]] == [
        ("two", 2, True),
        ("three", 3, True),
    ]
    live = inbox(send(b, 1, chat("four")), 3)
    assert [(e["seq"], "replayed" in e) for e in live] == [(4, False)]


def test_the_url_form_joins_with_a_position() -> None:
    b = make_broker()
    connect(b, 1, "ann")
    send(b, 1, chat("one"))
    epoch = b.position("lobby").epoch
    actions = b.handle(
        ClientConnected(
            conn=cid(2),
            username=Username("bob"),
            room=RoomName("lobby"),
            positioned=True,
            since=b.position("lobby").__class__(epoch, 0),
        ),
        now=0.0,
        timestamp=TS,
    )
    out = inbox(actions, 2)
    assert out[2]["recovered"] is True and [e["content"] for e in out[3:]] == ["one"]


@pytest.mark.parametrize(
    ("since", "reason", "extra"),
    [
        ({"epoch": "gone", "seq": 1}, "epoch_changed", {}),
        ("future", "future_position", {}),
    ],
)
def test_positions_that_cannot_be_recovered_are_told(
    since: Any, reason: str, extra: dict[str, Any]
) -> None:
    b = make_broker()
    connect(b, 1, "ann")
    send(b, 1, chat("one"))
    if since == "future":
        since = {"epoch": b.position("lobby").epoch, "seq": 5}
    out = inbox(send(b, 1, join("lobby", since)), 1)
    joined = out[-1]
    assert joined["type"] == "joined" and joined["recovered"] is False
    assert joined["reason"] == reason and "lost" not in joined


def test_too_old_names_the_lost_range_and_partial_replays_the_rest() -> None:
    b = make_broker(history_size=3)
    connect(b, 1, "ann")
    epoch = b.position("lobby").epoch
    for n in range(1, 8):
        send(b, 1, chat(n))
    out = inbox(send(b, 1, join("lobby", {"epoch": epoch, "seq": 1})), 1)
    assert out[-1]["reason"] == "too_old" and out[-1]["lost"] == {"from": 2, "to": 4}
    assert [e for e in out if e["type"] == "chat"] == []
    out = inbox(send(b, 1, join("lobby", {"epoch": epoch, "seq": 1}, partial=True)), 1)
    assert out[-1 - 3]["lost"] == {"from": 2, "to": 4}
    assert [e["seq"] for e in out if e["type"] == "chat"] == [5, 6, 7]


def test_over_limit_and_no_history() -> None:
    b = make_broker(history_size=10, recovery_max=2)
    connect(b, 1, "ann")
    epoch = b.position("lobby").epoch
    for n in range(1, 6):
        send(b, 1, chat(n))
    joined = inbox(send(b, 1, join("lobby", {"epoch": epoch, "seq": 0})), 1)[-1]
    assert joined["reason"] == "over_limit" and "lost" not in joined
    out = inbox(send(b, 1, join("lobby", {"epoch": epoch, "seq": 0}, partial=True)), 1)
    chats = [e for e in out if e["type"] == "chat"]
    assert [e["seq"] for e in chats] == [4, 5] and all(e["replayed"] for e in chats)
    assert next(e for e in out if e["type"] == "joined")["skipped"] == {"from": 1, "to": 3}

    off = make_broker(room_history=(("quiet-*", RoomPolicy(size=0, ttl=60.0)),))
    connect(off, 1, "ann", room="quiet-1")
    epoch = off.position("quiet-1").epoch
    send(off, 1, chat("x", room="quiet-1"))
    joined = inbox(send(off, 1, join("quiet-1", {"epoch": epoch, "seq": 0})), 1)[-1]
    assert joined["reason"] == "no_history" and joined["lost"] == {"from": 1, "to": 1}


def test_an_acknowledged_chat_is_published_once() -> None:
    b = make_broker()
    connect(b, 1, "ann")
    connect(b, 2, "bob")
    first = send(b, 1, chat("hi", id="m-1"))
    epoch = b.position("lobby").epoch
    assert [e["type"] for e in inbox(first, 1)] == ["chat", "ack"]
    ack = {"type": "ack", "id": "m-1", "room": "lobby", "epoch": epoch, "seq": 1}
    assert inbox(first, 1)[1] == ack
    # Every receiver gets the sender's id with the chat (its dedup key across epochs).
    assert inbox(first, 1)[0]["id"] == "m-1" and inbox(first, 2)[0]["id"] == "m-1"
    assert "id" not in inbox(send(b, 2, chat("no id")), 1)[0]
    # The resend (after a reconnect, say) gets the first ack and publishes nothing.
    disconnect(b, 1)
    connect(b, 3, "ann")
    again = send(b, 3, chat("hi", id="m-1"))
    assert inbox(again, 3) == [ack] and inbox(again, 2) == []
    assert not any(isinstance(a, MessagePublished) for a in again)
    # Another user's id is their own.
    other = send(b, 2, chat("hi", id="m-1"))
    assert inbox(other, 2)[-1]["seq"] == 3


def test_a_duplicate_after_the_window_is_published_again() -> None:
    b = make_broker(dedup_window=10.0)
    connect(b, 1, "ann")
    send(b, 1, chat("hi", id="m"), now=0.0)
    late = inbox(send(b, 1, chat("hi", id="m"), now=11.0), 1)
    assert [e["type"] for e in late] == ["chat", "ack"] and late[1]["seq"] == 2


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (chat("x", room="elsewhere", id="a"), "not_joined"),
        (chat("x", room="bad room", id="a"), "invalid_room"),
        ({"type": "chat", "id": "a"}, "bad_message"),
        ({"type": "history", "room": "elsewhere", "id": "a"}, "not_joined"),
        ({"type": "history", "room": "lobby", "limit": -1, "id": "a"}, "bad_message"),
        ({"type": "history", "room": "lobby", "since": {"seq": 1}, "id": "a"}, "bad_message"),
    ],
)
def test_refusals_echo_the_id(message: dict[str, object], code: str) -> None:
    b = make_broker()
    connect(b, 1, "ann")
    (error,) = inbox(send(b, 1, message), 1)
    assert error["type"] == "error" and error["code"] == code and error["id"] == "a"


@pytest.mark.parametrize("msg_id", ["", "x" * 65, 7, None, "a\nb", ["m1"]])
def test_an_id_that_is_not_one_is_ignored_as_the_first_protocol_did(msg_id: object) -> None:
    b = make_broker()
    connect(b, 1, "ann")
    out = inbox(send(b, 1, chat("x", id=msg_id)), 1)
    assert [e["type"] for e in out] == ["chat"] and out[0]["seq"] == 1
    assert "id" not in out[0]


@pytest.mark.parametrize(
    "message",
    [
        {"type": "history", "room": "lobby", "id": 7},
        {"type": "history", "room": "lobby", "id": ""},
        join("lobby", {"epoch": "e e", "seq": 1}),
        join("lobby", {"epoch": "e", "seq": -1}),
        join("lobby", {"epoch": "e", "seq": True}),
        join("lobby", 5),
        join("lobby", None, partial="yes"),
    ],
)
def test_malformed_v2_fields_are_bad_messages(message: dict[str, object]) -> None:
    b = make_broker()
    connect(b, 1, "ann")
    (error,) = inbox(send(b, 1, message), 1)
    assert error["type"] == "error" and error["code"] == "bad_message" and "id" not in error


def test_a_rate_limited_chat_is_refused_with_its_id() -> None:
    b = make_broker(rate_limit=1.0, rate_burst=3)
    connect(b, 1, "ann")
    for n in range(3):
        send(b, 1, chat("allowed", id=f"a{n}"))
    (error,) = inbox(send(b, 1, chat("second", id="b")), 1)
    assert (error["code"], error["id"]) == ("rate_limited", "b")
    (error,) = inbox(send(b, 1, chat("third")), 1)
    assert error["code"] == "rate_limited" and "id" not in error


def test_a_replay_never_outgrows_the_joiners_queue() -> None:
    # 4 queue slots: presence, presence_state and joined leave room for one chat; and
    # half the queue's bytes for the replay.
    big = "x" * 2000
    b = make_broker(send_queue=4, send_queue_bytes=64 + 1024 + 5000, max_message_bytes=64)
    connect(b, 1, "ann")
    epoch = b.position("lobby").epoch
    for _ in range(3):
        b.publish("lobby", big, username="server", timestamp=TS)
    joined = inbox(send(b, 1, join("lobby", {"epoch": epoch, "seq": 2})), 1)[-2]
    assert joined["recovered"] is True  # one fits
    joined = inbox(send(b, 1, join("lobby", {"epoch": epoch, "seq": 1})), 1)[-1]
    assert joined["recovered"] is False and joined["reason"] == "over_limit"
    out = inbox(send(b, 1, join("lobby", {"epoch": epoch, "seq": 1}, partial=True)), 1)
    assert [e["seq"] for e in out if e["type"] == "chat"] == [3]
    assert next(e for e in out if e["type"] == "joined")["skipped"] == {"from": 2, "to": 2}


def test_a_history_answer_is_bounded_by_bytes_too() -> None:
    b = make_broker(send_queue_bytes=64 * 1024 + 1024, max_message_bytes=64 * 1024)
    connect(b, 1, "ann")
    for n in range(10):
        b.publish("lobby", str(n) + "x" * 10_000, username="server", timestamp=TS)
    (answer,) = inbox(send(b, 1, {"type": "history", "room": "lobby"}), 1)
    # Half of 65 KiB holds three 10 KB chats: the latest three.
    assert [e["seq"] for e in answer["items"]] == [8, 9, 10]
    since = {"epoch": answer["epoch"], "seq": 0}
    (answer,) = inbox(send(b, 1, {"type": "history", "room": "lobby", "since": since}), 1)
    assert [e["seq"] for e in answer["items"]] == [1, 2, 3]


def test_history_on_demand() -> None:
    b = make_broker(history_size=4)
    connect(b, 1, "ann")
    epoch = b.position("lobby").epoch
    for n in range(1, 7):
        send(b, 1, chat(n))
    (answer,) = inbox(send(b, 1, {"type": "history", "room": "lobby", "id": "h"}), 1)
    assert (answer["epoch"], answer["seq"], answer["id"]) == (epoch, 6, "h")
    assert [e["content"] for e in answer["items"]] == [3, 4, 5, 6]
    assert all("replayed" not in e for e in answer["items"])
    since = {"epoch": epoch, "seq": 3}
    (answer,) = inbox(
        send(b, 1, {"type": "history", "room": "lobby", "since": since, "limit": 2}), 1
    )
    assert [e["seq"] for e in answer["items"]] == [4, 5] and "id" not in answer
    (answer,) = inbox(send(b, 1, {"type": "history", "room": "lobby", "limit": 0}), 1)
    assert answer["items"] == [] and answer["seq"] == 6
    # The limit is capped at the history size.
    (answer,) = inbox(send(b, 1, {"type": "history", "room": "lobby", "limit": 99}), 1)
    assert len(answer["items"]) == 4


class HistoryReaders:
    """An authorizer that lets "auditor" read history without joining, nobody else."""

    def may_join(self, identity: Any, room: RoomName) -> bool:
        return True

    def may_publish(self, identity: Any, room: RoomName) -> bool:
        return True

    def may_see_presence(self, identity: Any, room: RoomName) -> bool:
        return True

    def may_read_history(self, identity: Any, room: RoomName) -> bool:
        return bool(identity.username == "auditor")


def test_the_history_right() -> None:
    b = Broker(authorizer=HistoryReaders())
    connect(b, 1, "ann")
    send(b, 1, chat("x"))
    connect(b, 2, "auditor", room=None)
    (answer,) = inbox(send(b, 2, {"type": "history", "room": "lobby"}), 2)
    assert answer["type"] == "history" and len(answer["items"]) == 1
    (error,) = inbox(send(b, 1, {"type": "history", "room": "lobby", "id": "q"}), 1)
    assert (error["code"], error["id"]) == ("forbidden", "q")


def test_recovery_max_is_bounded_by_the_send_queue() -> None:
    with pytest.raises(ConfigError, match="recovery-max"):
        BrokerConfig(send_queue=10, recovery_max=11)
    assert BrokerConfig(send_queue=10).recovery_max == 10
    with pytest.raises(ConfigError, match="position-ttl"):
        BrokerConfig(history_ttl=100.0, position_ttl=50.0)


# -- the promise ---------------------------------------------------------------------


@given(
    script=st.lists(
        st.one_of(
            st.tuples(st.just("chat"), st.integers(1, 3)),
            st.tuples(st.just("away"), st.just(0)),
            st.tuples(st.just("back"), st.booleans()),
            st.tuples(st.just("wait"), st.integers(1, 40)),
        ),
        max_size=40,
    ),
    size=st.integers(0, 6),
    most=st.integers(1, 4),
)
def test_every_message_once_or_told(script: list[tuple[str, Any]], size: int, most: int) -> None:
    b = make_broker(history_size=size, history_ttl=30.0, recovery_max=most, send_queue=8)
    connect(b, 1, "ann")
    # What bob saw of the lobby (seq -> content), and what he was told he missed.
    seen: dict[int, object] = {}
    told: set[int] = set()
    bob: int | None = None
    position: dict[str, Any] | None = None
    start: int | None = None  # the top when bob first joined
    now = 0.0
    published = 0
    next_conn = 10
    replays = False

    def take(envelopes: list[dict[str, Any]]) -> None:
        nonlocal position, start
        assert sum(1 for e in envelopes if e.get("replayed")) <= most
        for e in envelopes:
            if e["type"] == "chat":
                assert e["seq"] not in seen, "a message seen twice"
                assert position is not None and e["seq"] == position["seq"] + 1, "a gap"
                seen[e["seq"]] = e["content"]
                told.discard(e["seq"])
                position["seq"] = e["seq"]
            elif e["type"] == "joined":
                top = e["seq"]
                if position is None:
                    assert "recovered" not in e
                    start = top
                else:
                    n = position["seq"]
                    missed = set(range(n + 1, top + 1))
                    if e["recovered"]:
                        assert "reason" not in e
                    else:
                        # Told: everything after its position that is not replayed now.
                        assert e["reason"] in {"too_old", "over_limit", "no_history"}
                        named = set()
                        for key in ("lost", "skipped"):
                            if key in e:
                                named |= set(range(e[key]["from"], e[key]["to"] + 1))
                        assert named <= missed
                        told.update(missed)
                        skipped_to = e["skipped"]["to"] if "skipped" in e else None
                        lost_to = e["lost"]["to"] if "lost" in e else None
                        # A replay resumes after what is named as not replayed.
                        n = max(x for x in (n, skipped_to, lost_to) if x is not None)
                        if not replays:
                            n = top
                    position = {"epoch": e["epoch"], "seq": n}
                    continue
                position = {"epoch": e["epoch"], "seq": top}

    for kind, arg in script:
        if kind == "chat":
            for _ in range(arg):
                published += 1
                out = send(b, 1, chat(published), now=now)
                if bob is not None:
                    take(inbox(out, bob))
        elif kind == "away" and bob is not None:
            disconnect(b, bob, now=now)
            bob = None
        elif kind == "back" and bob is None:
            bob, next_conn = next_conn, next_conn + 1
            connect(b, bob, "bob", room=None, now=now)
            replays = arg
            take(inbox(send(b, bob, join("lobby", position, partial=arg), now=now), bob))
        elif kind == "wait":
            now += arg
    note(f"seen {sorted(seen)} told {sorted(told)}")
    if position is None:
        return
    assert start is not None and position["seq"] <= b.position("lobby").seq
    # Up to bob's position, every message was seen once, with its content, or told.
    for q in range(start + 1, position["seq"] + 1):
        assert (q in seen) != (q in told), f"seq {q}: seen {q in seen}, told {q in told}"
    assert all(seen[q] == q for q in seen)
