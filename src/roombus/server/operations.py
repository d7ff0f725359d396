"""
The server API's operations on one hub: :class:`HubOperations`. Sans-IO.

Each method does its work through the hub's broker and carries out what follows
inside the hub (deliveries, closes, backplane work); the adapter then transmits, as
after any hub call. The results are the JSON objects the HTTP API answers with
(``docs/api-http.md``), and what the adapters' ``Server.api`` methods return.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from .._version import __version__
from ..core.actions import Deliver, MessagePublished
from ..core.names import ConnectionId, RoomName
from ..core.streams import Position
from .api import ApiError, cursor_of, room_of_cursor

if TYPE_CHECKING:
    from .hub import HubBase


def _position(position: Position | None) -> dict[str, object]:
    if position is None:
        return {"epoch": None, "seq": None}
    return {"epoch": position.epoch, "seq": position.seq}


class HubOperations:
    """
    :class:`~roombus.server.api.Operations` on *hub*: what this node knows and does.

    In a cluster, ``publish`` and ``broadcast`` reach every node (through the
    backplane) and ``presence`` lists the users of every node; the counts of
    connections, ``disconnect``, ``kick`` and ``rooms`` are this node's.
    """

    def __init__(self, hub: HubBase) -> None:
        self.hub = hub

    # -- connection ids --------------------------------------------------------------

    def connection_id(self, cid: ConnectionId) -> str:
        """The API's name of a connection here: ``<node>/<n>`` in a cluster, else ``<n>``."""
        node = self.hub.broker.node
        return f"{node}/{cid}" if node is not None else str(cid)

    def _local(self, connection: str) -> ConnectionId | None:
        node, _, number = connection.rpartition("/")
        own = self.hub.broker.node
        if (node or None) != own:
            if own is not None and node:
                raise ApiError(
                    501,
                    "not_implemented",
                    f"connection {connection!r} is on another node; only this node's "
                    "connections can be closed by id yet",
                    "connection",
                )
            return None
        if not (number.isascii() and number.isdigit() and len(number) < 19):
            return None
        return ConnectionId(int(number))

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
    ) -> dict[str, object]:
        hub = self.hub
        broker = hub.broker
        actions = broker.publish(
            room, content, username=username, timestamp=timestamp, now=now, msg_id=idempotency_key
        )
        hub._apply(actions, now, timestamp)
        position: Position | None = None
        for a in actions:
            if type(a) is MessagePublished and a.epoch:
                position = Position(a.epoch, a.seq)
        duplicate = False
        if position is None and idempotency_key is not None and broker.node is None:
            position = broker.acknowledged(room, username, idempotency_key)
            duplicate = position is not None
        return {
            "room": room,
            **_position(position),
            "delivered": sum(len(a.conns) for a in actions if type(a) is Deliver),
            "duplicate": duplicate,
        }

    def broadcast(
        self, rooms: list[str], content: object, *, username: str, now: float, timestamp: int
    ) -> dict[str, object]:
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
        for r in results:
            del r["duplicate"]
        return {"results": results}

    # -- reading -----------------------------------------------------------------------

    def presence(self, room: str, *, now: float, timestamp: int) -> dict[str, object]:
        broker = self.hub.broker
        counts = broker.counts(room)
        ids: dict[str, list[str]] = {}
        for cid in broker.connections(room):
            user = broker.username_of(cid)
            if user is not None:
                ids.setdefault(user, []).append(self.connection_id(cid))
        return {
            "room": room,
            "users": [
                {
                    "username": user,
                    "connections": counts.get(user, 0),
                    "connection_ids": ids.get(user, []),
                }
                for user in broker.members(room)
            ],
        }

    def presence_stats(self, room: str, *, now: float, timestamp: int) -> dict[str, object]:
        broker = self.hub.broker
        return {
            "room": room,
            "users": len(broker.members(room)),
            "connections": len(broker.connections(room)),
        }

    def history(
        self,
        room: str,
        *,
        since: Position | None,
        limit: int | None,
        now: float,
        timestamp: int,
    ) -> dict[str, object]:
        broker = self.hub.broker
        if broker.node is not None and broker.statistics().backplane_online:
            raise ApiError(
                501,
                "not_implemented",
                "history over the API is not available on a node of a cluster yet "
                "(read it over a WebSocket)",
            )
        size = broker.streams.policy(RoomName(room)).size
        count = size if limit is None else min(limit, size)
        position, items = broker.streams.history(
            RoomName(room), since, count, now, broker.config.send_queue_bytes // 2
        )
        return {
            "room": room,
            **_position(position),
            "items": [json.loads(item) for item in items],
        }

    def rooms(
        self, *, pattern: str, cursor: str | None, limit: int, now: float, timestamp: int
    ) -> dict[str, object]:
        broker = self.hub.broker
        after = room_of_cursor(cursor) if cursor is not None else None
        names = sorted(r for r in broker.rooms if fnmatchcase(r, pattern))
        if after is not None:
            names = [r for r in names if r > after]
        page, more = names[:limit], len(names) > limit
        return {
            "rooms": [
                {
                    "room": r,
                    "users": len(broker.members(r)),
                    "connections": len(broker.connections(r)),
                }
                for r in page
            ],
            "cursor": cursor_of(page[-1]) if more else None,
        }

    def info(self, *, now: float, timestamp: int) -> dict[str, object]:
        hub = self.hub
        broker = hub.broker
        stats = broker.statistics()
        return {
            "version": __version__,
            "node": broker.node,
            "connections": stats.connections,
            "transport_connections": hub.connection_count,
            "rooms": stats.rooms,
            "messages_published": stats.messages_published,
            "backplane": None if broker.node is None else {"online": stats.backplane_online},
        }

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
        return {"disconnected": [self.connection_id(cid) for cid in targets]}

    def kick(
        self, room: str, username: str, *, reason: str, now: float, timestamp: int
    ) -> dict[str, object]:
        hub = self.hub
        broker = hub.broker
        before = [c for c in broker.connections(room) if broker.username_of(c) == username]
        hub._apply(broker.kick(room, username, reason=reason, timestamp=timestamp), now, timestamp)
        return {"room": room, "kicked": [self.connection_id(cid) for cid in before]}
