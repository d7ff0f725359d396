"""
The roombus client's logic, sans-IO.

:class:`ClientProtocol` decides everything a client of roombus has to decide: which
rooms to (re)join and from which position, when to reconnect (exponential backoff with
full jitter, a table of close codes that are final), when to ping, which chats are
duplicates of ones already delivered, what to resend after a reconnect (the outbox of
unacknowledged publishes, resent with the same ids so the server dedups them), and what
to tell the application. It never touches a socket or a clock: the driver tells it what
happened and the time, and carries out what it asks for.

The driver's loop, whatever the event loop::

    proto = ClientProtocol(["lobby"], username="ann")
    proto.start(now)
    while True:
        for action in proto.take_actions():
            ...  # OpenConnection: connect; SendText: send; CloseConnection: close
        for pub_id, outcome in proto.take_settled():
            ...  # resolve the publish waiting for pub_id
        wait until proto.next_deadline() or until something happens, then one of:
        proto.handle_timer(now) / proto.opened(gen, now) / proto.received(gen, text, now)
        / proto.failed(gen, now, status=...) / proto.closed(gen, now, code, reason)

The application reads :meth:`ClientProtocol.next_event`. Events wait in a bounded
queue; when it is full, the chats and presence of a room are dropped and the room is
marked behind, and once the application has read half of the queue the client joins
that room again from the last position it handed over: the server replays what was
dropped. So a slow application never stalls the reader (pings are still answered), and
never loses a message silently.
"""

from __future__ import annotations

import enum
import json
import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

import attrs

from ..core.names import is_valid_room
from ..core.streams import Position, Span, is_valid_epoch

__all__ = [
    "ClientOptions",
    "ClientProtocol",
    "CloseConnection",
    "Connected",
    "Connecting",
    "Disconnected",
    "Gap",
    "JoinRefused",
    "Joined",
    "Joining",
    "Left",
    "Message",
    "OpenConnection",
    "Presence",
    "PublishFailed",
    "Reset",
    "SendText",
    "ServerError",
    "close_policy",
]


# -- what to do when a connection ends ------------------------------------------------


class Policy(enum.Enum):
    """What the client does after a connection ends."""

    #: Reconnect after the backoff delay (it grows with each failed attempt).
    RETRY = "retry"
    #: Reconnect soon (within the first backoff step, jittered): a server going away.
    PROMPT = "prompt"
    #: Do not reconnect: doing the same again would fail the same way.
    FINAL = "final"


#: Close code -> policy. Codes not listed are retried.
CLOSE_CODES: Final[Mapping[int, Policy]] = {
    1001: Policy.PROMPT,  # the server shuts down or drains: another node takes us
    1002: Policy.FINAL,  # we broke the WebSocket protocol
    1003: Policy.FINAL,  # we sent binary data
    1007: Policy.FINAL,  # we sent text that is not UTF-8
    1009: Policy.FINAL,  # we sent a message over the server's limit (it would be resent)
    1010: Policy.FINAL,  # an extension we require was not negotiated
    1012: Policy.PROMPT,  # the service restarts
}

#: 1008 (policy violation) reason -> policy; other 1008 reasons are final.
POLICY_REASONS: Final[Mapping[str, Policy]] = {
    "credentials expired": Policy.PROMPT,  # a fresh token is asked for on reconnect
    "send queue full": Policy.RETRY,  # we fell behind: resume from our positions
    "server send queues full": Policy.RETRY,
    "rate limit exceeded": Policy.RETRY,
}

#: HTTP status of a refused handshake -> policy; other statuses are retried.
HTTP_STATUSES: Final[Mapping[int, Policy]] = {
    400: Policy.FINAL,  # a bad room, username or position
    401: Policy.FINAL,  # no credentials, or ones refused
    403: Policy.FINAL,  # an origin, a room not granted, a full room
    404: Policy.FINAL,
    405: Policy.FINAL,
    426: Policy.FINAL,
    431: Policy.FINAL,
    505: Policy.FINAL,
}


def close_policy(code: int | None, reason: str = "", status: int | None = None) -> Policy:
    """
    What to do after a connection ended with close *code* (None: no close frame, the
    connection just broke) and *reason*, or was refused with HTTP *status*.
    """
    if status is not None:
        return HTTP_STATUSES.get(status, Policy.RETRY)
    if code == 1008:
        return POLICY_REASONS.get(reason, Policy.FINAL)
    if code is None:
        return Policy.RETRY
    return CLOSE_CODES.get(code, Policy.RETRY)


# -- options --------------------------------------------------------------------------


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


@attrs.frozen(kw_only=True)
class ClientOptions:
    """
    How a client behaves. Times are seconds.

    Attributes:
        backoff_initial: The first reconnect's delay bound: the delay before attempt
            *n* (from 0) is uniform in ``[0, min(backoff_max, backoff_initial * 2**n)]``
            (exponential backoff with full jitter).
        backoff_max: The delay bound's ceiling.
        stable_after: A connection open this long resets the backoff.
        connect_timeout: The most an attempt (TCP, TLS, handshake) may take.
        ping_interval: After this long without a message from the server, the client
            sends an application ``ping``.
        ping_timeout: And if nothing arrives within this long after it, the
            connection is taken for dead, closed, and replaced.
        outbox_size: The most unacknowledged publishes kept; one more is refused.
        max_events: The most events waiting for the application.
        partial: Join with ``partial: true``: when not every missed message can be
            replayed, the kept ones are (the rest is reported as lost or skipped).
        dedup_window: A chat that carries its sender's ``id`` is dropped if the same
            user's chat with that id was handed over within this long (the server's
            dedup window, 300 s by default): a resend after an ack lost across an
            epoch change comes again under a new position.
    """

    backoff_initial: float = attrs.field(default=0.5, validator=_positive)
    backoff_max: float = attrs.field(default=20.0, validator=_positive)
    stable_after: float = attrs.field(default=5.0, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    ping_interval: float = attrs.field(default=10.0, validator=_positive)
    ping_timeout: float = attrs.field(default=5.0, validator=_positive)
    outbox_size: int = attrs.field(default=256, validator=_positive)
    max_events: int = attrs.field(default=1024, validator=_positive)
    partial: bool = True
    dedup_window: float = attrs.field(default=300.0, validator=_positive)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before reconnect attempt *attempt* (0 for the first retry)."""
        bound = min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt, 62))
        return rng.uniform(0.0, bound)


# -- actions: what the driver carries out ---------------------------------------------


@attrs.frozen
class OpenConnection:
    """Open a WebSocket to the server's URL with this request *target* (path and query)."""

    gen: int
    target: str


@attrs.frozen
class SendText:
    """Send *text* as one text message on connection *gen*."""

    gen: int
    text: str


@attrs.frozen
class CloseConnection:
    """Close connection *gen* (with *code* if it is open; abort it if not)."""

    gen: int
    code: int
    reason: str


Action = OpenConnection | SendText | CloseConnection


# -- events: what the application is told ---------------------------------------------


@attrs.frozen
class Connecting:
    """A connection attempt begins (*attempt* counts from 1 since the last stable one)."""

    attempt: int


@attrs.frozen
class Connected:
    """The WebSocket is open; the rooms are being joined."""


@attrs.frozen(kw_only=True)
class Disconnected:
    """
    The connection ended or could not be made.

    Attributes:
        code: The close code (None if there was no close frame or no WebSocket).
        reason: The close reason, or what went wrong.
        status: The HTTP status of a refused handshake.
        final: True if the client stops here (:meth:`ClientProtocol.close`, or a
            final close code or status).
        reconnect_in: Seconds until the next attempt (None when final).
    """

    code: int | None
    reason: str
    status: int | None = None
    final: bool = False
    reconnect_in: float | None = None


@attrs.frozen
class Joining:
    """A join of *room* was sent (at connect or after the application asked)."""

    room: str


@attrs.frozen(kw_only=True)
class Joined:
    """
    The server answered a join of *room*: its position now, and what it recovered.

    Attributes:
        recovered: True: every missed message follows (replayed); False: not all
            (``reason``, ``lost``, ``skipped``); None: the client had no position yet.
        lost: Missed messages kept nowhere any more.
        skipped: Missed messages still kept but not replayed (read them with history).
    """

    room: str
    epoch: str
    seq: int
    recovered: bool | None
    reason: str | None = None
    lost: Span | None = None
    skipped: Span | None = None


@attrs.frozen
class Left:
    """The client left *room* (as the application asked)."""

    room: str


@attrs.frozen(kw_only=True)
class JoinRefused:
    """The server refused to join *room* (``code`` as in an ``error`` envelope)."""

    room: str
    code: str
    content: str


@attrs.frozen(kw_only=True)
class Message:
    """A chat of *room*, each (epoch, seq) handed over once."""

    room: str
    username: str
    content: Any
    epoch: str | None
    seq: int | None
    timestamp: int | None
    replayed: bool = False


@attrs.frozen(kw_only=True)
class Presence:
    """
    Who is in *room* now (``users``), after *event*: ``"state"`` (the server's full
    list), ``"join"`` or ``"leave"`` of *username*.
    """

    room: str
    users: frozenset[str]
    event: str
    username: str | None = None


@attrs.frozen(kw_only=True)
class Reset:
    """*room*'s numbering restarted under the client: it continues from (epoch, seq)."""

    room: str
    epoch: str
    seq: int
    reason: str


@attrs.frozen(kw_only=True)
class Gap:
    """
    Chats ``first..last`` of *room* were never received and the server did not say
    so (a server that does not follow positions, such as one of the first protocol).
    """

    room: str
    first: int
    last: int


@attrs.frozen(kw_only=True)
class ServerError:
    """An ``error`` envelope not about a join or a publish of this client."""

    code: str
    content: str
    id: str | None = None


Event = (
    Connecting
    | Connected
    | Disconnected
    | Joining
    | Joined
    | Left
    | JoinRefused
    | Message
    | Presence
    | Reset
    | Gap
    | ServerError
)


@attrs.frozen(kw_only=True)
class PublishFailed:
    """The outcome of a publish the server refused, or that can no longer be sent."""

    code: str
    content: str


#: A publish's outcome: its position once acknowledged, or why it failed.
Outcome = Position | PublishFailed


class OutboxFull(Exception):
    """A publish was refused: ``outbox_size`` publishes wait for their ack already."""


class NotInRoom(Exception):
    """A publish to a room the client has not joined (or has left)."""


class ClientClosed(Exception):
    """The client is closed: nothing more is sent."""


# -- state ----------------------------------------------------------------------------


class Phase(enum.Enum):
    """The connection's phase."""

    IDLE = "idle"  # not started
    WAITING = "waiting"  # until reconnect_at
    CONNECTING = "connecting"  # an OpenConnection is being carried out
    OPEN = "open"
    CLOSED = "closed"  # for good


class RoomPhase(enum.Enum):
    """A room's phase on the current connection."""

    PENDING = "pending"  # wanted, not asked for on this connection (yet)
    JOINING = "joining"  # join sent, no joined yet
    JOINED = "joined"


@attrs.define
class _Room:
    name: str
    position: Position | None = None  # the last chat handed over, or the joined's
    phase: RoomPhase = RoomPhase.PENDING
    users: set[str] = attrs.field(factory=set)
    behind: bool = False  # events were dropped: join again once the queue has room
    leaving: bool = False  # the application left it while its join was pending
    retry_at: float | None = None  # a rate-limited join is sent again then


@attrs.define
class _Pending:
    room: str
    text: str  # the chat, encoded, with its id


#: Chats of a room are dropped beyond this many events waiting; the room is joined
#: again from its position once fewer than half of them wait.
_RESUME_FRACTION: Final = 2

#: The close code the client uses when it replaces a connection it found dead.
_GOING_AWAY: Final = 1001
_NORMAL: Final = 1000


class ClientProtocol:
    """
    One client's state: its rooms and positions, the connection, the outbox.

    Args:
        rooms: The rooms to join (the first one in the connection's URL).
        username: Sent in the URL (ignored by a server that authenticates).
        positions: Positions to resume from (room -> :class:`Position`), as kept by
            :meth:`positions` of an earlier client.
        params: More query parameters for the URL.
        options: Timing and bounds.
        rng: The source of jitter and of publish ids.
    """

    def __init__(
        self,
        rooms: Iterable[str] = (),
        *,
        username: str | None = None,
        positions: Mapping[str, Position] | None = None,
        params: Mapping[str, str] | None = None,
        path: str = "/ws",
        options: ClientOptions | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or ClientOptions()
        self._rng = rng or random.Random()
        self._username = username
        self._params = dict(params or {})
        self._path = path or "/ws"
        self._rooms: dict[str, _Room] = {}
        for room in rooms:
            _check_room(room)
            self._rooms.setdefault(room, _Room(room))
        for room, pos in (positions or {}).items():
            if room in self._rooms and is_valid_epoch(pos.epoch) and pos.seq >= 0:
                self._rooms[room].position = pos
        self.phase = Phase.IDLE
        self.gen = 0
        self._attempt = 0  # failed attempts since the last stable connection
        self._reconnect_at: float | None = None
        self._connect_deadline: float | None = None
        self._opened_at: float | None = None
        self._last_heard = 0.0
        self._ping_sent: float | None = None
        self._url_room: str | None = None  # joined through the URL on this connection
        self._joins: deque[str] = deque()  # joins sent and not yet answered, in order
        self._outbox: OrderedDict[str, _Pending] = OrderedDict()
        self._next_id = 0
        self._id_prefix = f"{self._rng.getrandbits(48):012x}"
        self._events: deque[Event] = deque()
        self._actions: list[Action] = []
        self._settled: list[tuple[str, Outcome]] = []
        self._ids = SeenIds(self.options.dedup_window)
        self.duplicates = 0  # chats dropped as already handed over
        self.dropped = 0  # chats and presence dropped because the queue was full
        self._behind = False  # some room is behind

    # -- what the application does ----------------------------------------------------

    def start(self, now: float) -> None:
        """Begin: the first connection attempt is due now."""
        if self.phase is Phase.IDLE:
            self.phase = Phase.WAITING
            self._reconnect_at = now
            self.handle_timer(now)

    def join(self, room: str, now: float) -> None:
        """Join *room* (from its position if the client has one); no-op if wanted."""
        _check_room(room)
        self._alive()
        r = self._rooms.get(room)
        if r is not None:
            r.leaving = False
            return
        r = self._rooms[room] = _Room(room)
        if self.phase is Phase.OPEN:
            self._send_join(r)
        elif self.phase is Phase.WAITING and len(self._rooms) == 1:
            self.handle_timer(now)  # a client with no room waits for one to connect

    def leave(self, room: str) -> None:
        """Leave *room*; its unacknowledged publishes fail (``left``)."""
        r = self._rooms.get(room)
        if r is None:
            return
        if self.phase is Phase.OPEN and r.phase is RoomPhase.JOINING:
            r.leaving = True  # a leave before the answer could be refused unattributably
            return
        self._drop_room(r)

    def publish(self, room: str, content: Any) -> str:
        """
        Publish *content* to *room*; returns the publish's id, whose outcome
        :meth:`take_settled` gives once the server answered.

        Raises:
            NotInRoom: *room* is not one of the client's rooms.
            OutboxFull: ``outbox_size`` publishes wait for their ack.
            TypeError, ValueError: *content* is not JSON.
            ClientClosed: after :meth:`close` or a final disconnect.
        """
        self._alive()
        r = self._rooms.get(room)
        if r is None or r.leaving:
            raise NotInRoom(f"not in room {room!r}")
        if len(self._outbox) >= self.options.outbox_size:
            raise OutboxFull(f"{len(self._outbox)} publishes wait for their ack")
        self._next_id += 1
        pub_id = f"{self._id_prefix}-{self._next_id}"
        text = json.dumps(
            {"type": "chat", "room": room, "content": content, "id": pub_id},
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        )
        self._outbox[pub_id] = _Pending(room, text)
        if self.phase is Phase.OPEN and r.phase is not RoomPhase.PENDING:
            self._send(text)
        return pub_id

    def ping(self, now: float) -> None:
        """Check the connection now (as after ``online`` or a wake-up): ping it."""
        if self.phase is Phase.OPEN and self._ping_sent is None:
            self._send('{"type":"ping"}')
            self._ping_sent = now

    def close(self, now: float) -> None:
        """Stop for good: close the connection, fail what waits in the outbox."""
        if self.phase is Phase.CLOSED:
            return
        if self.phase in (Phase.OPEN, Phase.CONNECTING):
            self._actions.append(CloseConnection(self.gen, _NORMAL, "client closed"))
        self._end(now, code=None, reason="client closed", status=None, policy=Policy.FINAL)

    # -- what the driver tells --------------------------------------------------------

    def opened(self, gen: int, now: float) -> None:
        """Connection *gen*'s handshake completed."""
        if gen != self.gen or self.phase is not Phase.CONNECTING:
            return
        self.phase = Phase.OPEN
        self._opened_at = now
        self._connect_deadline = None
        self._last_heard = now
        self._ping_sent = None
        self._inform(Connected())
        for r in self._rooms.values():
            r.phase, r.behind, r.retry_at = RoomPhase.PENDING, False, None
        url_room = self._rooms.get(self._url_room) if self._url_room else None
        if url_room is not None:
            url_room.phase = RoomPhase.JOINING
            self._joins.append(url_room.name)
            self._inform(Joining(url_room.name))
        for r in list(self._rooms.values()):
            if r.phase is RoomPhase.PENDING:
                self._send_join(r)
        for pending in self._outbox.values():
            self._send(pending.text)

    def failed(self, gen: int, now: float, *, reason: str, status: int | None = None) -> None:
        """Connection *gen* could not be made (*status*: the HTTP refusal's)."""
        if gen != self.gen or self.phase not in (Phase.CONNECTING, Phase.OPEN):
            return
        self._end(now, code=None, reason=reason, status=status, policy=None)

    def closed(self, gen: int, now: float, code: int | None, reason: str = "") -> None:
        """Connection *gen* ended: closed with *code* (None: it broke, no close frame)."""
        if gen != self.gen or self.phase not in (Phase.CONNECTING, Phase.OPEN):
            return
        self._end(now, code=code, reason=reason, status=None, policy=None)

    def received(self, gen: int, text: str, now: float) -> None:
        """A text message arrived on connection *gen*."""
        if gen != self.gen or self.phase is not Phase.OPEN:
            return
        self._last_heard = now
        self._ping_sent = None
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if type(msg) is not dict:
            return
        kind = msg.get("type")
        room = msg.get("room")
        r = self._rooms.get(room) if type(room) is str else None
        if kind == "chat":
            if r is not None:
                self._on_chat(r, msg, now)
        elif kind == "presence":
            if r is not None:
                self._on_presence(r, msg)
        elif kind == "presence_state":
            if r is not None and not self._full(r):
                users = msg.get("users")
                if type(users) is list:
                    r.users = {u for u in users if type(u) is str}
                    self._emit(Presence(room=r.name, users=frozenset(r.users), event="state"))
        elif kind == "joined":
            if r is not None:
                self._on_joined(r, msg)
        elif kind == "reset":
            if r is not None:
                self._on_reset(r, msg)
        elif kind == "ack":
            self._on_ack(msg)
        elif kind == "error":
            self._on_error(msg, now)

    def handle_timer(self, now: float) -> None:
        """Do what is due at *now* (see :meth:`next_deadline`)."""
        if self.phase is Phase.WAITING:
            due = self._reconnect_at
            if due is not None and now >= due and self._rooms:
                self._connect(now)
        elif self.phase is Phase.CONNECTING:
            if self._connect_deadline is not None and now >= self._connect_deadline:
                self._actions.append(CloseConnection(self.gen, _GOING_AWAY, "connect timeout"))
                self._end(now, code=None, reason="connect timeout", status=None, policy=None)
        elif self.phase is Phase.OPEN:
            if self._opened_at is not None and now - self._opened_at >= self.options.stable_after:
                self._attempt = 0
                self._opened_at = None
            o = self.options
            if self._ping_sent is not None and now >= self._ping_sent + o.ping_timeout:
                self._actions.append(CloseConnection(self.gen, _GOING_AWAY, "no reply to ping"))
                self._end(now, code=None, reason="no reply to ping", status=None, policy=None)
                return
            if self._ping_sent is None and now >= self._last_heard + o.ping_interval:
                self.ping(now)
            for r in list(self._rooms.values()):
                if r.retry_at is not None and now >= r.retry_at:
                    r.retry_at = None
                    self._send_join(r)
                    for pending in self._outbox.values():  # held while the room waited
                        if pending.room == r.name:
                            self._send(pending.text)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` has something to do next (None: nothing)."""
        if self.phase is Phase.WAITING:
            return self._reconnect_at if self._rooms else None
        if self.phase is Phase.CONNECTING:
            return self._connect_deadline
        if self.phase is not Phase.OPEN:
            return None
        o = self.options
        times = [
            self._last_heard + o.ping_interval
            if self._ping_sent is None
            else self._ping_sent + o.ping_timeout
        ]
        if self._opened_at is not None:
            times.append(self._opened_at + o.stable_after)
        times.extend(r.retry_at for r in self._rooms.values() if r.retry_at is not None)
        return min(times)

    # -- what the driver takes ----------------------------------------------------------

    def take_actions(self) -> list[Action]:
        """What to carry out, in order (and forget)."""
        actions, self._actions = self._actions, []
        return actions

    def take_settled(self) -> list[tuple[str, Outcome]]:
        """Publishes answered since the last call: ``(id, position or failure)``."""
        settled, self._settled = self._settled, []
        return settled

    def next_event(self) -> Event | None:
        """The next event for the application, or None."""
        event = self._events.popleft() if self._events else None
        if self._behind:
            self._catch_up()
        return event

    def pending_events(self) -> int:
        return len(self._events)

    # -- what the application may look at ----------------------------------------------

    @property
    def rooms(self) -> list[str]:
        """The rooms the client is in (or joining), in the order they were asked for."""
        return [r.name for r in self._rooms.values() if not r.leaving]

    def positions(self) -> dict[str, Position]:
        """The last position handed over per room: keep them to resume later."""
        return {r.name: r.position for r in self._rooms.values() if r.position is not None}

    def presence(self, room: str) -> frozenset[str]:
        """The users in *room*, as the last presence events told."""
        r = self._rooms.get(room)
        return frozenset(r.users) if r is not None else frozenset()

    def room_phase(self, room: str) -> RoomPhase | None:
        r = self._rooms.get(room)
        return r.phase if r is not None else None

    def outbox(self) -> list[str]:
        """The ids of publishes waiting for their ack, oldest first."""
        return list(self._outbox)

    # -- inside -------------------------------------------------------------------------

    def _alive(self) -> None:
        if self.phase is Phase.CLOSED:
            raise ClientClosed("the client is closed")

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _inform(self, event: Event) -> None:
        """
        Queue an event that only informs (the connection's phase, a join sent, an
        unattributed error): dropped when the queue is full, where the room events'
        bound would otherwise not hold against a reconnecting client nobody reads.
        """
        if len(self._events) < self.options.max_events:
            self._events.append(event)

    def _full(self, r: _Room) -> bool:
        """Whether the queue is full: if so, *r* falls behind (its events dropped)."""
        if r.behind:
            return True
        if len(self._events) < self.options.max_events:
            return False
        r.behind = self._behind = True
        return True

    def _send(self, text: str) -> None:
        self._actions.append(SendText(self.gen, text))

    def _target(self) -> str:
        """The URL's path and query: the first room, with its position."""
        room = next(iter(self._rooms.values()))
        params = dict(self._params)
        params["room"] = room.name
        if self._username is not None:
            params["username"] = self._username
        pos = room.position
        params["since"] = "" if pos is None else f"{pos.epoch}:{pos.seq}"
        if self.options.partial:
            params["partial"] = "1"
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
        self._url_room = room.name
        return f"{self._path}?{query}"

    def _connect(self, now: float) -> None:
        self.gen += 1
        self.phase = Phase.CONNECTING
        self._reconnect_at = None
        self._connect_deadline = now + self.options.connect_timeout
        self._joins.clear()
        self._inform(Connecting(self._attempt + 1))
        self._actions.append(OpenConnection(self.gen, self._target()))

    def _end(
        self,
        now: float,
        *,
        code: int | None,
        reason: str,
        status: int | None,
        policy: Policy | None,
    ) -> None:
        """The connection is gone: decide whether and when to try again."""
        if policy is None:
            policy = close_policy(code, reason, status)
        self.phase = Phase.WAITING  # no connection: nothing more is sent on it
        for r in [r for r in self._rooms.values() if r.leaving]:
            self._drop_room(r)  # the server forgot it with the connection
        for r in self._rooms.values():
            r.phase, r.retry_at = RoomPhase.PENDING, None
        self._joins.clear()
        self._opened_at = None
        self._connect_deadline = None
        self._ping_sent = None
        if policy is Policy.FINAL:
            self.phase = Phase.CLOSED
            self._reconnect_at = None
            self._emit(Disconnected(code=code, reason=reason, status=status, final=True))
            failure = PublishFailed(code="closed", content=reason or "connection closed")
            for pub_id in list(self._outbox):
                self._settled.append((pub_id, failure))
            self._outbox.clear()
            return
        if policy is Policy.PROMPT:
            delay = self._rng.uniform(0.0, self.options.backoff_initial)
        else:
            delay = self.options.delay(self._attempt, self._rng)
            self._attempt += 1
        self.phase = Phase.WAITING
        self._reconnect_at = now + delay
        self._inform(Disconnected(code=code, reason=reason, status=status, reconnect_in=delay))

    def _send_join(self, r: _Room) -> None:
        r.phase = RoomPhase.JOINING
        r.behind = False
        pos = r.position
        since = None if pos is None else {"epoch": pos.epoch, "seq": pos.seq}
        message: dict[str, Any] = {"type": "join", "room": r.name, "since": since}
        if self.options.partial:
            message["partial"] = True
        self._joins.append(r.name)
        self._send(json.dumps(message, separators=(",", ":")))
        self._inform(Joining(r.name))

    def _drop_room(self, r: _Room) -> None:
        """Leave *r* for good: tell the server (if joined) and the application."""
        if self.phase is Phase.OPEN and r.phase is RoomPhase.JOINED:
            self._send(json.dumps({"type": "leave", "room": r.name}, separators=(",", ":")))
        del self._rooms[r.name]
        failure = PublishFailed(code="left", content=f"left room {r.name!r}")
        for pub_id, pending in list(self._outbox.items()):
            if pending.room == r.name:
                del self._outbox[pub_id]
                self._settled.append((pub_id, failure))
        self._emit(Left(r.name))

    def _catch_up(self) -> None:
        """Join the rooms that fell behind again, from their positions, if there is room."""
        if self.phase is not Phase.OPEN or not self._behind:
            return
        if len(self._events) > self.options.max_events // _RESUME_FRACTION:
            return
        self._behind = False
        for r in list(self._rooms.values()):
            if r.behind:
                if r.phase is RoomPhase.JOINED:
                    self._send_join(r)
                else:
                    self._behind = True  # its join's answer comes first

    def _on_chat(self, r: _Room, msg: dict[str, Any], now: float) -> None:
        if r.phase is not RoomPhase.JOINED:
            return  # before the join's answer: the replay brings it
        seq = msg.get("seq")
        pos = r.position
        if type(seq) is int and pos is not None:
            if seq <= pos.seq:
                self.duplicates += 1
                return
            if self._full(r):
                self.dropped += 1
                return
            if seq > pos.seq + 1:
                self._emit(Gap(room=r.name, first=pos.seq + 1, last=seq - 1))
            r.position = Position(pos.epoch, seq)
        elif self._full(r):
            self.dropped += 1
            return
        username = msg.get("username")
        msg_id = msg.get("id")
        # A resend whose ack was lost across an epoch change is numbered again: the
        # sender's id says it is one already handed over.
        if (
            type(msg_id) is str
            and type(username) is str
            and not self._ids.first(r.name, username, msg_id, now)
        ):
            self.duplicates += 1
            return
        timestamp = msg.get("timestamp")
        self._emit(
            Message(
                room=r.name,
                username=username if type(username) is str else "",
                content=msg.get("content"),
                epoch=pos.epoch if pos is not None else None,
                seq=seq if type(seq) is int else None,
                timestamp=timestamp if type(timestamp) is int else None,
                replayed=msg.get("replayed") is True,
            )
        )

    def _on_presence(self, r: _Room, msg: dict[str, Any]) -> None:
        user, what = msg.get("username"), msg.get("event")
        if type(user) is not str or what not in ("join", "leave"):
            return
        if self._full(r):
            self.dropped += 1
            return
        if what == "join":
            r.users.add(user)
        else:
            r.users.discard(user)
        self._emit(Presence(room=r.name, users=frozenset(r.users), event=what, username=user))

    def _on_joined(self, r: _Room, msg: dict[str, Any]) -> None:
        epoch, seq = msg.get("epoch"), msg.get("seq")
        if not (type(epoch) is str and is_valid_epoch(epoch) and type(seq) is int and seq >= 0):
            return
        if r.name in self._joins:
            self._joins.remove(r.name)
        if self._full(r):
            # Not handed over: the position stays the application's, and the join
            # made again from it once the queue has room tells what this one did.
            r.phase = RoomPhase.JOINED
            self._catch_up()
            return
        recovered = msg.get("recovered")
        lost, skipped = _span(msg.get("lost")), _span(msg.get("skipped"))
        if recovered is True and r.position is not None and r.position.epoch == epoch:
            pass  # the missed chats follow: the position moves with them
        else:
            # Replayed chats (a partial join) start after what is lost or skipped.
            floor = max((s.last for s in (lost, skipped) if s is not None), default=seq)
            r.position = Position(epoch, min(floor, seq))
        r.phase = RoomPhase.JOINED
        self._emit(
            Joined(
                room=r.name,
                epoch=epoch,
                seq=seq,
                recovered=recovered if type(recovered) is bool else None,
                reason=msg.get("reason") if type(msg.get("reason")) is str else None,
                lost=lost,
                skipped=skipped,
            )
        )
        if r.leaving:
            r.leaving = False
            self._drop_room(r)
        else:
            self._catch_up()  # it may have fallen behind again while joining

    def _on_reset(self, r: _Room, msg: dict[str, Any]) -> None:
        epoch, seq, reason = msg.get("epoch"), msg.get("seq"), msg.get("reason")
        if not (type(epoch) is str and is_valid_epoch(epoch) and type(seq) is int and seq >= 0):
            return
        if self._full(r):
            return  # joined again later, from the position the application has
        r.position = Position(epoch, seq)
        self._emit(
            Reset(room=r.name, epoch=epoch, seq=seq, reason=reason if type(reason) is str else "")
        )

    def _on_ack(self, msg: dict[str, Any]) -> None:
        pub_id, epoch, seq = msg.get("id"), msg.get("epoch"), msg.get("seq")
        if type(pub_id) is not str or pub_id not in self._outbox:
            return
        if not (type(epoch) is str and type(seq) is int):
            return
        del self._outbox[pub_id]
        self._settled.append((pub_id, Position(epoch, seq)))

    def _on_error(self, msg: dict[str, Any], now: float) -> None:
        code = msg.get("code") if type(msg.get("code")) is str else "error"
        content = msg.get("content") if type(msg.get("content")) is str else ""
        err_id = msg.get("id") if type(msg.get("id")) is str else None
        assert type(code) is str and type(content) is str
        if err_id is not None and err_id in self._outbox:
            del self._outbox[err_id]
            self._settled.append((err_id, PublishFailed(code=code, content=content)))
            return
        if err_id is None and self._joins:
            # Joins are answered in order and the client sends nothing else without
            # an id that the server could refuse: this refuses the oldest join.
            room = self._joins.popleft()
            r = self._rooms.get(room)
            if r is None:
                return
            if code == "rate_limited":
                r.phase, r.retry_at = RoomPhase.PENDING, now + 2 * self.options.backoff_initial
                return
            r.leaving = False
            del self._rooms[room]
            failure = PublishFailed(code=code, content=content)
            for pub_id, pending in list(self._outbox.items()):
                if pending.room == room:
                    del self._outbox[pub_id]
                    self._settled.append((pub_id, failure))
            self._emit(JoinRefused(room=room, code=code, content=content))
            return
        self._inform(ServerError(code=code, content=content, id=err_id))


class SeenIds:
    """
    The (room, username, id) of chats handed over in the last *window* seconds (the
    server's dedup window), at most *most* of them: the oldest are forgotten first.
    """

    def __init__(self, window: float, most: int = 65536) -> None:
        self.window = window
        self.most = most
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def first(self, room: str, username: str, msg_id: str, now: float) -> bool:
        """Whether this is the first time; remembered either way."""
        seen = self._seen
        while seen:
            key, at = next(iter(seen.items()))
            if at > now - self.window and len(seen) < self.most:
                break
            del seen[key]
        key = (room, username, msg_id)
        if key in seen:
            return False
        seen[key] = now
        return True


def _check_room(room: str) -> None:
    if not is_valid_room(room):
        raise ValueError(f"invalid room name {room!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")


def _span(value: object) -> Span | None:
    if type(value) is dict:
        first, last = value.get("from"), value.get("to")
        if type(first) is int and type(last) is int and first <= last:
            return Span(first, last)
    return None
