"""The real command line, ``python -m roombus serve``, in a subprocess."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from .conftest import open_client
from .rawws import OP_CLOSE, RawWS, get, http_exchange, upgrade_request

EXIT_BOUND = 5.0  # seconds from the signal to the exit


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_every_client_with_1001_and_exits_0(cli, signum):
    # No drain: all at once, on either signal (tests/e2e/test_drain.py has the drain).
    proc = cli("--port", "0", "--close-timeout", "2", "--drain-seconds", "0")
    port = proc.wait_listening()
    assert f"listening on ws://127.0.0.1:{port}/ws, page at http://127.0.0.1:{port}/" in (
        proc.stderr
    )
    ann = open_client(port, "lobby", "ann")
    bob = open_client(port, "lobby", "bob")
    cid = open_client(port, "other", "cid")
    clients = [ann, bob, cid]
    try:
        ann.expect(type="presence", event="join", username="bob")
        ann.chat("before the signal")
        bob.expect_chat("before the signal", "ann")
        t0 = time.monotonic()
        proc.signal(signum)
        for c in clients:
            closed = c.until_closed()  # ann still has her own echo to read first
            assert closed.rcvd is not None, f"{c.username} got no close frame"
            assert closed.rcvd.code == 1001
        assert proc.wait(EXIT_BOUND) == 0
        assert time.monotonic() - t0 < EXIT_BOUND
    finally:
        for c in clients:
            c.close()
    assert "Traceback" not in proc.stderr
    assert f"{signum.name} received" in proc.stderr


def test_sigterm_with_a_client_that_ignores_close_still_exits_within_close_timeout(cli):
    proc = cli("--port", "0", "--close-timeout", "1", "--drain-seconds", "0")
    port = proc.wait_listening()
    with RawWS.connect(port, "lobby", "stubborn") as raw:
        assert raw.recv_json()["type"] == "presence"
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert raw.recv_close().close_code == 1001  # and never answered
        assert proc.wait(EXIT_BOUND) == 0
        assert time.monotonic() - t0 < 1 + 2.0
    assert "Traceback" not in proc.stderr


def test_healthz_page_and_chat_over_the_cli(cli):
    proc = cli("--port", "0")
    port = proc.wait_listening()
    health = get(port, "/healthz")
    assert health.status == 200
    page = get(port, "/")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert b"<html" in page.body.lower()
    with open_client(port, "lobby", "ann").ws as ws:
        ws.send('{"type":"chat","content":"via cli"}')
        assert '"via cli"' in ws.recv(timeout=5)
    proc.signal(signal.SIGTERM)
    assert proc.wait(EXIT_BOUND) == 0


def test_no_page_option(cli):
    proc = cli("--port", "0", "--no-page")
    port = proc.wait_listening()
    assert get(port, "/").status == 404
    assert get(port, "/healthz").status == 200
    proc.signal(signal.SIGTERM)
    assert proc.wait(EXIT_BOUND) == 0


def test_cli_limits_and_origins_are_honoured(cli):
    proc = cli(
        "--port",
        "0",
        "--max-message-bytes",
        "1024",
        "--send-queue-bytes",
        "4096",
        "--allowed-origin",
        "https://ok.example",
        "--allowed-origin",
        "https://also.example",
    )
    port = proc.wait_listening()
    target = "/ws?room=lobby&username=ann"
    assert (
        http_exchange(port, upgrade_request(target, {"Origin": "https://bad.example"})).status
        == 403
    )
    for origin in ("https://ok.example", "https://also.example"):
        with open_client(port, "lobby", "ann", origin=origin).ws:
            pass
    client = open_client(port, "lobby", "ann", origin="https://ok.example")
    with client.ws:
        client.chat("x" * 2000)
        closed = client.until_closed()
        assert closed.rcvd is not None and closed.rcvd.code == 1009
    proc.signal(signal.SIGTERM)
    assert proc.wait(EXIT_BOUND) == 0


def test_environment_variables_configure_the_server(cli):
    bad = cli("--port", "0", env={"ROOMBUS_PING_INTERVAL": "-1"})
    assert bad.wait(15) == 2
    assert "ping-interval" in bad.stderr
    assert "Traceback" not in bad.stderr
    proc = cli(
        "--port", "0", env={"ROOMBUS_MAX_MESSAGE_BYTES": "1024", "ROOMBUS_SEND_QUEUE_BYTES": "4096"}
    )
    port = proc.wait_listening()
    client = open_client(port, "lobby", "ann")
    with client.ws:
        client.chat("x" * 2000)
        closed = client.until_closed()
        assert closed.rcvd is not None and closed.rcvd.code == 1009
    proc.signal(signal.SIGTERM)
    assert proc.wait(EXIT_BOUND) == 0


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--ping-interval", "-1"], "ping-interval"),
        (["--ping-interval", "nan"], "ping-interval"),
        (["--ping-timeout", "abc"], "ping-timeout"),
        (["--max-message-bytes", "0"], "max-message-bytes"),
        (["--send-queue", "-5"], "send-queue"),
        (["--send-queue-bytes", "10"], "send-queue-bytes"),
        (["--port", "70000"], "port"),
        (["--handshake-timeout", "0"], "handshake-timeout"),
        (["--allowed-origin", "example.com"], "allowed-origin"),
        (["--log-level", "loud"], "log-level"),
        (["--log-format", "yaml"], "log-format"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_config_error_exits_2_naming_the_setting(cli, args, setting):
    proc = cli("--port", "0", *args)
    assert proc.wait(15) == 2
    assert setting in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stderr


def test_port_in_use_exits_1_with_a_message_and_no_traceback(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("--port", str(port))
        assert proc.wait(15) == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_close_frame_reaches_a_raw_client_on_sigint(cli):
    proc = cli("--port", "0", "--close-timeout", "1")
    port = proc.wait_listening()
    with RawWS.connect(port, "lobby", "raw") as raw:
        raw.recv_json()
        proc.signal(signal.SIGINT)
        frames = raw.wait_eof()
        assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1001
    assert proc.wait(EXIT_BOUND) == 0


def test_the_transport_comes_from_the_variable_and_the_flag_wins(cli):
    proc = cli("--port", "0")
    proc.wait_listening()
    assert ("(asyncio)" in proc.stderr) == (proc.transport == "asyncio")
    proc.signal(signal.SIGTERM)
    assert proc.wait(EXIT_BOUND) == 0
    other = "trio" if proc.transport == "asyncio" else "asyncio"
    flagged = cli("--port", "0", "--transport", other)
    flagged.wait_listening()
    assert ("(asyncio)" in flagged.stderr) == (other == "asyncio")
    flagged.signal(signal.SIGTERM)
    assert flagged.wait(EXIT_BOUND) == 0
    bad = cli("--port", "0", "--transport", "gevent")
    assert bad.wait(15) == 2
    assert "transport" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_no_heartbeat_option(cli):
    proc = cli("--port", "0", "--ping-interval", "0.2", "--ping-timeout", "0.2", "--no-heartbeat")
    port = proc.wait_listening()
    with RawWS.connect(port, "lobby", "quiet") as raw:
        assert raw.recv_json()["type"] == "presence"
        assert raw.recv_json()["type"] == "presence_state"
        with pytest.raises(TimeoutError):  # neither a ping nor a close, past 0.4 s
            raw.recv_frame(timeout=0.8)
        raw.send_json({"type": "ping"})
        assert raw.recv_json() == {"type": "pong"}
    proc.signal(signal.SIGTERM)
    assert proc.wait(EXIT_BOUND) == 0


def _pong_barrier(client) -> None:
    """An app-level ping; presence messages before its pong are skipped."""
    client.send({"type": "ping"})
    msg = client.recv(timeout=5)
    while msg.get("type") != "pong":
        assert msg.get("type") in ("presence", "presence_state"), msg
        msg = client.recv(timeout=5)


def test_a_stopped_server_does_not_blame_its_clients_for_the_stall(cli):
    """
    SIGSTOP the server for longer than ping_interval + ping_timeout, then SIGCONT:
    clients that answer pings stay connected (their pongs, waiting unread, are read
    before any verdict), and a client that never answers is still closed 1011.
    """
    interval, timeout, stall = 0.4, 0.4, 2.5
    proc = cli("--port", "0", "--ping-interval", str(interval), "--ping-timeout", str(timeout))
    port = proc.wait_listening()
    clients = [open_client(port, "lobby", f"user{i}", expect_join=None) for i in range(4)]
    try:
        with RawWS.connect(port, "lobby", "mute") as mute:
            assert mute.recv_json()["type"] == "presence"
            for c in clients:
                _pong_barrier(c)  # every client is in, and the heartbeat is running
            time.sleep(interval + timeout / 2)  # some clients pinged, some idle
            proc.signal(signal.SIGSTOP)
            try:
                time.sleep(stall)
            finally:
                proc.signal(signal.SIGCONT)
            # The mute client is given up on (not for the stall: for its silence after).
            assert mute.recv_close(timeout=10).close_code == 1011
        # Several heartbeat rounds after the stall: every answering client is still in.
        end = time.monotonic() + 2 * (interval + timeout)
        while time.monotonic() < end:
            for c in clients:
                _pong_barrier(c)
            time.sleep(0.1)  # a round trip can be fast: stay under the rate limit
        for c in clients:
            c.chat("still here")
        for c in clients:
            for _ in clients:
                assert c.recv(timeout=5)["content"] == "still here"
    finally:
        for c in clients:
            c.close()
    assert proc.stderr.count("ping timeout") == 1  # the mute client's, and nobody else's
    assert "Traceback" not in proc.stderr
