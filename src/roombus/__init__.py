"""
roombus: room-based WebSocket pub/sub with presence.

This package is the sans-IO core: it imports neither trio nor any socket code.
Drive it yourself, or run it with :mod:`roombus.trio` (``roombus serve``,
:func:`roombus.run`).
"""

from __future__ import annotations

from ._run import run as run
from ._version import __version__ as __version__
from .cluster.broker import ClusterBroker as ClusterBroker
from .cluster.config import ClusterConfig as ClusterConfig
from .core.actions import Action as Action
from .core.actions import Announce as Announce
from .core.actions import BackplaneAction as BackplaneAction
from .core.actions import Close as Close
from .core.actions import Deliver as Deliver
from .core.actions import MessagePublished as MessagePublished
from .core.actions import Notice as Notice
from .core.actions import Relay as Relay
from .core.actions import SendPing as SendPing
from .core.actions import Subscribe as Subscribe
from .core.actions import Unsubscribe as Unsubscribe
from .core.actions import UserJoined as UserJoined
from .core.actions import UserLeft as UserLeft
from .core.auth import Authorizer as Authorizer
from .core.auth import ClaimsAuthorizer as ClaimsAuthorizer
from .core.auth import Identity as Identity
from .core.auth import RoomRules as RoomRules
from .core.broker import PING_TIMEOUT_CODE as PING_TIMEOUT_CODE
from .core.broker import Broker as Broker
from .core.broker import BrokerStatistics as BrokerStatistics
from .core.config import BrokerConfig as BrokerConfig
from .core.errors import ConfigError as ConfigError
from .core.errors import LocalProtocolError as LocalProtocolError
from .core.errors import RoombusError as RoombusError
from .core.events import BackplaneLost as BackplaneLost
from .core.events import BackplaneRestored as BackplaneRestored
from .core.events import ClientConnected as ClientConnected
from .core.events import ClientDisconnected as ClientDisconnected
from .core.events import Event as Event
from .core.events import PongReceived as PongReceived
from .core.events import RecordReceived as RecordReceived
from .core.events import RoomSynced as RoomSynced
from .core.events import TextReceived as TextReceived
from .core.heartbeat import Heartbeat as Heartbeat
from .core.heartbeat import HeartbeatState as HeartbeatState
from .core.names import ConnectionId as ConnectionId
from .core.names import RoomName as RoomName
from .core.names import Username as Username
from .core.names import is_valid_room as is_valid_room
from .core.names import is_valid_username as is_valid_username
from .node.settings import Settings as Settings
from .server.auth import Authenticator as Authenticator
from .server.auth import JWTAuthenticator as JWTAuthenticator
from .server.auth import Refusal as Refusal
from .server.config import ServerConfig as ServerConfig
from .server.queues import QueueState as QueueState
from .server.queues import SendQueue as SendQueue

__all__ = [
    "Action",
    "Announce",
    "Authenticator",
    "Authorizer",
    "BackplaneAction",
    "BackplaneLost",
    "BackplaneRestored",
    "Broker",
    "BrokerConfig",
    "BrokerStatistics",
    "ClaimsAuthorizer",
    "ClientConnected",
    "ClientDisconnected",
    "Close",
    "ClusterBroker",
    "ClusterConfig",
    "ConfigError",
    "ConnectionId",
    "Deliver",
    "Event",
    "Heartbeat",
    "HeartbeatState",
    "Identity",
    "JWTAuthenticator",
    "LocalProtocolError",
    "MessagePublished",
    "Notice",
    "PING_TIMEOUT_CODE",
    "PongReceived",
    "QueueState",
    "RecordReceived",
    "Refusal",
    "Relay",
    "RoomName",
    "RoomRules",
    "RoomSynced",
    "RoombusError",
    "SendPing",
    "SendQueue",
    "ServerConfig",
    "Settings",
    "Subscribe",
    "TextReceived",
    "Unsubscribe",
    "UserJoined",
    "UserLeft",
    "Username",
    "__version__",
    "is_valid_room",
    "is_valid_username",
    "run",
]
