"""
Room streams: each room's position (an epoch and a seq), its recent history, and the
acknowledgements of idempotent publishes, as pure logic.

A room's stream outlives its members: its epoch and seq are kept for
``position_ttl`` seconds after the room's last publish or last member's leave, and
each message for
``history_ttl`` seconds, so a client that reconnects can name the last position it
saw and be sent what it missed, or told exactly what it cannot be sent
(:func:`plan_recovery`, the one home of that decision).

:class:`MemoryStreams` keeps streams in the memory of one node, bounded per room
(messages, TTL) and per node (bytes: whole rooms are evicted, least recently active
first). No clock is read: every call takes the driver's monotonic ``now``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import OrderedDict, deque
from itertools import islice
from typing import Final

import attrs

from .names import RoomName, Username
from .tables import worth_shrinking

#: An epoch: 1 to 32 characters of ``A-Z a-z 0-9 _ -``.
EPOCH_PATTERN: Final = "[A-Za-z0-9_-]{1,32}"
_EPOCH_RE = re.compile(EPOCH_PATTERN)
#: Bytes a stored message costs beyond its payload (the entry and its deque slot).
ENTRY_OVERHEAD: Final = 120
#: Bytes a room's stream costs with no history (its name, epoch, counters).
STREAM_OVERHEAD: Final = 256
#: Bytes an acknowledgement kept for deduplication costs beyond its key's text.
ACK_OVERHEAD: Final = 160

# Why a join with a position was not recovered (the protocol's ``reason`` values).
EPOCH_CHANGED: Final = "epoch_changed"
TOO_OLD: Final = "too_old"
OVER_LIMIT: Final = "over_limit"
NO_HISTORY: Final = "no_history"
UNAVAILABLE: Final = "unavailable"
FUTURE_POSITION: Final = "future_position"


def is_valid_epoch(value: object) -> bool:
    """Whether *value* is an epoch: 1 to 32 characters of ``A-Z a-z 0-9 _ -``."""
    return type(value) is str and _EPOCH_RE.fullmatch(value) is not None


@attrs.frozen
class Position:
    """One message of a room, forever: the room's epoch and the message's seq."""

    epoch: str
    seq: int


@attrs.frozen
class Span:
    """The messages ``first..last`` (both included) of one epoch."""

    first: int
    last: int


@attrs.frozen(kw_only=True)
class Recovery:
    """
    What a join with a position gets: the decision of :func:`plan_recovery`.

    Attributes:
        recovered: True if every missed message follows (``replay``), False if not
            (``reason``), None when the join named no position.
        reason: Why not recovered (one of the reason constants), else None.
        lost: The missed messages no longer kept anywhere (``too_old``,
            ``no_history``), else None.
        skipped: Kept messages a partial replay leaves out (more than
            ``recovery_max``), for the client to read with ``history``, else None.
        replay: The messages to send now, else None.
    """

    recovered: bool | None
    reason: str | None = None
    lost: Span | None = None
    skipped: Span | None = None
    replay: Span | None = None


_NOTHING: Final = Recovery(recovered=None)
_CAUGHT_UP: Final = Recovery(recovered=True)


def plan_recovery(
    since: Position | None,
    *,
    epoch: str,
    top: int,
    first_kept: int,
    history: bool,
    recovery_max: int,
    partial: bool,
) -> Recovery:
    """
    Decide what a join with position *since* gets from a stream at *epoch*, *top*.

    Args:
        since: The last position the client saw, or None (none yet).
        epoch: The stream's epoch now.
        top: The seq of the stream's last message (0 before the first).
        first_kept: The seq of the oldest message still kept (``top + 1`` when none is).
        history: Whether the room keeps history at all.
        recovery_max: The most messages one join may be replayed.
        partial: Whether the client asked for what is kept when not all of it is.
    """
    if since is None:
        return _NOTHING
    if since.epoch != epoch:
        return Recovery(recovered=False, reason=EPOCH_CHANGED)
    n = since.seq
    if n > top:
        return Recovery(recovered=False, reason=FUTURE_POSITION)
    if n == top:
        return _CAUGHT_UP
    if not history:
        return Recovery(recovered=False, reason=NO_HISTORY, lost=Span(n + 1, top))
    if n + 1 < first_kept:
        lost = Span(n + 1, first_kept - 1)
        if not partial or first_kept > top:
            return Recovery(recovered=False, reason=TOO_OLD, lost=lost)
        return _partial(TOO_OLD, lost, first_kept, top, recovery_max)
    if top - n <= recovery_max:
        return Recovery(recovered=True, replay=Span(n + 1, top))
    if not partial:
        return Recovery(recovered=False, reason=OVER_LIMIT)
    return _partial(OVER_LIMIT, None, n + 1, top, recovery_max)


def _partial(reason: str, lost: Span | None, first: int, top: int, most: int) -> Recovery:
    """Replay the latest *most* of ``first..top``; name the rest as skipped."""
    start = max(first, top - most + 1)
    return Recovery(
        recovered=False,
        reason=reason,
        lost=lost,
        skipped=Span(first, start - 1) if start > first else None,
        replay=Span(start, top) if start <= top else None,
    )


@attrs.frozen(kw_only=True)
class Publication:
    """
    What a server-side publish did.

    Attributes:
        delivered: The connections on this node it was delivered to (0 if the room
            has no members here).
        position: Its position in the room's stream, or None in a cluster (Redis
            numbers it on its way; the ``MessagePublished`` notice carries it).
    """

    delivered: int
    position: Position | None


@attrs.frozen(kw_only=True)
class RoomPolicy:
    """How much history one room keeps: ``size`` messages (0: none) for ``ttl`` seconds."""

    size: int
    ttl: float


@attrs.define(eq=False)
class _Stream:
    epoch: str
    policy: RoomPolicy
    top: int = 0
    active: float = 0.0  # the last publish (or creation): the position TTL counts from it
    # (seq, published at, payload), oldest first; () while empty (an empty deque
    # costs 600 bytes, and most positions are kept with no history)
    items: deque[tuple[int, float, bytes]] | tuple[()] = ()
    size: int = STREAM_OVERHEAD  # bytes, as counted against the node's cap
    held: bool = False  # the room has members: its position never expires


@attrs.frozen(kw_only=True)
class Numbered:
    """
    The outcome of :meth:`MemoryStreams.publish`.

    Attributes:
        position: The message's position.
        payload: The envelope to deliver, or None for a duplicate (an ``id`` already
            acknowledged within the dedup window): then nothing is published and
            *position* is the first publish's.
    """

    position: Position
    payload: bytes | None


class MemoryStreams:
    """
    The streams of one node's rooms, in memory.

    Args:
        epoch_prefix: The start of every epoch this object gives out: unique to this
            process (a restart must start new epochs), 1 to 16 epoch characters.
        history_size: Messages kept per room (0: no history).
        history_ttl: Seconds each message is kept.
        position_ttl: Seconds a room's epoch and seq are kept after its last publish.
        max_bytes: Bytes all streams may hold; beyond, the least recently active
            rooms lose their history first, then their positions.
        dedup_window: Seconds an acknowledged ``id`` is remembered.
        overrides: ``(pattern, policy)`` pairs, first match wins: rooms whose name
            matches the shell-style *pattern* keep history by *policy*.
    """

    def __init__(
        self,
        *,
        epoch_prefix: str,
        history_size: int,
        history_ttl: float,
        position_ttl: float,
        max_bytes: int,
        dedup_window: float,
        overrides: tuple[tuple[str, RoomPolicy], ...] = (),
    ) -> None:
        if not (is_valid_epoch(epoch_prefix) and len(epoch_prefix) <= 16):
            raise ValueError(f"epoch prefix must be 1-16 of A-Z a-z 0-9 _ -: {epoch_prefix!r}")
        self._prefix = epoch_prefix
        self._default = RoomPolicy(size=history_size, ttl=history_ttl)
        self._overrides = tuple((re.compile(fnmatch.translate(p)), pol) for p, pol in overrides)
        self._position_ttl = position_ttl
        self._max_bytes = max_bytes
        self._dedup_window = dedup_window
        self._epochs = 0
        # Least recently active first.
        self._streams: OrderedDict[RoomName, _Stream] = OrderedDict()
        # (username, room, id) -> (position, forgotten at); oldest first.
        self._acks: OrderedDict[tuple[Username, RoomName, str], tuple[Position, float]] = (
            OrderedDict()
        )
        self._bytes = 0
        # No position or acknowledgement expires before this instant (a lower bound).
        self._due = math.inf
        self._peak = 0  # most streams since the table was last copied
        self._acks_peak = 0
        self.evicted_rooms = 0  # rooms whose history the byte cap took

    # -- introspection --------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """The bytes counted against ``max_bytes`` now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._streams)

    def policy(self, room: RoomName) -> RoomPolicy:
        """The history policy of *room*: the first override that matches, else the default."""
        for pattern, policy in self._overrides:
            if pattern.match(room):
                return policy
        return self._default

    def position(self, room: RoomName, now: float) -> Position:
        """*room*'s position now (a new stream starts at seq 0 in a new epoch)."""
        self._expire(now)
        s = self._stream(room, now)
        return Position(s.epoch, s.top)

    # -- operations -----------------------------------------------------------------

    def publish(
        self,
        room: RoomName,
        prefix: bytes,
        now: float,
        *,
        dedup: tuple[Username, str] | None = None,
    ) -> Numbered:
        """
        Number a message of *room* and keep it.

        Args:
            prefix: The chat envelope up to its ``seq`` value (``...,"seq":``).
            dedup: ``(username, id)`` of an idempotent publish: if acknowledged within
                the window (in this epoch), the message is not published again.
        """
        epoch, seq, payload = self.number(room, prefix, now, dedup)
        return Numbered(position=Position(epoch, seq), payload=payload)

    def number(
        self,
        room: RoomName,
        prefix: bytes,
        now: float,
        dedup: tuple[Username, str] | None = None,
    ) -> tuple[str, int, bytes | None]:
        """:meth:`publish` as ``(epoch, seq, payload)``: the broker's chat path."""
        if now >= self._due:
            self._expire(now)
        s = self._streams.get(room)
        if s is None:
            s = self._stream(room, now)
        key = None
        if dedup is not None:
            key = (dedup[0], room, dedup[1])
            seen = self._acks.get(key)
            if seen is not None and seen[0].epoch == s.epoch:
                return s.epoch, seen[0].seq, None
        seq = s.top = s.top + 1
        s.active = now
        self._streams.move_to_end(room)
        payload = b"%b%d}" % (prefix, seq)
        size = s.policy.size
        if size:
            items = s.items
            if not items:
                items = s.items = deque()
            items.append((seq, now, payload))
            cost = len(payload) + ENTRY_OVERHEAD
            if len(items) > size:
                cost -= len(items.popleft()[2]) + ENTRY_OVERHEAD
            s.size += cost
            self._bytes += cost
        if key is not None:
            old = self._acks.pop(key, None)
            if old is None:
                self._bytes += ACK_OVERHEAD + len(key[0]) + len(key[2])
            until = now + self._dedup_window
            self._acks[key] = (Position(s.epoch, seq), until)
            self._acks_peak = max(self._acks_peak, len(self._acks))
            if until < self._due:
                self._due = until
        if self._bytes > self._max_bytes:
            self._evict(keep=room)
        return s.epoch, seq, payload

    def acknowledged(self, room: RoomName, username: Username, msg_id: str) -> Position | None:
        """The position of *username*'s message *msg_id* to *room*, while it is
        remembered (within the dedup window) and the room's epoch is still its own."""
        seen = self._acks.get((username, room, msg_id))
        s = self._streams.get(room)
        if seen is None or s is None or seen[0].epoch != s.epoch:
            return None
        return seen[0]

    def recover(
        self,
        room: RoomName,
        since: Position | None,
        now: float,
        *,
        recovery_max: int,
        partial: bool,
        max_bytes: int | None = None,
    ) -> tuple[Position, Recovery, list[bytes]]:
        """
        What a join of *room* with position *since* gets: the room's position, the
        decision, and the payloads to replay (oldest first).

        Args:
            recovery_max: The most messages one join may be replayed.
            max_bytes: The most bytes of payloads one join may be replayed (None: no
                bound): the latest kept messages that fit bound ``recovery_max`` too.
        """
        self._expire(now)
        s = self._stream(room, now)
        self._trim(s, now)
        first_kept = s.items[0][0] if s.items else s.top + 1
        most = recovery_max
        if max_bytes is not None and s.items:
            fit = 0
            for _, _, payload in reversed(s.items):
                max_bytes -= len(payload)
                if max_bytes < 0 or fit >= most:
                    break
                fit += 1
            most = fit
        plan = plan_recovery(
            since,
            epoch=s.epoch,
            top=s.top,
            first_kept=first_kept,
            history=s.policy.size > 0,
            recovery_max=most,
            partial=partial,
        )
        items = self._range(s, plan.replay) if plan.replay is not None else []
        return Position(s.epoch, s.top), plan, items

    def history(
        self,
        room: RoomName,
        since: Position | None,
        limit: int,
        now: float,
        max_bytes: int | None = None,
    ) -> tuple[Position, list[bytes]]:
        """
        Up to *limit* kept messages of *room* after *since* (the latest *limit* when
        *since* is None or of another epoch), oldest first, and the room's position.
        With *max_bytes*, fewer if their payloads would take more (after *since*: the
        first that fit; else the latest that fit; at least one if any).
        """
        self._expire(now)
        s = self._stream(room, now)
        self._trim(s, now)
        items = s.items
        if limit <= 0 or not items:
            return Position(s.epoch, s.top), []
        budget = max_bytes if max_bytes is not None else -1
        chosen: list[bytes] = []
        if since is None or since.epoch != s.epoch:
            for _, _, payload in reversed(items):
                if len(chosen) >= limit or (budget >= 0 and chosen and len(payload) > budget):
                    break
                chosen.append(payload)
                budget -= len(payload)
            chosen.reverse()
        else:
            start = max(since.seq + 1 - items[0][0], 0)
            for _, _, payload in islice(items, start, None):
                if len(chosen) >= limit or (budget >= 0 and chosen and len(payload) > budget):
                    break
                chosen.append(payload)
                budget -= len(payload)
        return Position(s.epoch, s.top), chosen

    def restart(self, room: RoomName, top: int, now: float) -> Position:
        """
        Start *room*'s stream over in a new epoch at seq *top*, its history dropped: a
        node of a cluster cut off from the cluster's numbering numbers on its own.
        """
        self._expire(now)
        old = self._streams.pop(room, None)
        if old is not None:
            self._bytes -= old.size
        s = self._stream(room, now)
        s.top = top
        s.held = old is not None and old.held
        return Position(s.epoch, s.top)

    def hold(self, room: RoomName, now: float) -> None:
        """*room* has members now: its position is kept however long it stays quiet."""
        self._expire(now)
        self._stream(room, now).held = True

    def release(self, room: RoomName, now: float) -> None:
        """*room*'s last member left: its position TTL counts from now."""
        self._expire(now)
        s = self._streams.get(room)
        if s is not None:
            s.held = False
            s.active = now
            self._streams.move_to_end(room)

    # -- internals ------------------------------------------------------------------

    def _stream(self, room: RoomName, now: float) -> _Stream:
        s = self._streams.get(room)
        if s is None:
            self._epochs += 1
            s = _Stream(
                epoch=f"{self._prefix}-{self._epochs:x}",  # <= 16 + 1 + 15 characters
                policy=self.policy(room),
                active=now,
            )
            self._streams[room] = s
            self._bytes += STREAM_OVERHEAD
            if self._bytes > self._max_bytes:
                self._evict(keep=room)
            if now + self._position_ttl < self._due:
                self._due = now + self._position_ttl
            self._peak = max(self._peak, len(self._streams))
        return s

    def _range(self, s: _Stream, span: Span) -> list[bytes]:
        items = s.items
        assert isinstance(items, deque)
        start = span.first - items[0][0]
        chosen = islice(items, start, start + span.last - span.first + 1)
        return [payload for _, _, payload in chosen]

    def _drop_oldest(self, s: _Stream) -> None:
        items = s.items
        assert items
        _, _, payload = items.popleft()
        if not items:
            s.items = ()
        cost = len(payload) + ENTRY_OVERHEAD
        s.size -= cost
        self._bytes -= cost

    def _trim(self, s: _Stream, now: float) -> None:
        """Drop *s*'s messages older than its TTL."""
        horizon = now - s.policy.ttl
        items = s.items
        while items and items[0][1] <= horizon:
            self._drop_oldest(s)

    def _expire(self, now: float) -> None:
        """Forget positions past their TTL and acknowledgements past the window."""
        streams = self._streams
        horizon = now - self._position_ttl
        while streams:
            room, s = next(iter(streams.items()))
            if s.active > horizon:
                break
            if s.held:  # still has members: counts as active now
                s.active = now
                streams.move_to_end(room)
                continue
            del streams[room]
            self._bytes -= s.size
        acks = self._acks
        while acks:
            key, (_, until) = next(iter(acks.items()))
            if until > now:
                break
            del acks[key]
            self._bytes -= ACK_OVERHEAD + len(key[0]) + len(key[2])
        due = math.inf
        if streams:
            due = next(iter(streams.values())).active + self._position_ttl
        if acks:
            due = min(due, next(iter(acks.values()))[1])
        self._due = due
        self._shrink()

    def _shrink(self) -> None:
        """After many streams or acknowledgements went: copy their tables smaller."""
        if worth_shrinking(len(self._streams), self._peak):
            self._streams = OrderedDict(self._streams)
            self._peak = len(self._streams)
        if worth_shrinking(len(self._acks), self._acks_peak):
            self._acks = OrderedDict(self._acks)
            self._acks_peak = len(self._acks)

    def _evict(self, *, keep: RoomName) -> None:
        """
        Over the byte cap, least recently active first: the positions of empty rooms
        that never had a message (nothing to lose but the epoch), then
        acknowledgements, oldest first, then the history of rooms other than *keep*
        (their old positions are then ``too_old``), then *keep*'s but its newest
        message, then the positions of empty rooms (a join with one is then told
        ``epoch_changed``). Rooms with members keep their positions. It frees down to
        7/8 of the cap, so that the next publishes do not each scan the rooms again.
        """
        target = self._max_bytes - self._max_bytes // 8
        streams = self._streams
        for room, s in list(streams.items()):
            if self._bytes <= target:
                return
            if room != keep and not s.held and not s.top:
                del streams[room]
                self._bytes -= s.size
        acks = self._acks
        while self._bytes > target and acks:
            key, _ = acks.popitem(last=False)
            self._bytes -= ACK_OVERHEAD + len(key[0]) + len(key[2])
        for room, s in streams.items():
            if self._bytes <= target:
                return
            if room != keep and s.items:
                while s.items:
                    self._drop_oldest(s)
                self.evicted_rooms += 1
        k = streams[keep]
        while len(k.items) > 1 and self._bytes > target:
            self._drop_oldest(k)
        for room, s in list(streams.items()):
            if self._bytes <= target:
                return
            if room != keep and not s.held:
                del streams[room]
                self._bytes -= s.size
