"""
The roombus client: it reconnects by itself, resumes every room from its last
position, and publishes each message once.

::

    async with roombus.client.connect("ws://localhost:8000/ws", ["lobby"],
                                      username="ann") as client:
        await client.publish("lobby", "hello")
        async for event in client:
            if isinstance(event, roombus.client.Message):
                print(event.username, event.content)

:func:`connect` runs on trio or asyncio, whichever is running. The logic is sans-IO
(:class:`ClientProtocol`, in :mod:`roombus.client.protocol`), so another event loop
can drive it too. See docs/client.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import sniffio

from ..core.streams import Position, Span
from ._driver import PublishError
from .protocol import (
    ClientClosed,
    ClientOptions,
    ClientProtocol,
    Connected,
    Connecting,
    Disconnected,
    Event,
    Gap,
    Joined,
    Joining,
    JoinRefused,
    Left,
    Message,
    NotInRoom,
    OutboxFull,
    Presence,
    Reset,
    ServerError,
    close_policy,
)

__all__ = [
    "ClientClosed",
    "ClientOptions",
    "ClientProtocol",
    "Connected",
    "Connecting",
    "Disconnected",
    "Event",
    "Gap",
    "JoinRefused",
    "Joined",
    "Joining",
    "Left",
    "Message",
    "NotInRoom",
    "OutboxFull",
    "Position",
    "Presence",
    "PublishError",
    "Reset",
    "ServerError",
    "Span",
    "close_policy",
    "connect",
]


def connect(
    url: str, rooms: Iterable[str] = (), **options: Any
) -> AbstractAsyncContextManager[Any]:
    """
    ``async with connect(url, rooms, ...) as client``: a client of the server at *url*
    on the running event loop (trio's client under trio, else asyncio's). The keyword
    arguments are those of :func:`roombus.client._trio.connect`.
    """
    if sniffio.current_async_library() == "trio":
        from . import _trio

        return _trio.connect(url, rooms, **options)
    from . import _asyncio

    return _asyncio.connect(url, rooms, **options)
