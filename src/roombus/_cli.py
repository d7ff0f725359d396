"""
The command line: ``roombus serve``. Its parser is made of the option table
(:data:`roombus.node.options.SERVE_OPTIONS`, which also reads the ``ROOMBUS_*``
variables and the configuration file); the server runs with :func:`roombus.run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TypeVar

from ._run import run
from ._version import __version__
from .core.errors import ConfigError
from .logging import _handler as _log_handler
from .node.options import SERVE_OPTIONS, build_configs

__all__ = ["build_configs", "main"]


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
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file (keys are the option names: "
        "port = 8765, allowed-origin = [...]) [ROOMBUS_CONFIG]",
    )
    for opt in SERVE_OPTIONS:
        if opt.is_flag:
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
            metavar=opt.shown,
            help=f"{opt.help} [{opt.env}]",
        )
    return parser


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
    server = settings.server
    logging.basicConfig(
        level=settings.log_level.upper(),
        handlers=[_log_handler(settings.log_format, sys.stderr)],
    )
    try:
        run(settings)
    except BaseException as exc:
        # Binding happens inside the nursery, so the error may come in a group.
        invalid = _find(exc, ConfigError)
        if invalid is not None:  # a backplane's setting, found when it is made
            parser.exit(2, f"roombus serve: error: {invalid}\n")
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


_E = TypeVar("_E", bound=Exception)


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find(inner, kind)
        if found is not None:
            return found
    return None
