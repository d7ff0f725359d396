"""
The records the nodes of a cluster exchange, encoded and parsed here only.

A cluster shares one backplane (Redis). Each room has a channel, and every record on
it reaches every node listening, in one order for all (the backplane serializes a
channel). Records are bytes, fields separated by one space, the last field free:

========================================== =========================================
``m <seq> <node> <ref> <epoch> <prefix>``  a chat message: its room-wide ``seq``, the
                                           node it came through and that node's
                                           number for it, the room's epoch, and the
                                           envelope up to its ``seq`` value
``j <version> <node> <username>``          *username* became present on *node*
``l <version> <node> <username>``          *username* is no longer present on *node*
                                           (its node said so)
``x <version> <node> <username>``          *username*'s entry on *node* expired: the
                                           node stopped renewing it (it died, or was
                                           cut off from Redis, or Redis was)
========================================== =========================================

``version`` counts a room's presence records; a snapshot of a room's presence carries
the version it was read at, so a node that reads one knows which records it already
reflects. Numbers are decimal without sign or leading zero, at most 19 digits (Redis
counters are 64-bit); a node id is 1 to 64 of ``A-Z a-z 0-9 _ . : -``, an epoch
1 to 32 of ``A-Z a-z 0-9 _ -``.

The backplane's Lua scripts build the same bytes on the Redis server (the ``seq`` and
``version`` counters live there): :func:`lua_chat_record` and
:func:`lua_presence_record` are those Lua expressions, kept beside the encoders so
the format is written once. Presence is stored as members ``"<node> <username>"``
(:func:`member`), so a presence record is its kind, version and member. Nothing here
does I/O.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from ..core.names import TOKEN_PATTERN, Username, is_valid_username
from ..core.streams import EPOCH_PATTERN

_NUMBER: Final = rb"(0|[1-9][0-9]{0,18})"
_NODE: Final = b"(" + TOKEN_PATTERN.encode() + b")"
#: The fields before the free last one, each followed by its space.
_EPOCH: Final = b"(" + EPOCH_PATTERN.encode() + b")"
_chat_head: Final = re.compile(
    rb"m " + _NUMBER + b" " + _NODE + b" " + _NUMBER + b" " + _EPOCH + b" "
).match
_presence_head: Final = re.compile(rb"([jlx]) " + _NUMBER + b" " + _NODE + b" ").match


@attrs.frozen
class ChatRecord:
    seq: int
    node: str
    ref: int
    epoch: str
    prefix: bytes


@attrs.frozen
class PresenceRecord:
    version: int
    present: bool
    node: str
    username: Username
    #: A leave because the entry expired (``x``), not because its node said so (``l``).
    expired: bool = False


def member(node: str, username: str) -> str:
    """A user's presence entry in a room's sorted set, and the tail of its records."""
    return f"{node} {username}"


def parse_member(data: bytes) -> tuple[str, str]:
    """``(node, username)`` of a presence entry (undecodable bytes replaced)."""
    node, _, username = data.decode("utf-8", "replace").partition(" ")
    return node, username


def encode_chat(seq: int, node: str, ref: int, epoch: str, prefix: bytes) -> bytes:
    """The record of chat message *seq* of *epoch* (what the relay script publishes)."""
    return b"m %d %s %d %s " % (seq, node.encode("ascii"), ref, epoch.encode("ascii")) + prefix


def _kind(present: bool, expired: bool) -> str:
    if present:
        if expired:
            raise ValueError("a join cannot be an expiry")
        return "j"
    return "x" if expired else "l"


def encode_presence(
    present: bool, version: int, node: str, username: str, *, expired: bool = False
) -> bytes:
    """The record of a presence change (what the presence scripts publish)."""
    kind = _kind(present, expired).encode("ascii")
    return b"%s %d %s" % (kind, version, member(node, username).encode("utf-8"))


def encode_record(record: ChatRecord | PresenceRecord) -> bytes:
    """The bytes of *record*: ``parse_record(encode_record(r)) == r``."""
    if isinstance(record, ChatRecord):
        return encode_chat(record.seq, record.node, record.ref, record.epoch, record.prefix)
    return encode_presence(
        record.present, record.version, record.node, record.username, expired=record.expired
    )


def parse_record(data: bytes) -> ChatRecord | PresenceRecord | None:
    """
    A record off a room's channel, or None if it is not one of ours.

    It raises nothing: any bytes that are not a record as :func:`encode_record`
    writes it give None.
    """
    m = _chat_head(data)
    if m is not None:
        seq, node, ref, epoch = m.groups()
        return ChatRecord(
            int(seq), node.decode("ascii"), int(ref), epoch.decode("ascii"), data[m.end() :]
        )
    m = _presence_head(data)
    if m is None:
        return None
    kind, version, node = m.groups()
    try:
        username = data[m.end() :].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not is_valid_username(username):
        return None
    return PresenceRecord(
        int(version), kind == b"j", node.decode("ascii"), Username(username), kind == b"x"
    )


def lua_chat_record(seq: str, node: str, ref: str, epoch: str, prefix: str) -> str:
    """The Lua expression of a chat record, given Lua expressions of its fields."""
    return f"'m ' .. {seq} .. ' ' .. {node} .. ' ' .. {ref} .. ' ' .. {epoch} .. ' ' .. {prefix}"


def lua_presence_record(present: bool, version: str, member: str, *, expired: bool = False) -> str:
    """The Lua expression of a presence record, given Lua expressions of its fields."""
    kind = _kind(present, expired)
    return f"'{kind} ' .. {version} .. ' ' .. {member}"


__all__ = [
    "ChatRecord",
    "PresenceRecord",
    "encode_chat",
    "encode_presence",
    "encode_record",
    "lua_chat_record",
    "lua_presence_record",
    "member",
    "parse_member",
    "parse_record",
]
