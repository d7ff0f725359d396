"""
``Broker(notices=False)``: a client's chat makes no MessagePublished, and nothing else
changes (what a hub without an ``on_notice`` hook runs).
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from roombus import BrokerConfig, MessagePublished, RoomName, Username
from roombus.core.actions import Action
from roombus.lowlevel import (
    Broker,
    ClientConnected,
    ClientDisconnected,
    ConnectionId,
    TextReceived,
)

TS = 1_700_000_000
ROOMS = ("a", "b")
CONFIG = BrokerConfig(rate_limit=0, heartbeat=False, dedup_window=60.0)

conns = st.integers(1, 4)
rooms = st.sampled_from(ROOMS)
texts = st.one_of(
    st.builds(lambda r, c: {"type": "chat", "room": r, "content": c}, rooms, st.text(max_size=5)),
    st.builds(
        lambda r, i: {"type": "chat", "room": r, "content": "x", "id": i},
        rooms,
        st.sampled_from(("m1", "m2")),
    ),
    st.builds(lambda r: {"type": "join", "room": r}, rooms),
    st.builds(lambda r: {"type": "leave", "room": r}, rooms),
    st.just({"type": "chat", "content": 1}),  # the default room's, or not joined
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("connect"), conns, rooms),
        st.tuples(st.just("text"), conns, texts),
        st.tuples(st.just("publish"), rooms, st.sampled_from((None, "s1"))),
        st.tuples(st.just("disconnect"), conns),
    ),
    max_size=30,
)


def run(broker: Broker, step: tuple[object, ...], now: float) -> list[Action]:
    kind = step[0]
    if kind == "connect":
        _, c, room = step
        return broker.handle(
            ClientConnected(
                conn=ConnectionId(c),  # type: ignore[arg-type]
                username=Username(f"u{c}"),
                room=RoomName(room),  # type: ignore[arg-type]
            ),
            now=now,
            timestamp=TS,
        )
    if kind == "text":
        _, c, message = step
        event = TextReceived(conn=ConnectionId(c), text=json.dumps(message))  # type: ignore[arg-type]
        return broker.handle(event, now=now, timestamp=TS)
    if kind == "publish":
        _, room, msg_id = step
        return broker.publish(room, "news", username="srv", timestamp=TS, now=now, msg_id=msg_id)  # type: ignore[arg-type]
    _, c = step
    return broker.handle(ClientDisconnected(conn=ConnectionId(c)), now=now, timestamp=TS)  # type: ignore[arg-type]


@given(steps)
def test_without_notices_only_the_chats_notices_go(script: list[tuple[object, ...]]) -> None:
    on = Broker(CONFIG, epoch_prefix="e")
    off = Broker(CONFIG, epoch_prefix="e", notices=False)
    assert on.notices and not off.notices
    live: set[object] = set()
    for i, step in enumerate(script):
        opened_twice = step[0] == "connect" and step[1] in live
        not_open = step[0] in ("text", "disconnect") and step[1] not in live
        if opened_twice or not_open:
            continue  # a connection opens once, and only an open one speaks
        if step[0] == "connect":
            live.add(step[1])
        elif step[0] == "disconnect":
            live.discard(step[1])
        now = float(i)
        with_notices = run(on, step, now)
        without = run(off, step, now)
        if step[0] == "publish":
            # A server-side publish keeps its notice: it carries the position.
            assert without == with_notices
        else:
            assert without == [a for a in with_notices if type(a) is not MessagePublished]
    assert off.statistics() == on.statistics()


def test_a_chat_without_notices_is_still_delivered_and_numbered() -> None:
    broker = Broker(CONFIG, notices=False)
    for c in (1, 2):
        run(broker, ("connect", c, "a"), 0.0)
    actions = run(broker, ("text", 1, {"type": "chat", "content": "hi"}), 1.0)
    assert [type(a).__name__ for a in actions] == ["Deliver"]
    envelope = json.loads(actions[0].payload)  # type: ignore[union-attr]
    assert (envelope["content"], envelope["seq"]) == ("hi", 1)
    published = run(broker, ("publish", "a", None), 2.0)
    notice = [a for a in published if type(a) is MessagePublished]
    assert [(n.seq, n.username) for n in notice] == [(2, "srv")]
    broker.notices = True
    actions = run(broker, ("text", 2, {"type": "chat", "content": "again"}), 3.0)
    assert [(a.seq, a.username) for a in actions if type(a) is MessagePublished] == [(3, "u2")]
