"""When a table (a dict that held many entries) is worth copying smaller."""

from __future__ import annotations

#: A table (a room's dicts, the connection tables, the room streams) is copied smaller
#: once it held at least this many entries...
_SHRINK_FROM = 256
#: ... and is down to this fraction of that peak (a dict never shrinks by deletions).
_SHRINK_BELOW = 4


def worth_shrinking(size: int, peak: int) -> bool:
    """Whether a dict that held *peak* entries and now holds *size* should be copied."""
    return peak >= _SHRINK_FROM and size * _SHRINK_BELOW < peak
