"""BackplaneProtocol over whole sessions: what it counts, the numbers it hands out, and
what its replies mean, with the scripted Redis of test_protocol.py (no sockets)."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from roombus.cluster import BackplaneLost, Relay, RoomSynced, Subscribe, Unsubscribe
from roombus.cluster.config import ClusterConfig
from roombus.cluster.protocol import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    KEEPALIVE,
    BackplaneProtocol,
    CloseLinks,
    Execute,
    Link,
    Listen,
    OpenLink,
    Phase,
    Ping,
    Unlisten,
)
from roombus.cluster.resp import RedisError
from roombus.cluster.schema import ROOMS_BUDGET, command_for, script_source, snapshot_command
from roombus.core.actions import Control, KickCommand, ReadCluster, ReadStream
from roombus.core.events import ClusterRead, Relayed

from .test_protocol import (
    INFO,
    R1,
    R2,
    SHAS,
    TIMEOUT,
    TTL,
    announce,
    new,
    online,
    only,
    relay,
    replies_to,
)

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_metrics_are_the_documented_counters() -> None:
    proto = new()
    online(proto)
    proto.submit([relay(), relay(ref=2)], 0.0)
    execute = only(proto.take_commands(), Execute)
    proto.messages([(b"rb:{r1}:c", b"m 1 n2 1 a"), (b"rb:{r2}:c", b"j 1 n2 b")], 0.0)
    proto.replies(execute.batch, [1, RedisError("ERR x")], 0.0)  # ends the session
    assert proto.take_commands() == [CloseLinks()]
    proto.submit([relay()], 0.0)  # while down: dropped
    proto.links_closed(0.0)
    proto.handle_timer(1.0)
    proto.take_commands()  # the OpenLink
    proto.take_events()
    online(proto, 1.0)
    proto.messages([(b"rb:{r1}:c", b"m 2 n2 1 a")], 1.0)
    assert proto.metrics() == {
        "roombus_redis_connects_total": 2,
        "roombus_redis_failures_total": 1,
        "roombus_redis_dropped_total": 1,
        "roombus_redis_relayed_total": 2,
        "roombus_redis_received_total": 3,
        "roombus_redis_errors_total": 1,
    }
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(roombus_redis_\w+)` \| counter \|", text, re.MULTILINE))
    assert documented == set(proto.metrics())


def test_the_agreed_attributes_are_the_config_s() -> None:
    config = ClusterConfig(
        url="redis://127.0.0.1:6390",
        node_id="n7",
        presence_ttl=6,
        prefix="px",
        connect_timeout=3,
    )
    proto = BackplaneProtocol(config, local_presence=list)
    assert proto.config is config
    assert proto.address is config.address
    assert (proto.node_id, proto.prefix) == ("n7", "px")
    assert proto.presence_ttl == 6.0 and proto.connect_timeout == 3.0
    assert (proto.phase, proto.idle, proto.get_timer()) == (Phase.DOWN, True, None)
    assert repr(proto) == "<BackplaneProtocol node='n7' RedisAddress(host='127.0.0.1', " + (
        "port=6390, db=0, username=None, unix_path=None, tls=None, sentinels=(), "
        "master_name=None, cluster=()) DOWN>"
    )


def test_batch_numbers_are_never_handed_out_twice() -> None:
    """Across sessions, keepalives, listens and work: a late answer to an old batch can
    never be taken for the answer to a new one."""
    proto = new(presence=[(R1, ["ann"])])
    seen: list[int] = []
    now = 0.0
    for session in range(2):
        online(proto, now)
        proto.submit([Subscribe(room=R1, gen=1), relay(), Subscribe(room=R2, gen=1)], now)
        for _ in range(40):
            now += 0.125
            proto.handle_timer(now)
            for command in proto.take_commands():
                if isinstance(command, (Execute, Listen)) or hasattr(command, "batch"):
                    seen.append(command.batch)  # type: ignore[union-attr]
                if isinstance(command, Execute):
                    proto.replies(command.batch, replies_to(command), now)
                elif hasattr(command, "batch"):
                    proto.confirmed(command.batch, now)  # type: ignore[union-attr]
        assert proto.phase is Phase.ONLINE, session
        assert any(isinstance(e, RoomSynced) for e in proto.take_events())
        proto.link_failed(Link.COMMAND, "EOF", now)
        proto.take_commands()
        assert proto.take_events() == [BackplaneLost()]
        proto.links_closed(now)
        now = proto.get_timer() or now
        proto.handle_timer(now)
        assert only(proto.take_commands(), OpenLink) == OpenLink(
            Link.COMMAND, proto.address, TIMEOUT
        )
    assert len(seen) > 20
    assert len(seen) == len(set(seen)), seen


# --------------------------------------------------------------------------------------
# Why a session ended, and the phases, in the log


def failure_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    caplog.clear()
    return warnings


def test_each_end_of_a_session_is_logged_once_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="roombus.backplane")
    proto = new()
    proto.start(0.0)
    proto.link_failed(Link.COMMAND, "connection refused", 0.0)
    assert failure_warnings(caplog) == ["redis backplane down: command link: connection refused"]
    proto.links_closed(0.0)
    proto.handle_timer(1.0)
    proto.take_commands()
    proto.handle_timer(1.0 + TIMEOUT)
    assert failure_warnings(caplog) == [
        "redis backplane down: timed out setting up the session (CONNECTING, after 2.0s)"
    ]
    proto.links_closed(3.0)
    due = proto.get_timer()
    assert due is not None
    proto.handle_timer(due)
    proto.take_commands()
    online(proto, due)
    assert failure_warnings(caplog) == []
    proto.submit([relay(), relay(ref=2)], due)
    execute = only(proto.take_commands(), Execute)
    proto.replies(execute.batch, [1], due)
    assert failure_warnings(caplog) == [
        "redis backplane lost: 1 replies to a pipeline of 2 commands"
    ]


def reach_loading() -> tuple[BackplaneProtocol, Execute]:
    proto = new()
    proto.start(0.0)
    proto.take_commands()
    proto.link_opened(Link.COMMAND, 0.0)
    probe = only(proto.take_commands(), Execute)
    proto.replies(probe.batch, replies_to(probe), 0.0)
    return proto, only(proto.take_commands(), Execute)


def test_an_unreadable_script_load_reply_ends_the_setup(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="roombus.backplane")
    proto, load = reach_loading()
    replies = replies_to(load)
    replies[1] = 5  # neither a SHA nor an error
    proto.replies(load.batch, replies, 0.0)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.phase is Phase.CLOSING and proto.statistics.failures == 1
    assert proto.statistics.errors == 0 and proto.take_events() == []
    assert failure_warnings(caplog) == ["redis backplane down: unreadable SCRIPT LOAD reply 5"]


def test_error_replies_are_counted_and_the_first_is_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="roombus.backplane")
    proto = new()
    online(proto)
    proto.submit([relay(), relay(ref=2), relay(ref=3)], 0.0)
    execute = only(proto.take_commands(), Execute)
    errors = [RedisError("OOM full"), RedisError("READONLY replica")]
    proto.replies(execute.batch, [1, *errors], 0.0)
    assert proto.statistics.errors == 2
    assert failure_warnings(caplog) == ["redis backplane lost: error reply: OOM full"]


def test_an_unreadable_answer_is_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="roombus.backplane")
    proto = new()
    online(proto)
    proto.submit([Relay(room=R1, ref=1, prefix=b"{", answer=True)], 0.0)
    execute = only(proto.take_commands(), Execute)
    proto.replies(execute.batch, [b"x"], 0.0)
    assert failure_warnings(caplog) == [
        "redis backplane lost: unreadable relay reply for room 'r1'"
    ]


def test_a_missed_keepalive_is_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="roombus.backplane")
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.handle_timer(KEEPALIVE)
    proto.take_commands()
    proto.handle_timer(2 * KEEPALIVE)
    assert failure_warnings(caplog) == [
        "redis backplane lost: Redis did not answer a PING within 5s"
    ]


def test_each_phase_change_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="roombus.backplane")
    proto = new()
    online(proto)
    proto.link_opened(Link.COMMAND, 0.0)  # no row: ignored
    proto.stop(0.0)
    proto.links_closed(0.0)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert lines == [
        "redis backplane: DOWN -> CONNECTING (start)",
        "redis backplane: CONNECTING -> PROBING (link_opened(COMMAND))",
        "redis backplane: PROBING -> LOADING (probe replies)",
        "redis backplane: LOADING -> OPENING_SUB (SCRIPT LOAD replies)",
        "redis backplane: OPENING_SUB -> ONLINE (link_opened(SUBSCRIBER))",
        "redis backplane: link_opened(COMMAND) ignored in ONLINE",
        "redis backplane: ONLINE -> CLOSING (stop)",
        "redis backplane: CLOSING -> STOPPED (links_closed (stopping))",
    ]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["redis backplane connected as node n1 (sharded pub/sub)"]


# --------------------------------------------------------------------------------------
# Sessions


def test_a_ping_unanswered_when_a_session_ends_is_forgotten() -> None:
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.handle_timer(KEEPALIVE)
    assert any(isinstance(c, Ping) for c in proto.take_commands())  # never answered
    proto.link_failed(Link.SUBSCRIBER, "EOF", KEEPALIVE)
    proto.links_closed(KEEPALIVE)
    now = proto.get_timer()
    assert now is not None
    proto.handle_timer(now)
    proto.take_commands()
    proto.take_events()
    online(proto, now)
    proto.handle_timer(now + KEEPALIVE)  # the new session's first check: a new ping
    commands = proto.take_commands()
    assert proto.phase is Phase.ONLINE
    ping = next(c for c in commands if isinstance(c, Ping))
    execute = next(c for c in commands if isinstance(c, Execute))
    assert execute.commands[0] == (b"PING",)
    proto.confirmed(ping.batch, now + KEEPALIVE)
    proto.replies(execute.batch, replies_to(execute), now + KEEPALIVE)
    proto.handle_timer(now + 2 * KEEPALIVE)  # answered: the next round, not a loss
    assert proto.phase is Phase.ONLINE and proto.take_events() == []


def test_a_session_of_exactly_the_cap_resets_the_backoff() -> None:
    proto = new(seed=5, keepalive=KEEPALIVE)
    jitter = random.Random(5)
    online(proto, 0.0)
    proto.link_failed(Link.SUBSCRIBER, "EOF", BACKOFF_CAP)
    proto.links_closed(BACKOFF_CAP)
    assert proto.get_timer() == BACKOFF_CAP + BACKOFF_FIRST * (0.5 + 0.5 * jitter.random())


def test_on_a_redis_cluster_the_streams_are_tied_to_no_run() -> None:
    config = ClusterConfig(url="redis+cluster://h1:7000,h2:7001", node_id="n1", prefix="rb")
    proto = BackplaneProtocol(config, local_presence=list)
    proto.start(0.0)
    proto.take_commands()
    proto.link_opened(Link.COMMAND, 0.0)
    probe = only(proto.take_commands(), Execute)
    proto.replies(probe.batch, replies_to(probe), 0.0)
    load = only(proto.take_commands(), Execute)
    proto.replies(load.batch, replies_to(load), 0.0)  # INFO names a run_id: one node's
    proto.take_commands()
    proto.link_opened(Link.SUBSCRIBER, 0.0)
    proto.take_commands()
    proto.submit([Subscribe(room=R1, gen=1)], 0.0)
    proto.confirmed(only(proto.take_commands(), Listen).batch, 0.0)
    snapshot = only(proto.take_commands(), Execute)
    assert snapshot.commands[0][1] == SHAS["snapshot"] and snapshot.commands[0][-1] == ""
    proto.replies(snapshot.batch, replies_to(snapshot), 0.0)
    proto.submit([relay()], 0.0)
    assert only(proto.take_commands(), Execute).commands[0][-1] == ""


def test_cluster_reads_are_answered_in_the_batch_s_order() -> None:
    proto = new()
    online(proto)
    reads = [
        ReadCluster(ticket=1, kind="presence", room=R1),
        ReadCluster(ticket=2, kind="nodes"),
        ReadCluster(ticket=3, kind="rooms", pattern="r*", limit=5),
    ]
    proto.submit([reads[0], relay(), reads[1], reads[2]], 0.0)
    execute = only(proto.take_commands(), Execute)
    assert execute.commands == (
        ("EVALSHA", SHAS["members"], 1, "rb:{r1}:p"),
        execute.commands[1],
        ("EVALSHA", SHAS["nodes"], 1, "rb:{@}:nodes", 2000),
        (
            "EVALSHA",
            SHAS["rooms"],
            2,
            "rb:{@}:rooms",
            "rb:{@}:seen",
            2000,
            "[r",
            b"[r\xff",
            "^r.*$",
            5,
            ROOMS_BUDGET,
        ),
    )
    assert execute.commands[1][1] == SHAS["relay"]
    proto.replies(
        execute.batch, [[b"n2 bob", b"n1 ann"], 1, [b"n2", 40], [[b"r1", b"r2"], b""]], 0.0
    )
    assert proto.take_events() == [
        ClusterRead(ticket=1, kind="presence", entries=(("n1", "ann"), ("n2", "bob"))),
        ClusterRead(ticket=2, kind="nodes", nodes=(("n2", 40),)),
        ClusterRead(ticket=3, kind="rooms", rooms=("r1", "r2")),
    ]
    assert proto.idle and proto.phase is Phase.ONLINE


def test_an_unreadable_cluster_read_ends_the_session(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="roombus.backplane")
    proto = new()
    online(proto)
    proto.submit([ReadCluster(ticket=1, kind="nodes")], 0.0)
    execute = only(proto.take_commands(), Execute)
    proto.replies(execute.batch, [[b"n2"]], 0.0)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]
    assert failure_warnings(caplog) == ["redis backplane lost: unreadable nodes read"]


# --------------------------------------------------------------------------------------
# Work


def test_acknowledged_relays_are_answered_and_the_others_are_not() -> None:
    proto = new()
    online(proto)
    dedup = Relay(room=R1, ref=1, prefix=b"{", dedup=("ann", "m1"), dedup_ms=60_000)
    told = Relay(room=R2, ref=2, prefix=b"{", answer=True)
    proto.submit([dedup, relay(ref=3), told], 0.0)
    execute = only(proto.take_commands(), Execute)
    assert len(execute.commands[0]) == len(execute.commands[1]) + 1  # the dedup key
    proto.replies(execute.batch, [[4, b"E1", 1], [5, b"E1", 0], [6, b"E2", 0]], 0.0)
    assert proto.take_events() == [
        Relayed(room=R1, ref=1, epoch="E1", seq=4, duplicate=True),
        Relayed(room=R2, ref=2, epoch="E2", seq=6, duplicate=False),
    ]
    assert proto.statistics.relayed == 3


def test_classic_pub_sub_stops_listening_with_unsubscribe() -> None:
    proto = new()
    proto.start(0.0)
    proto.take_commands()
    proto.link_opened(Link.COMMAND, 0.0)
    probe = only(proto.take_commands(), Execute)
    proto.replies(probe.batch, [[None]], 0.0)  # COMMAND INFO: no SPUBLISH
    load = only(proto.take_commands(), Execute)
    proto.replies(load.batch, replies_to(load), 0.0)
    proto.take_commands()
    proto.link_opened(Link.SUBSCRIBER, 0.0)
    assert not proto.sharded
    assert only(proto.take_commands(), Listen).verb == b"SUBSCRIBE"
    proto.submit([Unsubscribe(room=R1), Control(command=KickCommand(room=R1, username="a"))], 0)
    unlisten, execute = proto.take_commands()
    assert unlisten == Unlisten(b"UNSUBSCRIBE", (b"rb:{r1}:c",))
    assert isinstance(execute, Execute) and execute.commands[0][:2] == ("PUBLISH", "rb:ctl")


def test_a_keepalive_ping_queued_behind_a_batch_must_be_answered_itself() -> None:
    """The answer to the batch ahead of the PING is no answer to the PING."""
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.submit([relay()], 0.0)
    first = only(proto.take_commands(), Execute)
    proto.handle_timer(KEEPALIVE)
    ping = only(proto.take_commands(), Ping)  # the PING on COMMAND waits behind the relay
    proto.confirmed(ping.batch, KEEPALIVE)
    proto.replies(first.batch, [1], KEEPALIVE)
    second = only(proto.take_commands(), Execute)
    assert second.commands[0] == (b"PING",)  # in flight, never answered
    proto.handle_timer(2 * KEEPALIVE)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]


def test_without_command_info_a_redis_7_gets_sharded_pub_sub() -> None:
    proto = new()
    proto.start(0.0)
    proto.take_commands()
    proto.link_opened(Link.COMMAND, 0.0)
    probe = only(proto.take_commands(), Execute)
    proto.replies(probe.batch, [RedisError("ERR unknown command 'COMMAND'")], 0.0)
    version = only(proto.take_commands(), Execute)
    proto.replies(version.batch, [INFO], 0.0)  # redis_version:7.2.4
    load = only(proto.take_commands(), Execute)
    assert proto.sharded and proto.phase is Phase.LOADING
    assert load.commands[0] == (b"SCRIPT", b"LOAD", script_source("relay", True))


def test_stopping_renews_no_members_and_reads_no_presence_again() -> None:
    """Once stop() is called the goodbyes are the last word: a refresh due meanwhile
    would list the leaving users again."""
    proto = new(presence=[(R1, ["ann"])], keepalive=KEEPALIVE)
    online(proto)
    proto.submit([Subscribe(room=R1, gen=1)], 0.0)
    listen = only(proto.take_commands(), Listen)
    proto.stop(0.1)
    assert proto.get_timer() == KEEPALIVE  # the keepalive only
    proto.handle_timer(TTL)  # past the refresh and the read again
    commands = proto.take_commands()
    assert all(not isinstance(c, Execute) for c in commands), commands
    proto.confirmed(listen.batch, TTL)
    snapshot = only(proto.take_commands(), Execute)
    proto.submit([announce(present=False)], TTL)  # the goodbye, after the snapshot
    proto.replies(snapshot.batch, replies_to(snapshot), TTL)
    assert [type(e) for e in proto.take_events()] == [RoomSynced]
    commands = proto.take_commands()
    bye = next(c for c in commands if isinstance(c, Execute) and c.commands[-1][:1] != (b"PING",))
    assert [c[1] for c in bye.commands if c[0] == "EVALSHA"] == [SHAS["announce"]]
    for command in commands:
        if isinstance(command, Execute):
            proto.replies(command.batch, replies_to(command), TTL)
    for _ in range(3):
        for command in proto.take_commands():
            if isinstance(command, Execute):
                proto.replies(command.batch, replies_to(command), TTL)
    assert proto.phase is Phase.CLOSING
    proto.links_closed(TTL)
    assert proto.phase is Phase.STOPPED


def test_an_unreadable_snapshot_is_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="roombus.backplane")
    proto = new()
    online(proto)
    proto.submit([Subscribe(room=R1, gen=1)], 0.0)
    proto.confirmed(only(proto.take_commands(), Listen).batch, 0.0)
    snapshot = only(proto.take_commands(), Execute)
    proto.replies(snapshot.batch, [[1, [b"n2 bob"], b"not an epoch", 0]], 0.0)
    assert failure_warnings(caplog) == [
        "redis backplane lost: unreadable presence snapshot of room 'r1'"
    ]


def test_a_stop_waits_for_the_snapshot_in_flight_then_closes() -> None:
    proto = new()
    online(proto)
    proto.submit([Subscribe(room=R1, gen=1)], 0.0)
    proto.confirmed(only(proto.take_commands(), Listen).batch, 0.0)
    snapshot = only(proto.take_commands(), Execute)
    proto.stop(1.0)
    assert proto.take_commands() == [] and proto.phase is Phase.ONLINE
    proto.replies(snapshot.batch, replies_to(snapshot), 2.0)
    assert proto.take_commands() == [CloseLinks()]
    assert [type(e) for e in proto.take_events()] == [RoomSynced]


def test_each_room_s_snapshot_reads_that_room_s_keys() -> None:
    proto = new()
    online(proto)
    proto.submit([Subscribe(room=R1, gen=1, position_ms=60_000), Subscribe(room=R2, gen=3)], 0.0)
    proto.confirmed(only(proto.take_commands(), Listen).batch, 0.0)
    snapshot = only(proto.take_commands(), Execute)
    assert snapshot.commands == tuple(
        snapshot_command(room, prefix="rb", shas=SHAS, position_ms=86_400_000, run="0a1b2c")
        for room in (R1, R2)
    )
    assert snapshot.commands[0][3] == "rb:{r1}:p" and snapshot.commands[1][3] == "rb:{r2}:p"


def test_work_becomes_the_schema_s_commands_for_this_node_and_session() -> None:
    proto = new()
    online(proto)
    work = [
        relay(),
        announce(present=False),
        ReadStream(room=R2, ticket=1, after=0, count=5, keep=9, keep_ms=1),
    ]
    proto.submit(work, 0.0)
    execute = only(proto.take_commands(), Execute)
    assert execute.commands == tuple(
        command_for(action, prefix="rb", node="n1", shas=SHAS, lifetime=2000, run="0a1b2c")
        for action in work
    )
    assert execute.commands[1][-3:] == ("n1 ann", "0", 2000)  # this node's member, leaving
