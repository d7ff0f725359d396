"""
The command line: ``roombus serve``. The only place that calls ``trio.run()`` (or,
with ``--transport asyncio``, ``asyncio.run()``).

Every option has an environment-variable twin: ``ROOMBUS_`` + the option's name in
upper case with dashes as underscores (``--ping-interval`` -> ``ROOMBUS_PING_INTERVAL``).
A flag on the command line wins over its variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import attrs

from ._config import BrokerConfig, ServerConfig
from ._errors import ConfigError
from ._version import __version__

log = logging.getLogger("roombus")

LOG_LEVELS = ("debug", "info", "warning", "error")
TRANSPORTS = ("trio", "asyncio")


@attrs.frozen
class _Option:
    flag: str
    type: Callable[[str], Any]
    help: str
    repeat: bool = False
    metavar: str | None = None

    @property
    def env(self) -> str:
        return "ROOMBUS_" + self.flag.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def _transport(text: str) -> str:
    if text.strip().lower() not in TRANSPORTS:
        raise ValueError(f"must be one of {', '.join(TRANSPORTS)}")
    return text.strip().lower()


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/true/yes/on or 0/false/no/off")


_defaults_b = BrokerConfig()
_defaults_s = ServerConfig()

# Option -> (config object, field) is by name: each flag's dest is a field of one of them.
SERVE_OPTIONS = (
    _Option(
        "transport",
        _transport,
        "the I/O framework that runs the server: trio or asyncio (default trio)",
        metavar="NAME",
    ),
    _Option("host", str, f"address to listen on (default {_defaults_s.host})", metavar="ADDRESS"),
    _Option("port", int, f"TCP port (default {_defaults_s.port}; 0 picks one)", metavar="PORT"),
    _Option(
        "ping-interval",
        float,
        f"seconds of silence before a ping (default {_defaults_b.ping_interval:g})",
    ),
    _Option(
        "ping-timeout",
        float,
        f"seconds a ping has to be answered (default {_defaults_b.ping_timeout:g})",
    ),
    _Option(
        "no-heartbeat",
        _flag,
        "never ping clients nor close silent ones (for a proxy or server that pings)",
        metavar="BOOL",
    ),
    _Option(
        "max-message-bytes",
        int,
        f"largest inbound message; larger closes with 1009 "
        f"(default {_defaults_b.max_message_bytes})",
    ),
    _Option(
        "send-queue",
        int,
        f"messages that may wait for one slow client before it is closed with 1008 "
        f"(default {_defaults_b.send_queue})",
    ),
    _Option(
        "send-queue-bytes",
        int,
        f"bytes that may wait for one slow client (default {_defaults_b.send_queue_bytes})",
    ),
    _Option(
        "max-rooms-per-connection",
        int,
        f"rooms one connection may join (default {_defaults_b.max_rooms_per_connection})",
    ),
    _Option(
        "rate-limit",
        float,
        f"messages per second one connection may send on average; 0 turns it off "
        f"(default {_defaults_b.rate_limit:g})",
        metavar="PER_SECOND",
    ),
    _Option(
        "rate-burst",
        int,
        f"messages one connection may send at once (default {_defaults_b.rate_burst})",
    ),
    _Option(
        "handshake-timeout",
        float,
        f"seconds to complete the opening request (default {_defaults_s.handshake_timeout:g})",
    ),
    _Option(
        "close-timeout",
        float,
        f"seconds to wait for a close handshake, and for shutdown "
        f"(default {_defaults_s.close_timeout:g})",
    ),
    _Option(
        "max-header-bytes",
        int,
        f"largest opening request; larger gets 431 (default {_defaults_s.max_header_bytes})",
    ),
    _Option(
        "allowed-origin",
        str,
        "an Origin allowed to connect (repeatable; the variable takes a comma-separated "
        "list); with none given, any origin may connect",
        repeat=True,
        metavar="ORIGIN",
    ),
    _Option("backlog", int, f"the listen backlog (default {_defaults_s.backlog})"),
    _Option(
        "page", str, "HTML file to serve at / (default: the bundled chat page)", metavar="FILE"
    ),
    _Option("no-page", _flag, "answer / with 404 instead of serving a page", metavar="BOOL"),
    _Option(
        "log-level",
        _log_level,
        "debug, info, warning or error (default info)",
        metavar="LEVEL",
    ),
)


_METAVARS: dict[Callable[[str], Any], str] = {int: "N", float: "SECONDS", str: "TEXT"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roombus", description="Room-based WebSocket pub/sub with presence."
    )
    parser.add_argument("--version", action="version", version=f"roombus {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the roombus server. Every option can also be set with its "
        "environment variable, shown in brackets.",
    )
    for opt in SERVE_OPTIONS:
        if opt.type is _flag:
            serve.add_argument(
                f"--{opt.flag}",
                dest=opt.dest,
                action="store_const",
                const="1",
                help=f"{opt.help} [{opt.env}=1]",
            )
            continue
        serve.add_argument(
            f"--{opt.flag}",
            dest=opt.dest,
            action="append" if opt.repeat else "store",
            metavar=opt.metavar or _METAVARS.get(opt.type, "VALUE"),
            help=f"{opt.help} [{opt.env}]",
        )
    return parser


def _settings(
    args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> dict[str, Any]:
    """Merge flags over environment variables and convert; ValueError names the setting."""
    values: dict[str, Any] = {}
    for opt in SERVE_OPTIONS:
        raw = getattr(args, opt.dest)
        source = f"--{opt.flag}"
        if raw is None and opt.env in environ:
            raw = environ[opt.env]
            source = opt.env
            if opt.repeat:
                raw = [part for part in raw.split(",") if part.strip()]
        if raw is None:
            continue
        try:
            values[opt.dest] = [opt.type(r) for r in raw] if opt.repeat else opt.type(raw)
        except ValueError as exc:
            raise ConfigError(source, f"invalid value {raw!r}: {exc}") from None
    return values


@attrs.frozen
class Settings:
    """What a ``serve`` command line (or the environment alone) asks for."""

    broker: BrokerConfig
    server: ServerConfig
    log_level: str
    transport: str


def build_configs(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> Settings:
    """The configs a ``serve`` command line asks for, the log level and the transport."""
    values = _settings(args, environ)
    level = values.pop("log_level", "info")
    transport = values.pop("transport", "trio")
    values["heartbeat"] = not values.pop("no_heartbeat", False)
    page_path = values.pop("page", None)
    if values.pop("no_page", False):
        page = None
    elif page_path is not None:
        try:
            with open(page_path, "rb") as f:
                page = f.read()
        except OSError as exc:
            raise ConfigError("page", f"cannot read {page_path}: {exc.strerror}") from None
    else:
        page = resources.files("roombus").joinpath("_static/chat.html").read_bytes()
    if "allowed_origin" in values:
        values["allowed_origins"] = values.pop("allowed_origin")
    broker_fields = set(attrs.fields_dict(BrokerConfig))
    broker = BrokerConfig(**{k: v for k, v in values.items() if k in broker_fields})
    server = ServerConfig(page=page, **{k: v for k, v in values.items() if k not in broker_fields})
    return Settings(broker, server, level, transport)


def settings_from_environ(environ: dict[str, str] | os._Environ[str]) -> Settings:
    """The settings of ``roombus serve`` with no flags: the ``ROOMBUS_*`` variables.

    Raises:
        ConfigError: naming the variable, if one is invalid.
    """
    return build_configs(_parser().parse_args(["serve"]), environ)


async def _serve(broker: BrokerConfig, server: ServerConfig) -> None:
    import trio

    from .trio import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, broker, server)
            log.info(
                "roombus %s listening on ws://%s:%d/ws", __version__, server.host, running.port
            )
            async for signum in signals:
                log.info("%s received: closing connections", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    log.info("stopped")


async def _serve_asyncio(broker: BrokerConfig, server: ServerConfig) -> None:
    import asyncio

    from .asyncio import serve

    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(signum: signal.Signals) -> None:
        if not received.done():
            received.set_result(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    async with serve(broker, server) as running:
        log.info(
            "roombus %s listening on ws://%s:%d/ws (asyncio)",
            __version__,
            server.host,
            running.port,
        )
        log.info("%s received: closing connections", (await received).name)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    try:
        settings = build_configs(args, os.environ)
    except ConfigError as exc:
        parser.exit(2, f"roombus serve: error: {exc}\n")
    broker, server = settings.broker, settings.server
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if settings.transport == "asyncio":
            import asyncio

            asyncio.run(_serve_asyncio(broker, server))
        else:
            import trio

            trio.run(_serve, broker, server)
    except BaseException as exc:
        # Binding happens inside the nursery, so the error may come in a group.
        error = _find(exc, OSError)
        if error is None:
            raise
        print(
            f"roombus serve: cannot listen on {server.host}:{server.port}: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _find(exc: BaseException, kind: type[OSError]) -> OSError | None:
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find(inner, kind)
        if found is not None:
            return found
    return None
