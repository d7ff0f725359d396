"""
The command line: ``roombus serve``. The only place that calls ``trio.run()`` (or,
with ``--transport asyncio``, ``asyncio.run()``).

Every option has an environment-variable twin: ``ROOMBUS_`` + the option's name in
upper case with dashes as underscores (``--ping-interval`` -> ``ROOMBUS_PING_INTERVAL``),
and a key of the same name in a TOML configuration file (``--config FILE``). A flag
on the command line wins over its variable, which wins over the file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs

from ._version import __version__
from .core.config import BrokerConfig
from .core.errors import ConfigError
from .server.auth import JWTAuthenticator
from .server.config import ServerConfig

if TYPE_CHECKING:
    from .asyncio import RedisBackplane as AsyncioBackplane
    from .trio import RedisBackplane as TrioBackplane

    RedisBackplane = TrioBackplane | AsyncioBackplane

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
        "max-queued-bytes",
        int,
        f"bytes that may wait in all send queues together; beyond it the clients with "
        f"the most waiting are closed with 1008; 0: no limit "
        f"(default {_defaults_s.max_queued_bytes})",
    ),
    _Option(
        "socket-send-buffer",
        int,
        f"the kernel's send buffer per client socket (SO_SNDBUF); 0: the system's "
        f"default (default {_defaults_s.socket_send_buffer})",
    ),
    _Option(
        "max-rooms-per-connection",
        int,
        f"rooms one connection may join (default {_defaults_b.max_rooms_per_connection})",
    ),
    _Option(
        "max-connections-per-room",
        int,
        f"connections one room may hold; 0: no limit "
        f"(default {_defaults_b.max_connections_per_room})",
    ),
    _Option(
        "max-connections",
        int,
        f"connections at once; beyond it requests get 503; 0: no limit "
        f"(default {_defaults_s.max_connections})",
    ),
    _Option(
        "max-connections-per-ip",
        int,
        f"connections at once from one client address; beyond it requests get 429; "
        f"0: no limit (default {_defaults_s.max_connections_per_ip})",
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
        "certfile",
        str,
        "serve TLS (wss://) with this PEM certificate chain (default: plain TCP)",
        metavar="FILE",
    ),
    _Option(
        "keyfile",
        str,
        "the PEM private key for --certfile (default: read from the certificate file)",
        metavar="FILE",
    ),
    _Option(
        "jwt-secret",
        str,
        "require a JWT signed with this HS256 secret (at least 32 bytes; prefer the "
        "variable: a flag shows in the process list)",
        metavar="SECRET",
    ),
    _Option(
        "jwt-public-key",
        str,
        "require a JWT signed with the RS256 or ES256 key whose PEM public key is in FILE",
        metavar="FILE",
    ),
    _Option(
        "jwt-leeway",
        float,
        "seconds of clock skew allowed on a token's exp and nbf (default 30)",
    ),
    _Option("jwt-audience", str, "require this aud claim in tokens", metavar="TEXT"),
    _Option(
        "redis",
        str,
        "join a cluster of nodes through this Redis: redis://[[user]:password@]host[:port]"
        "[/db] (default: serve alone)",
        metavar="URL",
    ),
    _Option(
        "node-id",
        str,
        "this node's id in the cluster (default: host name, process id and a random part)",
        metavar="ID",
    ),
    _Option(
        "presence-ttl",
        float,
        "seconds within which the users of a node that died leave everywhere (default 15)",
    ),
    _Option(
        "redis-prefix",
        str,
        "prefix of the cluster's Redis keys and channels (default roombus)",
        metavar="TEXT",
    ),
    _Option("jwt-issuer", str, "require this iss claim in tokens", metavar="TEXT"),
    _Option(
        "page", str, "HTML file to serve at / (default: the bundled chat page)", metavar="FILE"
    ),
    _Option("no-page", _flag, "answer / with 404 instead of serving a page", metavar="BOOL"),
    _Option(
        "no-metrics",
        _flag,
        "answer /metrics with 404 instead of counters and gauges",
        metavar="BOOL",
    ),
    _Option(
        "log-level",
        _log_level,
        "debug, info, warning or error (default info)",
        metavar="LEVEL",
    ),
)


# Settings whose value must never be echoed in an error message.
_SECRETS = frozenset({"jwt_secret", "redis"})

_METAVARS: dict[Callable[[str], Any], str] = {int: "N", float: "SECONDS", str: "TEXT"}


def _unknown_keys(table: dict[str, Any], path: str) -> ConfigError | None:
    known = {opt.dest for opt in SERVE_OPTIONS}
    for key in table:
        if key.replace("-", "_") not in known or key.replace("-", "_") == "config":
            return ConfigError(f"{path}: {key}", "unknown setting")
    return None


def _read_file(path: str) -> dict[str, Any]:
    """The settings of a TOML configuration file, keyed by option ``dest``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    if isinstance(table.get("roombus"), dict):
        others = [key for key in table if key != "roombus"]
        if others:
            raise ConfigError(f"{path}: {others[0]}", "outside the [roombus] table")
        table = table["roombus"]
    error = _unknown_keys(table, path)
    if error is not None:
        raise error
    return {key.replace("-", "_"): value for key, value in table.items()}


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
    """
    Merge flags over environment variables over the configuration file, and convert.

    Raises:
        ConfigError: naming the flag, variable or file key that is invalid.
    """
    config_path = getattr(args, "config", None) or environ.get("ROOMBUS_CONFIG")
    from_file = _read_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for opt in SERVE_OPTIONS:
        raw = getattr(args, opt.dest)
        source = f"--{opt.flag}"
        if raw is None and environ.get(opt.env, "").strip():
            # An empty variable (a blank template in a compose file) is unset, so
            # that it never silently undoes the configuration file.
            raw = environ[opt.env]
            source = opt.env
            if opt.repeat:
                raw = [part for part in raw.split(",") if part.strip()]
        if raw is None and opt.dest in from_file:
            source = f"{config_path}: {opt.flag}"
            try:
                raw = _from_toml(opt, from_file[opt.dest])
            except ValueError as exc:
                message = "must be a string" if opt.dest in _SECRETS else str(exc)
                raise ConfigError(source, message) from None
        if raw is None:
            continue
        try:
            values[opt.dest] = [opt.type(r) for r in raw] if opt.repeat else opt.type(raw)
        except (ValueError, TypeError) as exc:
            shown = "" if opt.dest in _SECRETS else f" {raw!r}"
            raise ConfigError(source, f"invalid value{shown}: {exc}") from None
    return values


def _from_toml(opt: _Option, value: object) -> Any:
    """A TOML value as the text (or list of texts) a flag would carry."""
    if opt.repeat:
        items = value if isinstance(value, list) else [value]
        return [_toml_text(v) for v in items]
    return _toml_text(value)


def _toml_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"{value!r} is not a string, number or boolean")


@attrs.frozen
class Settings:
    """What a ``serve`` command line (or the environment alone) asks for."""

    broker: BrokerConfig
    server: ServerConfig
    log_level: str
    transport: str
    authenticator: JWTAuthenticator | None = None
    ssl_context: ssl.SSLContext | None = None
    backplane: RedisBackplane | None = None
    #: What ``backplane`` was made of, to make another for a loop chosen later (ASGI).
    cluster: ClusterOptions | None = None


@attrs.frozen
class ClusterOptions:
    """The Redis backplane's settings: ``--redis`` and the options that go with it."""

    url: str
    options: dict[str, Any] = attrs.field(factory=dict)

    def backplane(self, transport: str) -> RedisBackplane:
        """A new backplane for *transport* (``trio`` or ``asyncio``).

        Raises:
            ConfigError: a bad URL, node id, TTL or prefix; or hiredis missing.
        """
        return self.asyncio_backplane() if transport == "asyncio" else self.trio_backplane()

    def trio_backplane(self) -> TrioBackplane:
        """A new :class:`roombus.trio.RedisBackplane` (see :meth:`backplane`)."""
        with _needs_hiredis():
            from .trio import RedisBackplane as backplane_class
        return backplane_class(self.url, **self.options)

    def asyncio_backplane(self) -> AsyncioBackplane:
        """A new :class:`roombus.asyncio.RedisBackplane` (see :meth:`backplane`)."""
        with _needs_hiredis():
            from .asyncio import RedisBackplane as backplane_class
        return backplane_class(self.url, **self.options)


@contextlib.contextmanager
def _needs_hiredis() -> Iterator[None]:
    """A missing hiredis as the ConfigError that names the extra."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name != "hiredis":
            raise
        raise ConfigError("redis", "needs hiredis: pip install 'roombus[redis]'") from None


def _cluster(values: dict[str, Any]) -> ClusterOptions | None:
    url = values.pop("redis", None)
    options = {
        name: values.pop(key)
        for name, key in (
            ("node_id", "node_id"),
            ("presence_ttl", "presence_ttl"),
            ("prefix", "redis_prefix"),
        )
        if key in values
    }
    if url is None:
        if options:
            raise ConfigError(next(iter(options)).replace("_", "-"), "needs --redis")
        return None
    return ClusterOptions(url, options)


def _read_bytes(setting: str, path: str) -> bytes:
    """The contents of the file a setting names; ConfigError naming it if unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from None


def _authenticator(values: dict[str, Any]) -> JWTAuthenticator | None:
    secret = values.pop("jwt_secret", None)
    key_path = values.pop("jwt_public_key", None)
    options = {
        name: values.pop(f"jwt_{name}")
        for name in ("leeway", "audience", "issuer")
        if f"jwt_{name}" in values
    }
    if secret is None and key_path is None:
        if options:
            raise ConfigError(
                "jwt-" + next(iter(options)), "needs --jwt-secret or --jwt-public-key"
            )
        return None
    if secret is not None and key_path is not None:
        raise ConfigError("jwt-secret", "give either --jwt-secret or --jwt-public-key, not both")
    public_key = None if key_path is None else _read_bytes("jwt-public-key", key_path)
    return JWTAuthenticator(secret=secret, public_key=public_key, **options)


def _ssl_context(values: dict[str, Any]) -> ssl.SSLContext | None:
    certfile = values.pop("certfile", None)
    keyfile = values.pop("keyfile", None)
    if certfile is None:
        if keyfile is not None:
            raise ConfigError("keyfile", "needs --certfile")
        return None
    for setting, path in (("certfile", certfile), ("keyfile", keyfile)):
        if path is not None:
            _read_bytes(setting, path)  # a clear error for a missing or unreadable file
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:  # before OSError, of which it is a kind
        raise ConfigError(
            "keyfile" if keyfile else "certfile",
            f"not a usable certificate and private key: {exc.reason or exc}",
        ) from None
    except OSError as exc:
        raise ConfigError("certfile", f"cannot load: {exc.strerror or exc}") from None
    return context


def build_configs(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> Settings:
    """The configs a ``serve`` command line asks for, the log level and the transport."""
    values = _settings(args, environ)
    level = values.pop("log_level", "info")
    transport = values.pop("transport", "trio")
    values["heartbeat"] = not values.pop("no_heartbeat", False)
    values["metrics"] = not values.pop("no_metrics", False)
    page_path = values.pop("page", None)
    if values.pop("no_page", False):
        page = None
    elif page_path is not None:
        page = _read_bytes("page", page_path)
    else:
        page = resources.files("roombus").joinpath("_static/chat.html").read_bytes()
    if "allowed_origin" in values:
        values["allowed_origins"] = values.pop("allowed_origin")
    authenticator = _authenticator(values)
    ssl_context = _ssl_context(values)
    cluster = _cluster(values)
    backplane = cluster.backplane(transport) if cluster is not None else None
    broker_fields = set(attrs.fields_dict(BrokerConfig))
    broker = BrokerConfig(**{k: v for k, v in values.items() if k in broker_fields})
    server = ServerConfig(page=page, **{k: v for k, v in values.items() if k not in broker_fields})
    return Settings(
        broker, server, level, transport, authenticator, ssl_context, backplane, cluster
    )


def settings_from_environ(environ: dict[str, str] | os._Environ[str]) -> Settings:
    """The settings of ``roombus serve`` with no flags: the ``ROOMBUS_*`` variables.

    Raises:
        ConfigError: naming the variable, if one is invalid.
    """
    return build_configs(_parser().parse_args(["serve"]), environ)


def _url(settings: Settings, port: int | None) -> str:
    scheme = "wss" if settings.ssl_context is not None else "ws"
    return f"{scheme}://{settings.server.host}:{port}/ws"


async def _serve(settings: Settings) -> None:
    import trio

    from .trio import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                functools.partial(
                    serve,
                    settings.broker,
                    settings.server,
                    authenticator=settings.authenticator,
                    ssl_context=settings.ssl_context,
                    backplane=settings.backplane,  # type: ignore[arg-type]  # for trio
                )
            )
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
    async with serve(
        settings.broker,
        settings.server,
        authenticator=settings.authenticator,
        ssl_context=settings.ssl_context,
        backplane=settings.backplane,  # type: ignore[arg-type]  # built for asyncio
    ) as running:
        log.info("roombus %s listening on %s (asyncio)", __version__, _url(settings, running.port))
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
    server = settings.server
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if settings.transport == "asyncio":
            import asyncio

            asyncio.run(_serve_asyncio(settings))
        else:
            import trio

            trio.run(_serve, settings)
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
