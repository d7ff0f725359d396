"""What every adapter's server offers the application that embeds it, over its hub."""

from __future__ import annotations

import time

from ..core.events import Event
from ..core.names import RoomName
from ..core.streams import Publication
from ..server.hub import HubBase


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

    def _now(self) -> float:
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
