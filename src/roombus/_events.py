"""
Events: the facts a driver tells the broker (inputs, in the past tense).

Each is a frozen value. Pass them to :meth:`roombus.Broker.handle`.
"""

from __future__ import annotations

import attrs

from ._types import ConnectionId, RoomName, Username


@attrs.frozen(kw_only=True)
class ClientConnected:
    """
    A client completed its handshake.

    Attributes:
        conn: The id the driver gave this connection; unique among live connections.
        username: Who the client is (already validated or authenticated by the driver).
        room: The room it joins on connect (``/ws?room=R``), or None to join none yet.
    """

    conn: ConnectionId
    username: Username
    room: RoomName | None = None


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


Event = ClientConnected | TextReceived | PongReceived | ClientDisconnected
