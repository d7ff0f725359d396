"""
Actions: what the broker asks its driver to do (outputs, imperatives), and notices.

Every call into :class:`roombus.Broker` returns a list of these, in the order the
driver must carry them out.
"""

from __future__ import annotations

import attrs

from ._types import ConnectionId, RoomName, Username


@attrs.frozen(kw_only=True)
class Deliver:
    """
    Send one text message to several connections.

    The payload is encoded once; since server frames are unmasked, a driver can frame it
    once too and write the same bytes to every connection.

    Attributes:
        conns: The receivers, in no particular order; never empty.
        payload: The UTF-8 JSON text of one envelope.
    """

    conns: tuple[ConnectionId, ...]
    payload: bytes


@attrs.frozen(kw_only=True)
class SendPing:
    """
    Send a WebSocket ping frame to a connection; the broker expects a pong.

    Attributes:
        conn: The connection to ping.
    """

    conn: ConnectionId


@attrs.frozen(kw_only=True)
class Close:
    """
    Close a connection with a WebSocket close code. The broker has already forgotten it.

    Attributes:
        conn: The connection to close.
        code: The close code (RFC 6455 section 7.4).
        reason: A short human-readable reason for the close frame.
    """

    conn: ConnectionId
    code: int
    reason: str


@attrs.frozen(kw_only=True)
class UserJoined:
    """
    Notice for the application: a user became present in a room.

    Attributes:
        room: The room.
        username: The user whose first connection joined it.
    """

    room: RoomName
    username: Username


@attrs.frozen(kw_only=True)
class UserLeft:
    """
    Notice for the application: a user is no longer present in a room.

    Attributes:
        room: The room.
        username: The user whose last connection left it.
    """

    room: RoomName
    username: Username


@attrs.frozen(kw_only=True)
class MessagePublished:
    """
    Notice for the application: a chat message was delivered to a room.

    Attributes:
        room: The room.
        username: Who published it.
        content: The message's content (any JSON value).
        seq: The room's sequence number of this message.
        timestamp: The wall-clock time stamped on it, in Unix seconds.
    """

    room: RoomName
    username: Username
    content: object
    seq: int
    timestamp: int


Notice = UserJoined | UserLeft | MessagePublished
Action = Deliver | SendPing | Close | UserJoined | UserLeft | MessagePublished
