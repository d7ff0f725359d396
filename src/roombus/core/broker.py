"""
Broker: the one facade of the sans-IO core.

Events and the current time go in; actions come out. The broker never reads a clock,
never touches a socket, and never raises because of what a client sent: a refused
message becomes an ``error`` envelope, a dead peer a :class:`~roombus.lowlevel.Close`.

This is the broker of a node on its own. A node of a cluster runs
:class:`roombus.cluster.broker.ClusterBroker`, a subclass that overrides the few hooks
marked below (joining, leaving, publishing, presence, ``seq``, the backplane events).
"""

from __future__ import annotations

import heapq
import logging
import math
import secrets
from typing import TYPE_CHECKING, Final

import attrs

from . import codec
from .actions import (
    Action,
    Close,
    ControlCommand,
    Deliver,
    HistoryAnswered,
    MessagePublished,
    PublishAnswered,
    ReadCluster,
    SendPing,
    UserJoined,
    UserLeft,
)
from .auth import Authorizer, Identity
from .codes import CloseCode
from .config import BrokerConfig
from .errors import LocalProtocolError
from .events import (
    BackplaneLost,
    BackplaneRestored,
    ClientConnected,
    ClientDisconnected,
    ClusterRead,
    Event,
    PongReceived,
    RecordReceived,
    Relayed,
    RoomSynced,
    StreamRead,
    TextReceived,
)
from .heartbeat import Heartbeat, HeartbeatState
from .names import (
    ConnectionId,
    RoomName,
    Username,
    is_valid_request_id,
    is_valid_room,
    is_valid_username,
)
from .ratelimit import RateDecision, RateLimiter
from .registry import Registry
from .stats import REPLAY_BUCKETS, Counts, Histogram
from .streams import MemoryStreams, Position
from .tables import worth_shrinking

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

#: Close code for a peer that stopped answering pings (as websockets uses it).
PING_TIMEOUT_CODE: Final = CloseCode.INTERNAL_ERROR
#: Close code for a peer that broke a policy (sustained flooding, expired credentials).
POLICY_VIOLATION: Final = CloseCode.POLICY_VIOLATION

# What a connection may do in one room, decided once when it joins.
#: Joins and leaves are logged here, at debug level (the hub logs the rest of a
#: connection's life to the same logger).
log: Final = logging.getLogger("roombus")
_DEBUG: Final = logging.DEBUG

_PUBLISH: Final = 1
_PRESENCE: Final = 2
_HISTORY: Final = 4
_ALL_RIGHTS: Final = _PUBLISH | _PRESENCE | _HISTORY
#: Messages a join sends the joiner besides a replay (presence, presence_state, joined).
_JOIN_ANSWERS: Final = 3
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
        resets: In a cluster, ``reset`` envelopes sent: a member that follows
            positions was told the room's numbering restarted (the link to Redis lost
            or back, the epoch changed, a missed message no longer kept).
        repairs: In a cluster, gaps in a room's records read back from its stream.
    """

    connections: int
    rooms: int
    messages_published: int
    deliveries: int
    relay_unconfirmed: int = 0
    presence_gaps: int = 0
    resets: int = 0
    repairs: int = 0
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


@attrs.frozen
class Resume:
    """A join's position (``since``, None for ``null``) and whether it takes a partial replay."""

    since: Position | None
    partial: bool = False


#: The events only a broker of a cluster takes.
_BACKPLANE_EVENTS: Final = (
    RecordReceived,
    RoomSynced,
    BackplaneLost,
    BackplaneRestored,
    Relayed,
    StreamRead,
    ClusterRead,
)


class Broker:
    """
    The room broker: rooms, presence, envelopes and heartbeats, as pure logic.

    Args:
        config: Limits and intervals; the defaults suit production.
        authorizer: Decides, per connection and room, whether it may join, publish
            and see presence; asked once when the connection joins the room. None
            lets everyone do everything. An authorizer with a ``may_read_history(identity,
            room)`` method also decides who may read a room's ``history`` (members
            or not); without one, members may and others may not.
        epoch_prefix: The start of the epochs of this broker's room streams: unique
            per process, so that a restart starts new epochs (1-24 characters of
            ``A-Z a-z 0-9 _ -``). None: a random one.
        notices: False: a chat a client publishes makes no
            :class:`~roombus.MessagePublished` (:attr:`notices`).

    A node of a cluster uses :class:`~roombus.cluster.ClusterBroker` instead.

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

    #: This node's id in a cluster (set by a :class:`~roombus.cluster.ClusterBroker`); None
    #: for a broker on its own.
    node: str | None = None

    #: Whether a chat a client publishes makes a :class:`~roombus.MessagePublished`
    #: notice (True by default). A driver with no use for the notices turns it off: one
    #: object less per message (a hub does when it has no ``on_notice`` hook). A
    #: publish from server-side code (:meth:`publish`) makes one all the same: it
    #: carries the message's position. Joins and leaves always make theirs, and so does
    #: a :class:`~roombus.cluster.ClusterBroker` (its chats' notices come with Redis's
    #: numbering, after a round trip that costs far more).
    notices: bool = True

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        authorizer: Authorizer | None = None,
        epoch_prefix: str | None = None,
        notices: bool = True,
    ) -> None:
        self.config: Final = config if config is not None else BrokerConfig()
        self.authorizer: Final = authorizer
        self.notices = notices
        config = self.config
        self._streams = MemoryStreams(
            epoch_prefix=epoch_prefix if epoch_prefix is not None else secrets.token_urlsafe(6),
            history_size=config.history_size,
            history_ttl=config.history_ttl,
            position_ttl=config.position_ttl,
            max_bytes=config.history_max_bytes,
            dedup_window=config.dedup_window,
            overrides=config.room_history,
        )
        # The driver's clock as of the event being handled (streams keep time by it).
        self._now = 0.0
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
        #: ``error`` replies sent since the start, by their ``code`` (``bad_json``, ...).
        self.error_replies: Counts[str] = Counts()
        #: Messages replayed per join with a position (0 for one that got none).
        self.replay_sizes = Histogram(REPLAY_BUCKETS)

    # -- introspection (no side effects) --------------------------------------------

    @property
    def rooms(self) -> list[RoomName]:
        """The rooms that have members, in creation order."""
        return list(self._registry.rooms)

    def members(self, room: str) -> list[Username]:
        """The users present in *room* (in a cluster: on any node), sorted."""
        return sorted(self._present(RoomName(room)))

    def _present(self, room: RoomName) -> set[Username]:
        """The users present in *room* (hook: a cluster adds the other nodes')."""
        r = self._registry.rooms.get(room)
        return set(r.users) if r is not None else set()

    def local_presence(self) -> list[tuple[RoomName, list[Username]]]:
        """Each room with members here and its users here (what a node announces)."""
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
        return self.position(room).seq

    def position(self, room: str) -> Position:
        """*room*'s stream position: its epoch and the seq of its last chat."""
        return self._streams.position(RoomName(room), self._now)

    @property
    def streams(self) -> MemoryStreams:
        """The rooms' streams (positions, history, acknowledgements)."""
        return self._streams

    def __contains__(self, conn: object) -> bool:
        return conn in self._conns

    def statistics(self) -> BrokerStatistics:
        """A snapshot of the broker's size and traffic counters."""
        return BrokerStatistics(
            connections=len(self._conns),
            rooms=len(self._registry.rooms),
            messages_published=self._messages_published,
            deliveries=self._deliveries,
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
        self._now = now
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
        if isinstance(event, TextReceived):
            return self.handle_text(event.conn, event.text, now=now, timestamp=timestamp)
        actions: list[Action] = []
        self._now = now
        if isinstance(event, PongReceived):
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
        else:
            self._handle_other(event, timestamp, actions)
        return actions

    def handle_text(
        self, conn: ConnectionId, text: str, *, now: float, timestamp: int
    ) -> list[Action]:
        """
        ``handle(TextReceived(conn=conn, text=text), now=now, timestamp=timestamp)``,
        without making the event: a driver's path for every message a client sends.
        """
        actions: list[Action] = []
        self._now = now
        c = self._conns.get(conn)
        if c is None:
            return actions
        limiter = c.limiter
        decision = (
            RateDecision.ALLOW if limiter is None else limiter.take(now, 1 + (len(text) >> 12))
        )
        if decision is RateDecision.ALLOW:
            self._on_text(conn, c, text, timestamp, actions)
        elif decision is RateDecision.REFUSE:
            msg_id = codec.request_id(text)
            self._error(conn, codec.RATE_LIMITED, "too many messages", actions, msg_id)
        else:
            actions.append(Close(conn=conn, code=POLICY_VIOLATION, reason="rate limit exceeded"))
            self._disconnect(conn, c, timestamp, actions)
        return actions

    def _handle_other(self, event: Event, timestamp: int, actions: list[Action]) -> None:
        """An event no broker on its own takes (hook: a cluster takes the backplane's)."""
        if isinstance(event, _BACKPLANE_EVENTS):
            raise LocalProtocolError(f"a backplane event for a broker with no node: {event!r}")
        raise LocalProtocolError(f"not an event: {event!r}")

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

    def publish(
        self,
        room: str,
        content: object,
        *,
        username: str,
        timestamp: int,
        now: float | None = None,
        msg_id: str | None = None,
        ticket: int = 0,
    ) -> list[Action]:
        """
        Publish a chat message from server-side code to everyone in *room*.

        With *msg_id* (an idempotency key, as a chat's ``id``), a message of the same
        *username* and id to the same room within ``dedup_window`` (in this epoch) is
        not published again: no :class:`~roombus.MessagePublished` then, and
        :meth:`acknowledged` has the first one's position.

        The message is numbered and kept in the room's history even if the room has
        no members now (a client that joins with a position is sent it); the
        :class:`~roombus.MessagePublished` among the actions has its position.

        Args:
            now: The driver's monotonic clock (None: as of the last event handled, 0.0
                before any; pass it when publishing before the first event).
            ticket: Non-zero: the caller waits for the message's position, answered
                with a :class:`~roombus.core.actions.PublishAnswered` of this ticket
                (among these actions on a node alone; in a cluster, those of the
                backplane's answer).

        Raises:
            ValueError: if *room* or *username* is not valid, or *content* cannot be
                encoded as JSON.
        """
        if not is_valid_room(room):
            raise ValueError(f"invalid room name: {room!r}")
        if not is_valid_username(username):
            raise ValueError(f"invalid username: {username!r}")
        if msg_id is not None and not is_valid_request_id(msg_id):
            raise ValueError(f"invalid message id: {msg_id!r}")
        try:
            codec.check_content(content)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"content is not encodable as JSON: {exc}") from None
        actions: list[Action] = []
        if now is not None:
            self._now = now
        self._publish_as_server(
            RoomName(room), Username(username), content, timestamp, actions, msg_id, ticket
        )
        return actions

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
        """:meth:`publish`, its arguments checked (hook: a cluster relays it)."""
        start = len(actions)
        self._publish(None, room, username, content, timestamp, actions, msg_id)
        if not ticket:
            return
        position: Position | None = None
        for a in actions[start:]:
            if type(a) is MessagePublished and a.epoch:
                position = Position(a.epoch, a.seq)
        duplicate = False
        if position is None and msg_id is not None:
            position = self._streams.acknowledged(room, username, msg_id)
            duplicate = position is not None
        actions.append(
            PublishAnswered(ticket=ticket, room=room, position=position, duplicate=duplicate)
        )

    def history(
        self,
        room: str,
        *,
        since: Position | None,
        limit: int | None,
        ticket: int,
        now: float | None = None,
    ) -> list[Action]:
        """
        Read *room*'s kept chats from server-side code: those after *since* (the
        latest *limit* without it, or for another epoch), at most *limit* (capped at
        the room's history size, its default) and half of ``send_queue_bytes``.
        Answered with a :class:`~roombus.core.actions.HistoryAnswered` of *ticket*: among
        these actions on a node alone, once Redis answered in a cluster.

        Raises:
            ValueError: if *room* is not valid.
        """
        if not is_valid_room(room):
            raise ValueError(f"invalid room name: {room!r}")
        if now is not None:
            self._now = now
        name = RoomName(room)
        size = self._streams.policy(name).size
        count = size if limit is None else min(limit, size)
        actions: list[Action] = []
        self._read_history(None, codec.History(room=name, since=since), count, actions, ticket)
        return actions

    def acknowledged(self, room: str, username: str, msg_id: str) -> Position | None:
        """The position of *username*'s message *msg_id* to *room*, if it is still
        remembered (within ``dedup_window``, in the room's current epoch)."""
        return self._streams.acknowledged(RoomName(room), Username(username), msg_id)

    # -- server-side control ----------------------------------------------------------

    def tell_cluster(self, command: ControlCommand) -> list[Action]:
        """
        Send *command* to the other nodes of the cluster, which carry it out on their
        connections (a :class:`~roombus.core.actions.Control` among the actions); this
        node's part is the caller's. Nothing on a node alone, or cut off from the
        cluster.
        """
        return []

    def user_connections(self, username: str) -> list[ConnectionId]:
        """The live connections of *username* here, oldest first."""
        return [conn for conn, c in self._conns.items() if c.username == username]

    def username_of(self, conn: ConnectionId) -> Username | None:
        """The user of a live connection, or None."""
        c = self._conns.get(conn)
        return c.username if c is not None else None

    def nodes_of(self, room: str) -> dict[str, set[str]]:
        """The users present in *room*, each with the nodes it is on as this node knows
        (a node alone: its users, on node "")."""
        return {user: {""} for user in self._present(RoomName(room))}

    def read_cluster(self, read: ReadCluster) -> list[Action]:
        """Ask the cluster (a node alone has none: nothing, answer with what is here)."""
        return []

    def counts(self, room: str) -> dict[Username, int]:
        """The users present in *room* here, each with its connections here."""
        r = self._registry.rooms.get(RoomName(room))
        return dict(r.users) if r is not None else {}

    def disconnect(
        self, conn: ConnectionId, *, code: int, reason: str, timestamp: int
    ) -> list[Action]:
        """
        Close *conn* from server-side code with *code* and *reason*: a
        :class:`~roombus.lowlevel.Close`, then its rooms learn it left. Nothing for
        an unknown connection.
        """
        c = self._conns.get(conn)
        if c is None:
            return []
        actions: list[Action] = [Close(conn=conn, code=code, reason=reason)]
        self._disconnect(conn, c, timestamp, actions)
        return actions

    def kick(self, room: str, username: str, *, reason: str, timestamp: int) -> list[Action]:
        """
        Remove *username*'s connections from *room*: each is sent an ``error``
        ``kicked`` (with the room) and leaves it, as if it had sent a ``leave``; the
        room learns the user left. The connections stay open, and may join again
        (keep a user out with the authorizer).
        """
        name = RoomName(room)
        r = self._registry.rooms.get(name)
        if r is None:
            return []
        actions: list[Action] = []
        for conn, user in list(r.members.items()):
            c = self._conns.get(conn)
            if user != username or c is None or name not in c.rooms:
                continue
            self._deliver((conn,), codec.encode_kicked(name, reason), actions)
            self._leave(conn, c, name, timestamp, actions)
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
            resume = Resume(event.since, event.partial) if event.positioned else None
            self._try_join(conn, c, event.room, timestamp, actions, resume)

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
        if limit and self._occupancy(room) >= limit:
            return f"room {room!r} is full ({limit} connections)"
        return None

    def _occupancy(self, room: RoomName) -> int:
        """The connections *room* holds, against its limit (hook: a cluster's joiners)."""
        r = self._registry.rooms.get(room)
        return len(r.members) if r is not None else 0

    @staticmethod
    def _identity(username: Username, identity: Identity | None) -> Identity:
        return identity if identity is not None else Identity(username=username)

    def _try_join(
        self,
        conn: ConnectionId,
        c: _Conn,
        room: RoomName,
        timestamp: int,
        actions: list[Action],
        resume: Resume | None = None,
    ) -> None:
        """
        Join if the authorizer and the room's size allow it, else a ``forbidden`` error
        (hook: a cluster may make the connection wait for the room's presence). With
        *resume* (the join named a position, or ``null``), ``joined`` follows, and the
        missed messages if they can be recovered.
        """
        rights = self._admitted(conn, c, room, actions)
        if rights is not None:
            self._join(conn, c, room, rights, timestamp, actions)
            if resume is not None:
                self._resume(conn, room, resume, actions)

    def _resume(
        self, conn: ConnectionId, room: RoomName, resume: Resume, actions: list[Action]
    ) -> None:
        """``joined`` for *conn* in *room*, then the replay its position allows."""
        most, max_bytes = self._replay_bounds()
        position, recovery, items = self._streams.recover(
            room,
            resume.since,
            self._now,
            recovery_max=most,
            partial=resume.partial,
            max_bytes=max_bytes,
        )
        self._deliver((conn,), codec.encode_joined(room, position, recovery), actions)
        self.replay_sizes.observe(len(items))
        for payload in items:
            self._deliver((conn,), codec.replayed(payload), actions)

    def _replay_bounds(self) -> tuple[int, int]:
        """
        The most messages and bytes one replay may send: room in the joiner's queue for
        its presence, presence_state and joined, and half of its bytes for live
        traffic, so that a replay never gets its own client closed as slow.
        """
        config = self.config
        return (
            min(config.recovery_max, config.send_queue - _JOIN_ANSWERS),
            config.send_queue_bytes // 2,
        )

    def _admitted(
        self, conn: ConnectionId, c: _Conn, room: RoomName, actions: list[Action]
    ) -> int | None:
        """*conn*'s rights in *room*, or None after a ``forbidden`` error (not allowed)."""
        reason = self.refusal(room, c.username, c.identity)
        if reason is not None:
            self._error(conn, codec.FORBIDDEN, reason, actions)
            return None
        authorizer = self.authorizer
        if authorizer is None:
            return _ALL_RIGHTS
        identity = self._identity(c.username, c.identity)
        may_read = getattr(authorizer, "may_read_history", None)
        return (
            (_PUBLISH if authorizer.may_publish(identity, room) else 0)
            | (_PRESENCE if authorizer.may_see_presence(identity, room) else 0)
            | (_HISTORY if may_read is None or may_read(identity, room) else 0)
        )

    def _deliver(
        self, conns: tuple[ConnectionId, ...], payload: bytes, actions: list[Action]
    ) -> None:
        self._deliveries += len(conns)
        actions.append(Deliver(conns=conns, payload=payload))

    def _error(
        self,
        conn: ConnectionId,
        code: str,
        reason: str,
        actions: list[Action],
        msg_id: str | None = None,
    ) -> None:
        self.error_replies.add(code)
        self._deliver((conn,), codec.encode_error(code, reason, msg_id), actions)

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
        if log.isEnabledFor(_DEBUG):
            log.debug(
                "conn %d joined %r as %r",
                conn,
                room,
                c.username,
                extra={"conn": conn, "room": room, "user": c.username},
            )
        if len(r.members) == 1:
            self._streams.hold(room, self._now)
        if first and self._first_here(room, c.username, actions):
            audience = self._presence_audience(r.members, room)
            if audience:
                self._deliver(
                    audience, codec.encode_presence("join", c.username, room, timestamp), actions
                )
            actions.append(UserJoined(room=room, username=c.username))
        if rights & _PRESENCE:
            self._deliver((conn,), self._presence_state(room), actions)

    def _first_here(self, room: RoomName, username: Username, actions: list[Action]) -> bool:
        """
        *username*'s first connection joined *room*: whether that is news for its
        members (hook: in a cluster, not if the user is present on another node).
        """
        return True

    def _presence_state(self, room: RoomName) -> bytes:
        """The ``presence_state`` of *room* (hook: a cluster's users on every node)."""
        return codec.presence_state_of(room, self._registry.rooms[room].literals)

    def _leave(
        self, conn: ConnectionId, c: _Conn, room: RoomName, timestamp: int, actions: list[Action]
    ) -> None:
        """*conn* leaves *room* (hook: in a cluster it may only have been joining)."""
        del c.rooms[room]
        r, username, last = self._registry.leave(room, conn)
        if log.isEnabledFor(_DEBUG):
            log.debug(
                "conn %d left %r", conn, room, extra={"conn": conn, "room": room, "user": username}
            )
        if not r.members:
            self._streams.release(room, self._now)
        if last and self._last_here(room, username, actions):
            audience = self._presence_audience(r.members, room)
            if audience:
                self._deliver(
                    audience, codec.encode_presence("leave", username, room, timestamp), actions
                )
            actions.append(UserLeft(room=room, username=username))

    def _last_here(self, room: RoomName, username: Username, actions: list[Action]) -> bool:
        """
        *username*'s last connection left *room*: whether that is news for its
        members (hook: in a cluster, not if the user is present on another node).
        """
        return True

    def _joining(self, conn: ConnectionId, room: RoomName) -> bool:
        """Whether *conn* waits to join *room* (hook: in a cluster, for its presence)."""
        return False

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
        msg_id: str | None = None,
        skip: Collection[int] = (),
    ) -> bool:
        """
        Publish a chat of *conn* (None: of server-side code) to *room*'s members
        (hook: a cluster relays it), but those in *skip*. With *msg_id*, *conn* gets
        an ``ack``, and a chat whose id it already had acknowledged is not published
        again.

        Returns:
            False if *content* cannot be forwarded (nothing published).
        """
        prefix = codec.chat_prefix(username, content, room, timestamp, msg_id)
        if prefix is None:
            return False
        epoch, seq, payload = self._streams.number(
            room, prefix, self._now, None if msg_id is None else (username, msg_id)
        )
        if payload is not None:
            self._messages_published += 1
            r = self._registry.rooms.get(room)
            if r is not None:
                members = (
                    tuple(r.members) if not skip else tuple(m for m in r.members if m not in skip)
                )
                if members:
                    self._deliver(members, payload, actions)
            if conn is None or self.notices:
                actions.append(
                    MessagePublished(
                        room=room,
                        username=username,
                        content=content,
                        seq=seq,
                        timestamp=timestamp,
                        epoch=epoch,
                    )
                )
        if msg_id is not None and conn is not None:
            self._deliver((conn,), codec.encode_ack(msg_id, room, Position(epoch, seq)), actions)
        return True

    def _on_text(
        self, conn: ConnectionId, c: _Conn, text: str, timestamp: int, actions: list[Action]
    ) -> None:
        request = codec.decode_request(text)
        if isinstance(request, codec.Chat):
            room = request.room or c.default_room
            rights = c.rooms.get(room) if room is not None else None
            msg_id = request.id
            if room is None or rights is None:
                self._error(conn, codec.NOT_JOINED, f"not in room {room!r}", actions, msg_id)
            elif not rights & _PUBLISH:
                self._error(
                    conn, codec.FORBIDDEN, f"may not publish to room {room!r}", actions, msg_id
                )
            elif not self._publish(
                conn, room, c.username, request.content, timestamp, actions, msg_id
            ):
                self._error(conn, codec.BAD_MESSAGE, _UNFORWARDABLE, actions, msg_id)
        elif isinstance(request, codec.Join):
            room = request.room
            rights = c.rooms.get(room)
            resume = Resume(request.since, request.partial) if request.positioned else None
            if rights is not None:
                # Already in: answer with the current state, which doubles as an ack
                # (or, still waiting for the cluster's, with that once it is known).
                if rights & _PRESENCE and not self._joining(conn, room):
                    self._deliver((conn,), self._presence_state(room), actions)
                if resume is not None:
                    # (Still joining, in a cluster: answered there with an error.)
                    self._resume(conn, room, resume, actions)
            elif len(c.rooms) >= self.config.max_rooms_per_connection:
                limit = self.config.max_rooms_per_connection
                self._error(conn, codec.FORBIDDEN, f"at most {limit} rooms per connection", actions)
            else:
                self._try_join(conn, c, room, timestamp, actions, resume)
        elif isinstance(request, codec.Leave):
            if request.room in c.rooms:
                self._leave(conn, c, request.room, timestamp, actions)
            else:
                self._error(conn, codec.NOT_JOINED, f"not in room {request.room!r}", actions)
        elif isinstance(request, codec.Ping):
            self._deliver((conn,), codec.PONG, actions)
        elif isinstance(request, codec.History):
            self._history(conn, c, request, actions)
        else:
            self._error(conn, request.code, request.reason, actions, request.id)

    def _history(
        self, conn: ConnectionId, c: _Conn, request: codec.History, actions: list[Action]
    ) -> None:
        """Answer a ``history`` request (members, or those granted the right)."""
        room = request.room
        rights = c.rooms.get(room)
        if rights is None:
            may_read = getattr(self.authorizer, "may_read_history", None)
            identity = self._identity(c.username, c.identity)
            if may_read is None or not may_read(identity, room):
                self._error(conn, codec.NOT_JOINED, f"not in room {room!r}", actions, request.id)
                return
        elif not rights & _HISTORY:
            reason = f"may not read the history of room {room!r}"
            self._error(conn, codec.FORBIDDEN, reason, actions, request.id)
            return
        size = self._streams.policy(room).size
        limit = size if request.limit is None else min(request.limit, size)
        self._read_history(conn, request, limit, actions)

    def _read_history(
        self,
        conn: ConnectionId | None,
        request: codec.History,
        limit: int,
        actions: list[Action],
        ticket: int = 0,
    ) -> None:
        """Answer an allowed ``history`` request, of *conn* or (None) server-side code
        with *ticket* (hook: a cluster reads Redis)."""
        # At most half a send queue's bytes in one answer (one message, however big).
        position, items = self._streams.history(
            request.room, request.since, limit, self._now, self.config.send_queue_bytes // 2
        )
        if conn is None:
            actions.append(
                HistoryAnswered(
                    ticket=ticket, room=request.room, position=position, items=tuple(items)
                )
            )
            return
        self._deliver(
            (conn,), codec.encode_history(request.room, position, items, request.id), actions
        )

    def connected(self) -> Iterable[ConnectionId]:
        """The live connections (a snapshot)."""
        return list(self._conns)
