"""
The server API on nodes of a cluster, sans-IO: hubs (``roombus.hub.Hub``) with a
``ClusterBroker`` each, over the in-memory backplane (``model.py``), called over HTTP
(``POST /api/<method>`` fed to the hub as bytes) and in process (``HubOperations``).

An API call whose answer is the backplane's (a publish's position, a history read)
holds its HTTP request until the answer comes, or 503 ``backplane_timeout`` after the
operations' timeout; the hub keeps serving meanwhile.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roombus import BrokerConfig, ServerConfig, Username
from roombus.cluster import BackplaneLost, BackplaneRestored, ClusterBroker
from roombus.cluster.control import encode_control
from roombus.core.actions import DisconnectCommand
from roombus.core.events import ClientConnected, ControlReceived, TextReceived
from roombus.hub import Hub
from roombus.lowlevel import Close, ConnectionId, Deliver, Event
from roombus.server.api import ApiError, Pending

from .model import ModelBackplane

TS = 1_700_000_000
KEY = "k" * 24
CONFIG = BrokerConfig(heartbeat=False, rate_limit=0, history_size=5)
NODES = ("n1", "n2")
#: The broker-only clients' ids start here (the hubs number their own from 1).
CLIENTS = 1000


@attrs.define
class Nodes:
    """Hubs of a cluster over the model backplane."""

    nodes: tuple[str, ...] = NODES
    hubs: dict[str, Hub] = attrs.field(init=False)
    bp: ModelBackplane = attrs.field(init=False)
    got: dict[tuple[str, int], list[dict[str, Any]]] = attrs.field(factory=dict)
    closed: dict[tuple[str, int], tuple[int, str]] = attrs.field(factory=dict)
    now: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.hubs = {
            n: Hub(broker=ClusterBroker(CONFIG, node=n), config=ServerConfig(api_keys=(KEY,)))
            for n in self.nodes
        }
        for node, hub in self.hubs.items():
            hub._apply = self._recording(node, hub._apply)  # type: ignore[method-assign]
        self.bp = ModelBackplane(self.nodes, self.event)
        for node in self.nodes:
            self.bp.restore(node)
            self.event(node, BackplaneRestored())

    def flush(self, node: str) -> None:
        hub = self.hubs[node]
        for action in hub.take_backplane():
            self.bp.submit(node, action)

    def event(self, node: str, event: Event) -> None:
        self.hubs[node].backplane_event(event, now=self.now, timestamp=TS)
        self.flush(node)

    def lose(self, node: str) -> None:
        self.bp.lose(node)
        self.event(node, BackplaneLost())

    def join(self, node: str, cid: int, user: str, room: str) -> None:
        """A WebSocket client of *node*'s broker (the broker alone: no wire; its id
        *cid* + CLIENTS, apart from the hub's own connections)."""
        cid += CLIENTS
        broker = self.hubs[node].broker
        for event in (
            ClientConnected(conn=ConnectionId(cid), username=Username(user)),
            TextReceived(conn=ConnectionId(cid), text=json.dumps({"type": "join", "room": room})),
        ):
            self.record(node, broker.handle(event, now=self.now, timestamp=TS))
        self.flush(node)

    def _recording(self, node: str, apply: Any) -> Any:
        """The hub's _apply, also noting what reaches the broker-only clients."""

        def recording(actions: list[Any], now: float, timestamp: int) -> None:
            for a in actions:
                if isinstance(a, Deliver):
                    for conn in a.conns:
                        if conn >= CLIENTS:
                            self.got.setdefault((node, conn), []).append(json.loads(a.payload))
                elif isinstance(a, Close) and a.conn >= CLIENTS:
                    self.closed[(node, a.conn - CLIENTS)] = (a.code, a.reason)
            apply(actions, now, timestamp)

        return recording

    def record(self, node: str, actions: list[Any]) -> None:
        self.hubs[node]._apply(actions, self.now, TS)

    def http(self, node: str, method: str, body: Any) -> int:
        """Send ``POST /api/<method>`` to *node*; the connection's id."""
        hub = self.hubs[node]
        cid = hub.open(now=self.now, peer="192.0.2.1:1")
        data = json.dumps(body).encode()
        hub.receive(
            cid,
            b"POST /api/%s HTTP/1.1\r\nHost: x\r\nAuthorization: apikey %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (method.encode(), KEY.encode(), len(data), data),
            now=self.now,
            timestamp=TS,
        )
        self.flush(node)
        return cid

    def answer(self, node: str, cid: int) -> tuple[int, Any] | None:
        """*cid*'s HTTP answer (status, JSON body), or None while it waits."""
        queue = self.hubs[node].queue(cid)
        if queue is None or not queue:
            return None
        head, _, body = bytes(queue.data()).partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body)

    def call(self, node: str, method: str, body: Any) -> Any:
        """*method* over HTTP on *node*, the backplane drained: its 200 answer."""
        cid = self.http(node, method, body)
        self.bp.drain()
        answer = self.answer(node, cid)
        assert answer is not None and answer[0] == 200, answer
        return answer[1]

    def chats(self, node: str, cid: int) -> list[tuple[int, Any]]:
        return [
            (e["seq"], e["content"])
            for e in self.got.get((node, cid + CLIENTS), [])
            if e["type"] == "chat"
        ]


def test_publish_over_http_waits_for_the_position_redis_gives() -> None:
    net = Nodes()
    net.join("n1", 1, "ann", "lobby")
    net.join("n2", 2, "bob", "lobby")
    net.bp.drain()
    cid = net.http("n1", "publish", {"room": "lobby", "content": "hi"})
    assert net.answer("n1", cid) is None  # held: Redis has not answered
    net.bp.drain()
    status, body = net.answer("n1", cid)  # type: ignore[misc]
    assert status == 200
    assert body["epoch"] and body["seq"] == 1 and body["duplicate"] is False
    # Both nodes' members got it at that position.
    for node, conn in (("n1", 1), ("n2", 2)):
        assert net.chats(node, conn) == [(1, "hi")]


def test_publish_to_a_room_with_no_member_here_still_answers_its_position() -> None:
    net = Nodes()
    net.join("n2", 2, "bob", "lobby")
    net.bp.drain()
    ops = net.hubs["n1"].operations
    result = ops.publish(
        "lobby", {"n": 1}, username="api", idempotency_key=None, now=net.now, timestamp=TS
    )
    assert isinstance(result, Pending) and not result.done
    net.flush("n1")
    net.bp.drain()
    assert result.done
    outcome = result.outcome
    assert not isinstance(outcome, ApiError)
    assert outcome["seq"] == 1 and outcome["epoch"] == "E1"
    assert net.chats("n2", 2) == [(1, {"n": 1})]


def test_an_idempotency_key_answers_the_first_position_across_nodes() -> None:
    net = Nodes()
    net.join("n1", 1, "ann", "lobby")
    net.bp.drain()
    first = net.http("n1", "publish", {"room": "lobby", "content": 1, "idempotency_key": "j1"})
    net.bp.drain()
    again = net.http("n2", "publish", {"room": "lobby", "content": 1, "idempotency_key": "j1"})
    net.bp.drain()
    a, b = net.answer("n1", first), net.answer("n2", again)
    assert a is not None and b is not None
    assert (a[1]["seq"], a[1]["duplicate"]) == (1, False)
    assert (b[1]["seq"], b[1]["duplicate"], b[1]["epoch"]) == (1, True, a[1]["epoch"])
    assert len(net.chats("n1", 1)) == 1


def test_history_reads_what_another_node_published() -> None:
    net = Nodes()
    net.join("n2", 2, "bob", "lobby")
    net.bp.drain()
    for i in range(7):
        net.http("n2", "publish", {"room": "lobby", "content": i})
        net.bp.drain()
    cid = net.http("n1", "history", {"room": "lobby", "limit": 3})
    assert net.answer("n1", cid) is None
    net.bp.drain()
    status, body = net.answer("n1", cid)  # type: ignore[misc]
    assert status == 200
    assert body["seq"] == 7 and [i["content"] for i in body["items"]] == [4, 5, 6]
    since = net.http(
        "n1", "history", {"room": "lobby", "since": {"epoch": body["epoch"], "seq": 5}}
    )
    net.bp.drain()
    assert [i["seq"] for i in net.answer("n1", since)[1]["items"]] == [6, 7]  # type: ignore[index]
    # A position of another epoch: the latest ones.
    other = net.http("n1", "history", {"room": "lobby", "since": {"epoch": "zz", "seq": 1}})
    net.bp.drain()
    assert [i["seq"] for i in net.answer("n1", other)[1]["items"]] == [3, 4, 5, 6, 7]  # type: ignore[index]


def test_no_answer_within_the_timeout_is_503_and_the_late_answer_changes_nothing() -> None:
    net = Nodes()
    hub = net.hubs["n1"]
    cid = net.http("n1", "publish", {"room": "lobby", "content": "x"})
    deadline = hub.next_deadline()
    assert deadline == pytest.approx(net.now + hub.operations.timeout)
    hub.timeout(now=deadline, timestamp=TS)  # type: ignore[arg-type]
    status, body = net.answer("n1", cid)  # type: ignore[misc]
    assert status == 503 and body["error"]["code"] == "backplane_timeout"
    net.bp.drain()  # Redis answers late: nothing more for anyone
    assert hub.operations.waiting == 0


def test_a_lost_link_answers_what_is_waiting() -> None:
    net = Nodes()
    net.join("n1", 1, "ann", "lobby")
    net.bp.drain()
    pub = net.http("n1", "publish", {"room": "lobby", "content": "x"})
    hist = net.http("n1", "history", {"room": "lobby"})
    net.lose("n1")
    status, body = net.answer("n1", pub)  # type: ignore[misc]
    assert status == 200 and body["seq"] is None  # its fate is unknown
    status, body = net.answer("n1", hist)  # type: ignore[misc]
    assert status == 200 and body["epoch"]  # what this node keeps, in its own numbering
    # Offline, a publish is numbered here and answered at once.
    now = net.http("n1", "publish", {"room": "lobby", "content": "y"})
    status, body = net.answer("n1", now)  # type: ignore[misc]
    assert status == 200 and body["seq"] is not None and body["delivered"] == 1


def test_a_batch_holds_the_calls_after_an_awaited_one() -> None:
    net = Nodes()
    net.join("n2", 2, "bob", "lobby")
    net.bp.drain()
    cid = net.http(
        "n1",
        "batch",
        {
            "calls": [
                {"method": "presence_stats", "params": {"room": "lobby"}},
                {"method": "publish", "params": {"room": "lobby", "content": 1}},
                {"method": "nope"},
                {"method": "publish", "params": {"room": "lobby", "content": 2}},
                {"method": "history", "params": {"room": "lobby"}},
            ]
        },
    )
    assert net.answer("n1", cid) is None
    net.bp.drain()
    status, body = net.answer("n1", cid)  # type: ignore[misc]
    assert status == 200
    results = body["results"]
    assert [r["status"] for r in results] == [200, 200, 404, 200, 200]
    assert results[1]["result"]["seq"] == 1 and results[3]["result"]["seq"] == 2
    # In order: the history read after both publishes sees both.
    assert [i["content"] for i in results[4]["result"]["items"]] == [1, 2]


def test_broadcast_answers_every_room_s_position() -> None:
    net = Nodes()
    net.join("n2", 2, "bob", "a")
    net.bp.drain()
    cid = net.http("n1", "broadcast", {"rooms": ["a", "b"], "content": "all"})
    net.bp.drain()
    status, body = net.answer("n1", cid)  # type: ignore[misc]
    assert status == 200
    assert [(r["room"], r["seq"]) for r in body["results"]] == [("a", 1), ("b", 1)]
    assert all("duplicate" not in r for r in body["results"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["publish", "history", "presence_stats"]), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_interleaved_api_calls_are_each_answered_once(
    calls: list[tuple[str, bool]], rnd: Any
) -> None:
    """However the backplane's work interleaves, every call on either node is answered
    exactly once, a publish with a position no other publish has."""
    net = Nodes()
    net.join("n2", 2, "bob", "lobby")
    net.bp.drain()
    sent = []
    for method, on_n1 in calls:
        node = "n1" if on_n1 else "n2"
        body = {"room": "lobby"} | ({"content": 1} if method == "publish" else {})
        sent.append((node, method, net.http(node, method, body)))
        for _ in range(rnd.randint(0, 3)):
            work = net.bp.work(reorder=False)
            if work:
                net.bp.step(rnd.choice(work))
    net.bp.drain()
    seqs = []
    for node, method, cid in sent:
        answer = net.answer(node, cid)
        assert answer is not None and answer[0] == 200, (node, method, answer)
        if method == "publish":
            seqs.append(answer[1]["seq"])
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    for hub in net.hubs.values():
        assert hub.operations.waiting == 0


def members(net: Nodes, node: str, room: str) -> list[str]:
    """The users of *room* on every node, as *node*'s ``presence`` answers (Redis's)."""
    return [u["username"] for u in net.call(node, "presence", {"room": room})["users"]]


def test_disconnect_on_one_node_closes_the_user_everywhere() -> None:
    net = Nodes()
    net.join("n1", 1, "ann", "lobby")
    net.join("n2", 2, "ann", "lobby")
    net.join("n2", 3, "bob", "lobby")
    net.bp.drain()
    cid = net.http("n1", "disconnect", {"username": "ann", "code": 4001, "reason": "banned"})
    status, body = net.answer("n1", cid)  # type: ignore[misc]
    assert status == 200
    assert body == {"disconnected": ["n1/1001"], "cluster": True}
    net.bp.drain()
    assert net.closed == {("n1", 1): (4001, "banned"), ("n2", 2): (4001, "banned")}
    assert members(net, "n2", "lobby") == ["bob"]
    left = [e for e in net.got[("n2", 1003)] if e["type"] == "presence"]
    assert (left[-1]["event"], left[-1]["username"]) == ("leave", "ann")


def test_a_connection_of_another_node_is_closed_there() -> None:
    net = Nodes()
    net.join("n2", 2, "ann", "lobby")
    net.join("n2", 3, "ann", "lobby")
    net.bp.drain()
    cid = net.http("n1", "disconnect", {"connection": "n2/1003", "code": 3000})
    assert net.answer("n1", cid) == (200, {"disconnected": [], "cluster": True})
    net.bp.drain()
    assert list(net.closed) == [("n2", 3)]
    # One of this node's: closed here, nothing sent.
    net.join("n1", 4, "cat", "lobby")
    cid = net.http("n1", "disconnect", {"connection": "n1/1004"})
    assert net.answer("n1", cid) == (200, {"disconnected": ["n1/1004"]})


def test_kick_on_one_node_removes_the_user_from_the_room_everywhere() -> None:
    net = Nodes()
    net.join("n1", 1, "bob", "lobby")
    net.join("n2", 2, "ann", "lobby")
    net.join("n2", 3, "ann", "other")
    net.bp.drain()
    assert members(net, "n1", "lobby") == ["ann", "bob"]
    cid = net.http("n1", "kick", {"room": "lobby", "username": "ann", "reason": "be nice"})
    assert net.answer("n1", cid) == (200, {"room": "lobby", "kicked": [], "cluster": True})
    net.bp.drain()
    kicked = [e for e in net.got[("n2", 1002)] if e["type"] == "error"]
    assert [(e["code"], e["room"], e["content"]) for e in kicked] == [
        ("kicked", "lobby", "be nice")
    ]
    assert members(net, "n1", "lobby") == ["bob"]  # (n2 has no member of it left)
    assert net.hubs["n2"].broker.connections("lobby") == []
    assert members(net, "n2", "other") == ["ann"]  # still open, in its other rooms
    assert not net.closed
    left = [e for e in net.got[("n1", 1001)] if e["type"] == "presence"]
    assert left[-1]["event"] == "leave" and left[-1]["username"] == "ann"


def test_cut_off_from_redis_a_command_is_this_node_s_only() -> None:
    net = Nodes()
    net.join("n1", 1, "ann", "lobby")
    net.join("n2", 2, "ann", "lobby")
    net.bp.drain()
    net.lose("n1")
    cid = net.http("n1", "disconnect", {"username": "ann"})
    assert net.answer("n1", cid) == (200, {"disconnected": ["n1/1001"], "cluster": False})
    net.bp.drain()
    assert list(net.closed) == [("n1", 1)]


def test_a_node_ignores_its_own_commands_and_what_is_not_one() -> None:
    net = Nodes()
    net.join("n1", 1, "ann", "lobby")
    net.bp.drain()
    hub = net.hubs["n1"]
    own = encode_control("n1", DisconnectCommand(username="ann", code=4000))
    for data in (own, b"garbage", b'{"v":1}'):
        hub.backplane_event(ControlReceived(data=data), now=0, timestamp=TS)
    assert not net.closed


def test_presence_of_a_room_with_no_member_here_lists_every_node_s_users() -> None:
    net = Nodes(("n1", "n2", "n3"))
    net.join("n2", 1, "bob", "far")
    net.join("n3", 2, "bob", "far")
    net.join("n3", 3, "cy", "far")
    net.bp.drain()
    body = net.call("n1", "presence", {"room": "far"})
    assert body == {
        "room": "far",
        "users": [
            {"username": "bob", "connections": 0, "connection_ids": [], "nodes": 2},
            {"username": "cy", "connections": 0, "connection_ids": [], "nodes": 1},
        ],
    }
    assert net.call("n1", "presence_stats", {"room": "far"}) == {
        "room": "far",
        "users": 2,
        "connections": 0,
    }
    # On a node with members: its own connections and ids, every node's users.
    net.join("n1", 4, "bob", "far")
    net.bp.drain()
    users = net.call("n1", "presence", {"room": "far"})["users"]
    assert users[0] == {
        "username": "bob",
        "connections": 1,
        "connection_ids": ["n1/1004"],
        "nodes": 3,
    }


def test_presence_cut_off_from_redis_answers_this_node_s_view_at_once() -> None:
    net = Nodes()
    net.join("n2", 1, "bob", "far")
    net.bp.drain()
    net.lose("n1")
    cid = net.http("n1", "presence", {"room": "far"})
    assert net.answer("n1", cid) == (200, {"room": "far", "users": []})
    status, body = net.answer("n1", net.http("n1", "info", {}))  # type: ignore[misc]
    assert status == 200 and body["nodes"] is None and body["backplane"] == {"online": False}


def test_a_read_of_the_cluster_in_flight_when_the_link_goes_answers_this_node_s_view() -> None:
    net = Nodes()
    net.join("n1", 1, "ann", "lobby")
    net.join("n2", 2, "bob", "lobby")
    net.bp.drain()
    cid = net.http("n1", "rooms", {})
    assert net.answer("n1", cid) is None  # waits for Redis
    net.lose("n1")
    status, body = net.answer("n1", cid)  # type: ignore[misc]
    assert status == 200
    assert body == {"rooms": [{"room": "lobby", "users": 2, "connections": 1}], "cursor": None}
    assert net.hubs["n1"].operations.waiting == 0


def test_rooms_lists_the_rooms_of_every_node_by_pattern_and_page() -> None:
    net = Nodes(("n1", "n2", "n3"))
    net.join("n1", 1, "ann", "t1:a")
    for i, room in enumerate(["t1:b", "t1:c", "t1:d", "t2:a"]):
        net.join("n2" if i % 2 else "n3", 10 + i, "bob", room)
    net.bp.drain()
    seen: list[dict[str, Any]] = []
    body = net.call("n1", "rooms", {"pattern": "t1:*", "limit": 2})
    while True:
        seen.extend(body["rooms"])
        if body["cursor"] is None:
            break
        body = net.call("n1", "rooms", {"pattern": "t1:*", "limit": 2, "cursor": body["cursor"]})
    assert [r["room"] for r in seen] == ["t1:a", "t1:b", "t1:c", "t1:d"]
    # The counts are this node's.
    assert seen[0] == {"room": "t1:a", "users": 1, "connections": 1}
    assert seen[1] == {"room": "t1:b", "users": 0, "connections": 0}
    # A room whose members' node died leaves the index once the TTL has passed.
    net.bp.kill("n3")
    names = [r["room"] for r in net.call("n1", "rooms", {})["rooms"]]
    assert names == ["t1:a", "t1:c", "t2:a"]


def test_info_lists_the_live_nodes() -> None:
    net = Nodes(("n1", "n2", "n3"))
    body = net.call("n1", "info", {})
    assert body["node"] == "n1" and body["backplane"] == {"online": True}
    assert body["nodes"] == [
        {"node": "n1", "seen_ms_ago": 0},
        {"node": "n2", "seen_ms_ago": 0},
        {"node": "n3", "seen_ms_ago": 0},
    ]
    net.bp.kill("n2")
    assert [n["node"] for n in net.call("n1", "info", {})["nodes"]] == ["n1", "n3"]
    assert net.hubs["n1"].operations.waiting == 0
