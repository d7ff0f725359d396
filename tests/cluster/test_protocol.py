"""BackplaneProtocol, sans-IO: a scripted fake Redis and a fake clock, no sockets."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event as note_event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from roombus import ConfigError, RoomName, Username
from roombus.cluster import (
    Announce,
    BackplaneLost,
    BackplaneRestored,
    RecordReceived,
    Relay,
    RoomSynced,
    Subscribe,
    Unsubscribe,
)
from roombus.cluster.config import ClusterConfig
from roombus.cluster.control import encode_control
from roombus.cluster.protocol import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    KEEPALIVE,
    LINK_TABLE,
    MIN_BACKOFF_CAP,
    BackplaneProtocol,
    CloseLinks,
    DriverCommand,
    Execute,
    Link,
    Listen,
    OpenLink,
    Phase,
    Ping,
    Unlisten,
    render_link_table,
)
from roombus.cluster.resp import SHARDED_PROBE, VERSION_PROBE, RedisError
from roombus.cluster.schema import SCRIPTS, channel, script_source
from roombus.core.actions import Control, DisconnectCommand, KickCommand, ReadStream
from roombus.core.events import ControlReceived, StreamRead

ROOT = Path(__file__).resolve().parents[2]
TTL = 3.0
TIMEOUT = 2.0
SHAS = {name: f"sha-{name}".encode() for name in SCRIPTS}
INFO = b"# Server\r\nredis_version:7.2.4\r\nrun_id:0a1b2c\r\n"
R1, R2 = RoomName("r1"), RoomName("r2")


def relay(room: RoomName = R1, ref: int = 1) -> Relay:
    return Relay(room=room, ref=ref, prefix=b'{"type":"chat","seq":')


def announce(room: RoomName = R1, user: str = "ann", present: bool = True) -> Announce:
    return Announce(room=room, username=Username(user), present=present)


def new(
    presence: list[tuple[RoomName, list[str]]] | None = None,
    seed: int = 1,
    *,
    ttl: float = TTL,
    keepalive: float | None = None,
) -> BackplaneProtocol:
    """A protocol with the tests' config; *keepalive*: its liveness checks moved out
    of the way of what a test is about (the protocol derives them from the TTL)."""
    config = ClusterConfig(
        url="redis://127.0.0.1:6390",
        node_id="n1",
        presence_ttl=ttl,
        prefix="rb",
        connect_timeout=TIMEOUT,
    )
    proto = BackplaneProtocol(
        config,
        local_presence=lambda: list(presence or []),
        random=random.Random(seed).random,
    )
    if keepalive is not None:
        proto.keepalive = keepalive  # type: ignore[misc]
    return proto


def only(commands: list[DriverCommand], kind: type[Any]) -> Any:
    """The one command of *commands*, which must be a *kind*."""
    assert len(commands) == 1, commands
    assert isinstance(commands[0], kind), commands
    return commands[0]


def answer(command: tuple[Any, ...]) -> object:
    """What a Redis 7 answers (the scripts' results are not read but for snapshots)."""
    if command == SHARDED_PROBE:
        return [[b"spublish", -3]]
    if command[:2] == (b"SCRIPT", b"LOAD"):
        for name in SCRIPTS:
            if command[2] in (script_source(name, True), script_source(name, False)):
                return SHAS[name]
        raise AssertionError(f"unknown script {command[2]!r:.40}")
    if command == VERSION_PROBE:
        return INFO
    if command == (b"PING",):
        return b"PONG"
    if command[0] == "EVALSHA" and command[1] == SHAS["snapshot"]:
        return [3, [b"n2 bob"], b"E1", 0]
    if command[0] == "EVALSHA" and command[1] == SHAS["relay"]:
        return [1, b"E1", 0]
    if command[0] == "EVALSHA" and command[1] == SHAS["read"]:
        return [b"E1", 0, 1, []]
    if command[0] == "EVALSHA":
        return 1
    raise AssertionError(f"unexpected command {command!r}")


def replies_to(execute: Execute) -> list[object]:
    return [answer(c) for c in execute.commands]


def online(proto: BackplaneProtocol, now: float = 0.0) -> None:
    """Take *proto* from DOWN (or CONNECTING) to ONLINE, the happy way."""
    if proto.phase is Phase.DOWN:
        proto.start(now)
        opened = only(proto.take_commands(), OpenLink)
        assert opened == OpenLink(Link.COMMAND, proto.address, TIMEOUT)
    proto.link_opened(Link.COMMAND, now)
    probe = only(proto.take_commands(), Execute)
    assert probe.commands == (SHARDED_PROBE,)
    proto.replies(probe.batch, replies_to(probe), now)
    load = only(proto.take_commands(), Execute)
    assert [c[:2] for c in load.commands] == [(b"SCRIPT", b"LOAD")] * len(SCRIPTS) + [VERSION_PROBE]
    proto.replies(load.batch, replies_to(load), now)
    assert only(proto.take_commands(), OpenLink) == OpenLink(
        Link.SUBSCRIBER, proto.address, TIMEOUT
    )
    proto.link_opened(Link.SUBSCRIBER, now)
    assert proto.phase is Phase.ONLINE
    assert proto.take_events() == [BackplaneRestored()]
    # The control channel, listened to for the session (no answer awaited).
    control = only(proto.take_commands(), Listen)
    verb = b"SSUBSCRIBE" if proto.sharded else b"SUBSCRIBE"
    assert (control.verb, control.channels) == (verb, (b"rb:ctl",))
    proto.confirmed(control.batch, now)  # (changes nothing)


# --------------------------------------------------------------------------------------
# The phase table


#: Written out by hand (a test generated from LINK_TABLE would mirror its mistakes).
EXPECTED_ROWS = {
    ("DOWN", "START"): "CONNECTING",
    ("DOWN", "BACKOFF_DUE"): "CONNECTING",
    ("CONNECTING", "COMMAND_OPENED"): "PROBING",
    ("PROBING", "PROBED"): "LOADING",
    ("LOADING", "LOADED"): "OPENING_SUB",
    ("OPENING_SUB", "SUBSCRIBER_OPENED"): "ONLINE",
    ("CONNECTING", "FAILED"): "CLOSING",
    ("PROBING", "FAILED"): "CLOSING",
    ("LOADING", "FAILED"): "CLOSING",
    ("OPENING_SUB", "FAILED"): "CLOSING",
    ("ONLINE", "FAILED"): "CLOSING",
    ("CLOSING", "CLOSED"): "DOWN",
    ("CONNECTING", "STOP"): "CLOSING",
    ("PROBING", "STOP"): "CLOSING",
    ("LOADING", "STOP"): "CLOSING",
    ("OPENING_SUB", "STOP"): "CLOSING",
    ("ONLINE", "STOP"): "CLOSING",
    ("DOWN", "STOP"): "STOPPED",
    ("CLOSING", "STOP"): "CLOSING",
    ("CLOSING", "CLOSED_STOPPING"): "STOPPED",
}


def test_the_link_table_is_the_expected_one() -> None:
    assert {(p.name, i.name): n.name for (p, i), n in LINK_TABLE.items()} == EXPECTED_ROWS


def reach(phase: str) -> BackplaneProtocol:
    """A protocol in *phase*, its commands taken. DOWN is after a session, backoff armed."""
    proto = new()
    steps = ["CONNECTING", "PROBING", "LOADING", "OPENING_SUB", "ONLINE"]
    if phase in ("DOWN", "CLOSING"):
        proto.start(0.0)
        proto.link_failed(Link.COMMAND, "refused", 0.0)
        if phase == "DOWN":
            proto.links_closed(0.0)
    elif phase in steps:
        proto.start(0.0)
        proto.take_commands()
        for _ in steps[: steps.index(phase)]:
            step(proto, proto.phase.name)
    proto.take_commands()
    proto.take_events()
    assert proto.phase.name == phase
    return proto


def step(proto: BackplaneProtocol, phase: str) -> None:
    """The input that moves *proto* out of setup *phase* the happy way."""
    if phase == "CONNECTING":
        proto.link_opened(Link.COMMAND, 0.0)
    elif phase == "PROBING":
        proto.replies(proto._step_batch, [answer(SHARDED_PROBE)], 0.0)
    elif phase == "LOADING":
        proto.replies(proto._step_batch, [*(SHAS[name] for name in SCRIPTS), INFO], 0.0)
    elif phase == "OPENING_SUB":
        proto.take_commands()
        proto.link_opened(Link.SUBSCRIBER, 0.0)


def feed(proto: BackplaneProtocol, phase: str, inp: str) -> list[DriverCommand]:
    if inp == "START":
        proto.start(0.0)
    elif inp == "BACKOFF_DUE":
        due = proto.get_timer()
        assert due is not None and 0 < due <= 2 * BACKOFF_FIRST
        proto.handle_timer(due)
    elif inp == "FAILED":
        proto.link_failed(Link.SUBSCRIBER, "EOF", 0.0)
    elif inp == "CLOSED":
        proto.links_closed(0.0)
    elif inp == "CLOSED_STOPPING":
        proto.stop(0.0)
        assert proto.take_commands() == []  # already closing
        proto.links_closed(0.0)
    elif inp == "STOP":
        proto.stop(0.0)
    else:
        step(proto, phase)
    return proto.take_commands()


@pytest.mark.parametrize(("phase", "inp"), sorted(EXPECTED_ROWS))
def test_every_row_of_the_link_table(phase: str, inp: str) -> None:
    proto = new() if (phase, inp) == ("DOWN", "START") else reach(phase)
    commands = feed(proto, phase, inp)
    assert proto.phase.name == EXPECTED_ROWS[phase, inp]
    new_phase = EXPECTED_ROWS[phase, inp]
    if new_phase == "CONNECTING":
        assert commands == [OpenLink(Link.COMMAND, proto.address, TIMEOUT)]
    elif new_phase == "CLOSING" and phase != "CLOSING":
        assert commands == [CloseLinks()]
    elif new_phase == "PROBING":
        assert only(commands, Execute).commands == (SHARDED_PROBE,)
    elif new_phase == "LOADING":
        load = only(commands, Execute)
        assert load.commands == (
            *((b"SCRIPT", b"LOAD", script_source(n, True)) for n in SCRIPTS),
            VERSION_PROBE,
        )
    elif new_phase == "OPENING_SUB":
        assert commands == [OpenLink(Link.SUBSCRIBER, proto.address, TIMEOUT)]
    elif new_phase == "ONLINE":  # the control channel, for the session
        assert [(c.verb, c.channels) for c in commands] == [(b"SSUBSCRIBE", (b"rb:ctl",))]
    else:
        assert commands == []


def test_an_input_without_a_row_is_ignored() -> None:
    proto = reach("CLOSING")
    proto.link_opened(Link.COMMAND, 0.0)  # late: the link is being closed
    proto.link_failed(Link.COMMAND, "late", 0.0)
    proto.replies(1, [b"x"], 0.0)
    assert proto.phase is Phase.CLOSING
    assert proto.take_commands() == [] and proto.take_events() == []
    assert proto.statistics.failures == 1


def test_closing_while_stopping_ends_stopped_and_nothing_comes_after() -> None:
    proto = reach("CLOSING")
    proto.stop(0.0)
    proto.links_closed(0.0)
    assert proto.phase is Phase.STOPPED
    assert proto.get_timer() is None
    proto.start(1.0)
    proto.submit([relay()], 1.0)
    proto.handle_timer(100.0)
    proto.messages([(b"rb:{r1}:c", b"m 1 n2 1 x")], 1.0)
    assert proto.take_commands() == [] and proto.take_events() == []
    assert proto.statistics.dropped == 1


def test_the_design_doc_carries_the_link_table() -> None:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert render_link_table() in text, "docs/design.md: paste render_link_table()"


# --------------------------------------------------------------------------------------
# Setup


def test_without_command_info_the_version_decides_and_old_redis_gets_classic_pubsub() -> None:
    proto = new()
    proto.start(0.0)
    proto.take_commands()
    proto.link_opened(Link.COMMAND, 0.0)
    probe = only(proto.take_commands(), Execute)
    proto.replies(probe.batch, [RedisError("ERR unknown command 'COMMAND'")], 0.0)
    version = only(proto.take_commands(), Execute)
    assert version.commands == (VERSION_PROBE,)
    proto.replies(version.batch, [b"# Server\r\nredis_version:6.2.14\r\n"], 0.0)
    load = only(proto.take_commands(), Execute)
    assert not proto.sharded
    scripts = load.commands[:-1]  # then INFO server
    assert all("'PUBLISH'" in str(c[2]) or "PUBLISH" not in str(c[2]) for c in scripts)
    assert load.commands[0][2] == script_source("relay", False)
    proto.replies(load.batch, replies_to(load), 0.0)
    proto.take_commands()
    proto.link_opened(Link.SUBSCRIBER, 0.0)
    proto.take_events()
    assert only(proto.take_commands(), Listen).verb == b"SUBSCRIBE"  # the control channel
    proto.submit([Subscribe(room=R1, gen=1), Unsubscribe(room=R1)], 0.0)
    listen = only(proto.take_commands(), Listen)
    assert listen.verb == b"SUBSCRIBE"


def test_a_denied_version_probe_means_classic_pubsub() -> None:
    proto = new()
    proto.start(0.0)
    proto.link_opened(Link.COMMAND, 0.0)
    probe = next(c for c in proto.take_commands() if isinstance(c, Execute))
    proto.replies(probe.batch, [RedisError("NOPERM")], 0.0)
    version = only(proto.take_commands(), Execute)
    proto.replies(version.batch, [RedisError("NOPERM")], 0.0)
    assert proto.phase is Phase.LOADING and not proto.sharded
    assert proto.statistics.errors == 0


def test_a_refused_script_load_ends_the_session_and_is_counted() -> None:
    proto = new()
    proto.start(0.0)
    proto.take_commands()
    proto.link_opened(Link.COMMAND, 0.0)
    probe = only(proto.take_commands(), Execute)
    proto.replies(probe.batch, replies_to(probe), 0.0)
    load = only(proto.take_commands(), Execute)
    proto.replies(
        load.batch, [SHAS["relay"], RedisError("OOM"), *[b"x"] * (len(SCRIPTS) - 2), INFO], 0.0
    )
    assert proto.take_commands() == [CloseLinks()]
    assert proto.statistics.errors == 1 and proto.statistics.failures == 1
    assert proto.take_events() == []  # it never was online: nothing to lose


def test_a_setup_step_that_does_not_answer_times_out() -> None:
    proto = new()
    proto.start(10.0)
    proto.take_commands()
    assert proto.get_timer() == 10.0 + TIMEOUT
    proto.handle_timer(11.0)  # early: nothing
    assert proto.take_commands() == []
    proto.link_opened(Link.COMMAND, 11.0)
    proto.take_commands()
    assert proto.get_timer() == 11.0 + TIMEOUT  # each step has its own deadline
    proto.handle_timer(11.0 + TIMEOUT)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.statistics.failures == 1 and proto.phase is Phase.CLOSING
    assert proto.get_timer() is None


def test_a_wrong_number_of_replies_ends_the_session() -> None:
    proto = new()
    online(proto)
    proto.submit([relay(), relay(ref=2)], 0.0)
    execute = only(proto.take_commands(), Execute)
    proto.replies(execute.batch, [1], 0.0)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]


# --------------------------------------------------------------------------------------
# Backoff


def backoff_waits(proto: BackplaneProtocol, n: int, online_for: float = 0.0) -> list[float]:
    """Fail *n* sessions in a row (each online for *online_for* s, or never online)."""
    now = 0.0
    waits = []
    for _ in range(n):
        if online_for:
            online(proto, now)
            now += online_for
            proto.link_failed(Link.SUBSCRIBER, "EOF", now)
        else:
            if proto.phase is Phase.DOWN:
                proto.start(now)
            proto.link_failed(Link.COMMAND, "refused", now)
        proto.links_closed(now)
        due = proto.get_timer()
        assert due is not None
        waits.append(round(due - now, 9))
        now = due
        proto.handle_timer(now)
        assert proto.phase is Phase.CONNECTING
        proto.take_commands()
        proto.take_events()
    return waits


def test_backoff_doubles_to_the_cap_with_jitter_from_the_given_random() -> None:
    jitter = random.Random(7)
    expected = [
        round(b * (0.5 + 0.5 * jitter.random()), 9) for b in (0.2, 0.4, 0.8, 1.6, 3.2, 5, 5, 5)
    ]
    assert backoff_waits(new(seed=7, ttl=40.0), 8) == expected
    assert new(seed=7).statistics.failures == 0


def test_the_backoff_cap_is_a_quarter_of_the_ttl_at_most_five_seconds() -> None:
    # Once Redis takes connections again, every node is back within a quarter of
    # the TTL of the others: none of their live users is taken for gone.
    assert new(ttl=0.3).backoff_cap == new(ttl=2.0).backoff_cap == MIN_BACKOFF_CAP == 0.5
    assert new(ttl=4.0).backoff_cap == 1.0
    assert new(ttl=15.0).backoff_cap == 3.75
    assert new(ttl=20.0).backoff_cap == BACKOFF_CAP == new(ttl=600.0).backoff_cap == 5.0
    jitter = random.Random(7)
    expected = [round(b * (0.5 + 0.5 * jitter.random()), 9) for b in (0.2, 0.4, 0.75, 0.75)]
    assert backoff_waits(new(seed=7, ttl=3.0), 4) == expected


def test_a_session_that_lasted_resets_the_backoff_and_a_short_one_does_not() -> None:
    jitter = random.Random(3)
    lasted = [round(BACKOFF_FIRST * (0.5 + 0.5 * jitter.random()), 9) for _ in range(3)]
    assert backoff_waits(new(seed=3), 3, online_for=BACKOFF_CAP + 0.01) == lasted
    jitter = random.Random(3)
    short = [round(b * (0.5 + 0.5 * jitter.random()), 9) for b in (0.2, 0.4, 0.8)]
    assert backoff_waits(new(seed=3, ttl=40.0), 3, online_for=BACKOFF_CAP - 0.01) == short


# --------------------------------------------------------------------------------------
# Keepalive, refresh, reread


def test_keepalive_is_an_eighth_of_the_ttl_at_most_five_seconds() -> None:
    assert new(ttl=0.3).keepalive == new(ttl=2.0).keepalive == 0.25
    assert new(ttl=3.0).keepalive == 0.375
    assert new(ttl=15.0).keepalive == 1.875
    assert new(ttl=40.0).keepalive == KEEPALIVE == new(ttl=600.0).keepalive


def test_a_redis_that_stalls_is_lost_before_any_entry_can_expire() -> None:
    """Nothing answered from 0 on (Redis paused): the session ends within a quarter of
    the TTL; an entry renewed just before expires a third of the TTL later at the
    soonest (lifetime two thirds, renewed every third)."""
    proto = new()
    online(proto)
    proto.take_commands()
    lost_at = None
    while lost_at is None:
        due = proto.get_timer()
        assert due is not None and due <= TTL
        proto.handle_timer(due)
        proto.take_commands()  # never answered
        if BackplaneLost() in proto.take_events():
            lost_at = due
    assert lost_at <= TTL / 4


def test_keepalive_pings_both_links_and_a_missing_answer_ends_the_session() -> None:
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    assert proto.get_timer() == TTL / 3  # the refresh (1 s) comes before the keepalive
    proto.handle_timer(TTL / 3)  # no local presence: the node's entry only (touch)
    touch = only(proto.take_commands(), Execute)
    assert [c[1] for c in touch.commands] == [SHAS["touch"]]
    assert touch.commands[0][3:] == ("rb:{@}:rooms", "rb:{@}:seen", "rb:{@}:nodes", 2000, "n1")
    proto.replies(touch.batch, [None], TTL / 3)
    proto.handle_timer(TTL / 3)  # the reread: no rooms
    assert proto.take_commands() == []
    assert proto.get_timer() == pytest.approx(2 * TTL / 3)
    now = KEEPALIVE
    proto.handle_timer(now)
    commands = proto.take_commands()
    ping = [c for c in commands if isinstance(c, Ping)]
    execute = [c for c in commands if isinstance(c, Execute)]
    assert len(ping) == 1 and len(execute) == 1
    assert execute[0].commands[0] == (b"PING",)  # (then the refresh's touch, due too)
    proto.confirmed(ping[0].batch, now + 0.01)
    proto.replies(execute[0].batch, [b"PONG"] + [None] * (len(execute[0].commands) - 1), now + 0.01)
    # The next round is answered by the subscriber only: the command link is overdue.
    now = 2 * KEEPALIVE
    while (due := proto.get_timer()) is not None and due < now:
        proto.handle_timer(due)
    proto.handle_timer(now)
    commands = proto.take_commands()
    ping = [c for c in commands if isinstance(c, Ping)]
    assert len(ping) == 1
    proto.confirmed(ping[0].batch, now + 0.01)
    while (due := proto.get_timer()) is not None and due < 3 * KEEPALIVE:
        proto.handle_timer(due)
    proto.handle_timer(3 * KEEPALIVE)
    assert CloseLinks() in proto.take_commands()
    assert proto.take_events() == [BackplaneLost()]
    assert proto.statistics.failures == 1 and not proto.statistics.online


def test_a_keepalive_checked_late_waits_one_more_round() -> None:
    """The timer came a round late (this node's loop was stalled, the answer may sit
    unread): not a lost Redis yet; still unanswered a round later, it is."""
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.handle_timer(KEEPALIVE)
    proto.take_commands()  # the pings: not answered
    proto.handle_timer(2.6 * KEEPALIVE)  # more than half a round late
    assert proto.phase is Phase.ONLINE and proto.take_commands() == []
    proto.handle_timer(3.5 * KEEPALIVE)  # a whole round more, not half
    assert proto.phase is Phase.ONLINE and proto.take_commands() == []
    proto.handle_timer(3.6 * KEEPALIVE)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]


def test_a_keepalive_checked_half_a_round_late_is_on_time() -> None:
    """Half a round late at most, the check counts: an unanswered ping ends the session."""
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.handle_timer(KEEPALIVE)
    proto.take_commands()  # the pings: not answered
    proto.handle_timer(2.5 * KEEPALIVE)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]


def test_keepalive_overdue_on_the_subscriber_ends_the_session() -> None:
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.handle_timer(KEEPALIVE)
    for command in proto.take_commands():
        if isinstance(command, Execute):
            proto.replies(command.batch, replies_to(command), KEEPALIVE)
    proto.handle_timer(2 * KEEPALIVE)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.phase is Phase.CLOSING


def test_the_keepalive_ping_goes_ahead_of_queued_work() -> None:
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.submit([relay()], 0.1)
    first = only(proto.take_commands(), Execute)
    proto.submit([relay(ref=2), relay(ref=3)], 0.2)
    assert proto.take_commands() == []  # one batch in flight
    proto.handle_timer(KEEPALIVE)
    proto.take_commands()
    proto.replies(first.batch, [1], KEEPALIVE)
    second = only(proto.take_commands(), Execute)
    # (the relays, and the refresh's touch of the node list, due at the same time)
    assert second.commands[0] == (b"PING",) and len(second.commands) == 4


def test_refresh_renews_the_local_members_every_third_of_the_ttl() -> None:
    proto = new(presence=[(R1, ["ann", "bob"])], keepalive=KEEPALIVE)
    online(proto)
    proto.handle_timer(TTL / 3)
    refresh = only(proto.take_commands(), Execute)
    command, touch = refresh.commands
    assert touch[:3] == ("EVALSHA", SHAS["touch"], 3) and touch[-2:] == ("n1", R1)
    assert command[:3] == ("EVALSHA", SHAS["refresh"], 5)
    assert command[-2:] == ("n1 ann", "n1 bob")
    assert command[9] == int(TTL * 2000 / 3)
    assert command[10] == 86_400_000  # the room's position lives on while it has members
    proto.replies(refresh.batch, [0, None], TTL / 3)
    assert proto.get_timer() == pytest.approx(2 * TTL / 3)


def test_presence_is_read_again_a_presence_ttl_after_connecting() -> None:
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.submit([Subscribe(room=R2, gen=4), Subscribe(room=R1, gen=2)], 0.0)
    listen = only(proto.take_commands(), Listen)
    proto.confirmed(listen.batch, 0.0)
    snap = only(proto.take_commands(), Execute)
    proto.replies(snap.batch, replies_to(snap), 0.0)
    proto.take_events()
    for k in (1, 2):  # refreshes only, until a TTL has passed
        proto.handle_timer(k * TTL / 3)
        touch = only(proto.take_commands(), Execute)  # the refresh: the node list
        proto.replies(touch.batch, [None], k * TTL / 3)
        assert proto.take_commands() == []
    proto.handle_timer(TTL)
    touch = only(proto.take_commands(), Execute)
    proto.replies(touch.batch, [None], TTL)
    again = only(proto.take_commands(), Listen)
    assert again.channels == (b"rb:{r1}:c", b"rb:{r2}:c")
    proto.confirmed(again.batch, TTL)
    snap = only(proto.take_commands(), Execute)
    proto.replies(snap.batch, replies_to(snap), TTL)
    assert [(e.room, e.gen) for e in proto.take_events()] == [(R1, 2), (R2, 4)]  # type: ignore[union-attr]
    proto.handle_timer(2 * TTL)  # only once per session
    assert all(not isinstance(c, Listen) for c in proto.take_commands())


def test_the_read_again_due_while_the_first_read_is_in_flight_is_a_read_of_its_own() -> None:
    """The broker's SETTLING waits for a read after the first one after reconnecting: a
    read-again due before the first snapshot is answered is still answered on its own,
    after it (tests/cluster/model.py's ``reread`` is this)."""
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    proto.submit([Subscribe(room=R1, gen=2)], 0.0)
    listen = only(proto.take_commands(), Listen)
    for t in (TTL / 3, 2 * TTL / 3, TTL):  # the refreshes and the read-again: queued
        proto.handle_timer(t)
    assert proto.take_commands() == []
    proto.confirmed(listen.batch, TTL)
    snap = only(proto.take_commands(), Execute)
    proto.replies(snap.batch, replies_to(snap), TTL)
    first = proto.take_events()
    assert [(e.room, e.gen) for e in first] == [(R1, 2)]  # type: ignore[union-attr]
    touch = only(proto.take_commands(), Execute)  # the refreshes: the node list
    proto.replies(touch.batch, [None] * len(touch.commands), TTL)
    again = only(proto.take_commands(), Listen)
    assert again.channels == (b"rb:{r1}:c",)
    proto.confirmed(again.batch, TTL)
    snap = only(proto.take_commands(), Execute)
    proto.replies(snap.batch, replies_to(snap), TTL)
    assert [(e.room, e.gen) for e in proto.take_events()] == [(R1, 2)]  # type: ignore[union-attr]


def test_the_read_again_is_a_read_of_its_own_even_if_the_first_is_still_queued() -> None:
    """A room whose first read is still waiting (a batch in flight ahead of it) when the
    read-again is due is read twice: two Subscribes in a row would be one read, and the
    broker would stay SETTLING (holding expiries) with no read to end it."""
    proto = new(keepalive=KEEPALIVE)
    online(proto)
    for t in (TTL / 3 + 0.1, 2 * TTL / 3 + 0.1):  # refreshes a little late: the next
        proto.handle_timer(t)  # is due after the read-again
        for command in proto.take_commands():
            assert isinstance(command, Execute)
            proto.replies(command.batch, replies_to(command), t)
    proto.submit([relay()], 0.9 * TTL)
    first = only(proto.take_commands(), Execute)  # in flight
    proto.submit([Subscribe(room=R1, gen=2)], 0.9 * TTL)  # queued behind it
    assert proto.get_timer() == TTL
    proto.handle_timer(TTL)  # the read-again, queued behind the first
    proto.replies(first.batch, [1], TTL)
    reads = 0
    for _ in range(10):
        for command in proto.take_commands():
            if isinstance(command, Listen):
                assert command.channels == (b"rb:{r1}:c",)
                proto.confirmed(command.batch, TTL)
            elif isinstance(command, Execute):
                reads += sum(1 for c in command.commands if c[1] == SHAS["snapshot"])
                proto.replies(command.batch, replies_to(command), TTL)
    assert reads == 2


# --------------------------------------------------------------------------------------
# Work


def test_offline_submits_are_dropped_and_counted() -> None:
    proto = new()
    proto.submit([relay(), announce(), Subscribe(room=R1, gen=1), Unsubscribe(room=R1)], 0.0)
    assert proto.statistics.dropped == 2
    assert proto.take_commands() == [] and proto.idle
    proto.start(0.0)
    proto.take_commands()
    proto.submit([relay()], 0.0)  # connecting is not online
    assert proto.statistics.dropped == 3 and proto.take_commands() == []


def test_work_queued_when_the_session_ends_is_dropped_and_counted() -> None:
    proto = new()
    online(proto)
    proto.submit([relay()], 0.0)
    proto.take_commands()
    proto.submit([relay(ref=2), announce(), Subscribe(room=R1, gen=1)], 0.0)
    assert not proto.idle
    proto.link_failed(Link.SUBSCRIBER, "EOF", 1.0)
    assert proto.statistics.dropped == 2 and proto.statistics.relayed == 1
    assert proto.idle


def test_an_error_reply_ends_the_session() -> None:
    proto = new()
    online(proto)
    proto.submit([relay(), relay(ref=2)], 0.0)
    execute = only(proto.take_commands(), Execute)
    proto.replies(execute.batch, [1, RedisError("NOSCRIPT No matching script")], 0.5)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]
    stats = proto.statistics
    assert (stats.errors, stats.failures, stats.online) == (1, 1, False)


def test_a_batch_runs_up_to_the_next_subscribe_and_subscribes_are_deduplicated() -> None:
    proto = new()
    online(proto)
    work = [
        relay(),
        announce(),
        Unsubscribe(room=R2),
        Subscribe(room=R1, gen=1),
        Subscribe(room=R2, gen=1),
        Subscribe(room=R1, gen=2),
        relay(ref=2),
    ]
    proto.submit(work, 0.0)
    first = proto.take_commands()
    assert len(first) == 1  # R2's Unsubscribe is superseded by the Subscribe after it
    execute = only(first, Execute)
    # a join's announce also lists the room in the room index (touch)
    assert [c[1] for c in execute.commands] == [SHAS["relay"], SHAS["announce"], SHAS["touch"]]
    proto.replies(execute.batch, [1, 1, None], 0.0)
    listen = only(proto.take_commands(), Listen)
    assert listen.verb == b"SSUBSCRIBE"
    assert listen.channels == (b"rb:{r1}:c", b"rb:{r2}:c")
    assert proto.take_events() == []
    proto.confirmed(listen.batch, 0.0)  # listened first, then the snapshots
    snap = only(proto.take_commands(), Execute)
    assert [c[1] for c in snap.commands] == [SHAS["snapshot"]] * 2
    proto.replies(snap.batch, [[3, [b"n2 bob"], b"E1", 7], [0, [], b"E2", 0]], 0.0)
    assert proto.take_events() == [
        RoomSynced(room=R1, version=3, entries=(("n2", "bob"),), gen=2, epoch="E1", seq=7),
        RoomSynced(room=R2, version=0, entries=(), gen=1, epoch="E2", seq=0),
    ]
    last = only(proto.take_commands(), Execute)
    assert last.commands[0][1] == SHAS["relay"] and last.commands[0][8] == 2
    assert proto.statistics.relayed == 2
    proto.replies(last.batch, [2], 0.0)
    assert proto.idle


def test_work_submitted_before_the_commands_are_taken_is_one_batch() -> None:
    proto = new()
    online(proto)
    proto.submit([relay()], 0.0)
    proto.submit([relay(ref=2), announce()], 0.1)
    assert not proto.idle
    execute = only(proto.take_commands(), Execute)
    assert [c[1] for c in execute.commands] == [
        SHAS["relay"],
        SHAS["relay"],
        SHAS["announce"],
        SHAS["touch"],
    ]
    proto.link_failed(Link.COMMAND, "EOF", 0.2)
    proto.take_commands()
    assert proto.take_events() == [BackplaneLost()]
    proto.links_closed(0.2)
    proto.handle_timer(1.0)
    assert only(proto.take_commands(), OpenLink).link is Link.COMMAND
    online(proto, 1.0)
    proto.submit([relay(ref=3)], 1.0)
    proto.link_failed(Link.COMMAND, "EOF", 1.0)  # before the batch was taken: dropped
    assert proto.take_commands() == [CloseLinks()]
    assert proto.statistics.dropped == 1


def test_an_unsubscribe_not_superseded_stops_listening_with_the_batch() -> None:
    proto = new()
    online(proto)
    proto.submit([Unsubscribe(room=R2), Unsubscribe(room=R1), relay()], 0.0)
    commands = proto.take_commands()
    assert commands[0] == Unlisten(b"SUNSUBSCRIBE", (b"rb:{r1}:c", b"rb:{r2}:c"))
    assert isinstance(commands[1], Execute)
    proto.submit([Unsubscribe(room=R1)], 0.0)
    proto.replies(commands[1].batch, [1], 0.0)
    assert proto.take_commands() == [Unlisten(b"SUNSUBSCRIBE", (b"rb:{r1}:c",))]
    assert proto.idle


def test_an_unreadable_snapshot_ends_the_session() -> None:
    proto = new()
    online(proto)
    proto.submit([Subscribe(room=R1, gen=1)], 0.0)
    proto.confirmed(only(proto.take_commands(), Listen).batch, 0.0)
    snap = only(proto.take_commands(), Execute)
    proto.replies(snap.batch, [b"garbage"], 0.0)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]


def test_messages_become_records_one_call_per_burst() -> None:
    proto = new()
    proto.messages([(b"rb:{r1}:c", b"x")], 0.0)  # not online: ignored
    assert proto.take_events() == []
    online(proto)
    burst = [(b"rb:{r1}:c", b"m 1 n2 1 a"), (b"other", b"?"), (b"rb:{r2}:c", b"j 1 n2 bob")]
    proto.messages(burst, 0.0)
    proto.messages(burst[:1], 0.0)
    assert proto.take_events() == [
        RecordReceived(room=R1, data=b"m 1 n2 1 a"),
        RecordReceived(room=R2, data=b"j 1 n2 bob"),
        RecordReceived(room=R1, data=b"m 1 n2 1 a"),
    ]
    assert proto.statistics.received == 3


def test_stale_answers_are_ignored() -> None:
    proto = new()
    online(proto)
    proto.submit([relay()], 0.0)
    execute = only(proto.take_commands(), Execute)
    proto.replies(execute.batch - 1, [1], 0.0)
    proto.confirmed(execute.batch, 0.0)  # not a Listen or a Ping
    assert not proto.idle and proto.take_commands() == []
    proto.replies(execute.batch, [1], 0.0)
    assert proto.idle


# --------------------------------------------------------------------------------------
# Stopping


def test_stop_writes_the_queued_goodbyes_then_closes() -> None:
    proto = new()
    online(proto)
    proto.submit([relay()], 0.0)
    first = only(proto.take_commands(), Execute)
    proto.stop(1.0)
    assert proto.take_commands() == [] and not proto.idle
    proto.submit([announce(present=False)], 1.0)  # the goodbyes come after stop()
    proto.replies(first.batch, [1], 1.0)
    bye = only(proto.take_commands(), Execute)
    assert bye.commands[0][1] == SHAS["announce"]
    proto.replies(bye.batch, [1], 1.0)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == []  # a stop is no loss
    proto.submit([relay()], 1.0)
    assert proto.statistics.dropped == 1
    proto.links_closed(1.0)
    assert proto.phase is Phase.STOPPED and proto.get_timer() is None
    assert proto.statistics.failures == 0 and not proto.statistics.online


def test_stop_when_idle_or_down_is_at_once() -> None:
    proto = new()
    online(proto)
    proto.stop(0.0)
    assert proto.take_commands() == [CloseLinks()]
    proto = new()
    proto.stop(0.0)
    assert proto.phase is Phase.STOPPED and proto.take_commands() == []
    proto = reach("DOWN")
    proto.stop(0.0)
    assert proto.phase is Phase.STOPPED and proto.get_timer() is None


def test_abort_drops_the_queue_and_closes_at_once() -> None:
    proto = new()
    online(proto)
    proto.submit([relay()], 0.0)
    proto.take_commands()
    proto.submit([relay(ref=2), announce()], 0.0)
    proto.abort(0.0)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.statistics.dropped == 2 and proto.idle
    proto.links_closed(0.0)
    assert proto.phase is Phase.STOPPED


# --------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("url", "http://x", "redis"),
        ("url", "rediss://x:0", "redis"),
        ("tls_ca_file", "ca.pem", "redis-ca"),  # with redis://
        ("tls_server_name", "x", "redis-server-name"),
        ("url", None, "redis"),
        ("node_id", "has space", "node-id"),
        ("node_id", "", "node-id"),
        ("node_id", "x" * 65, "node-id"),
        ("presence_ttl", 0.1, "presence-ttl"),
        ("presence_ttl", True, "presence-ttl"),
        ("presence_ttl", "15", "presence-ttl"),
        ("presence_ttl", float("inf"), "presence-ttl"),
        ("prefix", "a b", "redis-prefix"),
        ("prefix", "", "redis-prefix"),
        ("connect_timeout", 0, "redis-connect-timeout"),
        ("connect_timeout", 3601, "redis-connect-timeout"),
        ("connect_timeout", float("nan"), "redis-connect-timeout"),
    ],
)
def test_bad_settings_are_config_errors(field: str, value: object, option: str) -> None:
    kwargs: dict[str, Any] = {"url": "redis://localhost", "node_id": "n1"}
    kwargs[field] = value
    with pytest.raises(ConfigError) as info:
        ClusterConfig(**kwargs)
    assert str(info.value).startswith(f"{option}:")


def test_the_config_keeps_its_settings_and_parses_the_url() -> None:
    config = ClusterConfig(url="redis://:pw@127.0.0.1:6390/2", presence_ttl=3, connect_timeout=1)
    assert (config.address.host, config.address.port, config.address.db) == ("127.0.0.1", 6390, 2)
    assert config.presence_ttl == 3.0 and type(config.presence_ttl) is float
    assert (config.node_id, config.prefix, config.connect_timeout) == (None, "roombus", 1.0)
    assert "pw" not in repr(config)


def test_the_protocol_needs_a_node_id() -> None:
    with pytest.raises(ConfigError, match=r"^node-id: must be set"):
        BackplaneProtocol(ClusterConfig(url="redis://localhost"), local_presence=list)


# --------------------------------------------------------------------------------------
# Random interleavings


ROOMS = st.sampled_from([R1, R2, RoomName("r3")])
ACTIONS = st.one_of(
    st.builds(relay, ROOMS, st.integers(1, 9)),
    st.builds(announce, ROOMS, st.sampled_from(["ann", "bob"]), st.booleans()),
    st.builds(Subscribe, room=ROOMS, gen=st.integers(1, 5)),
    st.builds(Unsubscribe, room=ROOMS),
)


class ProtocolMachine(RuleBasedStateMachine):
    """A driver and a Redis that answer in any order the links allow, and fail."""

    @initialize(seed=st.integers(0, 2**16), connected=st.booleans())
    def setup(self, seed: int, connected: bool) -> None:
        self.now = 0.0
        self.proto = new(presence=[(R1, ["ann"])], seed=seed)
        self.opening: list[Link] = []
        self.executes: list[Execute] = []
        self.sub_requests: list[Listen | Ping] = []
        self.closing = False
        self.submitted = 0  # Relays and Announces
        self.announced = 0  # Announces sent
        self.lost_restored: list[str] = []
        self.stopped_seen = False
        self.steps = 0
        if connected:  # most runs: start from a session, so that ONLINE is well explored
            online(self.proto)
            self.lost_restored.append("BackplaneRestored")

    def collect(self) -> None:
        self.steps += 1
        proto = self.proto
        commands, events = proto.take_commands(), proto.take_events()
        if self.stopped_seen:
            assert commands == [] and events == [], (commands, events)
        for command in commands:
            if isinstance(command, OpenLink):
                assert not self.closing
                self.opening.append(command.link)
            elif isinstance(command, CloseLinks):
                assert not self.closing
                self.closing = True
                self.opening.clear()
                self.executes.clear()
                self.sub_requests.clear()
            elif isinstance(command, Execute):
                assert not self.executes, "two Execute batches in flight"
                self.executes.append(command)
                self.announced += sum(
                    c[:2] == ("EVALSHA", SHAS["announce"]) for c in command.commands
                )
            elif isinstance(command, (Listen, Ping)):
                self.sub_requests.append(command)
        for event in events:
            if isinstance(event, (BackplaneLost, BackplaneRestored)):
                kind = type(event).__name__
                expected = (
                    "BackplaneLost"
                    if self.lost_restored[-1:] == ["BackplaneRestored"]
                    else "BackplaneRestored"
                )
                assert kind == expected, [*self.lost_restored, kind]
                self.lost_restored.append(kind)
            else:
                assert isinstance(event, (RecordReceived, RoomSynced))
        if proto.phase is Phase.STOPPED:
            self.stopped_seen = True
        if any(isinstance(e, RoomSynced) for e in events):
            note_event("RoomSynced")
        if any(isinstance(c, Ping) for c in commands):
            note_event("keepalive")
        note_event(f"phase {proto.phase.name}")

    @rule()
    def start(self) -> None:
        self.proto.start(self.now)
        self.collect()

    @rule(work=st.lists(ACTIONS, max_size=4))
    def submit(self, work: list[Any]) -> None:
        self.submitted += sum(isinstance(a, (Relay, Announce)) for a in work)
        self.proto.submit(work, self.now)
        self.collect()

    @precondition(lambda self: bool(self.opening))
    @rule(ok=st.booleans())
    def open_link(self, ok: bool) -> None:
        link = self.opening.pop(0)
        if ok:
            self.proto.link_opened(link, self.now)
        else:
            self.proto.link_failed(link, "refused", self.now)
        self.collect()

    @precondition(lambda self: bool(self.executes))
    @rule(error=st.booleans(), data=st.data())
    def answer_execute(self, error: bool, data: st.DataObject) -> None:
        execute = self.executes.pop()
        replies = replies_to(execute)
        if error:
            replies[data.draw(st.integers(0, len(replies) - 1))] = RedisError("ERR no")
        self.proto.replies(execute.batch, replies, self.now)
        self.collect()

    @precondition(lambda self: bool(self.sub_requests))
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        # The subscriber answers in order.
        request = self.sub_requests.pop(0)
        self.proto.confirmed(request.batch, self.now)
        self.collect()

    @rule(link=st.sampled_from(Link), really=st.integers(0, 3))
    def fail(self, link: Link, really: int) -> None:
        if really:  # rarer than the answers, so that sessions last
            return
        self.proto.link_failed(link, "EOF", self.now)
        self.collect()

    @precondition(lambda self: self.closing)
    @rule()
    def close(self) -> None:
        self.closing = False
        self.proto.links_closed(self.now)
        self.collect()

    @rule(dt=st.floats(0.0, 6.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        due = self.proto.get_timer()
        if due is not None and due <= self.now:
            self.proto.handle_timer(self.now)
            after = self.proto.get_timer()
            assert after is None or after > self.now, (self.proto.phase, after, self.now)
        self.collect()

    @rule(room=ROOMS)
    def message(self, room: RoomName) -> None:
        self.proto.messages([(channel("rb", room).encode(), b"m 1 n2 1 x")], self.now)
        self.collect()

    @precondition(lambda self: self.steps >= 25)
    @rule(abort=st.booleans())
    def stop(self, abort: bool) -> None:
        (self.proto.abort if abort else self.proto.stop)(self.now)
        self.collect()

    @invariant()
    def counted(self) -> None:
        if not hasattr(self, "proto"):
            return
        proto = self.proto
        stats = proto.statistics
        queued = sum(isinstance(a, (Relay, Announce)) for a in proto._work)
        relays_sent = stats.relayed
        assert self.submitted == relays_sent + self.announced + stats.dropped + queued
        assert stats.online == (proto.phase is Phase.ONLINE)
        if proto.idle:
            assert not self.executes
        if proto.phase is Phase.STOPPED:
            assert proto.get_timer() is None and proto.idle


ProtocolMachine.TestCase.settings = settings(
    max_examples=3 * settings.default.max_examples, stateful_step_count=60
)
TestProtocolMachine = ProtocolMachine.TestCase


def test_the_session_s_run_id_goes_into_every_stream_command() -> None:
    proto = new()
    online(proto)
    proto.submit(
        [
            Subscribe(room=R1, gen=1),
        ],
        0.0,
    )
    listen = only(proto.take_commands(), Listen)
    proto.confirmed(listen.batch, 0.0)
    snap = only(proto.take_commands(), Execute)
    assert snap.commands[0][-1] == "0a1b2c"  # snapshot: its last argument
    proto.replies(snap.batch, [[0, [], b"E1", 0]], 0.0)
    proto.take_events()
    read = ReadStream(room=R1, ticket=1, after=0, count=1, keep=1, keep_ms=1)
    proto.submit([relay(), read], 0.0)
    work = only(proto.take_commands(), Execute)
    assert [c[-1] for c in work.commands] == ["0a1b2c", "0a1b2c"]
    proto.replies(work.batch, [[1, b"E1", 0], [b"E1", 1, 1, [1, b"{"]]], 0.0)
    assert proto.take_events() == [
        StreamRead(room=R1, ticket=1, epoch="E1", top=1, first_kept=1, entries=((1, b"{"),))
    ]


def test_an_unreadable_answer_ends_the_session() -> None:
    proto = new()
    online(proto)
    read = ReadStream(room=R1, ticket=1, after=0, count=1, keep=1, keep_ms=1)
    proto.submit([read], 0.0)
    work = only(proto.take_commands(), Execute)
    proto.replies(work.batch, [[b"E1", b"x", 1, []]], 0.0)
    assert proto.take_commands() == [CloseLinks()]
    assert proto.take_events() == [BackplaneLost()]


def test_run_id_of_an_info_reply() -> None:
    from roombus.cluster.resp import run_id_from_info

    assert run_id_from_info(INFO) == "0a1b2c"
    assert run_id_from_info(b"# Server\r\nredis_version:6\r\n") == ""
    assert run_id_from_info(RedisError("ERR")) == ""


def test_control_commands_are_published_and_the_control_channel_s_messages_come_back() -> None:
    proto = new()
    online(proto)
    command = KickCommand(room=R1, username=Username("ann"), reason="out")
    proto.submit([Control(command=command), relay()], 0.0)
    execute = only(proto.take_commands(), Execute)
    assert execute.commands[0] == ("SPUBLISH", "rb:ctl", encode_control("n1", command))
    proto.replies(execute.batch, [1, [1, b"E1", 0]], 0.0)
    data = encode_control("n2", DisconnectCommand(username="bob", code=4000, reason="x"))
    proto.messages([(b"rb:ctl", data), (b"rb:{r1}:c", b"j 1 n2 bob"), (b"other:ctl", data)], 0.0)
    assert proto.take_events() == [
        ControlReceived(data=data),
        RecordReceived(room=R1, data=b"j 1 n2 bob"),
    ]
