"""
Frame-level abuse over roombus's own transports (trio, asyncio), on raw sockets: runs of
continuation frames, control-frame floods. An ASGI server parses frames and answers
pings itself, so these are roombus's promises only where roombus reads the frames.
"""

from __future__ import annotations

import pytest

from .rawws import OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS, client_frame

pytestmark = pytest.mark.parametrize("transport", ["trio", "asyncio"], indirect=True)


def test_a_run_of_empty_continuation_frames_is_closed_with_1009(make_server):
    server = make_server()
    with RawWS.connect(server.port) as ws:
        ws.recv_json()  # join
        ws.recv_json()  # presence_state
        run = client_frame(OP_TEXT, b"a", fin=False)
        # 64 KiB at 64 bytes a frame is about 1,000 frames: send 5 times that, with the
        # unsolicited pong of the original report in between.
        empty = client_frame(OP_CONT, b"", fin=False)
        run += (empty * 2500 + client_frame(OP_PONG)) * 2
        ws.send_raw(run)
        assert ws.close_code() == 1009


def test_a_ping_flood_is_closed_with_1008(make_server):
    server = make_server(rate_limit=100, rate_burst=200)
    with RawWS.connect(server.port) as ws:
        ws.recv_json()
        ws.recv_json()
        # Never read while flooding: the pongs do not pile up (only the latest is kept).
        ws.send_raw(client_frame(OP_PING, b"x") * 3000)
        frames = []
        while True:
            frame = ws.recv_frame()
            frames.append(frame)
            if frame.opcode == 0x8:
                break
        assert frame.close_code == 1008
        assert frame.payload[2:] == b"rate limit exceeded"
        assert sum(f.opcode == OP_PONG for f in frames) <= 400  # the burst and its refill


def test_heartbeat_pongs_never_trip_the_rate_limit(make_server):
    """Pings five times a second against an allowance of one message a second: were
    the answers charged, they would be refused and then closed as a flood; the answer to
    the server's own ping is free."""
    server = make_server(rate_limit=1, rate_burst=1, ping_interval=0.2, ping_timeout=1)
    with RawWS.connect(server.port) as ws:
        ws.recv_json()
        ws.recv_json()
        pings = 0
        while pings < 5:
            frame = ws.recv_frame()
            assert frame.opcode != 0x8, frame
            if frame.opcode == OP_PING:
                pings += 1
                ws.send_frame(OP_PONG, frame.payload)
        ws.send_json({"type": "ping"})  # the allowance is intact
        assert ws.recv_json() == {"type": "pong"}
