"""
The room registry: which connection is in which room, and who is present.

Presence is per user, delivery per connection: a room counts each user's connections
in it, and the user is present while that count is above zero. A room with no
connection left is freed at once, so an idle broker holds no room state at all.
"""

from __future__ import annotations

from bisect import bisect_left

import attrs

from .codec import user_literal
from .names import ConnectionId, RoomName, Username
from .tables import worth_shrinking


@attrs.define
class Room:
    """One room's members (connections, in join order) and presence (users)."""

    name: RoomName
    members: dict[ConnectionId, Username] = attrs.field(factory=dict)
    users: dict[Username, int] = attrs.field(factory=dict)  # user -> connections here
    #: The present users, sorted, and each one's JSON string literal (same order): a
    #: ``presence_state`` without sorting or encoding the whole list per join.
    sorted_users: list[Username] = attrs.field(factory=list)
    literals: list[bytes] = attrs.field(factory=list)
    peak: int = 0  # most members since the dicts were last copied


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
        members = room.members
        members[conn] = username
        if len(members) > room.peak:
            room.peak = len(members)
        count = room.users.get(username, 0)
        room.users[username] = count + 1
        if not count:
            i = bisect_left(room.sorted_users, username)
            room.sorted_users.insert(i, username)
            room.literals.insert(i, user_literal(username))
        return room, count == 0

    def leave(self, name: RoomName, conn: ConnectionId) -> tuple[Room, Username, bool]:
        """
        Remove *conn* from room *name*, freeing the room if it is now empty.

        Returns:
            The room, the connection's user, and whether that user is no longer
            present (its last connection left).
        """
        room = self.rooms[name]
        members = room.members
        username = members.pop(conn)
        count = room.users[username] - 1
        if count:
            room.users[username] = count
        else:
            del room.users[username]
            i = bisect_left(room.sorted_users, username)
            del room.sorted_users[i]
            del room.literals[i]
        if not members:
            del self.rooms[name]
        elif worth_shrinking(len(members), room.peak):
            # A crowd left: give the memory of its dicts back (copies keep the order).
            room.members = dict(members)
            room.users = dict(room.users)
            room.peak = len(members)
        return room, username, count == 0
