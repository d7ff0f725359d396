"""
The drain schedule: which connections to close when, so that a node that stops closes
its clients spread over a window instead of all at once. Sans-IO, pure.

Theory of operation
-------------------
A node that goes away (a rolling deploy, a scale-down) closes its clients with 1001,
and each reconnects, to another node. Closed all at once, they all reconnect at once:
a thundering herd on the nodes that remain. A drain spreads the closes over a window
of ``seconds`` instead.

The window ``[start, end]`` is cut into one slot per connection, of ``seconds / n``
each; the connections are shuffled (so that who goes first is not the order they
came in, nor a room at a time), and the i-th one's close falls at a uniformly random
instant within slot i. That is *stratified* jitter: each close is as likely at any
instant of the window as a uniform draw would make it, but they never bunch: a slice
of the window of length ``L`` meets at most ``ceil(L * n / seconds) + 1`` slots, so
it holds fewer than ``L * n / seconds + 2`` closes, and the last one falls by ``end``.

A connection that appears during the drain (a handshake that was in flight when it
began) is closed at a uniformly random instant of what is left of the window, or at
once if the window is over. A connection that goes away by itself meanwhile is
discarded. The driver asks :meth:`DrainSchedule.next_deadline` when to call
:meth:`DrainSchedule.due` next, and closes what that returns; each connection is
returned once, and every connection is returned by ``end``.

There is no clock and no I/O here: the time and the random source are arguments.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random as _random
from collections.abc import Callable, Iterable

from ..core.errors import LocalProtocolError
from ..core.names import ConnectionId


class DrainSchedule:
    """
    When to close each connection of a draining node.

    Args:
        conns: The connections to close, in any order (duplicates count once).
        now: The driver's clock at the start of the drain: the window's start.
        seconds: The window's length; 0 closes everything at *now*.
        random: A uniform ``[0, 1)`` source (the shuffle and the jitter).

    Raises:
        LocalProtocolError: if *seconds* is negative or not finite.
    """

    __slots__ = ("_heap", "_order", "_pending", "_random", "end", "start")

    def __init__(
        self,
        conns: Iterable[ConnectionId],
        *,
        now: float,
        seconds: float,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise LocalProtocolError(f"a drain window must be >= 0 seconds, not {seconds!r}")
        #: The window: every connection is closed by :attr:`end`.
        self.start = now
        self.end = now + seconds
        self._random = random
        self._order = itertools.count()  # ties in time: first scheduled, first closed
        unique = list(dict.fromkeys(conns))
        # Fisher-Yates with the given source: who goes when is independent of order.
        for i in range(len(unique) - 1, 0, -1):
            j = min(int(self._draw() * (i + 1)), i)
            unique[i], unique[j] = unique[j], unique[i]
        slot = seconds / len(unique) if unique else 0.0
        # (instant, order, cid); an entry is live while its order is the cid's own.
        self._heap: list[tuple[float, int, ConnectionId]] = []
        self._pending: dict[ConnectionId, int] = {}
        for i, cid in enumerate(unique):
            at = min(now + (i + self._draw()) * slot, self.end)
            order = next(self._order)
            self._heap.append((at, order, cid))  # already in time order: a heap
            self._pending[cid] = order

    def _draw(self) -> float:
        value = self._random()
        return value if 0.0 <= value < 1.0 else 0.0

    # -- inputs -----------------------------------------------------------------------

    def add(self, cid: ConnectionId, *, now: float) -> None:
        """*cid* appeared during the drain: close it within what is left of the window
        (at once if it is over). No-op for a connection already scheduled."""
        if cid in self._pending:
            return
        at = now + self._draw() * (self.end - now) if now < self.end else now
        order = next(self._order)
        self._pending[cid] = order
        heapq.heappush(self._heap, (at, order, cid))

    def discard(self, cid: ConnectionId) -> None:
        """*cid* went away by itself (or was closed otherwise): it is not to be closed."""
        self._pending.pop(cid, None)

    def due(self, now: float) -> list[ConnectionId]:
        """
        The connections to close at *now*, in their scheduled order, each returned
        once; at or after :attr:`end`, every one still pending.
        """
        heap = self._heap
        pending = self._pending
        out: list[ConnectionId] = []
        while heap and (heap[0][0] <= now or now >= self.end):
            _, order, cid = heapq.heappop(heap)
            if pending.get(cid) == order:
                del pending[cid]
                out.append(cid)
        return out

    # -- outputs ----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has a connection to close, or None if none is left."""
        heap = self._heap
        pending = self._pending
        while heap and pending.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    @property
    def done(self) -> bool:
        """Whether every connection was returned by :meth:`due` or discarded."""
        return not self._pending

    def __len__(self) -> int:
        """Connections still to close."""
        return len(self._pending)

    def __contains__(self, cid: object) -> bool:
        return cid in self._pending


__all__ = ["DrainSchedule"]
