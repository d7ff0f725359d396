"""
Headless Chromium driven over the DevTools protocol, with the ``websockets`` sync client
(already a test dependency; selenium's current releases need a newer certifi than the
pins allow).

:class:`Chromium` starts Debian's ``/usr/bin/chromium`` with a fresh profile and finds
its DevTools endpoint; :meth:`Chromium.open` gives a :class:`Tab`, each in a browser
context of its own (its own storage, as another person's browser would be). A tab
evaluates JavaScript, types as a keyboard does (``Input.insertText``, a real Enter key
press), waits for a condition with a bound, and takes PNG screenshots. Uncaught page
exceptions are collected so that a test can require none.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

HOST = "127.0.0.1"
CHROMIUM = "/usr/bin/chromium"
#: How this sandbox needs Chromium started (the background-networking flags: its closed
#: network makes it misbehave otherwise); the profile and the DevTools port are added.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Tabs in separate windows may be taken for hidden ones: timers must not be throttled.
NO_THROTTLING = [
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
CALL_TIMEOUT = 10.0
START_TIMEOUT = 20.0


class CDPError(Exception):
    pass


class Session:
    """One DevTools WebSocket: commands answered in order; events kept (the last 500)."""

    def __init__(self, url: str) -> None:
        self.ws: ClientConnection = ws_connect(
            url,
            max_size=None,
            open_timeout=CALL_TIMEOUT,
            proxy=None,
            compression=None,
            # No keepalive thread: its pings draw from the global `random`, which
            # hypothesis (in later tests) takes for a strategy using it.
            ping_interval=None,
        )
        self.ws.__enter__()  # websockets >= 17.1 wants a direct connection used so
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = CALL_TIMEOUT, **params: Any) -> dict[str, Any]:
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DevTools: no answer to {method} within {timeout} s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result
            if "method" in msg:
                self.events.append(msg)
                del self.events[:-500]

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """``/usr/bin/chromium --headless ...`` with a profile of its own; killed by its PID."""

    def __init__(self, log_dir: Path) -> None:
        if not os.access(CHROMIUM, os.X_OK):
            pytest.fail(
                f"{CHROMIUM} not found: the browser tests need Debian's chromium "
                "(apt-get install chromium chromium-driver; bash .ci/run installs them)"
            )
        self.profile = Path(tempfile.mkdtemp(prefix="roombus-chromium-"))
        self.log_path = log_dir / "chromium.log"
        args = [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={self.profile}",
            *NO_THROTTLING,
            f"--remote-debugging-address={HOST}",
            "--remote-debugging-port=0",
            "--window-size=1100,720",
            "about:blank",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        try:
            self.port, path = self._endpoint()
            self.browser = Session(f"ws://{HOST}:{self.port}{path}")
        except BaseException:
            self.close()
            raise
        self.tabs: list[Tab] = []

    def _endpoint(self) -> tuple[int, str]:
        """Chromium writes its DevTools port and path into the profile once it listens."""
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                port, path = active.read_text().split()[:2]
                return int(port), path
            except (OSError, ValueError):
                time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        pytest.fail(f"chromium did not open its DevTools port within {START_TIMEOUT} s:\n{tail}")

    def open(self, name: str, width: int = 1100, height: int = 720) -> Tab:
        context = self.browser.call("Target.createBrowserContext")["browserContextId"]
        target = self.browser.call(
            "Target.createTarget", url="about:blank", browserContextId=context, newWindow=True
        )["targetId"]
        tab = Tab(self, name, context, target, width, height)
        self.tabs.append(tab)
        return tab

    def close(self) -> None:
        for tab in list(getattr(self, "tabs", [])):
            tab.close()
        if getattr(self, "browser", None) is not None:
            try:
                self.browser.call("Browser.close", timeout=5)
            except Exception:
                pass
            self.browser.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                # Chromium's helpers are in the session it leads: end that group, ours.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    """One page, in a browser context of its own."""

    def __init__(
        self, chromium: Chromium, name: str, context: str, target: str, width: int, height: int
    ) -> None:
        self.chromium = chromium
        self.name = name
        self.context = context
        self.target = target
        self.closed = False
        self.session = Session(f"ws://{HOST}:{chromium.port}/devtools/page/{target}")
        self.session.call("Runtime.enable")
        self.width, self.height = width, height
        self.resize(width, height)

    def resize(self, width: int, height: int) -> None:
        """The viewport's size (kept for screenshots; the window's size is not)."""
        self.session.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )

    def goto(self, url: str, timeout: float = 15.0) -> None:
        result = self.session.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"{self.name}: could not load {url}: {result['errorText']}")
        self.wait(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            f"{url} loaded",
            timeout,
        )

    def js(self, expression: str, timeout: float = CALL_TIMEOUT) -> Any:
        """The value of a JavaScript expression (awaited if a promise)."""
        result = self.session.call(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{self.name}: {text}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 10.0) -> Any:
        """Poll *expression* until it is truthy; fail the test naming *what* otherwise."""
        deadline = time.monotonic() + timeout
        error = None
        while True:
            try:
                value = self.js(expression)
            except CDPError as exc:  # a navigation replaced the document meanwhile
                value, error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: not {what} within {timeout} s (last error: {error})\n"
                    f"{self.describe()}"
                )
            time.sleep(0.05)

    def describe(self) -> str:
        """What the page shows, for a failure message."""
        try:
            text = self.js("document.body.innerText.slice(-3000)")
        except Exception as exc:  # the page is gone
            text = f"(no page: {exc})"
        return f"--- {self.name} shows:\n{text}\n--- page errors: {self.exceptions()}"

    def type(self, text: str) -> None:
        """Type *text* into the focused element as a keyboard does."""
        self.session.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        key: dict[str, Any] = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.session.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.session.call("Input.dispatchKeyEvent", type="keyUp", **key)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.js(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.session.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def screenshot(self, path: Path, unroll: str | None = None) -> Path:
        """A PNG of the page; with *unroll*, a selector of a scrolled element, the
        viewport is made tall enough (up to 8000 px) to show all of its content."""
        if unroll is not None:
            hidden = self.js(
                f"(() => {{ const e = document.querySelector({json.dumps(unroll)});"
                " return e ? e.scrollHeight - e.clientHeight : 0; })()"
            )
            if hidden > 0:
                self.resize(self.width, min(self.height + hidden + 16, 8000))
        try:
            data = self.session.call("Page.captureScreenshot", format="png", timeout=20)["data"]
        finally:
            if unroll is not None:
                self.resize(self.width, self.height)
        path.write_bytes(base64.b64decode(data))
        return path

    def exceptions(self) -> list[str]:
        """Uncaught exceptions the page threw (and console.error calls)."""
        found = []
        for event in self.session.events:
            if event["method"] == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details["text"])
            elif (
                event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error"
            ):
                args = event["params"].get("args", [])
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
        return found

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.session.close()
        steps: list[tuple[str, dict[str, Any]]] = [
            ("Target.closeTarget", {"targetId": self.target}),
            ("Target.disposeBrowserContext", {"browserContextId": self.context}),
        ]
        for method, params in steps:
            try:
                self.chromium.browser.call(method, **params)
            except Exception:
                pass
        if self in self.chromium.tabs:
            self.chromium.tabs.remove(self)
