"""What every adapter's server offers the application that embeds it, over its hub."""

from __future__ import annotations

import time

from ..server.hub import HubBase


def wall() -> int:
    """Wall-clock Unix seconds, the ``timestamp`` adapters stamp on envelopes."""
    return int(time.time())


class ServerFacade:
    """
    The app-facing part of a running server, the same for every transport.

    A subclass provides :attr:`hub`, its clock (``_now``) and the carrying out of the
    hub's outputs after a call (``_after``).
    """

    hub: HubBase

    def _now(self) -> float:
        raise NotImplementedError

    def _after(self) -> None:
        raise NotImplementedError

    def publish(self, room: str, content: object, *, username: str = "server") -> int:
        """
        Publish a chat message to every member of *room*, as *username*.

        Returns:
            How many connections it was delivered to (0 if the room has no members).

        Raises:
            ValueError: if the room or username is invalid or content is not JSON.
        """
        count = self.hub.publish(
            room, content, username=username, now=self._now(), timestamp=wall()
        )
        self._after()
        return count

    @property
    def connection_count(self) -> int:
        """Open WebSocket connections."""
        return self.hub.websocket_count

    @property
    def overflows(self) -> int:
        """Slow consumers closed (send queue over its bound) since the start."""
        return self.hub.overflows
