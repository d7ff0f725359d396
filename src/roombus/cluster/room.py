"""
The broker's view of the other nodes of a cluster: one room's remote presence.

The records the nodes exchange (and their format) are in :mod:`roombus.cluster.records`.
Nothing here does I/O: the backplane driver publishes and reads the records.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import attrs

from ..core.names import Username, is_token
from .records import PresenceRecord

#: Records of a room that may wait for its snapshot before it must be read again.
MAX_BUFFERED: Final = 10_000


def is_valid_node_id(node: object) -> bool:
    """A node id is 1 to 64 characters from ``A-Z a-z 0-9 _ . : -``."""
    return is_token(node)


@attrs.define
class ClusterRoom:
    """
    One room as seen by a node of a cluster, kept while the node listens to it (it has
    local members, or connections waiting to join).

    Attributes:
        remote: The users present on other nodes, and on which.
        synced: Whether :attr:`remote` reflects a snapshot and every record since.
        version: The last presence record applied (or the snapshot's).
        seq: The last chat ``seq`` seen (continued locally while disconnected).
        pending: Connections waiting for the snapshot to join, with their rights: a
            connection is joining the room exactly while it is a key here.
        buffer: Presence records that arrived before the snapshot.
        outbox: ``(ref, username, content, timestamp)`` of this node's relayed
            messages not yet back from the backplane.
        resync: Whether records were lost while waiting for the snapshot, so that
            another one must be read.
        lost_version: The version known when the backplane was lost; a snapshot
            below it after reconnecting means Redis lost its data (0: none).
        gen: This listening's number (see :class:`~roombus.Subscribe`).
        held: Chat messages of connections waiting to join, published once they
            have: ``(conn, content, timestamp)``.
        draining: Nobody here is in the room any more, but messages of this node
            are still on their way back; it is released once they are in.
    """

    remote: dict[Username, set[str]] = attrs.field(factory=dict)
    synced: bool = False
    version: int = 0
    seq: int = 0
    pending: dict[int, int] = attrs.field(factory=dict)
    buffer: list[PresenceRecord] = attrs.field(factory=list)
    outbox: deque[tuple[int, Username, object, int]] = attrs.field(factory=deque)
    resync: bool = False
    lost_version: int = 0
    gen: int = 0
    settling: bool = False
    held: list[tuple[int, object, int]] = attrs.field(factory=list)
    draining: bool = False

    def buffered(self, record: PresenceRecord) -> None:
        """Keep *record* until the snapshot arrives (bounded: past it, read again)."""
        if len(self.buffer) >= MAX_BUFFERED:
            self.buffer.clear()
            self.resync = True
        self.buffer.append(record)

    def apply(self, record: PresenceRecord, own: str) -> bool:
        """
        Apply a presence record of another node to :attr:`remote`.

        Returns:
            Whether it was news (newer than what is known). Records of node *own*
            move the version only: local presence is known first-hand.
        """
        if record.version <= self.version:
            return False
        self.version = record.version
        if record.node == own:
            return True
        nodes = self.remote.get(record.username)
        if record.present:
            if nodes is None:
                self.remote[record.username] = {record.node}
            else:
                nodes.add(record.node)
        elif nodes is not None:
            nodes.discard(record.node)
            if not nodes:
                del self.remote[record.username]
        return True
