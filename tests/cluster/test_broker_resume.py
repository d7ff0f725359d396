"""
Positions in a cluster, step by step: what a member that follows positions is told
when its resume is answered at an awkward moment (the node cut off from Redis, just
back, the stream started over while reading, chats racing the read), when the link
goes while replays and acknowledged chats are on their way, and when a gap repair
finds the stream no longer keeps what was missed; and what a history read holds.
Against the in-memory backplane (``model.py``), through :class:`Net`.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from roombus import Position, RoomName, Username
from roombus.cluster import BackplaneRestored, ClusterBroker, RecordReceived, RoomSynced, Subscribe
from roombus.cluster.records import encode_presence
from roombus.cluster.room import MAX_BUFFERED
from roombus.core import codec
from roombus.core.actions import HistoryAnswered, PublishAnswered
from roombus.core.streams import RoomPolicy
from roombus.lowlevel import ClientConnected, ConnectionId, Deliver, TextReceived

from .test_broker_streams import (
    CONFIG,
    TS,
    Net,
    _a_resumer_replayed_past_records_on_their_way,
    chats,
)


@attrs.define
class CheckedNet(Net):
    """A Net whose every envelope names its room and carries the event's timestamp, and
    that keeps the brokers' answers to server-side code."""

    answered: list[Any] = attrs.field(factory=list)

    def apply(self, node: str, actions: list[Any]) -> None:
        self.answered.extend(
            a for a in actions if isinstance(a, (HistoryAnswered, PublishAnswered))
        )
        super().apply(node, actions)
        for conn, got in self.got.items():
            for env in got[self.seen.get(conn, 0) :]:
                assert isinstance(env.get("room"), str), env
                if "timestamp" in env:
                    assert env["timestamp"] == TS, env
            self.seen[conn] = len(got)

    seen: dict[int, int] = attrs.field(factory=dict)


def kinds(net: Net, conn: int) -> list[str]:
    """The types of what *conn* was sent, presence left out."""
    return [e["type"] for e in net.got[conn] if not e["type"].startswith("presence")]


def one_room(net: Net, *chats_sent: str) -> str:
    """ann (conn 1) joins r on n1 following positions, and sends *chats_sent*: the epoch."""
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    for text in chats_sent:
        net.send(1, {"type": "chat", "room": "r", "content": text})
    net.quiesce()
    return str(net.of(1, "joined")[0]["epoch"])


def run_commands(net: Net, node: str) -> None:
    link = net.bp.links[node]
    while link.commands:
        net.bp.run_command(node)


# -- a resume answered when the node's numbering is not the stream's --------------------


def test_cut_off_a_resume_is_answered_from_this_node_s_own_numbering() -> None:
    """Offline, a position of this node's own epoch is recovered from what it kept; one of
    the cluster's cannot be checked: told unavailable, at this node's position."""
    net = CheckedNet()
    e1 = one_room(net, "a")
    net.lose("n1")
    (reset,) = net.of(1, "reset")
    local = reset["epoch"]
    assert local != e1 and reset["seq"] == 1
    net.send(1, {"type": "chat", "room": "r", "content": "b"})  # numbered here: 2
    net.connect("n1", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 1}})
    assert net.of(2, "joined") == [
        {
            "type": "joined",
            "room": "r",
            "epoch": local,
            "seq": 2,
            "recovered": False,
            "reason": "unavailable",
        }
    ]
    assert chats(net, 2) == []
    net.connect("n1", 3, "cy")
    net.send(3, {"type": "join", "room": "r", "since": {"epoch": local, "seq": 1}})
    (joined,) = net.of(3, "joined")
    assert (joined["epoch"], joined["seq"], joined["recovered"]) == (local, 2, True)
    assert chats(net, 3) == [(2, "b", True)]
    net.connect("n1", 4, "dan")
    net.send(4, {"type": "join", "room": "r", "since": None})
    assert net.of(4, "joined") == [{"type": "joined", "room": "r", "epoch": local, "seq": 2}]


def test_a_resume_answered_before_the_snapshot_after_an_outage_is_unavailable() -> None:
    """Back online, n1 still numbers r on its own until it sees the cluster's numbering:
    a read of the stream answered before that cannot be trusted as continuity. ann is
    told unavailable at n1's own position (no replay), then reset to Redis's."""
    net = CheckedNet()
    e1 = one_room(net, "a")
    net.lose("n1")
    net.send(1, {"type": "chat", "room": "r", "content": "b"})  # L:2, this node's only
    local = net.of(1, "reset")[0]["epoch"]
    net.restore("n1")
    sizes = net.brokers["n1"].replay_sizes
    observed, total = sum(sizes.counts), sizes.sum
    net.send(1, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 1}})  # again
    run_commands(net, "n1")  # its Subscribe and the read; the snapshot is not read yet
    net.bp.reply_next("n1")  # the read's answer comes first
    assert net.of(1, "joined")[-1] == {
        "type": "joined",
        "room": "r",
        "epoch": local,
        "seq": 2,
        "recovered": False,
        "reason": "unavailable",
    }
    assert (sum(sizes.counts), sizes.sum) == (observed + 1, total)  # a replay of none
    net.quiesce()
    back = net.of(1, "reset")[-1]
    assert (back["epoch"], back["seq"], back["reason"]) == (e1, 1, "unavailable")
    assert chats(net, 1) == [(1, "a", False), (2, "b", False)]


def test_a_resume_whose_read_finds_the_stream_started_over_is_told_the_node_s_position() -> None:
    """The room's stream is gone (its keys evicted) when ann asks for its position again:
    the read starts a new epoch, which n1 has not seen. ann is answered with the position
    n1 follows (no claim of continuity), then reset to the new epoch when it shows."""
    net = CheckedNet()
    e1 = one_room(net, "a")
    net.bp.channels["r"].epoch = ""  # the next use of the stream starts E2
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    assert net.of(1, "joined")[-1] == {"type": "joined", "room": "r", "epoch": e1, "seq": 1}
    net.send(1, {"type": "chat", "room": "r", "content": "b"})
    net.quiesce()
    e2 = net.bp.channels["r"].epoch
    assert e2 != e1
    (reset,) = net.of(1, "reset")
    assert (reset["epoch"], reset["seq"], reset["reason"]) == (e2, 0, "epoch_changed")
    assert chats(net, 1) == [(1, "a", False), (1, "b", False)]


# -- chats that come while a resume is read -----------------------------------------------


def test_chats_racing_a_resume_are_replayed_or_delivered_live_once_in_order() -> None:
    """a4 reaches n1 after cy's read was asked for, before Redis read it (it is in the
    replay: not delivered again); a5 and a6 are numbered after the read (delivered live
    after the replay). No reset: nothing is missing."""
    net = CheckedNet()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    for i in range(1, 4):
        net.send(2, {"type": "chat", "room": "r", "content": f"a{i}"})
    net.quiesce()
    e1 = net.brokers["n1"].position("r").epoch
    sizes = net.brokers["n1"].replay_sizes
    total = sizes.sum
    net.connect("n1", 3, "cy")
    net.send(3, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 1}})
    net.send(2, {"type": "chat", "room": "r", "content": "a4"})
    run_commands(net, "n2")
    net.bp.deliver_next("n1", "r")  # a4, held for cy
    run_commands(net, "n1")  # cy's read: up to 4
    for text in ("a5", "a6"):
        net.send(2, {"type": "chat", "room": "r", "content": text})
    run_commands(net, "n2")
    while "r" in net.bp.links["n1"].inbox:  # cy's own join, a5 and a6, held for cy
        net.bp.deliver_next("n1", "r")
    net.bp.reply_next("n1")
    assert kinds(net, 3) == ["joined", "chat", "chat", "chat", "chat", "chat"]
    (joined,) = net.of(3, "joined")
    assert (joined["room"], joined["seq"], joined["recovered"]) == ("r", 4, True)
    assert chats(net, 3) == [
        (2, "a2", True),
        (3, "a3", True),
        (4, "a4", True),
        (5, "a5", False),
        (6, "a6", False),
    ]
    assert sizes.sum == total + 3
    net.send(2, {"type": "chat", "room": "r", "content": "a7"})
    net.quiesce()
    assert chats(net, 3)[-1] == (7, "a7", False)
    assert [seq for seq, _, _ in chats(net, 1)] == [1, 2, 3, 4, 5, 6, 7]


def test_records_a_replay_already_had_are_not_delivered_again() -> None:
    """fay's replay went up to 10 while 9 and 10 were still on their way to n1: when they
    come, she is not sent them again, and what follows is live."""
    net, _ = _a_resumer_replayed_past_records_on_their_way()
    net.quiesce()
    assert chats(net, 3) == [(seq, f"a{seq}", True) for seq in range(6, 11)]
    net.send(2, {"type": "chat", "room": "r", "content": "a11"})
    net.quiesce()
    assert chats(net, 3)[-1] == (11, "a11", False)
    assert net.of(3, "reset") == []


# -- the link lost while replays and chats are on their way --------------------------------


def test_a_resume_still_reading_when_the_link_goes_is_answered_unavailable() -> None:
    net = CheckedNet()
    e1 = one_room(net, "a")
    net.connect("n1", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 0}})
    net.connect("n1", 3, "cy")
    net.send(3, {"type": "join", "room": "r", "since": None})
    net.lose("n1")  # both reads lost with the link
    local = net.of(1, "reset")[0]["epoch"]
    assert net.of(2, "joined") == [
        {
            "type": "joined",
            "room": "r",
            "epoch": local,
            "seq": 1,
            "recovered": False,
            "reason": "unavailable",
        }
    ]
    assert net.of(3, "joined") == [{"type": "joined", "room": "r", "epoch": local, "seq": 1}]
    assert net.of(2, "reset") == net.of(3, "reset") == []


def test_a_replay_catching_up_when_the_link_goes_restarts_after_this_node_s_chats() -> None:
    """fay's replay went past records still on their way when n1 is cut off. ann's chat,
    relayed and not back, is numbered on n1 now: ann gets it; fay, who may have had
    other numbers up to 10, is reset past it instead (unavailable)."""
    net, e1 = _a_resumer_replayed_past_records_on_their_way()
    net.send(1, {"type": "chat", "room": "r", "content": "mine"})  # relayed, not run
    net.lose("n1")
    (ann_reset,) = net.of(1, "reset")
    local = ann_reset["epoch"]
    assert (ann_reset["seq"], ann_reset["reason"]) == (8, "unavailable") and local != e1
    assert net.of(1, "chat")[-1]["content"] == "mine"
    assert net.of(1, "chat")[-1]["seq"] == 9
    assert net.got[3][-1] == {
        "type": "reset",
        "room": "r",
        "epoch": local,
        "seq": 9,
        "reason": "unavailable",
    }
    assert "mine" not in [e["content"] for e in net.of(3, "chat")]
    assert net.brokers["n1"].statistics().relay_unconfirmed == 1


def test_every_resumer_of_a_room_is_answered_when_the_link_goes() -> None:
    """fay's replay is catching up (past records on their way) and gil's read is still
    queued when n1 is cut off: both are answered, each as its stage asks (fay reset past
    n1's chats, gil joined unavailable), whatever the order they came in."""
    net, e1 = _a_resumer_replayed_past_records_on_their_way()
    net.connect("n1", 4, "gil")
    net.send(4, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 5}})
    net.lose("n1")
    local = net.of(1, "reset")[0]["epoch"]
    assert net.got[3][-1] == {
        "type": "reset",
        "room": "r",
        "epoch": local,
        "seq": 8,
        "reason": "unavailable",
    }
    assert net.of(4, "joined") == [
        {
            "type": "joined",
            "room": "r",
            "epoch": local,
            "seq": 8,
            "recovered": False,
            "reason": "unavailable",
        }
    ]


def test_a_caught_up_resumer_gets_the_chats_numbered_here_when_the_link_goes() -> None:
    """bob resumed and caught up at once; ann's chat is on its way when n1 is cut off: both
    are reset to n1's numbering, then get it."""
    net = CheckedNet()
    e1 = one_room(net, "a")
    net.connect("n1", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 1}})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "b"})
    net.lose("n1")
    for conn in (1, 2):
        assert kinds(net, conn)[-2:] == ["reset", "chat"], net.got[conn]
        assert net.of(conn, "chat")[-1]["content"] == "b"


def test_acknowledged_chats_not_back_when_the_link_goes_are_acked_here() -> None:
    """ann's and bob's acknowledged chats are relayed, not back, when n1 is cut off; bob has
    gone meanwhile. Both are numbered here (delivered to ann), ann's acked at that
    position; nobody acks bob's."""
    net = CheckedNet()
    one_room(net)
    net.connect("n1", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "x", "id": "m1"})
    net.send(2, {"type": "chat", "room": "r", "content": "y", "id": "m2"})
    net.disconnect(2)
    net.lose("n1")
    local = net.of(1, "reset")[0]["epoch"]
    assert [(e["content"], e["seq"]) for e in net.of(1, "chat")] == [("x", 1), ("y", 2)]
    assert net.of(1, "ack") == [{"type": "ack", "id": "m1", "room": "r", "epoch": local, "seq": 1}]
    assert net.brokers["n1"].statistics().relay_unconfirmed == 2


# -- a gap the stream no longer holds -------------------------------------------------------


def _gap(history_drop: set[int], inbox_drop: set[int], n: int = 4) -> Net:
    """ann (n1) and bob (n2, following positions) in r; ann sends 1..n; n2 never gets the
    records *inbox_drop*, and the stream has lost *history_drop* before n2 reads it."""
    net = CheckedNet(config=attrs.evolve(CONFIG, history_size=10))
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    for i in range(1, n + 1):
        net.send(1, {"type": "chat", "room": "r", "content": i})
    run_commands(net, "n1")
    box = net.bp.links["n2"].inbox["r"]
    for item in [item for i, item in enumerate(box, 1) if i in inbox_drop]:
        box.remove(item)
    ch = net.bp.channels["r"]
    ch.history = [(seq, p) for seq, p in ch.history if seq not in history_drop]
    while "r" in net.bp.links["n2"].inbox:  # every record reaches n2 before any read
        net.bp.deliver_next("n2", "r")
    net.quiesce()
    return net


def test_a_gap_repair_missing_the_first_message_tells_it_lost() -> None:
    net = _gap(history_drop={2}, inbox_drop={2, 3})
    e1 = net.bp.channels["r"].epoch
    assert kinds(net, 2) == ["joined", "chat", "reset", "chat", "chat"]
    (reset,) = net.of(2, "reset")
    assert reset == {"type": "reset", "room": "r", "epoch": e1, "seq": 2, "reason": "too_old"}
    assert [seq for seq, _, _ in chats(net, 2)] == [1, 3, 4]
    assert net.brokers["n2"].position("r") == Position(e1, 4)


def test_a_gap_repair_missing_the_last_message_tells_it_lost() -> None:
    net = _gap(history_drop={3}, inbox_drop={2, 3})
    e1 = net.bp.channels["r"].epoch
    assert kinds(net, 2) == ["joined", "chat", "chat", "reset", "chat"]
    (reset,) = net.of(2, "reset")
    assert reset == {"type": "reset", "room": "r", "epoch": e1, "seq": 3, "reason": "too_old"}
    assert [seq for seq, _, _ in chats(net, 2)] == [1, 2, 4]


def test_a_second_gap_behind_a_repair_is_repaired_too() -> None:
    net = _gap(history_drop=set(), inbox_drop={2, 5}, n=7)
    assert [seq for seq, _, _ in chats(net, 2)] == list(range(1, 8))
    assert net.of(2, "reset") == []
    assert net.brokers["n2"].statistics().repairs == 2


def test_a_repair_that_finds_the_stream_started_over_follows_the_new_one() -> None:
    """n2 reads the stream to repair a gap; the stream's keys are gone by then (a new
    epoch): bob is reset to it, the old epoch's waiting records are dropped, and the new
    epoch's chats follow."""
    net = CheckedNet()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    for i in range(1, 4):
        net.send(1, {"type": "chat", "room": "r", "content": i})
    run_commands(net, "n1")
    box = net.bp.links["n2"].inbox["r"]
    del box[1]  # record 2 never reaches n2
    net.bp.deliver_next("n2", "r")
    net.bp.deliver_next("n2", "r")  # 3: a gap, read from the stream
    e1 = net.bp.channels["r"].epoch
    net.bp.channels["r"].epoch = ""
    net.quiesce()
    e2 = net.bp.channels["r"].epoch
    assert e2 != e1
    assert net.got[2][-1] == {
        "type": "reset",
        "room": "r",
        "epoch": e2,
        "seq": 0,
        "reason": "epoch_changed",
    }
    net.send(1, {"type": "chat", "room": "r", "content": "z"})
    net.quiesce()
    assert chats(net, 2) == [(1, 1, False), (1, "z", False)]


# -- history ----------------------------------------------------------------------------------


def _history(send_queue_bytes: int, **request: Any) -> list[int]:
    """Five chats of 500 characters in r; bob (n2) asks for its history: the seqs."""
    config = attrs.evolve(
        CONFIG, max_message_bytes=1000, send_queue_bytes=send_queue_bytes, history_size=10
    )
    net = CheckedNet(config=config)
    one_room(net, *["x" * 500] * 5)
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    since = request.pop("since", None)
    if since is not None:
        request["since"] = {"epoch": net.brokers["n1"].position("r").epoch, "seq": since}
    net.send(2, {"type": "history", "room": "r", "id": "h", **request})
    net.quiesce()
    (history,) = net.of(2, "history")
    assert (history["room"], history["id"], history["seq"]) == ("r", "h", 5)
    return [item["seq"] for item in history["items"]]


def test_history_is_the_chats_that_fit_half_the_queue_bytes() -> None:
    """The latest chats (or, after a position, the oldest) whose bytes add up to half
    the send-queue bytes at most, at the edge and one byte under."""
    prefix = codec.chat_prefix(Username("ann"), "x" * 500, RoomName("r"), TS)
    assert prefix is not None
    one = len(codec.complete_chat(prefix, 1))  # each of the five
    assert _history(4 * 1024 * 1024) == [1, 2, 3, 4, 5]
    assert _history(4 * one) == [4, 5]
    assert _history(4 * one - 2) == [5]
    assert _history(4 * one, since=1) == [2, 3]
    assert _history(4 * one - 2, since=1) == [2]


def test_history_of_another_epoch_is_the_latest_and_answers_server_side_code() -> None:
    net = CheckedNet()
    one_room(net, "a", "b", "c")
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(2, {"type": "history", "room": "r", "since": {"epoch": "old", "seq": 2}})
    net.quiesce()
    (history,) = net.of(2, "history")
    assert [item["content"] for item in history["items"]] == ["a", "b", "c"]
    epoch = net.brokers["n2"].position("r").epoch
    net.apply("n2", net.brokers["n2"].history("r", since=None, limit=2, ticket=7, now=net.now))
    net.quiesce()
    (answer,) = net.answered
    assert (answer.ticket, answer.room, answer.position) == (7, "r", Position(epoch, 3))
    assert [json.loads(item)["content"] for item in answer.items] == ["b", "c"]


# -- more of the link lost ------------------------------------------------------------------


def test_what_waits_on_redis_when_the_link_goes_is_answered_here() -> None:
    """n2 is cut off with bob's join waiting for the room's presence, his history read and
    a server-side publish in flight: he joins here, his history is answered from this
    node's own numbering, and the publish's fate is unknown (no position)."""
    net = CheckedNet()
    one_room(net, "a")
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(2, {"type": "history", "room": "r", "id": "h"})
    net.apply("n2", net.brokers["n2"].publish("r", "s", username="srv", timestamp=TS, ticket=5))
    net.connect("n2", 3, "cy")
    net.send(3, {"type": "join", "room": "q"})  # waits for q's presence
    net.lose("n2")
    local = net.brokers["n2"].position("r")
    (history,) = net.of(2, "history")
    assert (history["id"], history["epoch"], history["seq"]) == ("h", local.epoch, local.seq)
    assert PublishAnswered(ticket=5, room=RoomName("r"), position=None) in net.answered
    assert [e["type"] for e in net.got[3]] == ["presence", "presence_state"]
    assert net.of(3, "presence_state")[0]["users"] == ["cy"]
    assert net.brokers["n2"].connections("q") == [3]


def test_a_room_let_go_with_a_chat_on_its_way_is_forgotten_when_the_link_goes() -> None:
    net = CheckedNet()
    one_room(net)
    net.send(1, {"type": "chat", "room": "r", "content": "x"})  # relayed, not run
    net.send(1, {"type": "leave", "room": "r"})  # r waits for it to come back
    assert net.brokers["n1"].rooms == []
    net.lose("n1")
    net.restore("n1")
    net.quiesce()
    assert net.bp.subscriptions("n1") == set()


# -- resumes, more ----------------------------------------------------------------------------


def test_a_read_answered_after_its_member_left_is_dropped() -> None:
    """cy (n2, with bob) and dan (n3, alone) ask for r's position again and leave before
    the stream is read: nothing is sent for them; n3 has let r go."""
    net = CheckedNet()
    e1 = one_room(net, "a")
    for conn, node, user in ((2, "n2", "bob"), (3, "n2", "cy"), (4, "n3", "dan")):
        net.connect(node, conn, user)
        net.send(conn, {"type": "join", "room": "r"})
    net.quiesce()
    for conn in (3, 4):
        net.send(conn, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 0}})
        net.send(conn, {"type": "leave", "room": "r"})
    net.quiesce()
    for conn in (3, 4):
        assert net.of(conn, "joined") == [] and net.of(conn, "chat") == []
    assert net.bp.subscriptions("n3") == set()
    net.send(1, {"type": "chat", "room": "r", "content": "b"})
    net.quiesce()
    assert chats(net, 2) == [(2, "b", False)]


def test_a_position_named_while_the_join_waits_is_answered_once_joined() -> None:
    net = CheckedNet()
    e1 = one_room(net, "a", "b")
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})  # waits for r's presence
    net.send(2, {"type": "join", "room": "r", "since": {"epoch": e1, "seq": 1}})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    assert (joined["epoch"], joined["seq"], joined["recovered"]) == (e1, 2, True)
    assert chats(net, 2) == [(2, "b", True)]


def test_a_join_with_no_position_replays_nothing() -> None:
    net = CheckedNet()
    e1 = one_room(net, "a", "b")
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    sizes = net.brokers["n2"].replay_sizes
    observed, total = sum(sizes.counts), sizes.sum
    net.send(2, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    assert net.of(2, "joined") == [{"type": "joined", "room": "r", "epoch": e1, "seq": 2}]
    assert chats(net, 2) == []
    assert (sum(sizes.counts), sizes.sum) == (observed + 1, total)


def test_a_message_missing_at_the_top_of_the_stream_is_told_lost() -> None:
    net = CheckedNet()
    e1 = one_room(net, *range(5))
    ch = net.bp.channels["r"]
    ch.history = [(seq, prefix) for seq, prefix in ch.history if seq != 5]
    net.connect("n2", 2, "bob")
    since = {"epoch": e1, "seq": 1}
    net.send(2, {"type": "join", "room": "r", "since": since, "partial": True})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    assert (joined["seq"], joined["recovered"], joined["reason"]) == (5, False, "too_old")
    assert joined["lost"] == {"from": 2, "to": 5}
    assert chats(net, 2) == []


def test_a_room_that_keeps_no_history_tells_a_resume_so() -> None:
    config = attrs.evolve(CONFIG, room_history=(("quiet*", RoomPolicy(size=0, ttl=60.0)),))
    net = CheckedNet(config=config)
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "quiet"})
    net.quiesce()
    for text in ("a", "b"):
        net.send(1, {"type": "chat", "room": "quiet", "content": text})
    net.quiesce()
    epoch = net.brokers["n1"].position("quiet").epoch
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "quiet", "since": {"epoch": epoch, "seq": 0}})
    net.quiesce()
    (joined,) = net.of(2, "joined")
    assert (joined["seq"], joined["recovered"], joined["reason"]) == (2, False, "no_history")
    assert joined["lost"] == {"from": 1, "to": 2}
    assert net.bp.channels["quiet"].history == []  # not kept in Redis either


def test_a_room_made_offline_follows_the_cluster_s_numbering_from_its_first_record() -> None:
    """ann joins r on n1 while it is cut off (numbered here); back online, a chat of the
    cluster reaches n1 before r's presence does: ann is reset to the cluster's epoch
    first."""
    net = CheckedNet()
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    net.lose("n1")
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r", "since": None})
    net.send(1, {"type": "chat", "room": "r", "content": "a"})
    (joined,) = net.of(1, "joined")
    net.restore("n1")
    run_commands(net, "n1")  # subscribed; the presence not read yet
    net.send(2, {"type": "chat", "room": "r", "content": "b"})
    run_commands(net, "n2")
    while "r" in net.bp.links["n1"].inbox:
        net.bp.deliver_next("n1", "r")
    net.quiesce()
    e1 = net.bp.channels["r"].epoch
    got = [e for e in net.got[1] if e["type"] in ("joined", "reset", "chat")]
    assert [(e["type"], e.get("epoch"), e["seq"]) for e in got] == [
        ("joined", joined["epoch"], 0),
        ("chat", None, 1),
        ("reset", e1, 0),
        ("chat", None, 1),
    ]
    assert got[2]["reason"] == "epoch_changed" and joined["epoch"] != e1


# -- presence around a snapshot -------------------------------------------------------------


def test_a_presence_record_overtaking_the_snapshot_after_an_outage_is_applied_after_it() -> None:
    """n2 (dan in r) reconnects; cy joins on n1 after n2's snapshot was read, and her
    record overtakes it: dan is told she joined, once, after the snapshot."""
    net = CheckedNet()
    one_room(net)
    net.connect("n2", 4, "dan")
    net.send(4, {"type": "join", "room": "r"})
    net.quiesce()
    net.lose("n2")
    net.restore("n2")
    run_commands(net, "n2")
    net.bp.read_next("n2")  # the snapshot: ann and dan
    net.connect("n1", 3, "cy")
    net.send(3, {"type": "join", "room": "r"})
    run_commands(net, "n1")  # j cy, after the snapshot
    net.bp.swap("n2", "r", 1)  # ... and first on n2
    net.bp.deliver_next("n2", "r")
    assert [e for e in net.of(4, "presence") if e["username"] == "cy"] == []  # not yet
    net.bp.deliver_next("n2", "r")
    cys = [e for e in net.of(4, "presence") if e["username"] == "cy"]
    assert [e["event"] for e in cys] == ["join"]
    net.quiesce()
    assert net.brokers["n2"].members("r") == ["ann", "cy", "dan"]


def test_a_user_here_and_elsewhere_is_not_announced_again_by_a_snapshot() -> None:
    """ann is on n1, then joins on n2 too. n1 misses the record of her join there,
    notices the gap at bob's, and reads the room again: cy (n1) is told bob joined, and
    nothing of ann (she was here all along)."""
    net = CheckedNet()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.connect("n1", 2, "cy")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    net.connect("n2", 3, "ann")
    net.send(3, {"type": "join", "room": "r"})
    run_commands(net, "n2")  # n2 subscribes
    net.bp.read_next("n2")
    net.bp.deliver_next("n2", "r")  # ann joins on n2
    run_commands(net, "n2")  # j ann (n2) ...
    del net.bp.links["n1"].inbox["r"]  # ... which n1 never gets
    seen = len(net.got[2])
    net.connect("n2", 4, "bob")
    net.send(4, {"type": "join", "room": "r"})
    net.quiesce()
    assert net.brokers["n1"].statistics().presence_gaps == 1
    news = [(e["event"], e["username"]) for e in net.got[2][seen:] if e["type"] == "presence"]
    assert news == [("join", "bob")]
    assert net.brokers["n1"].nodes_of("r") == {"ann": {"n1", "n2"}, "bob": {"n2"}, "cy": {"n1"}}


def test_cut_off_again_before_seeing_the_cluster_a_node_numbers_on_from_its_own() -> None:
    """n1 is back, then cut off again before it saw r's numbering: it goes on from its
    own last position (2), not the cluster's (1), so no position is given twice."""
    net = CheckedNet()
    one_room(net, "a")
    net.lose("n1")
    net.send(1, {"type": "chat", "room": "r", "content": "b"})  # L1:2
    net.restore("n1")
    net.lose("n1")
    first, again = net.of(1, "reset")
    assert first["epoch"] != again["epoch"] and again["seq"] == 2
    net.send(1, {"type": "chat", "room": "r", "content": "c"})
    assert net.of(1, "chat")[-1]["seq"] == 3


def test_a_snapshot_after_the_buffer_overflowed_is_applied_then_read_again() -> None:
    """More presence records than a room may buffer come before its snapshot: the snapshot
    is taken (and what is still buffered on top), the presence is read again, and the
    joiner waits for that second read."""
    broker = ClusterBroker(CONFIG, node="n1")
    room = RoomName("r")

    def handle(event: Any) -> list[Any]:
        return broker.handle(event, now=1.0, timestamp=TS)

    handle(BackplaneRestored())
    handle(ClientConnected(conn=ConnectionId(1), username=Username("ann")))
    (subscribe,) = [
        a
        for a in handle(TextReceived(conn=ConnectionId(1), text='{"type":"join","room":"r"}'))
        if isinstance(a, Subscribe)
    ]
    for version in range(1, MAX_BUFFERED + 3):
        handle(RecordReceived(room=room, data=encode_presence(True, version, "n2", f"u{version}")))
    snapshot = RoomSynced(
        room=room, version=MAX_BUFFERED, entries=(("n2", "bob"),), gen=subscribe.gen, epoch="E1"
    )
    actions = handle(snapshot)
    assert [a for a in actions if isinstance(a, Subscribe)] == [subscribe]  # read again
    assert not [a for a in actions if isinstance(a, Deliver)]  # ann still waits
    assert broker.connections("r") == []
    assert set(broker.nodes_of("r")) == {"bob", f"u{MAX_BUFFERED + 1}", f"u{MAX_BUFFERED + 2}"}
    actions = handle(attrs.evolve(snapshot, version=MAX_BUFFERED + 2))
    states = [json.loads(a.payload) for a in actions if isinstance(a, Deliver)]
    assert states[-1] == {"type": "presence_state", "room": "r", "users": ["ann", "bob"]}
    assert broker.members("r") == ["ann", "bob"]
