"""Identifier types and the validation rules for names that come off the wire."""

from __future__ import annotations

import re
import unicodedata
from typing import NewType

#: A connection, as numbered by the driver. Delivery is per connection.
ConnectionId = NewType("ConnectionId", int)
#: A user's name. Presence is per user: one user may hold several connections.
Username = NewType("Username", str)
#: A room's name, always valid by :func:`is_valid_room` once inside the broker.
RoomName = NewType("RoomName", str)

MAX_NAME_LENGTH = 64

#: The one grammar of room names, node ids and key prefixes: 1 to 64 characters from
#: ``A-Z a-z 0-9 _ . : -`` (no space, so a record's fields split on spaces; no braces,
#: so a room is a Redis hash tag). Patterns that need it (records, channels) embed it.
TOKEN_PATTERN = "[A-Za-z0-9_.:-]{1,64}"
_TOKEN_RE = re.compile(TOKEN_PATTERN)
# C0 controls, DEL and C1 controls.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Unicode categories no username character may have: controls (Cc, exactly the
#: characters of _CONTROL_RE), format characters (Cf: bidi overrides and isolates,
#: zero-width spaces and joiners, the BOM, the soft hyphen; they make a name display
#: as another, "evil\u202enimda" as "eviladmin") and surrogates (Cs: a lone one is
#: valid in JSON as "\ud800" but has no UTF-8 form, so it could not leave this node).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


def is_valid_room(name: object) -> bool:
    """
    Tell whether *name* is a usable room name.

    A room name is 1 to 64 characters from ``A-Z a-z 0-9 _ . : -``.
    """
    return is_token(name)


def is_token(name: object) -> bool:
    """Whether *name* follows :data:`TOKEN_PATTERN` (a room name, a node id, a prefix)."""
    return type(name) is str and _TOKEN_RE.fullmatch(name) is not None


def is_valid_request_id(value: object) -> bool:
    """
    Whether *value* can be a message's ``id`` (an idempotent chat's, a history
    request's): the same rule as a username, so it can be echoed as it came.
    """
    return is_valid_username(value)


def is_valid_username(name: object) -> bool:
    """
    Tell whether *name* is a usable username.

    A username is 1 to 64 characters, none of them a control character, a format
    character or a surrogate (Unicode categories Cc, Cf and Cs): so it is Unicode text
    that UTF-8 can carry, and it displays as what it is.
    """
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_LENGTH:
        return False
    if name.isascii():
        return _CONTROL_RE.search(name) is None
    category = unicodedata.category
    return not any(category(c) in _REFUSED_CATEGORIES for c in name)
