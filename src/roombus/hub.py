"""
roombus.hub: the sans-IO server machinery every transport adapter drives.

A :class:`Hub` holds the broker and, per connection, the wire (HTTP handshake and
WebSocket frames) and the bounded send queue. It never touches a socket or a clock:
an adapter feeds it bytes and the time, and carries out its outputs. The trio
adapter (:mod:`roombus.trio`) is one such adapter; see ``docs/adapters.md`` for the
contract, to write your own.

Importing this module needs wsproto and h11 (the wire layer), not trio.
"""

from __future__ import annotations

from ._hub import Hub as Hub
from ._hub import NoticeHook as NoticeHook

__all__ = ["Hub", "NoticeHook"]
