"""The in-memory transport: a client of a trio server in the same process, no sockets."""

from __future__ import annotations

from typing import Any

import roombus
import roombus.trio
import trio
from roombus.client import Joined, Message, testing


async def until(client: Any, want: Any) -> list[Any]:
    got: list[Any] = []
    with trio.fail_after(10):
        async for event in client:
            got.append(event)
            if want(got):
                return got
    raise AssertionError(got)


async def test_two_clients_chat_in_memory(autojump_clock: Any) -> None:
    server = roombus.trio.Server(roombus.Settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(roombus.trio.run_server, server)
        async with (
            testing.connect(server, ["lobby"], username="ann") as ann,
            testing.connect(server, ["lobby"], username="bob") as bob,
        ):
            await until(ann, lambda g: any(isinstance(e, Joined) for e in g))
            await until(bob, lambda g: any(isinstance(e, Joined) for e in g))
            position = await bob.publish("lobby", {"text": "hi"})
            got = await until(ann, lambda g: any(isinstance(e, Message) for e in g))
            (message,) = [e for e in got if isinstance(e, Message)]
            assert (message.username, message.content, message.seq) == (
                "bob",
                {"text": "hi"},
                position.seq,
            )
            assert ann.presence("lobby") == {"ann", "bob"}
        nursery.cancel_scope.cancel()
