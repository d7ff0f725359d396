"""The trio Redis client against a real ``redis-server``: round trips, pub/sub, faults.

Every test is bounded by ``trio.fail_after`` and talks to loopback only.
"""

from __future__ import annotations

import random
import socket
from functools import partial

import pytest

import trio
from roombus.trio._redis import (
    RedisAddress,
    RedisConnection,
    RedisConnectionError,
    RedisError,
    connect,
    connect_subscriber,
    supports_sharded_pubsub,
)

from .conftest import RedisProcess, start_redis

TIMEOUT = 10.0


# --------------------------------------------------------------------------------------
# Commands


async def test_round_trips(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            assert await conn.execute("PING") == b"PONG"
            assert await conn.execute("SET", "k", b"v\x00\xff") == b"OK"
            assert await conn.execute("GET", "k") == b"v\x00\xff"
            assert await conn.execute("GET", "missing") is None
            assert await conn.execute("INCR", "n") == 1
            assert await conn.execute("INCRBY", "n", 41) == 42
            assert await conn.execute("SET", "f", 2.5) == b"OK"
            assert await conn.execute(b"GET", memoryview(b"f")) == b"2.5"
            assert await conn.execute("RPUSH", "l", "a", "b") == 2
            assert await conn.execute("LRANGE", "l", 0, -1) == [b"a", b"b"]
            assert await conn.execute("SET", "big", b"x" * 3_000_000) == b"OK"
            assert await conn.execute("GET", "big") == b"x" * 3_000_000


async def test_lua_script_returning_a_table(redis_server: RedisProcess) -> None:
    script = "return {1, 'two', {ARGV[1], tonumber(ARGV[2]) + 1}, KEYS[1]}"
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            reply = await conn.execute("EVAL", script, 1, "key", "three", 4)
            assert reply == [1, b"two", [b"three", 5], b"key"]
            # An error nested in a table stays in place; it does not raise.
            nested = await conn.execute("EVAL", "return {1, redis.error_reply('boom')}", 0)
            assert nested[0] == 1
            assert isinstance(nested[1], RedisError)
            assert str(nested[1]) == "ERR boom"


async def test_error_reply_raises_and_the_connection_stays_usable(
    redis_server: RedisProcess,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            with pytest.raises(RedisError, match=r"^ERR unknown command 'NOSUCH'"):
                await conn.execute("NOSUCH", "x")
            await conn.execute("SET", "s", "text")
            with pytest.raises(RedisError, match=r"^ERR value is not an integer"):
                await conn.execute("INCR", "s")
            with pytest.raises(RedisError, match=r"^ERR .*script"):
                await conn.execute("EVAL", "return redis.call('NOSUCH')", 0)
            assert not conn.closed
            assert await conn.execute("GET", "s") == b"text"


async def test_pipeline(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            replies = await conn.pipeline(
                [
                    ("SET", "a", "1"),
                    ("INCR", "a"),
                    ("NOSUCH",),
                    ("HSET", "a", "f", "v"),
                    ("GET", "a"),
                ]
            )
            assert replies[:2] == [b"OK", 2]
            assert isinstance(replies[2], RedisError)
            assert str(replies[2]).startswith("ERR unknown command")
            assert isinstance(replies[3], RedisError)
            assert str(replies[3]).startswith("WRONGTYPE")
            assert replies[4] == b"2"
            assert await conn.pipeline([]) == []
            transaction = await conn.pipeline([("MULTI",), ("INCR", "a"), ("INCR", "a"), ("EXEC",)])
            assert transaction == [b"OK", b"QUEUED", b"QUEUED", [3, 4]]
            assert await conn.pipeline(("INCR", "a") for _ in range(1000)) == list(range(5, 1005))


async def test_empty_commands_are_refused(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            with pytest.raises(ValueError, match="empty command"):
                await conn.execute()
            with pytest.raises(ValueError, match="empty command"):
                await conn.pipeline([("PING",), ()])
            with pytest.raises(TypeError):
                await conn.execute("SET", "k", None)  # type: ignore[arg-type]
            assert await conn.execute("PING") == b"PONG"


async def test_200_tasks_pipelining_get_their_own_replies(redis_server: RedisProcess) -> None:
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

    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            async with trio.open_nursery() as nursery:
                for i in range(tasks):
                    nursery.start_soon(worker, conn, i)
            # Every INCR of the shared key was answered to exactly one caller.
            assert sorted(shared) == list(range(1, tasks * rounds + 1))


async def test_cancelled_callers_leave_the_connection_consistent(
    redis_server: RedisProcess,
) -> None:
    rng = random.Random(1234)
    completed = 0

    async def worker(conn: RedisConnection, i: int) -> None:
        nonlocal completed
        for n in range(50):
            payload = f"{i}:{n}:" + "x" * rng.randrange(0, 200_000, 997)
            with trio.move_on_after(rng.choice([0, 0.0001, 0.001, 1])):
                assert await conn.execute("ECHO", payload) == payload.encode()
                completed += 1

    with trio.fail_after(TIMEOUT * 3):
        async with await connect(redis_server.url) as conn:
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(worker, conn, i)
            assert completed > 0
            assert not conn.closed
            assert await conn.pipeline([("ECHO", "after"), ("PING",)]) == [b"after", b"PONG"]


async def test_cancelled_sender_hands_its_bytes_to_the_receiver(
    redis_server: RedisProcess,
) -> None:
    """A sender cancelled mid-write while the only other caller waits in ``recv``.

    Redis is paused, so the big SET is certainly stuck half-written when it is cancelled;
    the ECHO caller must then finish writing it, or it would wait forever.
    """
    big = b"y" * 50_000_000
    with trio.fail_after(TIMEOUT * 3):
        async with await connect(redis_server.url) as conn:
            redis_server.pause()
            try:
                async with trio.open_nursery() as nursery:
                    cancel = trio.CancelScope()

                    async def setter() -> None:
                        with cancel:
                            await conn.execute("SET", "big", big)

                    nursery.start_soon(setter)
                    await trio.sleep(0.1)
                    echo: list[bytes] = []

                    async def echoer() -> None:
                        echo.append(await conn.execute("ECHO", "hi"))

                    nursery.start_soon(echoer)
                    await trio.sleep(0.1)
                    cancel.cancel()
                    await trio.sleep(0.1)
                    redis_server.resume()
            finally:
                redis_server.resume()
            assert echo == [b"hi"]
            assert cancel.cancelled_caught
            assert await conn.execute("STRLEN", "big") == len(big)


async def test_close(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await connect(redis_server.url)
        assert not conn.closed
        await conn.aclose()
        assert conn.closed
        await conn.aclose()  # idempotent
        with pytest.raises(RedisConnectionError, match="closed"):
            await conn.execute("PING")


async def test_close_wakes_waiting_callers(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await connect(redis_server.url)
        errors: list[BaseException] = []

        async def blocked() -> None:
            try:
                await conn.execute("BLPOP", "nothing", 0)
            except RedisConnectionError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(blocked)
            await trio.sleep(0.1)
            await conn.aclose()
        assert len(errors) == 3


async def test_auth_with_password() -> None:
    server = start_redis(password="s3cret")
    try:
        with trio.fail_after(TIMEOUT):
            async with await connect(server.url) as conn:
                assert await conn.execute("SET", "k", "v") == b"OK"
            url = f"redis://127.0.0.1:{server.port}"
            with pytest.raises(RedisError, match=r"^NOAUTH"):
                await connect(url)
            with pytest.raises(RedisError, match=r"^WRONGPASS"):
                await connect(f"redis://:wrong@127.0.0.1:{server.port}")
    finally:
        server.close()


async def test_auth_with_username(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as admin:
            await admin.execute("ACL", "SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all")
        url = f"redis://alice:pw@127.0.0.1:{redis_server.port}"
        async with await connect(url) as conn:
            assert await conn.execute("ACL", "WHOAMI") == b"alice"
        with pytest.raises(RedisError, match=r"^WRONGPASS"):
            await connect(f"redis://alice:nope@127.0.0.1:{redis_server.port}")


async def test_select_db(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url + "/3") as db3:
            await db3.execute("SET", "where", "three")
            assert b"db=3" in await db3.execute("CLIENT", "INFO")
        async with await connect(redis_server.url) as db0:
            assert await db0.execute("GET", "where") is None
        async with await connect(RedisAddress(host="127.0.0.1", port=redis_server.port, db=3)) as c:
            assert await c.execute("GET", "where") == b"three"
        with pytest.raises(RedisError, match="DB index is out of range"):
            await connect(redis_server.url + "/999")


async def test_unix_socket(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(f"unix://{redis_server.unix_path}?db=1") as conn:
            assert await conn.execute("SET", "k", "v") == b"OK"
            assert b"db=1" in await conn.execute("CLIENT", "INFO")


async def test_supports_sharded_pubsub(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            assert await supports_sharded_pubsub(conn) is True
            # Where COMMAND is denied, the version decides.
            await conn.execute(
                "ACL", "SETUSER", "bob", "on", ">pw", "~*", "&*", "+@all", "-command"
            )
        async with await connect(f"redis://bob:pw@127.0.0.1:{redis_server.port}") as bob:
            with pytest.raises(RedisError, match=r"^NOPERM"):
                await bob.execute("COMMAND", "INFO", "SPUBLISH")
            assert await supports_sharded_pubsub(bob) is True


# --------------------------------------------------------------------------------------
# Pub/sub

PUBLISH = {True: "SPUBLISH", False: "PUBLISH"}
sharded_and_classic = pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "classic"])


@sharded_and_classic
async def test_subscriber_receives_in_publish_order(
    redis_server: RedisProcess, sharded: bool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            assert sub.sharded is sharded
            await sub.subscribe("room:a", b"room:b")
            assert sub.channels == {b"room:a", b"room:b"}
            sent = [(f"room:{'ab'[i % 2]}".encode(), f"m{i}".encode()) for i in range(500)]
            replies = await conn.pipeline([(PUBLISH[sharded], ch, data) for ch, data in sent])
            assert replies == [1] * len(sent)  # one receiver each
            received = [await sub.receive() for _ in range(len(sent) - 1)]
            async for message in sub.messages():
                received.append(message)
                break
            assert received == sent


@sharded_and_classic
async def test_messages_arriving_during_subscribe_are_kept(
    redis_server: RedisProcess, sharded: bool
) -> None:
    """A publisher floods one channel while we subscribe to another: no gap, no loss."""
    with trio.fail_after(TIMEOUT):
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            await sub.subscribe("flood")
            published = 0
            flowing = trio.Event()
            stop = trio.Event()

            async def flood() -> None:
                nonlocal published
                while not stop.is_set():
                    await conn.pipeline(
                        [(PUBLISH[sharded], "flood", published + i) for i in range(50)]
                    )
                    published += 50
                    if published >= 500:
                        flowing.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await flowing.wait()
                for i in range(20):
                    await sub.subscribe(f"late:{i}")
                stop.set()
            # Subscribed means confirmed: a publish now reaches us.
            assert await conn.execute(PUBLISH[sharded], "late:19", "marker") == 1
            seen = 0
            while True:
                channel, data = await sub.receive()
                if channel == b"flood":
                    assert int(data) == seen
                    seen += 1
                else:
                    assert (channel, data) == (b"late:19", b"marker")
                    break
            assert seen == published


@sharded_and_classic
async def test_a_consumer_and_concurrent_subscribes(
    redis_server: RedisProcess, sharded: bool
) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            received: list[tuple[bytes, bytes]] = []
            all_received = trio.Event()

            async def consume() -> None:
                async for message in sub:
                    received.append(message)
                    if len(received) == 30:
                        all_received.set()

            async def subscribe_and_publish(i: int) -> None:
                await sub.subscribe(f"c{i}")
                assert await conn.execute(PUBLISH[sharded], f"c{i}", f"hello {i}") == 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await trio.sleep(0.01)  # the consumer is in recv: subscribers must not wait on it
                async with trio.open_nursery() as subscribers:
                    for i in range(30):
                        subscribers.start_soon(subscribe_and_publish, i)
                await all_received.wait()
                nursery.cancel_scope.cancel()
            assert sorted(received) == sorted(
                (f"c{i}".encode(), f"hello {i}".encode()) for i in range(30)
            )
            await sub.ping()  # the cancelled consumer left the connection usable


@sharded_and_classic
async def test_unsubscribe_stops_messages(redis_server: RedisProcess, sharded: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=sharded) as sub,
        ):
            await sub.subscribe("a", "b", "c")
            await sub.unsubscribe("a")
            assert sub.channels == {b"b", b"c"}
            assert await conn.execute(PUBLISH[sharded], "a", "lost") == 0
            assert await conn.execute(PUBLISH[sharded], "b", "kept") == 1
            assert await sub.receive() == (b"b", b"kept")
            await sub.unsubscribe()  # all
            assert sub.channels == frozenset()
            assert await conn.execute(PUBLISH[sharded], "c", "lost") == 0
            await sub.unsubscribe()  # nothing left: no round trip, no error
            await sub.subscribe("a")
            assert await conn.execute(PUBLISH[sharded], "a", "back") == 1
            assert await sub.receive() == (b"a", b"back")


async def test_subscriber_ping(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        for sharded in (True, False):
            async with await connect_subscriber(redis_server.url, sharded=sharded) as sub:
                await sub.ping()  # not subscribed yet: +PONG
                await sub.subscribe("x")
                await sub.ping()  # subscribed: [pong, ""]


@sharded_and_classic
async def test_subscribe_error_reply(redis_server: RedisProcess, sharded: bool) -> None:
    with trio.fail_after(TIMEOUT):
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


# --------------------------------------------------------------------------------------
# Faults


async def test_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: refused
        with trio.fail_after(TIMEOUT):
            with pytest.raises(RedisConnectionError, match=r"cannot connect to Redis at 127.0.0.1"):
                await connect(f"redis://127.0.0.1:{port}")
            with pytest.raises(RedisConnectionError, match="cannot connect"):
                await connect_subscriber(f"redis://127.0.0.1:{port}", sharded=True)
            with pytest.raises(RedisConnectionError, match="cannot connect"):
                await connect("unix:///nonexistent/redis.sock")


async def test_connect_timeout_on_a_hung_server(redis_server: RedisProcess) -> None:
    redis_server.pause()
    try:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(RedisConnectionError, match=r"timed out .* \(after 0.2s\)"):
                await connect(redis_server.url, connect_timeout=0.2)
    finally:
        redis_server.resume()


async def test_not_redis() -> None:
    """A server that answers in another protocol: a connection error, not a hang."""

    async def http(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, http, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(RedisConnectionError, match="does not speak the Redis protocol"):
                await connect(f"redis://127.0.0.1:{port}")
            nursery.cancel_scope.cancel()


async def test_killed_server_fails_waiting_commands(redis_server: RedisProcess) -> None:
    conn = await connect(redis_server.url)
    errors: list[RedisConnectionError] = []

    async def waiting(i: int) -> None:
        try:
            await conn.execute("BLPOP", f"list:{i}", 0)
        except RedisConnectionError as exc:
            errors.append(exc)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(waiting, i)
            await trio.sleep(0.1)
            redis_server.kill()
            killed_at = trio.current_time()
        assert trio.current_time() - killed_at < 2  # promptly
        assert len(errors) == 50
        assert conn.closed
        with pytest.raises(RedisConnectionError):
            await conn.execute("PING")
        await conn.aclose()


async def test_killed_server_fails_the_next_command(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            redis_server.kill()
            with pytest.raises(RedisConnectionError):
                await conn.execute("PING")
            assert conn.closed


async def test_killed_server_fails_the_subscriber(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            await connect(redis_server.url) as conn,
            await connect_subscriber(redis_server.url, sharded=True) as sub,
        ):
            await sub.subscribe("x")
            await conn.execute("SPUBLISH", "x", "before")
            # Wait until the message is queued (a ping reads past it), then crash Redis.
            await sub.ping()
            redis_server.kill()
            with trio.fail_after(2):
                # What arrived before the crash is still delivered, then the error.
                assert await sub.receive() == (b"x", b"before")
                with pytest.raises(RedisConnectionError):
                    await sub.receive()
            assert sub.closed
            with pytest.raises(RedisConnectionError):
                await sub.subscribe("y")


async def test_killed_server_fails_a_waiting_subscribe(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        async with await connect_subscriber(redis_server.url, sharded=False) as sub:
            redis_server.pause()
            async with trio.open_nursery() as nursery:

                async def subscribe() -> None:
                    with pytest.raises(RedisConnectionError):
                        await sub.subscribe("never")

                nursery.start_soon(subscribe)
                await trio.sleep(0.1)
                redis_server.kill()


async def test_reconnect_after_restart(redis_server: RedisProcess) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await connect(redis_server.url)
        redis_server.restart()
        with pytest.raises(RedisConnectionError):
            await conn.execute("PING")
        await conn.aclose()
        async with await connect(redis_server.url) as fresh:
            assert await fresh.execute("PING") == b"PONG"


async def test_hung_server_and_cancellation(redis_server: RedisProcess) -> None:
    """Callers can give up on a hung server; once it recovers, replies still match."""
    with trio.fail_after(TIMEOUT):
        async with await connect(redis_server.url) as conn:
            redis_server.pause()
            try:
                with trio.move_on_after(0.2) as scope:
                    await conn.execute("ECHO", "lost")
                assert scope.cancelled_caught
            finally:
                redis_server.resume()
            assert await conn.execute("ECHO", "found") == b"found"
