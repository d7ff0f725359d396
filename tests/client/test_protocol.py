"""Transcripts of the client protocol: what it sends, when, and what it tells."""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus.client.protocol import (
    ClientClosed,
    ClientOptions,
    ClientProtocol,
    CloseConnection,
    Connected,
    Connecting,
    Disconnected,
    Joined,
    Joining,
    JoinRefused,
    Left,
    Message,
    NotInRoom,
    OpenConnection,
    OutboxFull,
    Phase,
    Policy,
    Presence,
    PublishFailed,
    Reset,
    SendText,
    ServerError,
    close_policy,
)
from roombus.core.streams import Position, Span


def opened(rooms: list[str] | None = None, **kw: Any) -> tuple[ClientProtocol, list[Any]]:
    """A client whose first connection is open; returns it and what it sent."""
    p = ClientProtocol(rooms or ["lobby"], username="ann", rng=random.Random(1), **kw)
    p.start(0.0)
    (open_,) = p.take_actions()
    assert isinstance(open_, OpenConnection)
    p.opened(open_.gen, 0.0)
    return p, p.take_actions()


def events(p: ClientProtocol) -> list[Any]:
    out = []
    while (ev := p.next_event()) is not None:
        out.append(ev)
    return out


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(a.text) for a in actions if isinstance(a, SendText)]


def recv(p: ClientProtocol, now: float = 0.0, **msg: Any) -> None:
    p.received(p.gen, json.dumps(msg), now)


def joined(p: ClientProtocol, room: str, epoch: str = "E1", seq: int = 0, **kw: Any) -> None:
    recv(p, type="joined", room=room, epoch=epoch, seq=seq, **kw)


def chat(p: ClientProtocol, room: str, seq: int, content: Any = None, **kw: Any) -> None:
    kw.setdefault("username", "bob")
    recv(p, type="chat", room=room, seq=seq, content=content or seq, **kw)


def query(target: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(target).query, keep_blank_values=True))


# -- connecting -------------------------------------------------------------------------


def test_the_first_room_and_its_position_ride_in_the_url_the_others_are_joined() -> None:
    p = ClientProtocol(
        ["lobby", "games"],
        username="ann",
        positions={"lobby": Position("E1", 7)},
        params={"x": "1"},
    )
    p.start(5.0)
    (open_,) = p.take_actions()
    assert isinstance(open_, OpenConnection)
    assert urlsplit(open_.target).path == "/ws"
    assert query(open_.target) == {
        "x": "1",
        "room": "lobby",
        "username": "ann",
        "since": "E1:7",
        "partial": "1",
    }
    p.opened(open_.gen, 5.0)
    assert sent(p.take_actions()) == [
        {"type": "join", "room": "games", "since": None, "partial": True}
    ]
    assert events(p) == [Connecting(1), Connected(), Joining("lobby"), Joining("games")]


def test_a_client_without_a_position_asks_for_one() -> None:
    p = ClientProtocol(["lobby"], options=ClientOptions(partial=False))
    p.start(0.0)
    (open_,) = p.take_actions()
    assert isinstance(open_, OpenConnection)
    assert query(open_.target) == {"room": "lobby", "since": ""}


def test_a_client_needs_valid_rooms() -> None:
    with pytest.raises(ValueError, match="invalid room"):
        ClientProtocol(["bad room"])
    p = ClientProtocol(["lobby"])
    with pytest.raises(ValueError, match="invalid room"):
        p.join("x" * 65, 0.0)


# -- close policy and backoff -----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "status", "policy"),
    [
        (1001, "", None, Policy.PROMPT),
        (1012, "", None, Policy.PROMPT),
        (1008, "credentials expired", None, Policy.PROMPT),
        (1008, "send queue full", None, Policy.RETRY),
        (1008, "rate limit exceeded", None, Policy.RETRY),
        (1008, "room not granted", None, Policy.FINAL),
        (1002, "", None, Policy.FINAL),
        (1003, "", None, Policy.FINAL),
        (1007, "", None, Policy.FINAL),
        (1009, "", None, Policy.FINAL),
        (1011, "", None, Policy.RETRY),
        (1000, "", None, Policy.RETRY),
        (None, "connection lost", None, Policy.RETRY),
        (None, "", 401, Policy.FINAL),
        (None, "", 403, Policy.FINAL),
        (None, "", 400, Policy.FINAL),
        (None, "", 429, Policy.RETRY),
        (None, "", 503, Policy.RETRY),
        (None, "", 502, Policy.RETRY),
    ],
)
def test_close_policy(code: int | None, reason: str, status: int | None, policy: Policy) -> None:
    assert close_policy(code, reason, status) is policy


@given(seed=st.integers(0, 2**32), failures=st.integers(1, 12))
def test_backoff_is_full_jitter_under_a_doubling_bound(seed: int, failures: int) -> None:
    o = ClientOptions(backoff_initial=0.5, backoff_max=20.0)
    p = ClientProtocol(["lobby"], options=o, rng=random.Random(seed))
    p.start(0.0)
    now = 0.0
    for attempt in range(failures):
        (open_,) = p.take_actions()
        assert isinstance(open_, OpenConnection) and open_.gen == attempt + 1
        p.failed(open_.gen, now, reason="refused", status=None)
        evs = events(p)
        assert evs[0] == Connecting(attempt + 1)
        (gone,) = [e for e in evs if isinstance(e, Disconnected)]
        bound = min(20.0, 0.5 * 2**attempt)
        assert gone.reconnect_in is not None and 0.0 <= gone.reconnect_in <= bound
        deadline = p.next_deadline()
        assert deadline == pytest.approx(now + gone.reconnect_in)
        p.handle_timer(deadline - 1e-6 if gone.reconnect_in > 1e-3 else deadline)
        if gone.reconnect_in > 1e-3:
            assert p.take_actions() == []  # not before its time
            p.handle_timer(deadline)
        now = deadline


def test_a_stable_connection_resets_the_backoff_a_drain_reconnects_promptly() -> None:
    o = ClientOptions(backoff_initial=0.5, backoff_max=20.0, stable_after=5.0)
    p = ClientProtocol(["lobby"], options=o, rng=random.Random(3))
    p.start(0.0)
    for _ in range(6):  # six failures: the bound is now 16 s
        (open_,) = p.take_actions()
        p.failed(open_.gen, 0.0, reason="x")
        p.handle_timer(p.next_deadline() or 0.0)
    (open_,) = p.take_actions()
    now = 100.0
    p.opened(open_.gen, now)
    p.take_actions()
    p.handle_timer(now + 5.0)  # stable: the count starts over
    events(p)
    p.closed(p.gen, now + 6, 1011, "")
    (gone,) = [e for e in events(p) if isinstance(e, Disconnected)]
    assert gone.reconnect_in is not None and gone.reconnect_in <= 0.5
    p.handle_timer(p.next_deadline() or 0.0)
    (open_,) = p.take_actions()
    p.opened(open_.gen, 200.0)
    p.closed(open_.gen, 200.5, 1001, "")  # a drain, before the connection was stable
    (gone,) = [e for e in events(p) if isinstance(e, Disconnected)]
    assert gone.reconnect_in is not None and gone.reconnect_in <= 0.5


def test_a_final_close_stops_and_fails_the_outbox() -> None:
    p, _ = opened()
    joined(p, "lobby")
    pub = p.publish("lobby", "hi")
    p.take_actions()
    p.failed(p.gen, 1.0, reason="refused: HTTP 401", status=401)
    assert p.phase is Phase.CLOSED and p.next_deadline() is None
    (gone,) = [e for e in events(p) if isinstance(e, Disconnected)]
    assert gone.final and gone.status == 401 and gone.reconnect_in is None
    assert p.take_settled() == [(pub, PublishFailed(code="closed", content="refused: HTTP 401"))]
    with pytest.raises(ClientClosed):
        p.publish("lobby", "again")


def test_close_closes_the_open_connection_once() -> None:
    p, _ = opened()
    p.close(1.0)
    assert p.take_actions() == [CloseConnection(1, 1000, "client closed")]
    p.close(2.0)
    assert p.take_actions() == []
    p.closed(1, 2.0, 1000, "")  # the server's answer changes nothing
    assert p.phase is Phase.CLOSED


def test_reports_of_an_older_connection_are_ignored() -> None:
    p, _ = opened()
    p.closed(1, 1.0, None, "lost")
    p.handle_timer(p.next_deadline() or 0.0)
    (open_,) = p.take_actions()
    assert open_.gen == 2
    p.received(1, '{"type":"pong"}', 2.0)
    p.closed(1, 2.0, None, "late")
    assert p.phase is Phase.CONNECTING


def test_a_connect_that_takes_too_long_is_abandoned() -> None:
    p = ClientProtocol(["lobby"], options=ClientOptions(connect_timeout=3.0))
    p.start(0.0)
    p.take_actions()
    assert p.next_deadline() == 3.0
    p.handle_timer(3.0)
    assert p.take_actions() == [CloseConnection(1, 1001, "connect timeout")]
    assert p.phase is Phase.WAITING


# -- liveness -------------------------------------------------------------------------


def test_silence_gets_a_ping_and_no_answer_replaces_the_connection() -> None:
    o = ClientOptions(ping_interval=10.0, ping_timeout=5.0, stable_after=100.0)
    p, _ = opened(options=o)
    assert p.next_deadline() == 10.0
    recv(p, 4.0, type="pong")  # anything heard moves the ping
    assert p.next_deadline() == 14.0
    p.handle_timer(14.0)
    assert sent(p.take_actions()) == [{"type": "ping"}]
    assert p.next_deadline() == 19.0
    p.handle_timer(19.0)
    assert p.take_actions() == [CloseConnection(1, 1001, "no reply to ping")]
    assert p.phase is Phase.WAITING


def test_an_answer_in_time_keeps_the_connection() -> None:
    o = ClientOptions(ping_interval=10.0, ping_timeout=5.0)
    p, _ = opened(options=o)
    p.handle_timer(10.0)
    p.take_actions()
    recv(p, 12.0, type="pong")
    p.handle_timer(15.0)
    assert p.take_actions() == [] and p.phase is Phase.OPEN
    assert p.next_deadline() == 22.0


# -- rooms ------------------------------------------------------------------------------


def test_a_replay_and_live_chats_are_handed_over_once_in_order() -> None:
    p, _ = opened(positions={"lobby": Position("E1", 3)})
    recv(p, type="presence_state", room="lobby", users=["ann", "bob"])
    joined(p, "lobby", seq=5, recovered=True)
    chat(p, "lobby", 4, replayed=True)
    chat(p, "lobby", 4, replayed=True)  # a duplicate
    chat(p, "lobby", 5, replayed=True)
    chat(p, "lobby", 6)
    got = [e for e in events(p) if isinstance(e, (Message, Joined, Presence))]
    assert got[0] == Presence(room="lobby", users=frozenset({"ann", "bob"}), event="state")
    assert got[1] == Joined(room="lobby", epoch="E1", seq=5, recovered=True)
    assert [(m.seq, m.replayed, m.epoch) for m in got[2:]] == [
        (4, True, "E1"),
        (5, True, "E1"),
        (6, False, "E1"),
    ]
    assert p.duplicates == 1
    assert p.positions() == {"lobby": Position("E1", 6)}


def test_a_partial_recovery_replays_after_what_is_lost() -> None:
    p, _ = opened(positions={"lobby": Position("E1", 3)})
    joined(
        p,
        "lobby",
        seq=20,
        recovered=False,
        reason="too_old",
        lost={"from": 4, "to": 9},
        skipped={"from": 10, "to": 16},
    )
    for seq in range(17, 21):
        chat(p, "lobby", seq, replayed=True)
    evs = events(p)
    (j,) = [e for e in evs if isinstance(e, Joined)]
    assert j.lost == Span(4, 9) and j.skipped == Span(10, 16) and j.reason == "too_old"
    assert [m.seq for m in evs if isinstance(m, Message)] == [17, 18, 19, 20]


def test_an_epoch_change_starts_from_the_new_position() -> None:
    p, _ = opened(positions={"lobby": Position("E1", 3)})
    joined(p, "lobby", epoch="E2", seq=2, recovered=False, reason="epoch_changed")
    chat(p, "lobby", 2)  # before the position: not handed over
    chat(p, "lobby", 3)
    assert [m.seq for m in events(p) if isinstance(m, Message)] == [3]
    assert p.positions() == {"lobby": Position("E2", 3)}


def test_a_reset_moves_the_position() -> None:
    p, _ = opened()
    joined(p, "lobby", seq=4)
    recv(p, type="reset", room="lobby", epoch="N1", seq=9, reason="unavailable")
    chat(p, "lobby", 10)
    evs = events(p)
    assert Reset(room="lobby", epoch="N1", seq=9, reason="unavailable") in evs
    assert [(m.epoch, m.seq) for m in evs if isinstance(m, Message)] == [("N1", 10)]


def test_presence_follows_state_joins_and_leaves() -> None:
    p, _ = opened()
    recv(p, type="presence_state", room="lobby", users=["ann"])
    recv(p, type="presence", room="lobby", event="join", username="bob")
    recv(p, type="presence", room="lobby", event="leave", username="ann")
    recv(p, type="presence", room="nowhere", event="join", username="eve")
    assert p.presence("lobby") == {"bob"}
    assert p.presence("nowhere") == frozenset()


def test_a_refused_join_is_told_and_forgotten() -> None:
    p, _ = opened(["lobby", "secret"])
    joined(p, "lobby")
    pub = p.publish("secret", 1)
    recv(p, type="error", code="forbidden", content="room 'secret' not granted")
    assert JoinRefused(room="secret", code="forbidden", content="room 'secret' not granted") in (
        events(p)
    )
    assert p.rooms == ["lobby"]
    assert p.take_settled() == [
        (pub, PublishFailed(code="forbidden", content="room 'secret' not granted"))
    ]


def test_a_rate_limited_join_is_sent_again() -> None:
    p, _ = opened(["lobby", "games"])
    joined(p, "lobby")
    recv(p, 1.0, type="error", code="rate_limited", content="too many messages")
    assert p.rooms == ["lobby", "games"]
    deadline = p.next_deadline()
    assert deadline is not None and deadline <= 2.0
    pub_id = p.publish("games", "held")  # not sent: the room waits for its join
    assert sent(p.take_actions()) == []
    p.handle_timer(deadline)
    assert sent(p.take_actions()) == [
        {"type": "join", "room": "games", "since": None, "partial": True},
        {"type": "chat", "room": "games", "content": "held", "id": pub_id},
    ]


def test_a_leave_while_joining_waits_for_the_answer() -> None:
    p, _ = opened(["lobby", "games"])
    p.leave("games")
    assert sent(p.take_actions()) == []  # not yet: a refusal could not be told apart
    assert p.rooms == ["lobby"]
    joined(p, "games")
    assert sent(p.take_actions()) == [{"type": "leave", "room": "games"}]
    assert Left("games") in events(p)
    chat(p, "games", 1)
    assert not [e for e in events(p) if isinstance(e, Message)]


def test_unattributed_errors_and_garbage() -> None:
    p, _ = opened()
    joined(p, "lobby")
    p.received(p.gen, "not json", 0.0)
    p.received(p.gen, "[1]", 0.0)
    recv(p, type="error", code="bad_message", content="?", id="h1")
    evs = events(p)
    assert ServerError(code="bad_message", content="?", id="h1") in evs


# -- publishing ----------------------------------------------------------------------------


def test_a_publish_is_acked_and_resent_with_its_id_after_a_reconnect() -> None:
    p, _ = opened()
    joined(p, "lobby")
    pub = p.publish("lobby", {"x": 1})
    (first,) = sent(p.take_actions())
    assert first == {"type": "chat", "room": "lobby", "content": {"x": 1}, "id": pub}
    p.closed(p.gen, 1.0, None, "lost")
    p.handle_timer(p.next_deadline() or 0.0)
    (open_,) = p.take_actions()
    p.opened(open_.gen, 2.0)
    assert sent(p.take_actions()) == [first]
    recv(p, type="ack", id=pub, room="lobby", epoch="E1", seq=8)
    recv(p, type="ack", id=pub, room="lobby", epoch="E1", seq=8)  # a second ack: ignored
    assert p.take_settled() == [(pub, Position("E1", 8))]
    assert p.outbox() == []


def test_the_outbox_is_bounded_and_a_publish_needs_the_room() -> None:
    p, _ = opened(options=ClientOptions(outbox_size=2))
    p.publish("lobby", 1)
    p.publish("lobby", 2)
    with pytest.raises(OutboxFull):
        p.publish("lobby", 3)
    with pytest.raises(NotInRoom):
        p.publish("games", 1)
    with pytest.raises(ValueError, match="JSON"):
        opened()[0].publish("lobby", float("nan"))


def test_ids_differ_between_clients() -> None:
    a = ClientProtocol(["lobby"]).publish("lobby", 1)
    b = ClientProtocol(["lobby"]).publish("lobby", 1)
    assert a != b


def test_leaving_fails_the_rooms_publishes() -> None:
    p, _ = opened(["lobby", "games"])
    joined(p, "lobby")
    joined(p, "games")
    pub = p.publish("games", 1)
    keep = p.publish("lobby", 1)
    p.leave("games")
    assert p.take_settled() == [(pub, PublishFailed(code="left", content="left room 'games'"))]
    assert p.outbox() == [keep]


# -- a slow application ----------------------------------------------------------------------


def test_a_full_queue_drops_a_room_and_joins_it_again_from_the_last_position_read() -> None:
    p, _ = opened(options=ClientOptions(max_events=8))
    joined(p, "lobby", seq=0)
    events(p)
    for seq in range(1, 10):
        chat(p, "lobby", seq)
    assert p.pending_events() == 8 and p.dropped == 1
    got = [p.next_event() for _ in range(4)]
    assert [m.seq for m in got if isinstance(m, Message)] == [1, 2, 3, 4]
    # Half the queue is free: the room is joined again from the last chat queued.
    assert sent(p.take_actions()) == [
        {"type": "join", "room": "lobby", "since": {"epoch": "E1", "seq": 8}, "partial": True}
    ]
    chat(p, "lobby", 10)  # sent before the server read the join: the replay brings it
    joined(p, "lobby", seq=10, recovered=True)
    for seq in (9, 10):
        chat(p, "lobby", seq, replayed=True)
    rest = [e for e in events(p) if isinstance(e, Message)]
    assert [m.seq for m in rest] == [5, 6, 7, 8, 9, 10]
    assert p.positions() == {"lobby": Position("E1", 10)}


def test_a_client_nobody_reads_stays_bounded_while_it_reconnects() -> None:
    p, _ = opened(options=ClientOptions(max_events=4))
    for _ in range(50):
        p.closed(p.gen, 0.0, None, "lost")
        p.handle_timer(p.next_deadline() or 0.0)
        (open_,) = p.take_actions()
        p.opened(open_.gen, 0.0)
        p.take_actions()
        joined(p, "lobby")
    assert p.pending_events() <= 4


def test_the_client_package_exports_what_it_lists() -> None:
    import roombus.client

    assert roombus.client.__all__ == sorted(roombus.client.__all__)
    for name in roombus.client.__all__:
        assert name in vars(roombus.client), name


def test_a_chat_whose_sender_id_was_handed_over_is_dropped_even_in_another_epoch() -> None:
    """A resend whose ack was lost across an epoch change is numbered again: the
    sender's id, which every receiver gets, says it is a message already shown."""
    p, _ = opened(options=ClientOptions(dedup_window=300.0))
    joined(p, "lobby", "E1", 4)
    chat(p, "lobby", 5, "hi", id="m-1")
    chat(p, "lobby", 6, "other user, same id", id="m-1", username="cat")
    recv(p, 1.0, type="reset", room="lobby", epoch="E2", seq=0, reason="epoch_changed")
    chat(p, "lobby", 1, "hi", id="m-1")  # the same message again, as E2:1
    chat(p, "lobby", 2, "next")
    shown = [(e.epoch, e.seq, e.username, e.content) for e in events(p) if isinstance(e, Message)]
    assert shown == [
        ("E1", 5, "bob", "hi"),
        ("E1", 6, "cat", "other user, same id"),
        ("E2", 2, "bob", "next"),
    ]
    assert p.duplicates == 1
    assert p.positions()["lobby"] == Position("E2", 2)  # no Gap: E2:1 was seen, not shown
    # Past the window the id is forgotten (the server would publish it anew too).
    p.received(
        p.gen,
        json.dumps(
            {
                "type": "chat",
                "room": "lobby",
                "seq": 3,
                "username": "bob",
                "content": "hi",
                "id": "m-1",
            }
        ),
        400.0,
    )
    assert [e.seq for e in events(p) if isinstance(e, Message)] == [3]
