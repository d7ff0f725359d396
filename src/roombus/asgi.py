"""
roombus.asgi: the broker as an ASGI application, for uvicorn, hypercorn, Starlette
and FastAPI.

Serve the whole protocol with no code of your own (settings from the ``ROOMBUS_*``
environment variables of ``roombus serve``)::

    uvicorn --factory roombus.asgi:create_app --ws-ping-interval 20 --ws-ping-timeout 10
    hypercorn --worker-class trio 'roombus.asgi:create_app()'

or mount a :class:`RoombusASGI` in your own app (see ``examples/fastapi_app.py``).

Theory of operation
-------------------
An ASGI server parses HTTP, frames WebSocket messages, answers pings and runs the
close handshake, so the app drives a :class:`~roombus.server.messages.MessageHub`:
whole messages in (:meth:`~roombus.server.messages.MessageHub.receive_message`),
whole messages out (a :class:`~roombus.server.queues.MessageQueue` per connection).
Each connection is the server's task running :meth:`RoombusASGI.__call__`: it reads
(``receive()``) and feeds the hub, while a *writer* task sends its queue, one
``send()`` per message; a send that waits on a slow client leaves the rest in the
bounded queue, where the hub's slow-consumer policy sees it. A *timer* task, started
with the first connection, sleeps until the hub's next deadline (close timeouts).

anyio runs these tasks, so the same code serves asyncio (uvicorn, hypercorn) and trio
(hypercorn's trio worker). Install it with the extra: ``pip install 'roombus[asgi]'``.

In a cluster (``backplane=``, a :class:`roombus.asyncio.RedisBackplane`; or
``ROOMBUS_REDIS`` for :func:`create_app`), the backplane starts on the server's loop at
lifespan startup (or with the first connection, for a mounted app without lifespan
events) and leaves Redis at shutdown, after the goodbyes. It needs an asyncio server:
under trio, starting it is a :class:`~roombus.ConfigError`.

What the server owns instead of roombus: listening, the HTTP parser and its limits,
pings (the core heartbeat must be off: ``BrokerConfig(heartbeat=False)``; use
``uvicorn --ws-ping-interval`` or hypercorn's ``websocket_ping_interval``), protocol
errors in frames (the server closes with its own codes), and shutdown (uvicorn
closes WebSockets with 1012; hypercorn waits for them up to its graceful timeout).

The server owns the signals too, and on SIGTERM it closes every WebSocket itself
before the app's lifespan shutdown begins, so a drain spread over time cannot come
from there. :meth:`RoombusASGI.drain` is that drain for an app to call before the
server stops (from an endpoint a pre-stop hook calls, say): ``/healthz`` answers 503,
new WebSockets are refused, the open ones are closed with 1001 over
``drain_seconds``, then :meth:`RoombusASGI.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Final, Protocol, final

import attrs

try:
    import anyio
    import anyio.lowlevel
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installation
    raise ModuleNotFoundError(
        f"roombus.asgi needs anyio ({exc}): install roombus with its ASGI extra, "
        "pip install 'roombus[asgi]'",
        name=exc.name,
    ) from None

try:  # anyio asks it which library runs, when it is installed
    import sniffio
except ModuleNotFoundError:  # pragma: no cover - depends on the installation
    sniffio = None  # type: ignore[assignment]

from .core.actions import BackplaneAction
from .core.codes import CloseCode
from .core.config import BrokerConfig
from .core.errors import ConfigError
from .core.events import Event
from .core.names import ConnectionId
from .logging import use_host_logging
from .node.assemble import build_broker
from .node.facade import ServerFacade
from .node.facade import wall as _wall
from .node.metrics import ServerMetrics
from .node.options import settings_from_environ
from .node.settings import Settings
from .server.api import MAX_BODY_BYTES, ApiError, Pending, authenticate, error_response
from .server.config import ServerConfig
from .server.handshake import Upgrade, route_request
from .server.http import HttpResponse, response_head
from .server.messages import MessageHub
from .server.peer import peer_label
from .server.queues import MessageQueue

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log: Final = logging.getLogger("roombus")


class Backplane(Protocol):
    """What the app needs of its backplane: :class:`roombus.asyncio.RedisBackplane`."""

    @property
    def node_id(self) -> str: ...

    def metrics(self) -> dict[str, float]: ...

    def start(self, host: RoombusASGI) -> None: ...

    def submit(self, work: list[BackplaneAction]) -> None: ...

    async def wait_idle(self) -> None: ...

    async def aclose(self) -> None: ...


class _Link:
    """What the app keeps per connection: its scope, its queue, its writer's wake-up."""

    __slots__ = ("queue", "scope", "wake")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.queue: MessageQueue | None = None  # known once the hub marks it dirty
        self.wake: anyio.Event | None = None  # set to wake the writer


@final
class RoombusASGI(ServerFacade):
    """
    A roombus server as an ASGI 3 application: ``/ws`` (WebSocket), ``/healthz``, the
    page at ``/`` and the client at ``/roombus.js`` (HTTP), and the ``lifespan``
    protocol.

    Mounted under a path (``app.mount("/bus", bus)``), it answers relative to it
    (``/bus/ws``). A framework does not pass a mounted app the lifespan events: give
    it :meth:`lifespan` (``FastAPI(lifespan=bus.lifespan)``) for a graceful shutdown.

    Args:
        settings: What to serve (:class:`roombus.Settings`). Of ``settings.server``,
            ``allowed_origins``, ``page``, ``script``, ``metrics``, ``max_header_bytes`` and
            ``close_timeout`` apply (the address and backlog are the ASGI server's
            own); ``settings.broker.heartbeat`` must be off, since the ASGI server
            owns pings; ``ssl_context`` is the server's business too. A cluster:
            ``settings.cluster`` gets a :class:`roombus.asyncio.RedisBackplane`
            (``settings.backplane``, one made already); the app starts it on the
            server's loop, which must be asyncio's. With no settings, the defaults
            with the heartbeat off.
        config, legacy: The older signature, folded into *settings*
            (:meth:`roombus.Settings.from_legacy`): a :class:`~roombus.BrokerConfig`
            in place of *settings* (its heartbeat off), a
            :class:`~roombus.ServerConfig`, and the keywords ``on_notice``,
            ``authenticator``, ``authorizer``, ``backplane``.

    Raises:
        ConfigError: if the broker's heartbeat is on, or for TLS settings.
        TypeError: for a keyword that is no setting.

    Attributes:
        settings: What it was made of.
        hub: The sans-IO hub (a :class:`~roombus.server.messages.MessageHub`).
        broker: The core (read-only use).
        config: The transport settings.
    """

    def __init__(
        self,
        settings: Settings | BrokerConfig | None = None,
        config: ServerConfig | None = None,
        **legacy: Any,
    ) -> None:
        if settings is None:
            settings = Settings(broker=BrokerConfig(heartbeat=False))
        settings = Settings.from_legacy(settings, config, **legacy)
        if settings.ssl_context is not None:
            raise ConfigError(
                "certfile", "under ASGI, TLS is the server's: use its own TLS options"
            )
        #: What the app was made of.
        self.settings: Final = settings
        broker_config, config = settings.broker, settings.server
        on_notice, authenticator = settings.on_notice, settings.authenticator
        authorizer, backplane = settings.authorizer, _backplane(settings)
        self.hub: MessageHub = MessageHub(
            config=config,
            on_notice=on_notice,
            authenticator=authenticator,
            broker=build_broker(
                broker_config,
                authorizer=authorizer,
                authenticator=authenticator,
                node=backplane.node_id if backplane is not None else None,
            ),
        )
        #: The link to the other nodes of a cluster, or None for an app on its own.
        self.backplane = backplane
        if backplane is not None:
            self.hub.extra_metrics = backplane.metrics
        #: The server's Prometheus registry and ``/metrics`` text (its own registry).
        self.metrics: Final = ServerMetrics(self.hub, transport="asgi")
        self.broker = self.hub.broker
        self.config = self.hub.config
        self._links: dict[ConnectionId, _Link] = {}
        self._timer_started = False
        self._timer_task: asyncio.Task[None] | None = None  # asyncio keeps only weak refs
        self._timer_scope: anyio.CancelScope | None = None  # its sleep, until a deadline
        self._timer_stop: anyio.CancelScope | None = None  # the whole timer task
        self._closed = False
        self._all_closed: anyio.Event | None = None
        self._drained: anyio.Event | None = None

    # -- public API for the embedding app ----------------------------------------------

    def _now(self) -> float:
        return anyio.current_time()

    def _waiter(self) -> anyio.Event:
        return anyio.Event()

    def backplane_events(self, events: list[Event]) -> None:
        """Hand the broker what the backplane learnt (the other nodes' doings), then
        carry out its outputs once.

        The backplane calls this from the loop's callbacks (a read, its timer), outside
        any task, where anyio cannot tell which library runs: it is told (asyncio, the
        only one a backplane runs under here).
        """
        token = None if sniffio is None else sniffio.current_async_library_cvar.set("asyncio")
        try:
            super().backplane_events(events)
        finally:
            if token is not None:
                assert sniffio is not None
                sniffio.current_async_library_cvar.reset(token)

    async def aclose(self) -> None:
        """
        Shut down: refuse new WebSockets (503), close every open one with 1001 after
        what is queued for it, and wait at most ``close_timeout`` for them. Idempotent.
        """
        hub = self.hub
        if not hub.shutting_down:
            hub.shutdown(now=anyio.current_time(), timestamp=_wall())
            self.transmit()
        if self._links:
            self._all_closed = anyio.Event()
            with anyio.move_on_after(self.config.close_timeout + 1.0):
                await self._all_closed.wait()
            for link in list(self._links.values()):
                link.scope.cancel()
        if self.backplane is not None and self._timer_started and not self._closed:
            # The goodbyes (presence leaves) go out before the link closes.
            with anyio.move_on_after(self.config.close_timeout):
                await self.backplane.wait_idle()
            await self.backplane.aclose()
        self._closed = True
        if self._timer_stop is not None:
            self._timer_stop.cancel()

    async def drain(self, seconds: float | None = None) -> None:
        """
        Shut down gracefully, spread over time: at once, ``/healthz`` answers 503
        ``draining`` and new WebSockets are refused (503 with ``Retry-After``); the
        open ones are closed with 1001 (``server draining``), each at a jittered
        instant spread over *seconds*, and get their messages until then; then
        :meth:`aclose`. Returns when done.

        The ASGI server owns the signals and, on its own shutdown, closes every
        WebSocket before the lifespan shutdown: call this before the server is told
        to stop (a pre-stop hook's request to an endpoint of the app that awaits it).
        :meth:`aclose` meanwhile closes the rest at once.

        Args:
            seconds: The window; None: ``config.drain_seconds``. 0: close all at once.

        Raises:
            ConfigError: a cluster's backplane under trio (hypercorn's trio worker).
        """
        hub = self.hub
        if not hub.shutting_down:
            if not hub.draining:
                self._start_timer()  # it closes them at the schedule's instants
                hub.drain(now=anyio.current_time(), timestamp=_wall(), seconds=seconds)
                self.transmit()
            end = hub.drain_ends
            assert end is not None
            if not hub.drain_done:
                self._drained = anyio.Event()
                with anyio.move_on_after(max(0.0, end - anyio.current_time())):
                    await self._drained.wait()
        await self.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """
        The app's life, for a framework's ``lifespan=`` argument: on exit, :meth:`aclose`.
        """
        try:
            yield
        finally:
            await self.aclose()

    # -- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._start_timer()
                except ConfigError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope["method"]).encode()
        if (too_large := self._oversized(scope)) is not None:
            await send(
                {"type": "http.response.start", "status": 431, "headers": response_head(too_large)}
            )
            await send({"type": "http.response.body", "body": too_large.body})
            return
        path = _target(scope).partition(b"?")[0]
        if (path == b"/api" or path.startswith(b"/api/")) and self.hub.api_enabled(
            api_listener=self.config.api_port is not None
        ):
            headers = scope.get("headers") or []
            body: bytes | None = b""
            # Only a call with a valid key has its body read (the rest is answered
            # from the head: 405, 401, 404), and one whose client left is not made.
            if method == b"POST" and authenticate(headers, self.config.api_keys) is not None:
                try:
                    body = await _read_body(receive, headers, MAX_BODY_BYTES)
                except _ClientGone:
                    return
            hub = self.hub
            answer = hub.api_response(
                method,
                path,
                scope.get("headers") or [],
                body,
                now=self._now(),
                timestamp=_wall(),
            )
            self.transmit()
            if isinstance(answer, Pending):
                if not answer.done:  # the backplane's answer (the operations' timeout bounds it)
                    waiter = self._waiter()
                    answer.then(lambda *_: waiter.set())
                    await waiter.wait()
                outcome = answer.outcome
                response = error_response(outcome) if isinstance(outcome, ApiError) else outcome
            else:
                response = answer
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_head(response),
                }
            )
            await send({"type": "http.response.body", "body": response.body})
            return
        decision = route_request(
            method,
            _target(scope),
            scope.get("headers") or [],
            allowed_origins=self.config.allowed_origins,
            page=self.config.page,
            script=self.config.script,
            draining=self.hub.draining,
        )
        if self.config.metrics and method in (b"GET", b"HEAD") and scope.get("path") == "/metrics":
            decision = self.hub.metrics_response()
        elif isinstance(decision, Upgrade):  # the server has its WebSocket support off
            decision = HttpResponse(status=426, body=b"this server does not speak WebSocket\n")
        elif decision.status >= 400:
            peer = _peer(scope)
            status = decision.status
            log.info("%s refused with %d", peer, status, extra={"peer": peer, "status": status})
        await send(
            {
                "type": "http.response.start",
                "status": decision.status,
                "headers": response_head(decision),
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if method == b"HEAD" else decision.body}
        )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        hub = self.hub
        if (too_large := self._oversized(scope)) is not None:
            await _refuse(scope, send, too_large)
            return
        try:
            self._start_timer()
        except ConfigError as exc:
            log.error("%s; refusing WebSockets", exc)
            await _refuse(scope, send, HttpResponse(status=500, body=f"{exc}\n".encode()))
            return
        opened = hub.open_websocket(
            _target(scope),
            scope.get("headers") or [],
            now=anyio.current_time(),
            timestamp=_wall(),
            peer=_peer(scope),
        )
        if isinstance(opened, HttpResponse):
            await _refuse(scope, send, opened)
            return
        cid = opened
        code: int | None = None  # the peer's close code, once it disconnects
        link = _Link()
        self._links[cid] = link
        try:
            with link.scope:
                self.transmit()  # the link learns its queue (its presence messages)
                try:
                    accept: dict[str, Any] = {"type": "websocket.accept"}
                    if "roombus" in scope.get("subprotocols", ()):
                        accept["subprotocol"] = "roombus"
                    await send(accept)
                except Exception as exc:  # an OSError by the spec; some servers differ
                    peer = _peer(scope)
                    log.info(
                        "%s could not be accepted: %r",
                        peer,
                        exc,
                        extra={"conn": cid, "peer": peer, "reason": repr(exc)},
                    )
                    return
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._write_loop, cid, link, send)
                    code = await self._read_loop(cid, receive)
                    tasks.cancel_scope.cancel()
        finally:
            del self._links[cid]
            hub.lost(cid, now=anyio.current_time(), timestamp=_wall(), code=code)
            self.transmit()

    def _oversized(self, scope: Scope) -> HttpResponse | None:
        """431 for a request whose target and headers exceed ``max_header_bytes``.

        The server may have a limit of its own, or none for a complete request; either
        way an oversized request is never routed, let alone upgraded.
        """
        size = len(_target(scope)) + sum(
            len(name) + len(value) + 4 for name, value in scope.get("headers") or ()
        )
        if size <= self.config.max_header_bytes:
            return None
        peer = _peer(scope)
        log.info("%s refused with 431", peer, extra={"peer": peer, "status": 431})
        return HttpResponse(status=431, body=b"request header too large\n")

    async def _read_loop(self, cid: ConnectionId, receive: Receive) -> int:
        """Pass the peer's messages to the hub until it disconnects; its close code."""
        hub = self.hub
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                hub.receive_message(
                    cid,
                    text if text is not None else bytes(message.get("bytes") or b""),
                    now=anyio.current_time(),
                    timestamp=_wall(),
                )
                self.transmit()
                # A server may have many messages ready: let the writers woken by this
                # one send before the next is read, as the flusher runs between reads in
                # roombus.trio (else a burst fills the send queues of readers keeping up).
                await anyio.lowlevel.checkpoint()
                # The writers had their turn: what they could not send counts.
                hub.enforce_budget(now=anyio.current_time(), timestamp=_wall())
                self.transmit()
            elif kind == "websocket.disconnect":
                return int(message.get("code", 1005))

    async def _write_loop(self, cid: ConnectionId, link: _Link, send: Send) -> None:
        hub = self.hub
        try:
            while True:
                queue = link.queue
                if queue is None or not queue:
                    link.wake = anyio.Event()
                    await link.wake.wait()
                    continue
                for item in queue.data():
                    if isinstance(item, bytes):
                        await send({"type": "websocket.send", "text": item.decode()})
                    else:
                        await send(
                            {"type": "websocket.close", "code": item.code, "reason": item.reason}
                        )
                    queue.consume(1)
                if not queue:
                    hub.flushed(cid, now=anyio.current_time())
                    self.transmit()
        except OSError:  # ASGI servers raise an OSError for a send to a vanished client
            link.scope.cancel()

    # -- carrying out the hub's outputs ------------------------------------------------

    def transmit(self) -> None:
        """Carry out the hub's outputs, after every hub call: the four steps of
        :class:`~roombus.node.facade.ServerFacade`, in their order; then wake
        :meth:`aclose` once the last connection is gone."""
        hub = self.hub
        links = self._links
        # 1. close: cancel the connection's task (its reader and writer).
        for cid in hub.take_to_close():
            link = links.get(cid)
            if link is not None:
                link.scope.cancel()
        # 2. write: each dirty queue's writer task sends it.
        for cid, queue in hub.take_dirty_messages():
            link = links.get(cid)
            if link is not None:
                link.queue = queue
                if link.wake is not None:
                    link.wake.set()
        # 3. backplane: the broker's work for the other nodes (once it runs).
        if self.backplane is not None and self._timer_started:
            work = hub.take_backplane()
            if work:
                self.backplane.submit(work)
        # 4. timer: only ever earlier here; the timer task re-reads it when it wakes.
        if hub.deadline_moved:
            hub.deadline_moved = False
            deadline = hub.next_deadline()
            scope = self._timer_scope
            if deadline is not None and scope is not None and deadline < scope.deadline:
                scope.deadline = deadline
        if self._all_closed is not None and not links:
            self._all_closed.set()
        if self._drained is not None and hub.drain_done:
            self._drained.set()

    def _start_timer(self) -> None:
        """Start the timer task and the backplane once, outliving the connection that
        starts them (or at lifespan startup).

        Raises:
            ConfigError: a backplane under trio.
        """
        if self._timer_started:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: trio (hypercorn's trio worker)
            if self.backplane is not None:
                raise ConfigError(
                    "redis",
                    "a cluster under ASGI needs an asyncio server "
                    "(uvicorn, or hypercorn's asyncio worker), not trio",
                ) from None
            import trio

            self._timer_started = True
            trio.lowlevel.spawn_system_task(self._timer_loop)
        else:
            self._timer_started = True
            self._timer_task = loop.create_task(self._timer_loop())
            if self.backplane is not None:
                self.backplane.start(self)

    async def _timer_loop(self) -> None:
        hub = self.hub
        with anyio.CancelScope() as self._timer_stop:
            while not self._closed:
                deadline = hub.next_deadline()
                with anyio.CancelScope(
                    deadline=math.inf if deadline is None else deadline
                ) as scope:
                    self._timer_scope = scope
                    await anyio.sleep_forever()
                now = anyio.current_time()
                deadline = hub.next_deadline()
                if deadline is not None and deadline <= now:
                    hub.timeout(now=now, timestamp=_wall())
                    self.transmit()


class _ClientGone(Exception):
    """The client went away before its request's body was all there."""


async def _read_body(
    receive: Receive, headers: list[tuple[bytes, bytes]], most: int
) -> bytes | None:
    """An HTTP request's body (its ``http.request`` events), or None past *most* bytes
    (at once if its ``Content-Length`` says so)."""
    for name, value in headers:
        if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > most:
            return None
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise _ClientGone
        chunk = bytes(message.get("body") or b"")
        size += len(chunk)
        if size > most:
            return None
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


def _target(scope: Scope) -> bytes:
    """The request target relative to where the app is mounted, with its query."""
    path = str(scope.get("path") or "/")
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    query = bytes(scope.get("query_string") or b"")
    # Escaped, never replaced: "?" in place of an unencodable character would split
    # the path there, so "/ws\udcff" would be read as "/ws" with a query.
    target = path.encode("utf-8", "backslashreplace")
    return target + b"?" + query if query else target


def _peer(scope: Scope) -> str:
    return peer_label(scope.get("client"), unknown="asgi")


async def _refuse(scope: Scope, send: Send, response: HttpResponse) -> None:
    """Refuse a WebSocket before accepting it: with *response* if the server can send
    one (the ``websocket.http.response`` extension), else with the server's 403."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": response.status,
                "headers": response_head(response),
            }
        )
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": int(CloseCode.POLICY_VIOLATION)})


def create_app() -> RoombusASGI:
    """
    A :class:`RoombusASGI` configured like ``roombus serve``, from the ``ROOMBUS_*``
    environment variables; for ``uvicorn --factory roombus.asgi:create_app``.

    The heartbeat is always off (the server pings: set its ping interval), and the
    address and HTTP limits are the server's. ``ROOMBUS_REDIS`` (with
    ``ROOMBUS_NODE_ID``, ``ROOMBUS_PRESENCE_TTL``, ``ROOMBUS_REDIS_PREFIX``) joins a
    cluster, through :class:`roombus.asyncio.RedisBackplane` (an asyncio server only).
    ``ROOMBUS_LOG_LEVEL`` sets the level of the ``roombus`` logger, whose lines go to
    the host's handlers (the root logger's: ``uvicorn --log-config``), or to stderr
    while the root logger has none (uvicorn's default configures only its own loggers);
    ``ROOMBUS_LOG_FORMAT`` is that stderr line's format
    (:func:`roombus.logging.use_host_logging`).

    A configuration error is one line on stderr naming the setting
    (``roombus: ROOMBUS_PORT: invalid value 'abc': ...``) and :class:`SystemExit` with
    status 2, as ``roombus serve`` exits for one, not a traceback from the ASGI server.
    An app that wants the :class:`~roombus.ConfigError` itself calls
    :func:`roombus.node.options.settings_from_environ` and :class:`RoombusASGI`.

    Raises:
        SystemExit: status 2, for an invalid variable (after the line on stderr).
    """
    try:
        settings = settings_from_environ(os.environ)
        use_host_logging(settings.log_level, settings.log_format)
        return RoombusASGI(
            attrs.evolve(settings, broker=attrs.evolve(settings.broker, heartbeat=False))
        )
    except ConfigError as exc:
        print(f"roombus: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _backplane(settings: Settings) -> Backplane | None:
    """The backplane *settings* ask for: the one given, or one of ``settings.cluster``
    (the asyncio driver: a cluster under ASGI needs an asyncio server)."""
    if settings.backplane is not None or settings.cluster is None:
        return settings.backplane  # type: ignore[no-any-return]
    from .asyncio._backplane import RedisBackplane

    return RedisBackplane(settings.cluster)


__all__ = ["RoombusASGI", "create_app"]
