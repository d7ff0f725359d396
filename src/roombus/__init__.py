"""
roombus: room-based WebSocket pub/sub with presence.

This package is the sans-IO core: it imports neither trio nor any socket code.
Drive it yourself, or run it with :mod:`roombus.trio` (``roombus serve``).
"""

from __future__ import annotations

from ._actions import Action as Action
from ._actions import Close as Close
from ._actions import Deliver as Deliver
from ._actions import MessagePublished as MessagePublished
from ._actions import Notice as Notice
from ._actions import SendPing as SendPing
from ._actions import UserJoined as UserJoined
from ._actions import UserLeft as UserLeft
from ._broker import PING_TIMEOUT_CODE as PING_TIMEOUT_CODE
from ._broker import Broker as Broker
from ._broker import BrokerStatistics as BrokerStatistics
from ._config import BrokerConfig as BrokerConfig
from ._config import ServerConfig as ServerConfig
from ._errors import ConfigError as ConfigError
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import RoombusError as RoombusError
from ._events import ClientConnected as ClientConnected
from ._events import ClientDisconnected as ClientDisconnected
from ._events import Event as Event
from ._events import PongReceived as PongReceived
from ._events import TextReceived as TextReceived
from ._heartbeat import Heartbeat as Heartbeat
from ._heartbeat import HeartbeatState as HeartbeatState
from ._sendqueue import QueueState as QueueState
from ._sendqueue import SendQueue as SendQueue
from ._types import ConnectionId as ConnectionId
from ._types import RoomName as RoomName
from ._types import Username as Username
from ._types import is_valid_room as is_valid_room
from ._types import is_valid_username as is_valid_username
from ._version import __version__ as __version__

__all__ = [
    "Action",
    "Broker",
    "BrokerConfig",
    "BrokerStatistics",
    "ClientConnected",
    "ClientDisconnected",
    "Close",
    "ConfigError",
    "ConnectionId",
    "Deliver",
    "Event",
    "Heartbeat",
    "HeartbeatState",
    "LocalProtocolError",
    "MessagePublished",
    "Notice",
    "PING_TIMEOUT_CODE",
    "PongReceived",
    "QueueState",
    "RoomName",
    "RoombusError",
    "SendPing",
    "SendQueue",
    "ServerConfig",
    "TextReceived",
    "UserJoined",
    "UserLeft",
    "Username",
    "__version__",
    "is_valid_room",
    "is_valid_username",
]
