"""
A deterministic simulation of the trio adapter: many clients over in-memory streams on
a mock clock, with faults injected, every choice drawn from one seed.

Each run starts a :class:`~roombus.trio.Server` and connects clients of five kinds:

* ``steady``: reads everything (in small pieces), answers pings, writes its frames in
  pieces (partial writes), chats, joins a second room, and closes politely at the end;
* ``silent``: reads but never answers a ping;
* ``stalled``: stops reading after the handshake (a lockstep stream: the server's writes
  block), so it falls behind;
* ``sluggish``: reads a little now and then (a lockstep stream again), answers pings,
  and may fall behind; the server's write to it is under way when it does;
* ``abrupt``: chats, then sends half a frame and drops its stream;
* and a ``jumper`` task that jumps the clock forward at random (less than the ping
  timeout each time, so that a peer that answers at once is never late).

The server publishes bursts too. Then the run checks what the protocol promises:
steady clients miss nothing and see each sender's messages in order (a room's ``seq``
rises by one between any two chats they get), their presence view matches the broker,
nobody closes them; a silent client is closed with 1011 ``ping_interval + ping_timeout``
after it connected, or ``ping_timeout`` after a clock jump that looked like a stall
(later only by as much as a clock jump overshot); stalled and abrupt
clients are gone; nothing raises; once everyone has left, the server holds nothing.

A failure names its seed. Run that one again with
``ROOMBUS_SIM_SEED=<seed> python3 -m pytest tests/trio/test_sim.py``; ``ROOMBUS_SIM_SEEDS=<n>`` runs n
seeds (default 12, or 200 under ``HYPOTHESIS_PROFILE=long``).
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from typing import Any

import attrs
import pytest
import trio.testing
from wsproto import WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

import trio
from roombus import BrokerConfig, ServerConfig
from roombus.trio import Server, run_server

INTERVAL, TIMEOUT = 10.0, 5.0
MAX_JUMP = 4.0  # < TIMEOUT: a peer that answers at once is never late because of a jump
LATE = min(1.0, TIMEOUT / 2)  # a timer this late shows the broker a stall
BROKER = BrokerConfig(
    ping_interval=INTERVAL,
    ping_timeout=TIMEOUT,
    max_message_bytes=1024,
    send_queue=16,
    send_queue_bytes=1024 + 1024,
)
SERVER = ServerConfig(close_timeout=2.0, handshake_timeout=5.0)
TRAFFIC_ENDS = 30.0  # virtual seconds: every chat is sent before this
QUIET_AT = 45.0  # by then every silent and stalled client is gone


def _seeds() -> list[int]:
    if os.environ.get("ROOMBUS_SIM_SEED"):
        return [int(os.environ["ROOMBUS_SIM_SEED"])]
    default = 200 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 12
    return list(range(int(os.environ.get("ROOMBUS_SIM_SEEDS", default))))


def _seed_trio_scheduler(seed: int) -> None:
    # trio shuffles each batch of runnable tasks with this Random (deterministically once
    # Hypothesis is imported, which it is here); seeding it makes a run repeatable.
    trio._core._run._r.seed(seed)


@attrs.define
class SimClient:
    name: str
    role: str
    room: str
    stream: trio.abc.Stream
    rng: random.Random
    log: list[tuple[float, str, Any]]
    ws: WSConnection = attrs.field(factory=lambda: WSConnection(ConnectionType.CLIENT))
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    envelopes: list[dict[str, Any]] = attrs.field(factory=list)
    partial: str = ""
    pings: int = 0
    connected_at: float | None = None
    close_code: int | None = None
    closed_at: float | None = None
    closing: bool = False  # we started the close
    done: trio.Event = attrs.field(factory=trio.Event)

    def note(self, what: str, detail: Any = None) -> None:
        self.log.append((trio.current_time(), f"{self.name}:{what}", detail))

    async def write(self, data: bytes) -> None:
        """Write *data*, in pieces for a steady client (partial writes)."""
        async with self.lock:
            while data:
                n = self.rng.randint(1, len(data)) if self.role == "steady" else len(data)
                await self.stream.send_all(data[:n])
                data = data[n:]
                if data:
                    await trio.lowlevel.checkpoint()

    async def handshake(self) -> None:
        target = f"/ws?room={self.room}&username={self.name}"
        await self.write(self.ws.send(Request(host="sim", target=target)))
        while True:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                assert isinstance(event, AcceptConnection), event
                self.connected_at = trio.current_time()
                self.note("accepted")
                return
            assert data, "the server closed during the handshake"

    async def read_all(self) -> None:
        """Read until the stream ends, answering pings (unless silent)."""
        try:
            while True:
                size = self.rng.choice([7, 64, 65536]) if self.role == "steady" else 65536
                if self.role == "sluggish":
                    await trio.sleep(0.5)
                    size = 64
                data = await self.stream.receive_some(size)
                self.ws.receive_data(data or None)
                for event in self.ws.events():
                    await self.on_event(event)
                if not data:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.done.set()

    async def on_event(self, event: Any) -> None:
        if isinstance(event, TextMessage):
            # wsproto hands out a frame as it arrives: put the pieces back together.
            self.partial += event.data
            if not event.message_finished:
                return
            envelope, self.partial = json.loads(self.partial), ""
            self.envelopes.append(envelope)
            self.note("got", envelope)
        elif isinstance(event, Ping):
            self.pings += 1
            self.note("ping")
            if self.role != "silent" and self.ws.state is ConnectionState.OPEN:
                await self.write(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.close_code is not None:
                return  # the stream's end after the close handshake (wsproto says 1006)
            self.close_code, self.closed_at = event.code, trio.current_time()
            self.note("close", event.code)
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                await self.write(self.ws.send(event.response()))

    async def send(self, message: dict[str, Any]) -> None:
        self.note("send", message)
        await self.write(self.ws.send(TextMessage(data=json.dumps(message))))


async def simulate(seed: int) -> dict[str, Any]:
    """One run; returns its transcript and final observations."""
    _seed_trio_scheduler(seed)
    rng = random.Random(seed)
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    log: list[tuple[float, str, Any]] = []
    clients: list[SimClient] = []
    server = Server(BROKER, SERVER)
    roles = (
        ["steady"] * rng.randint(3, 6)
        + ["silent"] * rng.randint(0, 2)
        + ["stalled"] * rng.randint(0, 2)
        + ["abrupt"] * rng.randint(0, 2)
        + ["sluggish"] * rng.randint(0, 2)
    )
    rng.shuffle(roles)
    counts: dict[int, int] = defaultdict(int)

    async def run_client(i: int, role: str) -> None:
        crng = random.Random(rng.random())
        await trio.sleep(crng.uniform(0, 3))
        lockstep = role in ("stalled", "sluggish")
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client_end, server_end = pair()
        nursery.start_soon(server.handle_stream, server_end)
        room = "lobby" if role != "steady" else crng.choice(["lobby", "lobby", "r2"])
        client = SimClient(f"{role}{i}", role, room, client_end, crng, log)
        clients.append(client)
        await client.handshake()
        if role == "stalled":
            return  # never reads again
        async with trio.open_nursery() as inner:
            inner.start_soon(client.read_all)
            if role == "steady":
                await steady_script(client, i)
            elif role == "sluggish":
                await trio.sleep_until(QUIET_AT + 5)
                if client.ws.state is ConnectionState.OPEN:
                    client.closing = True
                    try:
                        await client.write(client.ws.send(CloseConnection(code=1000)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the server gave up on it and hung up meanwhile
                await client.done.wait()
            elif role == "abrupt":
                for _ in range(crng.randint(0, 3)):
                    await trio.sleep(crng.uniform(0, 5))
                    await client.send(chat(i))
                await trio.sleep(crng.uniform(0, 20))
                frame = client.ws.send(TextMessage(data=json.dumps(chat(i))))
                await client.write(frame[: crng.randint(1, len(frame) - 1)])
                client.note("drop")
                await client.stream.aclose()

    def chat(i: int, room: str | None = None) -> dict[str, Any]:
        counts[i] += 1
        message: dict[str, Any] = {"type": "chat", "content": {"c": i, "n": counts[i]}}
        if room:
            message["room"] = room
        return message

    async def steady_script(client: SimClient, i: int) -> None:
        other = "r2" if client.room == "lobby" else "lobby"
        join_at = client.rng.uniform(0, TRAFFIC_ENDS) if client.rng.random() < 0.6 else None
        joined = False
        t = trio.current_time()
        for _ in range(client.rng.randint(3, 12)):
            t += client.rng.expovariate(1 / 3)
            if t > TRAFFIC_ENDS:
                break
            if join_at is not None and join_at <= t:
                await trio.sleep_until(join_at)
                await client.send({"type": "join", "room": other})
                join_at, joined = None, True
            await trio.sleep_until(t)
            room = other if joined and client.rng.random() < 0.5 else None
            await client.send(chat(i, room))
        await trio.sleep_until(QUIET_AT + 5)
        # Everyone steady leaves politely, one after another.
        await trio.sleep(client.rng.uniform(0, 5))
        client.closing = True
        await client.write(client.ws.send(CloseConnection(code=1000)))
        await client.done.wait()

    async def jumper() -> None:
        while trio.current_time() < TRAFFIC_ENDS + 20:
            await trio.sleep(rng.uniform(0.5, 8))
            jump = rng.uniform(0, MAX_JUMP)
            log.append((trio.current_time(), "jump", jump))
            clock.jump(jump)

    async def publisher() -> None:
        while trio.current_time() < TRAFFIC_ENDS - 5:
            await trio.sleep(rng.uniform(1, 10))
            room = rng.choice(["lobby", "r2"])
            # A burst, but within what one receiver may have queued (send_queue): more
            # than that at once overflows everyone, as the policy says.
            for _ in range(rng.randint(1, BROKER.send_queue // 2)):
                counts[0] += 1
                server.publish(room, {"c": 0, "n": counts[0]})
                if rng.random() < 0.3:
                    await trio.lowlevel.checkpoint()

    observed: dict[str, Any] = {}
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server, server)
            async with trio.open_nursery() as world:
                for i, role in enumerate(roles, start=1):
                    world.start_soon(run_client, i, role)
                world.start_soon(jumper)
                world.start_soon(publisher)

                await trio.sleep_until(QUIET_AT)
                await trio.testing.wait_all_tasks_blocked()
                observed["members"] = {r: server.broker.members(r) for r in ("lobby", "r2")}
                observed["seq"] = {r: server.broker.seq(r) for r in ("lobby", "r2")}
                observed["views"] = {
                    c.name: presence_view(c) for c in clients if c.role == "steady"
                }
                observed["last_seq"] = {c.name: last_seqs(c) for c in clients if c.role == "steady"}
            # Every client task is over: the steady ones closed, the rest were dropped.
            while server.connection_count:  # noqa: ASYNC110 - instant on the mock clock
                await trio.sleep(0.5)
            observed["after"] = (
                server.broker.rooms,
                server.broker.statistics().connections,
                server.broker.next_deadline(),
            )
            nursery.cancel_scope.cancel()
    observed["clients"] = clients
    observed["log"] = log
    observed["overflows"] = server.overflows
    return observed


def presence_view(client: SimClient) -> dict[str, list[str]]:
    view: dict[str, set[str]] = {}
    for e in client.envelopes:
        if e["type"] == "presence_state":
            view[e["room"]] = set(e["users"])
        elif e["type"] == "presence" and e["room"] in view:
            (view[e["room"]].add if e["event"] == "join" else view[e["room"]].discard)(
                e["username"]
            )
    return {room: sorted(users) for room, users in view.items()}


def last_seqs(client: SimClient) -> dict[str, int]:
    return {e["room"]: e["seq"] for e in client.envelopes if e["type"] == "chat"}


def check_order(client: SimClient) -> None:
    """It missed nothing and got nothing twice: between two chats of a room, seq rises
    by one; each sender's messages arrive in the order they were sent."""
    last_seq: dict[str, int] = {}
    last_n: dict[int, int] = {}
    for e in client.envelopes:
        if e["type"] == "presence_state":
            assert e["room"] not in last_seq, "joined a room twice"
        elif e["type"] == "chat":
            room = e["room"]
            if room in last_seq:
                assert e["seq"] == last_seq[room] + 1, (client.name, room, e)
            last_seq[room] = e["seq"]
            sender, n = e["content"]["c"], e["content"]["n"]
            assert n > last_n.get(sender, 0), (client.name, e)
            last_n[sender] = n
        elif e["type"] == "error":
            raise AssertionError(f"{client.name} got an error: {e}")


def check(observed: dict[str, Any]) -> None:
    clients: list[SimClient] = observed["clients"]
    names = {c.name for c in clients}
    for client in clients:
        if client.role == "sluggish":
            # Closed for falling behind, or not; either way what it got is a gap-free
            # start of its rooms' traffic (the queue only drops its tail).
            # (1011 too: a pong stuck behind its backlog can come too late; and when
            # not even the close frame gets through within the close timeout, the server
            # hangs up without one: 1006, or a broken stream.)
            assert client.close_code in (1000, 1008, 1011, 1006, None), client.close_code
            check_order(client)
        if client.role == "steady":
            # Nobody closed it; its own close was answered.
            assert client.close_code == 1000, (client.name, client.close_code)
            check_order(client)
            # Up to date at the quiet point, and its presence view is the broker's.
            for room, seq in observed["last_seq"][client.name].items():
                assert seq == observed["seq"][room], (client.name, room)
            for room, users in observed["views"][client.name].items():
                assert users == observed["members"][room], (client.name, room, users)
        elif client.role == "silent":
            # Gone at its deadline, not before; later only after a stall (a clock jump).
            assert client.close_code == 1011, (client.name, client.close_code)
            assert client.connected_at is not None and client.closed_at is not None
            silence = client.closed_at - client.connected_at
            assert silence >= INTERVAL + TIMEOUT - 1e-9
            # Pinged INTERVAL after connecting (later by what a jump overshot), and closed
            # TIMEOUT after the ping or after the last jump that may have been a stall
            # (a timer late by more than LATE), later only by what a jump overshot.
            pinged_by = client.connected_at + INTERVAL + MAX_JUMP
            stalls = [
                at + jump
                for at, kind, jump in observed["log"]
                if kind == "jump" and jump > LATE and at + jump <= client.closed_at
            ]
            latest = max([pinged_by, *stalls]) + TIMEOUT + MAX_JUMP
            assert client.closed_at <= latest + 1e-9, (silence, stalls)
            assert client.pings == 1
        # stalled and abrupt ones: gone (checked below), whichever way they went.
    for room, users in observed["members"].items():
        stayed = {c.name for c in clients if c.role in ("steady", "sluggish")}
        assert set(users) <= stayed, (room, users)
        assert names  # (every name is unique per run)
    assert observed["after"] == ([], 0, None), observed["after"]


def run(seed: int) -> dict[str, Any]:
    observed: dict[str, Any] = trio.run(
        simulate, seed, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    return observed


@pytest.mark.parametrize("seed", _seeds())
def test_simulation(seed: int) -> None:
    try:
        check(run(seed))
    except BaseException as exc:
        note = f"simulation seed {seed}: reproduce with ROOMBUS_SIM_SEED={seed} python3 -m pytest tests/trio/test_sim.py"
        print(note)
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        raise


def _no_wall_clock(value: object) -> object:
    """Drop envelope timestamps: wall-clock seconds, the one input a seed cannot fix."""
    if isinstance(value, dict):
        return {k: _no_wall_clock(v) for k, v in value.items() if k != "timestamp"}
    if isinstance(value, (list, tuple)):
        return [_no_wall_clock(v) for v in value]
    return value


def test_a_seed_replays_exactly() -> None:
    """Same seed, same run: every message each client got, at the same virtual instant."""
    first, second = run(7), run(7)
    assert _no_wall_clock(first["log"]) == _no_wall_clock(second["log"])
    assert _no_wall_clock([c.envelopes for c in first["clients"]]) == _no_wall_clock(
        [c.envelopes for c in second["clients"]]
    )
