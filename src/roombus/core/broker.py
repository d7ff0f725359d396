"""
Broker: the one facade of the sans-IO core.

Events and the current time go in; actions come out. The broker never reads a clock,
never touches a socket, and never raises because of what a client sent: a refused
message becomes an ``error`` envelope, a dead peer a :class:`~roombus.Close`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING, Final, final

import attrs

from ..cluster.records import ChatRecord, PresenceRecord, parse_record
from ..cluster.room import ClusterRoom, is_valid_node_id
from . import codec
from .actions import (
    Action,
    Announce,
    Close,
    Deliver,
    MessagePublished,
    Relay,
    SendPing,
    Subscribe,
    Unsubscribe,
    UserJoined,
    UserLeft,
)
from .auth import Authorizer, Identity
from .codes import CloseCode
from .config import BrokerConfig
from .errors import ConfigError, LocalProtocolError
from .events import (
    BackplaneLost,
    BackplaneRestored,
    ClientConnected,
    ClientDisconnected,
    Event,
    PongReceived,
    RecordReceived,
    RoomSynced,
    TextReceived,
)
from .heartbeat import Heartbeat, HeartbeatState
from .names import ConnectionId, RoomName, Username, is_valid_room, is_valid_username
from .ratelimit import RateDecision, RateLimiter
from .registry import Registry, worth_shrinking

if TYPE_CHECKING:
    from collections.abc import Iterable

#: Close code for a peer that stopped answering pings (as websockets uses it).
PING_TIMEOUT_CODE: Final = CloseCode.INTERNAL_ERROR
#: Close code for a peer that broke a policy (sustained flooding, expired credentials).
POLICY_VIOLATION: Final = CloseCode.POLICY_VIOLATION

# What a connection may do in one room, decided once when it joins.
_PUBLISH: Final = 1
_PRESENCE: Final = 2
_ALL_RIGHTS: Final = _PUBLISH | _PRESENCE
#: Chats a room may hold for connections still joining it (one round trip's worth).
MAX_HELD: Final = 1000
_UNFORWARDABLE: Final = (
    "content cannot be forwarded: nested too deeply, a number out of range,"
    " or a lone surrogate (not Unicode text)"
)


@attrs.frozen(kw_only=True)
class BrokerStatistics:
    """
    A snapshot of a broker's size and traffic.

    Attributes:
        connections: Live connections.
        rooms: Rooms with at least one member.
        messages_published: Chat messages delivered to a room since the start (in a
            cluster: those published through this node).
        deliveries: Envelopes handed out (one per receiver) since the start.
        relay_unconfirmed: In a cluster, messages published through this node while
            the backplane was down, or not yet back from it when it went down:
            delivered here, maybe not on other nodes.
        presence_gaps: In a cluster, times a room's presence records had a gap (a
            record lost), after which the room's presence was read again.
        backplane_online: In a cluster, whether the backplane is connected.
    """

    connections: int
    rooms: int
    messages_published: int
    deliveries: int
    relay_unconfirmed: int = 0
    presence_gaps: int = 0
    backplane_online: bool = False


@attrs.define
class _Conn:
    username: Username
    default_room: RoomName | None
    heartbeat: Heartbeat
    limiter: RateLimiter | None
    identity: Identity | None = None
    expires: float | None = None
    # room -> rights (_PUBLISH | _PRESENCE), in join order
    rooms: dict[RoomName, int] = attrs.field(factory=dict)
    timer_gen: int = 0  # the generation of this connection's live timer entry


@final
class Broker:
    """
    The room broker: rooms, presence, envelopes and heartbeats, as pure logic.

    Args:
        config: Limits and intervals; the defaults suit production.
        authorizer: Decides, per connection and room, whether it may join, publish
            and see presence; asked once when the connection joins the room. None
            lets everyone do everything.
        node: This node's id in a cluster, to drive a backplane (see
            :class:`~roombus.Relay`); None for a broker on its own. A cluster
            broker starts offline (serving locally) until it is told
            :class:`~roombus.BackplaneRestored`.

    Raises:
        ConfigError: if *node* is not 1-64 characters of ``A-Z a-z 0-9 _ . : -``.

    Example::

        broker = Broker()
        actions = broker.handle(
            ClientConnected(conn=ConnectionId(1), username=Username("ann"),
                            room=RoomName("lobby")),
            now=0.0, timestamp=1_700_000_000,
        )
        # [Deliver(conns=(1,), payload=b'{"type":"presence","event":"join",...}'),
        #  UserJoined(room='lobby', username='ann'),
        #  Deliver(conns=(1,), payload=b'{"type":"presence_state",...}')]
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        authorizer: Authorizer | None = None,
        node: str | None = None,
    ) -> None:
        self.config: Final = config if config is not None else BrokerConfig()
        self.authorizer: Final = authorizer
        if node is not None and not is_valid_node_id(node):
            raise ConfigError(
                "node-id", f"must be 1-64 characters of A-Z a-z 0-9 _ . : -, not {node!r}"
            )
        self.node: Final = node
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
        # (deadline, conn): when a connection's credentials expire. An entry is live
        # while it equals the connection's ``expires``; others are skipped or pruned.
        self._expiries: list[tuple[float, ConnectionId]] = []
        self._registry = Registry()
        self._conns: dict[ConnectionId, _Conn] = {}
        self._peak = 0  # most connections since the table was last copied
        # (deadline, generation, conn); an entry is live while its generation is the
        # connection's timer_gen. Stale entries are skipped, and pruned when many.
        self._timers: list[tuple[float, int, ConnectionId]] = []
        self._gen = 0
        # The last instant handle_timeout found itself stalled (see _heartbeat).
        self._resumed_at = -math.inf
        self._messages_published = 0
        self._deliveries = 0

    # -- introspection (no side effects) --------------------------------------------

    @property
    def rooms(self) -> list[RoomName]:
        """The rooms that have members, in creation order."""
        return list(self._registry.rooms)

    def members(self, room: str) -> list[Username]:
        """The users present in *room* (in a cluster: on any node), sorted."""
        return sorted(self._present(RoomName(room)))

    def _present(self, room: RoomName) -> set[Username]:
        r = self._registry.rooms.get(room)
        users = set(r.users) if r is not None else set()
        cr = self._cluster.get(room)
        if cr is not None:
            users.update(cr.remote)
        return users

    def local_presence(self) -> list[tuple[RoomName, list[Username]]]:
        """Each room with members here and its users here: what a node keeps announced."""
        return [(name, list(r.users)) for name, r in self._registry.rooms.items()]

    def connections(self, room: str) -> list[ConnectionId]:
        """The connections in *room*, in join order; empty for an unknown room."""
        r = self._registry.rooms.get(RoomName(room))
        return list(r.members) if r is not None else []

    def rooms_of(self, conn: ConnectionId) -> list[RoomName]:
        """The rooms *conn* is in, in join order; empty for an unknown connection."""
        c = self._conns.get(conn)
        return list(c.rooms) if c is not None else []

    def seq(self, room: str) -> int:
        """The sequence number of *room*'s last chat message (0 before the first)."""
        cr = self._cluster.get(RoomName(room))
        if cr is not None:
            return cr.seq
        r = self._registry.rooms.get(RoomName(room))
        return r.seq if r is not None else 0

    def __contains__(self, conn: object) -> bool:
        return conn in self._conns

    def statistics(self) -> BrokerStatistics:
        """A snapshot of the broker's size and traffic counters."""
        return BrokerStatistics(
            connections=len(self._conns),
            rooms=len(self._registry.rooms),
            messages_published=self._messages_published,
            deliveries=self._deliveries,
            relay_unconfirmed=self._relay_unconfirmed,
            presence_gaps=self._presence_gaps,
            backplane_online=self._online,
        )

    # -- time -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """
        The earliest instant :meth:`handle_timeout` has work to do, or None.

        Exact: never earlier than needed, and never later.
        """
        timers = self._timers
        conns = self._conns
        beat: float | None = None
        while timers:
            deadline, gen, conn = timers[0]
            c = conns.get(conn)
            if c is not None and c.timer_gen == gen:
                beat = deadline
                break
            heapq.heappop(timers)
        expiries = self._expiries
        while expiries:
            at, conn = expiries[0]
            c = conns.get(conn)
            if c is not None and c.expires == at:
                break
            heapq.heappop(expiries)
        if not expiries:
            return beat
        return expiries[0][0] if beat is None else min(beat, expiries[0][0])

    def handle_timeout(self, *, now: float, timestamp: int) -> list[Action]:
        """
        Let time pass up to *now*: send due pings and close peers that stayed silent.

        Called late (more than ``min(1 s, ping_timeout / 2)`` after the earliest
        heartbeat deadline), the broker takes it that the driver was stalled: no peer
        is closed until it has had ``ping_timeout`` of running time since then to answer.
        A driver reads the input that arrived during a stall before calling this.

        Args:
            now: The driver's monotonic clock, in seconds.
            timestamp: Wall-clock Unix seconds, for envelopes this produces.
        """
        actions: list[Action] = []
        conns = self._conns
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            at, conn = heapq.heappop(expiries)
            c = conns.get(conn)
            if c is not None and c.expires == at:
                actions.append(
                    Close(conn=conn, code=POLICY_VIOLATION, reason="credentials expired")
                )
                self._disconnect(conn, c, timestamp, actions)
        # self._timers is re-read every time: _schedule may rebuild it meanwhile.
        first = True
        while self._timers and self._timers[0][0] <= now:
            deadline, gen, conn = heapq.heappop(self._timers)
            c = conns.get(conn)
            if c is None or c.timer_gen != gen:
                continue
            hb = c.heartbeat
            if first:
                first = False
                if now - deadline > hb.late_after:
                    # Called this late for the earliest deadline: the driver was stalled.
                    # Answers may be waiting unread, so every answer window opened
                    # before now opens again now (see _heartbeat).
                    self._resumed_at = now
            state = hb.timer(now, resumed_at=self._resumed_at)
            if state is HeartbeatState.AWAITING_PONG:
                actions.append(SendPing(conn=conn))
                self._schedule(conn, c)
            elif state is HeartbeatState.GRACE:
                self._schedule(conn, c)  # a new window after a stall; nothing to send
            else:
                actions.append(Close(conn=conn, code=PING_TIMEOUT_CODE, reason="ping timeout"))
                self._disconnect(conn, c, timestamp, actions)
        self._shrink()
        return actions

    def _shrink(self) -> None:
        """
        After many connections left: copy the connection table smaller (a dict never
        shrinks by deletions), and drop the expiry entries they left behind.
        """
        conns = self._conns
        if not worth_shrinking(len(conns), self._peak):
            return
        self._conns = dict(conns)
        self._peak = len(conns)
        self._expiries = [(c.expires, k) for k, c in conns.items() if c.expires is not None]
        heapq.heapify(self._expiries)

    def _schedule(self, conn: ConnectionId, c: _Conn) -> None:
        self._gen += 1
        c.timer_gen = self._gen
        heapq.heappush(self._timers, (c.heartbeat.deadline, self._gen, conn))
        self._prune_timers()

    def _prune_timers(self) -> None:
        if len(self._timers) > 2 * len(self._conns) + 64:
            # Pongs or departures left many stale entries behind: keep live ones only.
            self._timers = [(c.heartbeat.deadline, c.timer_gen, k) for k, c in self._conns.items()]
            heapq.heapify(self._timers)

    # -- events -----------------------------------------------------------------------

    def handle(self, event: Event, *, now: float, timestamp: int) -> list[Action]:
        """
        Handle one event and return the actions it causes, in order.

        Args:
            event: What happened.
            now: The driver's monotonic clock, in seconds.
            timestamp: Wall-clock Unix seconds, stamped on envelopes this produces.

        Raises:
            LocalProtocolError: on a driver mistake, such as connecting an id that is
                already connected. Never because of a client's input.
        """
        actions: list[Action] = []
        if isinstance(event, TextReceived):
            c = self._conns.get(event.conn)
            if c is not None:
                limiter = c.limiter
                decision = (
                    RateDecision.ALLOW
                    if limiter is None
                    else limiter.take(now, 1 + (len(event.text) >> 12))
                )
                if decision is RateDecision.ALLOW:
                    self._on_text(event.conn, c, event.text, timestamp, actions)
                elif decision is RateDecision.REFUSE:
                    self._error(event.conn, codec.RATE_LIMITED, "too many messages", actions)
                else:
                    actions.append(
                        Close(conn=event.conn, code=POLICY_VIOLATION, reason="rate limit exceeded")
                    )
                    self._disconnect(event.conn, c, timestamp, actions)
        elif isinstance(event, PongReceived):
            c = self._conns.get(event.conn)
            if c is not None:
                beat = self.config.heartbeat
                if not (beat and c.heartbeat.state is HeartbeatState.AWAITING_PONG):
                    # Unsolicited (RFC 6455 allows it): it costs like any other input.
                    decision = self._charge(event.conn, c, now, timestamp, actions)
                    beat = beat and decision is RateDecision.ALLOW
                if beat:
                    c.heartbeat.pong(now)
                    self._schedule(event.conn, c)
        elif isinstance(event, ClientConnected):
            self._on_connect(event, now, timestamp, actions)
        elif isinstance(event, ClientDisconnected):
            c = self._conns.get(event.conn)
            if c is not None:
                self._disconnect(event.conn, c, timestamp, actions)
                self._shrink()
        elif (
            isinstance(event, (RecordReceived, RoomSynced, BackplaneLost, BackplaneRestored))
            and self.node is None
        ):
            raise LocalProtocolError(f"a backplane event for a broker with no node: {event!r}")
        elif isinstance(event, RecordReceived):
            self._on_record(event, timestamp, actions)
        elif isinstance(event, RoomSynced):
            self._on_synced(event, timestamp, actions)
        elif isinstance(event, BackplaneLost):
            self._on_lost(timestamp, actions)
        elif isinstance(event, BackplaneRestored):
            self._on_restored(actions)
        else:
            raise LocalProtocolError(f"not an event: {event!r}")
        return actions

    def charge(
        self, conn: ConnectionId, *, now: float, timestamp: int
    ) -> tuple[bool, list[Action]]:
        """
        Charge one message's worth of *conn*'s rate limit for input that is not a
        message: a ping, a frame of a fragmented message (a pong is charged by
        :meth:`handle`, unless it answers the broker's own ping).

        Returns:
            Whether the input is allowed (also for an unknown connection or with rate
            limiting off), and the actions it causes. Not allowed and no actions: over
            the allowance, drop the input (leave a ping unanswered). Not allowed with
            actions: abusive, the connection is closed with 1008 ``rate limit
            exceeded``, as for a chat flood, and forgotten.
        """
        actions: list[Action] = []
        c = self._conns.get(conn)
        if c is None:
            return True, actions
        decision = self._charge(conn, c, now, timestamp, actions)
        return decision is RateDecision.ALLOW, actions

    def _charge(
        self, conn: ConnectionId, c: _Conn, now: float, timestamp: int, actions: list[Action]
    ) -> RateDecision:
        limiter = c.limiter
        if limiter is None:
            return RateDecision.ALLOW
        decision = limiter.take(now)
        if decision is RateDecision.ABUSE:
            actions.append(Close(conn=conn, code=POLICY_VIOLATION, reason="rate limit exceeded"))
            self._disconnect(conn, c, timestamp, actions)
        return decision

    def publish(self, room: str, content: object, *, username: str, timestamp: int) -> list[Action]:
        """
        Publish a chat message from server-side code to everyone in *room*.

        Nothing is delivered (and ``seq`` does not move) if the room has no members.

        Raises:
            ValueError: if *room* or *username* is not valid, or *content* cannot be
                encoded as JSON.
        """
        if not is_valid_room(room):
            raise ValueError(f"invalid room name: {room!r}")
        if not is_valid_username(username):
            raise ValueError(f"invalid username: {username!r}")
        try:
            codec.check_content(content)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"content is not encodable as JSON: {exc}") from None
        actions: list[Action] = []
        name = RoomName(room)
        if self.node is not None:
            cr = self._cluster.get(name)
            if cr is not None or self._online:  # no member here, maybe some elsewhere
                self._publish_cluster(name, cr, Username(username), content, timestamp, actions)
        elif name in self._registry.rooms:
            self._publish(None, name, Username(username), content, timestamp, actions)
        return actions

    # -- internals --------------------------------------------------------------------

    def _on_connect(
        self, event: ClientConnected, now: float, timestamp: int, actions: list[Action]
    ) -> None:
        conn = event.conn
        if conn in self._conns:
            raise LocalProtocolError(f"connection {conn} is already connected")
        config = self.config
        c = _Conn(
            username=event.username,
            default_room=event.room,
            heartbeat=Heartbeat.start(config.ping_interval, config.ping_timeout, now),
            limiter=(
                RateLimiter(config.rate_limit, config.rate_burst, now)
                if config.rate_limit
                else None
            ),
            identity=event.identity,
            expires=event.expires,
        )
        self._conns[conn] = c
        if len(self._conns) > self._peak:
            self._peak = len(self._conns)
        if config.heartbeat:  # off: the transport owns pings, and no timer is kept
            self._schedule(conn, c)
        if event.expires is not None:
            heapq.heappush(self._expiries, (event.expires, conn))
            if len(self._expiries) > 2 * len(self._conns) + 64:
                # Departed connections left entries behind: keep the live ones only.
                self._expiries = [
                    (k.expires, cid) for cid, k in self._conns.items() if k.expires is not None
                ]
                heapq.heapify(self._expiries)
        if event.room is not None:
            self._try_join(conn, c, event.room, timestamp, actions)

    def refusal(self, room: RoomName, username: Username, identity: Identity | None) -> str | None:
        """
        Why a connection of *username* may not join *room* now, or None if it may.

        A driver asks before it accepts a handshake, to refuse it with HTTP 403
        rather than open a WebSocket that cannot join its room.
        """
        authorizer = self.authorizer
        if authorizer is not None and not authorizer.may_join(
            self._identity(username, identity), room
        ):
            return f"not allowed in room {room!r}"
        limit = self.config.max_connections_per_room
        if limit:
            r = self._registry.rooms.get(room)
            cr = self._cluster.get(room)
            size = (len(r.members) if r is not None else 0) + (
                len(cr.pending) if cr is not None else 0
            )
            if size >= limit:
                return f"room {room!r} is full ({limit} connections)"
        return None

    @staticmethod
    def _identity(username: Username, identity: Identity | None) -> Identity:
        return identity if identity is not None else Identity(username=username)

    def _try_join(
        self, conn: ConnectionId, c: _Conn, room: RoomName, timestamp: int, actions: list[Action]
    ) -> None:
        """Join if the authorizer and the room's size allow it, else a ``forbidden`` error."""
        reason = self.refusal(room, c.username, c.identity)
        if reason is not None:
            self._error(conn, codec.FORBIDDEN, reason, actions)
            return
        rights = _ALL_RIGHTS
        authorizer = self.authorizer
        if authorizer is not None:
            identity = self._identity(c.username, c.identity)
            rights = (_PUBLISH if authorizer.may_publish(identity, room) else 0) | (
                _PRESENCE if authorizer.may_see_presence(identity, room) else 0
            )
        if self.node is not None:
            cr = self._cluster.get(room)
            if cr is None:
                self._gens += 1
                cr = self._cluster[room] = ClusterRoom(gen=self._gens)
                if self._online:
                    actions.append(Subscribe(room=room, gen=cr.gen))
            cr.draining = False
            if self._online and not cr.synced:
                # Joined once the room's presence across the cluster is known.
                cr.pending[conn] = rights
                c.rooms[room] = rights
                return
        self._join(conn, c, room, rights, timestamp, actions)

    def _deliver(
        self, conns: tuple[ConnectionId, ...], payload: bytes, actions: list[Action]
    ) -> None:
        self._deliveries += len(conns)
        actions.append(Deliver(conns=conns, payload=payload))

    def _error(self, conn: ConnectionId, code: str, reason: str, actions: list[Action]) -> None:
        self._deliver((conn,), codec.encode_error(code, reason), actions)

    def _presence_audience(
        self, members: Iterable[ConnectionId], room: RoomName
    ) -> tuple[ConnectionId, ...]:
        """Those of *members* who may see *room*'s presence."""
        if self.authorizer is None:
            return tuple(members)
        conns = self._conns
        return tuple(m for m in members if conns[m].rooms[room] & _PRESENCE)

    def _join(
        self,
        conn: ConnectionId,
        c: _Conn,
        room: RoomName,
        rights: int,
        timestamp: int,
        actions: list[Action],
    ) -> None:
        r, first = self._registry.join(room, conn, c.username)
        c.rooms[room] = rights
        cr = self._cluster.get(room)
        if cr is not None:
            if first and self._online:
                self._announce(room, c.username, True, actions)
            # Present elsewhere already: no news for anyone.
            first = first and c.username not in cr.remote
        if first:
            audience = self._presence_audience(r.members, room)
            if audience:
                self._deliver(
                    audience, codec.encode_presence("join", c.username, room, timestamp), actions
                )
            actions.append(UserJoined(room=room, username=c.username))
        if rights & _PRESENCE:
            self._deliver((conn,), self._presence_state(room), actions)

    def _presence_state(self, room: RoomName) -> bytes:
        """The ``presence_state`` of *room* (in a cluster: its users on every node)."""
        if room in self._cluster:
            return codec.encode_presence_state(room, sorted(self._present(room)))
        return codec.presence_state_of(room, self._registry.rooms[room].literals)

    def _leave(
        self, conn: ConnectionId, c: _Conn, room: RoomName, timestamp: int, actions: list[Action]
    ) -> None:
        del c.rooms[room]
        cr = self._cluster.get(room)
        if cr is not None and conn in cr.pending:
            del cr.pending[conn]
            if cr.held:
                cr.held = [held for held in cr.held if held[0] != conn]
            self._release(room, cr, actions)
            return
        r, username, last = self._registry.leave(room, conn)
        if cr is not None:
            if last and self._online:
                self._announce(room, username, False, actions)
            self._release(room, cr, actions)
            last = last and username not in cr.remote
        if last:
            audience = self._presence_audience(r.members, room)
            if audience:
                self._deliver(
                    audience, codec.encode_presence("leave", username, room, timestamp), actions
                )
            actions.append(UserLeft(room=room, username=username))

    def _release(self, room: RoomName, cr: ClusterRoom, actions: list[Action]) -> None:
        """
        Stop listening to *room* if nobody here is in it or waiting for it, once this
        node's messages still on their way back are in (for their notices).
        """
        if cr.pending or room in self._registry.rooms:
            return
        if cr.outbox and self._online:
            cr.draining = True
            return
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

    def _joining(self, conn: ConnectionId, room: RoomName) -> bool:
        """Whether *conn* waits to join *room* (in a cluster, for its presence)."""
        cr = self._cluster.get(room)
        return cr is not None and conn in cr.pending

    def _disconnect(
        self, conn: ConnectionId, c: _Conn, timestamp: int, actions: list[Action]
    ) -> None:
        del self._conns[conn]
        if self.config.heartbeat:
            self._prune_timers()
        for room in list(c.rooms):
            self._leave(conn, c, room, timestamp, actions)

    def _publish(
        self,
        conn: ConnectionId | None,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
    ) -> bool:
        """
        Publish a chat of *conn* (None: of server-side code) to *room*'s members.

        Returns:
            False if *content* cannot be forwarded (nothing published).
        """
        cr = self._cluster.get(room)
        if cr is not None:
            if conn is not None and conn in cr.pending:
                return self._hold(conn, room, username, content, timestamp, actions)
            return self._publish_cluster(room, cr, username, content, timestamp, actions)
        r = self._registry.rooms[room]
        payload = codec.encode_chat(username, content, room, timestamp, r.seq + 1)
        if payload is None:
            return False
        r.seq += 1
        self._messages_published += 1
        self._deliver(tuple(r.members), payload, actions)
        actions.append(
            MessagePublished(
                room=room, username=username, content=content, seq=r.seq, timestamp=timestamp
            )
        )
        return True

    # -- the cluster ------------------------------------------------------------------

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
                if cr.draining and outbox and outbox[-1][0] <= record.ref:
                    cr.draining = False
                    actions.append(Unsubscribe(room=room))
                    del self._cluster[room]
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
        if not cr.synced:
            cr.buffered(record)
            return
        self._apply_presence(room, cr, record, timestamp, actions)

    def _apply_presence(
        self,
        room: RoomName,
        cr: ClusterRoom,
        record: PresenceRecord,
        timestamp: int,
        actions: list[Action],
    ) -> None:
        if record.version > cr.version + 1:
            # A record went missing: read the presence again, keeping what comes
            # meanwhile (this one included) to apply on top of it.
            self._presence_gaps += 1
            cr.synced = False
            cr.buffered(record)
            actions.append(Subscribe(room=room, gen=cr.gen))
            return
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
            if cr.settling:
                actions.append(Subscribe(room=room, gen=cr.gen))
            return
        r = self._registry.rooms.get(room)
        local = r.users if r is not None else {}
        before = set(cr.remote)
        remote: dict[Username, set[str]] = {}
        for node, name in event.entries:
            if node != self.node and is_valid_username(name):
                remote.setdefault(Username(name), set()).add(node)
        if cr.lost_version and event.version < cr.lost_version:
            # Redis came back without its data, and the other nodes may not have
            # re-announced yet: keep who was there (no leaves now). The driver reads
            # the snapshot again a little later, which settles it.
            for user, nodes in cr.remote.items():
                remote.setdefault(user, set()).update(nodes)
            cr.settling = True
        else:
            cr.settling = False
        cr.lost_version = 0
        cr.remote = remote
        cr.version = event.version
        cr.synced = True
        if r is not None:
            for user in sorted(before.symmetric_difference(remote)):
                if user not in local:
                    self._announce_change(r.members, room, user, user in remote, timestamp, actions)
        buffered, cr.buffer = cr.buffer, []
        for record in sorted(buffered, key=lambda rec: rec.version):
            if not cr.synced:  # a gap among them: the rest waits for the next snapshot
                cr.buffered(record)
            elif record.version > cr.version:
                self._apply_presence(room, cr, record, timestamp, actions)
        if cr.resync:
            cr.resync = False
            if cr.synced:
                cr.synced = False
                actions.append(Subscribe(room=room, gen=cr.gen))
        if cr.synced:
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
            cr.synced = False
            cr.buffer.clear()
            cr.resync = False
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
            if cr.draining:
                del self._cluster[room]

    def _on_restored(self, actions: list[Action]) -> None:
        self._online = True
        registry = self._registry.rooms
        # Every Subscribe first, then every Announce: a driver can batch each kind.
        actions.extend(Subscribe(room=room, gen=cr.gen) for room, cr in self._cluster.items())
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

    def _on_text(
        self, conn: ConnectionId, c: _Conn, text: str, timestamp: int, actions: list[Action]
    ) -> None:
        request = codec.decode_request(text)
        if isinstance(request, codec.Chat):
            room = request.room or c.default_room
            rights = c.rooms.get(room) if room is not None else None
            if room is None or rights is None:
                self._error(conn, codec.NOT_JOINED, f"not in room {room!r}", actions)
            elif not rights & _PUBLISH:
                self._error(conn, codec.FORBIDDEN, f"may not publish to room {room!r}", actions)
            elif not self._publish(conn, room, c.username, request.content, timestamp, actions):
                self._error(conn, codec.BAD_MESSAGE, _UNFORWARDABLE, actions)
        elif isinstance(request, codec.Join):
            room = request.room
            rights = c.rooms.get(room)
            if rights is not None:
                # Already in: answer with the current state, which doubles as an ack
                # (or, still waiting for the cluster's, with that once it is known).
                if rights & _PRESENCE and not self._joining(conn, room):
                    self._deliver((conn,), self._presence_state(room), actions)
            elif len(c.rooms) >= self.config.max_rooms_per_connection:
                limit = self.config.max_rooms_per_connection
                self._error(conn, codec.FORBIDDEN, f"at most {limit} rooms per connection", actions)
            else:
                self._try_join(conn, c, room, timestamp, actions)
        elif isinstance(request, codec.Leave):
            if request.room in c.rooms:
                self._leave(conn, c, request.room, timestamp, actions)
            else:
                self._error(conn, codec.NOT_JOINED, f"not in room {request.room!r}", actions)
        elif isinstance(request, codec.Ping):
            self._deliver((conn,), codec.PONG, actions)
        else:
            self._error(conn, request.code, request.reason, actions)

    def connected(self) -> Iterable[ConnectionId]:
        """The live connections (a snapshot)."""
        return list(self._conns)
