"""
Test an application's rooms without sockets: a client connected in memory to a
roombus trio :class:`~roombus.trio.Server` running in the same process.

::

    server = roombus.trio.Server(roombus.Settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(roombus.trio.run_server, server)
        async with roombus.client.testing.connect(server, ["lobby"], username="ann") as ann:
            await ann.publish("lobby", "hi")

Everything the server does happens as over TCP (the handshake, frames, queues,
presence, positions): only the socket is replaced, by a ``trio.testing`` memory stream
pair, so a test runs in milliseconds (and under trio's autojump clock).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio.testing

import trio

from ..trio import Server
from ._trio import Client
from ._trio import connect as _connect

__all__ = ["connect"]


@asynccontextmanager
async def connect(
    server: Server, rooms: Iterable[str] = (), **options: Any
) -> AsyncIterator[Client]:
    """
    A client of *server* (a running :class:`roombus.trio.Server`) over memory streams;
    the keyword arguments are :func:`roombus.client.connect`'s but ``stream_factory``.
    Each (re)connection is a new stream pair served by ``server.handle_stream``.
    """
    async with trio.open_nursery() as nursery:

        async def factory() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, theirs, "memory")
            return ours

        async with _connect("ws://roombus.test/ws", rooms, stream_factory=factory, **options) as c:
            yield c
        nursery.cancel_scope.cancel()
