"""
The drain of ``roombus serve`` on SIGTERM, over loopback, on each transport of the
command line: ``/healthz`` turns 503 at once and new WebSockets are refused, the open
ones are closed with 1001 spread over ``--drain-seconds``, and the process exits 0
after; a second signal closes the rest at once.
"""

from __future__ import annotations

import signal
import threading
import time

from .conftest import Client, open_client
from .rawws import get, http_exchange, upgrade_request

CLIENTS = 20
WINDOW = 2.0  # --drain-seconds
CLOSE_TIMEOUT = 2.0
SLACK = 1.0  # loopback and scheduling, under a loaded machine


class Watcher:
    """Reads a client until the server closes it: when, with what code and reason."""

    def __init__(self, client: Client, timeout: float) -> None:
        self.client = client
        self.at: float | None = None
        self.code: int | None = None
        self.reason = ""
        self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self._thread.start()

    def _run(self, timeout: float) -> None:
        closed = self.client.until_closed(timeout)
        self.at = time.monotonic()
        if closed.rcvd is not None:
            self.code, self.reason = closed.rcvd.code, closed.rcvd.reason

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.client.username} was never closed"


def wait_for_status(port: int, status: int, bound: float) -> float:
    """Poll ``/healthz`` until it answers *status*; returns how long that took."""
    t0 = time.monotonic()
    while True:
        answer = get(port, "/healthz")
        if answer.status == status:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < bound, f"/healthz still {answer.status}"
        time.sleep(0.01)


def test_sigterm_drains_over_the_window_then_exits_0(cli):
    proc = cli("--port", "0", "--drain-seconds", str(WINDOW), "--close-timeout", str(CLOSE_TIMEOUT))
    port = proc.wait_listening()
    health = get(port, "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    clients = [open_client(port, "lobby", f"u{i}", expect_join=None) for i in range(CLIENTS)]
    try:
        watchers = [Watcher(c, timeout=WINDOW + CLOSE_TIMEOUT + 10) for c in clients]
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        # 1. At once: the load balancer's probe fails, and so does a new client.
        assert wait_for_status(port, 503, bound=1.0) < 0.5
        assert get(port, "/healthz").body == b"draining\n"
        refused = http_exchange(port, upgrade_request("/ws?room=lobby&username=late"))
        assert refused.status == 503
        assert refused.headers.get("retry-after") == "5"
        # 2. The closes: 1001, spread over the window, the last within it.
        for w in watchers:
            w.join(WINDOW + CLOSE_TIMEOUT + 10)
        assert [(w.code, w.reason) for w in watchers] == [(1001, "server draining")] * CLIENTS
        times = sorted(w.at - t0 for w in watchers if w.at is not None)
        assert times[0] < WINDOW / 2, times
        assert times[-1] <= WINDOW + SLACK, times
        assert times[-1] - times[0] > 0.1, times  # not all in the same 100 ms
        assert times[-1] - times[0] > WINDOW / 2, times
        # No more than a fair share in any half second (+ slack for scheduling).
        for i, start in enumerate(times):
            assert sum(1 for t in times[i:] if t < start + 0.5) <= CLIENTS / 4 + 4, times
        # 3. Then the process stops.
        assert proc.wait(WINDOW + CLOSE_TIMEOUT + 5) == 0
    finally:
        for c in clients:
            c.close()
    assert time.monotonic() - t0 < WINDOW + CLOSE_TIMEOUT + 5
    assert "SIGTERM received: draining" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_signal_during_the_drain_closes_the_rest_at_once(cli):
    proc = cli("--port", "0", "--drain-seconds", "60", "--close-timeout", str(CLOSE_TIMEOUT))
    port = proc.wait_listening()
    clients = [open_client(port, "lobby", f"u{i}", expect_join=None) for i in range(5)]
    try:
        watchers = [Watcher(c, timeout=30) for c in clients]
        proc.signal(signal.SIGTERM)
        wait_for_status(port, 503, bound=2.0)
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        for w in watchers:
            w.join(CLOSE_TIMEOUT + 10)
        assert all(w.code == 1001 for w in watchers)
        assert all(w.at is not None and w.at - t0 < SLACK for w in watchers)
        assert proc.wait(CLOSE_TIMEOUT + 5) == 0
        assert time.monotonic() - t0 < CLOSE_TIMEOUT + 2
    finally:
        for c in clients:
            c.close()
    assert "closing the remaining connections now" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_with_no_client_exits_at_once(cli):
    proc = cli("--port", "0", "--drain-seconds", "30")
    proc.wait_listening()
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - t0 < 3  # nothing to drain: no wait for the window
