"""
roombus.client against a real server, over every transport, with both client drivers
(trio and asyncio): reconnects, resumes, acknowledged publishes resent across a cut,
credentials asked for on every connect, final refusals.

Connections are cut by a loopback TCP proxy (:class:`Proxy`) between the client and
the server: it can break every connection it carries (no close frame, as a network
does) and swallow what the server sends (so an ``ack`` is lost on its way).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import jwt
import pytest

import roombus.client as rc
import trio
from roombus.client import ClientOptions, Disconnected, Joined, Message, Presence
from roombus.server.auth import JWTAuthenticator

from .rawws import HOST

SECRET = "s3cret-for-tests-only-0123456789abcdef"
FAST = ClientOptions(backoff_initial=0.2, backoff_max=1.0, ping_interval=5.0, ping_timeout=2.0)
DEADLINE = 15.0


class Proxy:
    """A TCP proxy on loopback that a test can cut, or make deaf to the server."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.deaf = False  # drop what the server sends
        self.accepted = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection((HOST, self.target), timeout=5)
            except OSError:
                down.close()
                continue
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self.accepted += 1
                self._socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (from_server and self.deaf):
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every connection now, both ways, without a close frame."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(server: Any) -> Iterator[Proxy]:
    p = Proxy(server.port)
    yield p
    p.close()


@pytest.fixture(params=["trio", "asyncio"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Runs a test's coroutine function under the client driver's event loop."""
    if request.param == "trio":
        return lambda fn: trio.run(fn)
    return lambda fn: asyncio.run(fn())  # type: ignore[arg-type]


async def sleep(seconds: float) -> None:
    import sniffio

    if sniffio.current_async_library() == "trio":
        await trio.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


async def until(client: Any, want: Callable[[list[Any]], bool], got: list[Any]) -> list[Any]:
    """Read *client*'s events into *got* until ``want(got)``; fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    it = client.__aiter__()
    while not want(got):
        assert time.monotonic() < deadline, f"timed out; got {got[-10:]}"
        got.append(await _next(it, deadline - time.monotonic()))
    return got


async def _next(it: Any, seconds: float) -> Any:
    import sniffio

    if sniffio.current_async_library() == "trio":
        with trio.fail_after(seconds):
            return await it.__anext__()
    return await asyncio.wait_for(it.__anext__(), seconds)


def messages(events: list[Any], room: str = "lobby") -> list[Message]:
    return [e for e in events if isinstance(e, Message) and e.room == room]


@contextlib.asynccontextmanager
async def both(*clients: Any) -> AsyncIterator[list[Any]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(c) for c in clients]


def test_publish_and_receive_with_presence(server: Any, run: Any) -> None:
    url = f"ws://{HOST}:{server.port}/ws"

    async def main() -> None:
        async with both(
            rc.connect(url, ["lobby"], username="ann", options=FAST),
            rc.connect(url, ["lobby", "games"], username="bob", options=FAST),
        ) as (ann, bob):
            got: list[Any] = []
            await until(ann, lambda g: any(isinstance(e, Joined) for e in g), got)
            await until(
                ann,
                lambda g: any(isinstance(e, Presence) and "bob" in e.users for e in g),
                got,
            )
            first = await bob.publish("lobby", {"n": 1})
            second = await bob.publish("lobby", {"n": 2})
            assert (second.epoch, second.seq) == (first.epoch, first.seq + 1)
            await until(ann, lambda g: len(messages(g)) == 2, got)
            assert [(m.username, m.content, m.seq) for m in messages(got)] == [
                ("bob", {"n": 1}, first.seq),
                ("bob", {"n": 2}, second.seq),
            ]
            assert ann.presence("lobby") == {"ann", "bob"}
            assert ann.positions()["lobby"] == second
            with pytest.raises(rc.NotInRoom):
                await ann.publish("games", 1)

    run(main)


def test_a_cut_connection_resumes_every_message_once_in_order(
    server: Any, proxy: Proxy, run: Any
) -> None:
    direct = f"ws://{HOST}:{server.port}/ws"
    cut = f"ws://{HOST}:{proxy.port}/ws"

    async def main() -> None:
        async with both(
            rc.connect(cut, ["lobby"], username="ann", options=FAST),
            rc.connect(direct, ["lobby"], username="bob", options=FAST),
        ) as (ann, bob):
            got: list[Any] = []
            await until(ann, lambda g: any(isinstance(e, Joined) for e in g), got)
            sent = []
            for n in range(30):
                sent.append(await bob.publish("lobby", n))
                if n == 9:
                    await until(ann, lambda g: len(messages(g)) >= 3, got)
                    proxy.cut()  # ann is gone; bob goes on publishing
            await until(ann, lambda g: len(messages(g)) == 30, got)
            assert [m.content for m in messages(got)] == list(range(30))
            assert [m.seq for m in messages(got)] == [p.seq for p in sent]
            joins = [e for e in got if isinstance(e, Joined)]
            assert len(joins) >= 2 and joins[-1].recovered is True
            assert any(m.replayed for m in messages(got))
            assert any(isinstance(e, Disconnected) and not e.final for e in got)
            assert proxy.accepted >= 2

    run(main)


def test_a_publish_whose_ack_was_lost_is_resent_and_published_once(
    server: Any, proxy: Proxy, run: Any
) -> None:
    direct = f"ws://{HOST}:{server.port}/ws"
    cut = f"ws://{HOST}:{proxy.port}/ws"

    async def main() -> None:
        async with both(
            rc.connect(cut, ["lobby"], username="bob", options=FAST),
            rc.connect(direct, ["lobby"], username="ann", options=FAST),
        ) as (bob, ann):
            seen: list[Any] = []
            await until(ann, lambda g: any(isinstance(e, Joined) for e in g), seen)
            await until(bob, lambda g: any(isinstance(e, Joined) for e in g), [])
            proxy.deaf = True  # bob's chat reaches the server; its ack never comes back
            outcome: list[Any] = []

            async def publish() -> None:
                outcome.append(await bob.publish("lobby", "once"))

            if trio_running():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish)
                    await until(ann, lambda g: len(messages(g)) == 1, seen)
                    proxy.deaf = False
                    proxy.cut()  # bob reconnects and resends it with the same id
            else:
                task = asyncio.ensure_future(publish())
                await until(ann, lambda g: len(messages(g)) == 1, seen)
                proxy.deaf = False
                proxy.cut()
                await asyncio.wait_for(task, DEADLINE)
            (position,) = outcome
            (message,) = messages(seen)
            assert (message.content, message.seq) == ("once", position.seq)
            await bob.publish("lobby", "after")  # a barrier: nothing else came between
            await until(ann, lambda g: len(messages(g)) == 2, seen)
            assert [m.content for m in messages(seen)] == ["once", "after"]

    run(main)


def trio_running() -> bool:
    import sniffio

    return sniffio.current_async_library() == "trio"


def test_credentials_are_asked_for_on_every_connect_and_sent_as_a_subprotocol(
    make_server: Any, run: Any
) -> None:
    server = make_server(extra={"authenticator": JWTAuthenticator(secret=SECRET)})
    proxy = Proxy(server.port)
    url = f"ws://{HOST}:{proxy.port}/ws"
    asked: list[int] = []

    def get_token() -> str:
        asked.append(1)
        return jwt.encode({"sub": "carol", "exp": int(time.time() + 60)}, SECRET, "HS256")

    async def main() -> None:
        async with rc.connect(url, ["lobby"], get_token=get_token, options=FAST) as carol:
            got: list[Any] = []
            await until(carol, lambda g: any(isinstance(e, Joined) for e in g), got)
            assert carol.presence("lobby") == {"carol"}
            proxy.cut()
            await until(carol, lambda g: sum(isinstance(e, Joined) for e in g) >= 2, got)
            assert len(asked) >= 2

    try:
        run(main)
    finally:
        proxy.close()


def test_refused_credentials_are_final(make_server: Any, run: Any) -> None:
    server = make_server(extra={"authenticator": JWTAuthenticator(secret=SECRET)})
    url = f"ws://{HOST}:{server.port}/ws"

    async def main() -> None:
        async with rc.connect(url, ["lobby"], get_token=lambda: "not-a-token") as client:
            events = [e async for e in client]  # ends: nothing more will come
            gone = [e for e in events if isinstance(e, Disconnected)]
            assert len(gone) == 1 and gone[0].final and gone[0].status == 401
            assert client.closed
            with pytest.raises(rc.ClientClosed):
                await client.publish("lobby", 1)

    run(main)


def test_an_unreachable_server_is_retried_with_backoff(run: Any) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # nothing listens here once closed

    async def main() -> None:
        async with rc.connect(f"ws://{HOST}:{port}/ws", ["lobby"], options=FAST) as client:
            got: list[Any] = []
            await until(client, lambda g: sum(isinstance(e, Disconnected) for e in g) >= 3, got)
            gone = [e for e in got if isinstance(e, Disconnected)]
            assert all(not e.final and "cannot connect" in e.reason for e in gone)
            assert not client.connected

    run(main)
