"""The broker against a plain model, over random interleavings of everything."""

from __future__ import annotations

import json
from collections import defaultdict

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from roombus import (
    Broker,
    BrokerConfig,
    ClientConnected,
    ClientDisconnected,
    Close,
    ConnectionId,
    Deliver,
    PongReceived,
    RoomName,
    SendPing,
    TextReceived,
    Username,
)

from ..strategies import few_rooms, few_users

INTERVAL, TIMEOUT = 10.0, 5.0


class BrokerMachine(RuleBasedStateMachine):
    conns = Bundle("conns")

    def __init__(self) -> None:
        super().__init__()
        self.broker = Broker(BrokerConfig(ping_interval=INTERVAL, ping_timeout=TIMEOUT))
        self.now = 0.0
        self.next_id = 0
        self.user: dict[int, str] = {}
        self.rooms: dict[int, set[str]] = {}
        self.alive_at: dict[int, float] = {}
        self.pinged: set[int] = set()
        self.seq: dict[str, int] = defaultdict(int)

    # -- the model --------------------------------------------------------------------

    def present(self, room: str) -> set[str]:
        return {self.user[c] for c, rs in self.rooms.items() if room in rs}

    def members(self, room: str) -> set[int]:
        return {c for c, rs in self.rooms.items() if room in rs}

    def run(self, event: object) -> list[object]:
        return self.broker.handle(event, now=self.now, timestamp=0)  # type: ignore[arg-type]

    def check_presence(self, actions: list[object], before: dict[str, set[str]]) -> None:
        """Join/leave events are sent exactly when a room's user set changes."""
        seen: list[tuple[str, str, str, frozenset[int]]] = []
        for a in actions:
            if isinstance(a, Deliver):
                env = json.loads(a.payload)
                if env["type"] == "presence":
                    seen.append((env["event"], env["room"], env["username"], frozenset(a.conns)))
        expected = []
        for room in sorted(set(before) | {r for rs in self.rooms.values() for r in rs}):
            old, new = before.get(room, set()), self.present(room)
            expected += [("join", room, u) for u in new - old]
            if self.members(room):  # a leave goes to the rest: none if nobody is left
                expected += [("leave", room, u) for u in old - new]
        assert sorted(s[:3] for s in seen) == sorted(expected)
        for _event, room, _, receivers in seen:
            # A join reaches every member (the joiner too); a leave the rest.
            assert receivers == frozenset(self.members(room))
            assert receivers

    def snapshot(self) -> dict[str, set[str]]:
        return {r: self.present(r) for rs in self.rooms.values() for r in rs}

    def apply_closes(self, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Close):
                self.drop(a.conn)

    def drop(self, c: int) -> None:
        del self.user[c], self.rooms[c], self.alive_at[c]
        self.pinged.discard(c)
        self.free_empty_rooms()

    def free_empty_rooms(self) -> None:
        # A room with no member is freed, and its seq starts over.
        for room in [r for r in self.seq if not self.members(r)]:
            del self.seq[room]

    # -- rules ------------------------------------------------------------------------

    @rule(target=conns, username=few_users, room=few_rooms)
    def connect(self, username: str, room: str) -> int:
        self.next_id += 1
        c = self.next_id
        before = self.snapshot()
        self.user[c], self.rooms[c], self.alive_at[c] = username, {room}, self.now
        actions = self.run(
            ClientConnected(conn=ConnectionId(c), username=Username(username), room=RoomName(room))
        )
        self.check_presence(actions, before)
        # The joiner's last message is the room's state.
        last = json.loads([a for a in actions if isinstance(a, Deliver)][-1].payload)
        assert last == {"type": "presence_state", "room": room, "users": sorted(self.present(room))}
        return c

    @rule(c=conns, room=few_rooms)
    def join(self, c: int, room: str) -> None:
        before = self.snapshot()
        actions = self.run(
            TextReceived(conn=ConnectionId(c), text=json.dumps({"type": "join", "room": room}))
        )
        if c in self.rooms:
            self.rooms[c].add(room)
        self.check_presence(actions, before)

    @rule(c=conns, room=few_rooms)
    def leave(self, c: int, room: str) -> None:
        before = self.snapshot()
        actions = self.run(
            TextReceived(conn=ConnectionId(c), text=json.dumps({"type": "leave", "room": room}))
        )
        if c in self.rooms and room in self.rooms[c]:
            self.rooms[c].discard(room)
            self.free_empty_rooms()
        elif c in self.rooms:
            assert json.loads(actions[0].payload)["code"] == "not_joined"  # type: ignore[attr-defined]
        self.check_presence(actions, before)

    @rule(c=conns, room=few_rooms, content=st.integers())
    def chat(self, c: int, room: str, content: int) -> None:
        actions = self.run(
            TextReceived(
                conn=ConnectionId(c),
                text=json.dumps({"type": "chat", "room": room, "content": content}),
            )
        )
        if c not in self.rooms:
            assert actions == []
            return
        (deliver,) = [a for a in actions if isinstance(a, Deliver)]
        env = json.loads(deliver.payload)
        if room in self.rooms[c]:
            self.seq[room] += 1
            assert sorted(deliver.conns) == sorted(self.members(room))
            assert len(set(deliver.conns)) == len(deliver.conns)
            assert env == {
                "type": "chat",
                "username": self.user[c],
                "content": content,
                "room": room,
                "timestamp": 0,
                "seq": self.seq[room],
            }
        else:
            assert deliver.conns == (c,)
            assert env["code"] == "not_joined"

    @rule(c=consumes(conns))
    def disconnect(self, c: int) -> None:
        before = self.snapshot()
        actions = self.run(ClientDisconnected(conn=ConnectionId(c)))
        if c in self.user:
            self.drop(c)
        self.check_presence(actions, before)

    @rule(c=conns)
    def pong(self, c: int) -> None:
        assert self.run(PongReceived(conn=ConnectionId(c))) == []
        if c in self.alive_at:
            self.alive_at[c] = self.now
            self.pinged.discard(c)

    @rule(dt=st.floats(min_value=0, max_value=20))
    def advance(self, dt: float) -> None:
        self.now += dt
        actions = self.broker.handle_timeout(now=self.now, timestamp=0)
        expired = {c for c, t in self.alive_at.items() if self.now >= t + INTERVAL + TIMEOUT}
        assert {a.conn for a in actions if isinstance(a, Close)} == expired
        # Each Close is followed by the presence its disconnect causes: check them in turn.
        segment: list[object] = []
        for a in [*actions, None]:
            if isinstance(a, SendPing):
                assert self.now >= self.alive_at[a.conn] + INTERVAL
                assert a.conn not in self.pinged  # one ping per silence
                self.pinged.add(a.conn)
            elif isinstance(a, Close) or a is None:
                if segment:
                    closed = segment[0]
                    assert isinstance(closed, Close)
                    before = self.snapshot()
                    self.drop(closed.conn)
                    self.check_presence(segment[1:], before)
                segment = [a]
            else:
                assert segment, "presence before any close"
                segment.append(a)

    @precondition(lambda self: self.broker.next_deadline() is not None)
    @rule()
    def jump_to_deadline(self) -> None:
        deadline = self.broker.next_deadline()
        assert deadline is not None
        # Time only moves on: every earlier deadline was already handled.
        assert deadline > self.now
        self.now = deadline
        self.advance(0.0)

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def registry_matches_model(self) -> None:
        rooms = {r for rs in self.rooms.values() for r in rs}
        assert set(self.broker.rooms) == rooms
        for room in rooms:
            assert self.broker.members(room) == sorted(self.present(room))
            assert set(self.broker.connections(room)) == self.members(room)
        assert self.broker.statistics().connections == len(self.user)

    @invariant()
    def deadline_is_the_earliest_needed(self) -> None:
        """The reported deadline is exactly the earliest ping or expiry still to come."""
        expected = [
            t + INTERVAL + (TIMEOUT if c in self.pinged else 0.0) for c, t in self.alive_at.items()
        ]
        assert self.broker.next_deadline() == (min(expected) if expected else None)


TestBroker = BrokerMachine.TestCase
TestBroker.settings = settings(stateful_step_count=40)
