"""
roombus.trio: the trio adapter. Run the broker in a trio program.

Importing this module needs trio; ``import roombus`` (the core) does not.
"""

from __future__ import annotations

from .._hub import NoticeHook as NoticeHook
from ._backplane import BackplaneStatistics as BackplaneStatistics
from ._backplane import RedisBackplane as RedisBackplane
from ._server import Server as Server
from ._server import run_server as run_server
from ._server import serve as serve

__all__ = [
    "BackplaneStatistics",
    "NoticeHook",
    "RedisBackplane",
    "Server",
    "run_server",
    "serve",
]
