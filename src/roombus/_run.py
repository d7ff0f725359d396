"""
:func:`run`: a whole server in one call, the way ``roombus serve`` runs one. The only
place that calls ``trio.run()`` or ``asyncio.run()``.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import attrs

from ._version import __version__
from .node.settings import Settings

log = logging.getLogger("roombus")


def run(settings: Settings | None = None, /, **changes: Any) -> None:
    """
    Run a roombus server until SIGTERM or SIGINT, then shut it down gracefully and
    return.

    SIGTERM drains: ``/healthz`` answers 503 and new WebSockets are refused at once,
    the open ones are closed with 1001 at jittered instants spread over
    ``server.drain_seconds`` (what a rolling deploy wants: their clients reconnect to
    the other nodes a few at a time), then the last answers get at most
    ``server.close_timeout`` seconds. SIGINT (Ctrl-C), or a second signal during a
    drain, closes every connection at once (1001, at most ``close_timeout``).

    *settings* (the defaults if None) with *changes*, any of the fields of
    :class:`Settings`, say what to run::

        roombus.run(server=roombus.ServerConfig(port=9000), transport="asyncio")

    ``settings.transport`` picks the framework: ``trio`` (:func:`roombus.trio.serve`) or
    ``asyncio`` (:func:`roombus.asyncio.serve`). A cluster (``settings.cluster``) gets
    the backplane of that framework. It logs to the ``roombus`` logger (the address it
    listens on, the signal that stops it) and leaves the logging setup to the caller.
    Its ``/metrics`` has the process's metrics too (``process_*``, ``python_*``): the
    process is the server's.
    Call it from the main thread (it handles the signals), outside any event loop.

    Raises:
        ConfigError: for a setting that is invalid (a field of the wrong kind, a bad
            cluster setting, hiredis missing for a cluster).
        OSError: if the address cannot be bound (possibly inside an exception group,
            under trio).
    """
    settings = Settings() if settings is None else settings
    if changes:
        settings = attrs.evolve(settings, **changes)
    if settings.transport == "asyncio":
        import asyncio

        asyncio.run(_serve_asyncio(settings))
    else:
        import trio

        trio.run(_serve_trio, settings)


def _url(settings: Settings, port: int | None) -> str:
    """Where the server listens, for its startup line: the WebSocket URL, and the
    page's when it serves one (``ws://127.0.0.1:8765/ws, page at http://127.0.0.1:8765/``)."""
    tls = settings.ssl_context is not None
    where = f"{settings.server.host}:{port}"
    url = f"{'wss' if tls else 'ws'}://{where}/ws"
    if settings.server.page is not None:
        url += f", page at {'https' if tls else 'http'}://{where}/"
    return url


def _draining(signum: int, settings: Settings) -> bool:
    """Whether the first signal *signum* drains (SIGTERM; SIGINT closes all at once),
    logged either way."""
    name = signal.Signals(signum).name
    if signum == signal.SIGTERM and settings.server.drain_seconds > 0:
        log.info(
            "%s received: draining (closing connections over %g s; "
            "a second signal closes them at once)",
            name,
            settings.server.drain_seconds,
        )
        return True
    log.info("%s received: closing connections", name)
    return False


def _at_once(signum: int) -> None:
    log.info("%s received: closing the remaining connections now", signal.Signals(signum).name)


def _log_api(settings: Settings, api_port: int | None) -> None:
    """Say where the server API is, if it is on."""
    server = settings.server
    if not server.api_keys:
        return
    if api_port is None:
        log.info("server API at /api/ on the main listener (%d keys)", len(server.api_keys))
    else:
        scheme = "https" if settings.ssl_context is not None else "http"
        log.info(
            "server API listening on %s://%s:%d/api/ (%d keys)",
            scheme,
            server.api_host,
            api_port,
            len(server.api_keys),
        )


async def _serve_trio(settings: Settings) -> None:
    import trio

    from .trio import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, settings)
            running.metrics.add_process_collectors()  # this process is the server's
            log.info("roombus %s listening on %s", __version__, _url(settings, running.port))
            _log_api(settings, running.api_port)

            async def drain() -> None:
                await running.drain()
                nursery.cancel_scope.cancel()  # the server stopped: so does the signal loop

            async for signum in signals:
                if not running.draining and _draining(signum, settings):
                    nursery.start_soon(drain)
                    continue
                if running.draining:
                    _at_once(signum)
                # Cancelling serve() shuts down now: 1001 to whoever is left.
                nursery.cancel_scope.cancel()
                break
    log.info("stopped")


async def _serve_asyncio(settings: Settings) -> None:
    import asyncio

    from .asyncio import serve

    loop = asyncio.get_running_loop()
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, received.put_nowait, signum)
    try:
        async with serve(settings) as running:
            running.metrics.add_process_collectors()  # this process is the server's
            log.info(
                "roombus %s listening on %s (asyncio)", __version__, _url(settings, running.port)
            )
            _log_api(settings, running.api_port)
            if _draining(await received.get(), settings):
                drain = asyncio.ensure_future(running.drain())
                second = asyncio.ensure_future(received.get())
                await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
                if second.done():
                    _at_once(second.result())
                    drain.cancel()
                else:
                    second.cancel()
                try:
                    await drain
                except asyncio.CancelledError:
                    if not drain.cancelled():
                        raise
            # Leaving serve() shuts down now (after a drain: already done).
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    log.info("stopped")


__all__ = ["run"]
