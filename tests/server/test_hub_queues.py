"""The framed hub's send queues driven by hand: bursts, the close path, the byte budget."""

from __future__ import annotations

import json

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage
from wsproto.frame_protocol import Opcode

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub

from .test_hub import connect, written


class Peer:
    """A client's wsproto connection: builds its frames, parses what the hub wrote."""

    def __init__(self) -> None:
        self.ws = Connection(ConnectionType.CLIENT)

    def chat(self, content: object) -> bytes:
        return self.ws.send(TextMessage(data=json.dumps({"type": "chat", "content": content})))

    def read(self, data: bytes) -> tuple[list[dict[str, object]], int | None]:
        """The messages in *data* (after the 101), and the close code if one came."""
        if data.startswith(b"HTTP/1.1 101"):
            data = data.partition(b"\r\n\r\n")[2]
        self.ws.receive_data(data)
        messages, code = [], None
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                messages.append(json.loads(event.data))
            elif isinstance(event, CloseConnection):
                code = event.code
        return messages, code


def chats(messages: list[dict[str, object]]) -> list[object]:
    return [m["content"] for m in messages if m["type"] == "chat"]


# -- the close path ---------------------------------------------------------------------


def test_a_rate_limited_sender_gets_its_echoes_and_the_reason_before_the_close() -> None:
    hub = Hub(BrokerConfig(rate_limit=1, rate_burst=3), ServerConfig())
    peer = Peer()
    sender = connect(hub, "lobby", "ann")
    connect(hub, "lobby", "bob")
    peer.read(written(hub)[sender])
    burst = b"".join(peer.chat(i) for i in range(20))
    hub.receive(sender, burst, now=0.0, timestamp=0)
    messages, code = peer.read(written(hub)[sender])
    assert code == 1008
    assert chats(messages) == [0, 1, 2]
    assert next(m.get("code") for m in messages if m["type"] == "error") == "rate_limited"


def test_echoes_queued_before_a_protocol_error_go_out_before_its_close() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    peer = Peer()
    sender = connect(hub, "lobby", "ann")
    peer.read(written(hub)[sender])
    bad = Connection(ConnectionType.CLIENT).send(TextMessage(data="x"))
    bad = bytes([0x80 | Opcode.BINARY]) + bad[1:]  # the same frame, as binary
    hub.receive(sender, peer.chat("a") + peer.chat("b") + bad, now=0.0, timestamp=0)
    messages, code = peer.read(written(hub)[sender])
    assert chats(messages) == ["a", "b"]
    assert code == 1003


# -- bursts ---------------------------------------------------------------------------


def feed(hub: Hub, cid: int, data: bytes) -> dict[int, bytes]:
    """What an adapter does with one read: a batch, a flush, the next batch, ..."""
    out: dict[int, bytes] = {}
    hub.receive(cid, data, now=0.0, timestamp=0)
    while True:
        for c, chunk in written(hub).items():
            out[c] = out.get(c, b"") + chunk
        if not hub.input_pending(cid):
            return out
        hub.receive(cid, b"", now=0.0, timestamp=0)


def test_a_burst_larger_than_the_queues_reaches_readers_that_keep_up() -> None:
    hub = Hub(BrokerConfig(send_queue=1024, rate_burst=2000), ServerConfig())
    sender = connect(hub, "lobby", "ann")
    readers = [connect(hub, "lobby", f"r{i}") for i in range(5)]
    peers = {cid: Peer() for cid in [sender, *readers]}
    for cid, data in written(hub).items():
        peers[cid].read(data)
    burst = b"".join(peers[sender].chat(i) for i in range(1100))
    out = feed(hub, sender, burst)
    assert hub.overflows == 0
    for cid in [sender, *readers]:
        messages, code = peers[cid].read(out[cid])
        assert code is None
        assert chats(messages) == list(range(1100))


def test_a_burst_of_refusals_larger_than_the_queue_reaches_its_sender() -> None:
    hub = Hub(BrokerConfig(send_queue=1024, rate_burst=2000), ServerConfig())
    sender = connect(hub, "lobby", "ann")
    peer = Peer()
    peer.read(written(hub)[sender])
    refused = peer.ws.send(TextMessage(data='{"type":"join","room":"no room!"}'))
    out = feed(hub, sender, refused * 1500)
    messages, code = peer.read(out[sender])
    assert code is None
    assert [m["type"] for m in messages] == ["error"] * 1500


def test_a_reader_that_does_not_keep_up_with_a_burst_is_still_closed() -> None:
    hub = Hub(BrokerConfig(send_queue=100, rate_burst=2000), ServerConfig())
    sender = connect(hub, "lobby", "ann")
    slow = connect(hub, "lobby", "slow")
    written(hub)
    peer = Peer()
    burst = b"".join(peer.chat(i) for i in range(300))
    hub.receive(sender, burst, now=0.0, timestamp=0)
    while hub.input_pending(sender):  # only the sender's queue is written
        for cid, queue in hub.take_dirty():
            if cid == sender:
                while queue:
                    queue.consume(len(queue.data()))
        hub.receive(sender, b"", now=0.0, timestamp=0)
    assert hub.overflows == 1
    assert hub.queue(slow) is not None and hub.websocket_count == 1


# -- the server-wide budget -----------------------------------------------------------


def write_some(hub: Hub, readers: set[int], *, enforce: bool = True) -> None:
    """A flush where only *readers* read: the others' sockets take nothing."""
    for cid, queue in hub.take_dirty():
        if cid in readers:
            while queue:
                queue.consume(len(queue.data()))
            hub.flushed(cid)
    if enforce:
        hub.enforce_budget(now=0.0, timestamp=0)


def test_over_the_budget_the_readers_with_most_queued_are_closed_first() -> None:
    hub = Hub(
        BrokerConfig(rate_limit=0),
        ServerConfig(max_queued_bytes=64 * 1024, max_connections_per_ip=0),
    )
    sender = connect(hub, "lobby", "ann")
    reader = connect(hub, "lobby", "reader")
    # Two that stopped reading: "big" since the start, "small" since the 2nd message.
    big = connect(hub, "lobby", "big")
    small = connect(hub, "lobby", "small")
    written(hub)
    peer = Peer()
    closed: list[int] = []
    for i in range(120):
        hub.receive(sender, peer.chat("x" * 1000 + str(i)), now=0.0, timestamp=0)
        write_some(hub, {sender, reader} | ({small} if i < 2 else set()))
        closed += [c for c in (big, small) if c not in hub.broker and c not in closed]
        assert hub.budget.used <= 64 * 1024 + 4 * 1100  # at most one message over
    assert closed == [big, small]  # the slowest first, then the next
    assert hub.budget_closes == 2 and hub.overflows == 2
    assert reader in hub.broker and sender in hub.broker
    for cid in (big, small):
        queue = hub.queue(cid)
        assert queue is not None and queue.nbytes < 1100 + 64  # the close, not the backlog
    assert hub.metrics()["roombus_queued_bytes_closed_total"] == 2


def test_a_broadcast_counts_only_until_the_kernel_takes_it() -> None:
    """A fan-out larger than the budget, written at once, closes nobody: the check comes
    after the write."""
    hub = Hub(
        BrokerConfig(rate_limit=0),
        ServerConfig(max_queued_bytes=64 * 1024, max_connections_per_ip=0),
    )
    sender = connect(hub, "lobby", "ann")
    readers = {connect(hub, "lobby", f"r{i}") for i in range(100)}
    written(hub)
    hub.receive(sender, Peer().chat("x" * 2000), now=0.0, timestamp=0)
    assert hub.budget.used > 64 * 1024 * 3  # queued for everyone
    write_some(hub, readers | {sender})
    assert hub.budget.used == 0
    assert hub.budget_closes == 0 and hub.websocket_count == 101


def test_a_lost_connection_leaves_the_budget() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = connect(hub, "lobby", "ann")
    assert hub.budget.used > 0  # its 101 and presence
    hub.lost(cid, now=0.0, timestamp=0)
    assert hub.budget.used == 0


def test_the_budget_counts_every_byte_a_reader_holds_up_control_frames_too() -> None:
    """The slowest reader is the one with the most bytes waiting, whatever they are:
    one that never read its 101 holds those bytes too, and goes before one with a few
    more data bytes but nothing else waiting."""
    hub = Hub(
        BrokerConfig(rate_limit=0),
        ServerConfig(max_queued_bytes=8000, max_connections_per_ip=0),
    )
    sender = connect(hub, "lobby", "ann")
    written(hub)
    mute = connect(hub, "lobby", "mute")  # never reads, not even its 101
    write_some(hub, {sender})
    late = connect(hub, "lobby", "late")  # reads up to here, then stops
    write_some(hub, {sender, late})
    q_mute, q_late = hub.queue(mute), hub.queue(late)
    assert q_mute is not None and q_late is not None
    peer = Peer()
    while q_late.data_bytes <= q_mute.data_bytes:  # errors for it alone
        hub.receive(late, peer.ws.send(TextMessage(data="{nope")), now=0.0, timestamp=0)
    for i in range(4):
        hub.receive(sender, peer.chat("x" * 1000 + str(i)), now=0.0, timestamp=0)
    write_some(hub, {sender}, enforce=False)
    assert q_late.data_bytes > q_mute.data_bytes and q_late.nbytes < q_mute.nbytes
    assert q_mute.nbytes + q_late.nbytes == hub.budget.used > 8000
    hub.enforce_budget(now=0.0, timestamp=0)
    assert mute not in hub.broker  # over 8000: the one holding the most bytes went
    assert late in hub.broker and sender in hub.broker
    assert hub.budget_closes == 1


def slow_readers(limit: int) -> tuple[Hub, list[int]]:
    """A hub with *limit* as max-queued-bytes and four readers that stopped reading
    one message apart (the first one earliest), the sender keeping up; the budget is
    not enforced yet."""
    hub = Hub(
        BrokerConfig(rate_limit=0),
        ServerConfig(max_queued_bytes=limit, max_connections_per_ip=0),
    )
    sender = connect(hub, "lobby", "ann")
    readers = [connect(hub, "lobby", f"r{i}") for i in range(4)]
    written(hub)
    peer = Peer()
    for i in range(8):
        hub.receive(sender, peer.chat("x" * 500 + str(i)), now=0.0, timestamp=0)
        write_some(hub, {sender, *readers[i + 1 :]}, enforce=False)  # r{j} reads j of them
    return hub, readers


def queued(hub: Hub, cids: list[int]) -> list[int]:
    return [hub.queue(cid).nbytes for cid in cids]  # type: ignore[union-attr]


@pytest.mark.parametrize("over", ["at the limit", "7/8 left exactly", "just over 7/8"])
def test_the_budget_closes_the_fewest_slowest_readers_that_leave_seven_eighths(
    over: str,
) -> None:
    """Nobody is closed at the limit itself (only over it); over it, the slowest
    readers go, one at a time, until the bytes left are at most 7/8 of the limit."""
    held = queued(*slow_readers(0))  # the same bytes, whatever the limit
    total = sum(held)
    assert held == sorted(held, reverse=True) and len(set(held)) == 4
    if over == "at the limit":
        limit, closed = total, 0
    else:
        # The limit whose 7/8 is exactly what is left without the slowest reader,
        # or a byte less than that: then the next slowest goes too.
        left = total - held[0] - (over == "just over 7/8")
        limit = next(n for n in range(left, 2 * left) if n - n // 8 == left)
        closed = 1 if over == "7/8 left exactly" else 2
    hub, readers = slow_readers(limit)
    assert hub.budget.used == total and queued(hub, readers) == held
    hub.enforce_budget(now=0.0, timestamp=0)
    assert [cid in hub.broker for cid in readers] == [False] * closed + [True] * (4 - closed)
    assert hub.budget_closes == closed


def test_an_http_answer_waiting_counts_in_the_budget_but_only_websockets_are_closed() -> None:
    page = b"<p>" + b"x" * 20_000 + b"</p>"
    held = sum(queued(*slow_readers(0)))
    hub = Hub(
        BrokerConfig(rate_limit=0),
        ServerConfig(max_queued_bytes=held + len(page), max_connections_per_ip=0, page=page),
    )
    reader = hub.open(now=0.0)  # asks for the page, and reads none of it
    hub.receive(reader, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    sender = connect(hub, "lobby", "ann")
    readers = [connect(hub, "lobby", f"r{i}") for i in range(4)]
    write_some(hub, {sender, *readers}, enforce=False)
    peer = Peer()
    for i in range(8):
        hub.receive(sender, peer.chat("x" * 500 + str(i)), now=0.0, timestamp=0)
        write_some(hub, {sender, *readers[i + 1 :]}, enforce=False)
    assert hub.budget.used > held + len(page)
    hub.enforce_budget(now=0.0, timestamp=0)
    assert hub.budget_closes >= 1 and readers[0] not in hub.broker
    queue = hub.queue(reader)
    assert queue is not None and queue.nbytes > len(page)  # all of its answer still to go
    assert hub.closes[(1008, "server")] == hub.budget_closes
