"""
Per-room rights (an :class:`~roombus.Authorizer`) and the room limits, in the core alone.

A random table says who may join, publish to and see the presence of which room; users
connect, join rooms and chat, and every answer must be the table's: a refused join is
a ``forbidden`` error to that client only and leaves it out of the room; a member
without the publish right gets ``forbidden`` and nobody gets its chat; presence goes
to the members with the presence right only. The identity the authorizer is asked
about is the connection's own.
"""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st

from roombus import BrokerConfig, Identity, RoomName, Username
from roombus.lowlevel import Broker

from ..helpers import cid, connect, inbox, send

USERS = range(4)
ROOMS = ("r0", "r1", "r2")
PAIRS = st.frozensets(st.tuples(st.sampled_from(USERS), st.sampled_from(ROOMS)))


@attrs.frozen
class Table:
    """An authorizer that looks the (username, room) pair up in three sets."""

    join: frozenset[tuple[int, str]]
    publish: frozenset[tuple[int, str]]
    presence: frozenset[tuple[int, str]]

    @staticmethod
    def key(identity: Identity, room: RoomName) -> tuple[int, str]:
        return int(identity.username.removeprefix("u")), str(room)

    def may_join(self, identity: Identity, room: RoomName) -> bool:
        return self.key(identity, room) in self.join

    def may_publish(self, identity: Identity, room: RoomName) -> bool:
        return self.key(identity, room) in self.publish

    def may_see_presence(self, identity: Identity, room: RoomName) -> bool:
        return self.key(identity, room) in self.presence


@given(
    table=st.builds(Table, PAIRS, PAIRS, PAIRS),
    joins=st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(ROOMS)), max_size=12),
    chats=st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(ROOMS)), max_size=8),
)
def test_rights_are_the_authorizers(
    table: Table, joins: list[tuple[int, str]], chats: list[tuple[int, str]]
) -> None:
    broker = Broker(BrokerConfig(heartbeat=False, rate_limit=0), authorizer=table)
    for u in USERS:
        assert inbox(connect(broker, u, f"u{u}", room=None), u) == []
    members: dict[str, set[int]] = {room: set() for room in ROOMS}
    for u, room in joins:
        actions = send(broker, u, {"type": "join", "room": room})
        if u in members[room]:
            # Joining again: the current state, as an ack, to a member who may see it.
            assert [e["type"] for e in inbox(actions, u)] == (
                ["presence_state"] if (u, room) in table.presence else []
            )
            assert all(inbox(actions, v) == [] for v in USERS if v != u)
            continue
        if (u, room) not in table.join:
            assert inbox(actions, u) == [
                {"type": "error", "code": "forbidden", "content": f"not allowed in room {room!r}"}
            ]
            assert all(inbox(actions, v) == [] for v in USERS if v != u)
            assert f"u{u}" not in broker.members(room)
            continue
        members[room].add(u)
        assert f"u{u}" in broker.members(room)
        for v in members[room] - {u}:
            saw = [e for e in inbox(actions, v) if e["type"] == "presence"]
            if (v, room) in table.presence:
                assert [(e["event"], e["username"]) for e in saw] == [("join", f"u{u}")]
            else:
                assert saw == []
        own_state = [e for e in inbox(actions, u) if e["type"] == "presence_state"]
        assert len(own_state) == ((u, room) in table.presence)
    for u, room in chats:
        if u not in members[room]:
            continue
        actions = send(broker, u, {"type": "chat", "room": room, "content": "hi"})
        got = {v for v in USERS if any(e["type"] == "chat" for e in inbox(actions, v))}
        if (u, room) in table.publish:
            assert got == members[room]
        else:
            assert got == set()
            assert inbox(actions, u) == [
                {
                    "type": "error",
                    "code": "forbidden",
                    "content": f"may not publish to room {room!r}",
                }
            ]


@given(limit=st.integers(1, 4), extra=st.integers(0, 3))
def test_a_full_room_refuses_exactly_at_its_limit(limit: int, extra: int) -> None:
    broker = Broker(BrokerConfig(heartbeat=False, rate_limit=0, max_connections_per_room=limit))
    for n in range(limit):
        assert broker.refusal(RoomName("r"), Username(f"u{n}"), None) is None
        connect(broker, n, f"u{n}", room="r")
    assert broker.refusal(RoomName("r"), Username("late"), None) == (
        f"room 'r' is full ({limit} connections)"
    )
    assert broker.refusal(RoomName("other"), Username("late"), None) is None
    for n in range(limit, limit + extra + 1):
        connect(broker, n, f"u{n}", room=None)
        actions = send(broker, n, {"type": "join", "room": "r"})
        assert inbox(actions, n) == [
            {
                "type": "error",
                "code": "forbidden",
                "content": f"room 'r' is full ({limit} connections)",
            }
        ]
    assert len(broker.members("r")) == limit


@given(limit=st.integers(1, 3))
def test_rooms_per_connection_stop_at_the_limit(limit: int) -> None:
    broker = Broker(BrokerConfig(heartbeat=False, rate_limit=0, max_rooms_per_connection=limit))
    connect(broker, 1, "ann", room=None)
    for n in range(limit):
        actions = send(broker, 1, {"type": "join", "room": f"r{n}"})
        assert not [e for e in inbox(actions, 1) if e["type"] == "error"]
    actions = send(broker, 1, {"type": "join", "room": "one-too-many"})
    assert inbox(actions, 1) == [
        {"type": "error", "code": "forbidden", "content": f"at most {limit} rooms per connection"}
    ]
    assert len(broker.rooms_of(cid(1))) == limit
