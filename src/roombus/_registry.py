"""
The room registry: which connection is in which room, and who is present.

Presence is per user, delivery per connection: a room counts each user's connections
in it, and the user is present while that count is above zero. A room with no
connection left is freed at once, so an idle broker holds no room state at all.
"""

from __future__ import annotations

import attrs

from ._types import ConnectionId, RoomName, Username


@attrs.define
class Room:
    """One room's members (connections, in join order) and presence (users)."""

    name: RoomName
    members: dict[ConnectionId, Username] = attrs.field(factory=dict)
    users: dict[Username, int] = attrs.field(factory=dict)  # user -> connections here
    seq: int = 0  # the last chat's sequence number


@attrs.define
class Registry:
    """Rooms by name; a room exists exactly while it has members."""

    rooms: dict[RoomName, Room] = attrs.field(factory=dict)

    def join(self, name: RoomName, conn: ConnectionId, username: Username) -> tuple[Room, bool]:
        """
        Add *conn* (of *username*) to room *name*, creating the room if needed.

        Returns:
            The room, and whether *username* became present (its first connection).
        """
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        room.members[conn] = username
        count = room.users.get(username, 0)
        room.users[username] = count + 1
        return room, count == 0

    def leave(self, name: RoomName, conn: ConnectionId) -> tuple[Room, Username, bool]:
        """
        Remove *conn* from room *name*, freeing the room if it is now empty.

        Returns:
            The room, the connection's user, and whether that user is no longer
            present (its last connection left).
        """
        room = self.rooms[name]
        username = room.members.pop(conn)
        count = room.users[username] - 1
        if count:
            room.users[username] = count
        else:
            del room.users[username]
        if not room.members:
            del self.rooms[name]
        return room, username, count == 0
