"""
The cluster link to Redis as a sans-IO state machine: :class:`BackplaneProtocol`.

Every decision a Redis backplane makes lives here; a driver (``roombus.trio``'s
:class:`~roombus.trio.RedisBackplane`) owns the sockets, the tasks and the clock. The
protocol is fed inputs, each with the driver's monotonic ``now``, and answers with
*driver commands* (:meth:`~BackplaneProtocol.take_commands`), *events* for the hub
(:meth:`~BackplaneProtocol.take_events`) and one timer
(:meth:`~BackplaneProtocol.get_timer`). It performs no I/O, reads no clock and knows no
event loop.

The driver's contract
---------------------
After every call into the protocol, the driver runs its ``transmit`` routine: take the
commands and carry them out in order, take the events and hand them to the hub, repeat
while either came back non-empty (handing events on can submit new work), then re-arm
its timer from :meth:`~BackplaneProtocol.get_timer`. The commands, and their answers:

* :class:`OpenLink` -- connect and log in (``_resp.handshake_commands``) the given link;
  answer :meth:`~BackplaneProtocol.link_opened` or :meth:`~BackplaneProtocol.link_failed`.
  The SUBSCRIBER link uses sharded pub/sub if :attr:`BackplaneProtocol.sharded`.
* :class:`CloseLinks` -- close both links and cancel everything running on them; answer
  :meth:`~BackplaneProtocol.links_closed` once nothing of theirs runs any more. After
  that answer no late input of those links may arrive.
* :class:`Execute` -- one pipeline on COMMAND (the replies to acknowledged Relays and to
  ReadStreams become Relayed and StreamRead events); answer
  :meth:`~BackplaneProtocol.replies` with one reply per command, in order, error replies
  as :class:`~roombus.cluster.resp.RedisError` instances (:data:`RespError`).
* :class:`Listen` / :class:`Unlisten` / :class:`Ping` -- on SUBSCRIBER, in the order
  given; Listen and Ping are answered :meth:`~BackplaneProtocol.confirmed` once Redis
  confirmed them, Unlisten is not answered.
* Anything that goes wrong with a link (refused, EOF, socket error, a reply that does
  not parse, a timeout, an error reply to a Listen) is
  :meth:`~BackplaneProtocol.link_failed`. Messages read off SUBSCRIBER go to
  :meth:`~BackplaneProtocol.messages`, one call per burst.

The link phases
---------------
One table, :data:`LINK_TABLE`, ``(phase, input) -> next phase``, applied by
``_set_phase`` (which logs each change). An input with no row in the phase it arrives
in is a late answer from links being closed and is ignored. docs/design.md carries
the table (:func:`render_link_table`; tested).

* DOWN --start / backoff timer--> CONNECTING: ``OpenLink(COMMAND)``.
* CONNECTING --COMMAND opened--> PROBING: ``COMMAND INFO SPUBLISH`` (an error reply:
  ``INFO server``; an error again: classic pub/sub).
* PROBING --probed--> LOADING: ``SCRIPT LOAD`` of the scripts
  (:data:`~roombus.cluster.schema.SCRIPTS`) and ``INFO server`` (the server's
  ``run_id``, which the room streams' epochs are tied to).
* LOADING --loaded--> OPENING_SUB: ``OpenLink(SUBSCRIBER)``.
* OPENING_SUB --SUBSCRIBER opened--> ONLINE: event BackplaneRestored.
* Each of CONNECTING .. OPENING_SUB must be done within ``connect_timeout``.
* any open phase --failure--> CLOSING: ``CloseLinks``; from ONLINE, event
  BackplaneLost and the queued work is dropped (and counted).
* CLOSING --links closed--> DOWN: wait ``backoff x U(0.5, 1)``; the backoff is 0.1 s
  after a session that lasted 5 s, else twice the last one, up to
  :attr:`~BackplaneProtocol.backoff_cap` (5 s, or a quarter of the presence TTL if
  that is less, not under 0.5 s).
* :meth:`~BackplaneProtocol.stop`: once the queued work is written (idle),
  ``CloseLinks`` and then STOPPED; :meth:`~BackplaneProtocol.abort`: at once.

While ONLINE: one batch in flight on COMMAND at a time. A batch is the queued work up
to the next Subscribe, in one pipeline (Unsubscribes in one Unlisten, except those of a
room a later Subscribe listens to again); a run of Subscribes is one Listen of their
rooms (each at its latest ``gen``), then, once confirmed, one pipeline of snapshots,
which become RoomSynced events. Every third of the presence TTL this node's members
are refreshed; a presence TTL after connecting every listened room's presence is
read again (the broker keeps who was there until then, see SETTLING); every
:attr:`~BackplaneProtocol.keepalive` seconds (an eighth of the TTL, between
:data:`MIN_KEEPALIVE` and :data:`KEEPALIVE`) both links are pinged, and a ping that is
not answered by the next round ends the session (unless the check itself came half a
round late: this node was stalled), as does any error reply.

API note: this is the agreed API, unchanged. Members added to it: the attributes
``phase``, ``sharded`` (read it when opening the SUBSCRIBER link), ``address``,
``presence_ttl``, ``prefix``, ``connect_timeout``; the method :meth:`abort` (shut down
without waiting for the queued work, for a driver that is being cancelled); and
:data:`LINK_TABLE`, :data:`RespError` (= :class:`roombus.cluster.resp.RedisError`).
"""

from __future__ import annotations

import enum
import logging
import random as _random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeAlias

import attrs

from ..core.actions import (
    Announce,
    BackplaneAction,
    Control,
    ReadCluster,
    ReadStream,
    Relay,
    Subscribe,
    Unsubscribe,
)
from ..core.errors import ConfigError
from ..core.events import BackplaneLost, BackplaneRestored, Event
from ..core.names import RoomName
from .config import ClusterConfig
from .control import encode_control
from .resp import (
    SHARDED_PROBE,
    VERSION_PROBE,
    Arg,
    RedisAddress,
    RedisError,
    run_id_from_info,
    sharded_from_command_info,
    sharded_from_info,
)
from .schema import (
    SCRIPTS,
    channel,
    cluster_read_command,
    command_for,
    control_channel,
    control_command,
    lifetime_ms,
    parse_cluster_read,
    parse_read,
    parse_relayed,
    parse_snapshot,
    records_received,
    refresh_command,
    script_source,
    snapshot_command,
    touch_command,
)

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "KEEPALIVE",
    "MIN_BACKOFF_CAP",
    "MIN_KEEPALIVE",
    "LINK_TABLE",
    "BackplaneProtocol",
    "BackplaneStatistics",
    "CloseLinks",
    "DriverCommand",
    "Execute",
    "Input",
    "Link",
    "Listen",
    "OpenLink",
    "Phase",
    "Ping",
    "RespError",
    "Unlisten",
    "render_link_table",
]

log: Final = logging.getLogger("roombus.backplane")

#: Reconnection backoff, in seconds: first wait and cap (a quarter of the presence
#: TTL if that is less: see :attr:`BackplaneProtocol.backoff_cap`). A session that
#: lasted BACKOFF_CAP seconds resets the backoff.
BACKOFF_FIRST: Final = 0.1
BACKOFF_CAP: Final = 5.0
#: The lowest backoff cap, in seconds (however short the presence TTL).
MIN_BACKOFF_CAP: Final = 0.5
#: Seconds between liveness checks of both links, at most (an eighth of the presence
#: TTL if that is less: see :attr:`BackplaneProtocol.keepalive`); a check not answered
#: by the next one ends the session (a Redis that stops answering: a host gone, no
#: reset; or paused).
KEEPALIVE: Final = 5.0
#: The shortest interval between liveness checks, in seconds.
MIN_KEEPALIVE: Final = 0.25

#: What an error reply is, in :meth:`BackplaneProtocol.replies`.
RespError: TypeAlias = RedisError


class Link(enum.Enum):
    """The two connections to Redis."""

    COMMAND = "command"
    SUBSCRIBER = "subscriber"


@attrs.frozen
class OpenLink:
    """Connect and log in *link*; answer ``link_opened`` or ``link_failed``."""

    link: Link
    address: RedisAddress
    timeout: float


@attrs.frozen
class CloseLinks:
    """Close both links, cancel their work; answer ``links_closed``."""


@attrs.frozen
class Execute:
    """One pipeline on COMMAND; answer ``replies(batch, [one per command])``."""

    batch: int
    commands: tuple[tuple[Arg, ...], ...]


@attrs.frozen
class Listen:
    """SSUBSCRIBE/SUBSCRIBE on SUBSCRIBER; answer ``confirmed(batch)`` once all are."""

    batch: int
    verb: bytes
    channels: tuple[bytes, ...]


@attrs.frozen
class Unlisten:
    """SUNSUBSCRIBE/UNSUBSCRIBE on SUBSCRIBER; no answer."""

    verb: bytes
    channels: tuple[bytes, ...]


@attrs.frozen
class Ping:
    """PING on SUBSCRIBER; answer ``confirmed(batch)``."""

    batch: int


DriverCommand: TypeAlias = "OpenLink | CloseLinks | Execute | Listen | Unlisten | Ping"


@attrs.define
class BackplaneStatistics:
    """
    Counters of a Redis backplane since it started.

    Attributes:
        online: Connected to Redis now.
        connects: Successful connections (the first one included).
        failures: Connections lost or refused.
        dropped: Backplane work discarded because Redis was unreachable (messages
            not relayed, presence changes not recorded; presence is re-announced on
            reconnect, messages are delivered locally only).
        relayed: Messages published to Redis.
        received: Records received from Redis.
        errors: Commands Redis answered with an error.
    """

    online: bool = False
    connects: int = 0
    failures: int = 0
    dropped: int = 0
    relayed: int = 0
    received: int = 0
    errors: int = 0


class Phase(enum.Enum):
    """Where the link to Redis is (see :data:`LINK_TABLE`)."""

    DOWN = "down"
    CONNECTING = "connecting"
    PROBING = "probing"
    LOADING = "loading"
    OPENING_SUB = "opening_sub"
    ONLINE = "online"
    CLOSING = "closing"
    STOPPED = "stopped"


class Input(enum.Enum):
    """What moves the link from phase to phase."""

    START = "start"
    BACKOFF_DUE = "backoff timer"
    COMMAND_OPENED = "link_opened(COMMAND)"
    PROBED = "probe replies"
    LOADED = "SCRIPT LOAD replies"
    SUBSCRIBER_OPENED = "link_opened(SUBSCRIBER)"
    FAILED = "failure"
    CLOSED = "links_closed"
    CLOSED_STOPPING = "links_closed (stopping)"
    STOP = "stop"


_P = Phase
_I = Input
_OPEN: Final = (_P.CONNECTING, _P.PROBING, _P.LOADING, _P.OPENING_SUB, _P.ONLINE)

#: ``(phase, input) -> next phase``. FAILED covers link_failed, an error reply, an
#: unreadable reply, a setup deadline and a missed keepalive. STOP is stop() once idle
#: (or abort()); links_closed after it is CLOSED_STOPPING.
LINK_TABLE: Final[dict[tuple[Phase, Input], Phase]] = {
    (_P.DOWN, _I.START): _P.CONNECTING,
    (_P.DOWN, _I.BACKOFF_DUE): _P.CONNECTING,
    (_P.CONNECTING, _I.COMMAND_OPENED): _P.PROBING,
    (_P.PROBING, _I.PROBED): _P.LOADING,
    (_P.LOADING, _I.LOADED): _P.OPENING_SUB,
    (_P.OPENING_SUB, _I.SUBSCRIBER_OPENED): _P.ONLINE,
    **{(phase, _I.FAILED): _P.CLOSING for phase in _OPEN},
    (_P.CLOSING, _I.CLOSED): _P.DOWN,
    **{(phase, _I.STOP): _P.CLOSING for phase in _OPEN},
    (_P.DOWN, _I.STOP): _P.STOPPED,
    (_P.CLOSING, _I.STOP): _P.CLOSING,
    (_P.CLOSING, _I.CLOSED_STOPPING): _P.STOPPED,
}


def render_link_table() -> str:
    """The link phase table of docs/design.md, from :data:`LINK_TABLE`."""
    lines = ["| phase | input | next |", "| --- | --- | --- |"]
    for (phase, inp), nxt in LINK_TABLE.items():
        lines.append(f"| {phase.name} | {inp.value} | {nxt.name} |")
    return "\n".join(lines)


class _Commands:
    """Commands of the protocol's own (a refresh, a keepalive PING) queued as work."""

    __slots__ = ("commands", "ping")

    def __init__(self, commands: list[tuple[Arg, ...]], *, ping: bool = False) -> None:
        self.commands = commands
        self.ping = ping


_Work: TypeAlias = "BackplaneAction | _Commands"


class _Step(enum.Enum):
    """What the batch in flight is."""

    PROBE = "probe"
    VERSION = "version"
    LOAD = "load"
    WORK = "work"
    LISTEN = "listen"
    SNAPSHOT = "snapshot"


_KEEPALIVE_PING: Final[tuple[Arg, ...]] = (b"PING",)


class BackplaneProtocol:
    """
    The link of one node to Redis, sans-IO (see the module docstring).

    Args:
        config: Where Redis is and how this node takes part (its ``node_id`` set).
        local_presence: Each room with members here, and its users here (for the
            refresh).
        random: A uniform [0, 1) source, for the backoff's jitter.

    Raises:
        ConfigError: if the config has no node id.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        local_presence: Callable[[], list[tuple[RoomName, list[str]]]],
        random: Callable[[], float] = _random.random,
    ) -> None:
        if config.node_id is None:
            raise ConfigError("node-id", "must be set: the driver generates one")
        self.config: Final = config
        address = config.address
        node_id = config.node_id
        presence_ttl = config.presence_ttl
        prefix = config.prefix
        connect_timeout = config.connect_timeout
        self.address: Final[RedisAddress] = address
        self.node_id: Final = node_id
        self.presence_ttl: Final = float(presence_ttl)
        self.prefix: Final = prefix
        self.connect_timeout: Final = float(connect_timeout)
        self.statistics = BackplaneStatistics()
        #: Where the link is (see :data:`LINK_TABLE`).
        self.phase = Phase.DOWN
        #: Whether the server has sharded pub/sub; known from LOADING on.
        self.sharded = True
        self._local_presence = local_presence
        self._random = random
        self._lifetime: Final = lifetime_ms(self.presence_ttl)
        self._control: Final = control_channel(prefix).encode()
        self._period: Final = self.presence_ttl / 3
        #: Seconds between liveness checks: a Redis that stalls is lost within two of
        #: them, a quarter of the TTL at most, before any entry can expire (a third of
        #: the TTL after the stall begins, at the soonest): the nodes then take it as an
        #: outage, and their users do not flicker when Redis answers again.
        #: (Not below MIN_KEEPALIVE: with a presence TTL under 2 s, a stall may expire
        #: entries before it is noticed.)
        self.keepalive: Final = min(KEEPALIVE, max(MIN_KEEPALIVE, self.presence_ttl / 8))
        #: The longest wait between two attempts to reconnect, in seconds: once Redis
        #: takes them again, every node is back within a quarter of the TTL of the
        #: others, so none of their live users is taken for gone (docs/scaling.md,
        #: "Presence through an outage").
        self.backoff_cap: Final = min(BACKOFF_CAP, max(MIN_BACKOFF_CAP, self.presence_ttl / 4))
        self._commands: list[DriverCommand] = []
        self._events: list[Event] = []
        self._work: deque[_Work] = deque()
        # The rooms whose channel the broker wants listened to, as of the work queued:
        # an Unsubscribe followed by a Subscribe of the same room is not carried out.
        self._wanted: dict[RoomName, int] = {}
        self._scripts: dict[str, bytes] = {}
        self._batch = 0  # the last batch number handed out (unique for ever)
        self._step: _Step | None = None  # what the batch in flight on COMMAND is
        self._step_batch = -1
        self._step_expected = 0
        self._step_rooms: dict[RoomName, int] = {}
        # The commands of the batch in flight whose replies are answers for the broker:
        # (index in the batch, the action): acknowledged Relays and ReadStreams.
        self._step_answers: list[tuple[int, Relay | ReadStream | ReadCluster]] = []
        # How long a room's epoch lives if a snapshot makes one (from the Subscribes).
        self._position_ms = 86_400_000
        # The Redis server's run_id this session: the streams' epochs are tied to it.
        self._run = ""
        self._step_pings = False  # the batch in flight carries the keepalive PING
        self._ping_batch = -1  # the keepalive Ping on SUBSCRIBER awaiting confirmation
        self._ping_command_due = False  # the keepalive PING on COMMAND not answered yet
        self._stopping = False
        self._flush_at: float | None = None  # submitted work waits for take_commands
        self._backoff = BACKOFF_FIRST
        self._online_since = 0.0
        self._lasted = False
        # Deadlines (None: not armed).
        self._backoff_at: float | None = None
        self._setup_deadline: float | None = None
        self._keepalive_at: float | None = None
        self._refresh_at: float | None = None
        self._reread_at: float | None = None

    def __repr__(self) -> str:
        return f"<BackplaneProtocol node={self.node_id!r} {self.address!r} {self.phase.name}>"

    # -- outputs --------------------------------------------------------------------------

    def take_commands(self) -> list[DriverCommand]:
        """What the driver must do now, in order."""
        if self._flush_at is not None:  # work submitted since: its batch, now
            now, self._flush_at = self._flush_at, None
            if self._step is None and self.phase is Phase.ONLINE:
                self._next_batch(now)
        commands = self._commands
        if commands:
            self._commands = []
        return commands

    def take_events(self) -> list[Event]:
        """RecordReceived, RoomSynced, BackplaneLost, BackplaneRestored: for the hub."""
        events = self._events
        if events:
            self._events = []
        return events

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is due next, or None."""
        phase = self.phase
        if phase is Phase.DOWN:
            return self._backoff_at
        if phase is Phase.ONLINE:
            due = self._keepalive_at
            for deadline in (self._refresh_at, self._reread_at):
                if deadline is not None and (due is None or deadline < due):
                    due = deadline
            return due
        if phase in _OPEN:
            return self._setup_deadline
        return None

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in flight on COMMAND (shutdown waits for this)."""
        return self._step is None and not self._work

    def metrics(self) -> dict[str, float]:
        """The counters, by Prometheus name (for ``GET /metrics``)."""
        stats = self.statistics
        return {
            "roombus_redis_connects_total": stats.connects,
            "roombus_redis_failures_total": stats.failures,
            "roombus_redis_dropped_total": stats.dropped,
            "roombus_redis_relayed_total": stats.relayed,
            "roombus_redis_received_total": stats.received,
            "roombus_redis_errors_total": stats.errors,
        }

    # -- inputs ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin: connect."""
        if self.phase is Phase.DOWN and self._backoff_at is None and not self._stopping:
            self._set_phase(Input.START, now)

    def submit(self, work: Sequence[BackplaneAction], now: float) -> None:
        """Queue the broker's backplane work (the hub's ``take_backplane()``).

        Unless the link is up (ONLINE, not closing for a stop), it is dropped: Relays
        and Announces are counted in ``dropped``. The batch is made when the driver
        next calls :meth:`take_commands`, so that work submitted until then goes out
        in one pipeline (a driver may take its time to let a burst gather).
        """
        if self.phase is not Phase.ONLINE:
            self.statistics.dropped += sum(isinstance(a, (Relay, Announce)) for a in work)
            return
        wanted = self._wanted
        for action in work:
            if isinstance(action, Subscribe):
                wanted[action.room] = action.gen
                self._position_ms = action.position_ms
            elif isinstance(action, Unsubscribe):
                wanted.pop(action.room, None)
        self._work.extend(work)
        if self._step is None and self._flush_at is None:
            self._flush_at = now

    def link_opened(self, link: Link, now: float) -> None:
        """The driver connected and logged in *link*."""
        if link is Link.COMMAND:
            if self._set_phase(Input.COMMAND_OPENED, now):
                self._execute(_Step.PROBE, [SHARDED_PROBE])
        elif self._set_phase(Input.SUBSCRIBER_OPENED, now):
            self._online(now)

    def link_failed(self, link: Link, reason: str, now: float) -> None:
        """*link* could not be opened, or broke (refused, EOF, socket error, garbage,
        timeout, an error reply to a Listen)."""
        self._fail(f"{link.value} link: {reason}", now)

    def links_closed(self, now: float) -> None:
        """The driver closed both links (the answer to :class:`CloseLinks`)."""
        if self.phase is not Phase.CLOSING:
            return
        if self._stopping:
            self._set_phase(Input.CLOSED_STOPPING, now)
            return
        self._set_phase(Input.CLOSED, now)
        # A session that lasted resets the backoff; flapping backs off further.
        self._backoff = BACKOFF_FIRST if self._lasted else min(self._backoff * 2, self.backoff_cap)
        self._backoff_at = now + self._backoff * (0.5 + 0.5 * self._random())

    def replies(self, batch: int, replies: list[object], now: float) -> None:
        """The replies to ``Execute(batch)``, in order (error replies as RespError)."""
        step = self._step
        if step is None or batch != self._step_batch or self.phase not in _OPEN:
            return  # late: its session is over
        expected = self._step_expected
        if len(replies) != expected:
            self._fail(f"{len(replies)} replies to a pipeline of {expected} commands", now)
            return
        self._step = None
        if step is _Step.WORK:
            if self._check(replies, now) and self._answer(replies, now):
                if self._step_pings:
                    self._ping_command_due = False
                self._next_batch(now)
        elif step is _Step.SNAPSHOT:
            self._synced(replies, now)
        elif step is _Step.PROBE:
            if isinstance(replies[0], RedisError):
                self._execute(_Step.VERSION, [VERSION_PROBE])
            else:
                self._load(sharded_from_command_info(replies[0]), now)
        elif step is _Step.VERSION:
            ok = not isinstance(replies[0], RedisError)
            self._load(ok and sharded_from_info(replies[0]), now)
        elif step is _Step.LOAD:
            self._loaded(replies, now)

    def confirmed(self, batch: int, now: float) -> None:
        """Redis confirmed ``Listen(batch)`` or ``Ping(batch)``."""
        if self.phase is not Phase.ONLINE:
            return
        if batch == self._ping_batch:
            self._ping_batch = -1
        elif self._step is _Step.LISTEN and batch == self._step_batch:
            # Listened first: records published from now on arrive. The snapshot, read
            # after, has a version telling the broker which of them it reflects.
            self._step = None
            rooms = self._step_rooms
            self._execute(
                _Step.SNAPSHOT,
                [
                    snapshot_command(
                        room,
                        prefix=self.prefix,
                        shas=self._scripts,
                        position_ms=self._position_ms,
                        run=self._run,
                    )
                    for room in rooms
                ],
            )

    def messages(self, items: Sequence[tuple[bytes, bytes]], now: float) -> None:
        """A burst of ``(channel, data)`` read off SUBSCRIBER."""
        if self.phase is not Phase.ONLINE:
            return
        events = records_received(items, self._control)
        self.statistics.received += len(events)
        if self._events:
            self._events.extend(events)
        else:
            self._events = events

    def handle_timer(self, now: float) -> None:
        """The time of :meth:`get_timer` came (or went): do what is due."""
        phase = self.phase
        if phase is Phase.DOWN:
            if self._backoff_at is not None and now >= self._backoff_at:
                self._backoff_at = None
                self._set_phase(Input.BACKOFF_DUE, now)
            return
        if phase is Phase.ONLINE:
            self._online_timers(now)
        elif phase in _OPEN and self._setup_deadline is not None and now >= self._setup_deadline:
            self._fail(
                f"timed out setting up the session ({phase.name}, after {self.connect_timeout}s)",
                now,
            )

    def stop(self, now: float) -> None:
        """Shut down: once the queued work is written, close the links; then STOPPED."""
        if self.phase is Phase.STOPPED:
            return
        self._stopping = True
        self._refresh_at = self._reread_at = None
        if self.phase is not Phase.ONLINE or self.idle:
            self._set_phase(Input.STOP, now)

    def abort(self, now: float) -> None:
        """Shut down now: drop what is queued (counted), close the links; then STOPPED."""
        if self.phase is Phase.STOPPED:
            return
        self._stopping = True
        self._drop_queued()
        self._set_phase(Input.STOP, now)

    # -- the phases -----------------------------------------------------------------------

    def _set_phase(self, inp: Input, now: float) -> bool:
        """Apply :data:`LINK_TABLE`: False (and nothing done) for an input with no row."""
        old = self.phase
        new = LINK_TABLE.get((old, inp))
        if new is None:
            log.debug("redis backplane: %s ignored in %s", inp.value, old.name)
            return False
        if new is Phase.CLOSING and old is not Phase.CLOSING:
            self._close(old, inp, now)
        self._enter(new, inp)
        if new is Phase.CONNECTING:
            self._setup_deadline = now + self.connect_timeout
            self._commands.append(OpenLink(Link.COMMAND, self.address, self.connect_timeout))
        elif new in _OPEN and new is not Phase.ONLINE:
            self._setup_deadline = now + self.connect_timeout
        return True

    def _enter(self, new: Phase, inp: Input) -> None:
        if new is not self.phase:
            log.debug("redis backplane: %s -> %s (%s)", self.phase.name, new.name, inp.value)
            self.phase = new
        if new is Phase.STOPPED:
            self._backoff_at = None

    def _close(self, old: Phase, inp: Input, now: float) -> None:
        """Leave an open phase: CloseLinks; what was in flight is forgotten."""
        self._commands.append(CloseLinks())
        self._step = None
        self._flush_at = None
        self._ping_batch = -1
        self._ping_command_due = False
        self._setup_deadline = self._keepalive_at = self._refresh_at = self._reread_at = None
        if old is Phase.ONLINE:
            self._lasted = now - self._online_since >= BACKOFF_CAP
            self.statistics.online = False
            self._drop_queued()
            self._wanted.clear()
            if inp is Input.FAILED:
                self._events.append(BackplaneLost())
        else:
            self._lasted = False

    def _fail(self, reason: str, now: float) -> None:
        if self.phase not in _OPEN:
            return  # late news of links being closed (or none open)
        self.statistics.failures += 1
        log.warning(
            "redis backplane %s: %s", "lost" if self.phase is Phase.ONLINE else "down", reason
        )
        self._set_phase(Input.FAILED, now)

    def _drop_queued(self) -> None:
        self.statistics.dropped += sum(isinstance(a, (Relay, Announce)) for a in self._work)
        self._work.clear()
        self._step_answers = []

    def _load(self, sharded: bool, now: float) -> None:
        self.sharded = sharded
        if self._set_phase(Input.PROBED, now):
            self._execute(
                _Step.LOAD,
                [(b"SCRIPT", b"LOAD", script_source(name, sharded)) for name in SCRIPTS]
                + [VERSION_PROBE],  # its run_id: a new one is a Redis whose data may be older
            )

    def _loaded(self, replies: list[object], now: float) -> None:
        if not self._check(replies, now):
            return
        shas: dict[str, bytes] = {}
        # In a Redis Cluster each shard is its own run, and the INFO answered is one
        # node's: the epochs are then tied to no run (a seq key lost starts one over).
        self._run = "" if self.address.cluster else run_id_from_info(replies[-1])
        for name, sha in zip(SCRIPTS, replies[:-1], strict=True):
            if not isinstance(sha, bytes):
                self._fail(f"unreadable SCRIPT LOAD reply {sha!r:.80}", now)
                return
            shas[name] = sha
        self._scripts = shas
        if self._set_phase(Input.LOADED, now):
            self._commands.append(OpenLink(Link.SUBSCRIBER, self.address, self.connect_timeout))

    def _online(self, now: float) -> None:
        stats = self.statistics
        stats.connects += 1
        stats.online = True
        self._online_since = now
        self._setup_deadline = None
        self._keepalive_at = now + self.keepalive
        self._refresh_at = now + self._period
        self._reread_at = now + self.presence_ttl
        # The control channel, listened to for the whole session (its confirmation
        # is not waited for: a command sent before it is only of the server API).
        self._batch += 1
        self._commands.append(
            Listen(self._batch, b"SSUBSCRIBE" if self.sharded else b"SUBSCRIBE", (self._control,))
        )
        log.info(
            "redis backplane connected as node %s (%s pub/sub)",
            self.node_id,
            "sharded" if self.sharded else "classic",
        )
        self._events.append(BackplaneRestored())

    def _online_timers(self, now: float) -> None:
        if self._keepalive_at is not None and now >= self._keepalive_at:
            if self._ping_batch != -1 or self._ping_command_due:
                if now - self._keepalive_at <= self.keepalive / 2:
                    self._fail(f"Redis did not answer a PING within {self.keepalive:g}s", now)
                    return
                # Called this late, this node was the one stalled (its answer may be
                # waiting unread): one more round before Redis is taken for lost.
                self._keepalive_at = now + self.keepalive
            else:
                self._keepalive_at = now + self.keepalive
                self._batch += 1
                self._ping_batch = self._batch
                self._commands.append(Ping(self._batch))
                self._ping_command_due = True
                self._work.appendleft(_Commands([_KEEPALIVE_PING], ping=True))
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = now + self._period
            local = self._local_presence()
            commands: list[tuple[Arg, ...]] = [
                refresh_command(
                    room,
                    users,
                    prefix=self.prefix,
                    node=self.node_id,
                    shas=self._scripts,
                    lifetime=self._lifetime,
                    position_ms=self._position_ms,
                )
                for room, users in local
            ]
            # This node's entry in the node list, and its rooms in the room index.
            commands.append(self._touch(room for room, _ in local))
            self._work.append(_Commands(list(commands)))
        if self._reread_at is not None and now >= self._reread_at:
            # Read every room's presence again a presence TTL after connecting: by then
            # the other nodes, reconnecting at their own pace, have re-announced their
            # users if Redis expired their entries or lost its data meanwhile, and the
            # broker settles who really is there (it kept everyone meanwhile).
            self._reread_at = None
            # A read of its own, also for a room whose first read is still queued: a
            # run of Subscribes is one read per room, and the barrier (no commands)
            # ends the run before these. The broker leaves SETTLING on the later one.
            self._work.append(_Commands([]))
            self._work.extend(
                Subscribe(room=room, gen=gen) for room, gen in sorted(self._wanted.items())
            )
        if self._step is None and self._work:
            self._next_batch(now)

    # -- the work -------------------------------------------------------------------------

    def _execute(self, step: _Step, commands: list[tuple[Arg, ...]]) -> None:
        self._batch += 1
        self._step = step
        self._step_batch = self._batch
        self._step_expected = len(commands)
        self._commands.append(Execute(self._batch, tuple(commands)))

    def _next_batch(self, now: float) -> None:
        """Send the next batch of queued work (nothing may be in flight)."""
        work = self._work
        while work and self._step is None:
            # Up to the next Subscribe: every command in one pipeline (in order), and the
            # rooms no longer wanted in one Unlisten (its order does not matter: it only
            # stops records coming).
            batch: list[tuple[Arg, ...]] = []
            answers: list[tuple[int, Relay | ReadStream | ReadCluster]] = []
            gone: set[str] = set()
            pings = False
            while work and not isinstance(work[0], Subscribe):
                action = work.popleft()
                if isinstance(action, Relay):
                    self.statistics.relayed += 1
                    if action.dedup is not None or action.answer:
                        answers.append((len(batch), action))
                    batch.append(self._command(action))
                elif isinstance(action, ReadStream):
                    answers.append((len(batch), action))
                    batch.append(self._command(action))
                elif isinstance(action, Announce):
                    batch.append(self._command(action))
                    if action.present:  # listed in the room index at once
                        batch.append(self._touch((action.room,)))
                elif isinstance(action, ReadCluster):
                    answers.append((len(batch), action))
                    batch.append(
                        cluster_read_command(
                            action, prefix=self.prefix, shas=self._scripts, lifetime=self._lifetime
                        )
                    )
                elif isinstance(action, Control):
                    data = encode_control(self.node_id, action.command)
                    batch.append(control_command(self.prefix, data, sharded=self.sharded))
                elif isinstance(action, _Commands):
                    batch.extend(action.commands)
                    pings = pings or action.ping
                elif isinstance(action, Unsubscribe) and action.room not in self._wanted:
                    gone.add(channel(self.prefix, action.room))
            if gone:
                self._commands.append(
                    Unlisten(
                        b"SUNSUBSCRIBE" if self.sharded else b"UNSUBSCRIBE",
                        tuple(c.encode() for c in sorted(gone)),
                    )
                )
            if batch:
                self._execute(_Step.WORK, batch)
                self._step_pings = pings
                self._step_answers = answers
                return
            rooms: dict[RoomName, int] = {}  # the latest listening of each room
            while work and isinstance(work[0], Subscribe):
                subscribe = work.popleft()
                assert isinstance(subscribe, Subscribe)
                rooms[subscribe.room] = subscribe.gen
            if rooms:
                self._batch += 1
                self._step = _Step.LISTEN
                self._step_batch = self._batch
                self._step_rooms = rooms
                self._commands.append(
                    Listen(
                        self._batch,
                        b"SSUBSCRIBE" if self.sharded else b"SUBSCRIBE",
                        tuple(channel(self.prefix, room).encode() for room in rooms),
                    )
                )
                return
        if self._stopping and self.idle and self.phase is Phase.ONLINE:
            self._set_phase(Input.STOP, now)

    def _answer(self, replies: list[object], now: float) -> bool:
        """The broker's answers among a work batch's replies (False: unreadable)."""
        answers, self._step_answers = self._step_answers, []
        events: list[Event] = []
        for index, action in answers:
            try:
                if isinstance(action, Relay):
                    events.append(parse_relayed(action, replies[index]))
                elif isinstance(action, ReadCluster):
                    events.append(parse_cluster_read(action, replies[index]))
                else:
                    events.append(parse_read(action, replies[index]))
            except ValueError as exc:
                self._fail(str(exc), now)
                return False
        self._events.extend(events)
        return True

    def _touch(self, rooms: Iterable[str]) -> tuple[Arg, ...]:
        return touch_command(
            rooms,
            prefix=self.prefix,
            node=self.node_id,
            shas=self._scripts,
            lifetime=self._lifetime,
        )

    def _command(self, action: Relay | Announce | ReadStream) -> tuple[Arg, ...]:
        return command_for(
            action,
            prefix=self.prefix,
            node=self.node_id,
            shas=self._scripts,
            lifetime=self._lifetime,
            run=self._run,
        )

    def _check(self, replies: list[object], now: float) -> bool:
        """
        An error reply (scripts flushed, a read-only replica, out of memory) ends the
        session: the broker then serves locally and delivers what it had relayed,
        rather than wait for records that will never come; reconnecting reloads the
        scripts.
        """
        errors = [reply for reply in replies if isinstance(reply, RedisError)]
        if not errors:
            return True
        self.statistics.errors += len(errors)
        self._fail(f"error reply: {errors[0]}", now)
        return False

    def _synced(self, replies: list[object], now: float) -> None:
        if not self._check(replies, now):
            return
        events: list[Event] = []
        for (room, gen), reply in zip(self._step_rooms.items(), replies, strict=True):
            try:
                events.append(parse_snapshot(room, gen, reply))
            except ValueError as exc:
                self._fail(str(exc), now)
                return
        self._events.extend(events)
        self._next_batch(now)
