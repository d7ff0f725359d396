"""
Browser fixtures: the chat page (``/``, on ``/roombus.js``) in a real headless Chromium,
against real servers in subprocesses.

- ``chromium``: one browser for the session (:mod:`.cdp`); a missing ``/usr/bin/chromium``
  fails the tests, never skips them (``.ci/run`` installs it).
- ``pages``: opens the chat page as a person would (``/?room=R&username=U&autoconnect=1``)
  in a tab of its own, as :class:`ChatPage`, which reads what the page shows from its
  data attributes; at teardown each tab's final state is saved as a PNG into
  ``artifacts`` and the tab must have thrown no uncaught exception.
- ``servers``: ``roombus serve`` (trio, asyncio) or ``uvicorn --factory
  roombus.asgi:create_app``, as the end-to-end suite starts them; ended by PID.
- ``links``: :class:`Link`, a loopback TCP proxy in front of a server, which is what a
  page and the publisher connect through: it can be pointed at another server (the
  load balancer of a cluster, or a restarted server), hold new connections off (a
  client that is offline) and cut the ones it carries.
- :class:`Publisher`: the Python client (``roombus.client``) publishing numbered
  messages from a thread of its own until told to stop.

``ROOMBUS_ARTIFACTS`` names the screenshots' directory (default: ``browser-artifacts``
under pytest's base temporary directory); the path is printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

import roombus.client as rc
from tests.e2e.conftest import CliServer
from tests.e2e.test_asgi_servers import SERVER_COMMANDS, Served
from tests.e2e.test_cluster_nodes import metric, wait_for
from tests.redis.conftest import RedisProcess, start_redis

from .cdp import HOST, CDPError, Chromium, Tab

ROOM = "lobby"
#: The publisher reconnects promptly: the faults are the test's, not its backoff.
FAST = rc.ClientOptions(backoff_initial=0.2, backoff_max=1.0, ping_interval=5.0, ping_timeout=2.0)

_artifact_dirs: list[Path] = []


# -- artifacts ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$ROOMBUS_ARTIFACTS``, or a folder under pytest's base temp."""
    chosen = os.environ.get("ROOMBUS_ARTIFACTS")
    path = Path(chosen) if chosen else tmp_path_factory.getbasetemp() / "browser-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    _artifact_dirs.append(path)
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for path in _artifact_dirs:
        shots = sorted(p.name for p in path.glob("*.png"))
        terminalreporter.write_line(f"browser artifacts ({len(shots)} screenshots): {path}")


def artifact_name(request: pytest.FixtureRequest, suffix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{request.node.name}-{suffix}").strip("-") + ".png"


# -- the browser ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium(artifacts: Path) -> Iterator[Chromium]:
    browser = Chromium(artifacts)
    try:
        yield browser
    finally:
        browser.close()


#: One snapshot of what the chat page shows, read from its data attributes.
SNAPSHOT_JS = """(() => {
  const $ = (s) => document.querySelector(s);
  const all = (s) => [...document.querySelectorAll(s)];
  const pill = $("#state");
  return {
    view: document.body?.dataset.view,
    state: pill ? pill.dataset.state : null,
    pill: pill ? pill.textContent : null,
    joins: Number($("#messages")?.dataset.joins || 0),
    people: all("#people li").map((li) => li.dataset.username),
    items: all("#messages > li").map((li) => ({
      kind: li.dataset.kind, note: li.dataset.note || null, reason: li.dataset.reason || null,
      room: li.dataset.room || null, username: li.dataset.username || null,
      epoch: li.dataset.epoch || null, seq: li.dataset.seq ? Number(li.dataset.seq) : null,
      text: li.dataset.kind === "message" ? li.querySelector(".text").textContent : li.textContent,
    })),
    outbox: all("#outbox > li").map((li) => ({
      status: li.dataset.status, text: li.querySelector(".text").textContent,
      greyed: getComputedStyle(li.querySelector(".bubble")).borderStyle === "dashed",
    })),
  };
})()"""


class ChatPage:
    """The chat page in one tab, read through its stable ids and data attributes."""

    def __init__(self, tab: Tab, link: Link, username: str, room: str = ROOM) -> None:
        self.tab = tab
        self.link = link
        self.username = username
        self.room = room

    @property
    def url(self) -> str:
        query = urlencode({"room": self.room, "username": self.username, "autoconnect": "1"})
        return f"http://{HOST}:{self.link.port}/?{query}"

    def load(self) -> None:
        self.tab.goto(self.url)
        self.tab.wait("document.body?.dataset.view === 'chat'", "showing the chat")

    def reload(self) -> None:
        self.tab.js("window.beforeReload = true")  # the test's mark: gone with the document
        self.tab.session.call("Page.reload")
        self.tab.wait(
            "!window.beforeReload && document.readyState === 'complete'"
            " && document.body?.dataset.view === 'chat'",
            "reloaded",
        )

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = self.tab.js(SNAPSHOT_JS)
        return snap

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 15.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        snap: dict[str, Any] = {}
        while True:
            with contextlib.suppress(CDPError):  # a navigation replaced the document
                snap = self.snapshot()
                if predicate(snap):
                    return snap
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.username}'s page: not {what} within {timeout} s; it shows "
                    f"{json.dumps(snap, indent=1)[-4000:]}\npage errors: {self.tab.exceptions()}"
                )
            time.sleep(0.05)

    def wait_state(self, state: str, timeout: float = 15.0) -> dict[str, Any]:
        return self.wait_for(lambda s: s["state"] == state, f"{state!r}", timeout)

    def wait_people(self, *users: str, timeout: float = 15.0) -> dict[str, Any]:
        return self.wait_for(
            lambda s: set(users) <= set(s["people"]), f"showing {users} online", timeout
        )

    def say(self, text: str) -> None:
        """Type into the composer and press Enter, as a person does."""
        self.tab.js("document.getElementById('text').focus()")
        self.tab.type(text)
        self.tab.press_enter()

    def messages(self, snap: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        snap = snap if snap is not None else self.snapshot()
        return [i for i in snap["items"] if i["kind"] == "message"]

    def texts(self, snap: dict[str, Any] | None = None) -> list[tuple[str, str]]:
        return [(m["username"], m["text"]) for m in self.messages(snap)]

    def wait_message(self, username: str, text: str, timeout: float = 15.0) -> dict[str, Any]:
        return self.wait_for(
            lambda s: (username, text) in self.texts(s), f"showing {username}: {text!r}", timeout
        )

    def notes(self, snap: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        snap = snap if snap is not None else self.snapshot()
        return [i for i in snap["items"] if i["kind"] == "note" and i["note"] != "presence"]


@pytest.fixture
def pages(
    chromium: Chromium, artifacts: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ChatPage]]:
    """A factory: ``pages(link, "ann")`` opens ann's chat page through *link*, loaded."""
    opened: list[ChatPage] = []

    def open_page(
        link: Link, username: str, width: int = 1100, height: int = 720, load: bool = True
    ) -> ChatPage:
        page = ChatPage(chromium.open(username, width, height), link, username)
        opened.append(page)
        if load:
            page.load()
        return page

    try:
        yield open_page
        for page in opened:  # the test passed: its pages threw nothing either
            page.tab.js("0")  # reads what the page reported meanwhile
            assert not page.tab.exceptions(), f"{page.username}'s page threw"
    finally:
        for page in opened:  # all before any tab closes (a closed tab leaves the room)
            with contextlib.suppress(Exception):  # the final state, even of a failure
                page.tab.screenshot(artifacts / artifact_name(request, page.username), "#scroller")
        for page in opened:
            page.tab.close()


# -- the network between the clients and the servers ------------------------------------------


class Link:
    """A loopback TCP proxy to a server port, which the test can re-point, hold and cut."""

    def __init__(self, target: int) -> None:
        self.target = target  # new connections go here
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.port = 0
        self._listen()

    def _listen(self) -> None:
        self.listener = socket.create_server((HOST, self.port))  # SO_REUSEADDR: same port
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                down, _ = listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection((HOST, self.target), timeout=5)
            except OSError:  # nobody there (a server stopped): as a refused connection
                down.close()
                continue
            up.settimeout(None)  # the timeout was for the connect alone
            pair = [0]  # how many of its two directions ended
            with self._lock:
                self._socks |= {down, up}
            threading.Thread(target=self._pump, args=(down, up, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: list[Any]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # pass the end on, as the network does
        with self._lock:
            pair[0] += 1
            last = pair[0] == 2
            if last:
                self._socks -= {src, dst}
        if last:
            src.close()
            dst.close()

    @property
    def held(self) -> bool:
        return self.listener is None

    def hold(self) -> None:
        """Refuse new connections from now on, as a machine that is offline does (the
        port is closed); those carried go on."""
        if self.listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() blocked in its thread
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None

    def release(self) -> None:
        """Accept connections again, on the same port."""
        if self.listener is None:
            self._listen()

    def cut(self) -> None:
        """Break every connection carried, both ways, without a close frame."""
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.hold()
        self.cut()


@pytest.fixture
def links() -> Iterator[Callable[[int], Link]]:
    made: list[Link] = []

    def make(target: int) -> Link:
        link = Link(target)
        made.append(link)
        return link

    yield make
    for link in made:
        link.close()


# -- servers -----------------------------------------------------------------------------------


class Node:
    """A roombus server in a subprocess: ``roombus serve`` (trio, asyncio) or uvicorn."""

    def __init__(self, transport: str, *args: str) -> None:
        self.transport = transport
        self.proc: CliServer | Served
        if transport == "uvicorn":
            self.proc = Served(*SERVER_COMMANDS["uvicorn"])
            self.proc.wait_serving()
            self.port = self.proc.port
        else:
            self.proc = CliServer("--port", "0", *args, transport=transport)
            self.port = self.proc.wait_listening()

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """A graceful stop (SIGTERM): every client is told, as at a restart."""
        os.kill(self.pid, signal.SIGTERM)
        self.proc.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the node dies with its connections, telling nobody."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.proc.wait(10)

    def close(self) -> None:
        if isinstance(self.proc, Served):
            self.proc.kill()
        else:
            self.proc.stop()

    @property
    def output(self) -> str:
        return self.proc.output if isinstance(self.proc, Served) else self.proc.stderr


@pytest.fixture
def servers() -> Iterator[Callable[..., Node]]:
    """A factory: ``servers("trio", "--redis", url)`` starts a server and waits for it."""
    started: list[Node] = []

    def start(transport: str, *args: str) -> Node:
        node = Node(transport, *args)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.close()


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    """A ``redis-server`` of the test's own, as the cluster end-to-end tests start it."""
    proc = start_redis()
    try:
        yield proc
    finally:
        proc.close()


def cluster_node(servers: Callable[..., Node], redis: RedisProcess, i: int) -> Node:
    """Node *i* of a cluster (odd ones on asyncio), once it is online in Redis."""
    node = servers(
        "asyncio" if i % 2 else "trio",
        "--redis",
        redis.url,
        "--node-id",
        f"node-{i}",
        "--presence-ttl",
        "1.5",
    )
    wait_for(lambda: metric(node.proc, "roombus_backplane_online") == 1)  # type: ignore[arg-type]
    return node


# -- the publisher -------------------------------------------------------------------------------


class Publisher:
    """
    ``roombus.client`` publishing ``pub #1``, ``pub #2``, ... every *interval* seconds
    from a thread (asyncio) until :meth:`stop`, which waits for every acknowledgement.
    Publishing goes on whether or not the client is connected: what it cannot send
    waits in its outbox.
    """

    def __init__(self, port: int, username: str = "pub", interval: float = 0.1) -> None:
        self.url = f"ws://{HOST}:{port}/ws"
        self.username = username
        self.interval = interval
        self.sent: list[str] = []
        self.positions: list[rc.Position] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc

    async def _main(self) -> None:
        async with rc.connect(self.url, [ROOM], username=self.username, options=FAST) as client:
            reader = asyncio.ensure_future(self._drain(client))
            waiting = []
            n = 0
            while not self._stop.is_set() and n < 200:  # at 10/s, well within the outbox
                n += 1
                text = f"pub #{n}"
                self.sent.append(text)
                waiting.append(asyncio.ensure_future(client.publish(ROOM, text)))
                await asyncio.sleep(self.interval)
            self.positions = await asyncio.wait_for(asyncio.gather(*waiting), 20)
            reader.cancel()

    @staticmethod
    async def _drain(client: Any) -> None:
        async for _ in client:
            pass

    def stop(self, timeout: float = 25.0) -> list[str]:
        """Stop publishing; returns what was published, once every one is acknowledged."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the publisher's messages were not all acknowledged"
        if self.error is not None:
            raise self.error
        return self.sent


@pytest.fixture
def publishers() -> Iterator[Callable[[int], Publisher]]:
    made: list[Publisher] = []

    def make(port: int) -> Publisher:
        pub = Publisher(port).start()
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub._stop.set()
        pub._thread.join(25)
