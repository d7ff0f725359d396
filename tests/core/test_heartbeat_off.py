"""BrokerConfig(heartbeat=False): for transports that own pings (an ASGI server)."""

from __future__ import annotations

import pytest

from roombus import ConfigError
from roombus.lowlevel import PongReceived

from ..helpers import TS, cid, connect, inbox, make_broker, send


def test_no_timer_no_ping_no_close_however_long_the_silence() -> None:
    broker = make_broker(heartbeat=False, ping_interval=1.0, ping_timeout=1.0)
    connect(broker, 1, "ann")
    assert broker.next_deadline() is None
    assert broker.handle_timeout(now=1e6, timestamp=TS) == []
    # A pong (unsolicited: the server's) changes nothing either.
    assert broker.handle(PongReceived(conn=cid(1)), now=5.0, timestamp=TS) == []
    assert broker.next_deadline() is None
    assert inbox(send(broker, 1, {"type": "ping"}, now=1e6), 1) == [{"type": "pong"}]


def test_heartbeat_is_on_by_default() -> None:
    broker = make_broker(ping_interval=1.0)
    connect(broker, 1, "ann")
    assert broker.next_deadline() == 1.0


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_heartbeat_must_be_a_bool(value: object) -> None:
    with pytest.raises(ConfigError, match="heartbeat"):
        make_broker(heartbeat=value)
