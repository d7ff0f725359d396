"""
roombus.lowlevel: for people who drive the core themselves or write an adapter.

Applications need only :mod:`roombus`. This namespace holds the sans-IO machinery
under it: the :class:`Broker` (events and the current time in, actions out), its
events and actions, the heartbeat, and the hub contract an adapter carries out
(:class:`FramedHub` for a transport of bytes, :class:`MessageHub` for one that frames
WebSocket messages itself, their queues and the HTTP answers they give). The cluster
protocol's names are in :mod:`roombus.cluster`. ``docs/adapters.md`` is the contract.

Importing this module needs wsproto and h11 (the wire layer), never an event loop.
"""

from __future__ import annotations

from .core.actions import Action as Action
from .core.actions import Close as Close
from .core.actions import Deliver as Deliver
from .core.actions import SendPing as SendPing
from .core.broker import PING_TIMEOUT_CODE as PING_TIMEOUT_CODE
from .core.broker import Broker as Broker
from .core.broker import BrokerStatistics as BrokerStatistics
from .core.codes import CloseCode as CloseCode
from .core.events import ClientConnected as ClientConnected
from .core.events import ClientDisconnected as ClientDisconnected
from .core.events import Event as Event
from .core.events import PongReceived as PongReceived
from .core.events import TextReceived as TextReceived
from .core.heartbeat import Heartbeat as Heartbeat
from .core.heartbeat import HeartbeatState as HeartbeatState
from .core.names import ConnectionId as ConnectionId
from .core.streams import MemoryStreams as MemoryStreams
from .core.streams import Recovery as Recovery
from .core.streams import plan_recovery as plan_recovery
from .server.framed import FramedHub as FramedHub
from .server.http import HttpResponse as HttpResponse
from .server.hub import HubBase as HubBase
from .server.hub import NoticeHook as NoticeHook
from .server.messages import MessageHub as MessageHub
from .server.peer import peer_label as peer_label
from .server.queues import CloseMessage as CloseMessage
from .server.queues import MessageQueue as MessageQueue
from .server.queues import OutMessage as OutMessage
from .server.queues import QueueState as QueueState
from .server.queues import SendQueue as SendQueue
from .server.typing import Headers as Headers

__all__ = [
    "Action",
    "Broker",
    "BrokerStatistics",
    "ClientConnected",
    "ClientDisconnected",
    "Close",
    "CloseCode",
    "CloseMessage",
    "ConnectionId",
    "Deliver",
    "Event",
    "FramedHub",
    "Headers",
    "Heartbeat",
    "HeartbeatState",
    "HttpResponse",
    "HubBase",
    "MemoryStreams",
    "MessageHub",
    "MessageQueue",
    "NoticeHook",
    "OutMessage",
    "PING_TIMEOUT_CODE",
    "PongReceived",
    "QueueState",
    "Recovery",
    "SendPing",
    "SendQueue",
    "TextReceived",
    "peer_label",
    "plan_recovery",
]
