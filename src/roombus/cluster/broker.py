"""
ClusterBroker: the broker of a node of a cluster, sans-IO.

A :class:`~roombus.lowlevel.Broker` that also keeps, per room it listens to, the room's
presence on the other nodes (:class:`~roombus.cluster.room.ClusterRoom`), and asks a
backplane to carry its work (:class:`~roombus.cluster.Relay`, :class:`~roombus.cluster.Announce`,
:class:`~roombus.cluster.Subscribe`, :class:`~roombus.cluster.Unsubscribe`). The backplane's answers
come back as events (:class:`~roombus.cluster.RecordReceived`, :class:`~roombus.cluster.RoomSynced`,
:class:`~roombus.cluster.BackplaneLost`, :class:`~roombus.cluster.BackplaneRestored`).

Everything that differs from a node on its own is here; the core broker only offers
the hooks this class overrides.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

import attrs

from ..core import codec
from ..core.actions import (
    Action,
    Announce,
    ClusterAnswered,
    Control,
    ControlCommand,
    DisconnectCommand,
    HistoryAnswered,
    MessagePublished,
    PublishAnswered,
    ReadCluster,
    ReadStream,
    Relay,
    Subscribe,
    Unsubscribe,
)
from ..core.broker import Broker, BrokerStatistics, Resume, _Conn
from ..core.errors import ConfigError
from ..core.events import (
    BackplaneLost,
    BackplaneRestored,
    ClusterRead,
    ControlReceived,
    Event,
    RecordReceived,
    Relayed,
    RoomSynced,
    StreamRead,
)
from ..core.names import ConnectionId, RoomName, Username, is_valid_username
from ..core.streams import (
    EPOCH_CHANGED,
    TOO_OLD,
    UNAVAILABLE,
    Position,
    Recovery,
    plan_recovery,
)
from .control import parse_control
from .records import ChatRecord, PresenceRecord, parse_record
from .room import ClusterRoom, Effect, Lifetime, Phase, Resuming, RoomInput, is_valid_node_id

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

    from ..core.auth import Authorizer
    from ..core.config import BrokerConfig

#: Chats a room may hold for connections still joining it (one round trip's worth),
#: and the most messages one gap repair reads.
MAX_HELD: Final = 1000


@attrs.frozen
class _HistoryRead:
    """A ``history`` request waiting for its read of Redis: a connection's, or (conn
    None) server-side code's, answered with its ticket."""

    conn: ConnectionId | None
    request: codec.History
    limit: int
    ticket: int = 0


#: How many epochs a room remembers having left (stale records of them are dropped).
_LEFT_EPOCHS: Final = 8


class ClusterBroker(Broker):
    """
    The room broker of one node of a cluster.

    Args:
        config: Limits and intervals, as for :class:`~roombus.lowlevel.Broker`.
        authorizer: As for :class:`~roombus.lowlevel.Broker`.
        node: This node's id in the cluster, to drive a backplane (see
            :class:`~roombus.cluster.Relay`). The broker starts offline (serving locally)
            until it is told :class:`~roombus.cluster.BackplaneRestored`.

    Raises:
        ConfigError: if *node* is not 1-64 characters of ``A-Z a-z 0-9 _ . : -``.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        authorizer: Authorizer | None = None,
        node: str,
    ) -> None:
        if not is_valid_node_id(node):
            raise ConfigError(
                "node-id", f"must be 1-64 characters of A-Z a-z 0-9 _ . : -, not {node!r}"
            )
        super().__init__(config, authorizer=authorizer)
        self.node = node
        self._online = False
        self._cluster: dict[RoomName, ClusterRoom] = {}
        self._refs = 0
        self._gens = 0
        # Who this node told the backplane is present, per room: what to take back
        # after an outage during which they left.
        self._announced: dict[RoomName, set[Username]] = {}
        # The latest leaves asked of the backplane: one may have been lost with the
        # link, so they are asked again after it (asking twice changes nothing).
        self._recent_leaves: deque[tuple[RoomName, Username]] = deque(maxlen=MAX_HELD)
        self._relay_unconfirmed = 0
        self._presence_gaps = 0
        # Reads of Redis streams in flight, by ticket: a resume (its room and
        # connection), a history request, or a gap repair (its room).
        self._tickets = 0
        self._reads: dict[int, tuple[RoomName, ConnectionId | None, _HistoryRead | None]] = {}
        # Acknowledged publishes relayed and not answered yet: ref -> (conn, id).
        self._awaiting: dict[int, tuple[ConnectionId, str]] = {}
        # Server-side publishes whose position is awaited: ref -> (room, ticket).
        self._answering: dict[int, tuple[RoomName, int]] = {}
        self._resets = 0
        self._repairs = 0
        # The server API's reads of the cluster in flight (their tickets).
        self._queries: set[int] = set()

    # -- introspection ------------------------------------------------------------------

    def _present(self, room: RoomName) -> set[Username]:
        users = super()._present(room)
        cr = self._cluster.get(room)
        if cr is not None:
            users.update(cr.remote)
        return users

    def seq(self, room: str) -> int:
        return self.position(room).seq

    def position(self, room: str) -> Position:
        cr = self._cluster.get(RoomName(room))
        if cr is not None and not cr.local and cr.epoch:
            return Position(cr.epoch, cr.seq)
        return super().position(room)

    def statistics(self) -> BrokerStatistics:
        return attrs.evolve(
            super().statistics(),
            relay_unconfirmed=self._relay_unconfirmed,
            presence_gaps=self._presence_gaps,
            backplane_online=self._online,
            resets=self._resets,
            repairs=self._repairs,
        )

    # -- the core's hooks ---------------------------------------------------------------

    def _handle_other(self, event: Event, timestamp: int, actions: list[Action]) -> None:
        if isinstance(event, RecordReceived):
            self._on_record(event, timestamp, actions)
        elif isinstance(event, StreamRead):
            self._on_read(event, timestamp, actions)
        elif isinstance(event, Relayed):
            self._on_relayed(event, actions)
        elif isinstance(event, RoomSynced):
            self._on_synced(event, timestamp, actions)
        elif isinstance(event, BackplaneLost):
            self._on_lost(timestamp, actions)
        elif isinstance(event, BackplaneRestored):
            self._on_restored(actions)
        elif isinstance(event, ControlReceived):
            self._on_control(event, timestamp, actions)
        elif isinstance(event, ClusterRead):
            if event.ticket in self._queries:  # else answered already (the link lost)
                self._queries.discard(event.ticket)
                actions.append(ClusterAnswered(ticket=event.ticket, read=event))
        else:
            super()._handle_other(event, timestamp, actions)

    # -- the control channel ------------------------------------------------------------

    def nodes_of(self, room: str) -> dict[str, set[str]]:
        users: dict[str, set[str]] = {u: {self.node or ""} for u in self.counts(room)}
        cr = self._cluster.get(RoomName(room))
        if cr is not None:
            for user, nodes in cr.remote.items():
                users.setdefault(user, set()).update(nodes)
        return users

    def read_cluster(self, read: ReadCluster) -> list[Action]:
        """
        Ask Redis what the cluster knows (the server API's ``presence``, ``rooms``,
        ``info``): answered with a :class:`~roombus.core.actions.ClusterAnswered` of
        *read*'s ticket (its ``read`` None if the link is lost first). Nothing while
        the node is cut off from Redis: answer with this node's view then.
        """
        if not self._online:
            return []
        self._queries.add(read.ticket)
        return [read]

    def tell_cluster(self, command: ControlCommand) -> list[Action]:
        return [Control(command=command)] if self._online else []

    def _on_control(self, event: ControlReceived, timestamp: int, actions: list[Action]) -> None:
        """Another node's command: carried out on this node's connections."""
        parsed = parse_control(event.data)
        if parsed is None or parsed[0] == self.node:
            return  # not one of ours, or this node's own (carried out already)
        _, command = parsed
        if isinstance(command, DisconnectCommand):
            if command.username is not None:
                targets = self.user_connections(command.username)
            else:
                node, _, number = (command.connection or "").rpartition("/")
                ok = node == self.node and number.isascii() and number.isdigit()
                ok = ok and len(number) < 19
                targets = [ConnectionId(int(number))] if ok else []
            for conn in targets:
                actions.extend(
                    self.disconnect(
                        conn, code=command.code, reason=command.reason, timestamp=timestamp
                    )
                )
        else:
            actions.extend(
                self.kick(
                    command.room, command.username, reason=command.reason, timestamp=timestamp
                )
            )

    def _publish_as_server(
        self,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
        msg_id: str | None = None,
        ticket: int = 0,
    ) -> None:
        cr = self._cluster.get(room)
        if self._online:  # relayed even with no member here: maybe some elsewhere
            relayed = self._publish_cluster(
                None, room, cr, username, content, timestamp, actions, msg_id, ticket
            )
            if not relayed and ticket:
                actions.append(PublishAnswered(ticket=ticket, room=room, position=None))
        elif cr is not None:  # numbered here, and answered so
            super()._publish_as_server(room, username, content, timestamp, actions, msg_id, ticket)
        elif ticket:  # cut off from Redis, with no member here: nobody to publish to
            actions.append(PublishAnswered(ticket=ticket, room=room, position=None))

    def _occupancy(self, room: RoomName) -> int:
        cr = self._cluster.get(room)
        return super()._occupancy(room) + (len(cr.pending) if cr is not None else 0)

    def _try_join(
        self,
        conn: ConnectionId,
        c: _Conn,
        room: RoomName,
        timestamp: int,
        actions: list[Action],
        resume: Resume | None = None,
    ) -> None:
        rights = self._admitted(conn, c, room, actions)
        if rights is None:
            return
        cr = self._cluster.get(room)
        if cr is None:
            self._gens += 1
            # Offline, a new room is numbered here until the cluster's numbering is seen.
            cr = self._cluster[room] = ClusterRoom(gen=self._gens, local=not self._online)
            # A new room is told the link's state: online, it listens to the room.
            link = RoomInput.LINK_RESTORED if self._online else RoomInput.LINK_LOST
            if cr.step(link) is Effect.SUBSCRIBE:
                actions.append(self._subscribe(room, cr))
        cr.step(RoomInput.FIRST_INTEREST)
        if cr.step(RoomInput.JOIN) is Effect.PEND:
            # Joined once the room's presence across the cluster is known.
            cr.pending[conn] = rights
            if resume is not None:
                cr.pending_resume[conn] = resume
            c.rooms[room] = rights
            return
        self._join(conn, c, room, rights, timestamp, actions)
        if resume is not None:
            self._resume(conn, room, resume, actions)

    def _subscribe(self, room: RoomName, cr: ClusterRoom) -> Subscribe:
        return Subscribe(room=room, gen=cr.gen, position_ms=int(self.config.position_ttl * 1000))

    def _first_here(self, room: RoomName, username: Username, actions: list[Action]) -> bool:
        cr = self._cluster.get(room)
        if cr is None:
            return True
        if self._online:
            self._announce(room, username, True, actions)
        # Present elsewhere already: no news for anyone.
        return username not in cr.remote

    def _presence_state(self, room: RoomName) -> bytes:
        if room in self._cluster:
            return codec.encode_presence_state(room, sorted(self._present(room)))
        return super()._presence_state(room)

    def _leave(
        self, conn: ConnectionId, c: _Conn, room: RoomName, timestamp: int, actions: list[Action]
    ) -> None:
        cr = self._cluster.get(room)
        if cr is not None:
            cr.positioned.discard(conn)
            cr.resuming.pop(conn, None)
            cr.pending_resume.pop(conn, None)
        if cr is not None and conn in cr.pending:
            del c.rooms[room]
            del cr.pending[conn]
            if cr.held:
                cr.held = [held for held in cr.held if held[0] != conn]
            self._release(room, cr, actions)
            return
        super()._leave(conn, c, room, timestamp, actions)

    def _last_here(self, room: RoomName, username: Username, actions: list[Action]) -> bool:
        cr = self._cluster.get(room)
        if cr is None:
            return True
        if self._online:
            self._announce(room, username, False, actions)
        self._release(room, cr, actions)
        return username not in cr.remote

    def _joining(self, conn: ConnectionId, room: RoomName) -> bool:
        cr = self._cluster.get(room)
        return cr is not None and conn in cr.pending

    # -- positions: resume, history, resets ---------------------------------------------

    def _resume(
        self, conn: ConnectionId, room: RoomName, resume: Resume, actions: list[Action]
    ) -> None:
        cr = self._cluster.get(room)
        if cr is None:  # (not a cluster room: cannot happen for a member)
            super()._resume(conn, room, resume, actions)
            return
        if conn in cr.pending:
            cr.pending_resume[conn] = resume  # answered once joined
            return
        cr.positioned.add(conn)
        if not self._online:
            since = resume.since
            local = super().position(room)
            if since is None or since.epoch == local.epoch:
                super()._resume(conn, room, resume, actions)
            else:  # a position of the cluster's numbering, which this node cannot see now
                recovery = Recovery(recovered=False, reason=UNAVAILABLE)
                self._deliver((conn,), codec.encode_joined(room, local, recovery), actions)
            return
        # Read the stream; chats of the room wait for the answer (merged by seq).
        most, _ = self._replay_bounds()
        since = resume.since
        ticket = self._read(
            room,
            (conn, None),
            after=since.seq if since is not None else 0,
            count=most if since is not None else 0,
            actions=actions,
        )
        cr.resuming[conn] = Resuming(resume=resume, ticket=ticket)

    def _read(
        self,
        room: RoomName,
        waiting: tuple[ConnectionId | None, _HistoryRead | None],
        *,
        after: int,
        count: int,
        actions: list[Action],
        upto: int = 0,
        oldest: bool = False,
    ) -> int:
        self._tickets += 1
        policy = self._streams.policy(room)
        self._reads[self._tickets] = (room, *waiting)
        actions.append(
            ReadStream(
                room=room,
                ticket=self._tickets,
                after=after,
                upto=upto,
                count=count,
                oldest=oldest,
                keep=policy.size,
                keep_ms=int(policy.ttl * 1000),
                position_ms=int(self.config.position_ttl * 1000),
            )
        )
        return self._tickets

    def _read_history(
        self,
        conn: ConnectionId | None,
        request: codec.History,
        limit: int,
        actions: list[Action],
        ticket: int = 0,
    ) -> None:
        if not self._online:
            super()._read_history(conn, request, limit, actions, ticket)
            return
        since = request.since
        self._read(
            request.room,
            (None, _HistoryRead(conn, request, limit, ticket)),
            after=since.seq if since is not None else 0,
            count=limit,
            oldest=since is not None,
            actions=actions,
        )

    def _on_read(self, event: StreamRead, timestamp: int, actions: list[Action]) -> None:
        waiting = self._reads.pop(event.ticket, None)
        if waiting is None:
            return
        room, conn, history = waiting
        if history is not None:
            self._answer_history(event, history, actions)
        elif conn is not None:
            self._answer_resume(room, conn, event, actions)
        else:
            self._repaired(room, event, timestamp, actions)

    def _answer_history(self, event: StreamRead, h: _HistoryRead, actions: list[Action]) -> None:
        if h.conn is not None and h.conn not in self._conns:
            return
        since = h.request.since
        if since is not None and since.epoch != event.epoch:
            # Of another epoch: the latest ones, as on a node on its own.
            self._read(
                event.room,
                (None, attrs.evolve(h, request=attrs.evolve(h.request, since=None))),
                after=0,
                count=h.limit,
                actions=actions,
            )
            return
        budget = self.config.send_queue_bytes // 2
        items: list[bytes] = []
        entries = event.entries if since is not None else tuple(reversed(event.entries))
        for seq, prefix in entries:
            payload = codec.complete_chat(prefix, seq)
            if items and len(payload) > budget:
                break
            items.append(payload)
            budget -= len(payload)
        if since is None:
            items.reverse()
        position = Position(event.epoch, event.top)
        if h.conn is None:
            actions.append(
                HistoryAnswered(
                    ticket=h.ticket, room=event.room, position=position, items=tuple(items)
                )
            )
            return
        self._deliver(
            (h.conn,), codec.encode_history(event.room, position, items, h.request.id), actions
        )

    def _answer_resume(
        self, room: RoomName, conn: ConnectionId, event: StreamRead, actions: list[Action]
    ) -> None:
        cr = self._cluster.get(room)
        rs = cr.resuming.get(conn) if cr is not None else None
        if cr is None or rs is None or rs.ticket != event.ticket:
            return  # left (or asked again) meanwhile
        rs.ticket = 0
        since = rs.resume.since
        held, rs.held = rs.held, []
        top = event.top
        if cr.local or (cr.epoch and cr.epoch != event.epoch):
            # The node's numbering is not the stream's right now (cut off a moment ago,
            # or the epoch changed while reading): no continuity to offer.
            del cr.resuming[conn]
            position = self.position(room)
            recovery = Recovery(
                recovered=None if since is None else False,
                reason=None if since is None else UNAVAILABLE,
            )
            self._deliver((conn,), codec.encode_joined(room, position, recovery), actions)
            self.replay_sizes.observe(0)
            return
        most, max_bytes = self._replay_bounds()
        payloads = {seq: codec.complete_chat(prefix, seq) for seq, prefix in event.entries}
        fit = 0  # the latest kept messages that fit in the replay's bytes
        for seq in range(top, top - most, -1):
            max_bytes -= len(payloads.get(seq, b""))
            if max_bytes < 0:
                break
            fit += 1
        first_kept = event.first_kept
        plan = self._plan(since, event.epoch, top, first_kept, room, fit, rs.resume.partial)
        if plan.replay is not None:
            missing = [
                seq for seq in range(plan.replay.first, plan.replay.last + 1) if seq not in payloads
            ]
            if missing:  # a message the stream failed to keep: lost, and said so
                first_kept = max(missing) + 1
                plan = self._plan(since, event.epoch, top, first_kept, room, fit, rs.resume.partial)
        position = Position(event.epoch, top)
        self._deliver((conn,), codec.encode_joined(room, position, plan), actions)
        replay = plan.replay
        self.replay_sizes.observe(0 if replay is None else replay.last - replay.first + 1)
        if plan.replay is not None:
            for seq in range(plan.replay.first, plan.replay.last + 1):
                self._deliver((conn,), codec.replayed(payloads[seq]), actions)
        # Chats that came while reading: those after the read, live (a gap among
        # them, a message the node never got and the stream no longer keeps: told).
        last = top
        for seq, payload in held:
            if seq <= last:
                continue
            if seq > last + 1:
                gap = Position(event.epoch, seq - 1)
                self._tell_reset((conn,), room, gap, TOO_OLD, actions)
            self._deliver((conn,), payload, actions)
            last = seq
        if cr.seq >= top or not cr.epoch:
            del cr.resuming[conn]
        else:  # records up to the read's top are still on their way: in the replay
            rs.floor = top

    def _plan(
        self,
        since: Position | None,
        epoch: str,
        top: int,
        first_kept: int,
        room: RoomName,
        most: int,
        partial: bool,
    ) -> Recovery:
        return plan_recovery(
            since,
            epoch=epoch,
            top=top,
            first_kept=first_kept,
            history=self._streams.policy(room).size > 0,
            recovery_max=most,
            partial=partial,
        )

    def _reset(
        self,
        room: RoomName,
        cr: ClusterRoom,
        position: Position,
        reason: str,
        actions: list[Action],
    ) -> None:
        """Tell the members that joined *room* with a position that it restarts here."""
        resuming = cr.resuming
        # Not those still reading their replay (their `joined` tells them), nor those
        # whose replay already went past it (they have those messages).
        conns = tuple(
            ConnectionId(conn)
            for conn in cr.positioned
            if conn not in resuming
            or (not resuming[conn].ticket and resuming[conn].floor <= position.seq)
        )
        for conn in conns:
            resuming.pop(conn, None)
        self._tell_reset(conns, room, position, reason, actions)

    def _tell_reset(
        self,
        conns: tuple[ConnectionId, ...],
        room: RoomName,
        position: Position,
        reason: str,
        actions: list[Action],
    ) -> None:
        """Send *conns* a ``reset`` of *room* to *position* (counted)."""
        if conns:
            self._resets += len(conns)
            self._deliver(conns, codec.encode_reset(room, position, reason), actions)

    # -- publishing -----------------------------------------------------------------------

    def _publish(
        self,
        conn: ConnectionId | None,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
        msg_id: str | None = None,
        skip: Collection[int] = (),  # (the fallback's: it calls the core's directly)
    ) -> bool:
        cr = self._cluster.get(room)
        if cr is None:
            return super()._publish(conn, room, username, content, timestamp, actions, msg_id)
        if conn is not None and conn in cr.pending:
            return self._hold(conn, room, username, content, timestamp, actions, msg_id)
        return self._publish_cluster(conn, room, cr, username, content, timestamp, actions, msg_id)

    def _release(self, room: RoomName, cr: ClusterRoom, actions: list[Action]) -> None:
        """
        Stop listening to *room* if nobody here is in it or waiting for it, once this
        node's messages still on their way back are in (for their notices).
        """
        if cr.pending or room in self._registry.rooms:
            return
        busy = cr.outbox and self._online
        inp = RoomInput.LAST_INTEREST_BUSY if busy else RoomInput.LAST_INTEREST
        if cr.step(inp) is Effect.REMOVE:
            self._remove(room, actions)

    def _remove(self, room: RoomName, actions: list[Action]) -> None:
        """Forget *room*, and stop listening to it if the link is up."""
        del self._cluster[room]
        if self._online:
            actions.append(Unsubscribe(room=room))

    def _announce(
        self,
        room: RoomName,
        username: Username,
        present: bool,
        actions: list[Action],
        *,
        force: bool = False,
    ) -> None:
        announced = self._announced
        if present:
            announced.setdefault(room, set()).add(username)
        else:
            self._recent_leaves.append((room, username))
            users = announced.get(room)
            if users is not None:
                users.discard(username)
                if not users:
                    del announced[room]
        actions.append(Announce(room=room, username=username, present=present, force=force))

    def _hold(
        self,
        conn: ConnectionId,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
        msg_id: str | None,
    ) -> bool:
        """
        A chat from a connection still joining *room*: published once it has joined.

        Returns:
            False if *content* cannot be forwarded (nothing held).
        """
        cr = self._cluster[room]
        if codec.chat_prefix(username, content, room, timestamp) is None:
            return False
        if len(cr.held) >= MAX_HELD:
            self._error(conn, codec.NOT_JOINED, f"still joining room {room!r}", actions, msg_id)
        else:
            cr.held.append((conn, content, timestamp, msg_id))
        return True

    def _publish_cluster(
        self,
        conn: ConnectionId | None,
        room: RoomName,
        cr: ClusterRoom | None,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
        msg_id: str | None = None,
        ticket: int = 0,
    ) -> bool:
        """
        Relay a message (delivered here too when it comes back: one order on every
        node), or number and deliver it here only while the backplane is down. With no
        *cr* (nobody here in the room) it is relayed with nothing to wait for. With a
        *ticket* (online), Redis's answer is awaited (:class:`PublishAnswered`).
        """
        if not self._online:
            assert cr is not None
            if not super()._publish(conn, room, username, content, timestamp, actions, msg_id):
                return False
            self._relay_unconfirmed += 1
            return True
        prefix = codec.chat_prefix(username, content, room, timestamp, msg_id)
        if prefix is None:
            return False
        self._refs += 1
        ref = self._refs
        if cr is not None:
            cr.outbox.append((ref, username, content, timestamp))
        config = self.config
        policy = self._streams.policy(room)
        dedup = None
        if msg_id is not None:
            dedup = (str(username), msg_id)
            if conn is not None:
                self._awaiting[ref] = (conn, msg_id)
        if ticket:
            self._answering[ref] = (room, ticket)
        actions.append(
            Relay(
                room=room,
                ref=ref,
                prefix=prefix,
                keep=policy.size,
                keep_ms=int(policy.ttl * 1000),
                position_ms=int(config.position_ttl * 1000),
                dedup=dedup,
                dedup_ms=int(config.dedup_window * 1000),
                answer=bool(ticket),
            )
        )
        return True

    def _on_relayed(self, event: Relayed, actions: list[Action]) -> None:
        """The answer to an acknowledged publish: ack it; a duplicate comes back no more."""
        waiting = self._awaiting.pop(event.ref, None)
        if waiting is not None and waiting[0] in self._conns:
            conn, msg_id = waiting
            position = Position(event.epoch, event.seq)
            self._deliver((conn,), codec.encode_ack(msg_id, event.room, position), actions)
        answering = self._answering.pop(event.ref, None)
        if answering is not None:
            actions.append(
                PublishAnswered(
                    ticket=answering[1],
                    room=event.room,
                    position=Position(event.epoch, event.seq),
                    duplicate=event.duplicate,
                )
            )
        if not event.duplicate:
            return
        room = event.room
        cr = self._cluster.get(room)
        if cr is None:
            return
        cr.outbox = deque(entry for entry in cr.outbox if entry[0] != event.ref)
        if (
            not cr.outbox
            and cr.lifetime is Lifetime.DRAINING
            and cr.step(RoomInput.OUTBOX_DRAINED) is Effect.REMOVE
        ):
            self._remove(room, actions)

    # -- records ----------------------------------------------------------------------------

    def _on_record(self, event: RecordReceived, timestamp: int, actions: list[Action]) -> None:
        room = event.room
        cr = self._cluster.get(room)
        record = parse_record(event.data)
        if cr is None or record is None:
            return  # no longer listening, or not a record of ours
        if isinstance(record, ChatRecord):
            if cr.phase is not Phase.OFFLINE:
                self._on_chat(room, cr, record, actions)
                if record.node == self.node:
                    self._came_back(room, cr, record, actions)
            return
        self._on_presence(room, cr, record, timestamp, actions)

    def _on_chat(
        self, room: RoomName, cr: ClusterRoom, record: ChatRecord, actions: list[Action]
    ) -> None:
        """A chat record: delivered in seq order, once; a gap is read from the stream."""
        if record.epoch in cr.left:
            return  # of a numbering the room left: on its way before the change
        if cr.repair:
            cr.waiting.append(record)
            return
        seq = record.seq
        if record.epoch != cr.epoch or cr.local:
            # The first news of the room's numbering, or a new epoch: Redis lost its
            # data or the room expired, or this node numbered on its own meanwhile.
            if cr.epoch or cr.local:
                reason = EPOCH_CHANGED if record.epoch != cr.epoch else UNAVAILABLE
                self._restart(room, cr, Position(record.epoch, seq - 1), reason, actions)
            else:
                cr.epoch = record.epoch
                cr.seq = seq - 1
        if seq <= cr.seq:
            return  # delivered already (read to repair a gap, or before a snapshot)
        if seq > cr.seq + 1:
            # Missed records: read them from the stream before delivering this one.
            self._repairs += 1
            cr.waiting.append(record)
            cr.repair = self._read(
                room,
                (None, None),
                after=cr.seq,
                upto=seq - 1,
                count=min(seq - 1 - cr.seq, MAX_HELD),
                actions=actions,
            )
            return
        self._deliver_chat(room, cr, seq, codec.complete_chat(record.prefix, seq), actions)

    def _restart(
        self,
        room: RoomName,
        cr: ClusterRoom,
        position: Position,
        reason: str,
        actions: list[Action],
    ) -> None:
        """The room's numbering is *position* from now on: say so to those who follow it."""
        moved = cr.epoch != position.epoch
        if moved and cr.epoch and not cr.local and reason == EPOCH_CHANGED:
            cr.left = (*cr.left, cr.epoch)[-_LEFT_EPOCHS:]  # a stream of Redis's, gone
        cr.local = False
        cr.epoch = position.epoch
        cr.seq = position.seq
        for rs in cr.resuming.values():
            rs.held.clear()  # of the old numbering
            if moved:
                rs.floor = 0  # a seq of the old epoch: no replay went past the new one
        self._reset(room, cr, position, reason, actions)

    def _repaired(
        self, room: RoomName, event: StreamRead, timestamp: int, actions: list[Action]
    ) -> None:
        cr = self._cluster.get(room)
        if cr is None or cr.repair != event.ticket:
            return
        cr.repair = 0
        waiting, cr.waiting = cr.waiting, []
        if event.epoch != cr.epoch and not cr.local:
            # The room's stream started over while the node read it (its keys gone
            # with the link up): follow the new one; the old epoch's records are moot.
            self._restart(room, cr, Position(event.epoch, event.top), EPOCH_CHANGED, actions)
            waiting = [record for record in waiting if record.epoch == event.epoch]
        elif waiting and not cr.local:
            # The read covered what was missing before the first waiting record.
            same = waiting[0].epoch == cr.epoch
            end = waiting[0].seq - 1 if same else event.top
            for seq, prefix in event.entries:
                if seq <= cr.seq or seq > end:
                    continue
                if seq > cr.seq + 1:  # not kept any more: lost, and said so
                    self._reset(room, cr, Position(cr.epoch, seq - 1), TOO_OLD, actions)
                self._deliver_chat(room, cr, seq, codec.complete_chat(prefix, seq), actions)
            if same and cr.seq < end:
                self._reset(room, cr, Position(cr.epoch, end), TOO_OLD, actions)
                cr.seq = end
        for i, record in enumerate(waiting):
            self._on_chat(room, cr, record, actions)
            if cr.repair:  # another gap: the rest waits for that read
                cr.waiting.extend(waiting[i + 1 :])
                return

    def _deliver_chat(
        self, room: RoomName, cr: ClusterRoom, seq: int, payload: bytes, actions: list[Action]
    ) -> None:
        cr.seq = seq
        r = self._registry.rooms.get(room)
        if r is None:
            return
        resuming = cr.resuming
        if not resuming:
            self._deliver(tuple(r.members), payload, actions)
            return
        members = []
        for member in r.members:
            rs = resuming.get(member)
            if rs is None:
                members.append(member)
            elif rs.ticket:
                rs.held.append((seq, payload))
            elif seq > rs.floor:
                del resuming[member]
                members.append(member)
            elif seq == rs.floor:
                del resuming[member]  # caught up: the replay had it
        if members:
            self._deliver(tuple(members), payload, actions)

    def _came_back(
        self, room: RoomName, cr: ClusterRoom, record: ChatRecord, actions: list[Action]
    ) -> None:
        """This node's message is numbered: notice it, and forget it from the outbox."""
        outbox = cr.outbox
        if (
            cr.lifetime is Lifetime.DRAINING
            and outbox
            and outbox[-1][0] <= record.ref
            and cr.step(RoomInput.OUTBOX_DRAINED) is Effect.REMOVE
        ):
            self._remove(room, actions)
        while outbox and outbox[0][0] <= record.ref:
            ref, username, content, stamp = outbox.popleft()
            if ref == record.ref:
                self._messages_published += 1
                actions.append(
                    MessagePublished(
                        room=room,
                        username=username,
                        content=content,
                        seq=record.seq,
                        timestamp=stamp,
                        epoch=record.epoch,
                    )
                )
                # Acknowledged now: Redis's reply may still be lost with the link.
                waiting = self._awaiting.pop(ref, None)
                if waiting is not None and waiting[0] in self._conns:
                    position = Position(record.epoch, record.seq)
                    ack = codec.encode_ack(waiting[1], room, position)
                    self._deliver((waiting[0],), ack, actions)

    def _on_presence(
        self,
        room: RoomName,
        cr: ClusterRoom,
        record: PresenceRecord,
        timestamp: int,
        actions: list[Action],
    ) -> None:
        gap = record.version > cr.version + 1
        effect = cr.step(RoomInput.RECORD_GAP if gap else RoomInput.RECORD)
        if effect is Effect.APPLY:
            self._apply_presence(room, cr, record, timestamp, actions)
        elif effect is Effect.BUFFER:
            cr.buffered(record)
        elif effect is Effect.RESYNC:
            # A record went missing: read the presence again, keeping what comes
            # meanwhile (this one included) to apply on top of it.
            self._presence_gaps += 1
            cr.buffered(record)
            actions.append(self._subscribe(room, cr))
        # IGNORE: a record of a lost link

    def _apply_presence(
        self,
        room: RoomName,
        cr: ClusterRoom,
        record: PresenceRecord,
        timestamp: int,
        actions: list[Action],
    ) -> None:
        user = record.username
        r = self._registry.rooms.get(room)
        local = r.users if r is not None else {}
        was = user in local or user in cr.remote
        if not cr.apply(record, self.node or "") or user in local:
            return
        now_present = user in cr.remote
        if r is not None and was != now_present:
            self._announce_change(r.members, room, user, now_present, timestamp, actions)

    def _announce_change(
        self,
        members: Iterable[ConnectionId],
        room: RoomName,
        user: Username,
        present: bool,
        timestamp: int,
        actions: list[Action],
    ) -> None:
        audience = self._presence_audience(members, room)
        if audience:
            event = "join" if present else "leave"
            self._deliver(audience, codec.encode_presence(event, user, room, timestamp), actions)

    def _on_synced(self, event: RoomSynced, timestamp: int, actions: list[Action]) -> None:
        room = event.room
        cr = self._cluster.get(room)
        if cr is None:
            return
        if event.gen != cr.gen:
            return  # an answer to an earlier listening of the room
        if event.version < cr.version:
            # Read before records already applied: stale. A newer one is coming,
            # unless this was the reading meant to settle presence: ask again.
            inp = RoomInput.SNAPSHOT_STALE
        elif cr.lost_version:
            # The first snapshot since the link was lost. Redis may have expired the
            # other nodes' entries meanwhile (it was paused, full, out of reach) or
            # lost its data, and those nodes may not have re-announced yet: keep who
            # was there (no leaves now). The driver reads the snapshot again a
            # presence TTL after connecting, which settles it (SETTLING).
            inp = RoomInput.SNAPSHOT_AFTER_OUTAGE
        else:
            inp = RoomInput.SNAPSHOT
        effect = cr.step(inp)
        if effect is Effect.SUBSCRIBE:
            actions.append(self._subscribe(room, cr))
        if effect is not Effect.ADOPT and effect is not Effect.ADOPT_REREAD:
            return  # NOTHING, IGNORE (an answer of a lost link) or SUBSCRIBE
        if event.epoch and not cr.repair and event.epoch not in cr.left:
            if cr.local or (cr.epoch and event.epoch != cr.epoch):
                reason = EPOCH_CHANGED if event.epoch != cr.epoch else UNAVAILABLE
                self._restart(room, cr, Position(event.epoch, event.seq), reason, actions)
            elif not cr.epoch:
                # The room's position as the snapshot was read: records up to it were
                # published before anyone here joined (they all wait for this).
                cr.epoch = event.epoch
                cr.seq = event.seq
        r = self._registry.rooms.get(room)
        local = r.users if r is not None else {}
        before = set(cr.remote)
        remote: dict[Username, set[str]] = {}
        for node, name in event.entries:
            if node != self.node and is_valid_username(name):
                remote.setdefault(Username(name), set()).add(node)
        if cr.phase is Phase.SETTLING:
            # Who was there is kept, but for those whose node said they left.
            gone = set(event.gone)
            for user, nodes in cr.remote.items():
                kept = {node for node in nodes if (node, user) not in gone}
                if kept:
                    remote.setdefault(user, set()).update(kept)
        cr.lost_version = 0
        cr.remote = remote
        cr.version = event.version
        if r is not None:
            for user in sorted(before.symmetric_difference(remote)):
                if user not in local:
                    self._announce_change(r.members, room, user, user in remote, timestamp, actions)
        buffered, cr.buffer = cr.buffer, []
        # A gap among them makes the room SYNCING again: the rest waits in the buffer.
        for record in sorted(buffered, key=lambda rec: rec.version):
            self._on_presence(room, cr, record, timestamp, actions)
        if effect is Effect.ADOPT_REREAD and cr.step(RoomInput.REREAD) is Effect.SUBSCRIBE:
            actions.append(self._subscribe(room, cr))
        if cr.phase is Phase.LIVE or cr.phase is Phase.SETTLING:
            self._join_pending(room, cr, timestamp, actions)

    def _join_pending(
        self, room: RoomName, cr: ClusterRoom, timestamp: int, actions: list[Action]
    ) -> None:
        pending, cr.pending = cr.pending, {}
        resumes, cr.pending_resume = cr.pending_resume, {}
        for conn, rights in pending.items():
            cid = ConnectionId(conn)
            self._join(cid, self._conns[cid], room, rights, timestamp, actions)
            resume = resumes.get(conn)
            if resume is not None:
                self._resume(cid, room, resume, actions)
        held, cr.held = cr.held, []
        for conn, content, stamp, msg_id in held:
            sender = self._conns.get(ConnectionId(conn))
            if sender is not None and room in sender.rooms and conn not in cr.pending:
                self._publish(
                    ConnectionId(conn), room, sender.username, content, stamp, actions, msg_id
                )

    # -- the link -----------------------------------------------------------------------

    def _on_lost(self, timestamp: int, actions: list[Action]) -> None:
        self._online = False
        reads, self._reads = self._reads, {}
        awaiting, self._awaiting = self._awaiting, {}
        for room, cr in list(self._cluster.items()):
            if cr.step(RoomInput.LINK_LOST) is not Effect.FALL_BACK:
                continue
            cr.buffer.clear()
            cr.lost_version = max(cr.version, cr.lost_version)
            cr.version = 0  # Redis may come back without its data, counting from 0
            # Records that waited for a repair: those that follow on, delivered.
            waiting, cr.waiting, cr.repair = cr.waiting, [], 0
            for record in waiting:
                if record.epoch == cr.epoch and record.seq == cr.seq + 1:
                    payload = codec.complete_chat(record.prefix, record.seq)
                    self._deliver_chat(room, cr, record.seq, payload, actions)
            # From now on this node numbers the room's messages on its own, in an
            # epoch of its own.
            visible = cr.seq if not cr.local else super().position(room).seq
            start = self._streams.restart(room, visible, self._now)
            cr.local = True
            # Those who follow positions are told; a member whose replay is still
            # catching up may have had this node's unconfirmed messages from the
            # stream: it restarts after them instead.
            resuming, cr.resuming = cr.resuming, {}
            told = tuple(ConnectionId(c) for c in cr.positioned if c not in resuming)
            self._tell_reset(told, room, start, UNAVAILABLE, actions)
            # Relayed but not back: maybe lost on the way, maybe published (it will not
            # come back now). Numbered here and delivered, at least on this node.
            outbox, cr.outbox = cr.outbox, type(cr.outbox)()
            for ref, username, content, stamp in outbox:
                sender, msg_id = awaiting.pop(ref, (None, None))
                self._relay_unconfirmed += 1
                if sender is not None and sender not in self._conns:
                    sender = msg_id = None
                super()._publish(
                    sender, room, username, content, stamp, actions, msg_id, skip=resuming
                )
            position = super().position(room)
            for conn, rs in resuming.items():
                cid = ConnectionId(conn)
                if not rs.ticket:
                    self._tell_reset((cid,), room, position, UNAVAILABLE, actions)
                    continue
                # Reading: the read is lost with the link.
                if rs.resume.since is None:
                    recovery = Recovery(recovered=None)
                else:
                    recovery = Recovery(recovered=False, reason=UNAVAILABLE)
                self._deliver((cid,), codec.encode_joined(room, position, recovery), actions)
            self._join_pending(room, cr, timestamp, actions)
            if (
                cr.lifetime is Lifetime.DRAINING
                and cr.step(RoomInput.OUTBOX_DRAINED) is Effect.REMOVE
            ):
                self._remove(room, actions)  # offline: no Unsubscribe
        for _room, _conn, history in reads.values():
            if history is not None and (history.conn is None or history.conn in self._conns):
                # Answered from what this node keeps (its own numbering now).
                super()._read_history(
                    history.conn, history.request, history.limit, actions, history.ticket
                )
        # Server-side publishes not answered: their fate is unknown.
        answering, self._answering = self._answering, {}
        for room, ticket in answering.values():
            actions.append(PublishAnswered(ticket=ticket, room=room, position=None))
        queries, self._queries = self._queries, set()
        actions.extend(ClusterAnswered(ticket=t, read=None) for t in sorted(queries))

    def _on_restored(self, actions: list[Action]) -> None:
        self._online = True
        registry = self._registry.rooms
        # Every Subscribe first, then every Announce: a driver can batch each kind.
        for room, cr in self._cluster.items():
            if cr.step(RoomInput.LINK_RESTORED) is Effect.SUBSCRIBE:
                actions.append(self._subscribe(room, cr))
        # Take back who left during the outage (rather than wait for their entries
        # to expire), then announce everyone here.
        recent, self._recent_leaves = self._recent_leaves, deque(maxlen=MAX_HELD)
        # Forced: the entry may have expired meanwhile, published as an expiry that the
        # other nodes hold back while they settle; this tells them the user left.
        for room, user in recent:
            r = registry.get(room)
            if r is None or user not in r.users:
                actions.append(Announce(room=room, username=user, present=False, force=True))
        for room, users in list(self._announced.items()):
            r = registry.get(room)
            for user in [u for u in users if r is None or u not in r.users]:
                self._announce(room, user, False, actions, force=True)
        for room in self._cluster:
            r = registry.get(room)
            if r is not None:
                for user in r.users:
                    self._announce(room, user, True, actions)
