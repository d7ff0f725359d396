"""``roombus.run()``: a whole server from a program, on each transport, in a subprocess."""

from __future__ import annotations

import signal

import pytest

import roombus

from .conftest import CliServer, open_client
from .rawws import HOST

EXIT_BOUND = 5.0  # seconds from the signal to the exit

#: A program that runs a server with run(): the settings, then keywords over them; each
#: notice is printed (the hook is a setting too).
PROGRAM = f"""
import logging, sys
import roombus
logging.basicConfig(level="INFO", stream=sys.stderr)
server = roombus.ServerConfig(host={HOST!r}, port=0, close_timeout=2, drain_seconds=0.5)
settings = roombus.Settings(server=server)
roombus.run(settings, transport=sys.argv[1], on_notice=lambda n: print(type(n).__name__))
print("returned")
"""


@pytest.mark.parametrize("transport", ["trio", "asyncio"])
def test_run_serves_with_the_settings_and_returns_on_sigterm(transport: str) -> None:
    proc = CliServer(transport, code=PROGRAM)
    try:
        port = proc.wait_listening()
        assert f"listening on ws://{HOST}:{port}/ws" in proc.stderr
        assert ("(asyncio)" in proc.stderr) == (transport == "asyncio")
        client = open_client(port, "lobby", "ann")
        try:
            client.chat("via run")
            client.expect_chat("via run", "ann")
            proc.signal(signal.SIGTERM)
            assert client.until_closed().rcvd.code == 1001
        finally:
            client.close()
        assert proc.wait(EXIT_BOUND) == 0
    finally:
        proc.stop()
    assert "Traceback" not in proc.stderr
    assert "SIGTERM received: draining" in proc.stderr
    # on_notice saw the join, the chat and the leave; run() returned after the shutdown.
    assert proc.stdout.split() == ["UserJoined", "MessagePublished", "UserLeft", "returned"]


def test_run_refuses_bad_settings_before_starting_a_loop() -> None:
    with pytest.raises(roombus.ConfigError, match="transport"):
        roombus.run(transport="gevent")
    with pytest.raises(roombus.ConfigError, match="server"):
        roombus.run(server=roombus.BrokerConfig())
    with pytest.raises(TypeError, match="nonsense"):
        roombus.run(nonsense=1)
