"""
The client protocol against the real sans-IO core, under faults: exactly once, or told.

Two :class:`ClientProtocol` instances talk to a :class:`roombus.lowlevel.Broker` through
a model network that loses connections at any point (messages in flight both ways
are lost with it), closes them as a server would (1001 drain, 1008 slow consumer),
restarts the server (new epochs), and lets time pass (backoff, pings). Applications read
their events slowly (a queue of 3 events: rooms fall behind and catch up), publish with
a small outbox, join and leave rooms; the server publishes too.

What each application sees must hold at every step:

* each message once: no content twice in a room, and the seq the server gave it;
* in order: within an epoch, the next message of a room is the next seq, unless the
  application was told since its last one (a ``Joined`` not recovered, a ``Reset``);
* never a :class:`Gap` (the client saw a jump the server did not announce);
* a publish settles once, with the position the server gave it.

And once the faults stop: every publish is acknowledged, every room the client is in
is caught up with the server's latest message, the outbox is empty.
"""

from __future__ import annotations

import json
import random
from collections import deque
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from roombus import BrokerConfig, RoomName, Username
from roombus.client.protocol import (
    ClientOptions,
    ClientProtocol,
    CloseConnection,
    Gap,
    Joined,
    Message,
    NotInRoom,
    OpenConnection,
    OutboxFull,
    Phase,
    PublishFailed,
    Reset,
    SendText,
)
from roombus.core.streams import Position
from roombus.lowlevel import (
    Broker,
    ClientConnected,
    ClientDisconnected,
    Close,
    ConnectionId,
    Deliver,
    TextReceived,
)
from roombus.server.handshake import parse_since

ROOMS = ("r1", "r2")
TS = 1_700_000_000
OPTIONS = ClientOptions(
    max_events=3,
    outbox_size=3,
    backoff_initial=0.5,
    backoff_max=4.0,
    ping_interval=30.0,
    ping_timeout=5.0,
)


def new_broker() -> Broker:
    return Broker(
        BrokerConfig(
            heartbeat=False,
            rate_limit=0,
            history_size=6,
            recovery_max=4,
            history_ttl=1e6,
            position_ttl=1e6,
            dedup_window=1e6,
        )
    )


@attrs.define
class Link:
    gen: int
    conn: ConnectionId
    to_client: deque[str | tuple[int, str]] = attrs.field(factory=deque)
    to_server: deque[str] = attrs.field(factory=deque)


@attrs.define
class App:
    name: str
    proto: ClientProtocol
    link: Link | None = None
    last: dict[str, tuple[str, int]] = attrs.field(factory=dict)  # room -> (epoch, seq)
    told: set[str] = attrs.field(factory=set)  # rooms told since their last message
    seen: dict[str, set[int]] = attrs.field(factory=dict)  # room -> contents
    published: dict[str, tuple[str, int]] = attrs.field(factory=dict)  # id -> (room, content)
    settled: dict[str, Position | PublishFailed] = attrs.field(factory=dict)


class ClientAgainstCore(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.broker = new_broker()
        self.epoch_gen = 0  # server restarts
        self.conns = 0
        self.links: dict[ConnectionId, App] = {}
        self.contents = 0
        # content -> (room, seq, restarts) as the server numbered it (a resend after a
        # restart may be numbered again, in the new epoch: that is the documented limit)
        self.truth: dict[int, set[tuple[str, int, int]]] = {}
        self.apps = [
            App(
                f"u{i}",
                ClientProtocol(["r1"], username=f"u{i}", options=OPTIONS, rng=random.Random(i)),
            )
            for i in range(2)
        ]
        for app in self.apps:
            app.proto.start(self.now)
            self.pump(app)

    # -- the network --------------------------------------------------------------------

    def route(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                env = json.loads(action.payload)
                if env.get("type") == "chat":
                    content = env["content"]
                    if isinstance(content, int):
                        self.truth.setdefault(content, set()).add(
                            (env["room"], env["seq"], self.epoch_gen)
                        )
                for conn in action.conns:
                    app = self.links.get(conn)
                    if app is not None and app.link is not None:
                        app.link.to_client.append(action.payload.decode())
            elif isinstance(action, Close):
                app = self.links.pop(action.conn, None)
                if app is not None and app.link is not None:
                    app.link.to_client.append((action.code, action.reason))

    def pump(self, app: App) -> None:
        """Carry out what the client asks for."""
        proto = app.proto
        while True:
            actions = proto.take_actions()
            if not actions:
                break
            for action in actions:
                if isinstance(action, OpenConnection):
                    self.open(app, action)
                elif isinstance(action, SendText):
                    if app.link is not None and app.link.gen == action.gen:
                        app.link.to_server.append(action.text)
                else:
                    assert isinstance(action, CloseConnection)
                    if app.link is not None and app.link.gen == action.gen:
                        self.drop_link(app)
        for pub_id, outcome in proto.take_settled():
            assert pub_id not in app.settled, f"{pub_id} settled twice"
            assert pub_id in app.published
            app.settled[pub_id] = outcome
            if isinstance(outcome, Position):
                room, content = app.published[pub_id]
                numbered = {(r, s) for r, s, _ in self.truth.get(content, ())}
                assert (room, outcome.seq) in numbered, (pub_id, outcome, numbered)
            else:
                assert outcome.code in ("closed", "left"), outcome

    def open(self, app: App, action: OpenConnection) -> None:
        assert app.link is None or app.link.gen != action.gen
        if app.link is not None:
            self.drop_link(app)
        query = dict(parse_qsl(urlsplit(action.target).query, keep_blank_values=True))
        self.conns += 1
        conn = ConnectionId(self.conns)
        app.link = Link(action.gen, conn)
        self.links[conn] = app
        app.proto.opened(action.gen, self.now)
        self.route(
            self.broker.handle(
                ClientConnected(
                    conn=conn,
                    username=Username(query["username"]),
                    room=RoomName(query["room"]),
                    positioned="since" in query,
                    since=parse_since(query.get("since", "")),
                    partial=query.get("partial") == "1",
                ),
                now=self.now,
                timestamp=TS,
            )
        )

    def drop_link(self, app: App) -> None:
        """The connection is gone, with whatever was in flight."""
        link = app.link
        assert link is not None
        app.link = None
        if self.links.pop(link.conn, None) is not None:
            self.route(
                self.broker.handle(ClientDisconnected(conn=link.conn), now=self.now, timestamp=TS)
            )

    # -- rules: the network and the server ----------------------------------------------

    @rule(i=st.integers(0, 1), n=st.integers(1, 6))
    def to_client(self, i: int, n: int) -> None:
        app = self.apps[i]
        for _ in range(n):
            link = app.link
            if link is None or not link.to_client:
                break
            item = link.to_client.popleft()
            if isinstance(item, tuple):
                app.link = None
                app.proto.closed(link.gen, self.now, item[0], item[1])
            else:
                app.proto.received(link.gen, item, self.now)
            self.pump(app)

    @rule(i=st.integers(0, 1), n=st.integers(1, 6))
    def to_server(self, i: int, n: int) -> None:
        app = self.apps[i]
        for _ in range(n):
            link = app.link
            if link is None or not link.to_server or link.conn not in self.links:
                break
            text = link.to_server.popleft()
            self.route(
                self.broker.handle(
                    TextReceived(conn=link.conn, text=text), now=self.now, timestamp=TS
                )
            )

    @rule(i=st.integers(0, 1))
    def cut(self, i: int) -> None:
        """The connection breaks (no close frame); both directions lose what was in flight."""
        app = self.apps[i]
        if app.link is not None:
            gen = app.link.gen
            self.drop_link(app)
            app.proto.closed(gen, self.now, None, "connection lost")
            self.pump(app)

    @rule(i=st.integers(0, 1), code=st.sampled_from([(1001, ""), (1008, "send queue full")]))
    def server_closes(self, i: int, code: tuple[int, str]) -> None:
        """The server closes the connection (a drain; a slow consumer), dropping the rest."""
        app = self.apps[i]
        if app.link is not None and app.link.conn in self.links:
            link = app.link
            self.drop_link(app)
            link.to_client.clear()
            app.proto.closed(link.gen, self.now, code[0], code[1])
            self.pump(app)

    @rule()
    def server_restart(self) -> None:
        """The server restarts: every stream starts over in a new epoch."""
        for app in self.apps:
            if app.link is not None:
                gen = app.link.gen
                app.link = None
                app.proto.closed(gen, self.now, 1001, "")
                self.pump(app)
        self.links.clear()
        self.broker = new_broker()
        self.epoch_gen += 1

    @rule(room=st.sampled_from(ROOMS), n=st.integers(1, 3))
    def server_publish(self, room: str, n: int) -> None:
        for _ in range(n):
            self.contents += 1
            self.route(
                self.broker.publish(room, self.contents, username="srv", timestamp=TS, now=self.now)
            )

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 3.0, 6.0]))
    def wait(self, dt: float) -> None:
        self.now += dt
        for app in self.apps:
            app.proto.handle_timer(self.now)
            self.pump(app)

    # -- rules: the applications ----------------------------------------------------------

    @rule(i=st.integers(0, 1), n=st.integers(1, 5))
    def read(self, i: int, n: int) -> None:
        app = self.apps[i]
        for _ in range(n):
            ev = app.proto.next_event()
            self.pump(app)  # reading may let a room catch up
            if ev is None:
                return
            self.check(app, ev)

    @rule(i=st.integers(0, 1), room=st.sampled_from(ROOMS))
    def publish(self, i: int, room: str) -> None:
        app = self.apps[i]
        self.contents += 1
        try:
            pub_id = app.proto.publish(room, self.contents)
        except (OutboxFull, NotInRoom):
            return
        app.published[pub_id] = (room, self.contents)
        self.pump(app)

    @rule(i=st.integers(0, 1), room=st.sampled_from(ROOMS))
    def join(self, i: int, room: str) -> None:
        app = self.apps[i]
        app.proto.join(room, self.now)
        self.pump(app)

    @rule(i=st.integers(0, 1), room=st.sampled_from(ROOMS))
    def leave(self, i: int, room: str) -> None:
        app = self.apps[i]
        if len(app.proto.rooms) > 1:
            app.proto.leave(room)
            self.pump(app)

    # -- the promise ------------------------------------------------------------------------

    def check(self, app: App, ev: Any) -> None:
        assert not isinstance(ev, Gap), f"{app.name}: a silent gap {ev}"
        if isinstance(ev, Joined):
            event(f"joined recovered={ev.recovered} {ev.reason}")
            if ev.recovered is not True:
                app.told.add(ev.room)
            else:
                assert app.last.get(ev.room, (ev.epoch,))[0] == ev.epoch, (app.name, ev)
            return
        if isinstance(ev, Reset):
            app.told.add(ev.room)
            return
        if not isinstance(ev, Message):
            return
        room, content = ev.room, ev.content
        assert isinstance(content, int)
        seen = app.seen.setdefault(room, set())
        assert content not in seen, f"{app.name} got {content} twice in {room}"
        seen.add(content)
        numbered = {(r, s) for r, s, _ in self.truth[content]}
        assert (room, ev.seq) in numbered, (ev, numbered)
        assert ev.epoch is not None and ev.seq is not None
        last = app.last.get(room)
        if room in app.told or last is None:
            app.told.discard(room)
            if last is not None and last[0] == ev.epoch:
                assert ev.seq > last[1], (app.name, last, ev)
        else:
            assert (ev.epoch, ev.seq) == (last[0], last[1] + 1), (app.name, last, ev)
        app.last[room] = (ev.epoch, ev.seq)

    @invariant()
    def bounded(self) -> None:
        for app in self.apps:
            assert app.proto.pending_events() <= OPTIONS.max_events + 16
            assert len(app.proto.outbox()) <= OPTIONS.outbox_size

    def teardown(self) -> None:
        """The faults stop: everything settles, every room catches up."""
        for _ in range(60):
            busy = False
            for app in self.apps:
                self.now += 0.5
                app.proto.handle_timer(self.now)
                self.pump(app)
                while app.link is not None and (app.link.to_client or app.link.to_server):
                    busy = True
                    self.to_server(self.apps.index(app), 6)
                    self.to_client(self.apps.index(app), 6)
                while (ev := app.proto.next_event()) is not None:
                    busy = True
                    self.check(app, ev)
                    self.pump(app)
            if not busy and all(a.proto.phase is Phase.OPEN for a in self.apps):
                break
        for app in self.apps:
            event(
                f"fell behind: {min(app.proto.dropped, 1)}, duplicates: {min(app.proto.duplicates, 1)}"
            )
            event(
                f"publishes acked: {min(sum(isinstance(o, Position) for o in app.settled.values()), 3)}"
            )
            assert app.proto.phase is Phase.OPEN, app.proto.phase
            assert app.proto.outbox() == [], app.proto.outbox()
            for pub_id in app.published:
                assert pub_id in app.settled, f"{pub_id} never settled"
        # One more message per room reaches every member, right after its last one.
        final = {}
        for room in ROOMS:
            self.server_publish(room, 1)
            final[room] = self.contents
        for i, app in enumerate(self.apps):
            while app.link is not None and app.link.to_client:
                self.to_client(i, 6)
            while (ev := app.proto.next_event()) is not None:
                self.check(app, ev)
                self.pump(app)
                while app.link is not None and (app.link.to_client or app.link.to_server):
                    self.to_server(i, 6)
                    self.to_client(i, 6)
            for room in app.proto.rooms:
                assert final[room] in app.seen.get(room, set()), (app.name, room, final[room])


TestClientAgainstCore = ClientAgainstCore.TestCase
TestClientAgainstCore.settings = settings(
    stateful_step_count=60, max_examples=3 * settings.default.max_examples
)
