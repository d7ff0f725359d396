"""
Test an application's rooms without sockets: a client connected in memory to a
roombus server running in the same process, a :class:`roombus.trio.Server` under trio
or a :class:`roombus.asyncio.Server` under asyncio.

::

    server = roombus.trio.Server(roombus.Settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(roombus.trio.run_server, server)
        async with roombus.client.testing.connect(server, ["lobby"], username="ann") as ann:
            await ann.publish("lobby", "hi")

    server = roombus.asyncio.Server(roombus.Settings())  # listens nowhere
    try:
        async with roombus.client.testing.connect(server, ["lobby"], username="ann") as ann:
            await ann.publish("lobby", "hi")
    finally:
        await server.aclose()

Everything the server does happens as over TCP (the handshake, frames, queues,
presence, positions): only the socket is replaced, by a ``trio.testing`` memory stream
pair (trio: ``server.handle_stream``) or by in-memory transports with a socket's flow
control (asyncio: ``server.connect_in_memory()``), so a test runs in milliseconds (and
under trio's autojump clock).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import sniffio

if TYPE_CHECKING:
    from .. import asyncio as _aio_server
    from .. import trio as _trio_server
    from . import _asyncio, _trio

__all__ = ["connect"]

_URL = "ws://roombus.test/ws"


@asynccontextmanager
async def connect(
    server: _trio_server.Server | _aio_server.Server, rooms: Iterable[str] = (), **options: Any
) -> AsyncIterator[_trio.Client | _asyncio.Client]:
    """
    A client of *server*, a server in the same process, over memory: on trio a running
    :class:`roombus.trio.Server` (each connection a memory stream pair served by
    ``server.handle_stream``), on asyncio a :class:`roombus.asyncio.Server` (each
    connection ``server.connect_in_memory()``). The keyword arguments are
    :func:`roombus.client.connect`'s but ``stream_factory``.

    Raises:
        TypeError: *server* is not a server of the running event loop's adapter.
    """
    if sniffio.current_async_library() == "trio":
        async with _connect_trio(server, rooms, options) as client:
            yield client
    else:
        async with _connect_asyncio(server, rooms, options) as aclient:
            yield aclient


def _wrong(server: object, loop: str) -> TypeError:
    name = type(server).__name__
    return TypeError(f"under {loop}, connect() takes a roombus.{loop}.Server, not {name}")


@asynccontextmanager
async def _connect_trio(
    server: object, rooms: Iterable[str], options: dict[str, Any]
) -> AsyncIterator[_trio.Client]:
    import trio.testing

    import trio

    from .. import trio as _trio_server
    from . import _trio

    if not isinstance(server, _trio_server.Server):
        raise _wrong(server, "trio")
    async with trio.open_nursery() as nursery:

        async def factory() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, theirs, "memory")
            return ours

        async with _trio.connect(_URL, rooms, stream_factory=factory, **options) as c:
            yield c
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _connect_asyncio(
    server: object, rooms: Iterable[str], options: dict[str, Any]
) -> AsyncIterator[_asyncio.Client]:
    import asyncio

    from .. import asyncio as _aio_server
    from . import _asyncio

    if not isinstance(server, _aio_server.Server):
        raise _wrong(server, "asyncio")

    async def factory() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return server.connect_in_memory()

    async with _asyncio.connect(_URL, rooms, stream_factory=factory, **options) as c:
        yield c
