"""
roombus.asyncio: the asyncio adapter. Run the broker in an asyncio program.

Importing this module needs only the standard library (and the wire layer's h11 and
wsproto); ``import roombus`` (the core) does not import asyncio.
"""

from __future__ import annotations

from .._hub import NoticeHook as NoticeHook
from ._server import Server as Server
from ._server import serve as serve

__all__ = ["NoticeHook", "Server", "serve"]
