"""
The server API's operations on one hub: :class:`HubOperations`. Sans-IO.

Each method does its work through the hub's broker and carries out what follows
inside the hub (deliveries, closes, backplane work); the adapter then transmits, as
after any hub call. The results are the JSON objects the HTTP API answers with
(``docs/api-http.md``), and what the adapters' ``Server.api`` methods return.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Final, TypeAlias

from .._version import __version__
from ..core.actions import (
    Answer,
    ClusterAnswered,
    Control,
    ControlCommand,
    Deliver,
    DisconnectCommand,
    HistoryAnswered,
    KickCommand,
    PublishAnswered,
    ReadCluster,
)
from ..core.events import ClusterRead
from ..core.names import ConnectionId, RoomName, Username
from ..core.streams import Position
from .api import ApiError, Pending, Result, cursor_of, gather, map_result, room_of_cursor

if TYPE_CHECKING:
    from .hub import HubBase


#: What makes an operation's result of the broker's answer.
_Finish: TypeAlias = "Callable[[Answer], dict[str, object]]"

#: Seconds an operation waits for the backplane's answer before it fails with 503
#: ``backplane_timeout``.
API_TIMEOUT: Final = 5.0


def _position(position: Position | None) -> dict[str, object]:
    if position is None:
        return {"epoch": None, "seq": None}
    return {"epoch": position.epoch, "seq": position.seq}


class HubOperations:
    """
    :class:`~roombus.server.api.Operations` on *hub*: what this node knows and does.

    In a cluster, ``publish`` and ``broadcast`` reach every node (through the
    backplane) and answer the position Redis gave, ``history`` reads the room's
    stream in Redis (both :class:`~roombus.server.api.Pending` until the backplane
    answers, at most :attr:`timeout` seconds), ``disconnect`` and ``kick`` act here
    and are sent to every other node (the control channel: ``"cluster": true`` in
    the answer, whose ids are this node's), and ``presence`` lists the users of every
    node; the counts of connections and ``rooms`` are this node's.

    The broker answers a request made with a ticket with an action
    (:class:`~roombus.core.actions.PublishAnswered`,
    :class:`~roombus.core.actions.HistoryAnswered`), which the hub hands to
    :meth:`answered`; :meth:`next_deadline` and :meth:`expire`
    are the hub's timer for those still waiting.
    """

    def __init__(self, hub: HubBase) -> None:
        self.hub = hub
        #: Seconds to wait for the backplane's answer (503 ``backplane_timeout`` after).
        self.timeout = API_TIMEOUT
        self._tickets = 0
        self._waiting: dict[int, tuple[Pending[dict[str, object]], _Finish]] = {}
        self._deadlines: list[tuple[float, int]] = []

    # -- waiting for the broker's answers --------------------------------------------

    def _wait(self, now: float, finish: _Finish) -> tuple[int, Pending[dict[str, object]]]:
        """A new ticket and the result it will bring (*finish* of the answer)."""
        self._tickets += 1
        ticket = self._tickets
        pending: Pending[dict[str, object]] = Pending()
        self._waiting[ticket] = (pending, finish)
        heapq.heappush(self._deadlines, (now + self.timeout, ticket))
        self.hub.deadline_moved = True
        return ticket, pending

    @staticmethod
    def _settled(pending: Pending[dict[str, object]]) -> Result:
        """The result itself if it is known already (answered with the call)."""
        if pending.done:
            outcome = pending.outcome
            if isinstance(outcome, ApiError):
                raise outcome
            return outcome
        return pending

    def answered(self, answer: Answer, now: float, timestamp: int) -> None:
        """The broker answered a request of ours."""
        waiting = self._waiting.pop(answer.ticket, None)
        if waiting is None:
            return  # timed out already
        pending, finish = waiting
        pending.resolve(finish(answer), now, timestamp)

    def next_deadline(self) -> float | None:
        """When the first request still waiting times out, or None."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._waiting:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def expire(self, now: float, timestamp: int) -> None:
        """Fail the requests whose deadline passed (503 ``backplane_timeout``)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, ticket = heapq.heappop(deadlines)
            waiting = self._waiting.pop(ticket, None)
            if waiting is not None:
                waiting[0].fail(
                    ApiError(
                        503,
                        "backplane_timeout",
                        f"the backplane did not answer within {self.timeout:g} s",
                    ),
                    now,
                    timestamp,
                )

    @property
    def waiting(self) -> int:
        """Requests waiting for the broker's answer."""
        return len(self._waiting)

    # -- connection ids --------------------------------------------------------------

    def connection_id(self, cid: ConnectionId) -> str:
        """The API's name of a connection here: ``<node>/<n>`` in a cluster, else ``<n>``."""
        node = self.hub.broker.node
        return f"{node}/{cid}" if node is not None else str(cid)

    def _local(self, connection: str) -> ConnectionId | None:
        """The connection here that *connection* names, or None (another node's, or
        none)."""
        node, _, number = connection.rpartition("/")
        if (node or None) != self.hub.broker.node:
            return None
        if not (number.isascii() and number.isdigit() and len(number) < 19):
            return None
        return ConnectionId(int(number))

    def _tell_cluster(
        self, command: ControlCommand, result: dict[str, object], now: float, timestamp: int
    ) -> dict[str, object]:
        """On a node of a cluster, send *command* to the other nodes: ``"cluster"``
        says whether it was sent (not while cut off from Redis)."""
        hub = self.hub
        if hub.broker.node is None:
            return result
        actions = hub.broker.tell_cluster(command)
        hub._apply(actions, now, timestamp)
        result["cluster"] = any(type(a) is Control for a in actions)
        return result

    # -- publishing ------------------------------------------------------------------

    def publish(
        self,
        room: str,
        content: object,
        *,
        username: str,
        idempotency_key: str | None,
        now: float,
        timestamp: int,
    ) -> Result:
        hub = self.hub
        delivered = [0]

        def finish(answer: Answer) -> dict[str, object]:
            assert isinstance(answer, PublishAnswered)
            return {
                "room": room,
                **_position(answer.position),
                "delivered": delivered[0],
                "duplicate": answer.duplicate,
            }

        ticket, pending = self._wait(now, finish)
        actions = hub.broker.publish(
            room,
            content,
            username=username,
            timestamp=timestamp,
            now=now,
            msg_id=idempotency_key,
            ticket=ticket,
        )
        # (In a cluster the message reaches this node's members when Redis publishes
        # it: none here yet.)
        delivered[0] = sum(len(a.conns) for a in actions if type(a) is Deliver)
        hub._apply(actions, now, timestamp)  # a node alone answers at once
        return self._settled(pending)

    def broadcast(
        self, rooms: list[str], content: object, *, username: str, now: float, timestamp: int
    ) -> Result:
        results = [
            self.publish(
                room,
                content,
                username=username,
                idempotency_key=None,
                now=now,
                timestamp=timestamp,
            )
            for room in rooms
        ]

        def together(results: list[dict[str, object]]) -> dict[str, object]:
            for r in results:
                r.pop("duplicate", None)
            return {"results": results}

        return map_result(gather(results), together)

    # -- reading -----------------------------------------------------------------------

    def _read_cluster(
        self,
        now: float,
        timestamp: int,
        finish: Callable[[ClusterRead | None], dict[str, object]],
        **query: object,
    ) -> Result:
        """
        In a cluster, *finish* of Redis's answer to a ReadCluster of *query* (None if
        the link is lost first); on a node alone or cut off from Redis, *finish* of
        None at once.
        """
        hub = self.hub

        def answer(answered: Answer) -> dict[str, object]:
            assert isinstance(answered, ClusterAnswered)
            read = answered.read
            return finish(read if isinstance(read, ClusterRead) else None)

        ticket, pending = self._wait(now, answer)
        actions = hub.broker.read_cluster(ReadCluster(ticket=ticket, **query))  # type: ignore[arg-type]
        if not actions:
            self._waiting.pop(ticket, None)
            return finish(None)
        hub._apply(actions, now, timestamp)
        return self._settled(pending)

    def _present(self, room: str, read: ClusterRead | None) -> dict[str, set[str]]:
        """Who is in *room*, on which nodes: Redis's entries of the other nodes with
        this node's own users (or, with no read, what this node knows)."""
        broker = self.hub.broker
        if read is None:
            return broker.nodes_of(room)
        here = broker.node or ""
        users: dict[str, set[str]] = {}
        for node, user in read.entries:
            if node != here:
                users.setdefault(user, set()).add(node)
        for user in broker.counts(room):
            users.setdefault(user, set()).add(here)
        return users

    def presence(self, room: str, *, now: float, timestamp: int) -> Result:
        broker = self.hub.broker

        def finish(read: ClusterRead | None) -> dict[str, object]:
            counts = broker.counts(room)
            ids: dict[str, list[str]] = {}
            for cid in broker.connections(room):
                user = broker.username_of(cid)
                if user is not None:
                    ids.setdefault(user, []).append(self.connection_id(cid))
            present = self._present(room, read)
            users: list[dict[str, object]] = []
            for name in sorted(present):
                entry: dict[str, object] = {
                    "username": name,
                    "connections": counts.get(Username(name), 0),
                    "connection_ids": ids.get(name, []),
                }
                if broker.node is not None:
                    entry["nodes"] = len(present[name])
                users.append(entry)
            return {"room": room, "users": users}

        return self._read_cluster(now, timestamp, finish, kind="presence", room=room)

    def presence_stats(self, room: str, *, now: float, timestamp: int) -> Result:
        broker = self.hub.broker

        def finish(read: ClusterRead | None) -> dict[str, object]:
            return {
                "room": room,
                "users": len(self._present(room, read)),
                "connections": len(broker.connections(room)),
            }

        return self._read_cluster(now, timestamp, finish, kind="presence", room=room)

    def history(
        self,
        room: str,
        *,
        since: Position | None,
        limit: int | None,
        now: float,
        timestamp: int,
    ) -> Result:
        hub = self.hub

        def finish(answer: Answer) -> dict[str, object]:
            assert isinstance(answer, HistoryAnswered)
            return {
                "room": room,
                **_position(answer.position),
                "items": [json.loads(item) for item in answer.items],
            }

        ticket, pending = self._wait(now, finish)
        actions = hub.broker.history(room, since=since, limit=limit, ticket=ticket, now=now)
        hub._apply(actions, now, timestamp)  # a node alone answers at once
        return self._settled(pending)

    def rooms(
        self, *, pattern: str, cursor: str | None, limit: int, now: float, timestamp: int
    ) -> Result:
        broker = self.hub.broker
        after = room_of_cursor(cursor) if cursor is not None else None

        def counts(r: str, read: ClusterRead | None) -> dict[str, object]:
            if read is None:
                return {
                    "room": r,
                    "users": len(broker.members(r)),
                    "connections": len(broker.connections(r)),
                }
            return {
                "room": r,
                "users": len(broker.counts(r)),
                "connections": len(broker.connections(r)),
            }

        def finish(read: ClusterRead | None) -> dict[str, object]:
            if read is not None:  # the cluster's room index
                return {
                    "rooms": [counts(r, read) for r in read.rooms],
                    "cursor": cursor_of(read.more) if read.more else None,
                }
            names = sorted(r for r in broker.rooms if fnmatchcase(r, pattern))
            if after is not None:
                names = [r for r in names if r > after]
            page, more = names[:limit], len(names) > limit
            return {
                "rooms": [counts(r, None) for r in page],
                "cursor": cursor_of(page[-1]) if more else None,
            }

        return self._read_cluster(
            now, timestamp, finish, kind="rooms", pattern=pattern, after=after or "", limit=limit
        )

    def info(self, *, now: float, timestamp: int) -> Result:
        hub = self.hub
        broker = hub.broker

        def finish(read: ClusterRead | None) -> dict[str, object]:
            stats = broker.statistics()
            result: dict[str, object] = {
                "version": __version__,
                "node": broker.node,
                "connections": stats.connections,
                "transport_connections": hub.connection_count,
                "rooms": stats.rooms,
                "messages_published": stats.messages_published,
                "backplane": None if broker.node is None else {"online": stats.backplane_online},
            }
            if broker.node is not None:
                nodes = None if read is None else dict(read.nodes)
                if nodes is not None and broker.node not in nodes:
                    # Answering, this node is alive, whether or not it renewed its entry
                    # yet (a node with no user does at its first presence refresh).
                    nodes[broker.node] = 0
                result["nodes"] = (
                    None
                    if nodes is None
                    else [{"node": n, "seen_ms_ago": age} for n, age in sorted(nodes.items())]
                )
            return result

        return self._read_cluster(now, timestamp, finish, kind="nodes")

    # -- control -----------------------------------------------------------------------

    def disconnect(
        self,
        *,
        username: str | None,
        connection: str | None,
        code: int,
        reason: str,
        now: float,
        timestamp: int,
    ) -> dict[str, object]:
        hub = self.hub
        broker = hub.broker
        if connection is not None:
            cid = self._local(connection)
            targets = [cid] if cid is not None and cid in broker else []
        else:
            assert username is not None
            targets = broker.user_connections(username)
        for cid in targets:
            hub._apply(
                broker.disconnect(cid, code=code, reason=reason, timestamp=timestamp),
                now,
                timestamp,
            )
        result: dict[str, object] = {"disconnected": [self.connection_id(c) for c in targets]}
        if connection is not None and targets:
            return result  # this node's: nothing for the others
        command = DisconnectCommand(
            username=username, connection=connection, code=code, reason=reason
        )
        return self._tell_cluster(command, result, now, timestamp)

    def kick(
        self, room: str, username: str, *, reason: str, now: float, timestamp: int
    ) -> dict[str, object]:
        hub = self.hub
        broker = hub.broker
        before = [c for c in broker.connections(room) if broker.username_of(c) == username]
        hub._apply(broker.kick(room, username, reason=reason, timestamp=timestamp), now, timestamp)
        result: dict[str, object] = {
            "room": room,
            "kicked": [self.connection_id(cid) for cid in before],
        }
        command = KickCommand(room=RoomName(room), username=Username(username), reason=reason)
        return self._tell_cluster(command, result, now, timestamp)
