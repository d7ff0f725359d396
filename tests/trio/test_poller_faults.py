"""The trio poller's edges over loopback: what goes wrong between two task steps, and
what the kernel may refuse, costs one connection and never the server."""

from __future__ import annotations

import errno
import socket
import struct
from typing import TYPE_CHECKING, Any

from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import Request

import trio
from roombus import BrokerConfig, ServerConfig, Settings
from roombus.trio import serve
from tests.trio.test_poller import eventually, join, running, until_chat

if TYPE_CHECKING:
    import pytest


async def test_a_drainer_whose_connection_is_dropped_before_its_first_step() -> None:
    """The flusher starts a drainer for a partly written queue; before that task runs, the
    poller reads the client's reset and drops the connection. The drainer must find it
    gone, not wait on a closed socket (descriptor -1), which would end the server."""
    settings = Settings(
        broker=BrokerConfig(rate_limit=0),
        server=ServerConfig(host="127.0.0.1", port=0, socket_send_buffer=4096, close_timeout=0.2),
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, settings)
            assert server.port is not None
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            await sock.connect(("127.0.0.1", server.port))
            ws = WSConnection(ConnectionType.CLIENT)
            await sock.send(ws.send(Request(host="x", target="/ws?room=a&username=slow")))
            await eventually(lambda: server.connection_count == 1)
            await trio.sleep(0.1)
            (link,) = server._links.values()
            # One synchronous stretch, as two task steps in a row would run:
            for _ in range(5):
                server.publish("a", "x" * 20000)
            server._flush_all()  # the flusher's sweep: a partial write, a drainer started
            assert link.draining
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # an RST
            assert server._selector is not None
            for key, _ in server._selector.select(0.5):  # the poller's round comes first
                server._read(key.data)
            assert link.cid not in server._links
            await trio.sleep(0.2)  # now the drainer's first step
            assert not link.draining
            ann = await join(server, "a", "ann")  # the server goes on
            await ann.send({"type": "chat", "content": "hi"})
            assert (await until_chat(ann))["content"] == "hi"
            await ann.stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_socket_the_kernel_will_not_watch_is_dropped_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``epoll_ctl`` may refuse (ENOSPC past ``fs.epoll.max_user_watches``, ENOMEM): that
    connection is closed, the server accepts the next one."""
    async with running(polled=True) as server:
        selector = server._selector
        assert selector is not None
        register = selector.register
        refused: list[Any] = []

        def once(fileobj: Any, events: int, data: Any = None) -> Any:
            if not refused:
                refused.append(fileobj)
                raise OSError(errno.ENOSPC, "No space left on device")
            return register(fileobj, events, data)

        monkeypatch.setattr(selector, "register", once)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        with trio.fail_after(5):
            assert await stream.receive_some(1024) == b""  # closed at once, unanswered
        await stream.aclose()
        assert refused and server.connection_count == 0 and not server._links
        assert any("cannot watch" in r.getMessage() for r in caplog.records)
        ann = await join(server, "lobby", "ann")
        await ann.send({"type": "chat", "content": "hi"})
        assert (await until_chat(ann))["content"] == "hi"
