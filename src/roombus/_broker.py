"""
Broker: the one facade of the sans-IO core.

Events and the current time go in; actions come out. The broker never reads a clock,
never touches a socket, and never raises because of what a client sent: a refused
message becomes an ``error`` envelope, a dead peer a :class:`~roombus.Close`.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Final, final

import attrs

from . import _codec as codec
from ._actions import (
    Action,
    Close,
    Deliver,
    MessagePublished,
    SendPing,
    UserJoined,
    UserLeft,
)
from ._config import BrokerConfig
from ._errors import LocalProtocolError
from ._events import ClientConnected, ClientDisconnected, Event, PongReceived, TextReceived
from ._heartbeat import Heartbeat, HeartbeatState
from ._ratelimit import RateDecision, RateLimiter
from ._registry import Registry
from ._types import ConnectionId, RoomName, Username, is_valid_room, is_valid_username

if TYPE_CHECKING:
    from collections.abc import Iterable

#: Close code for a peer that stopped answering pings (as websockets uses it).
PING_TIMEOUT_CODE: Final = 1011
#: Close code for a peer that broke a policy (sustained flooding).
POLICY_VIOLATION: Final = 1008


@attrs.frozen(kw_only=True)
class BrokerStatistics:
    """
    A snapshot of a broker's size and traffic.

    Attributes:
        connections: Live connections.
        rooms: Rooms with at least one member.
        messages_published: Chat messages delivered to a room since the start.
        deliveries: Envelopes handed out (one per receiver) since the start.
    """

    connections: int
    rooms: int
    messages_published: int
    deliveries: int


@attrs.define
class _Conn:
    username: Username
    default_room: RoomName | None
    heartbeat: Heartbeat
    limiter: RateLimiter | None
    rooms: dict[RoomName, None] = attrs.field(factory=dict)  # ordered set
    timer_gen: int = 0  # the generation of this connection's live timer entry


@final
class Broker:
    """
    The room broker: rooms, presence, envelopes and heartbeats, as pure logic.

    Args:
        config: Limits and intervals; the defaults suit production.

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

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config: Final = config if config is not None else BrokerConfig()
        self._registry = Registry()
        self._conns: dict[ConnectionId, _Conn] = {}
        # (deadline, generation, conn); an entry is live while its generation is the
        # connection's timer_gen. Stale entries are skipped, and pruned when many.
        self._timers: list[tuple[float, int, ConnectionId]] = []
        self._gen = 0
        self._messages_published = 0
        self._deliveries = 0

    # -- introspection (no side effects) --------------------------------------------

    @property
    def rooms(self) -> list[RoomName]:
        """The rooms that have members, in creation order."""
        return list(self._registry.rooms)

    def members(self, room: str) -> list[Username]:
        """The users present in *room*, sorted; empty for an unknown room."""
        r = self._registry.rooms.get(RoomName(room))
        return sorted(r.users) if r is not None else []

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
        )

    # -- time -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """
        The earliest instant :meth:`handle_timeout` has work to do, or None.

        Exact: never earlier than needed, and never later.
        """
        timers = self._timers
        conns = self._conns
        while timers:
            deadline, gen, conn = timers[0]
            c = conns.get(conn)
            if c is not None and c.timer_gen == gen:
                return deadline
            heapq.heappop(timers)
        return None

    def handle_timeout(self, *, now: float, timestamp: int) -> list[Action]:
        """
        Let time pass up to *now*: send due pings and close peers that stayed silent.

        Args:
            now: The driver's monotonic clock, in seconds.
            timestamp: Wall-clock Unix seconds, for envelopes this produces.
        """
        actions: list[Action] = []
        conns = self._conns
        # self._timers is re-read every time: _schedule may rebuild it meanwhile.
        while self._timers and self._timers[0][0] <= now:
            _, gen, conn = heapq.heappop(self._timers)
            c = conns.get(conn)
            if c is None or c.timer_gen != gen:
                continue
            state = c.heartbeat.timer(now)
            if state is HeartbeatState.AWAITING_PONG:
                actions.append(SendPing(conn=conn))
                self._schedule(conn, c)
            else:
                actions.append(Close(conn=conn, code=PING_TIMEOUT_CODE, reason="ping timeout"))
                self._disconnect(conn, c, timestamp, actions)
        return actions

    def _schedule(self, conn: ConnectionId, c: _Conn) -> None:
        self._gen += 1
        c.timer_gen = self._gen
        heapq.heappush(self._timers, (c.heartbeat.deadline, self._gen, conn))
        if len(self._timers) > 2 * len(self._conns) + 64:
            # Pongs left many stale entries behind: rebuild from live ones only.
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
            if c is not None and self.config.heartbeat:
                c.heartbeat.pong(now)
                self._schedule(event.conn, c)
        elif isinstance(event, ClientConnected):
            self._on_connect(event, now, timestamp, actions)
        elif isinstance(event, ClientDisconnected):
            c = self._conns.get(event.conn)
            if c is not None:
                self._disconnect(event.conn, c, timestamp, actions)
        else:
            raise LocalProtocolError(f"not an event: {event!r}")
        return actions

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
            codec.encode({"content": content})
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"content is not encodable as JSON: {exc}") from None
        actions: list[Action] = []
        r = self._registry.rooms.get(RoomName(room))
        if r is not None:
            self._publish(r.name, Username(username), content, timestamp, actions)
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
        )
        self._conns[conn] = c
        if config.heartbeat:  # off: the transport owns pings, and no timer is kept
            self._schedule(conn, c)
        if event.room is not None:
            self._join(conn, c, event.room, timestamp, actions)

    def _deliver(
        self, conns: tuple[ConnectionId, ...], payload: bytes, actions: list[Action]
    ) -> None:
        self._deliveries += len(conns)
        actions.append(Deliver(conns=conns, payload=payload))

    def _error(self, conn: ConnectionId, code: str, reason: str, actions: list[Action]) -> None:
        self._deliver((conn,), codec.encode_error(code, reason), actions)

    def _join(
        self, conn: ConnectionId, c: _Conn, room: RoomName, timestamp: int, actions: list[Action]
    ) -> None:
        r, first = self._registry.join(room, conn, c.username)
        c.rooms[room] = None
        if first:
            self._deliver(
                tuple(r.members),
                codec.encode_presence("join", c.username, room, timestamp),
                actions,
            )
            actions.append(UserJoined(room=room, username=c.username))
        self._deliver((conn,), codec.encode_presence_state(room, sorted(r.users)), actions)

    def _leave(
        self, conn: ConnectionId, c: _Conn, room: RoomName, timestamp: int, actions: list[Action]
    ) -> None:
        del c.rooms[room]
        r, username, last = self._registry.leave(room, conn)
        if last:
            if r.members:
                self._deliver(
                    tuple(r.members),
                    codec.encode_presence("leave", username, room, timestamp),
                    actions,
                )
            actions.append(UserLeft(room=room, username=username))

    def _disconnect(
        self, conn: ConnectionId, c: _Conn, timestamp: int, actions: list[Action]
    ) -> None:
        del self._conns[conn]
        for room in list(c.rooms):
            self._leave(conn, c, room, timestamp, actions)

    def _publish(
        self,
        room: RoomName,
        username: Username,
        content: object,
        timestamp: int,
        actions: list[Action],
    ) -> bool:
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

    def _on_text(
        self, conn: ConnectionId, c: _Conn, text: str, timestamp: int, actions: list[Action]
    ) -> None:
        request = codec.decode_request(text)
        if isinstance(request, codec.Chat):
            room = request.room or c.default_room
            if room is None or room not in c.rooms:
                self._error(conn, codec.NOT_JOINED, f"not in room {room!r}", actions)
            elif not self._publish(room, c.username, request.content, timestamp, actions):
                self._error(
                    conn,
                    codec.BAD_MESSAGE,
                    "content cannot be forwarded: nested too deeply or a number out of range",
                    actions,
                )
        elif isinstance(request, codec.Join):
            room = request.room
            if room in c.rooms:
                # Already in: answer with the current state, which doubles as an ack.
                users = sorted(self._registry.rooms[room].users)
                self._deliver((conn,), codec.encode_presence_state(room, users), actions)
            elif len(c.rooms) >= self.config.max_rooms_per_connection:
                limit = self.config.max_rooms_per_connection
                self._error(conn, codec.FORBIDDEN, f"at most {limit} rooms per connection", actions)
            else:
                self._join(conn, c, room, timestamp, actions)
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
