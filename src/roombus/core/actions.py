"""
Actions: what the broker asks its driver to do (outputs, imperatives), and notices.

Every call into :class:`roombus.lowlevel.Broker` returns a list of these, in the order the
driver must carry them out.
"""

from __future__ import annotations

import attrs

from .names import ConnectionId, RoomName, Username


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
        epoch: The epoch of the room's stream: with *seq*, the message's position
            (empty in a cluster, whose streams do not have epochs yet).
    """

    room: RoomName
    username: Username
    content: object
    seq: int
    timestamp: int
    epoch: str = ""


@attrs.frozen(kw_only=True)
class Subscribe:
    """
    Backplane: listen to *room*'s channel, then report the room's presence snapshot
    with :class:`~roombus.cluster.RoomSynced`. Also asked again to re-read the snapshot of a
    room already listened to (after a gap in its records, or a reconnect).

    Attributes:
        room: The room.
        gen: Which listening of the room this is; echo it in the answer.
    """

    room: RoomName
    gen: int = 0


@attrs.frozen(kw_only=True)
class Unsubscribe:
    """
    Backplane: stop listening to *room*'s channel (its last local member left).

    Attributes:
        room: The room.
    """

    room: RoomName


@attrs.frozen(kw_only=True)
class Relay:
    """
    Backplane: publish a chat message to *room* on every node.

    The backplane numbers it (the room's ``seq``, one counter for the cluster) and
    publishes the record ``m <seq> <node> <ref> <prefix>``; every node, this one
    included, delivers it when the record arrives, so all see the same order.

    Attributes:
        room: The room.
        ref: This node's number for the message, echoed in the record.
        prefix: The chat envelope up to its ``seq`` value (``...,"seq":``).
    """

    room: RoomName
    ref: int
    prefix: bytes


@attrs.frozen(kw_only=True)
class Announce:
    """
    Backplane: record that *username* is (or no longer is) present in *room* on this
    node, and publish the change (``j``/``l <version> <node> <username>``) if it is one.

    Attributes:
        room: The room.
        username: The user.
        present: True when the user's first local connection joined, False when
            its last one left.
    """

    room: RoomName
    username: Username
    present: bool


Notice = UserJoined | UserLeft | MessagePublished
BackplaneAction = Subscribe | Unsubscribe | Relay | Announce
Action = (
    Deliver
    | SendPing
    | Close
    | UserJoined
    | UserLeft
    | MessagePublished
    | Subscribe
    | Unsubscribe
    | Relay
    | Announce
)
