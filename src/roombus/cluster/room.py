"""
The broker's view of the other nodes of a cluster: one room's remote presence.

A :class:`ClusterRoom` has a :class:`Phase` (how far its view of the other nodes'
presence can be trusted) and a :class:`Lifetime` (whether the node still needs it).
Both change only in :meth:`ClusterRoom.step`, by the one table :data:`ROOM_TABLE`,
which also names the :class:`Effect` the broker carries out. docs/scaling.md shows the
table (a test checks it against this one).

The records the nodes exchange (and their format) are in :mod:`roombus.cluster.records`.
Nothing here does I/O: the backplane driver publishes and reads the records.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final

import attrs

from ..core.broker import Resume
from ..core.errors import LocalProtocolError
from ..core.names import Username, is_token
from .records import ChatRecord, PresenceRecord

#: Records of a room that may wait for its snapshot before it must be read again.
MAX_BUFFERED: Final = 10_000


def is_valid_node_id(node: object) -> bool:
    """A node id is 1 to 64 characters from ``A-Z a-z 0-9 _ . : -``."""
    return is_token(node)


class Phase(enum.Enum):
    """How a node sees a room's presence on the other nodes."""

    #: Just made: told the link's state next (LINK_LOST or LINK_RESTORED).
    NEW = "new"
    #: The backplane is down: the room is served locally, no Subscribe pending.
    OFFLINE = "offline"
    #: Subscribe asked, snapshot awaited: records are buffered, joiners wait.
    SYNCING = "syncing"
    #: The buffer overflowed while syncing: apply the coming snapshot, then read again.
    LOSSY = "lossy"
    #: Remote presence is a snapshot and every record since.
    LIVE = "live"
    #: Live, but read after an outage, with who was there kept: the other nodes may
    #: not have re-announced their users yet (Redis expired their entries meanwhile,
    #: or lost its data). Expiries wait for the settling read (a presence TTL after
    #: connecting, which makes the room LIVE); a stale answer asks again.
    SETTLING = "settling"


class Lifetime(enum.Enum):
    """Whether the node still needs the room."""

    #: Someone here is in the room or joining it.
    HELD = "held"
    #: No one here any more, but messages of this node are still on their way back.
    DRAINING = "draining"


class RoomInput(enum.Enum):
    """What happens to a room, as the broker tells :meth:`ClusterRoom.step`."""

    LINK_LOST = "link lost"
    LINK_RESTORED = "link restored"
    #: A presence record with no gap (its version at most one past the known one).
    RECORD = "record"
    #: A presence record past a gap (a record lost on the way).
    RECORD_GAP = "record with a gap"
    BUFFER_FULL = "buffer full"
    #: A snapshot at or past the known version.
    SNAPSHOT = "snapshot"
    #: A snapshot below the known version (read before records already applied).
    SNAPSHOT_STALE = "stale snapshot"
    #: The first snapshot since the link was lost (Redis may have expired the other
    #: nodes' entries, or lost its data).
    SNAPSHOT_AFTER_OUTAGE = "snapshot after an outage"
    #: The snapshot of a LOSSY room was applied: read the presence again.
    REREAD = "reread"
    #: A connection is allowed in.
    JOIN = "join"
    FIRST_INTEREST = "first interest"
    #: No one here is in the room or joining it, and no message of this node is out.
    LAST_INTEREST = "last interest"
    #: No one here is in the room or joining it; messages of this node are out.
    LAST_INTEREST_BUSY = "last interest, outbox busy"
    #: The last of this node's messages out came back (or the link was lost).
    OUTBOX_DRAINED = "outbox drained"


class Effect(enum.Enum):
    """What the broker does for a step (each effect is carried out in one place)."""

    NOTHING = "nothing"
    #: Answers of a lost link: dropped.
    IGNORE = "ignore"
    SUBSCRIBE = "subscribe"
    #: Keep the record until the snapshot arrives.
    BUFFER = "buffer"
    #: Drop the buffered records.
    CLEAR_BUFFER = "clear buffer"
    #: Apply the record to the remote presence; tell members of a change.
    APPLY = "apply"
    #: Count a presence gap, buffer the record, Subscribe again.
    RESYNC = "resync"
    #: Remote presence := the snapshot (into SETTLING: joined with what was known);
    #: announce the difference; apply the buffered records; join the waiting.
    ADOPT = "adopt"
    #: As ADOPT, then REREAD instead of joining.
    ADOPT_REREAD = "adopt, reread"
    #: Deliver the outbox here, join the waiting, publish what they sent.
    FALL_BACK = "fall back"
    #: Make the connection wait for the snapshot.
    PEND = "pend"
    #: Join the connection now.
    ENTER = "enter"
    #: Forget the room (Unsubscribe if online).
    REMOVE = "remove"


_P = Phase
_L = Lifetime
_I = RoomInput
_E = Effect
_Key = tuple[Phase | Lifetime, RoomInput]
_Row = tuple[Effect, Phase | Lifetime | None]

#: ``(state, input) -> (effect, next state)``; next None: the room is removed. A
#: phase input is looked up by the room's phase, a lifetime input by its lifetime.
#: docs/scaling.md shows it (tests/cluster/test_room.py checks both).
ROOM_TABLE: Final[dict[_Key, _Row]] = {
    # -- the link: a new room is told its state; every room when it changes --------------
    (_P.NEW, _I.LINK_LOST): (_E.NOTHING, _P.OFFLINE),
    (_P.NEW, _I.LINK_RESTORED): (_E.SUBSCRIBE, _P.SYNCING),
    (_P.OFFLINE, _I.LINK_LOST): (_E.FALL_BACK, _P.OFFLINE),
    (_P.SYNCING, _I.LINK_LOST): (_E.FALL_BACK, _P.OFFLINE),
    (_P.LOSSY, _I.LINK_LOST): (_E.FALL_BACK, _P.OFFLINE),
    (_P.LIVE, _I.LINK_LOST): (_E.FALL_BACK, _P.OFFLINE),
    (_P.SETTLING, _I.LINK_LOST): (_E.FALL_BACK, _P.OFFLINE),
    (_P.OFFLINE, _I.LINK_RESTORED): (_E.SUBSCRIBE, _P.SYNCING),
    # told again while connected: ask again, the view stays
    (_P.SYNCING, _I.LINK_RESTORED): (_E.SUBSCRIBE, _P.SYNCING),
    (_P.LOSSY, _I.LINK_RESTORED): (_E.SUBSCRIBE, _P.LOSSY),
    (_P.LIVE, _I.LINK_RESTORED): (_E.SUBSCRIBE, _P.LIVE),
    (_P.SETTLING, _I.LINK_RESTORED): (_E.SUBSCRIBE, _P.SETTLING),
    # -- presence records -----------------------------------------------------------------
    (_P.OFFLINE, _I.RECORD): (_E.IGNORE, _P.OFFLINE),
    (_P.OFFLINE, _I.RECORD_GAP): (_E.IGNORE, _P.OFFLINE),
    (_P.SYNCING, _I.RECORD): (_E.BUFFER, _P.SYNCING),
    (_P.SYNCING, _I.RECORD_GAP): (_E.BUFFER, _P.SYNCING),
    (_P.LOSSY, _I.RECORD): (_E.BUFFER, _P.LOSSY),
    (_P.LOSSY, _I.RECORD_GAP): (_E.BUFFER, _P.LOSSY),
    (_P.LIVE, _I.RECORD): (_E.APPLY, _P.LIVE),
    (_P.LIVE, _I.RECORD_GAP): (_E.RESYNC, _P.SYNCING),
    (_P.SETTLING, _I.RECORD): (_E.APPLY, _P.SETTLING),
    (_P.SETTLING, _I.RECORD_GAP): (_E.RESYNC, _P.SYNCING),
    (_P.SYNCING, _I.BUFFER_FULL): (_E.CLEAR_BUFFER, _P.LOSSY),
    (_P.LOSSY, _I.BUFFER_FULL): (_E.CLEAR_BUFFER, _P.LOSSY),
    # -- snapshots --------------------------------------------------------------------------
    (_P.OFFLINE, _I.SNAPSHOT): (_E.IGNORE, _P.OFFLINE),
    (_P.OFFLINE, _I.SNAPSHOT_STALE): (_E.IGNORE, _P.OFFLINE),
    (_P.OFFLINE, _I.SNAPSHOT_AFTER_OUTAGE): (_E.IGNORE, _P.OFFLINE),
    (_P.SYNCING, _I.SNAPSHOT_STALE): (_E.NOTHING, _P.SYNCING),
    (_P.LOSSY, _I.SNAPSHOT_STALE): (_E.NOTHING, _P.LOSSY),
    (_P.LIVE, _I.SNAPSHOT_STALE): (_E.NOTHING, _P.LIVE),
    (_P.SETTLING, _I.SNAPSHOT_STALE): (_E.SUBSCRIBE, _P.SETTLING),
    (_P.SYNCING, _I.SNAPSHOT): (_E.ADOPT, _P.LIVE),
    (_P.SYNCING, _I.SNAPSHOT_AFTER_OUTAGE): (_E.ADOPT, _P.SETTLING),
    (_P.LOSSY, _I.SNAPSHOT): (_E.ADOPT_REREAD, _P.LIVE),
    (_P.LOSSY, _I.SNAPSHOT_AFTER_OUTAGE): (_E.ADOPT_REREAD, _P.SETTLING),
    (_P.LIVE, _I.SNAPSHOT): (_E.ADOPT, _P.LIVE),
    (_P.SETTLING, _I.SNAPSHOT): (_E.ADOPT, _P.LIVE),
    (_P.SYNCING, _I.REREAD): (_E.NOTHING, _P.SYNCING),  # a gap asked again already
    (_P.LIVE, _I.REREAD): (_E.SUBSCRIBE, _P.SYNCING),
    (_P.SETTLING, _I.REREAD): (_E.SUBSCRIBE, _P.SYNCING),
    # -- joiners ----------------------------------------------------------------------------
    (_P.OFFLINE, _I.JOIN): (_E.ENTER, _P.OFFLINE),
    (_P.SYNCING, _I.JOIN): (_E.PEND, _P.SYNCING),
    (_P.LOSSY, _I.JOIN): (_E.PEND, _P.LOSSY),
    (_P.LIVE, _I.JOIN): (_E.ENTER, _P.LIVE),
    (_P.SETTLING, _I.JOIN): (_E.ENTER, _P.SETTLING),
    # -- the lifetime -----------------------------------------------------------------------
    (_L.HELD, _I.FIRST_INTEREST): (_E.NOTHING, _L.HELD),
    (_L.DRAINING, _I.FIRST_INTEREST): (_E.NOTHING, _L.HELD),
    (_L.HELD, _I.LAST_INTEREST): (_E.REMOVE, None),
    (_L.HELD, _I.LAST_INTEREST_BUSY): (_E.NOTHING, _L.DRAINING),
    (_L.DRAINING, _I.OUTBOX_DRAINED): (_E.REMOVE, None),
}

#: The inputs looked up by a room's lifetime; the others by its phase.
LIFETIME_INPUTS: Final = frozenset(
    {_I.FIRST_INTEREST, _I.LAST_INTEREST, _I.LAST_INTEREST_BUSY, _I.OUTBOX_DRAINED}
)


@attrs.define
class Resuming:
    """
    A member that joined with a position, until its replay has caught up with the
    records this node delivers.

    Attributes:
        resume: The position it named.
        ticket: The read of the stream in flight for it (0: answered).
        held: ``(seq, payload)`` of the chats delivered to the others meanwhile.
        floor: After the answer: records up to this seq were in its replay.
    """

    resume: Resume
    ticket: int = 0
    held: list[tuple[int, bytes]] = attrs.field(factory=list)
    floor: int = 0


@attrs.define
class ClusterRoom:
    """
    One room as seen by a node of a cluster, kept while the node listens to it (it has
    local members, or connections waiting to join).

    Attributes:
        phase: How far :attr:`remote` can be trusted (see :class:`Phase`).
        lifetime: Whether the node still needs the room (see :class:`Lifetime`).
        remote: The users present on other nodes, and on which.
        version: The last presence record applied (or the snapshot's).
        epoch: The epoch of the room's stream in Redis, as last seen ("": not yet).
        seq: The last chat ``seq`` of *epoch* delivered here.
        local: Numbering the room's messages on its own (in an epoch of this node's)
            since the link was lost, until the cluster's numbering is seen again.
        pending: Connections waiting for the snapshot to join, with their rights: a
            connection is joining the room exactly while it is a key here.
        buffer: Presence records that arrived before the snapshot.
        outbox: ``(ref, username, content, timestamp)`` of this node's relayed
            messages not yet back from the backplane.
        lost_version: The version known when the backplane was lost (0: the room was
            not followed through an outage): its first snapshot after reconnecting
            keeps who was there (SETTLING).
        gen: This listening's number (see :class:`~roombus.cluster.Subscribe`).
        held: Chat messages of connections waiting to join, published once they
            have: ``(conn, content, timestamp, id)``.
        pending_resume: The positions named by connections in *pending*.
        positioned: Members that joined with a position: told ``reset`` when the
            numbering they follow restarts.
        resuming: Members whose replay is being read or is catching up.
        repair: The read of the stream repairing a gap in flight (0: none).
        waiting: Chat records that arrived during the repair, in order.
    """

    phase: Phase = Phase.NEW
    lifetime: Lifetime = Lifetime.HELD
    remote: dict[Username, set[str]] = attrs.field(factory=dict)
    version: int = 0
    epoch: str = ""
    seq: int = 0
    local: bool = False
    # Epochs the room's stream left while this node followed it (Redis never goes
    # back to one: what still comes of them was on its way), the latest few.
    left: tuple[str, ...] = ()
    pending: dict[int, int] = attrs.field(factory=dict)
    buffer: list[PresenceRecord] = attrs.field(factory=list)
    outbox: deque[tuple[int, Username, object, int]] = attrs.field(factory=deque)
    lost_version: int = 0
    gen: int = 0
    held: list[tuple[int, object, int, str | None]] = attrs.field(factory=list)
    pending_resume: dict[int, Resume] = attrs.field(factory=dict)
    positioned: set[int] = attrs.field(factory=set)
    resuming: dict[int, Resuming] = attrs.field(factory=dict)
    repair: int = 0
    waiting: list[ChatRecord] = attrs.field(factory=list)

    def step(self, inp: RoomInput) -> Effect:
        """
        Take *inp* by :data:`ROOM_TABLE`: move to the next phase or lifetime, and
        return what the broker must do (:attr:`Effect.REMOVE`: forget the room).

        Raises:
            LocalProtocolError: if the table has no row for the room's state and
                *inp* (a driver or broker bug).
        """
        state: Phase | Lifetime = self.lifetime if inp in LIFETIME_INPUTS else self.phase
        row = ROOM_TABLE.get((state, inp))
        if row is None:
            raise LocalProtocolError(f"a cluster room in {state.name} cannot take {inp.name}")
        effect, new = row
        if isinstance(new, Phase):
            self.phase = new
        elif isinstance(new, Lifetime):
            self.lifetime = new
        return effect

    def buffered(self, record: PresenceRecord) -> None:
        """Keep *record* until the snapshot arrives (bounded: past it, read again)."""
        if len(self.buffer) >= MAX_BUFFERED:
            self.step(RoomInput.BUFFER_FULL)
            self.buffer.clear()
        self.buffer.append(record)

    def apply(self, record: PresenceRecord, own: str) -> bool:
        """
        Apply a presence record of another node to :attr:`remote`.

        Returns:
            Whether it was news (newer than what is known). Records of node *own*
            move the version only: local presence is known first-hand; so do
            expiries while SETTLING.
        """
        if record.version <= self.version:
            return False
        self.version = record.version
        if record.node == own:
            return True
        if record.expired and self.phase is Phase.SETTLING:
            # After an outage every node's entries may have expired before its node
            # could renew them: the settling read tells who really is gone.
            return True
        nodes = self.remote.get(record.username)
        if record.present:
            if nodes is None:
                self.remote[record.username] = {record.node}
            else:
                nodes.add(record.node)
        elif nodes is not None:
            nodes.discard(record.node)
            if not nodes:
                del self.remote[record.username]
        return True


def render_room_table() -> str:
    """The cluster room table of docs/scaling.md, from :data:`ROOM_TABLE`."""
    lines = ["| state | input | effect | next |", "| --- | --- | --- | --- |"]
    for (state, inp), (effect, new) in ROOM_TABLE.items():
        after = "removed" if new is None else new.name
        lines.append(f"| {state.name} | {inp.value} | {effect.value} | {after} |")
    return "\n".join(lines)
