"""
One server's settings, whatever runs it: :class:`Settings`.

Every entry point takes one (``roombus.trio.serve``, ``roombus.asyncio.serve``, their
``Server``, ``roombus.asgi.RoombusASGI``, :func:`roombus.run`); ``roombus serve`` makes
one from its flags, the ``ROOMBUS_*`` variables and the configuration file
(:mod:`roombus.node.options`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from ..cluster.config import ClusterConfig
from ..core.actions import Notice
from ..core.auth import Authorizer
from ..core.config import BrokerConfig
from ..core.errors import ConfigError
from ..server.auth import Authenticator
from ..server.config import ServerConfig

if TYPE_CHECKING:
    import ssl

#: The I/O frameworks :func:`roombus.run` can run a server on.
TRANSPORTS = ("trio", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: What ``roombus serve`` writes its log as: ``text`` lines, or one JSON object per line.
LOG_FORMATS = ("text", "json")


def _transport(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in TRANSPORTS:
        raise ConfigError("transport", f"must be one of {', '.join(TRANSPORTS)}, not {value!r}")


def _log_level(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in LOG_LEVELS:
        raise ConfigError("log-level", f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")


def _log_format(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in LOG_FORMATS:
        raise ConfigError("log-format", f"must be one of {', '.join(LOG_FORMATS)}, not {value!r}")


def _instance(kind: type, setting: str) -> Any:
    def check(_: object, attribute: attrs.Attribute[object], value: object) -> None:
        if not isinstance(value, kind):
            raise ConfigError(setting, f"must be a {kind.__name__}, not {type(value).__name__}")

    return check


@attrs.frozen(kw_only=True)
class Settings:
    """
    What a server is made of: the core's limits, the transport's, who may connect and
    do what, TLS, and the cluster. Every field has a default (a server on
    ``127.0.0.1:8765``, alone, open to anyone).

    Attributes:
        broker: The core's limits and intervals.
        server: Address and transport settings.
        log_level: The ``roombus`` logger's level (``roombus serve``, ``create_app``).
        log_format: ``text`` or ``json`` (one object per line, with each connection
            event's fields): how ``roombus serve`` writes its log.
        transport: ``trio`` or ``asyncio``: what :func:`roombus.run` runs the server on.
        authenticator: Who a client is, from its request; refused requests get 401/403.
        authorizer: Per-room rights; by default the identity's room rules.
        on_notice: Called with every :data:`~roombus.Notice`, synchronously; an
            exception it raises is logged.
        ssl_context: Serve TLS (``wss://``) with this server-side context.
        cluster: Join a cluster through Redis: each adapter makes its backplane of it.
        backplane: A backplane already made (for the adapter that runs it); wins over
            *cluster*.

    Raises:
        ConfigError: for a transport, log level, log format or config of the wrong kind.
    """

    broker: BrokerConfig = attrs.field(
        factory=BrokerConfig, validator=_instance(BrokerConfig, "broker")
    )
    server: ServerConfig = attrs.field(
        factory=ServerConfig, validator=_instance(ServerConfig, "server")
    )
    log_level: str = attrs.field(default="info", validator=_log_level)
    log_format: str = attrs.field(default="text", validator=_log_format)
    transport: str = attrs.field(default="trio", validator=_transport)
    authenticator: Authenticator | None = None
    authorizer: Authorizer | None = None
    on_notice: Callable[[Notice], None] | None = None
    ssl_context: ssl.SSLContext | None = None
    cluster: ClusterConfig | None = None
    backplane: Any = None

    @classmethod
    def from_legacy(
        cls,
        settings: Settings | BrokerConfig | None = None,
        config: ServerConfig | None = None,
        /,
        **keywords: Any,
    ) -> Settings:
        """
        The one :class:`Settings` of an entry point's arguments: *settings* (the
        defaults if None) with the keywords of the older signatures folded in. The
        older signatures took a :class:`BrokerConfig` first and a
        :class:`ServerConfig` second, then ``on_notice``, ``authenticator``,
        ``authorizer``, ``ssl_context`` and ``backplane`` (and ``broker_config`` as a
        keyword); any field of :class:`Settings` is taken too. A keyword left None
        keeps what *settings* has.

        Raises:
            TypeError: for a keyword that is no setting.
        """
        base = Settings() if settings is None else settings
        changes = {name: value for name, value in keywords.items() if value is not None}
        if isinstance(base, BrokerConfig):
            changes.setdefault("broker_config", base)
            base = Settings()
        elif not isinstance(base, Settings):
            raise TypeError(f"settings must be a Settings, not {type(base).__name__}")
        if "broker_config" in changes:
            changes["broker"] = changes.pop("broker_config")
        if config is not None:
            changes["server"] = config
        unknown = sorted(set(changes) - set(attrs.fields_dict(cls)))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        return attrs.evolve(base, **changes) if changes else base


__all__ = ["LOG_FORMATS", "LOG_LEVELS", "Settings", "TRANSPORTS"]
