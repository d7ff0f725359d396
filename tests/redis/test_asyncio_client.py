"""The asyncio Redis client against a real ``redis-server``: round trips, pub/sub, faults.

Every test runs in ``asyncio.run`` under ``asyncio.wait_for`` and talks to loopback only.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from roombus.asyncio._redis import (
    RedisAddress,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    RedisSubscriber,
    connect,
    connect_subscriber,
    supports_sharded_pubsub,
)

from .conftest import RedisProcess, start_redis

TIMEOUT = 10.0


def run(main: Callable[[], Awaitable[None]], timeout: float = TIMEOUT) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), timeout)

    asyncio.run(bounded())


class Inbox:
    """A subscriber's ``on_messages``: every burst, as it came."""

    def __init__(self, sub: RedisSubscriber) -> None:
        self.bursts: list[list[tuple[bytes, bytes]]] = []
        self._changed = asyncio.Event()
        sub.on_messages = self._on_messages

    def _on_messages(self, burst: list[tuple[bytes, bytes]]) -> None:
        assert burst, "an empty burst was delivered"
        self.bursts.append(burst)
        self._changed.set()

    @property
    def messages(self) -> list[tuple[bytes, bytes]]:
        return [message for burst in self.bursts for message in burst]

    async def wait_for(self, count: int) -> list[tuple[bytes, bytes]]:
        while len(self.messages) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.messages


# --------------------------------------------------------------------------------------
# Commands


def test_round_trips(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with await connect(redis_server.url) as conn:
            assert await conn.execute("PING") == b"PONG"
            assert await conn.execute("SET", "k", b"v\x00\xff") == b"OK"
            assert await conn.execute("GET", "k") == b"v\x00\xff"
            assert await conn.execute("GET", "missing") is None
            assert await conn.execute("INCRBY", "n", 42) == 42
            assert await conn.execute("SET", "f", 2.5) == b"OK"
            assert await conn.execute(b"GET", memoryview(b"f")) == b"2.5"
            assert await conn.execute("RPUSH", "l", "a", "b") == 2
            assert await conn.execute("LRANGE", "l", 0, -1) == [b"a", b"b"]
            assert await conn.execute("SET", "big", b"x" * 3_000_000) == b"OK"
            assert await conn.execute("GET", "big") == b"x" * 3_000_000
            nested = await conn.execute("EVAL", "return {1, redis.error_reply('boom')}", 0)
            assert nested[0] == 1
            assert isinstance(nested[1], RedisError)
            assert str(nested[1]) == "ERR boom"

    run(main)


def test_error_reply_raises_and_the_connection_stays_usable(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with await connect(redis_server.url) as conn:
            with pytest.raises(RedisError, match=r"^ERR unknown command 'NOSUCH'"):
                await conn.execute("NOSUCH", "x")
            await conn.execute("SET", "s", "text")
            with pytest.raises(RedisError, match=r"^ERR value is not an integer"):
                await conn.execute("INCR", "s")
            assert not conn.closed
            assert await conn.execute("GET", "s") == b"text"

    run(main)


def test_pipeline_and_send(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with await connect(redis_server.url) as conn:
            replies = await conn.pipeline(
                [("SET", "a", "1"), ("INCR", "a"), ("NOSUCH",), ("HSET", "a", "f", "v")]
            )
            assert replies[:2] == [b"OK", 2]
            assert isinstance(replies[2], RedisError)
            assert str(replies[3]).startswith("WRONGTYPE")
            assert await conn.pipeline([]) == []
            transaction = await conn.pipeline([("MULTI",), ("INCR", "a"), ("INCR", "a"), ("EXEC",)])
            assert transaction == [b"OK", b"QUEUED", b"QUEUED", [3, 4]]
            # The callback form: answered from data_received, in the order sent.
            answered: list[list[Any]] = []
            done = asyncio.Event()
            for i in range(100):
                conn.send([("INCR", "a"), ("ECHO", str(i))], answered.append)
            conn.send([("PING",)], lambda replies: done.set())
            await done.wait()
            assert answered == [[5 + i, str(i).encode()] for i in range(100)]
            with pytest.raises(ValueError, match="no command"):
                conn.send([], answered.append)
            with pytest.raises(ValueError, match="empty command"):
                await conn.execute()
            with pytest.raises(ValueError, match="empty command"):
                await conn.pipeline([("PING",), ()])
            assert await conn.execute("PING") == b"PONG"

    run(main)


def test_200_tasks_pipelining_get_their_own_replies(redis_server: RedisProcess) -> None:
    tasks, rounds = 200, 25
    shared: list[int] = []

    async def worker(conn: RedisConnection, i: int) -> None:
        key = f"counter:{i}"
        for n in range(1, rounds + 1):
            if n % 5 == 0:
                replies = await conn.pipeline([("INCR", key), ("INCR", "shared"), ("ECHO", key)])
                assert replies[0] == n
                assert replies[2] == key.encode()
                shared.append(replies[1])
            else:
                assert await conn.execute("INCR", key) == n
                shared.append(await conn.execute("INCR", "shared"))

    async def main() -> None:
        async with await connect(redis_server.url) as conn:
            await asyncio.gather(*(worker(conn, i) for i in range(tasks)))
            # Every INCR of the shared key was answered to exactly one caller.
            assert sorted(shared) == list(range(1, tasks * rounds + 1))

    run(main)


def test_cancelled_callers_leave_the_connection_consistent(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with await connect(redis_server.url) as conn:
            redis_server.pause()
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.execute("ECHO", "lost"), 0.2)
            finally:
                redis_server.resume()
            # The abandoned reply is swallowed by its batch, not given to the next caller.
            assert await conn.execute("ECHO", "found") == b"found"
            assert not conn.closed

    run(main)


def test_close(redis_server: RedisProcess) -> None:
    async def main() -> None:
        conn = await connect(redis_server.url)
        lost: list[Exception] = []
        conn.on_lost = lost.append
        waiting = asyncio.ensure_future(conn.execute("BLPOP", "nothing", 0))
        await asyncio.sleep(0.05)
        await conn.aclose()
        assert conn.closed
        await conn.aclose()  # idempotent
        with pytest.raises(RedisConnectionError, match="closed"):
            await waiting
        with pytest.raises(RedisConnectionError, match="closed"):
            await conn.execute("PING")
        with pytest.raises(RedisConnectionError, match="closed"):
            conn.send([("PING",)], print)
        assert lost == []  # closing is no loss

    run(main)


# --------------------------------------------------------------------------------------
# Logging in


def test_auth_with_password() -> None:
    server = start_redis(password="s3cret")
    try:

        async def main() -> None:
            async with await connect(server.url) as conn:
                assert await conn.execute("SET", "k", "v") == b"OK"
            async with await connect_subscriber(server.url, sharded=True) as sub:
                await sub.ping()
            url = f"redis://127.0.0.1:{server.port}"
            with pytest.raises(RedisError, match=r"^NOAUTH"):
                await connect(url)
            with pytest.raises(RedisError, match=r"^NOAUTH"):
                await connect_subscriber(url, sharded=False)
            with pytest.raises(RedisError, match=r"^WRONGPASS"):
                await connect(f"redis://:wrong@127.0.0.1:{server.port}")

        run(main)
    finally:
        server.close()


def test_auth_with_username_select_and_unix_socket(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with await connect(redis_server.url) as admin:
            await admin.execute("ACL", "SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all")
        async with await connect(f"redis://alice:pw@127.0.0.1:{redis_server.port}/3") as conn:
            assert await conn.execute("ACL", "WHOAMI") == b"alice"
            await conn.execute("SET", "where", "three")
        address = RedisAddress(host="127.0.0.1", port=redis_server.port, db=3)
        async with await connect(address) as db3:
            assert await db3.execute("GET", "where") == b"three"
        async with await connect(f"unix://{redis_server.unix_path}?db=3") as unix:
            assert await unix.execute("GET", "where") == b"three"
        with pytest.raises(RedisError, match=r"^WRONGPASS"):
            await connect(f"redis://alice:nope@127.0.0.1:{redis_server.port}")
        with pytest.raises(RedisError, match="DB index is out of range"):
            await connect(redis_server.url + "/999")

    run(main)


def test_supports_sharded_pubsub(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with await connect(redis_server.url) as conn:
            assert await supports_sharded_pubsub(conn) is True
            await conn.execute(
                "ACL", "SETUSER", "bob", "on", ">pw", "~*", "&*", "+@all", "-command"
            )
        async with await connect(f"redis://bob:pw@127.0.0.1:{redis_server.port}") as bob:
            assert await supports_sharded_pubsub(bob) is True  # from INFO's version

    run(main)


# --------------------------------------------------------------------------------------
# Pub/sub

PUBLISH = {True: "SPUBLISH", False: "PUBLISH"}
sharded_and_classic = pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "classic"])


@sharded_and_classic
def test_messages_arrive_in_publish_order_and_in_bursts(
    redis_server: RedisProcess, sharded: bool
) -> None:
    async def main() -> None:
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            assert sub.sharded is sharded
            await sub.subscribe("room:a", b"room:b")
            assert sub.channels == {b"room:a", b"room:b"}
            inbox = Inbox(sub)
            sent = [(f"room:{'ab'[i % 2]}".encode(), f"m{i}".encode()) for i in range(2000)]
            replies = await conn.pipeline([(PUBLISH[sharded], ch, data) for ch, data in sent])
            assert replies == [1] * len(sent)  # one receiver each
            assert await inbox.wait_for(len(sent)) == sent
            # One pipeline's worth of pushes comes in far fewer reads than messages.
            assert len(inbox.bursts) < len(sent) / 10

    run(main)


def test_messages_before_on_messages_is_set_are_kept(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=True) as sub,
        ):
            await sub.subscribe("x")
            await conn.execute("SPUBLISH", "x", "early")
            await sub.ping()  # read past the message
            inbox = Inbox(sub)
            assert inbox.bursts == [[(b"x", b"early")]]

    run(main)


@sharded_and_classic
def test_messages_arriving_during_subscribe_come_before_its_confirmation(
    redis_server: RedisProcess, sharded: bool
) -> None:
    """A publisher floods one channel while we subscribe to others: no gap, no loss, and
    each confirmation is reported after the messages that preceded it."""

    async def main() -> None:
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            await sub.subscribe("flood")
            inbox = Inbox(sub)
            published = 0
            stop = False
            flowing = asyncio.Event()

            async def flood() -> None:
                nonlocal published
                while not stop:
                    await conn.pipeline(
                        [(PUBLISH[sharded], "flood", published + i) for i in range(50)]
                    )
                    published += 50
                    if published >= 500:
                        flowing.set()

            flooding = asyncio.ensure_future(flood())
            await flowing.wait()
            seen_at_confirm: list[int] = []
            verb = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
            for i in range(20):
                confirmed = asyncio.Event()

                def done(error: RedisError | None, confirmed: asyncio.Event = confirmed) -> None:
                    assert error is None
                    seen_at_confirm.append(len(inbox.messages))
                    confirmed.set()

                sub.request(verb, [f"late:{i}"], done)
                await confirmed.wait()
            stop = True
            await flooding
            assert seen_at_confirm == sorted(seen_at_confirm)
            assert await conn.execute(PUBLISH[sharded], "late:19", "marker") == 1
            messages = await inbox.wait_for(published + 1)
            assert messages[:-1] == [(b"flood", str(n).encode()) for n in range(published)]
            assert messages[-1] == (b"late:19", b"marker")

    run(main)


@sharded_and_classic
def test_unsubscribe_stops_messages(redis_server: RedisProcess, sharded: bool) -> None:
    async def main() -> None:
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            inbox = Inbox(sub)
            await sub.subscribe("a", "b", "c")
            await sub.unsubscribe("a")
            assert sub.channels == {b"b", b"c"}
            assert await conn.execute(PUBLISH[sharded], "a", "lost") == 0
            assert await conn.execute(PUBLISH[sharded], "b", "kept") == 1
            assert await inbox.wait_for(1) == [(b"b", b"kept")]
            await sub.unsubscribe()  # all
            assert sub.channels == frozenset()
            await sub.unsubscribe()  # nothing left: no round trip, no error
            # Unasked-for answers: an unlisten nobody waits on, then a ping.
            sub.request(b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE", ["c"], lambda e: None)
            await sub.ping()
            await sub.subscribe("a")
            assert await conn.execute(PUBLISH[sharded], "a", "back") == 1
            assert await inbox.wait_for(2) == [(b"b", b"kept"), (b"a", b"back")]

    run(main)


def test_subscriber_ping_and_bad_requests(redis_server: RedisProcess) -> None:
    async def main() -> None:
        for sharded in (True, False):
            async with await connect_subscriber(redis_server.url, sharded=sharded) as sub:
                await sub.ping()  # not subscribed yet: +PONG
                await sub.subscribe("x")
                await sub.ping()  # subscribed: [pong, ""]
                with pytest.raises(ValueError, match="not a pub/sub request"):
                    sub.request(b"GET", ["x"], print)
                with pytest.raises(ValueError, match="needs a channel"):
                    sub.request(b"SUBSCRIBE", [], print)
                with pytest.raises(ValueError, match="no channel"):
                    sub.request(b"PING", ["x"], print)
                await sub.ping()

    run(main)


@sharded_and_classic
def test_subscribe_error_reply(redis_server: RedisProcess, sharded: bool) -> None:
    async def main() -> None:
        async with await connect(redis_server.url) as admin:
            await admin.execute(
                "ACL", "SETUSER", "carol", "on", ">pw", "~*", "resetchannels", "&ok:*", "+@all"
            )
        url = f"redis://carol:pw@127.0.0.1:{redis_server.port}"
        async with await connect_subscriber(url, sharded=sharded) as sub:
            with pytest.raises(RedisError, match=r"^NOPERM"):
                await sub.subscribe("forbidden")
            await sub.subscribe("ok:1")
            assert sub.channels == {b"ok:1"}
            assert not sub.closed

    run(main)


# --------------------------------------------------------------------------------------
# Faults


def test_connection_refused() -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # bound, not listening: refused
            with pytest.raises(RedisConnectionError, match=r"cannot connect to Redis at 127.0.0.1"):
                await connect(f"redis://127.0.0.1:{port}")
            with pytest.raises(RedisConnectionError, match="cannot connect"):
                await connect_subscriber(f"redis://127.0.0.1:{port}", sharded=True)
            with pytest.raises(RedisConnectionError, match="cannot connect"):
                await connect("unix:///nonexistent/redis.sock")

    run(main)


def test_connect_timeout_on_a_hung_server(redis_server: RedisProcess) -> None:
    async def main() -> None:
        redis_server.pause()
        try:
            with pytest.raises(RedisConnectionError, match=r"timed out .* \(after 0.2s\)"):
                await connect(redis_server.url, connect_timeout=0.2)
        finally:
            redis_server.resume()

    run(main)


def test_not_redis_and_malformed_replies() -> None:
    """Servers that answer wrong: each connection gets one script, an answer per read."""
    scripts = [
        [b"HTTP/1.1 400 Bad Request\r\n\r\n"],  # not Redis at all
        [b"+PONG\r\n", b"$3\r\nabc\r\n!garbage\r\n"],  # logged in, then garbage
        [b"+PONG\r\n+OK\r\n"],  # logged in, then a reply nobody asked for
    ]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in scripts.pop(0):
            await reader.read(65536)
            writer.write(answer)
        while await reader.read(65536):  # until the client gives up
            pass
        writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with srv:
            url = f"redis://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
            with pytest.raises(RedisConnectionError, match="does not speak the Redis protocol"):
                await connect(url)
            conn = await connect(url)
            lost: list[RedisConnectionError] = []
            conn.on_lost = lost.append
            conn.send([("GET", "k"), ("GET", "k")], print)
            waiters = [asyncio.ensure_future(conn.execute("GET", "k")) for _ in range(3)]
            results = await asyncio.gather(*waiters, return_exceptions=True)
            # The garbage fails every waiter at once, with one error.
            assert all(isinstance(r, RedisConnectionError) for r in results)
            assert results[0] is results[1] is results[2] is lost[0]
            assert "does not speak the Redis protocol" in str(lost[0])
            assert conn.closed
            other = await connect(url)
            gone = asyncio.Event()
            other.on_lost = lambda error: gone.set()
            if not other.closed:  # the stray reply may have come with the login's
                await gone.wait()
            with pytest.raises(RedisConnectionError, match="unexpected reply"):
                await other.execute("PING")

    run(main)


def test_killed_server_fails_every_waiting_command(redis_server: RedisProcess) -> None:
    async def main() -> None:
        conn = await connect(redis_server.url)
        lost: list[RedisConnectionError] = []
        conn.on_lost = lost.append
        sent: list[list[Any]] = []
        conn.send([("BLPOP", "never", 0)], sent.append)  # callback form: on_lost reports
        waiters = [asyncio.ensure_future(conn.execute("BLPOP", f"l:{i}", 0)) for i in range(50)]
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        redis_server.kill()
        killed_at = loop.time()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert loop.time() - killed_at < 2  # promptly
        assert all(isinstance(r, RedisConnectionError) for r in results)
        assert len({id(r) for r in results}) == 1
        assert lost == [results[0]]
        assert sent == []
        assert conn.closed
        with pytest.raises(RedisConnectionError):
            await conn.execute("PING")
        await conn.aclose()

    run(main)


def test_killed_server_fails_the_subscriber(redis_server: RedisProcess) -> None:
    async def main() -> None:
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=True) as sub,
        ):
            inbox = Inbox(sub)
            lost: list[RedisConnectionError] = []
            sub.on_lost = lost.append
            await sub.subscribe("x")
            await conn.execute("SPUBLISH", "x", "before")
            await sub.ping()
            redis_server.pause()
            subscribing = asyncio.ensure_future(sub.subscribe("never"))
            await asyncio.sleep(0.1)
            redis_server.kill()
            with pytest.raises(RedisConnectionError):
                await asyncio.wait_for(subscribing, 2)
            assert inbox.messages == [(b"x", b"before")]
            assert len(lost) == 1
            assert sub.closed
            with pytest.raises(RedisConnectionError):
                await sub.subscribe("y")

    run(main)


def test_reconnect_after_restart(redis_server: RedisProcess) -> None:
    async def main() -> None:
        conn = await connect(redis_server.url)
        redis_server.restart()
        with pytest.raises(RedisConnectionError):
            await conn.execute("PING")
        await conn.aclose()
        async with await connect(redis_server.url) as fresh:
            assert await fresh.execute("PING") == b"PONG"

    run(main)
