"""
roombus: room-based WebSocket pub/sub with presence.

This package is the sans-IO core: it imports neither trio nor any socket code.
Drive it yourself, or run it with :mod:`roombus.trio` (``roombus serve``).
"""

from __future__ import annotations

from ._actions import Action as Action
from ._actions import Announce as Announce
from ._actions import BackplaneAction as BackplaneAction
from ._actions import Close as Close
from ._actions import Deliver as Deliver
from ._actions import MessagePublished as MessagePublished
from ._actions import Notice as Notice
from ._actions import Relay as Relay
from ._actions import SendPing as SendPing
from ._actions import Subscribe as Subscribe
from ._actions import Unsubscribe as Unsubscribe
from ._actions import UserJoined as UserJoined
from ._actions import UserLeft as UserLeft
from ._auth import Authenticator as Authenticator
from ._auth import Authorizer as Authorizer
from ._auth import ClaimsAuthorizer as ClaimsAuthorizer
from ._auth import Identity as Identity
from ._auth import JWTAuthenticator as JWTAuthenticator
from ._auth import Refusal as Refusal
from ._auth import RoomRules as RoomRules
from ._broker import PING_TIMEOUT_CODE as PING_TIMEOUT_CODE
from ._broker import Broker as Broker
from ._broker import BrokerStatistics as BrokerStatistics
from ._config import BrokerConfig as BrokerConfig
from ._config import ServerConfig as ServerConfig
from ._errors import ConfigError as ConfigError
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import RoombusError as RoombusError
from ._events import BackplaneLost as BackplaneLost
from ._events import BackplaneRestored as BackplaneRestored
from ._events import ClientConnected as ClientConnected
from ._events import ClientDisconnected as ClientDisconnected
from ._events import Event as Event
from ._events import PongReceived as PongReceived
from ._events import RecordReceived as RecordReceived
from ._events import RoomSynced as RoomSynced
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
    "Subscribe",
    "TextReceived",
    "Unsubscribe",
    "UserJoined",
    "UserLeft",
    "Username",
    "__version__",
    "is_valid_room",
    "is_valid_username",
]
