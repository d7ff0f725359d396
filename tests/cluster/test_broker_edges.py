"""
Edges of the cluster broker that its other tests pass by: another node's connection
named in a command, and chats held for joiners when one of them gives up.
"""

from __future__ import annotations

from roombus import BrokerConfig, Username
from roombus.cluster import BackplaneRestored, ClusterBroker
from roombus.cluster.control import encode_control
from roombus.core.actions import DisconnectCommand
from roombus.core.events import ControlReceived
from roombus.lowlevel import ClientConnected, Close, ConnectionId

from .test_broker_streams import Net, chats

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
