"""
The server-wide budget of queued bytes and the kernel send buffer per socket, over
roombus's own transports (trio, asyncio: an ASGI server owns its sockets and buffers).
"""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.parametrize("transport", ["trio", "asyncio"], indirect=True)


def _sockets(server) -> list[socket.socket]:
    links = server.server._links.values()
    if server.caps.name == "trio":
        return [link.transport.sock for link in links]
    return [proto.transport.get_extra_info("socket") for proto in links]


def test_client_sockets_get_the_configured_send_buffer(make_server):
    server = make_server(socket_send_buffer=8192)
    server.raw()
    sizes = server.call(
        lambda: [s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) for s in _sockets(server)]
    )
    assert sizes and all(size <= 2 * 8192 for size in sizes)  # Linux doubles it


def test_over_the_budget_the_readers_that_stopped_are_closed_and_the_rest_served(make_server):
    server = make_server(max_queued_bytes=256 * 1024, socket_send_buffer=8192, rate_limit=0)
    stalled = []
    for i in range(3):
        ws = server.raw(username=f"stalled{i}", rcvbuf=4096)
        stalled.append(ws)
    reader = server.raw(username="reader")
    sender = server.raw(username="sender")
    n = 200
    text = "x" * 4000
    reader.recv_json()  # its join
    reader.recv_json()  # presence_state
    reader.recv_json()  # the sender's join
    left = set()
    for i in range(n):
        sender.send_json({"type": "chat", "content": f"{i}{text}"})
        while (msg := reader.recv_json(answer_pings=True))["type"] == "presence":
            assert msg["event"] == "leave", msg
            left.add(msg["username"])
        assert msg["type"] == "chat" and msg["content"].startswith(f"{i}x"), msg
        while sender.recv_json(answer_pings=True)["type"] != "chat":  # its echo
            pass
    assert left == {"stalled0", "stalled1", "stalled2"}
    for ws in stalled:  # they read at last: what was in flight, then the close
        close = ws.recv_close(timeout=10)
        assert close.close_code == 1008
        assert close.payload[2:] == b"server send queues full: reading too slowly"
    metrics = server.call(server.server.hub.metrics)
    assert metrics["roombus_queued_bytes_closed_total"] == 3
    assert metrics["roombus_queued_bytes"] < 256 * 1024
    server.assert_serving()
