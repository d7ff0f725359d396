"""
roombus.cluster: the cluster protocol, sans-IO, for people who write a backplane driver.

Records (:func:`parse_record`), the Redis schema, the cluster room state and the link to
Redis (:class:`BackplaneProtocol`) as state machines, and the :class:`ClusterBroker`
that relays a node's rooms through them. The drivers, one per event loop
(``roombus.trio.RedisBackplane``, ``roombus.asyncio.RedisBackplane``), own the sockets.
An application that only joins a cluster needs :class:`roombus.ClusterConfig`, nothing
from here.
"""

from __future__ import annotations

from ..core.actions import Announce as Announce
from ..core.actions import BackplaneAction as BackplaneAction
from ..core.actions import Relay as Relay
from ..core.actions import Subscribe as Subscribe
from ..core.actions import Unsubscribe as Unsubscribe
from ..core.events import BackplaneLost as BackplaneLost
from ..core.events import BackplaneRestored as BackplaneRestored
from ..core.events import RecordReceived as RecordReceived
from ..core.events import RoomSynced as RoomSynced
from .broker import ClusterBroker as ClusterBroker
from .protocol import BackplaneProtocol as BackplaneProtocol
from .protocol import BackplaneStatistics as BackplaneStatistics
from .protocol import CloseLinks as CloseLinks
from .protocol import DriverCommand as DriverCommand
from .protocol import Execute as Execute
from .protocol import Link as Link
from .protocol import Listen as Listen
from .protocol import OpenLink as OpenLink
from .protocol import Ping as Ping
from .protocol import Unlisten as Unlisten
from .records import ChatRecord as ChatRecord
from .records import PresenceRecord as PresenceRecord
from .records import parse_record as parse_record

__all__ = [
    "Announce",
    "BackplaneAction",
    "BackplaneLost",
    "BackplaneProtocol",
    "BackplaneRestored",
    "BackplaneStatistics",
    "ChatRecord",
    "CloseLinks",
    "ClusterBroker",
    "DriverCommand",
    "Execute",
    "Link",
    "Listen",
    "OpenLink",
    "Ping",
    "PresenceRecord",
    "RecordReceived",
    "Relay",
    "RoomSynced",
    "Subscribe",
    "Unlisten",
    "Unsubscribe",
    "parse_record",
]
