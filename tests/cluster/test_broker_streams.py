"""
Until room streams are served by the cluster: a node of a cluster answers the
requests that need them with an explicit ``bad_message`` (never a silent v1 answer
that a client could take for a recovery or an acknowledgement), and serves the rest.
"""

from __future__ import annotations

import pytest

from roombus.cluster import BackplaneRestored, ClusterBroker
from roombus.lowlevel import ConnectionId

from ..helpers import connect, inbox, send


def node() -> ClusterBroker:
    b = ClusterBroker(node="n1")
    b.handle(BackplaneRestored(), now=0.0, timestamp=0)
    return b


@pytest.mark.parametrize(
    "message",
    [
        {"type": "chat", "content": "x", "id": "m1"},
        {"type": "history", "room": "lobby", "id": "m1"},
    ],
)
def test_acked_chat_and_history_are_refused_with_their_id(message: dict[str, object]) -> None:
    b = node()
    connect(b, 1, "ann")
    (error,) = inbox(send(b, 1, message), 1)
    assert (error["type"], error["code"], error["id"]) == ("error", "bad_message", "m1")
    assert "not served by a cluster" in error["content"]


def test_a_join_with_a_position_joins_and_says_it_cannot_recover() -> None:
    b = node()
    connect(b, 1, "ann", room=None)
    out = send(b, 1, {"type": "join", "room": "lobby", "since": None})
    (error,) = [e for e in inbox(out, 1) if e["type"] == "error"]
    assert error["code"] == "bad_message"
    assert not [e for e in inbox(out, 1) if e["type"] == "joined"]
    assert b.rooms_of(ConnectionId(1)) == ["lobby"]


def test_joiners_still_waiting_for_the_room_count_against_its_limit() -> None:
    from roombus import BrokerConfig, RoomName, Username

    b = ClusterBroker(BrokerConfig(max_connections_per_room=1), node="n1")
    b.handle(BackplaneRestored(), now=0.0, timestamp=0)
    connect(b, 1, "ann")  # waits for the room's presence (no RoomSynced yet)
    assert b.rooms_of(ConnectionId(1)) == ["lobby"] and b.members("lobby") == []
    assert b.refusal(RoomName("lobby"), Username("bob"), None) == (
        "room 'lobby' is full (1 connections)"
    )


def test_a_join_with_a_position_while_still_joining_is_refused_too() -> None:
    b = node()
    connect(b, 1, "ann")  # pending: the room's presence is not read yet
    out = send(b, 1, {"type": "join", "room": "lobby", "since": None})
    (error,) = inbox(out, 1)
    assert (error["type"], error["code"]) == ("error", "bad_message")
