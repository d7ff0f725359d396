"""
roombus.hub: the sans-IO server machinery every transport adapter drives.

A :class:`Hub` holds the broker and, per connection, the wire (HTTP handshake and
WebSocket frames) and the bounded send queue. It never touches a socket or a clock:
an adapter feeds it bytes and the time, and carries out its outputs. Made with
``framed=False``, it takes whole messages instead, from a server that frames them
itself (an ASGI server). :mod:`roombus.trio`, :mod:`roombus.asyncio` and
:mod:`roombus.asgi` are such adapters; see ``docs/adapters.md`` for the contract, to
write your own.

Importing this module needs wsproto and h11 (the wire layer), not trio.
"""

from __future__ import annotations

from .server.hub import Hub as Hub
from .server.hub import NoticeHook as NoticeHook

__all__ = ["Hub", "NoticeHook"]
