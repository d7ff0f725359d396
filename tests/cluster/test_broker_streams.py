"""
Room streams in a cluster: positions, resume on any node, acknowledged publish,
history, gap repair, and what a member that follows positions is told when the
numbering it follows restarts -- against the in-memory backplane (``model.py``).

The state machine at the end is the proof of the promise "every message exactly once,
or told": clients that follow positions disconnect at random points and reconnect to a
random node with the last position they saw, while others publish (with and without
ids, and from server-side code), links are lost and restored, nodes die and Redis
restarts, empty or with the data of a snapshot it took earlier; the backplane's work is interleaved in any order it allows. For every
client and room, each chat it is sent is the next seq of the position it holds (never a
gap, a repeat or a step back), replayed exactly when at or below its ``joined`` seq; a
gap is only ever a ``joined`` that says what it did not recover, or a ``reset``; no two
chats share a position; no chat reaches a client twice. Once everything is connected
and quiet, every client in a room holds the room's position in Redis: nothing was held
back silently.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from roombus import BrokerConfig, RoomName, Username
from roombus.cluster import (
    Announce,
    BackplaneLost,
    BackplaneRestored,
    ClusterBroker,
    Relay,
    Subscribe,
    Unsubscribe,
)
from roombus.core.actions import ReadStream
from roombus.lowlevel import (
    ClientConnected,
    ClientDisconnected,
    ConnectionId,
    Deliver,
    Event,
    TextReceived,
)

from .model import Channel, ModelBackplane, Record

TS = 1_700_000_000
CONFIG = BrokerConfig(heartbeat=False, rate_limit=0, history_size=5)
NODES = ("n1", "n2", "n3")


@attrs.define
class Net:
    """Brokers of a cluster over the model backplane, and what each connection got."""

    nodes: tuple[str, ...] = NODES
    config: BrokerConfig = CONFIG
    brokers: dict[str, ClusterBroker] = attrs.field(init=False)
    bp: ModelBackplane = attrs.field(init=False)
    got: dict[int, list[dict[str, Any]]] = attrs.field(factory=dict)
    node_of: dict[int, str] = attrs.field(factory=dict)
    now: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.brokers = {n: ClusterBroker(self.config, node=n) for n in self.nodes}
        self.bp = ModelBackplane(self.nodes, self.handle)
        for node in self.nodes:
            self.restore(node)

    def handle(self, node: str, event: Event) -> list[Any]:
        self.now += 1.0
        actions = self.brokers[node].handle(event, now=self.now, timestamp=TS)
        self.apply(node, actions)
        return actions

    def apply(self, node: str, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Deliver):
                for conn in a.conns:
                    assert self.node_of.get(conn) == node, (conn, a)
                    self.got[conn].append(json.loads(a.payload))
            elif isinstance(a, (Subscribe, Unsubscribe, Relay, Announce, ReadStream)):
                assert self.bp.links[node].online, f"{node} asked for {a!r} while offline"
                self.bp.submit(node, a)

    def restore(self, node: str) -> None:
        self.bp.restore(node)
        self.handle(node, BackplaneRestored())

    def lose(self, node: str) -> None:
        self.bp.lose(node)
        self.handle(node, BackplaneLost())

    def connect(self, node: str, conn: int, user: str) -> None:
        self.got[conn] = []
        self.node_of[conn] = node
        self.handle(node, ClientConnected(conn=ConnectionId(conn), username=Username(user)))

    def send(self, conn: int, message: dict[str, Any]) -> None:
        node = self.node_of[conn]
        self.handle(node, TextReceived(conn=ConnectionId(conn), text=json.dumps(message)))

    def disconnect(self, conn: int) -> None:
        node = self.node_of.pop(conn)
        if self.bp.links[node].alive:
            self.handle(node, ClientDisconnected(conn=ConnectionId(conn)))

    def quiesce(self) -> None:
        self.bp.drain()

    def of(self, conn: int, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.got[conn] if e["type"] == kind]


def chats(net: Net, conn: int) -> list[tuple[int, Any, bool]]:
    return [(e["seq"], e["content"], e.get("replayed", False)) for e in net.of(conn, "chat")]


def test_a_client_resumes_on_another_node_with_what_it_missed() -> None:
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    (joined,) = net.of(1, "joined")
    assert "recovered" not in joined and joined["seq"] == 0
    epoch = joined["epoch"]
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(2, {"type": "chat", "room": "r", "content": "one"})
    net.quiesce()
    assert chats(net, 1) == [(1, "one", False)]
    net.disconnect(1)  # ann's node is left; bob goes on
    for text in ("two", "three"):
        net.send(2, {"type": "chat", "room": "r", "content": text})
    net.quiesce()
    net.connect("n3", 3, "ann")
    net.send(3, {"type": "join", "room": "r", "since": {"epoch": epoch, "seq": 1}})
    net.send(2, {"type": "chat", "room": "r", "content": "four"})  # races the read
    net.quiesce()
    (joined,) = net.of(3, "joined")
    assert (joined["epoch"], joined["recovered"]) == (epoch, True)
    top = joined["seq"]
    got = chats(net, 3)
    assert [seq for seq, _, _ in got] == [2, 3, 4]
    assert [c for _, c, _ in got] == ["two", "three", "four"]
    assert all(replayed == (seq <= top) for seq, _, replayed in got)


def test_an_acknowledged_publish_is_numbered_once_in_the_cluster() -> None:
    net = Net()
    for conn, node in ((1, "n1"), (2, "n2")):
        net.connect(node, conn, f"u{conn}")
        net.send(conn, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "x", "id": "m1"})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "x", "id": "m1"})  # a resend
    net.quiesce()
    first, again = net.of(1, "ack")
    assert first == again and (first["id"], first["seq"]) == ("m1", 1)
    assert first["epoch"] == net.brokers["n2"].position("r").epoch
    assert chats(net, 2) == [(1, "x", False)] and chats(net, 1) == [(1, "x", False)]
    assert (
        net.brokers["n1"]._cluster[RoomName("r")].outbox
        == type(net.brokers["n1"]._cluster[RoomName("r")].outbox)()
    )


def test_history_is_read_from_the_stream_on_any_node() -> None:
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.quiesce()
    for i in range(7):
        net.send(1, {"type": "chat", "room": "r", "content": i})
    net.quiesce()
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    epoch = net.brokers["n2"].position("r").epoch
    net.send(2, {"type": "history", "room": "r", "limit": 3, "id": "h"})
    net.send(2, {"type": "history", "room": "r", "since": {"epoch": epoch, "seq": 3}, "id": "s"})
    net.send(2, {"type": "history", "room": "r", "since": {"epoch": "old", "seq": 3}, "limit": 2})
    net.quiesce()
    latest, after, other = net.of(2, "history")
    assert (latest["id"], latest["epoch"], latest["seq"]) == ("h", epoch, 7)
    assert [e["content"] for e in latest["items"]] == [4, 5, 6]
    assert [e["seq"] for e in after["items"]] == [4, 5, 6, 7]  # the history keeps 5: 3..7
    assert [e["seq"] for e in other["items"]] == [6, 7]  # another epoch: the latest


def test_a_resume_older_than_the_history_is_told_the_exact_loss() -> None:
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.quiesce()
    for i in range(9):
        net.send(1, {"type": "chat", "room": "r", "content": i})
    net.quiesce()
    epoch = net.brokers["n1"].position("r").epoch
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": epoch, "seq": 1}})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    assert (joined["recovered"], joined["reason"]) == (False, "too_old")
    assert joined["lost"] == {"from": 2, "to": 4} and chats(net, 2) == []
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": "gone", "seq": 1}})
    net.quiesce()
    assert net.of(2, "joined")[-1]["reason"] == "epoch_changed"


def test_a_lost_record_is_repaired_from_the_stream() -> None:
    net = Net()
    net.connect("n1", 1, "ann")
    net.connect("n2", 2, "bob")
    for conn in (1, 2):
        net.send(conn, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    for i in range(3):
        net.send(1, {"type": "chat", "room": "r", "content": i})
    # Run n1's relays, then drop the second record before it reaches n2.
    while net.bp.links["n1"].commands:
        net.bp.run_command("n1")
    box = net.bp.links["n2"].inbox["r"]
    assert len(box) == 3
    del box[1]
    net.quiesce()
    assert [seq for seq, _, _ in chats(net, 2)] == [1, 2, 3]
    assert net.of(2, "reset") == []
    assert net.brokers["n2"].statistics().repairs == 1


def test_a_node_cut_off_numbers_on_its_own_and_says_so() -> None:
    net = Net()
    net.connect("n1", 1, "ann")
    net.connect("n1", 2, "old")  # a v1 client: never told anything of v2
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "a"})
    net.quiesce()
    redis_epoch = net.of(1, "joined")[0]["epoch"]
    net.lose("n1")
    (reset,) = net.of(1, "reset")
    assert reset["reason"] == "unavailable" and reset["seq"] == 1
    assert reset["epoch"] != redis_epoch
    net.send(1, {"type": "chat", "room": "r", "content": "b", "id": "x"})
    (ack,) = net.of(1, "ack")
    assert (ack["epoch"], ack["seq"]) == (reset["epoch"], 2)
    net.restore("n1")
    net.quiesce()
    back = net.of(1, "reset")[-1]
    assert (back["epoch"], back["seq"], back["reason"]) == (redis_epoch, 1, "unavailable")
    assert [e["type"] for e in net.got[2] if e["type"] not in ("presence", "presence_state")] == [
        "chat",
        "chat",
    ]


def _a_resumer_replayed_past_records_on_their_way() -> tuple[Net, str]:
    """ann (n1) and bob (n2) in room r, bob's chats a1..a8 delivered, a9 and a10
    numbered (E1:9, 10) but their records still on the way to n1; fay joins on n1 from
    E1:5 and her replay (6..10, floor 10) is read before them. Returns the net and E1."""
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    for i in range(1, 9):
        net.send(2, {"type": "chat", "room": "r", "content": f"a{i}"})
    net.quiesce()
    e1 = net.of(1, "joined")[0]["epoch"]
    for i in (9, 10):
        net.send(2, {"type": "chat", "room": "r", "content": f"a{i}"})
    while net.bp.links["n2"].commands:
        net.bp.run_command("n2")
    net.connect("n1", 3, "fay")
    net.send(3, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 5}})
    l1 = net.bp.links["n1"]
    while l1.commands:
        net.bp.run_command("n1")
    while l1.replies:
        net.bp.reply_next("n1")
    return net, e1


def test_an_epoch_change_reaches_a_resumer_whose_replay_went_past_its_seq() -> None:
    """
    A resumer's replay floor is a seq of the old epoch: after the room's epoch changed
    under it (its seq key evicted), with the old epoch's last records lost on the way,
    it must be told the new epoch, not handed the new epoch's chats as if they followed.
    """
    from .model import Snapshot

    net, e1 = _a_resumer_replayed_past_records_on_their_way()
    l1 = net.bp.links["n1"]
    net.bp.channels["r"].epoch = ""  # the seq key evicted: the next use starts E2
    for i in range(1, 4):
        net.send(2, {"type": "chat", "room": "r", "content": f"b{i}"})
    while net.bp.links["n2"].commands:
        net.bp.run_command("n2")
    gen = net.brokers["n1"]._cluster[RoomName("r")].gen
    l1.commands.append(Subscribe(room=RoomName("r"), gen=gen))
    net.bp.run_command("n1")
    net.bp.read_next("n1")
    box = l1.inbox["r"]
    while not isinstance(box[0], Snapshot):
        net.bp.swap("n1", "r", next(i for i, it in enumerate(box) if isinstance(it, Snapshot)))
    net.bp.deliver_next("n1", "r")  # the snapshot, at E2:3
    for item in [it for it in box if isinstance(it, Record) and f" {e1} ".encode() in it.data]:
        box.remove(item)  # E1:9 and E1:10 never arrive
    for i in range(4, 14):
        net.send(2, {"type": "chat", "room": "r", "content": f"b{i}"})
    net.quiesce()
    got = [e for e in net.got[3] if e["type"] in ("chat", "reset", "joined")]
    resets = [i for i, e in enumerate(got) if e["type"] == "reset" and e["epoch"] != e1]
    assert resets, got
    first = resets[0]
    assert got[first]["seq"] == 3
    after = [e["content"] for e in got[first + 1 :] if e["type"] == "chat"]
    assert after == [f"b{i}" for i in range(4, 14)]


def test_records_of_an_epoch_the_room_left_are_dropped() -> None:
    """
    The stream starts over with the link up, and the new epoch's snapshot overtakes
    the old epoch's last records: they must not move the room back (a resumer whose
    replay had them would get them twice).
    """
    from .model import Snapshot

    net, e1 = _a_resumer_replayed_past_records_on_their_way()
    l1 = net.bp.links["n1"]
    net.bp.channels["r"].epoch = ""
    for i in range(1, 13):
        net.send(2, {"type": "chat", "room": "r", "content": f"b{i}"})
    while net.bp.links["n2"].commands:
        net.bp.run_command("n2")
    gen = net.brokers["n1"]._cluster[RoomName("r")].gen
    l1.commands.append(Subscribe(room=RoomName("r"), gen=gen))
    net.bp.run_command("n1")
    net.bp.read_next("n1")
    box = l1.inbox["r"]
    while not isinstance(box[0], Snapshot):
        net.bp.swap("n1", "r", next(i for i, it in enumerate(box) if isinstance(it, Snapshot)))
    net.quiesce()
    for conn in (1, 3):
        contents = [e["content"] for e in net.of(conn, "chat")]
        assert len(contents) == len(set(contents)), (conn, contents)
        epochs = [e["epoch"] for e in net.got[conn] if e["type"] == "reset"]
        assert e1 not in epochs, (conn, epochs)  # never back to the epoch it left
    net.send(2, {"type": "chat", "room": "r", "content": "b13"})
    net.quiesce()
    assert net.of(3, "chat")[-1]["content"] == "b13"


def test_after_redis_lost_its_data_a_resume_is_told_epoch_changed() -> None:
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "a"})
    net.quiesce()
    epoch = net.of(1, "joined")[0]["epoch"]
    net.bp.restart()
    for node in NODES:
        net.handle(node, BackplaneLost())
        net.restore(node)
    net.quiesce()
    back = net.of(1, "reset")[-1]
    assert back["epoch"] != epoch and back["reason"] == "epoch_changed"
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": epoch, "seq": 1}})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    assert (joined["recovered"], joined["reason"]) == (False, "epoch_changed")
    assert joined["epoch"] == back["epoch"]


def test_after_redis_reloaded_older_data_no_position_is_numbered_twice() -> None:
    """Redis restarts from a snapshot taken before "b": the room's epoch comes back with
    seq 1, from another run of the server, so it is renewed rather than numbered on
    (which would give "c" the position "b" had)."""
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "a"})
    net.quiesce()
    saved = net.bp.save()
    net.send(1, {"type": "chat", "room": "r", "content": "b"})
    net.quiesce()
    epoch = net.of(1, "joined")[0]["epoch"]
    for node in net.bp.restart(saved):
        net.handle(node, BackplaneLost())
        net.restore(node)
    assert (net.bp.channels["r"].epoch, net.bp.channels["r"].seq) == (epoch, 1)  # as saved
    net.quiesce()
    back = net.of(1, "reset")[-1]
    assert (back["seq"], back["reason"]) == (0, "epoch_changed") and back["epoch"] != epoch
    net.send(1, {"type": "chat", "room": "r", "content": "c"})
    net.quiesce()
    assert chats(net, 1) == [(1, "a", False), (2, "b", False), (1, "c", False)]
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": epoch, "seq": 2}})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    assert (joined["recovered"], joined["reason"]) == (False, "epoch_changed")
    assert (joined["epoch"], joined["seq"]) == (back["epoch"], 1)


# -- the proof: exactly once, or told ------------------------------------------------------

ROOMS = ("r1", "r2")


@attrs.define
class Follower:
    """A client that follows positions: what it holds per room, and what it got."""

    name: str
    conn: int = 0
    node: str = ""
    live: bool = False
    # room -> [epoch, seq, joined-seq (replays at or below it)]; absent: no position yet
    held: dict[str, list[Any]] = attrs.field(factory=dict)
    joined: set[str] = attrs.field(factory=set)  # rooms it is in on this connection
    seen: set[Any] = attrs.field(factory=set)  # chats (their content) it got


class OnceOrTold(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.followers = [Follower(f"f{i}") for i in range(3)]
        self.conns = 0
        self.chats = 0
        self.at: dict[tuple[str, str, int], Any] = {}  # (room, epoch, seq) -> content
        self.read = 0  # envelopes of net.got already checked, per conn
        self.checked: dict[int, int] = {}
        self.saved: dict[str, Channel] | None = None  # Redis's last snapshot (RDB)

    # -- clients --------------------------------------------------------------------

    def live_nodes(self) -> list[str]:
        return [n for n in NODES if self.net.bp.links[n].alive]

    @rule(i=st.integers(0, 2), node=st.integers(0, 2), rooms=st.sets(st.sampled_from(ROOMS)))
    def reconnect(self, i: int, node: int, rooms: set[str]) -> None:
        """A follower (re)connects to a node, joining rooms with the positions it holds."""
        f = self.followers[i]
        if f.live:
            self.net.disconnect(f.conn)
            f.live = False
        nodes = self.live_nodes()
        self.conns += 1
        f.conn, f.node, f.live = self.conns, nodes[node % len(nodes)], True
        f.joined = set()
        self.net.connect(f.node, f.conn, f.name)
        for room in sorted(rooms):
            held = f.held.get(room)
            since = None if held is None else {"epoch": held[0], "seq": held[1]}
            f.joined.add(room)
            self.net.send(f.conn, {"type": "join", "room": room, "since": since})

    @rule(i=st.integers(0, 2))
    def drop(self, i: int) -> None:
        f = self.followers[i]
        if f.live:
            self.net.disconnect(f.conn)
            f.live = False

    @rule(
        i=st.integers(0, 2),
        room=st.sampled_from(ROOMS),
        acked=st.booleans(),
        n=st.integers(1, 4),
    )
    def chat(self, i: int, room: str, acked: bool, n: int) -> None:
        f = self.followers[i]
        for _ in range(n):
            if f.live and room in f.joined:
                self.chats += 1
                message: dict[str, Any] = {"type": "chat", "room": room, "content": self.chats}
                if acked:
                    message["id"] = f"m{self.chats}"
                self.net.send(f.conn, message)

    @rule(node=st.integers(0, 2), room=st.sampled_from(ROOMS))
    def server_publish(self, node: int, room: str) -> None:
        n = NODES[node]
        if self.net.bp.links[n].alive:
            self.chats += 1
            actions = self.net.brokers[n].publish(
                room, self.chats, username="srv", timestamp=TS, now=self.net.now
            )
            self.net.apply(n, actions)

    # -- the backplane ----------------------------------------------------------------

    @rule(choices=st.lists(st.integers(0, 1000), min_size=1, max_size=10))
    def work(self, choices: list[int]) -> None:
        for pick in choices:
            work = self.net.bp.work()
            if not work:
                return
            self.net.bp.step(work[pick % len(work)])

    @rule()
    def quiesce(self) -> None:
        self.net.quiesce()

    @rule(pick=st.integers(0, 1000), node=st.integers(0, 2))
    def lose_a_record(self, pick: int, node: int) -> None:
        """A record never reaches a node (its stream still has the message)."""
        link = self.net.bp.links[NODES[node]]
        while link.alive and link.online and link.commands:
            self.net.bp.run_command(link.node)
        boxes = [
            (lk, room, i)
            for _, lk in sorted(self.net.bp.links.items())
            for room, box in sorted(lk.inbox.items())
            for i, item in enumerate(box)
            if isinstance(item, Record)
        ]
        if boxes:
            lk, room, i = boxes[pick % len(boxes)]
            del lk.inbox[room][i]
            if not lk.inbox[room]:
                del lk.inbox[room]

    @rule(node=st.integers(0, 2))
    def lose(self, node: int) -> None:
        n = NODES[node]
        if self.net.bp.links[n].alive and self.net.bp.links[n].online:
            self.net.lose(n)

    @precondition(lambda self: any(lk.alive and not lk.online for lk in self.net.bp.links.values()))
    @rule(node=st.integers(0, 2))
    def restore(self, node: int) -> None:
        lost = [n for n, lk in sorted(self.net.bp.links.items()) if lk.alive and not lk.online]
        self.net.restore(lost[node % len(lost)])

    @rule(node=st.integers(0, 2))
    def kill(self, node: int) -> None:
        """A node dies (kill -9): its clients are cut off, and come back elsewhere."""
        n = NODES[node]
        if n in self.live_nodes() and len(self.live_nodes()) > 1:
            self.net.bp.kill(n)
            for f in self.followers:
                if f.live and f.node == n:
                    f.live = False
                    self.net.node_of.pop(f.conn)

    @rule()
    def redis_restart(self) -> None:
        for n in self.net.bp.restart():
            self.net.handle(n, BackplaneLost())

    @rule()
    def redis_save(self) -> None:
        """Redis writes a snapshot of its data (BGSAVE), to restart from later."""
        self.saved = self.net.bp.save()

    @precondition(lambda self: self.saved is not None)
    @rule()
    def redis_restart_from_save(self) -> None:
        """Redis restarts with the data of its last snapshot: older than what was seen."""
        for n in self.net.bp.restart(self.saved):
            self.net.handle(n, BackplaneLost())

    # -- the promise ------------------------------------------------------------------

    @invariant()
    def once_or_told(self) -> None:
        for f in self.followers:
            if f.conn == 0:
                continue
            got = self.net.got[f.conn]
            for env in got[self.checked.get(f.conn, 0) :]:
                self.check(f, env)
            self.checked[f.conn] = len(got)

    def check(self, f: Follower, env: dict[str, Any]) -> None:
        kind, room = env["type"], env.get("room")
        if kind in ("presence", "presence_state", "ack"):
            return
        assert kind != "error", env
        held = f.held.get(room) if isinstance(room, str) else None
        if kind in ("joined", "reset"):
            event(f"{kind}: {env.get('recovered')} {env.get('reason')}")
        if kind == "joined":
            if env.get("recovered") is True:
                assert held is not None and held[0] == env["epoch"], (f.name, env)
                assert env["seq"] >= held[1]
                held[2] = env["seq"]
            else:  # told: what lies between is not coming
                f.held[room] = [env["epoch"], env["seq"], env["seq"]]
            return
        if kind == "reset":
            assert held is not None, (f.name, env)
            assert env["reason"] in ("unavailable", "epoch_changed", "too_old"), env
            f.held[room] = [env["epoch"], env["seq"], env["seq"]]
            return
        assert kind == "chat", env
        assert held is not None, f"{f.name} got a chat of {room} before joined: {env}"
        epoch, seq, top = held
        assert env["seq"] == seq + 1, f"{f.name} in {room} at {epoch}:{seq} got {env}"
        assert env.get("replayed", False) == (env["seq"] <= top), (f.name, held, env)
        key = (room, epoch, env["seq"])
        assert self.at.setdefault(key, env["content"]) == env["content"], (key, env)
        assert env["content"] not in f.seen, f"{f.name} got {env['content']} twice"
        f.seen.add(env["content"])
        held[1] = env["seq"]

    def teardown(self) -> None:
        net = self.net
        for n in self.live_nodes():
            if not net.bp.links[n].online:
                net.restore(n)
        net.quiesce()
        # One more message in every room: a record lost at the tail shows as a gap.
        node = self.live_nodes()[0]
        for room in ROOMS:
            self.chats += 1
            actions = net.brokers[node].publish(
                room, self.chats, username="srv", timestamp=TS, now=net.now
            )
            net.apply(node, actions)
        net.quiesce()
        self.once_or_told()
        repairs = sum(b.statistics().repairs for b in net.brokers.values())
        event(f"gap repairs: {min(repairs, 3)}")
        # Connected and quiet: every follower holds its rooms' position in Redis.
        for f in self.followers:
            if not f.live:
                continue
            for room in f.joined:
                ch = net.bp.channels.get(room)
                assert ch is not None
                assert f.held[room][:2] == [ch.epoch, ch.seq], (f.name, room, ch.epoch, ch.seq)


TestOnceOrTold = OnceOrTold.TestCase
TestOnceOrTold.settings = settings(
    max_examples=5 * settings.default.max_examples, stateful_step_count=60
)


@attrs.define
class MeasuredNet(Net):
    """A Net that notes the size of every chat delivered to connection 1."""

    sizes: list[int] = attrs.field(factory=list)

    def apply(self, node: str, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Deliver) and 1 in a.conns and b'"type":"chat"' in a.payload:
                self.sizes.append(len(a.payload))
        super().apply(node, actions)


def _replay_after_missing_four(
    send_queue_bytes: int,
) -> tuple[dict[str, Any], list[int], list[int]]:
    """bob resumes from seq 1 on n2 after five chats of 500 characters, asking for what
    fits: his ``joined``, the seqs replayed, and the sizes of the chats (as ann got them)."""
    config = attrs.evolve(
        CONFIG, max_message_bytes=1000, send_queue_bytes=send_queue_bytes, history_size=10
    )
    net = MeasuredNet(config=config)
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.quiesce()
    for _ in range(5):
        net.send(1, {"type": "chat", "room": "r", "content": "x" * 500})
        net.quiesce()
    epoch = net.brokers["n1"].position("r").epoch
    net.connect("n2", 2, "bob")
    since = {"epoch": epoch, "seq": 1}
    net.send(2, {"type": "join", "room": "r", "since": since, "partial": True})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    return joined, [seq for seq, _, replayed in chats(net, 2) if replayed], net.sizes


def test_a_replay_in_a_cluster_is_the_latest_chats_that_fit_half_the_queue_bytes() -> None:
    """A replay is bounded by half the joiner's send-queue bytes (the rest is for live
    traffic): the latest chats whose bytes add up to it at most; the earlier ones are
    skipped, and the joiner is told so."""
    _, replayed, sizes = _replay_after_missing_four(4 * 1024 * 1024)
    assert replayed == [2, 3, 4, 5] and len(sizes) == 5
    two = sizes[3] + sizes[4]
    assert 2 * two >= 1000 + 1024  # a valid send-queue-bytes
    joined, replayed, _ = _replay_after_missing_four(2 * two)
    assert replayed == [4, 5]
    assert (joined["reason"], joined["skipped"]) == ("over_limit", {"from": 2, "to": 3})
    joined, replayed, _ = _replay_after_missing_four(2 * two - 2)
    assert replayed == [5]
    assert (joined["reason"], joined["skipped"]) == ("over_limit", {"from": 2, "to": 4})


def test_a_room_left_with_a_resend_in_flight_is_let_go_when_it_is_answered() -> None:
    """ann resends an acknowledged chat and leaves at once: the room waits for the
    resend's answer (a duplicate, whose record never comes), then n1 stops listening."""
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "x", "id": "m1"})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "x", "id": "m1"})
    net.send(1, {"type": "leave", "room": "r"})
    assert "r" in net.bp.subscriptions("n1")
    net.quiesce()
    assert net.bp.subscriptions("n1") == set()


def test_a_connection_waiting_to_join_counts_toward_the_room_limit() -> None:
    """Two joins before the room's presence is read, in a room for one: the second is
    refused at once (it would be let in with the first otherwise)."""
    net = Net(config=attrs.evolve(CONFIG, max_connections_per_room=1))
    net.connect("n1", 1, "ann")
    net.connect("n1", 2, "bob")
    net.send(1, {"type": "join", "room": "r"})
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    assert net.of(1, "presence_state") == [
        {"type": "presence_state", "room": "r", "users": ["ann"]}
    ]
    (error,) = net.got[2]
    assert (error["type"], error["code"]) == ("error", "forbidden")
    assert "is full" in error["content"]
    assert net.brokers["n1"].connections("r") == [1]


def test_a_message_missing_from_the_stream_is_told_lost_with_all_before_it() -> None:
    """The stream lacks seq 3 of the five bob missed (it failed to keep it): asking for
    what can be had, his replay starts after the hole, and his ``joined`` names 2 to 3
    lost (never a silent gap)."""
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.quiesce()
    for i in range(5):
        net.send(1, {"type": "chat", "room": "r", "content": i})
    net.quiesce()
    ch = net.bp.channels["r"]
    ch.history = [(seq, prefix) for seq, prefix in ch.history if seq != 3]
    epoch = net.brokers["n1"].position("r").epoch
    net.connect("n2", 2, "bob")
    since = {"epoch": epoch, "seq": 1}
    net.send(2, {"type": "join", "room": "r", "since": since, "partial": True})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    assert (joined["epoch"], joined["seq"]) == (epoch, 5)
    assert (joined["recovered"], joined["reason"]) == (False, "too_old")
    assert joined["lost"] == {"from": 2, "to": 3}
    assert chats(net, 2) == [(4, 3, True), (5, 4, True)]
