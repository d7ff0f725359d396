"""
Events: the facts a driver tells the broker (inputs, in the past tense).

Each is a frozen value. Pass them to :meth:`roombus.lowlevel.Broker.handle`.
"""

from __future__ import annotations

import attrs

from .auth import Identity
from .names import ConnectionId, RoomName, Username
from .streams import Position


@attrs.frozen(kw_only=True)
class ClientConnected:
    """
    A client completed its handshake.

    Attributes:
        conn: The id the driver gave this connection; unique among live connections.
        username: Who the client is (already validated or authenticated by the driver).
        room: The room it joins on connect (``/ws?room=R``), or None to join none yet.
        identity: What an authenticator established about the client, for the
            broker's authorizer; None when nobody authenticated it.
        expires: The driver's clock (``now``) at which the client's credentials
            expire; the broker then closes the connection with 1008. None: never.
        positioned: Whether the URL named a position for *room* (``since=E:N``, or
            ``since=`` empty for none yet): the join is then answered with ``joined``.
        since: That position, or None.
        partial: Whether a partial replay was asked for (``partial=1``).
    """

    conn: ConnectionId
    username: Username
    room: RoomName | None = None
    identity: Identity | None = attrs.field(default=None, repr=False)
    expires: float | None = None
    positioned: bool = False
    since: Position | None = None
    partial: bool = False


@attrs.frozen(kw_only=True)
class TextReceived:
    """
    A complete text message arrived from a client.

    Attributes:
        conn: The connection it came from.
        text: The message, already UTF-8 decoded and within the size limit.
    """

    conn: ConnectionId
    text: str


@attrs.frozen(kw_only=True)
class PongReceived:
    """
    A client answered a ping (or sent an unsolicited pong): it is alive.

    An unsolicited pong costs a message's worth of the connection's rate limit (a pong
    flood is closed like a chat flood); the answer to the broker's own ping is free.

    Attributes:
        conn: The connection that answered.
    """

    conn: ConnectionId


@attrs.frozen(kw_only=True)
class ClientDisconnected:
    """
    A connection is gone: closed by the peer, broken, or closed by the driver.

    Handling it for a connection the broker no longer knows is a no-op, so a driver
    may report a disconnect the broker itself asked for.

    Attributes:
        conn: The connection that went away.
    """

    conn: ConnectionId


@attrs.frozen(kw_only=True)
class RoomSynced:
    """
    Backplane: the presence of *room* across the cluster, read after its channel was
    listened to (the answer to :class:`~roombus.cluster.Subscribe`).

    Attributes:
        room: The room.
        version: The room's record counter when the snapshot was read; records up
            to it are in the snapshot.
        entries: ``(node, username)`` for every user present on every node.
        gen: The ``gen`` of the :class:`~roombus.cluster.Subscribe` this answers; an answer
            to an earlier listening of the room (since left and joined again) is
            ignored.
        epoch: The room's stream epoch when the snapshot was read ("": unknown).
        seq: The room's top seq in that epoch then.
        gone: ``(node, username)`` of the users whose node said they left, within
            three presence TTLs (a node settling after an outage drops them at once
            rather than keep them until it settles).
    """

    room: RoomName
    version: int
    entries: tuple[tuple[str, str], ...]
    gen: int = 0
    epoch: str = ""
    seq: int = 0
    gone: tuple[tuple[str, str], ...] = ()


@attrs.frozen(kw_only=True)
class RecordReceived:
    """
    Backplane: a record arrived on *room*'s channel (a chat message, or a presence
    change of some node, this one included).

    Attributes:
        room: The room.
        data: The record as published.
    """

    room: RoomName
    data: bytes


@attrs.frozen(kw_only=True)
class Relayed:
    """
    Backplane: the answer to a :class:`~roombus.cluster.Relay` with ``dedup`` (an
    acknowledged publish) or ``answer`` (a server-side publish awaiting its position).

    Attributes:
        room: The room.
        ref: The Relay's ``ref``.
        epoch: The message's epoch.
        seq: The message's seq (for a duplicate: the first publish's).
        duplicate: True if the id was already numbered: nothing was published.
    """

    room: RoomName
    ref: int
    epoch: str
    seq: int
    duplicate: bool = False


@attrs.frozen(kw_only=True)
class StreamRead:
    """
    Backplane: the answer to a :class:`~roombus.cluster.ReadStream`.

    Attributes:
        room: The room.
        ticket: The ReadStream's ``ticket``.
        epoch: The room's epoch.
        top: The seq of its last message (0 before the first).
        first_kept: The seq of its oldest kept message (``top + 1`` if none is).
        entries: ``(seq, prefix)`` of the messages read, oldest first (the chat
            envelope up to its ``seq`` value).
    """

    room: RoomName
    ticket: int
    epoch: str
    top: int
    first_kept: int
    entries: tuple[tuple[int, bytes], ...] = ()


@attrs.frozen(kw_only=True)
class ControlReceived:
    """
    Backplane: a message off the cluster's control channel (a command of the server
    API sent by a node to every node: :class:`~roombus.core.actions.Control`), as
    published; the cluster broker decodes it.

    Attributes:
        data: The message's bytes.
    """

    data: bytes


@attrs.frozen(kw_only=True)
class ClusterRead:
    """
    Backplane: the answer to a :class:`~roombus.core.actions.ReadCluster`.

    Attributes:
        ticket: The read's ``ticket``.
        kind: The read's ``kind``.
        entries: ``presence``: ``(node, username)`` of every live entry, sorted.
        rooms: ``rooms``: the names listed, sorted.
        more: ``rooms``: where the next page starts after (the last name looked at),
            or "" if the index holds no more.
        nodes: ``nodes``: ``(node, ms since it last renewed its entry)``, sorted.
    """

    ticket: int
    kind: str
    entries: tuple[tuple[str, str], ...] = ()
    rooms: tuple[str, ...] = ()
    more: str = ""
    nodes: tuple[tuple[str, int], ...] = ()


@attrs.frozen(kw_only=True)
class BackplaneLost:
    """Backplane: the connection to the other nodes is gone; serve locally meanwhile."""


@attrs.frozen(kw_only=True)
class BackplaneRestored:
    """Backplane: connected (again). The broker re-subscribes and re-announces."""


Event = (
    ClientConnected
    | TextReceived
    | PongReceived
    | ClientDisconnected
    | RoomSynced
    | RecordReceived
    | BackplaneLost
    | BackplaneRestored
    | Relayed
    | StreamRead
    | ControlReceived
    | ClusterRead
)
