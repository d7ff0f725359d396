"""
Drive the roombus core by hand: no sockets, no event loop, no clock.

Two clients connect, chat, and then time passes: both are pinged, only ann answers,
and bob is closed for silence. Every call prints the actions it returns, which is
exactly what a network driver would carry out.

Run it with ``python examples/pure_core.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from roombus import BrokerConfig, RoomName, Username
from roombus.lowlevel import (
    Action,
    Broker,
    ClientConnected,
    ClientDisconnected,
    ConnectionId,
    Deliver,
    PongReceived,
    TextReceived,
)

if TYPE_CHECKING:
    from roombus.lowlevel import Event

# The driver owns both clocks: monotonic seconds for deadlines, Unix seconds for stamps.
EPOCH = 1_700_000_000
ANN, BOB = ConnectionId(1), ConnectionId(2)
LOBBY = RoomName("lobby")

broker = Broker(BrokerConfig(ping_interval=20.0, ping_timeout=10.0))


def show(title: str, actions: list[Action]) -> None:
    print(f"-- {title}")
    for action in actions:
        if type(action) is Deliver:
            print(f"   Deliver to {list(action.conns)}: {action.payload.decode()}")
        else:
            print(f"   {action!r}")


def at(now: float, event: Event) -> None:
    show(f"t={now:g}: {event!r}", broker.handle(event, now=now, timestamp=EPOCH + int(now)))


at(0.0, ClientConnected(conn=ANN, username=Username("ann"), room=LOBBY))
at(1.0, ClientConnected(conn=BOB, username=Username("bob"), room=LOBBY))
at(2.0, TextReceived(conn=ANN, text='{"type":"chat","content":"hi bob"}'))
at(3.0, TextReceived(conn=BOB, text='{"type":"chat","content":"hi!","username":"mallory"}'))
at(4.0, TextReceived(conn=BOB, text="not json"))

print(f"next deadline: {broker.next_deadline()}")  # 20.0: ann's ping is due
for now in (20.0, 21.0):
    show(f"t={now:g}: handle_timeout", broker.handle_timeout(now=now, timestamp=EPOCH + int(now)))

at(22.0, PongReceived(conn=ANN))  # ann answers; bob stays silent
print(f"next deadline: {broker.next_deadline()}")  # 31.0: bob's last chance
show("t=31: handle_timeout", broker.handle_timeout(now=31.0, timestamp=EPOCH + 31))

print(f"members of lobby: {broker.members('lobby')}, seq: {broker.seq('lobby')}")
print(broker.statistics())
at(40.0, ClientDisconnected(conn=ANN))
print(f"rooms left: {broker.rooms}")
