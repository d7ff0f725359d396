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
from ..core.actions import Action, Announce, MessagePublished, Relay, Subscribe, Unsubscribe
from ..core.broker import Broker, BrokerStatistics, Resume, _Conn
from ..core.errors import ConfigError
from ..core.events import (
    BackplaneLost,
    BackplaneRestored,
    Event,
    RecordReceived,
    RoomSynced,
)
from ..core.names import ConnectionId, RoomName, Username, is_valid_username
from .records import ChatRecord, PresenceRecord, parse_record
from .room import ClusterRoom, Effect, Lifetime, Phase, RoomInput, is_valid_node_id

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..core.auth import Authorizer
    from ..core.config import BrokerConfig

#: Chats a room may hold for connections still joining it (one round trip's worth).
MAX_HELD: Final = 1000
#: Room streams (positions, history, acknowledged publish) are served by a node on its
#: own; a cluster answers the requests that need them with this ``bad_message``.
_NO_STREAMS: Final = (
    "positions, history and acknowledged publish (since, history, id) are not served"
    " by a cluster yet"
)


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

    # -- introspection ------------------------------------------------------------------

    def _present(self, room: RoomName) -> set[Username]:
        users = super()._present(room)
        cr = self._cluster.get(room)
        if cr is not None:
            users.update(cr.remote)
        return users

    def seq(self, room: str) -> int:
        cr = self._cluster.get(RoomName(room))
        if cr is not None:
            return cr.seq
        return super().seq(room)

    def statistics(self) -> BrokerStatistics:
        return attrs.evolve(
            super().statistics(),
            relay_unconfirmed=self._relay_unconfirmed,
            presence_gaps=self._presence_gaps,
            backplane_online=self._online,
        )

    # -- the core's hooks ---------------------------------------------------------------

    def _handle_other(self, event: Event, timestamp: int, actions: list[Action]) -> None:
        if isinstance(event, RecordReceived):
            self._on_record(event, timestamp, actions)
        elif isinstance(event, RoomSynced):
            self._on_synced(event, timestamp, actions)
        elif isinstance(event, BackplaneLost):
            self._on_lost(timestamp, actions)
        elif isinstance(event, BackplaneRestored):
            self._on_restored(actions)
        else:
            super()._handle_other(event, timestamp, actions)

    def _publish_as_server(
        self,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
    ) -> None:
        cr = self._cluster.get(room)
        if cr is not None or self._online:  # no member here, maybe some elsewhere
            self._publish_cluster(room, cr, username, content, timestamp, actions)

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
        if resume is not None:
            self._error(conn, codec.BAD_MESSAGE, _NO_STREAMS, actions)
        cr = self._cluster.get(room)
        if cr is None:
            self._gens += 1
            cr = self._cluster[room] = ClusterRoom(gen=self._gens)
            # A new room is told the link's state: online, it listens to the room.
            link = RoomInput.LINK_RESTORED if self._online else RoomInput.LINK_LOST
            if cr.step(link) is Effect.SUBSCRIBE:
                actions.append(Subscribe(room=room, gen=cr.gen))
        cr.step(RoomInput.FIRST_INTEREST)
        if cr.step(RoomInput.JOIN) is Effect.PEND:
            # Joined once the room's presence across the cluster is known.
            cr.pending[conn] = rights
            c.rooms[room] = rights
            return
        self._join(conn, c, room, rights, timestamp, actions)

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

    def _resume(
        self, conn: ConnectionId, room: RoomName, resume: Resume, actions: list[Action]
    ) -> None:
        self._error(conn, codec.BAD_MESSAGE, _NO_STREAMS, actions)

    def _history(
        self, conn: ConnectionId, c: _Conn, request: codec.History, actions: list[Action]
    ) -> None:
        self._error(conn, codec.BAD_MESSAGE, _NO_STREAMS, actions, request.id)

    def _publish(
        self,
        conn: ConnectionId | None,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
        msg_id: str | None = None,
    ) -> bool:
        if msg_id is not None and conn is not None:
            self._error(conn, codec.BAD_MESSAGE, _NO_STREAMS, actions, msg_id)
            return True
        cr = self._cluster.get(room)
        if cr is None:
            return super()._publish(conn, room, username, content, timestamp, actions)
        if conn is not None and conn in cr.pending:
            return self._hold(conn, room, username, content, timestamp, actions)
        return self._publish_cluster(room, cr, username, content, timestamp, actions)

    # -- joining and leaving ------------------------------------------------------------

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
        self, room: RoomName, username: Username, present: bool, actions: list[Action]
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
        actions.append(Announce(room=room, username=username, present=present))

    def _hold(
        self,
        conn: ConnectionId,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
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
            self._error(conn, codec.NOT_JOINED, f"still joining room {room!r}", actions)
        else:
            cr.held.append((conn, content, timestamp))
        return True

    # -- chats and records --------------------------------------------------------------

    def _publish_cluster(
        self,
        room: RoomName,
        cr: ClusterRoom | None,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
    ) -> bool:
        """
        Relay a message (delivered here too when it comes back: one order on every
        node), or deliver it here only while the backplane is down. With no *cr*
        (nobody here in the room) it is relayed with nothing to wait for.
        """
        prefix = codec.chat_prefix(username, content, room, timestamp)
        if prefix is None:
            return False
        if self._online:
            self._refs += 1
            if cr is not None:
                cr.outbox.append((self._refs, username, content, timestamp))
            actions.append(Relay(room=room, ref=self._refs, prefix=prefix))
        else:
            assert cr is not None
            self._relay_unconfirmed += 1
            self._deliver_local(room, cr, prefix, username, content, timestamp, actions)
        return True

    def _deliver_local(
        self,
        room: RoomName,
        cr: ClusterRoom,
        prefix: bytes,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
    ) -> None:
        """Deliver a message of this node here only, numbered on from the last seen."""
        cr.seq += 1
        self._messages_published += 1
        r = self._registry.rooms.get(room)
        if r is not None:
            self._deliver(tuple(r.members), codec.complete_chat(prefix, cr.seq), actions)
        actions.append(
            MessagePublished(
                room=room, username=username, content=content, seq=cr.seq, timestamp=timestamp
            )
        )

    def _on_record(self, event: RecordReceived, timestamp: int, actions: list[Action]) -> None:
        room = event.room
        cr = self._cluster.get(room)
        record = parse_record(event.data)
        if cr is None or record is None:
            return  # no longer listening, or not a record of ours
        if isinstance(record, ChatRecord):
            cr.seq = record.seq
            r = self._registry.rooms.get(room)
            if r is not None:
                self._deliver(
                    tuple(r.members), codec.complete_chat(record.prefix, record.seq), actions
                )
            if record.node == self.node:
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
                            )
                        )
            return
        self._on_presence(room, cr, record, timestamp, actions)

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
            actions.append(Subscribe(room=room, gen=cr.gen))
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
        elif cr.lost_version and event.version < cr.lost_version:
            # Redis came back without its data, and the other nodes may not have
            # re-announced yet: keep who was there (no leaves now). The driver reads
            # the snapshot again a little later, which settles it (SETTLING).
            inp = RoomInput.SNAPSHOT_BELOW_LOST
        else:
            inp = RoomInput.SNAPSHOT
        effect = cr.step(inp)
        if effect is Effect.SUBSCRIBE:
            actions.append(Subscribe(room=room, gen=cr.gen))
        if effect is not Effect.ADOPT and effect is not Effect.ADOPT_REREAD:
            return  # NOTHING, IGNORE (an answer of a lost link) or SUBSCRIBE
        r = self._registry.rooms.get(room)
        local = r.users if r is not None else {}
        before = set(cr.remote)
        remote: dict[Username, set[str]] = {}
        for node, name in event.entries:
            if node != self.node and is_valid_username(name):
                remote.setdefault(Username(name), set()).add(node)
        if cr.phase is Phase.SETTLING:
            for user, nodes in cr.remote.items():
                remote.setdefault(user, set()).update(nodes)
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
            actions.append(Subscribe(room=room, gen=cr.gen))
        if cr.phase is Phase.LIVE or cr.phase is Phase.SETTLING:
            self._join_pending(room, cr, timestamp, actions)

    def _join_pending(
        self, room: RoomName, cr: ClusterRoom, timestamp: int, actions: list[Action]
    ) -> None:
        pending, cr.pending = cr.pending, {}
        for conn, rights in pending.items():
            c = self._conns[ConnectionId(conn)]
            self._join(ConnectionId(conn), c, room, rights, timestamp, actions)
        held, cr.held = cr.held, []
        for conn, content, stamp in held:
            sender = self._conns.get(ConnectionId(conn))
            if sender is not None and room in sender.rooms and conn not in cr.pending:
                self._publish(ConnectionId(conn), room, sender.username, content, stamp, actions)

    def _on_lost(self, timestamp: int, actions: list[Action]) -> None:
        self._online = False
        for room, cr in list(self._cluster.items()):
            if cr.step(RoomInput.LINK_LOST) is not Effect.FALL_BACK:
                continue
            cr.buffer.clear()
            cr.lost_version = max(cr.version, cr.lost_version)
            cr.version = 0  # Redis may come back without its data, counting from 0
            # Relayed but not back: maybe lost on the way. Deliver them here at least.
            outbox, cr.outbox = cr.outbox, type(cr.outbox)()
            for _, username, content, stamp in outbox:
                prefix = codec.chat_prefix(username, content, room, stamp)
                if prefix is not None:
                    self._relay_unconfirmed += 1
                    self._deliver_local(room, cr, prefix, username, content, stamp, actions)
            self._join_pending(room, cr, timestamp, actions)
            if (
                cr.lifetime is Lifetime.DRAINING
                and cr.step(RoomInput.OUTBOX_DRAINED) is Effect.REMOVE
            ):
                self._remove(room, actions)  # offline: no Unsubscribe

    def _on_restored(self, actions: list[Action]) -> None:
        self._online = True
        registry = self._registry.rooms
        # Every Subscribe first, then every Announce: a driver can batch each kind.
        for room, cr in self._cluster.items():
            if cr.step(RoomInput.LINK_RESTORED) is Effect.SUBSCRIBE:
                actions.append(Subscribe(room=room, gen=cr.gen))
        # Take back who left during the outage (rather than wait for their entries
        # to expire), then announce everyone here.
        recent, self._recent_leaves = self._recent_leaves, deque(maxlen=MAX_HELD)
        for room, user in recent:
            r = registry.get(room)
            if r is None or user not in r.users:
                actions.append(Announce(room=room, username=user, present=False))
        for room, users in list(self._announced.items()):
            r = registry.get(room)
            for user in [u for u in users if r is None or u not in r.users]:
                self._announce(room, user, False, actions)
        for room in self._cluster:
            r = registry.get(room)
            if r is not None:
                for user in r.users:
                    self._announce(room, user, True, actions)
