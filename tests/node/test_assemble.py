"""How a server's broker is made (node.assemble) and handed to its hub."""

from __future__ import annotations

import pytest

from roombus import (
    BrokerConfig,
    ClaimsAuthorizer,
    ConfigError,
    Identity,
    LocalProtocolError,
    Refusal,
    RoomName,
    Username,
)
from roombus.cluster import (
    BackplaneLost,
    BackplaneRestored,
    ClusterBroker,
    RecordReceived,
    RoomSynced,
    Subscribe,
)
from roombus.core.events import Event
from roombus.hub import Hub, MessageHub
from roombus.lowlevel import Broker, ClientConnected, ConnectionId
from roombus.node.assemble import build_broker
from roombus.server.typing import Headers


class Anyone:
    """An authenticator that lets every client in as ``ann``."""

    def authenticate(
        self, *, path: bytes, query: bytes, headers: Headers, now: float
    ) -> Identity | Refusal:
        return Identity(username="ann")


class NoOne:
    def may_join(self, identity: Identity, room: str) -> bool:
        return False

    def may_publish(self, identity: Identity, room: str) -> bool:
        return False

    def may_see_presence(self, identity: Identity, room: str) -> bool:
        return False


def test_a_server_on_its_own_runs_the_core_broker() -> None:
    broker = build_broker(BrokerConfig(max_rooms_per_connection=3))
    assert type(broker) is Broker
    assert broker.node is None
    assert broker.config.max_rooms_per_connection == 3
    assert broker.authorizer is None


def test_a_node_of_a_cluster_runs_a_cluster_broker() -> None:
    authorizer = NoOne()
    broker = build_broker(authorizer=authorizer, authenticator=Anyone(), node="n1")
    assert isinstance(broker, ClusterBroker)
    assert broker.node == "n1"
    assert broker.authorizer is authorizer  # given: kept, authenticator or not


@pytest.mark.parametrize("node", ["", "a b", "x" * 65, "n1\n", "é"])
def test_a_bad_node_id_is_a_config_error(node: str) -> None:
    with pytest.raises(ConfigError, match="node-id"):
        build_broker(node=node)
    with pytest.raises(ConfigError, match="node-id"):
        ClusterBroker(node=node)


def test_with_an_authenticator_and_no_authorizer_the_claims_decide() -> None:
    """The same default whether the hub or build_broker makes the broker."""
    assert isinstance(build_broker(authenticator=Anyone()).authorizer, ClaimsAuthorizer)
    assert isinstance(build_broker(authenticator=Anyone(), node="n").authorizer, ClaimsAuthorizer)
    assert isinstance(Hub(authenticator=Anyone()).broker.authorizer, ClaimsAuthorizer)
    assert Hub().broker.authorizer is None
    assert build_broker().authorizer is None


def test_the_hub_runs_the_broker_it_is_given() -> None:
    broker = build_broker(BrokerConfig(max_rooms_per_connection=2), node="n1")
    hub = Hub(broker=broker)
    assert hub.broker is broker
    assert "roombus_backplane_online" in hub.metrics()
    assert "roombus_backplane_online" not in Hub().metrics()


@pytest.mark.parametrize(
    "extra", [{"broker_config": BrokerConfig()}, {"authorizer": ClaimsAuthorizer()}]
)
def test_a_broker_with_its_config_or_authorizer_besides_is_refused(
    extra: dict[str, object],
) -> None:
    with pytest.raises(ValueError, match="give them to it"):
        Hub(broker=Broker(), **extra)  # type: ignore[arg-type]


def test_a_messages_hub_checks_the_heartbeat_of_the_broker_it_is_given() -> None:
    with pytest.raises(ConfigError, match="heartbeat"):
        MessageHub(broker=Broker())
    quiet = Broker(BrokerConfig(heartbeat=False))
    assert MessageHub(broker=quiet).broker is quiet


BACKPLANE_EVENTS: list[Event] = [
    BackplaneLost(),
    BackplaneRestored(),
    RecordReceived(room=RoomName("r"), data=b"x"),
    RoomSynced(room=RoomName("r"), version=0, entries=(), gen=1),
]


@pytest.mark.parametrize("event", BACKPLANE_EVENTS)
def test_a_broker_on_its_own_refuses_backplane_events(event: Event) -> None:
    with pytest.raises(LocalProtocolError, match="no node"):
        Broker().handle(event, now=0.0, timestamp=0)


def test_both_brokers_refuse_what_is_not_an_event() -> None:
    for broker in (Broker(), ClusterBroker(node="n1")):
        with pytest.raises(LocalProtocolError, match="not an event"):
            broker.handle(object(), now=0.0, timestamp=0)  # type: ignore[arg-type]


def test_the_cluster_counters_stay_zero_on_a_node_on_its_own() -> None:
    stats = Broker().statistics()
    assert (stats.relay_unconfirmed, stats.presence_gaps, stats.backplane_online) == (0, 0, False)
    cluster = ClusterBroker(node="n1")
    assert cluster.statistics().backplane_online is False
    assert cluster.handle(BackplaneRestored(), now=0.0, timestamp=0) == []
    assert cluster.statistics().backplane_online is True


def test_a_cluster_broker_listens_to_the_room_of_its_first_joiner() -> None:
    broker = ClusterBroker(BrokerConfig(heartbeat=False), node="n1")
    broker.handle(BackplaneRestored(), now=0.0, timestamp=0)
    actions = broker.handle(
        ClientConnected(conn=ConnectionId(1), username=Username("ann"), room=RoomName("r")),
        now=0.0,
        timestamp=0,
    )
    assert actions == [Subscribe(room=RoomName("r"), gen=1)]  # joined once the room is read
    assert broker.rooms_of(ConnectionId(1)) == ["r"]
    assert broker.rooms == []
