"""
ModelBackplane: an in-memory model of what a cluster's backplane driver (Redis) does.

The contract, as the broker's cluster mode expects it (``roombus.trio.RedisBackplane``
implements it with Redis):

* Each room has one channel. A record published on it reaches every node subscribed to
  the room at the time, in one order (the same for every subscriber). A node's
  deliveries of one channel are in that order; different channels interleave freely.
* ``Subscribe(room, gen)``: the node is subscribed (idempotent); THEN the room's
  presence is read (``version``, every ``(node, username)`` entry, and the entries
  whose node said they left since: ``gone``) and answered
  with ``RoomSynced(..., gen)``. Several Subscribes of a room may be answered once,
  with the latest ``gen`` (not the read-again after reconnecting, below). The answer
  joins the node's stream of the room's records where it was read, but may overtake
  records ahead of it (published after the subscription, before the read); and, with
  ``lag``, records published after the read may overtake it (the snapshot comes on
  another connection than the records).
* ``Unsubscribe(room)``: no more of the room's records for the node (with
  ``skip_unsubscribe``, as the trio driver does, not carried out when a later
  Subscribe of the room was asked for meanwhile).
* Each room has a stream: an epoch (made when missing: a new epoch starts ``seq`` and
  the history over), a ``seq`` and the history (the latest ``keep`` messages; the
  model keeps no TTL).
* ``Relay(room, ref, prefix, ...)``: ``seq = INCR``, kept, published as
  ``m <seq> <node> <ref> <epoch> <prefix>``; with ``dedup``, an id already numbered in
  the epoch publishes nothing, and the node is answered ``Relayed`` (also without
  ``dedup`` when ``answer`` is set).
* ``ReadStream(...)``: answered ``StreamRead`` with the latest (or first) ``count``
  kept messages of the range. Answers come on the command connection: they may reach
  the node before or after records published after them (a step of their own).
* ``Announce(room, user, present, force)``: add/remove ``(node, user)``; if that changed
  the set (or for a forced leave), ``version = INCR`` and publish
  ``j``/``l <version> <node> <user>``.
  (The records are built by ``roombus.cluster.records``, as the driver's scripts build them.)
* ``Control(command)``: published on the control channel, which every connected node
  listens to (the sender included): each gets ``ControlReceived`` with the message
  (``roombus.cluster.control``), in the channel's one order.
* Each node has one connection: its commands run in the order asked for, interleaved
  with other nodes'. A subscribe's snapshot read is a step of its own, some time after
  the subscribe (the node's reads in order; its later commands may run first).
* The cluster's view for the server API (``ReadCluster``, answered ``ClusterRead`` on
  the command connection, as ``ReadStream``): ``presence`` the room's entries;
  ``nodes`` the node list, which a node enters when it connects (its first refresh)
  and leaves when it dies (its entry expires); ``rooms`` the room index, names sorted,
  those matching the glob after ``after``, ``limit`` a page (``more``: the last one
  listed, if more match). A room enters the index with its first announced member and
  leaves it once the TTL passed with no member in it (:meth:`expire`, :meth:`kill`).
* Entries expire (TTL) unless refreshed: a dead or disconnected node refreshes none, a
  connected one those of :meth:`ClusterBroker.local_presence`. An expiry is published as an
  ``x`` record (a removal its node did not ask for).
* A lost connection drops the node's subscriptions, its commands not yet run and
  records not yet delivered; the broker is told ``BackplaneLost``. A Redis restart
  wipes everything (counters, presence, subscriptions) and every node loses its link.
  Some time after reconnecting, the driver reads again the presence of every room it
  listens to (``Subscribe`` with the room's latest ``gen``): a read of its own, after
  the reads asked before it, never answered by one of them (the protocol queues it as
  new work, sent once the batch in flight is answered; a room that kept who was there
  when Redis lost its data waits for this second read to settle).
* Redis may also restart from a snapshot taken earlier (an RDB file, :meth:`save`):
  :meth:`restart` with ``snapshot`` brings back what it held then (counters, presence,
  epochs, seqs, histories, dedup answers; not the subscriptions, which belong to
  connections). The server is another run: as the scripts do with the ``run_id`` stored
  next to the epoch, a room's epoch of an earlier run is renewed (seq and history start
  over) the first time a relay, a stream read or a snapshot read uses it; presence (and
  its version) comes back as it was, older than what the nodes saw.

Nothing here knows about the broker: the test hands the brokers' backplane actions to
:meth:`ModelBackplane.submit` and the model hands events back through ``deliver``.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase

import attrs

from roombus import RoomName
from roombus.cluster import (
    Announce,
    BackplaneAction,
    RecordReceived,
    Relay,
    RoomSynced,
    Subscribe,
    Unsubscribe,
)
from roombus.cluster.control import encode_control
from roombus.cluster.records import encode_chat, encode_presence
from roombus.core.actions import Control, ReadCluster, ReadStream
from roombus.core.events import ClusterRead, ControlReceived, Relayed, StreamRead
from roombus.lowlevel import Event

#: The inbox of the control channel (no room is named so).
CONTROL = " ctl"


@attrs.define
class Record:
    data: bytes
    index: int  # the backplane's count of records published, this one included


@attrs.define
class Snapshot:
    version: int
    entries: tuple[tuple[str, str], ...]
    gen: int
    index: int  # records published when it was read
    epoch: str = ""
    seq: int = 0
    gone: tuple[tuple[str, str], ...] = ()


@attrs.define
class Read:
    """The snapshot read that follows a subscribe."""

    room: str
    gen: int


@attrs.define
class Channel:
    """A room's keys on the backplane: counters, presence set, and its subscribers."""

    seq: int = 0
    version: int = 0
    presence: set[tuple[str, str]] = attrs.field(factory=set)
    #: The leaves (not expiries) the snapshot answers; the model keeps them until
    #: the entry comes back (the scripts forget them a TTL later).
    gone: set[tuple[str, str]] = attrs.field(factory=set)
    subscribers: set[str] = attrs.field(factory=set)
    epoch: str = ""
    history: list[tuple[int, bytes]] = attrs.field(factory=list)
    acks: dict[tuple[str, str], tuple[str, int]] = attrs.field(factory=dict)
    run: int = 0  # the run of the server that made the epoch (the scripts' run_id)


@attrs.frozen
class ReadAgain:
    """The driver's read of a room's presence again after connecting (see ``reread``)."""

    room: str
    gen: int


@attrs.define
class Link:
    """One node's connection to the backplane."""

    node: str
    alive: bool = True
    online: bool = False
    commands: deque[BackplaneAction | ReadAgain] = attrs.field(factory=deque)
    reads: deque[Read] = attrs.field(factory=deque)
    inbox: dict[str, deque[Record | Snapshot]] = attrs.field(factory=dict)
    wanted: dict[str, int] = attrs.field(factory=dict)  # room -> the latest Subscribe's gen
    reread: bool = False  # the read-again after connecting is still to come
    replies: deque[Event] = attrs.field(factory=deque)  # answers on the command link

    def drop_queues(self) -> None:
        self.replies.clear()
        self.commands.clear()
        self.reads.clear()
        self.inbox.clear()
        self.wanted.clear()
        self.reread = False


Work = tuple[str, str, str, int]  # (kind, node, room, index)


class ModelBackplane:
    """
    Args:
        nodes: The node ids.
        deliver: Hands an event to a node's broker (which may submit more work).
        lag: Whether records published after a snapshot was read may reach the node
            before the snapshot does.
        skip_unsubscribe: Whether an Unsubscribe superseded by a later Subscribe of
            the same room is skipped (the trio driver) or carried out.
        on_publish: Called with ``(room, data)`` for every record published.
    """

    def __init__(
        self,
        nodes: Iterable[str],
        deliver: Callable[[str, Event], None],
        *,
        lag: bool = True,
        skip_unsubscribe: bool = True,
        on_publish: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.links = {n: Link(n) for n in nodes}
        self.channels: dict[str, Channel] = {}
        self.deliver = deliver
        self.lag = lag
        self.skip_unsubscribe = skip_unsubscribe
        self.on_publish = on_publish
        self.published = 0
        self.epochs = 0
        self.run = 1  # the server's run: a restart is another one
        self.nodes: set[str] = set()  # the node list (``<prefix>:{@}:nodes``)
        self.index: set[str] = set()  # the room index (``<prefix>:{@}:rooms``)
        self.delivering: Record | Snapshot | Event | None = None  # what deliver() is handed

    def channel(self, room: str) -> Channel:
        return self.channels.setdefault(room, Channel())

    def epoch(self, ch: Channel) -> str:
        """
        The room's epoch, made (seq and history start over) if missing or made by
        another run of the server (restored from a snapshot: it may be older than
        what the nodes saw).
        """
        if not ch.epoch or ch.run != self.run:
            self.epochs += 1
            ch.epoch = f"E{self.epochs}"
            ch.run = self.run
            ch.seq = 0
            ch.history.clear()
            ch.acks.clear()
        return ch.epoch

    # -- what the brokers ask for -------------------------------------------------------

    def submit(self, node: str, action: BackplaneAction) -> None:
        """A broker's backplane action: queued on the node's connection (if it has one)."""
        link = self.links[node]
        if not (link.alive and link.online):
            return  # no connection: the driver drops it
        if isinstance(action, Subscribe):
            link.wanted[action.room] = action.gen
        elif isinstance(action, Unsubscribe):
            link.wanted.pop(action.room, None)
        link.commands.append(action)

    # -- the backplane's side -----------------------------------------------------------

    def publish(self, room: str, data: bytes) -> None:
        ch = self.channel(room)
        self.published += 1
        if self.on_publish is not None:
            self.on_publish(room, data)
        for node in sorted(ch.subscribers):
            self.links[node].inbox.setdefault(room, deque()).append(Record(data, self.published))

    def announce(
        self,
        node: str,
        room: str,
        user: str,
        present: bool,
        *,
        force: bool = False,
        expired: bool = False,
    ) -> None:
        ch = self.channel(room)
        entry = (node, user)
        if present == (entry in ch.presence) and not (force and not present):
            return
        if present:
            ch.presence.add(entry)
            ch.gone.discard(entry)
            self.index.add(room)
            self.nodes.add(node)
        else:
            ch.presence.discard(entry)
            if not expired:
                ch.gone.add(entry)
        ch.version += 1
        self.publish(room, encode_presence(present, ch.version, node, user, expired=expired))

    def run_command(self, node: str) -> None:
        link = self.links[node]
        action = link.commands.popleft()
        if isinstance(action, Control):  # the control channel: every node listening
            self.published += 1
            data = encode_control(node, action.command)
            for other in sorted(self.links):
                peer = self.links[other]
                if peer.alive and peer.online:
                    peer.inbox.setdefault(CONTROL, deque()).append(Record(data, self.published))
            return
        if isinstance(action, ReadCluster):
            link.replies.append(self.read_cluster(action))
            return
        if isinstance(action, ReadAgain):
            # Listened to again, and read after every read asked before (not one answer
            # for both: the broker waits for a read after the first).
            self.channel(action.room).subscribers.add(node)
            link.reads.append(Read(action.room, action.gen))
            return
        room = action.room
        ch = self.channel(room)
        if isinstance(action, Subscribe):
            ch.subscribers.add(node)
            for read in reversed(link.reads):
                if read.room == room:  # not read yet: one answer, with the latest gen
                    read.gen = action.gen
                    break
            else:
                link.reads.append(Read(room, action.gen))
        elif isinstance(action, Unsubscribe):
            if not (self.skip_unsubscribe and room in link.wanted):
                ch.subscribers.discard(node)
                link.inbox.pop(room, None)
        elif isinstance(action, Relay):
            epoch = self.epoch(ch)
            dedup = action.dedup
            seen = ch.acks.get(dedup) if dedup is not None else None
            if seen is not None:
                link.replies.append(
                    Relayed(room=room, ref=action.ref, epoch=epoch, seq=seen[1], duplicate=True)
                )
                return
            ch.seq += 1
            if action.keep:
                ch.history.append((ch.seq, action.prefix))
                del ch.history[: -action.keep]
            if dedup is not None:
                ch.acks[dedup] = (epoch, ch.seq)
            if dedup is not None or action.answer:
                link.replies.append(Relayed(room=room, ref=action.ref, epoch=epoch, seq=ch.seq))
            self.publish(room, encode_chat(ch.seq, node, action.ref, epoch, action.prefix))
        elif isinstance(action, ReadStream):
            link.replies.append(self.read_stream(ch, action))
        else:
            assert isinstance(action, Announce)
            self.announce(node, room, action.username, action.present, force=action.force)

    def read_stream(self, ch: Channel, action: ReadStream) -> StreamRead:
        epoch = self.epoch(ch)
        top = ch.seq
        kept = [(seq, prefix) for seq, prefix in ch.history if seq > top - action.keep]
        first = kept[0][0] if kept else top + 1
        upto = top if action.upto <= 0 else min(action.upto, top)
        chosen = [(seq, p) for seq, p in kept if action.after < seq <= upto]
        chosen = chosen[: action.count] if action.oldest else chosen[-action.count :]
        if action.count <= 0:
            chosen = []
        return StreamRead(
            room=action.room,
            ticket=action.ticket,
            epoch=epoch,
            top=top,
            first_kept=first,
            entries=tuple(chosen),
        )

    def read_cluster(self, action: ReadCluster) -> ClusterRead:
        if action.kind == "presence":
            ch = self.channels.get(action.room)
            entries = tuple(sorted(ch.presence)) if ch is not None else ()
            return ClusterRead(ticket=action.ticket, kind=action.kind, entries=entries)
        if action.kind == "nodes":
            nodes = tuple((n, 0) for n in sorted(self.nodes))
            return ClusterRead(ticket=action.ticket, kind=action.kind, nodes=nodes)
        names = sorted(r for r in self.index if r > action.after and fnmatchcase(r, action.pattern))
        page = names[: action.limit]
        more = page[-1] if len(names) > action.limit else ""
        return ClusterRead(ticket=action.ticket, kind=action.kind, rooms=tuple(page), more=more)

    def read_next(self, node: str) -> None:
        link = self.links[node]
        read = link.reads.popleft()
        ch = self.channel(read.room)
        epoch = self.epoch(ch)
        link.inbox.setdefault(read.room, deque()).append(
            Snapshot(
                ch.version,
                tuple(sorted(ch.presence)),
                read.gen,
                self.published,
                epoch,
                ch.seq,
                tuple(sorted(ch.gone)),
            )
        )

    def reply_next(self, node: str) -> None:
        """The next answer on the node's command connection reaches it."""
        item = self.links[node].replies.popleft()
        self.delivering = item
        self.deliver(node, item)
        self.delivering = None

    def reread(self, node: str) -> None:
        """A while after connecting, the driver reads every room's presence again."""
        link = self.links[node]
        link.reread = False
        for room, gen in sorted(link.wanted.items()):
            link.commands.append(ReadAgain(room, gen))

    def deliver_next(self, node: str, room: str) -> None:
        link = self.links[node]
        item = link.inbox[room].popleft()
        if not link.inbox[room]:
            del link.inbox[room]
        self.delivering = item
        if room == CONTROL:
            assert isinstance(item, Record)
            self.deliver(node, ControlReceived(data=item.data))
        elif isinstance(item, Record):
            self.deliver(node, RecordReceived(room=RoomName(room), data=item.data))
        else:
            self.deliver(
                node,
                RoomSynced(
                    room=RoomName(room),
                    version=item.version,
                    entries=item.entries,
                    gen=item.gen,
                    epoch=item.epoch,
                    seq=item.seq,
                    gone=item.gone,
                ),
            )
        self.delivering = None

    def swap(self, node: str, room: str, index: int) -> None:
        """Items *index* - 1 and *index* of the node's room stream change places."""
        box = self.links[node].inbox[room]
        box[index - 1], box[index] = box[index], box[index - 1]

    # -- scheduling ---------------------------------------------------------------------

    def work(self, *, reorder: bool = True) -> list[Work]:
        """Every step that could run next (with *reorder*, snapshots moving too)."""
        out: list[Work] = []
        for node, link in sorted(self.links.items()):
            if not (link.alive and link.online):
                continue
            if link.commands:
                out.append(("run", node, "", 0))
            if link.reads:
                out.append(("read", node, "", 0))
            if link.reread:
                out.append(("reread", node, "", 0))
            if link.replies:
                out.append(("reply", node, "", 0))
            for room, box in sorted(link.inbox.items()):
                out.append(("deliver", node, room, 0))
                if reorder:
                    out.extend(self.moves(node, room, box))
        return out

    def moves(self, node: str, room: str, box: deque[Record | Snapshot]) -> list[Work]:
        out: list[Work] = []
        for i in range(1, len(box)):
            before, after = box[i - 1], box[i]
            # A snapshot may come earlier than a record published before it was read,
            # and (with lag) later than one published after.
            kinds = (type(before), type(after))
            if kinds == (Record, Snapshot) and before.index <= after.index:
                out.append(("overtake", node, room, i))
            elif kinds == (Snapshot, Record) and self.lag and after.index > before.index:
                out.append(("lag", node, room, i))
        return out

    def step(self, work: Work) -> None:
        kind, node, room, index = work
        if kind == "run":
            self.run_command(node)
        elif kind == "read":
            self.read_next(node)
        elif kind == "reread":
            self.reread(node)
        elif kind == "reply":
            self.reply_next(node)
        elif kind == "deliver":
            self.deliver_next(node, room)
        else:
            self.swap(node, room, index)

    def busy(self) -> bool:
        return bool(self.work(reorder=False))

    def drain(self, *, order: str = "", limit: int = 10_000) -> None:
        """
        Run every pending step to quiescence, taking turns (nodes' commands interleave).
        *order* "early": snapshots overtake every record they may; "late": records
        published after a snapshot was read overtake it (with ``lag``).
        """
        move = {"early": "overtake", "late": "lag"}.get(order)
        for turn in range(limit):
            work = self.work(reorder=move is not None)
            moves = [w for w in work if w[0] == move]
            work = [w for w in work if w[0] not in ("overtake", "lag")]
            if not work:
                return
            self.step(moves[0] if moves else work[turn % len(work)])
        raise AssertionError("the backplane never went quiet: the brokers keep asking")

    # -- links and nodes ----------------------------------------------------------------

    def lose(self, node: str) -> None:
        link = self.links[node]
        link.online = False
        link.drop_queues()
        for ch in self.channels.values():
            ch.subscribers.discard(node)

    def restore(self, node: str) -> None:
        link = self.links[node]
        assert link.alive and not link.online
        link.online = True
        link.reread = True
        self.nodes.add(node)

    def kill(self, node: str) -> None:
        """The node dies: no more commands, no deliveries; its entries expire."""
        self.lose(node)
        self.links[node].alive = False
        self.nodes.discard(node)
        self.expire(node, set())

    def expire(self, node: str, refreshed: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """TTL: the node's entries not in *refreshed* (``(room, user)``) expire."""
        gone = [
            (room, user)
            for room, ch in sorted(self.channels.items())
            for n, user in sorted(ch.presence)
            if n == node and (room, user) not in refreshed
        ]
        for room, user in gone:
            self.announce(node, room, user, False, expired=True)
        # The TTL passed: rooms with no member left leave the index.
        self.index = {r for r in self.index if r in self.channels and self.channels[r].presence}
        return gone

    def save(self) -> dict[str, Channel]:
        """A snapshot of the data as it is now (what ``BGSAVE`` writes), for :meth:`restart`."""
        return {room: _data_of(ch) for room, ch in self.channels.items()}

    def restart(self, snapshot: Mapping[str, Channel] | None = None) -> list[str]:
        """
        Redis restarts, another run: empty, or with the data of *snapshot* (see
        :meth:`save`; it may be restored again later). Returns the nodes that lose
        their link.
        """
        self.run += 1
        self.channels.clear()
        self.nodes.clear()
        self.index.clear()
        for room, ch in (snapshot or {}).items():
            self.channels[room] = _data_of(ch)
        lost = [n for n, link in sorted(self.links.items()) if link.alive and link.online]
        for n in lost:
            self.lose(n)
        return lost

    # -- introspection ------------------------------------------------------------------

    def entries(self, node: str) -> set[tuple[str, str]]:
        """``(room, user)`` of the node's presence entries."""
        return {
            (room, user)
            for room, ch in self.channels.items()
            for n, user in ch.presence
            if n == node
        }

    def pending_announces(self, node: str) -> list[Announce]:
        return [a for a in self.links[node].commands if isinstance(a, Announce)]

    def subscriptions(self, node: str) -> set[str]:
        return {room for room, ch in self.channels.items() if node in ch.subscribers}


def _data_of(ch: Channel) -> Channel:
    """A copy of a channel's data, without its subscribers (state of connections)."""
    return attrs.evolve(copy.deepcopy(ch), subscribers=set())
