"""
roombus.trio: the trio adapter. Run the broker in a trio program.

Importing this module needs trio; ``import roombus`` (the core) does not. The Redis
backplane (:class:`RedisBackplane`, :class:`BackplaneStatistics`) also needs hiredis, the
``redis`` extra (``pip install 'roombus[redis]'``): it is imported on first use, so a
single node runs without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..server.hub import NoticeHook as NoticeHook
from ._server import Server as Server
from ._server import run_server as run_server
from ._server import serve as serve

if TYPE_CHECKING:
    from ._backplane import BackplaneStatistics as BackplaneStatistics
    from ._backplane import RedisBackplane as RedisBackplane

__all__ = [
    "BackplaneStatistics",
    "NoticeHook",
    "RedisBackplane",
    "Server",
    "run_server",
    "serve",
]

_BACKPLANE: frozenset[str] = frozenset({"BackplaneStatistics", "RedisBackplane"})


def __getattr__(name: str) -> Any:
    # PEP 562: the backplane's names load it (and hiredis) when first asked for. Without
    # hiredis, that is a ModuleNotFoundError naming the extra.
    if name in _BACKPLANE:
        from . import _backplane

        value = getattr(_backplane, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _BACKPLANE)
