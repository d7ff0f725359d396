"""What every adapter's server offers the application that embeds it, over its hub."""

from __future__ import annotations

import time
from typing import Any, Protocol

from ..core.events import Event
from ..core.names import RoomName
from ..core.streams import Position, Publication
from ..server import api as _api
from ..server.hub import HubBase


class Waiter(Protocol):
    """An event of the adapter's loop (``trio.Event``, ``asyncio.Event``)."""

    def set(self) -> None: ...

    async def wait(self) -> Any: ...


def wall() -> int:
    """Wall-clock Unix seconds, the ``timestamp`` adapters stamp on envelopes."""
    return int(time.time())


class ServerFacade:
    """
    The app-facing part of a running server, the same for every transport.

    A subclass provides :attr:`hub`, its clock (``_now``) and :meth:`transmit`, the one
    routine that carries out the hub's outputs. Every adapter calls it after every
    call into the hub, and each does the same four steps in the same order
    (docs/adapters.md, "transmit"):

    1. **close**: ``hub.take_to_close()``: end each of these connections;
    2. **write**: what is dirty (``hub.has_dirty()``, ``take_dirty()`` or
       ``take_dirty_messages()``) goes to its writer: a flusher's next sweep, a flush
       callback, or the connection's writer task;
    3. **backplane**: ``hub.take_backplane()`` goes to ``backplane.submit()``;
    4. **timer**: if ``hub.deadline_moved``, clear it and re-arm the one timer at
       ``hub.next_deadline()``.
    """

    hub: HubBase
    _server_api: ServerApi | None = None

    @property
    def api(self) -> ServerApi:
        """The server API in process: the operations of ``POST /api/<method>``, as
        async methods returning the same JSON results (``docs/api-http.md``)."""
        if self._server_api is None:
            self._server_api = ServerApi(self)
        return self._server_api

    def _now(self) -> float:
        raise NotImplementedError

    def _waiter(self) -> Waiter:
        """A new event of the adapter's loop (what an awaited API call waits on)."""
        raise NotImplementedError

    def transmit(self) -> None:
        """Carry out the hub's outputs (the four steps above). Cheap when there are
        none; the adapter calls it, an application never needs to."""
        raise NotImplementedError

    async def drain(self, seconds: float | None = None) -> None:
        """
        Shut down gracefully, spread over time, and return once done: ``/healthz``
        answers 503 and new WebSockets are refused at once; the open ones are closed
        with 1001 at jittered instants over *seconds* (None:
        ``config.drain_seconds``; 0: all at once), and get their messages until then;
        then the adapter's shutdown (``close_timeout`` for the last answers). What
        ``roombus serve`` does on SIGTERM; a second signal closes the rest at once.
        """
        raise NotImplementedError

    @property
    def draining(self) -> bool:
        """Whether a drain began (``/healthz`` answers 503)."""
        return self.hub.draining

    def publish(self, room: str, content: object, *, username: str = "server") -> Publication:
        """
        Publish a chat message to every member of *room*, as *username*.

        Returns:
            How many connections here it was delivered to (``delivered``, 0 if the
            room has no members), and its position in the room's stream
            (``position``: epoch and seq; None in a cluster). The message is kept in
            the room's history even if nobody is in the room now.

        Raises:
            ValueError: if the room or username is invalid or content is not JSON.
        """
        count = self.hub.publish(
            room, content, username=username, now=self._now(), timestamp=wall()
        )
        self.transmit()
        return count

    # -- what the backplane calls (its host) -------------------------------------------

    def backplane_events(self, events: list[Event]) -> None:
        """Hand the broker what the backplane learnt (the other nodes' doings), then
        carry out its outputs once."""
        hub = self.hub
        now, timestamp = self._now(), wall()
        for event in events:
            hub.backplane_event(event, now=now, timestamp=timestamp)
        self.transmit()

    def local_presence(self) -> list[tuple[RoomName, list[str]]]:
        """Each room with members here, and its users here (for the backplane)."""
        return [(room, list(users)) for room, users in self.hub.broker.local_presence()]

    @property
    def connection_count(self) -> int:
        """Open WebSocket connections."""
        return self.hub.websocket_count

    @property
    def overflows(self) -> int:
        """Slow consumers closed (send queue over its bound) since the start."""
        return self.hub.overflows


def _since(since: Position | dict[str, object] | None) -> object:
    if isinstance(since, Position):
        return {"epoch": since.epoch, "seq": since.seq}
    return since


class ServerApi:
    """
    The server API of a running server, in process: ``await server.api.publish(...)``.

    Every method takes the fields of its HTTP method (``docs/api-http.md``) as
    keyword arguments and returns its JSON result; it validates them as the HTTP API
    does, and raises :class:`~roombus.server.api.ApiError` (a ``ValueError``, with
    ``status``, ``code`` and ``field``) where the HTTP API answers 4xx. No key is
    needed: the application has every scope. Call them from the server's event loop
    (its thread). They are coroutines so that a cluster-wide operation may wait for
    the other nodes without changing their signature.
    """

    def __init__(self, server: ServerFacade) -> None:
        self._server = server

    async def call(self, method: str, /, **params: Any) -> dict[str, object]:
        """
        Method *method* (``"publish"``, ...) with *params*: its result. In a cluster
        some wait for the backplane's answer (``publish``'s position, ``history``), at
        most the operations' ``timeout`` (then ``ApiError`` 503 ``backplane_timeout``).
        """
        server = self._server
        params = {k: v for k, v in params.items() if v is not None}
        try:
            result = _api.call(
                server.hub.operations, method, params, now=server._now(), timestamp=wall()
            )
        finally:
            server.transmit()
        if not isinstance(result, _api.Pending):
            return result
        if not result.done:
            waiter = server._waiter()
            result.then(lambda *_: waiter.set())
            await waiter.wait()
        outcome = result.outcome
        if isinstance(outcome, _api.ApiError):
            raise outcome
        return outcome

    async def publish(
        self,
        room: str,
        content: object,
        *,
        username: str = "api",
        idempotency_key: str | None = None,
    ) -> dict[str, object]:
        """Publish *content* to *room*: ``{"room", "epoch", "seq", "delivered", "duplicate"}``."""
        return await self.call(
            "publish",
            room=room,
            content=content,
            username=username,
            idempotency_key=idempotency_key,
        )

    async def broadcast(
        self, rooms: list[str], content: object, *, username: str = "api"
    ) -> dict[str, object]:
        """Publish *content* to each of *rooms*: ``{"results": [publish's, ...]}``."""
        return await self.call("broadcast", rooms=rooms, content=content, username=username)

    async def presence(self, room: str) -> dict[str, object]:
        """The users in *room*, each with its connections: ``{"room", "users": [...]}``."""
        return await self.call("presence", room=room)

    async def presence_stats(self, room: str) -> dict[str, object]:
        """How many users and connections *room* has."""
        return await self.call("presence_stats", room=room)

    async def history(
        self,
        room: str,
        *,
        since: Position | dict[str, object] | None = None,
        limit: int | None = None,
    ) -> dict[str, object]:
        """The kept chats of *room* after *since* (the latest without), at most *limit*."""
        return await self.call("history", room=room, since=_since(since), limit=limit)

    async def disconnect(
        self,
        *,
        username: str | None = None,
        connection: str | None = None,
        code: int = 1000,
        reason: str | None = None,
    ) -> dict[str, object]:
        """Close a user's connections, or one connection, with *code* (1000, 3000-4999)."""
        return await self.call(
            "disconnect", username=username, connection=connection, code=code, reason=reason
        )

    async def kick(
        self, room: str, username: str, *, reason: str | None = None
    ) -> dict[str, object]:
        """Remove *username*'s connections from *room* (they stay open)."""
        return await self.call("kick", room=room, username=username, reason=reason)

    async def rooms(
        self, *, pattern: str = "*", cursor: str | None = None, limit: int = 100
    ) -> dict[str, object]:
        """One page of the rooms matching *pattern*: ``{"rooms": [...], "cursor"}``."""
        return await self.call("rooms", pattern=pattern, cursor=cursor, limit=limit)

    async def info(self) -> dict[str, object]:
        """This node: its id, connections, rooms and backplane state."""
        return await self.call("info")
