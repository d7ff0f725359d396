"""
The hub's connection phases: one table (``roombus.server.hub.PHASES``), applied by one
method (``HubBase._set_phase``). Every row is reached by a hub input, nothing outside
it is ever applied, and docs/design.md carries the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection

from roombus import BrokerConfig, ServerConfig
from roombus.core.errors import LocalProtocolError
from roombus.hub import Hub
from roombus.server import hub as _hub

from .test_hub import connect, written

ROOT = Path(__file__).resolve().parents[2]

#: Written out by hand, not derived from the table (a test made from the table would
#: agree with any mistake in it).
EXPECTED = {
    ("handshake", "upgrade"): "open",
    ("handshake", "finish"): "finishing",
    ("handshake", "drop"): "dropped",
    ("open", "close"): "closing",
    ("open", "finish"): "finishing",
    ("closing", "finish"): "finishing",
    ("closing", "drop"): "dropped",
    ("finishing", "drop"): "dropped",
}


def render_phases() -> str:
    """The table as docs/design.md shows it."""
    rows = ["| phase | step | next phase |", "| --- | --- | --- |"]
    for (phase, step), after in _hub.PHASES.items():
        rows.append(f"| {phase.name} | {step.name} | {after.name} |")
    return "\n".join(rows)


def test_the_table_is_the_one_written_down() -> None:
    got = {(p.value, s.value): n.value for (p, s), n in _hub.PHASES.items()}
    assert got == EXPECTED


def test_design_doc_has_the_phase_table() -> None:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert render_phases() in text, (
        "docs/design.md: paste render_phases() under 'Connection phases'"
    )


def test_a_move_outside_the_table_raises() -> None:
    hub = Hub(BrokerConfig(), ServerConfig())
    cid = hub.open(now=0.0)
    conn = hub._conns[cid]
    with pytest.raises(LocalProtocolError, match="no move from HANDSHAKE by CLOSE"):
        hub._set_phase(conn, _hub._Step.CLOSE)
    assert conn.phase is _hub._Phase.HANDSHAKE


def _close(hub: Hub, cid: int, now: float) -> None:
    client = Connection(ConnectionType.CLIENT)
    hub.receive(cid, client.send(CloseConnection(code=1000)), now=now, timestamp=0)


def test_every_row_is_reached_by_a_hub_input(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: set[tuple[str, str]] = set()
    apply = _hub.HubBase._set_phase

    def recording(self: _hub.HubBase, conn: object, step: _hub._Step) -> None:
        seen.add((conn.phase.value, step.value))  # type: ignore[attr-defined]
        apply(self, conn, step)  # type: ignore[arg-type]

    monkeypatch.setattr(_hub.HubBase, "_set_phase", recording)
    config = BrokerConfig(ping_interval=1, ping_timeout=1)
    hub = Hub(config, ServerConfig(handshake_timeout=5, close_timeout=2))

    # handshake -> open -> finishing -> dropped: a client that closes.
    ann = connect(hub, "lobby", "ann")
    written(hub)
    _close(hub, ann, 0.1)
    written(hub)  # all written: dropped
    # handshake -> finishing: a plain HTTP answer.
    probe = hub.open(now=0.0)
    hub.receive(probe, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    written(hub)
    # handshake -> dropped: the handshake timeout.
    hub.open(now=0.0)
    # open -> closing -> finishing: our close (a ping timeout), answered.
    bob = connect(hub, "lobby", "bob")
    # open -> closing -> dropped: our close, never answered.
    cat = connect(hub, "lobby", "cat")
    written(hub)
    hub.timeout(now=1.0, timestamp=0)  # pings
    hub.timeout(now=2.0, timestamp=0)  # no pongs: both closed with 1011
    written(hub)
    _close(hub, bob, 2.1)
    hub.timeout(now=5.5, timestamp=0)  # the handshake timeout; cat's close timeout
    assert seen == set(EXPECTED)
    assert {ann, probe, bob, cat} <= set(hub.take_to_close())
