"""The cluster room's table (roombus.cluster.room), against rows written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import LocalProtocolError, Username
from roombus.cluster import room as room_module
from roombus.cluster.records import PresenceRecord
from roombus.cluster.room import (
    LIFETIME_INPUTS,
    ROOM_TABLE,
    ClusterRoom,
    Effect,
    Lifetime,
    Phase,
    RoomInput,
    render_room_table,
)

from ..strategies import few_users

ROOT = Path(__file__).resolve().parent.parent.parent

# (state, input) -> (effect, next), by name; written by hand, not from the table.
EXPECTED_ROWS = {
    ("NEW", "LINK_LOST"): ("NOTHING", "OFFLINE"),
    ("NEW", "LINK_RESTORED"): ("SUBSCRIBE", "SYNCING"),
    ("OFFLINE", "LINK_LOST"): ("FALL_BACK", "OFFLINE"),
    ("SYNCING", "LINK_LOST"): ("FALL_BACK", "OFFLINE"),
    ("LOSSY", "LINK_LOST"): ("FALL_BACK", "OFFLINE"),
    ("LIVE", "LINK_LOST"): ("FALL_BACK", "OFFLINE"),
    ("SETTLING", "LINK_LOST"): ("FALL_BACK", "OFFLINE"),
    ("OFFLINE", "LINK_RESTORED"): ("SUBSCRIBE", "SYNCING"),
    ("SYNCING", "LINK_RESTORED"): ("SUBSCRIBE", "SYNCING"),
    ("LOSSY", "LINK_RESTORED"): ("SUBSCRIBE", "LOSSY"),
    ("LIVE", "LINK_RESTORED"): ("SUBSCRIBE", "LIVE"),
    ("SETTLING", "LINK_RESTORED"): ("SUBSCRIBE", "SETTLING"),
    ("OFFLINE", "RECORD"): ("IGNORE", "OFFLINE"),
    ("OFFLINE", "RECORD_GAP"): ("IGNORE", "OFFLINE"),
    ("SYNCING", "RECORD"): ("BUFFER", "SYNCING"),
    ("SYNCING", "RECORD_GAP"): ("BUFFER", "SYNCING"),
    ("LOSSY", "RECORD"): ("BUFFER", "LOSSY"),
    ("LOSSY", "RECORD_GAP"): ("BUFFER", "LOSSY"),
    ("LIVE", "RECORD"): ("APPLY", "LIVE"),
    ("LIVE", "RECORD_GAP"): ("RESYNC", "SYNCING"),
    ("SETTLING", "RECORD"): ("APPLY", "SETTLING"),
    ("SETTLING", "RECORD_GAP"): ("RESYNC", "SYNCING"),
    ("SYNCING", "BUFFER_FULL"): ("CLEAR_BUFFER", "LOSSY"),
    ("LOSSY", "BUFFER_FULL"): ("CLEAR_BUFFER", "LOSSY"),
    ("OFFLINE", "SNAPSHOT"): ("IGNORE", "OFFLINE"),
    ("OFFLINE", "SNAPSHOT_STALE"): ("IGNORE", "OFFLINE"),
    ("OFFLINE", "SNAPSHOT_AFTER_OUTAGE"): ("IGNORE", "OFFLINE"),
    ("SYNCING", "SNAPSHOT_STALE"): ("NOTHING", "SYNCING"),
    ("LOSSY", "SNAPSHOT_STALE"): ("NOTHING", "LOSSY"),
    ("LIVE", "SNAPSHOT_STALE"): ("NOTHING", "LIVE"),
    ("SETTLING", "SNAPSHOT_STALE"): ("SUBSCRIBE", "SETTLING"),
    ("SYNCING", "SNAPSHOT"): ("ADOPT", "LIVE"),
    ("SYNCING", "SNAPSHOT_AFTER_OUTAGE"): ("ADOPT", "SETTLING"),
    ("LOSSY", "SNAPSHOT"): ("ADOPT_REREAD", "LIVE"),
    ("LOSSY", "SNAPSHOT_AFTER_OUTAGE"): ("ADOPT_REREAD", "SETTLING"),
    ("LIVE", "SNAPSHOT"): ("ADOPT", "LIVE"),
    ("SETTLING", "SNAPSHOT"): ("ADOPT", "LIVE"),
    ("SYNCING", "REREAD"): ("NOTHING", "SYNCING"),
    ("LIVE", "REREAD"): ("SUBSCRIBE", "SYNCING"),
    ("SETTLING", "REREAD"): ("SUBSCRIBE", "SYNCING"),
    ("OFFLINE", "JOIN"): ("ENTER", "OFFLINE"),
    ("SYNCING", "JOIN"): ("PEND", "SYNCING"),
    ("LOSSY", "JOIN"): ("PEND", "LOSSY"),
    ("LIVE", "JOIN"): ("ENTER", "LIVE"),
    ("SETTLING", "JOIN"): ("ENTER", "SETTLING"),
    ("HELD", "FIRST_INTEREST"): ("NOTHING", "HELD"),
    ("DRAINING", "FIRST_INTEREST"): ("NOTHING", "HELD"),
    ("HELD", "LAST_INTEREST"): ("REMOVE", "removed"),
    ("HELD", "LAST_INTEREST_BUSY"): ("NOTHING", "DRAINING"),
    ("DRAINING", "OUTBOX_DRAINED"): ("REMOVE", "removed"),
}


def test_the_room_table_is_the_expected_one() -> None:
    rows = {
        (state.name, inp.name): (effect.name, "removed" if new is None else new.name)
        for (state, inp), (effect, new) in ROOM_TABLE.items()
    }
    assert rows == EXPECTED_ROWS


def test_lifetime_inputs_are_keyed_by_lifetime_and_the_rest_by_phase() -> None:
    for state, inp in ROOM_TABLE:
        assert isinstance(state, Lifetime) == (inp in LIFETIME_INPUTS), (state, inp)


def room_in(state: str) -> ClusterRoom:
    cr = ClusterRoom()
    if state in Phase.__members__:
        cr.phase = Phase[state]
    else:
        cr.lifetime = Lifetime[state]
    return cr


@pytest.mark.parametrize(("state", "inp"), sorted(EXPECTED_ROWS))
def test_every_row_steps_as_written(state: str, inp: str) -> None:
    effect, new = EXPECTED_ROWS[state, inp]
    cr = room_in(state)
    phase, lifetime = cr.phase, cr.lifetime
    assert cr.step(RoomInput[inp]) is Effect[effect]
    if new in Phase.__members__:
        assert (cr.phase, cr.lifetime) == (Phase[new], lifetime)
    elif new in Lifetime.__members__:
        assert (cr.phase, cr.lifetime) == (phase, Lifetime[new])
    else:
        assert (cr.phase, cr.lifetime) == (phase, lifetime)  # removed: the broker forgets it


def test_a_missing_row_is_a_local_protocol_error() -> None:
    missing = [
        (s, i)
        for s in [*Phase, *Lifetime]
        for i in RoomInput
        if (s, i) not in ROOM_TABLE and isinstance(s, Lifetime) == (i in LIFETIME_INPUTS)
    ]
    assert (Phase.NEW, RoomInput.JOIN) in missing
    for state, inp in missing:
        cr = room_in(state.name)
        before = (cr.phase, cr.lifetime)
        with pytest.raises(LocalProtocolError, match=f"in {state.name} cannot take {inp.name}"):
            cr.step(inp)
        assert (cr.phase, cr.lifetime) == before


def test_a_full_buffer_makes_a_syncing_room_lossy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(room_module, "MAX_BUFFERED", 2)
    cr = room_in("SYNCING")
    records = [
        PresenceRecord(version=v, present=True, node="n2", username=Username("ann"))
        for v in (1, 2, 3)
    ]
    for record in records:
        cr.buffered(record)
    assert cr.phase is Phase.LOSSY
    assert cr.buffer == records[2:]  # cleared at the overflow, then kept on


def test_the_scaling_doc_carries_the_room_table() -> None:
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert render_room_table() in text, "docs/scaling.md: paste render_room_table()"


OWN = "n1"
#: (version, present, node, username, expired): a join, a leave its node said, an expiry.
_records = st.builds(
    lambda version, kind, node, user: PresenceRecord(
        version, kind[0], node, Username(user), kind[1]
    ),
    st.integers(min_value=0, max_value=12),
    st.sampled_from([(True, False), (False, False), (False, True)]),
    st.sampled_from(["n1", "n2", "n3"]),
    few_users,
)


@given(st.lists(_records, max_size=30), st.sampled_from([Phase.LIVE, Phase.SETTLING]))
def test_apply_takes_only_news_of_other_nodes(records: list[PresenceRecord], phase: Phase) -> None:
    """A record at or below the known version is no news and changes nothing (a replay,
    or one a snapshot already reflected); this node's own records and, while settling,
    expiries only move the version; the rest set who is where."""
    cr = ClusterRoom(phase=phase, version=2, remote={Username("ann"): {"n2"}})
    where = {(Username("ann"), "n2")}
    for record in records:
        version, remote = cr.version, {u: set(n) for u, n in cr.remote.items()}
        news = cr.apply(record, OWN)
        assert news == (record.version > version)
        if not news:
            assert (cr.version, cr.remote) == (version, remote)
            continue
        assert cr.version == record.version
        if record.node == OWN or (record.expired and phase is Phase.SETTLING):
            assert cr.remote == remote
            continue
        if record.present:
            where.add((record.username, record.node))
        else:
            where.discard((record.username, record.node))
        expected: dict[Username, set[str]] = {}
        for user, node in where:
            expected.setdefault(user, set()).add(node)
        assert cr.remote == expected
