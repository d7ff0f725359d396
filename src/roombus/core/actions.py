"""
Actions: what the broker asks its driver to do (outputs, imperatives), and notices.

Every call into :class:`roombus.lowlevel.Broker` returns a list of these, in the order the
driver must carry them out.
"""

from __future__ import annotations

import attrs

from .names import ConnectionId, RoomName, Username
from .streams import Position


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
            (the cluster's, or this node's own while it is cut off from Redis).
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
        position_ms: How long the room's epoch lives if the read has to make one.
    """

    room: RoomName
    gen: int = 0
    position_ms: int = 86_400_000


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

    The backplane numbers it in the room's stream (the room's epoch and ``seq``, one
    stream for the cluster), keeps it in the room's history and publishes the record
    ``m <seq> <node> <ref> <epoch> <prefix>``; every node, this one included, delivers
    it when the record arrives, so all see the same order.

    Attributes:
        room: The room.
        ref: This node's number for the message, echoed in the record.
        prefix: The chat envelope up to its ``seq`` value (``...,"seq":``).
        keep: How many messages the room's history keeps (0: none).
        keep_ms: How long each kept message is kept, in ms.
        position_ms: How long the room's epoch and seq live after its last message.
        dedup: For an acknowledged publish, ``(username, id)``: a message of the same
            user and id numbered within *dedup_ms* in this epoch is not published
            again. The backplane answers with :class:`~roombus.cluster.Relayed`.
        dedup_ms: How long an acknowledged id is remembered, in ms.
        answer: Answer with :class:`~roombus.cluster.Relayed` even without *dedup*
            (the server API waits for the message's position).
    """

    room: RoomName
    ref: int
    prefix: bytes
    keep: int = 0
    keep_ms: int = 0
    position_ms: int = 86_400_000
    dedup: tuple[str, str] | None = None
    dedup_ms: int = 0
    answer: bool = False


@attrs.frozen(kw_only=True)
class ReadStream:
    """
    Backplane: read *room*'s stream: its epoch and top, its oldest kept message, and
    the latest *count* kept messages after seq *after* up to seq *upto* (0: the top).
    Answered with :class:`~roombus.cluster.StreamRead` echoing *ticket*. A room with
    no epoch yet is given one.

    Attributes:
        room: The room.
        ticket: This node's number for the read.
        after: Read messages after this seq (0: from the oldest kept).
        upto: Read messages up to this seq (0: up to the top).
        count: At most this many messages: the latest of the range, or with
            *oldest* the first.
        oldest: Read the first *count* messages of the range rather than the latest.
        keep: The room's history size (older messages count as not kept).
        keep_ms: The room's history TTL, in ms.
        position_ms: As for :class:`Relay` (a new epoch lives this long).
    """

    room: RoomName
    ticket: int
    after: int
    upto: int = 0
    count: int
    oldest: bool = False
    keep: int
    keep_ms: int
    position_ms: int = 86_400_000


@attrs.frozen(kw_only=True)
class Announce:
    """
    Backplane: record that *username* is (or no longer is) present in *room* on this
    node, and publish the change (``j``/``l <version> <node> <username>``) if it is one
    (a forced leave is published in any case).

    Attributes:
        room: The room.
        username: The user.
        present: True when the user's first local connection joined, False when
            its last one left.
        force: A leave published even if the backplane no longer holds the user's
            entry (it expired during an outage; the other nodes must still hear that
            the user left rather than only that the entry expired).
    """

    room: RoomName
    username: Username
    present: bool
    force: bool = False


@attrs.frozen(kw_only=True)
class PublishAnswered:
    """
    The answer to a server-side publish made with a ``ticket``
    (:meth:`~roombus.lowlevel.Broker.publish`): where the message is in the room's
    stream. On a node alone it comes with the publish; in a cluster once Redis
    numbered it.

    Attributes:
        ticket: The publish's ticket.
        room: The room.
        position: The message's position; None if it is not known (nothing was
            published: the content cannot be forwarded, or the node is cut off from
            Redis with no member of the room; or the link was lost before Redis
            answered).
        duplicate: The idempotency key was numbered already: nothing was published,
            *position* is the first publish's.
    """

    ticket: int
    room: RoomName
    position: Position | None
    duplicate: bool = False


@attrs.frozen(kw_only=True)
class HistoryAnswered:
    """
    The answer to a server-side history read (:meth:`~roombus.lowlevel.Broker.history`):
    the room's position and the kept chats read, oldest first, each the envelope as
    it was delivered.

    Attributes:
        ticket: The read's ticket.
        room: The room.
        position: The room's stream position as it was read.
        items: The chats' envelopes (UTF-8 JSON).
    """

    ticket: int
    room: RoomName
    position: Position
    items: tuple[bytes, ...]


@attrs.frozen(kw_only=True)
class DisconnectCommand:
    """
    Close every connection of *username*, or the one *connection* (an id of the
    server API, ``<node>/<n>``), with *code* and *reason*.
    """

    username: str | None = None
    connection: str | None = None
    code: int = 1000
    reason: str = ""


@attrs.frozen(kw_only=True)
class KickCommand:
    """Remove *username*'s connections from *room*, telling them *reason*."""

    room: RoomName
    username: Username
    reason: str = ""


ControlCommand = DisconnectCommand | KickCommand


@attrs.frozen(kw_only=True)
class Control:
    """
    Backplane: send *command* to every node of the cluster (its control channel);
    each other node carries it out on the connections it holds.

    Attributes:
        command: What to do.
    """

    command: ControlCommand


@attrs.frozen(kw_only=True)
class ReadCluster:
    """
    Backplane: read what the cluster knows, for the server API; answered with
    :class:`~roombus.core.events.ClusterRead` echoing *ticket*.

    Attributes:
        ticket: This node's number for the read.
        kind: ``presence`` (*room*'s presence entries, every node's), ``rooms`` (the
            cluster's room index: up to *limit* names matching the glob *pattern*,
            sorted, after *after*) or ``nodes`` (the live nodes, with their age).
        room: For ``presence``: the room.
        pattern: For ``rooms``: a glob (``*``, ``?``, ``[...]``).
        after: For ``rooms``: list the names after this one ("": from the first).
        limit: For ``rooms``: at most this many names.
    """

    ticket: int
    kind: str
    room: str = ""
    pattern: str = "*"
    after: str = ""
    limit: int = 100


@attrs.frozen(kw_only=True)
class ClusterAnswered:
    """
    The answer to a :class:`ReadCluster` made for the server API.

    Attributes:
        ticket: The read's ticket.
        read: Redis's answer (a :class:`~roombus.core.events.ClusterRead`), or None if
            the link was lost before it came (answer with this node's view).
    """

    ticket: int
    read: object | None


#: What a server-side request made with a ticket is answered with.
Answer = PublishAnswered | HistoryAnswered | ClusterAnswered
Notice = UserJoined | UserLeft | MessagePublished
BackplaneAction = Subscribe | Unsubscribe | Relay | Announce | ReadStream | Control | ReadCluster
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
    | ReadStream
    | Control
    | ReadCluster
    | PublishAnswered
    | HistoryAnswered
    | ClusterAnswered
)
