"""
The settings of ``roombus serve`` (and of ``roombus.asgi.create_app``): the option
table, and flags, ``ROOMBUS_*`` variables and a TOML file -> :class:`Settings`.

Every option has an environment-variable twin: ``ROOMBUS_`` + the option's name in
upper case with dashes as underscores (``--ping-interval`` -> ``ROOMBUS_PING_INTERVAL``),
and a key of the same name in a TOML configuration file (``--config FILE``). A flag
on the command line wins over its variable, which wins over the file.

:mod:`roombus._cli` makes its argument parser of :data:`SERVE_OPTIONS`.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
import sys
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import attrs

from ..cluster.config import ClusterConfig
from ..core.config import BrokerConfig
from ..core.errors import ConfigError
from ..core.streams import RoomPolicy
from ..server.auth import JWTAuthenticator
from ..server.config import ServerConfig
from ..server.forwarded import parse_trusted
from ..server.http import StaticFile
from .cluster import redis_ssl_context
from .settings import LOG_FORMATS, LOG_LEVELS, TRANSPORTS, Settings


@attrs.frozen
class _Option:
    flag: str
    type: Callable[[str], Any]
    help: str
    repeat: bool = False
    metavar: str | None = None
    #: What separates a repeatable option's values in its variable (None: whitespace).
    separator: str | None = ","

    @property
    def env(self) -> str:
        return "ROOMBUS_" + self.flag.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def is_flag(self) -> bool:
        """A switch: ``--no-page`` alone means on (its variable takes 1/0, true/false)."""
        return self.type is _flag

    @property
    def shown(self) -> str:
        """What the help shows for the value."""
        return self.metavar or _METAVARS.get(self.type, "VALUE")


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def _log_format(text: str) -> str:
    if text.strip().lower() not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return text.strip().lower()


def _transport(text: str) -> str:
    if text.strip().lower() not in TRANSPORTS:
        raise ValueError(f"must be one of {', '.join(TRANSPORTS)}")
    return text.strip().lower()


class _Said(ValueError):
    """A conversion's error that says it all: shown as it is, after the setting."""


def _port(text: str) -> int:
    """A TCP port's number (its range is :class:`ServerConfig`'s to check)."""
    try:
        return int(text)
    except ValueError:
        raise _Said(f"{text!r} is not a port (0-65535)") from None


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
    _Option("port", _port, f"TCP port (default {_defaults_s.port}; 0 picks one)", metavar="PORT"),
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
        "history-size",
        int,
        f"chat messages kept per room, for clients that rejoin with a position or ask "
        f"for history; 0: none (default {_defaults_b.history_size})",
    ),
    _Option(
        "history-ttl",
        float,
        f"seconds each kept message is kept (default {_defaults_b.history_ttl:g})",
    ),
    _Option(
        "history-max-bytes",
        int,
        f"bytes all rooms' history may take; beyond, the least recently active rooms "
        f"lose theirs first (default {_defaults_b.history_max_bytes})",
    ),
    _Option(
        "position-ttl",
        float,
        f"seconds an empty room's epoch and seq are kept after its last message or "
        f"member (default {_defaults_b.position_ttl:g})",
    ),
    _Option(
        "recovery-max",
        int,
        f"most messages one join may be replayed; at most --send-queue "
        f"(default {_defaults_b.recovery_max}, or --send-queue if smaller)",
    ),
    _Option(
        "dedup-window",
        float,
        f"seconds a chat id is remembered, so a resend is not published twice "
        f"(default {_defaults_b.dedup_window:g})",
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
        "drain-seconds",
        float,
        f"on SIGTERM, seconds over which the open WebSockets are closed (1001, "
        f"jittered) while /healthz answers 503; a second signal closes the rest at once; "
        f"0: all at once (default {_defaults_s.drain_seconds:g})",
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
    _Option(
        "forwarded-allow-ips",
        parse_trusted,
        "proxies whose X-Forwarded-For or Forwarded header names the client: IPs, CIDR "
        "networks or * (comma-separated, repeatable); default: none, the headers are "
        "never read",
        repeat=True,
        metavar="LIST",
    ),
    _Option(
        "proxy-protocol",
        _flag,
        "every connection starts with a PROXY protocol header (v1 or v2, as HAProxy's "
        "send-proxy writes it) naming the client; others are closed",
        metavar="BOOL",
    ),
    _Option("backlog", int, f"the listen backlog (default {_defaults_s.backlog})"),
    _Option(
        "api-key",
        str,
        "turn the server API on (POST /api/<method>) with this key, of at least 16 "
        "characters; KEY:publish,read grants fewer scopes (publish, read, admin; default "
        "all). Repeatable; the variable takes keys separated by spaces; prefer it or the "
        "file: a flag shows in the process list",
        repeat=True,
        metavar="KEY[:SCOPES]",
        separator=None,
    ),
    _Option(
        "api-host",
        str,
        f"address of the API's own listener, with --api-port (default {_defaults_s.api_host})",
        metavar="ADDRESS",
    ),
    _Option(
        "api-port",
        _port,
        "serve the API (with /metrics and /healthz) on a listener of its own at this port, "
        "and not on the main one (default: on the main listener)",
        metavar="PORT",
    ),
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
        "[/db], rediss://... for TLS, redis+sentinel://host:port[,host:port...]/name for the "
        "primary that sentinels know as name (default: serve alone)",
        metavar="URL",
    ),
    _Option(
        "redis-ca",
        str,
        "with rediss://: trust the certificate authorities in this PEM file "
        "(default: the system's)",
        metavar="FILE",
    ),
    _Option(
        "redis-cert",
        str,
        "with rediss://: present this PEM client certificate (and its key, unless "
        "--redis-key) to a Redis that requires one",
        metavar="FILE",
    ),
    _Option("redis-key", str, "the PEM private key of --redis-cert", metavar="FILE"),
    _Option(
        "redis-server-name",
        str,
        "with rediss://: the name the Redis certificate must have (default: the URL's host)",
        metavar="NAME",
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
        "no-script",
        _flag,
        "answer /roombus.js with 404 instead of serving the JavaScript client",
        metavar="BOOL",
    ),
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
    _Option(
        "log-format",
        _log_format,
        "text, or json: one JSON object per line, with conn, room, user and close code "
        "on every connection event (default text)",
        metavar="FORMAT",
    ),
)


# Settings whose value must never be echoed in an error message.
_SECRETS = frozenset({"jwt_secret", "redis", "api_key"})

_METAVARS: dict[Callable[[str], Any], str] = {
    int: "N",
    _port: "PORT",
    float: "SECONDS",
    str: "TEXT",
}


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
    rooms = table.pop("rooms", None)
    error = _unknown_keys(table, path)
    if error is not None:
        raise error
    values = {key.replace("-", "_"): value for key, value in table.items()}
    if rooms is not None:
        values[_ROOMS] = _room_tables(rooms, path)
    return values


#: Where the per-room tables of a configuration file go among its values.
_ROOMS = "rooms"
_ROOM_KEYS = frozenset({"history-size", "history-ttl"})


def _room_tables(rooms: object, path: str) -> list[tuple[str, int | None, float | None]]:
    """``[rooms."PATTERN"]`` tables: (pattern, history size, history TTL), in file order."""
    if not isinstance(rooms, dict):
        raise ConfigError(f"{path}: rooms", 'must be tables: [rooms."tenant-*"]')
    out: list[tuple[str, int | None, float | None]] = []
    for pattern, table in rooms.items():
        where = f'{path}: rooms."{pattern}"'
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table of history-size and history-ttl")
        unknown = sorted(set(table) - _ROOM_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", "unknown setting")
        size, ttl = table.get("history-size"), table.get("history-ttl")
        if size is not None and not (type(size) is int and size >= 0):
            raise ConfigError(f"{where}.history-size", f"must be an integer >= 0, not {size!r}")
        if ttl is not None and not (type(ttl) in (int, float) and 0 < ttl < float("inf")):
            raise ConfigError(f"{where}.history-ttl", f"must be a positive number, not {ttl!r}")
        out.append((pattern, size, None if ttl is None else float(ttl)))
    return out


def _settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """
    Merge flags over environment variables over the configuration file, and convert;
    into *sources*, where each value came from (option ``dest`` -> ``--port``,
    ``ROOMBUS_PORT`` or ``FILE: port``).

    Raises:
        ConfigError: naming the flag, variable or file key that is invalid.
    """
    config_path = flags.get("config") or environ.get("ROOMBUS_CONFIG")
    from_file = _read_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for opt in SERVE_OPTIONS:
        raw = flags.get(opt.dest)
        source = f"--{opt.flag}"
        if raw is None and environ.get(opt.env, "").strip():
            # An empty variable (a blank template in a compose file) is unset, so
            # that it never silently undoes the configuration file.
            raw = environ[opt.env]
            source = opt.env
            if opt.repeat:
                raw = [part for part in raw.split(opt.separator) if part.strip()]
        if raw is None and opt.dest in from_file:
            source = f"{config_path}: {opt.flag}"
            try:
                raw = _from_toml(opt, from_file[opt.dest])
            except ValueError as exc:
                message = "must be a string" if opt.dest in _SECRETS else str(exc)
                raise ConfigError(source, message) from None
        if raw is None:
            continue
        if sources is not None:
            sources[opt.dest] = source
        try:
            values[opt.dest] = [opt.type(r) for r in raw] if opt.repeat else opt.type(raw)
        except _Said as exc:
            raise ConfigError(source, str(exc)) from None
        except (ValueError, TypeError) as exc:
            shown = "" if opt.dest in _SECRETS else f" {raw!r}"
            raise ConfigError(source, f"invalid value{shown}: {exc}") from None
    if _ROOMS in from_file:
        values[_ROOMS] = from_file[_ROOMS]
    return values


def _from_toml(opt: _Option, value: object) -> Any:
    """A TOML value as the text (or list of texts) a flag would carry."""
    if opt.repeat:
        items = value if isinstance(value, list) else [value]
        return [_toml_text(opt, v) for v in items]
    return _toml_text(opt, value)


#: The conversions whose TOML value must be a number (never a boolean, which Python
#: counts as an int: ``port = true`` is no port 1).
_NUMBERS: frozenset[Callable[[str], Any]] = frozenset({int, float, _port})


def _toml_text(opt: _Option, value: object) -> str:
    if type(value) is bool:
        if opt.is_flag:
            return "1" if value else "0"
        wanted = "a number" if opt.type in _NUMBERS else "a string"
        raise ValueError(f"must be {wanted}, not {str(value).lower()}")
    if type(value) in (str, int, float):
        return str(value)
    raise ValueError(f"{value!r} is not a string, number or boolean")


def _cluster(values: dict[str, Any]) -> ClusterConfig | None:
    url = values.pop("redis", None)
    options = {
        name: values.pop(key)
        for name, key in (
            ("node_id", "node_id"),
            ("presence_ttl", "presence_ttl"),
            ("prefix", "redis_prefix"),
            ("tls_ca_file", "redis_ca"),
            ("tls_cert_file", "redis_cert"),
            ("tls_key_file", "redis_key"),
            ("tls_server_name", "redis_server_name"),
        )
        if key in values
    }
    if url is None:
        if options:
            raise ConfigError(_CLUSTER_SETTING[next(iter(options))], "needs --redis")
        return None
    if importlib.util.find_spec("hiredis") is None:
        raise ConfigError("redis", "needs hiredis: pip install 'roombus[redis]'")
    config = ClusterConfig(url=url, **options)  # checked here, before any loop runs
    if config.address.tls is not None:
        redis_ssl_context(config.address.tls)  # the files too: a clear error now, not later
    return config


#: The setting each ClusterConfig argument of `roombus serve` comes from.
_CLUSTER_SETTING = {
    "node_id": "node-id",
    "presence_ttl": "presence-ttl",
    "prefix": "redis-prefix",
    "tls_ca_file": "redis-ca",
    "tls_cert_file": "redis-cert",
    "tls_key_file": "redis-key",
    "tls_server_name": "redis-server-name",
}


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


def settings_from(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """
    The :class:`Settings` of ``roombus serve``: *flags* (option ``dest`` -> the text
    of a flag, or a list of texts for a repeatable one; None or absent: not given)
    over the ``ROOMBUS_*`` variables of *environ* over the configuration file (the
    ``config`` flag, or ``ROOMBUS_CONFIG``).

    Raises:
        ConfigError: naming the flag, variable or file key that is invalid.
    """
    sources: dict[str, str] = {}
    try:
        return _settings_of(_settings(flags, environ, sources))
    except ConfigError as exc:
        # A value the file gave and a config class refused: name the file's key.
        source = sources.get(exc.setting.replace("-", "_"), "")
        if source.endswith(f": {exc.setting}") and not str(exc).startswith(source):
            message = str(exc).removeprefix(f"{exc.setting}: ")
            raise ConfigError(source, message) from None
        raise


def _settings_of(values: dict[str, Any]) -> Settings:
    """:func:`settings_from`, once the values are merged and converted."""
    level = values.pop("log_level", "info")
    log_format = values.pop("log_format", "text")
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
    script = (
        None
        if values.pop("no_script", False)
        else StaticFile(
            body=resources.files("roombus").joinpath("js/roombus.js").read_bytes(),
            content_type=b"text/javascript; charset=utf-8",
        )
    )
    if "api_key" in values:
        values["api_keys"] = values.pop("api_key")
    if "allowed_origin" in values:
        values["allowed_origins"] = values.pop("allowed_origin")
    if "forwarded_allow_ips" in values:
        values["forwarded_allow_ips"] = [e for es in values["forwarded_allow_ips"] for e in es]
    authenticator = _authenticator(values)
    ssl_context = _ssl_context(values)
    cluster = _cluster(values)
    rooms = values.pop(_ROOMS, None)
    if rooms:
        # A room table's missing keys are the server-wide values.
        size = values.get("history_size", _defaults_b.history_size)
        ttl = values.get("history_ttl", _defaults_b.history_ttl)
        values["room_history"] = tuple(
            (pattern, RoomPolicy(size=size if s is None else s, ttl=ttl if t is None else t))
            for pattern, s, t in rooms
        )
    broker_fields = set(attrs.fields_dict(BrokerConfig))
    broker = BrokerConfig(**{k: v for k, v in values.items() if k in broker_fields})
    server = ServerConfig(
        page=page,
        script=script,
        **{k: v for k, v in values.items() if k not in broker_fields},
    )
    return Settings(
        broker=broker,
        server=server,
        log_level=level,
        log_format=log_format,
        transport=transport,
        authenticator=authenticator,
        ssl_context=ssl_context,
        cluster=cluster,
    )


def build_configs(args: object, environ: Mapping[str, str]) -> Settings:
    """:func:`settings_from` the attributes of *args* (an ``argparse.Namespace``)."""
    return settings_from(vars(args), environ)


def settings_from_environ(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of ``roombus serve`` with no flags: the ``ROOMBUS_*`` variables
    (of ``os.environ`` if *environ* is None).

    Raises:
        ConfigError: naming the variable, if one is invalid.
    """
    return settings_from({}, os.environ if environ is None else environ)


__all__ = ["SERVE_OPTIONS", "build_configs", "settings_from", "settings_from_environ"]
