"""Types the server modules share: the one spelling of request headers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

#: Request headers as ``(name, value)`` pairs, names in lower case (as h11 gives them
#: and ASGI servers pass them). Every module that reads headers uses this alias.
Headers: TypeAlias = Sequence[tuple[bytes, bytes]]
