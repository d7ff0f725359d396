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
    Run a roombus server until SIGINT or SIGTERM, then shut it down gracefully (close
    1001 to every client, at most ``server.close_timeout`` seconds) and return.

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
    scheme = "wss" if settings.ssl_context is not None else "ws"
    return f"{scheme}://{settings.server.host}:{port}/ws"


async def _serve_trio(settings: Settings) -> None:
    import trio

    from .trio import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, settings)
            running.metrics.add_process_collectors()  # this process is the server's
            log.info("roombus %s listening on %s", __version__, _url(settings, running.port))
            async for signum in signals:
                log.info("%s received: closing connections", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    log.info("stopped")


async def _serve_asyncio(settings: Settings) -> None:
    import asyncio

    from .asyncio import serve

    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(signum: signal.Signals) -> None:
        if not received.done():
            received.set_result(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        async with serve(settings) as running:
            running.metrics.add_process_collectors()  # this process is the server's
            log.info(
                "roombus %s listening on %s (asyncio)", __version__, _url(settings, running.port)
            )
            log.info("%s received: closing connections", (await received).name)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    log.info("stopped")


__all__ = ["run"]
