"""
The whole core against a plain model, over random interleavings of everything.

The system under test is what a driver holds: one :class:`~roombus.lowlevel.Broker` and one
:class:`~roombus.lowlevel.SendQueue` per connection, driven the way the trio adapter drives them
(``Server._apply``): every ``Deliver`` is pushed into each receiver's queue, a queue
that overflows is closed with 1008 and reported to the broker as
``ClientDisconnected``, a ``Close`` drops what was not started and queues a close
frame. A *fast* receiver drains its queue after every step; a *slow* one does not
(until a ``drain`` rule writes part of it), so it falls behind.

The model is plain dicts: who is connected, in which rooms (in join order), when each
connection last showed a sign of life, whether it was pinged, each room's ``seq``.
From it every step predicts the broker's exact actions (receivers, envelopes, notices,
pings and closes), and the invariants below compare the rest after every step:

* presence: a room's users are exactly the users with a live connection in it;
  join/leave envelopes go out exactly when that set changes, to exactly the members;
* delivery: each chat reaches exactly its room's members at publish time, nobody twice;
  every receiver sees each sender's messages in the order they were sent; a room's
  ``seq`` rises by one per message;
* slow receivers: a queue refuses a frame exactly when the policy says (message or byte
  bound), is then closed, and every other receiver still gets exactly its messages;
  the bounds are never exceeded;
* heartbeats: a silent peer is pinged ``interval`` after its last pong (or as soon as
  the driver calls after that) and closed ``timeout`` after the ping was sent, not a
  tick before and not later; a driver calling in late (time jumps) is a stall, after
  which every ping gets ``timeout`` again from the resume; ``next_deadline()`` is
  exactly the earliest instant something is due;
* no leaks: with nobody connected, the broker holds no room, connection or timer.
"""

from __future__ import annotations

import enum
import json
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from roombus import (
    BrokerConfig,
    LocalProtocolError,
    MessagePublished,
    RoomName,
    UserJoined,
    UserLeft,
    Username,
)
from roombus.lowlevel import (
    PING_TIMEOUT_CODE,
    Broker,
    ClientConnected,
    ClientDisconnected,
    Close,
    ConnectionId,
    Deliver,
    PongReceived,
    QueueState,
    SendPing,
    SendQueue,
    TextReceived,
)

from ..strategies import bad_requests, few_rooms, few_users

INTERVAL, TIMEOUT = 10.0, 5.0
LATE = min(1.0, TIMEOUT / 2)  # a timer this late shows a stalled driver
MAX_ROOMS = 2
CONFIG = BrokerConfig(
    ping_interval=INTERVAL,
    ping_timeout=TIMEOUT,
    max_message_bytes=64,
    send_queue=4,
    send_queue_bytes=64 + 1024,  # the least the config allows: a few chats with padding
    max_rooms_per_connection=MAX_ROOMS,
)
TS0 = 1_700_000_000
PING_FRAME = b"PING\n"
OVERFLOW_CODE = 1008  # what the trio adapter closes a slow consumer with


def close_frame(code: int) -> bytes:
    return b"CLOSE %d\n" % code


# -- footprint: how much state an object holds, without naming its fields ---------------


def footprint(obj: object, seen: set[int] | None = None) -> int:
    """The number of container entries reachable from *obj* (a generic leak gauge)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, enum.Enum, type(None))):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return len(obj) + sum(footprint(k, seen) + footprint(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return len(obj) + sum(footprint(v, seen) for v in obj)
    if attrs.has(type(obj)):
        return sum(footprint(getattr(obj, f.name), seen) for f in attrs.fields(type(obj)))
    return sum(footprint(v, seen) for v in getattr(obj, "__dict__", {}).values())


# -- the model -------------------------------------------------------------------------


@attrs.define
class ModelConn:
    user: str
    default_room: str | None
    rooms: dict[str, None] = attrs.field(factory=dict)  # join order
    alive_at: float = 0.0
    pinged: bool = False
    window: float = 0.0  # when pinged: when its answer window opened
    grace: bool = False  # that window opened again after a stall (once per ping)


Expected = list[Any]


def deliver(conns: Iterable[int], envelope: dict[str, Any]) -> tuple[Any, ...]:
    return ("deliver", tuple(sorted(conns)), envelope)


def error(code: str) -> dict[str, Any]:
    return {"type": "error", "code": code}


def normalize(action: object) -> object:
    """An action as the model spells it: receivers as a sorted tuple, envelopes decoded,
    an error's human-readable text left out."""
    if isinstance(action, Deliver):
        envelope = json.loads(action.payload)
        if envelope.get("type") == "error":
            # The reason is for people: any non-empty text.
            assert isinstance(envelope["content"], str) and envelope["content"]
            envelope = error(envelope["code"])
        return deliver(action.conns, envelope)
    if isinstance(action, Close):
        return ("close", action.conn, action.code, action.reason)
    return action


@attrs.define
class Model:
    #: The epoch the broker gives a room's stream (learned once; it must never change:
    #: the machine's time stays far below the position TTL).
    epoch_of: Callable[[str], str]
    conns: dict[int, ModelConn] = attrs.field(factory=dict)
    seq: dict[str, int] = attrs.field(factory=dict)
    epochs: dict[str, str] = attrs.field(factory=dict)

    def members(self, room: str) -> set[int]:
        return {c for c, m in self.conns.items() if room in m.rooms}

    def present(self, room: str) -> set[str]:
        return {m.user for m in self.conns.values() if room in m.rooms}

    def rooms(self) -> set[str]:
        return {r for m in self.conns.values() for r in m.rooms}

    def connect(self, c: int, user: str, room: str | None, now: float, ts: int) -> Expected:
        self.conns[c] = ModelConn(user, room, alive_at=now)
        return self.join(c, room, ts) if room is not None else []

    def join(self, c: int, room: str, ts: int) -> Expected:
        m = self.conns[c]
        if room in m.rooms:
            return [deliver([c], self.state(room))]
        if len(m.rooms) >= MAX_ROOMS:
            return [deliver([c], error("forbidden"))]
        first = m.user not in self.present(room)
        m.rooms[room] = None
        out: Expected = []
        if first:
            out.append(deliver(self.members(room), self.presence("join", m.user, room, ts)))
            out.append(UserJoined(room=RoomName(room), username=Username(m.user)))
        out.append(deliver([c], self.state(room)))
        return out

    def leave(self, c: int, room: str, ts: int) -> Expected:
        m = self.conns[c]
        if room not in m.rooms:
            return [deliver([c], error("not_joined"))]
        del m.rooms[room]
        out: Expected = []
        if m.user not in self.present(room):
            if self.members(room):
                out.append(deliver(self.members(room), self.presence("leave", m.user, room, ts)))
            out.append(UserLeft(room=RoomName(room), username=Username(m.user)))
        # A room with nobody in it is freed; its stream (epoch, seq) is kept.
        return out

    def disconnect(self, c: int, ts: int) -> Expected:
        if c not in self.conns:
            return []
        out: Expected = []
        for room in list(self.conns[c].rooms):
            out += self.leave(c, room, ts)
        del self.conns[c]
        return out

    def chat(self, c: int, room: str | None, content: object, ts: int) -> Expected:
        m = self.conns[c]
        target = room or m.default_room
        if target is None or target not in m.rooms:
            return [deliver([c], error("not_joined"))]
        return self.publish(target, m.user, content, ts)

    def publish(self, room: str, user: str, content: object, ts: int) -> Expected:
        # Numbered and kept even with nobody in the room (delivered to nobody).
        seq = self.seq[room] = self.seq.get(room, 0) + 1
        envelope = {
            "type": "chat",
            "username": user,
            "content": content,
            "room": room,
            "timestamp": ts,
            "seq": seq,
        }
        notice = MessagePublished(
            room=RoomName(room),
            username=Username(user),
            content=content,
            seq=seq,
            timestamp=ts,
            epoch=self.epochs.setdefault(room, self.epoch_of(room)),
        )
        members = self.members(room)
        return [deliver(members, envelope), notice] if members else [notice]

    def state(self, room: str) -> dict[str, Any]:
        return {"type": "presence_state", "room": room, "users": sorted(self.present(room))}

    @staticmethod
    def presence(event: str, user: str, room: str, ts: int) -> dict[str, Any]:
        verb = "joined" if event == "join" else "left"
        return {
            "type": "presence",
            "event": event,
            "username": user,
            "content": f"{user} {verb} the room",
            "room": room,
            "timestamp": ts,
        }

    # heartbeats: a connection is pinged interval after its last sign of life, and
    # closed timeout after the ping (the same float sums the spec states), unless the
    # driver stalled since: a call more than LATE after the earliest deadline.
    resumed: float = -math.inf

    def due(self, c: int) -> float:
        m = self.conns[c]
        return m.window + TIMEOUT if m.pinged else m.alive_at + INTERVAL

    def notice_stall(self, now: float) -> None:
        due = [self.due(c) for c in self.conns if self.due(c) <= now]
        if due and now - min(due) > LATE:
            self.resumed = now

    def ping_due(self, c: int, now: float) -> bool:
        m = self.conns[c]
        return not m.pinged and now >= m.alive_at + INTERVAL

    def stalled(self, c: int, now: float) -> bool:
        m = self.conns[c]
        return (
            m.pinged
            and not m.grace
            and now >= m.window + TIMEOUT
            and m.window < self.resumed
            and now < self.resumed + TIMEOUT
        )

    def expired(self, c: int, now: float) -> bool:
        m = self.conns[c]
        return m.pinged and now >= m.window + TIMEOUT and not self.stalled(c, now)

    def deadline(self) -> float | None:
        due = [self.due(c) for c in self.conns]
        return min(due) if due else None


# -- the driver's side: one queue per connection, and what its receiver got --------------


@attrs.define
class Pipe:
    """
    One connection's SendQueue, the frames the policy says must go out, and the bytes
    its receiver read so far.

    The policy (see ``roombus.server.queues``): ``data()`` joins every waiting frame into one
    chunk, written until done; a data frame counts against the bounds until its chunk
    is completely written; dropping keeps a chunk already partly written.
    """

    queue: SendQueue
    slow: bool = False
    frames: list[tuple[bytes, bool]] = attrs.field(factory=list)  # (frame, is data)
    written: int = 0
    chunk: tuple[int, int] | None = None  # the chunk being written: [start, end)
    received: bytes = b""
    addressed: list[bytes] = attrs.field(factory=list)  # payloads the broker sent here
    overflowed: bool = False
    closing: bool = False
    gone: bool = False  # the peer went away (the driver reported it)
    in_flight: bytes | None = None  # data() handed to a write that has not returned yet

    def _waiting(self) -> list[tuple[int, bytes, bool]]:
        """(offset, frame, is data) of frames that still count: not completely written,
        or in a chunk that is not."""
        boundary = self.chunk[0] if self.chunk else self.written
        out, offset = [], 0
        for frame, data in self.frames:
            if offset >= boundary:
                out.append((offset, frame, data))
            offset += len(frame)
        return out

    def pending_data(self) -> tuple[int, int]:
        data = [f for _, f, is_data in self._waiting() if is_data]
        return len(data), sum(map(len, data))

    def push(self, payload: bytes) -> bool:
        """Push a data frame; True if the queue refused it by overflowing just now."""
        self.addressed.append(payload)
        frame = payload + b"\n"
        count, size = self.pending_data()
        # The policy: refuse a frame that would cross either bound (one frame alone always
        # fits: the byte bound is on a backlog), or anything once the queue is not open.
        fits = count < CONFIG.send_queue and (
            count == 0 or size + len(frame) <= CONFIG.send_queue_bytes
        )
        was_open = not (self.overflowed or self.closing)
        accepted = self.queue.push(frame)
        assert accepted == (was_open and fits), (
            "refused a frame that fits, or took one that doesn't"
        )
        if accepted:
            self.frames.append((frame, True))
            return False
        if was_open:
            assert self.queue.state is QueueState.OVERFLOWED
            self.overflowed = True
            self._drop_unstarted()
            return True
        return False

    def push_control(self, frame: bytes) -> None:
        assert self.queue.push_control(frame) == (not self.closing)
        if not self.closing:
            self.frames.append((frame, False))

    def push_pong(self, frame: bytes) -> None:
        """A pong answering the client's ping: it replaces one not handed out yet (only
        the latest ping needs an answer), or else queues like any control frame."""
        assert self.queue.push_pong(frame) == (not self.closing)
        if self.closing:
            return
        boundary = self.chunk[1] if self.chunk else self.written
        offset = 0
        for i, (f, data) in enumerate(self.frames):
            if offset >= boundary and f.startswith(b"PONG"):
                self.frames[i] = (frame, data)
                return
            offset += len(f)
        self.frames.append((frame, False))

    def close(self, code: int) -> None:
        if self.closing:
            assert not self.queue.close_with(close_frame(code), drop_pending=True)
            return
        assert self.queue.close_with(close_frame(code), drop_pending=True)
        self._drop_unstarted()
        self.frames.append((close_frame(code), False))
        self.closing = True

    def _drop_unstarted(self) -> None:
        # What was written stays written, and a chunk handed out by data() is finished:
        # it may be in flight (an async driver awaits its write before consume()), and a
        # stream cannot be cut mid-frame. The frames not handed out yet go.
        keep = self.chunk[1] if self.chunk else self.written
        kept, offset = [], 0
        for frame, data in self.frames:
            if offset < keep:
                kept.append((frame, data))
            offset += len(frame)
        self.frames = kept

    def take(self) -> bytes:
        """What ``data()`` hands out: the chunk being written, checked against the model."""
        data = bytes(self.queue.data())
        stream = b"".join(f for f, _ in self.frames)
        if self.chunk is None and data:  # a new chunk: everything waiting
            self.chunk = (self.written, len(stream))
        assert data == (stream[self.written : self.chunk[1]] if self.chunk else b"")
        return data

    def wrote(self, data: bytes, n: int) -> None:
        """*n* bytes of *data* (from ``take()``) reached the receiver."""
        pending = self.queue.nbytes
        self.queue.consume(n)
        assert self.queue.nbytes == pending - n, "consume() did not count what was written"
        self.written += n
        self.received += data[:n]
        assert self.chunk is not None
        if self.written == self.chunk[1]:
            self.chunk = None

    def drain(self) -> None:
        """The receiver reads all that is pending."""
        while self.queue:
            data = self.take()
            assert data
            self.wrote(data, len(data))

    def lines(self) -> list[bytes]:
        return self.received.split(b"\n")[:-1]


# -- the machine -------------------------------------------------------------------------


class CoreMachine(RuleBasedStateMachine):
    conns = Bundle("conns")

    def __init__(self) -> None:
        super().__init__()
        self.broker = Broker(CONFIG)
        self.texts = 0  # messages handed in so far
        self.model = Model(lambda room: self.broker.position(room).epoch)
        self.pipes: dict[int, Pipe] = {}
        self.retired: list[Pipe] = []  # pipes of connections whose id was reused
        self.now = 0.0
        self.next_id = 0
        self.sent: dict[int, int] = {}  # sender -> messages it sent (0: the server)
        self.next_pong = 0
        self.published = 0  # chats published, as the notices told
        self.delivered = 0  # envelopes handed out, one per receiver

    @property
    def ts(self) -> int:
        return TS0 + int(self.now)

    # -- carrying out a step, as the trio adapter does ----------------------------------

    def call(self, event: object, expected: Expected) -> None:
        """Hand *event* to the broker, compare its actions with the model's, carry them out.
        Every other message goes in through ``handle_text`` (the drivers' path), the
        others as a ``TextReceived``: both must do the same."""
        if isinstance(event, TextReceived) and self.texts % 2:
            actions = self.broker.handle_text(
                event.conn, event.text, now=self.now, timestamp=self.ts
            )
        else:
            actions = self.broker.handle(event, now=self.now, timestamp=self.ts)  # type: ignore[arg-type]
        self.texts += isinstance(event, TextReceived)
        self.check_shape(actions)
        assert [normalize(a) for a in actions] == expected
        self.apply(actions)

    def check_shape(self, actions: list[Any]) -> None:
        # Receivers: live ones, and ones closed later in this list, until they are.
        live = set(self.broker.connected()) | {a.conn for a in actions if isinstance(a, Close)}
        for a in actions:
            if isinstance(a, Deliver):
                assert a.conns, "a Deliver with no receiver"
                assert len(set(a.conns)) == len(a.conns), "a receiver twice in one Deliver"
                assert set(a.conns) <= live, "a Deliver to a closed connection"
            elif isinstance(a, Close):
                live.discard(a.conn)

    def apply(self, actions: list[Any]) -> None:
        overflowed: list[int] = []
        for a in actions:
            if isinstance(a, MessagePublished):
                self.published += 1
            if isinstance(a, Deliver):
                self.delivered += len(a.conns)
                for c in a.conns:
                    if self.pipes[c].push(a.payload):
                        overflowed.append(c)
            elif isinstance(a, SendPing):
                self.pipes[a.conn].push_control(PING_FRAME)
            elif isinstance(a, Close):
                self.pipes[a.conn].close(a.code)
        # A slow consumer: close it with 1008 and tell the broker it is gone.
        for c in overflowed:
            event("a slow receiver overflowed")
            self.pipes[c].close(OVERFLOW_CODE)
            self.call(ClientDisconnected(conn=ConnectionId(c)), self.model.disconnect(c, self.ts))

    def settle(self) -> None:
        """Writes go on. A fast receiver takes everything at once. For a slow one, as for
        a stalled peer in the trio adapter, a write of ``data()`` is under way and does not
        return (until ``write_returns``), while other steps go on."""
        for pipe in self.pipes.values():
            if pipe.slow:
                if pipe.in_flight is None and pipe.queue:
                    pipe.in_flight = pipe.take()
            else:
                if pipe.in_flight is not None:
                    data, pipe.in_flight = pipe.in_flight, None
                    pipe.wrote(data, len(data))
                pipe.drain()

    def text(self, c: int, message: object) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.call(TextReceived(conn=ConnectionId(c), text=text), self.expect_text(c, message))

    def expect_text(self, c: int, message: object) -> Expected:
        if c not in self.model.conns:
            return []
        assert isinstance(message, dict)
        kind = message["type"]
        if kind == "join":
            return self.model.join(c, message["room"], self.ts)
        if kind == "leave":
            return self.model.leave(c, message["room"], self.ts)
        if kind == "ping":
            return [deliver([c], {"type": "pong"})]
        assert kind == "chat"
        return self.model.chat(c, message.get("room"), message["content"], self.ts)

    def content(self, sender: int, pad: int = 0) -> dict[str, Any]:
        n = self.sent[sender] = self.sent.get(sender, 0) + 1
        return {"c": sender, "n": n, "pad": "x" * pad} if pad else {"c": sender, "n": n}

    # -- rules: clients -----------------------------------------------------------------

    @rule(target=conns, user=few_users, room=st.none() | few_rooms, slow=st.booleans())
    def connect(self, user: str, room: str | None, slow: bool) -> int:
        self.next_id += 1
        c = self.next_id
        self.open(c, user, room, slow)
        return c

    def open(self, c: int, user: str, room: str | None, slow: bool) -> None:
        if c in self.pipes:
            self.retired.append(self.pipes[c])
        self.pipes[c] = Pipe(SendQueue(CONFIG.send_queue, CONFIG.send_queue_bytes), slow=slow)
        self.call(
            ClientConnected(
                conn=ConnectionId(c),
                username=Username(user),
                room=RoomName(room) if room is not None else None,
            ),
            self.model.connect(c, user, room, self.now, self.ts),
        )
        self.settle()

    @rule(c=conns, user=few_users, room=few_rooms)
    def reuse_id(self, c: int, user: str, room: str) -> None:
        """A driver may reuse a closed connection's id; reusing a live one is its mistake."""
        if c in self.model.conns:
            with pytest.raises(LocalProtocolError, match=f"connection {c} "):  # says which
                self.broker.handle(
                    ClientConnected(conn=ConnectionId(c), username=Username(user)),
                    now=self.now,
                    timestamp=self.ts,
                )
            return
        self.open(c, user, room, slow=False)

    @rule(c=conns, room=few_rooms)
    def join(self, c: int, room: str) -> None:
        self.text(c, {"type": "join", "room": room})
        self.settle()

    @rule(c=conns, room=few_rooms)
    def leave(self, c: int, room: str) -> None:
        self.text(c, {"type": "leave", "room": room})
        self.settle()

    @rule(c=conns, room=st.sampled_from([None, "", "r1", "r2", "r3"]))
    def chat(self, c: int, room: str | None) -> None:
        message: dict[str, Any] = {"type": "chat", "content": self.content(c)}
        if room is not None:
            message["room"] = room
        self.text(c, message)
        self.settle()

    @rule(c=conns, room=few_rooms, n=st.integers(1, 6), pad=st.integers(0, 400) | st.just(1100))
    def burst(self, c: int, room: str, n: int, pad: int) -> None:
        for _ in range(n):
            self.text(c, {"type": "chat", "room": room, "content": self.content(c, pad)})
        self.settle()

    @rule(room=few_rooms, n=st.integers(1, 3))
    def server_publish(self, room: str, n: int) -> None:
        for _ in range(n):
            content = self.content(0)
            actions = self.broker.publish(room, content, username="server", timestamp=self.ts)
            self.check_shape(actions)
            expected = self.model.publish(room, "server", content, self.ts)
            assert [normalize(a) for a in actions] == expected
            self.apply(actions)
        self.settle()

    @rule(c=conns)
    def client_ping(self, c: int) -> None:
        """A ping frame from the client: the driver queues the pong (the broker is not
        involved)."""
        self.next_pong += 1
        self.pipes[c].push_pong(b"PONG %d\n" % self.next_pong)
        self.settle()

    @rule(c=conns)
    def app_ping(self, c: int) -> None:
        self.text(c, {"type": "ping"})
        self.settle()

    @rule(c=conns, bad=bad_requests)
    def bad_input(self, c: int, bad: tuple[str, str]) -> None:
        text, code = bad
        expected = [deliver([c], error(code))] if c in self.model.conns else []
        self.call(TextReceived(conn=ConnectionId(c), text=text), expected)
        self.settle()

    @rule(c=conns)
    def disconnect(self, c: int) -> None:
        # Also for a connection already gone: reporting it again is a no-op.
        self.pipes[c].gone = True
        self.call(ClientDisconnected(conn=ConnectionId(c)), self.model.disconnect(c, self.ts))
        self.settle()

    @precondition(lambda self: self.model.conns)
    @rule()
    def everyone_leaves(self) -> None:
        for c in list(self.model.conns):
            self.disconnect(c)

    @rule(c=conns, slow=st.booleans())
    def set_slow(self, c: int, slow: bool) -> None:
        self.pipes[c].slow = slow
        self.settle()

    @rule(c=conns, fraction=st.floats(0, 1))
    def write_returns(self, c: int, fraction: float) -> None:
        """A write under way returns: some or all of what it was handed went out."""
        pipe = self.pipes[c]
        if pipe.in_flight is not None:
            data, pipe.in_flight = pipe.in_flight, None
            pipe.wrote(data, int(len(data) * fraction))
        self.settle()

    # -- rules: time --------------------------------------------------------------------

    @rule(c=conns)
    def pong(self, c: int) -> None:
        self.call(PongReceived(conn=ConnectionId(c)), [])
        if c in self.model.conns:
            self.model.conns[c].alive_at = self.now
            self.model.conns[c].pinged = False

    @rule(dt=st.floats(min_value=0, max_value=20) | st.sampled_from([INTERVAL, TIMEOUT]))
    def advance(self, dt: float) -> None:
        self.now += dt
        self.tick()

    @precondition(lambda self: self.broker.next_deadline() is not None)
    @rule()
    def jump_to_deadline(self) -> None:
        deadline = self.broker.next_deadline()
        assert deadline is not None
        # Time only moves on: every earlier deadline was already handled.
        assert deadline > self.now
        self.now = deadline
        self.tick()

    @precondition(lambda self: self.broker.next_deadline() is not None)
    @rule()
    def jump_just_before_deadline(self) -> None:
        deadline = self.broker.next_deadline()
        assert deadline is not None
        self.now = max(self.now, math.nextafter(deadline, -math.inf))
        self.tick()

    def tick(self) -> None:
        model, now = self.model, self.now
        model.notice_stall(now)
        expired = {c for c in model.conns if model.expired(c, now)}
        due = {c for c in model.conns if model.ping_due(c, now)}
        for c in model.conns:
            if model.stalled(c, now):
                event("a ping's answer window opened again after a stall")
                model.conns[c].window = model.resumed
                model.conns[c].grace = True
        actions = self.broker.handle_timeout(now=now, timestamp=self.ts)
        self.check_shape(actions)
        closes = [a for a in actions if isinstance(a, Close)]
        pings = [a for a in actions if isinstance(a, SendPing)]
        # Gone at the deadline, not before and not after; pinged once per silence.
        assert sorted(a.conn for a in closes) == sorted(expired)
        assert sorted(a.conn for a in pings) == sorted(due)
        for _ in closes:
            event("a silent peer was closed")
        # The broker picks the order; each close is followed by what its departure causes.
        expected: Expected = []
        for a in actions:
            if isinstance(a, SendPing):
                expected.append(normalize(a))
                model.conns[a.conn].pinged = True
                model.conns[a.conn].window = now
                model.conns[a.conn].grace = False
            elif isinstance(a, Close):
                expected.append(("close", a.conn, PING_TIMEOUT_CODE, "ping timeout"))
                expected += model.disconnect(a.conn, self.ts)
        assert [normalize(a) for a in actions] == expected
        self.apply(actions)
        self.settle()

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def presence_matches_the_model(self) -> None:
        broker, model = self.broker, self.model
        assert set(broker.rooms) == model.rooms()
        for room in ["r1", "r2", "r3"]:
            assert broker.members(room) == sorted(model.present(room))
            assert sorted(broker.connections(room)) == sorted(model.members(room))
        for c, pipe in self.pipes.items():
            live = c in model.conns
            assert (c in broker) == live
            assert broker.rooms_of(ConnectionId(c)) == (list(model.conns[c].rooms) if live else [])
            assert pipe.closing or pipe.gone or live, "a connection dropped without a close"
        stats = broker.statistics()
        assert (stats.connections, stats.rooms) == (len(model.conns), len(model.rooms()))
        assert (stats.messages_published, stats.deliveries) == (self.published, self.delivered)

    @invariant()
    def seq_rises_by_one_per_message(self) -> None:
        for room in ["r1", "r2", "r3"]:
            assert self.broker.seq(room) == self.model.seq.get(room, 0)

    @invariant()
    def deadline_is_the_earliest_needed(self) -> None:
        assert self.broker.next_deadline() == self.model.deadline()

    @invariant()
    def queues_stay_within_bounds(self) -> None:
        for pipe in self.pipes.values():
            q = pipe.queue
            assert q.messages <= CONFIG.send_queue
            assert q.data_bytes <= CONFIG.send_queue_bytes or q.messages == 1
            assert (q.messages, q.data_bytes) == pipe.pending_data()
            assert q.nbytes == sum(len(f) for f, _ in pipe.frames) - pipe.written

    @invariant()
    def receivers_get_exactly_their_messages(self) -> None:
        for pipe in [*self.pipes.values(), *self.retired]:
            lines = pipe.lines()
            closes = [i for i, line in enumerate(lines) if line.startswith(b"CLOSE")]
            assert closes in ([], [len(lines) - 1]), "a frame after the close frame"
            data = [line for line in lines if line.startswith(b"{")]
            # Whatever arrived is what was sent here, in order, with nothing skipped ...
            assert data == pipe.addressed[: len(data)]
            # ... and a receiver that keeps up and was not closed got all of it: one that
            # fell behind changed nothing for it.
            if not (pipe.slow or pipe.overflowed or pipe.closing or pipe.in_flight is not None):
                assert data == pipe.addressed

    @invariant()
    def per_sender_order_holds_for_every_receiver(self) -> None:
        for pipe in [*self.pipes.values(), *self.retired]:
            last: dict[int, int] = {}
            for line in pipe.lines():
                if line.startswith(b"{"):
                    envelope = json.loads(line)
                    if envelope["type"] == "chat":
                        sender, n = envelope["content"]["c"], envelope["content"]["n"]
                        assert n > last.get(sender, 0), "out of order, or twice"
                        last[sender] = n

    @invariant()
    def nothing_leaks(self) -> None:
        broker = self.broker
        broker.next_deadline()  # what a driver calls after every step
        live = len(self.model.conns)
        memberships = sum(len(m.rooms) for m in self.model.conns.values())
        # Room streams keep positions and history by design, bounded by their own
        # limits (tests/core/test_streams.py): counted apart.
        streams = broker.streams
        assert len(streams) <= 3  # r1, r2, r3
        assert streams.used_bytes <= CONFIG.history_max_bytes
        if not live:
            assert broker.rooms == []
            assert broker.next_deadline() is None
            assert footprint(broker, {id(streams)}) == 0, "state left behind with nobody connected"
        else:
            # State grows with connections and memberships, never with traffic.
            assert footprint(broker, {id(streams)}) <= 16 * (live + memberships) + 300


TestCore = CoreMachine.TestCase
# Three times the profile's examples (the fuzzers' budget), each up to 80 steps.
TestCore.settings = settings(max_examples=3 * settings.default.max_examples, stateful_step_count=80)
