"""
Room streams (roombus.core.streams): the recovery decision and the in-memory store.

``plan_recovery`` is checked for what it promises on every input: the missed range
``N+1..T`` is exactly covered by what it replays, names as lost and names as skipped,
never a silent gap. ``MemoryStreams`` is run against a model that keeps every message
ever published: what it replays is exactly what was published at those positions, an
epoch never names two different messages with one seq, and with room in the byte cap
it keeps exactly the latest ``history_size`` messages younger than ``history_ttl``.
"""

from __future__ import annotations

import attrs
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from roombus.core.names import RoomName, Username
from roombus.core.streams import (
    EPOCH_CHANGED,
    FUTURE_POSITION,
    NO_HISTORY,
    OVER_LIMIT,
    TOO_OLD,
    MemoryStreams,
    Position,
    RoomPolicy,
    Span,
    is_valid_epoch,
    plan_recovery,
)

ROOMS = [RoomName("a"), RoomName("b"), RoomName("tenant-1")]


def seqs(span: Span | None) -> list[int]:
    return [] if span is None else list(range(span.first, span.last + 1))


@given(
    n=st.integers(0, 40),
    top=st.integers(0, 40),
    kept=st.integers(1, 41),
    history=st.booleans(),
    most=st.integers(1, 20),
    partial=st.booleans(),
    same_epoch=st.booleans(),
)
def test_a_recovery_accounts_for_every_missed_message(
    n: int, top: int, kept: int, history: bool, most: int, partial: bool, same_epoch: bool
) -> None:
    first_kept = min(kept, top + 1) if history else top + 1
    plan = plan_recovery(
        Position("e1" if same_epoch else "e0", n),
        epoch="e1",
        top=top,
        first_kept=first_kept,
        history=history,
        recovery_max=most,
        partial=partial,
    )
    if not same_epoch:
        assert plan.reason == EPOCH_CHANGED
        assert (plan.lost, plan.replay, plan.skipped) == (None, None, None)
        return
    if n > top:
        assert plan.reason == FUTURE_POSITION and plan.replay is None
        return
    missed = list(range(n + 1, top + 1))
    if plan.recovered:
        assert seqs(plan.replay) == missed and plan.reason is None
        assert len(missed) <= most
        return
    assert plan.recovered is False and plan.reason is not None
    replayed, lost, skipped = seqs(plan.replay), seqs(plan.lost), seqs(plan.skipped)
    assert len(replayed) <= most
    # Whatever is replayed is kept, and the lost range is exactly what is not kept.
    assert all(s >= first_kept for s in replayed + skipped)
    assert lost == [s for s in missed if s < first_kept or not history]
    if plan.reason == NO_HISTORY:
        assert not history and replayed == [] and lost == missed
    elif plan.reason == TOO_OLD:
        assert lost and lost[0] == n + 1
    else:
        assert plan.reason == OVER_LIMIT and lost == [] and len(missed) > most
    if partial:
        # lost, then skipped, then replayed: the missed range, in order, no overlap.
        assert lost + skipped + replayed == missed if history else lost == missed
    else:
        assert replayed == [] and skipped == []


def test_a_position_of_none_asks_for_nothing() -> None:
    plan = plan_recovery(
        None, epoch="e", top=5, first_kept=1, history=True, recovery_max=10, partial=True
    )
    assert plan.recovered is None and plan.replay is None and plan.reason is None


def test_over_limit_with_partial_replays_the_latest() -> None:
    plan = plan_recovery(
        Position("e", 2),
        epoch="e",
        top=12,
        first_kept=1,
        history=True,
        recovery_max=4,
        partial=True,
    )
    assert (plan.reason, plan.lost) == (OVER_LIMIT, None)
    assert plan.skipped == Span(3, 8) and plan.replay == Span(9, 12)


def test_too_old_wins_over_over_limit() -> None:
    plan = plan_recovery(
        Position("e", 0),
        epoch="e",
        top=50,
        first_kept=30,
        history=True,
        recovery_max=5,
        partial=False,
    )
    assert plan.reason == TOO_OLD and plan.lost == Span(1, 29)


def prefix(room: str, n: int) -> bytes:
    return b'{"type":"chat","content":"m%d","room":"%b","seq":' % (n, room.encode())


def make(**kw: object) -> MemoryStreams:
    args: dict[str, object] = {
        "epoch_prefix": "node1",
        "history_size": 5,
        "history_ttl": 10.0,
        "position_ttl": 30.0,
        "max_bytes": 1 << 30,
        "dedup_window": 20.0,
    }
    args.update(kw)
    return MemoryStreams(**args)  # type: ignore[arg-type]


def test_epochs_are_valid_and_new_per_stream() -> None:
    s = make(epoch_prefix="abcdefghijklmnop")
    e1 = s.position(RoomName("a"), 0.0).epoch
    s.publish(RoomName("a"), prefix("a", 1), 0.0)
    assert s.position(RoomName("a"), 100.0).epoch != e1  # expired, a new stream
    assert is_valid_epoch(e1) and len(e1) <= 32
    assert not is_valid_epoch("x" * 33) and not is_valid_epoch("a b") and not is_valid_epoch(1)


def test_a_held_room_keeps_its_position_however_quiet() -> None:
    s = make()
    room = RoomName("a")
    s.hold(room, 0.0)
    s.publish(room, prefix("a", 1), 0.0)
    epoch = s.position(room, 0.0).epoch
    assert s.position(room, 1000.0) == Position(epoch, 1)
    s.release(room, 1000.0)
    assert s.position(room, 1029.0) == Position(epoch, 1)
    assert s.position(room, 1031.0).epoch != epoch


def test_a_duplicate_id_is_not_published_again_within_the_window() -> None:
    s = make()
    room, ann = RoomName("a"), Username("ann")
    first = s.publish(room, prefix("a", 1), 0.0, dedup=(ann, "x"))
    again = s.publish(room, prefix("a", 1), 5.0, dedup=(ann, "x"))
    assert again.payload is None and again.position == first.position
    other = s.publish(room, prefix("a", 1), 5.0, dedup=(Username("bob"), "x"))
    assert other.payload is not None and other.position.seq == 2
    late = s.publish(room, prefix("a", 1), 20.0, dedup=(ann, "x"))
    assert late.payload is not None and late.position.seq == 3


def test_the_byte_cap_evicts_the_least_recently_active_room_first() -> None:
    s = make(max_bytes=5000, history_size=100, history_ttl=1000.0)
    a, b = RoomName("a"), RoomName("b")
    big = b"x" * 500
    for i in range(4):
        s.publish(a, big + prefix("a", i), float(i))
    for i in range(4):
        s.publish(b, big + prefix("b", i), 10.0 + i)
    assert s.used_bytes <= 5000
    epoch_a = s.position(a, 20.0).epoch
    _, plan, items = s.recover(a, Position(epoch_a, 0), 20.0, recovery_max=10, partial=False)
    assert plan.reason == TOO_OLD and plan.lost == Span(1, 4) and items == []
    _, plan, items = s.recover(
        b, Position(s.position(b, 20.0).epoch, 0), 20.0, recovery_max=10, partial=False
    )
    assert plan.recovered and len(items) == 4
    assert s.evicted_rooms == 1


def test_a_history_of_one_message_is_a_history() -> None:
    s = make(history_size=1)
    room = RoomName("a")
    epoch = s.position(room, 0.0).epoch
    s.publish(room, prefix("a", 1), 0.0)
    s.publish(room, prefix("a", 2), 0.0)
    _, plan, items = s.recover(room, Position(epoch, 1), 0.0, recovery_max=5, partial=False)
    assert plan.recovered and len(items) == 1
    _, plan, _ = s.recover(room, Position(epoch, 0), 0.0, recovery_max=5, partial=False)
    assert (plan.reason, plan.lost) == (TOO_OLD, Span(1, 1))


def test_room_overrides_first_match_wins() -> None:
    s = make(
        overrides=(
            ("tenant-*", RoomPolicy(size=2, ttl=10.0)),
            ("*", RoomPolicy(size=0, ttl=10.0)),
        )
    )
    assert s.policy(RoomName("tenant-7")).size == 2
    assert s.policy(RoomName("lobby")).size == 0


@attrs.define
class ModelRoom:
    epoch: str
    top: int = 0
    active: float = 0.0
    held: bool = False
    # every message of this epoch: seq -> (time, payload)
    messages: dict[int, tuple[float, bytes]] = attrs.field(factory=dict)


class StreamsMachine(RuleBasedStateMachine):
    """MemoryStreams against a model that forgets nothing (the byte cap is large)."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 4
        self.ttl = 6.0
        self.position_ttl = 15.0
        self.s = make(
            history_size=self.size,
            history_ttl=self.ttl,
            position_ttl=self.position_ttl,
            overrides=(("tenant-*", RoomPolicy(size=0, ttl=1.0)),),
        )
        self.now = 0.0
        self.rooms: dict[RoomName, ModelRoom] = {}
        self.seen: dict[tuple[str, int], bytes] = {}  # (epoch, seq) -> payload, forever
        self.positions: list[tuple[RoomName, Position]] = []

    def _model(self, room: RoomName) -> ModelRoom:
        m = self.rooms.get(room)
        if m is not None and not m.held and m.active <= self.now - self.position_ttl:
            m = None  # expired: the next call starts a new epoch
        position = self.s.position(room, self.now)
        if m is None:
            assert all(position.epoch != r.epoch for r in self.rooms.values()), "epoch reused"
            m = self.rooms[room] = ModelRoom(epoch=position.epoch, active=self.now)
        assert position == Position(m.epoch, m.top)
        return m

    def _kept(self, room: RoomName, m: ModelRoom) -> list[int]:
        policy = self.s.policy(room)
        live = [q for q, (t, _) in m.messages.items() if t > self.now - policy.ttl]
        return sorted(live)[-policy.size :] if policy.size else []

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 6.0, 7.0, 16.0]))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule(room=st.sampled_from(ROOMS), key=st.one_of(st.none(), st.sampled_from(["k1", "k2"])))
    def publish(self, room: RoomName, key: str | None) -> None:
        m = self._model(room)
        out = self.s.publish(
            room,
            prefix(room, m.top + 1),
            self.now,
            dedup=None if key is None else (Username("ann"), key),
        )
        if out.payload is None:
            # A duplicate: the first publish of this key, in this epoch, within the window.
            assert out.position.epoch == m.epoch and out.position.seq <= m.top
            return
        m.top += 1
        m.active = self.now
        assert out.position == Position(m.epoch, m.top)
        assert out.payload.endswith(b"%d}" % m.top)
        m.messages[m.top] = (self.now, out.payload)
        self.seen[(m.epoch, m.top)] = out.payload
        self.positions.append((room, out.position))

    @rule(room=st.sampled_from(ROOMS), held=st.booleans())
    def hold_or_release(self, room: RoomName, held: bool) -> None:
        m = self._model(room)
        if held:
            self.s.hold(room, self.now)
        else:
            self.s.release(room, self.now)
            m.active = self.now
        m.held = held

    @precondition(lambda self: self.positions)
    @rule(data=st.data(), partial=st.booleans(), most=st.integers(1, 6))
    def recover(self, data: st.DataObject, partial: bool, most: int) -> None:
        room, since = data.draw(st.sampled_from(self.positions))
        back = data.draw(st.integers(0, 3))
        since = Position(since.epoch, max(since.seq - back, 0))
        m = self._model(room)
        top, plan, items = self.s.recover(room, since, self.now, recovery_max=most, partial=partial)
        note(f"{since} -> {top} {plan}")
        assert top == Position(m.epoch, m.top)
        # Every replayed payload is the message published at that position.
        assert items == [self.seen[(m.epoch, q)] for q in seqs(plan.replay)]
        if since.epoch != m.epoch:
            assert plan.reason == EPOCH_CHANGED
            return
        kept = self._kept(room, m)
        missed = list(range(since.seq + 1, m.top + 1))
        whole = all(q in kept for q in missed) and len(missed) <= most
        assert plan.recovered is (whole and (not missed or self.s.policy(room).size > 0))
        if plan.lost is not None:
            # Exactly the missed messages not kept.
            assert seqs(plan.lost) == [q for q in missed if q not in kept]

    @rule(room=st.sampled_from(ROOMS), limit=st.integers(0, 6), back=st.integers(0, 5))
    def history(self, room: RoomName, limit: int, back: int) -> None:
        m = self._model(room)
        position, items = self.s.history(
            room, Position(m.epoch, max(m.top - back, 0)), limit, self.now
        )
        assert position == Position(m.epoch, m.top)
        kept = [q for q in self._kept(room, m) if q > m.top - back]
        assert items == [m.messages[q][1] for q in kept[:limit]]
        _, latest = self.s.history(room, None, limit, self.now)
        every = self._kept(room, m)
        assert latest == [m.messages[q][1] for q in (every[-limit:] if limit else [])]

    @invariant()
    def bytes_are_counted_exactly(self) -> None:
        # What the cap compares with is exactly what is held (white-box: the tables).
        from roombus.core.streams import ACK_OVERHEAD, ENTRY_OVERHEAD, STREAM_OVERHEAD

        streams = self.s._streams
        for st_ in streams.values():
            assert st_.size == STREAM_OVERHEAD + sum(
                len(p) + ENTRY_OVERHEAD for _, _, p in st_.items
            )
        acks = sum(ACK_OVERHEAD + len(k[0]) + len(k[2]) for k in self.s._acks)
        assert self.s.used_bytes == sum(st_.size for st_ in streams.values()) + acks


TestStreams = StreamsMachine.TestCase


@given(st.lists(st.tuples(st.sampled_from(ROOMS), st.integers(0, 900)), max_size=60))
def test_the_byte_cap_holds_and_replays_stay_truthful(script: list[tuple[RoomName, int]]) -> None:
    cap = 8000
    s = make(max_bytes=cap, history_size=50, history_ttl=1000.0)
    published: dict[tuple[str, int], bytes] = {}
    now = 0.0
    for room, pad in script:
        now += 1.0
        out = s.publish(room, b"x" * pad + prefix(room, 0), now)
        assert out.payload is not None
        published[(out.position.epoch, out.position.seq)] = out.payload
        assert s.used_bytes <= cap
        for other in ROOMS:
            top = s.position(other, now)
            _, plan, items = s.recover(
                other, Position(top.epoch, 0), now, recovery_max=50, partial=True
            )
            assert items == [published[(top.epoch, q)] for q in seqs(plan.replay)]
            # What is not replayed is named: lost, then skipped, then replayed.
            assert seqs(plan.lost) + seqs(plan.skipped) + seqs(plan.replay) == list(
                range(1, top.seq + 1)
            )


def test_positions_of_rooms_never_published_to_go_first_and_the_cap_holds() -> None:
    s = make(max_bytes=20_000, history_size=10, history_ttl=1000.0)
    kept = RoomName("kept")
    s.publish(kept, b"x" * 500 + prefix("kept", 1), 0.0)
    epoch = s.position(kept, 0.0).epoch
    # Join/leave churn over many distinct rooms (positions only) cannot push it out.
    for n in range(500):
        room = RoomName(f"churn-{n}")
        s.hold(room, 1.0)
        s.release(room, 1.0)
        assert s.used_bytes <= 20_000
    _, plan, items = s.recover(kept, Position(epoch, 0), 2.0, recovery_max=10, partial=False)
    assert plan.recovered and len(items) == 1


def test_acknowledgements_go_before_other_rooms_history() -> None:
    s = make(max_bytes=12_000, history_size=10, history_ttl=1000.0, dedup_window=1000.0)
    quiet = RoomName("quiet")
    s.publish(quiet, b"x" * 500 + prefix("quiet", 1), 0.0)
    epoch = s.position(quiet, 0.0).epoch
    busy = RoomName("busy")
    for n in range(200):  # a flood of distinct ids
        s.publish(busy, prefix("busy", n), 1.0, dedup=(Username("flood"), f"id-{n}"))
        assert s.used_bytes <= 12_000
    _, plan, items = s.recover(quiet, Position(epoch, 0), 2.0, recovery_max=10, partial=False)
    assert plan.recovered and len(items) == 1


def test_the_bytes_counted_are_the_bytes_kept_after_acknowledgements_are_evicted() -> None:
    """Evicting acknowledgements to make room subtracts exactly what each one counted:
    ``used_bytes`` stays the sum of the kept messages and acknowledgements."""
    from roombus.core.streams import ACK_OVERHEAD

    s = make(max_bytes=12_000, history_size=10, history_ttl=1000.0, dedup_window=1000.0)
    busy = RoomName("busy")
    for n in range(200):
        s.publish(busy, prefix("busy", n), 1.0, dedup=(Username("flood"), f"id-{n}"))
        kept = sum(stream.size for stream in s._streams.values())
        acks = sum(ACK_OVERHEAD + len(key[0]) + len(key[2]) for key in s._acks)
        assert s.used_bytes == kept + acks
    assert len(s._acks) < 200  # some were evicted


def test_a_replay_is_the_latest_chats_that_fit_its_bytes() -> None:
    s = make(history_size=10)
    room = RoomName("a")
    for n in range(6):
        s.publish(room, prefix("a", n), 0.0)
    epoch = s.position(room, 0.0).epoch
    size = len(s.recover(room, Position(epoch, 5), 0.0, recovery_max=10, partial=True)[2][0])
    for budget, fits in ((size * 2, 2), (size * 2 - 1, 1), (size * 3, 3)):
        _, plan, items = s.recover(
            room, Position(epoch, 0), 0.0, recovery_max=10, partial=True, max_bytes=budget
        )
        assert len(items) == fits and not plan.recovered, budget
        assert (
            items
            == s.recover(room, Position(epoch, 6 - fits), 0.0, recovery_max=10, partial=True)[2]
        )
