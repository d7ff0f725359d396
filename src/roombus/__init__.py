"""
roombus: room-based WebSocket pub/sub with presence.

This namespace is for applications: configure (:class:`Settings`, :class:`BrokerConfig`,
:class:`ServerConfig`, :class:`ClusterConfig`), serve (:func:`run`, or the adapters
:mod:`roombus.trio`, :mod:`roombus.asyncio`, :mod:`roombus.asgi`), hook into what
happens (:data:`Notice`), authenticate and authorize. Importing it needs neither trio
nor a socket.

Two more namespaces, for other audiences:

* :mod:`roombus.lowlevel`: the sans-IO broker, its events and actions, and the hub an
  adapter drives (for people who drive the core themselves or write an adapter);
* :mod:`roombus.cluster`: the cluster protocol (for people who write a backplane
  driver).

A name that lived here before the tiers (``roombus.Broker``, say) still resolves,
with a :class:`DeprecationWarning` naming its new home.
"""

from __future__ import annotations

import importlib as _importlib
import warnings as _warnings
from typing import Any as _Any

from ._run import run as run
from ._version import __version__ as __version__
from .cluster.config import ClusterConfig as ClusterConfig
from .core.actions import MessagePublished as MessagePublished
from .core.actions import Notice as Notice
from .core.actions import UserJoined as UserJoined
from .core.actions import UserLeft as UserLeft
from .core.auth import Authorizer as Authorizer
from .core.auth import ClaimsAuthorizer as ClaimsAuthorizer
from .core.auth import Identity as Identity
from .core.auth import RoomRules as RoomRules
from .core.config import BrokerConfig as BrokerConfig
from .core.errors import ConfigError as ConfigError
from .core.errors import LocalProtocolError as LocalProtocolError
from .core.errors import RoombusError as RoombusError
from .core.names import RoomName as RoomName
from .core.names import Username as Username
from .core.names import is_valid_room as is_valid_room
from .core.names import is_valid_username as is_valid_username
from .core.streams import Position as Position
from .core.streams import Publication as Publication
from .core.streams import RoomPolicy as RoomPolicy
from .node.settings import Settings as Settings
from .server.auth import Authenticator as Authenticator
from .server.auth import JWTAuthenticator as JWTAuthenticator
from .server.auth import Refusal as Refusal
from .server.config import ServerConfig as ServerConfig

__all__ = [
    "Authenticator",
    "Authorizer",
    "BrokerConfig",
    "ClaimsAuthorizer",
    "ClusterConfig",
    "ConfigError",
    "Identity",
    "JWTAuthenticator",
    "LocalProtocolError",
    "MessagePublished",
    "Notice",
    "Position",
    "Publication",
    "Refusal",
    "RoomName",
    "RoomPolicy",
    "RoomRules",
    "RoombusError",
    "ServerConfig",
    "Settings",
    "UserJoined",
    "UserLeft",
    "Username",
    "__version__",
    "is_valid_room",
    "is_valid_username",
    "run",
]

#: Names that were exported here before the tiers, and the namespace that has them now.
_MOVED: dict[str, str] = {
    **dict.fromkeys(
        [
            "Action",
            "Broker",
            "BrokerStatistics",
            "ClientConnected",
            "ClientDisconnected",
            "Close",
            "ConnectionId",
            "Deliver",
            "Event",
            "Heartbeat",
            "HeartbeatState",
            "PING_TIMEOUT_CODE",
            "PongReceived",
            "QueueState",
            "SendPing",
            "SendQueue",
            "TextReceived",
        ],
        "lowlevel",
    ),
    **dict.fromkeys(
        [
            "Announce",
            "BackplaneAction",
            "BackplaneLost",
            "BackplaneRestored",
            "ClusterBroker",
            "RecordReceived",
            "Relay",
            "RoomSynced",
            "Subscribe",
            "Unsubscribe",
        ],
        "cluster",
    ),
}


def __getattr__(name: str) -> _Any:
    """PEP 562: a name that moved tier still resolves, with a warning naming its home."""
    tier = _MOVED.get(name)
    if tier is None:
        raise AttributeError(f"module 'roombus' has no attribute {name!r}")
    _warnings.warn(f"roombus.{name} is roombus.{tier}.{name} now", DeprecationWarning, stacklevel=2)
    return getattr(_importlib.import_module(f"roombus.{tier}"), name)
