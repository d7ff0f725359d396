"""Helpers that make core tests read like protocol transcripts."""

from __future__ import annotations

import json
from typing import Any

from roombus import BrokerConfig, RoomName, Username
from roombus.core.actions import Action
from roombus.lowlevel import (
    Broker,
    ClientConnected,
    ClientDisconnected,
    ConnectionId,
    Deliver,
    TextReceived,
)

TS = 1_700_000_000  # a fixed wall-clock timestamp


def cid(n: int) -> ConnectionId:
    return ConnectionId(n)


def connect(
    broker: Broker, n: int, username: str, room: str | None = "lobby", now: float = 0.0
) -> list[Action]:
    return broker.handle(
        ClientConnected(
            conn=cid(n), username=Username(username), room=RoomName(room) if room else None
        ),
        now=now,
        timestamp=TS,
    )


def send(broker: Broker, n: int, message: Any, now: float = 0.0) -> list[Action]:
    text = message if isinstance(message, str) else json.dumps(message)
    return broker.handle(TextReceived(conn=cid(n), text=text), now=now, timestamp=TS)


def disconnect(broker: Broker, n: int, now: float = 0.0) -> list[Action]:
    return broker.handle(ClientDisconnected(conn=cid(n)), now=now, timestamp=TS)


def deliveries(actions: list[Action]) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
    """The Deliver actions as (receivers, decoded envelope), in order."""
    return [(tuple(a.conns), json.loads(a.payload)) for a in actions if isinstance(a, Deliver)]


def inbox(actions: list[Action], n: int) -> list[dict[str, Any]]:
    """What connection *n* receives from *actions*, in order."""
    return [env for conns, env in deliveries(actions) if cid(n) in conns]


def make_broker(**kw: Any) -> Broker:
    return Broker(BrokerConfig(**kw))
