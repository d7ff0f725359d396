"""
Edges of the cluster broker that its other tests pass by: another node's connection
named in a command, chats held for joiners when one of them gives up, a user back in a
room before an outage, what Redis is asked to keep, the notice of a relayed chat, records waiting for a
repair when the link goes, and how many chats a joiner may hold.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from roombus import BrokerConfig, MessagePublished, RoomName, Username
from roombus.cluster import BackplaneRestored, ClusterBroker, Relay, RoomSynced, Subscribe
from roombus.cluster.broker import MAX_HELD
from roombus.cluster.control import encode_control
from roombus.core.actions import DisconnectCommand, ReadStream
from roombus.core.events import ControlReceived
from roombus.core.streams import RoomPolicy
from roombus.lowlevel import ClientConnected, Close, ConnectionId, Event, TextReceived

from .test_broker_streams import TS, Net, chats

CONFIG = BrokerConfig(heartbeat=False, rate_limit=0)


def test_a_command_closing_another_node_s_connection_leaves_this_node_s_alone() -> None:
    """``n3/7`` is connection 7 of n3: n1's own connection 7 stays; ``n1/7`` closes it."""
    broker = ClusterBroker(CONFIG, node="n1")
    broker.handle(BackplaneRestored(), now=0.0, timestamp=0)
    broker.handle(
        ClientConnected(conn=ConnectionId(7), username=Username("ann")), now=0.0, timestamp=0
    )

    def told(connection: str) -> list[object]:
        command = DisconnectCommand(connection=connection, code=3000, reason="bye")
        return broker.handle(
            ControlReceived(data=encode_control("n2", command)), now=0.0, timestamp=0
        )

    for other in ("n3/7", "n11/7", "n1/x7", "n1/7 "):
        assert told(other) == []
    assert broker.username_of(ConnectionId(7)) == "ann"
    assert told("n1/7") == [Close(conn=ConnectionId(7), code=3000, reason="bye")]


def test_a_joiner_giving_up_keeps_the_chats_the_others_sent_while_waiting() -> None:
    """ann and bob join r on n1 and chat before its presence is read; bob leaves: ann's
    chat is published once she has joined, bob's is not."""
    net = Net()
    net.connect("n2", 3, "cy")
    net.send(3, {"type": "join", "room": "r"})
    net.quiesce()
    for conn, user in ((1, "ann"), (2, "bob")):
        net.connect("n1", conn, user)
        net.send(conn, {"type": "join", "room": "r"})
        net.send(conn, {"type": "chat", "room": "r", "content": user})
    net.send(2, {"type": "leave", "room": "r"})
    net.quiesce()
    assert chats(net, 3) == [(1, "ann", False)]
    assert chats(net, 1) == [(1, "ann", False)]


def test_a_user_who_left_and_came_back_before_an_outage_does_not_flicker_after_it() -> None:
    """ann leaves r and joins it again; both announces are lost with n1's link. Back
    online, n1 does not take her entry back (she is here): bob sees nothing of it."""
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r"})
    net.quiesce()
    seen = len(net.got[2])
    net.send(1, {"type": "leave", "room": "r"})
    net.send(1, {"type": "join", "room": "r"})
    net.lose("n1")
    net.restore("n1")
    net.quiesce()
    assert net.got[2][seen:] == []
    assert net.brokers["n2"].members("r") == ["ann", "bob"]


def test_what_redis_is_asked_to_keep_is_what_the_config_says() -> None:
    """The backplane keeps a room's history, positions and acknowledged ids as long as
    the node's config says (per room where it says so): every Subscribe, Relay and
    ReadStream carries it."""
    config = BrokerConfig(
        heartbeat=False,
        rate_limit=0,
        history_size=7,
        history_ttl=30.5,
        position_ttl=3600.25,
        dedup_window=12.5,
        room_history=(("quiet*", RoomPolicy(size=2, ttl=9.0)),),
    )
    broker = ClusterBroker(config, node="n1")

    def handle(event: Event) -> list[Any]:
        return broker.handle(event, now=1.0, timestamp=0)

    handle(BackplaneRestored())
    handle(ClientConnected(conn=ConnectionId(1), username=Username("ann")))
    for room in ("r", "quiet1"):
        (subscribe,) = handle(TextReceived(conn=ConnectionId(1), text=join(room)))
        assert isinstance(subscribe, Subscribe) and subscribe.position_ms == 3_600_250
        handle(RoomSynced(room=RoomName(room), version=0, entries=(), gen=subscribe.gen, epoch="E"))
    for room, keep, keep_ms in (("r", 7, 30_500), ("quiet1", 2, 9000)):
        text = json.dumps({"type": "chat", "room": room, "content": 1, "id": "m"})
        (relay,) = handle(TextReceived(conn=ConnectionId(1), text=text))
        assert isinstance(relay, Relay)
        assert (relay.keep, relay.keep_ms, relay.position_ms) == (keep, keep_ms, 3_600_250)
        assert (relay.dedup, relay.dedup_ms) == (("ann", "m"), 12_500)
        text = json.dumps({"type": "history", "room": room})
        (read,) = handle(TextReceived(conn=ConnectionId(1), text=text))
        assert isinstance(read, ReadStream)
        assert (read.keep, read.keep_ms, read.position_ms) == (keep, keep_ms, 3_600_250)


def join(room: str) -> str:
    return json.dumps({"type": "join", "room": room})


@attrs.define
class NoticedNet(Net):
    """A Net that keeps the MessagePublished notices, by node."""

    notices: list[tuple[str, MessagePublished]] = attrs.field(factory=list)

    def apply(self, node: str, actions: list[Any]) -> None:
        self.notices.extend((node, a) for a in actions if isinstance(a, MessagePublished))
        super().apply(node, actions)


def test_the_notice_of_a_relayed_chat_has_the_position_redis_gave_it() -> None:
    net = NoticedNet()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.quiesce()
    net.send(1, {"type": "chat", "room": "r", "content": "x"})
    net.quiesce()
    epoch = net.bp.channels["r"].epoch
    (notice,) = net.notices
    assert notice == (
        "n1",
        MessagePublished(
            room=RoomName("r"),
            username=Username("ann"),
            content="x",
            seq=1,
            timestamp=TS,
            epoch=epoch,
        ),
    )


def test_records_waiting_for_a_repair_when_the_link_goes_are_not_delivered() -> None:
    """n2 waits for a repair read (record 2 lost, 3 behind it) when its link goes: bob is
    reset to n2's own numbering after 1, and never sent 3 across the gap."""
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})
    net.connect("n2", 2, "bob")
    net.send(2, {"type": "join", "room": "r", "since": None})
    net.quiesce()
    for i in range(1, 4):
        net.send(1, {"type": "chat", "room": "r", "content": i})
    while net.bp.links["n1"].commands:
        net.bp.run_command("n1")
    del net.bp.links["n2"].inbox["r"][1]  # record 2 never reaches n2
    while "r" in net.bp.links["n2"].inbox:
        net.bp.deliver_next("n2", "r")  # 1, then 3: a gap, read from the stream
    net.lose("n2")
    assert chats(net, 2) == [(1, 1, False)]
    (reset,) = net.of(2, "reset")
    assert (reset["seq"], reset["reason"]) == (1, "unavailable")


def test_a_joiner_holds_at_most_max_held_chats_and_is_told_past_that() -> None:
    net = Net()
    net.connect("n1", 1, "ann")
    net.send(1, {"type": "join", "room": "r"})  # waits for r's presence
    for i in range(MAX_HELD + 1):
        net.send(1, {"type": "chat", "room": "r", "content": i, "id": f"m{i}"})
    (error,) = net.of(1, "error")
    assert (error["code"], error["id"]) == ("not_joined", f"m{MAX_HELD}")
    net.quiesce()
    assert [content for _, content, _ in chats(net, 1)] == list(range(MAX_HELD))
