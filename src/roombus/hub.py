"""
roombus.hub: the sans-IO server machinery every transport adapter drives (the same
classes as :mod:`roombus.lowlevel`, their home).

A hub holds the broker and, per connection, the bounded send queue and its
lifecycle. It never touches a socket or a clock: an adapter feeds it input and the
time, and carries out its outputs. There are two:

* :class:`FramedHub` (also :class:`Hub`) for a transport of bytes: it parses the HTTP
  handshake and the WebSocket frames (:mod:`roombus.trio`, :mod:`roombus.asyncio`);
* :class:`MessageHub` for a server that frames WebSocket messages itself (an ASGI
  server: :mod:`roombus.asgi`).

See ``docs/adapters.md`` for the contract, to write your own adapter. ``Hub`` is
:class:`FramedHub`; ``Hub(framed=False)`` is refused with a
:class:`~roombus.LocalProtocolError` naming :class:`MessageHub`.

Importing this module needs wsproto and h11 (the wire layer), not trio.
"""

from __future__ import annotations

from .server.framed import FramedHub as FramedHub
from .server.hub import NoticeHook as NoticeHook
from .server.messages import MessageHub as MessageHub

Hub = FramedHub

__all__ = ["FramedHub", "Hub", "MessageHub", "NoticeHook"]
