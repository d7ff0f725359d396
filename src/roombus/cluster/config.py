"""ClusterConfig: where a node's Redis is and how it takes part in the cluster, validated once."""

from __future__ import annotations

import math
import re
from typing import Final

import attrs

from ..core.errors import ConfigError
from ..core.names import is_token
from .resp import RedisAddress, RedisTLS, parse_redis_url

#: A TLS server name: a DNS name or an address, as the certificate names it.
_SERVER_NAME: Final = re.compile(r"[A-Za-z0-9_.:-]{1,253}")


def _address(url: object) -> RedisAddress:
    if not isinstance(url, str):
        raise ConfigError(
            "redis",
            f"must be a redis://, rediss://, redis+sentinel://, redis+cluster:// or unix:// URL, "
            f"not {url!r}",
        )
    try:
        return parse_redis_url(url)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError("redis", str(exc)) from None


def _tls(address: RedisAddress, config: ClusterConfig) -> RedisAddress:
    """*address* with the TLS settings of *config*, checked (files are read later)."""
    given = {
        "redis-ca": config.tls_ca_file,
        "redis-cert": config.tls_cert_file,
        "redis-key": config.tls_key_file,
        "redis-server-name": config.tls_server_name,
    }
    for setting, value in given.items():
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(setting, f"must be a non-empty text, not {value!r}")
        if address.tls is None:
            raise ConfigError(setting, "needs a rediss:// URL (TLS)")
    if config.tls_key_file is not None and config.tls_cert_file is None:
        raise ConfigError("redis-key", "needs --redis-cert")
    name = config.tls_server_name
    if name is not None and not _SERVER_NAME.fullmatch(name):
        raise ConfigError("redis-server-name", f"must be a host name or address, not {name!r}")
    if address.tls is None:
        return address
    tls = RedisTLS(
        ca_file=config.tls_ca_file,
        cert_file=config.tls_cert_file,
        key_file=config.tls_key_file,
        server_name=name,
    )
    return attrs.evolve(address, tls=tls)


def _seconds(setting: str, value: object, low: float, high: float, *, open_low: bool) -> float:
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (low < value if open_low else low <= value)
        and value <= high
    ):
        return float(value)
    bound = f"above {low:g}" if open_low else f"{low:g}"
    raise ConfigError(setting, f"must be {bound} to {high:g} seconds, not {value!r}")


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """
    A node's part in a cluster: the settings every Redis backplane driver takes.

    Attributes:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
            ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/name[/db]``
            (the primary the sentinels know as *name*; ``rediss+sentinel://`` over TLS),
            ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` (a Redis
            Cluster, through these seed nodes; ``rediss+cluster://`` over TLS)
            or ``unix:///path``.
        node_id: This node's id, unique in the cluster (1-64 characters of
            ``A-Z a-z 0-9 _ . : -``). None: the driver generates one (host name,
            process id and a random part) when it is made.
        presence_ttl: Seconds within which the users of a node that died (without a
            goodbye) leave everywhere (0.3 to 86400).
        prefix: Prefix of every Redis key and channel (1-64 characters of the node
            id's alphabet); clusters sharing one Redis use different prefixes.
        connect_timeout: Seconds to connect to Redis, log in and set up a session
            (above 0, at most 3600).
        tls_ca_file: With a ``rediss://`` URL: the PEM file of the certificate
            authorities that signed the server's certificate (None: the system's).
        tls_cert_file: With ``rediss://``: a PEM client certificate, for a server that
            requires one (``tls-auth-clients yes``); its key too unless *tls_key_file*.
        tls_key_file: The private key of *tls_cert_file*.
        tls_server_name: With ``rediss://``: the name to verify the server's
            certificate against (and to send, SNI), when it is not the URL's host.
        address: The parsed *url*, with ``tls`` carrying the four settings above (not an
            argument): the one place a driver reads them from.

    The files are read by the driver (:func:`roombus.node.cluster.redis_ssl_context`),
    once, when it is made.

    Raises:
        ConfigError: naming the setting (``redis``, ``node-id``, ``presence-ttl``,
            ``redis-prefix``, ``redis-connect-timeout``, ``redis-ca``, ``redis-cert``,
            ``redis-key``, ``redis-server-name``) that is wrong.
    """

    url: str = attrs.field(repr=False)  # it may hold a password; the address does not show it
    node_id: str | None = None
    presence_ttl: float = 15.0
    prefix: str = "roombus"
    connect_timeout: float = 5.0
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    address: RedisAddress = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "address", _tls(_address(self.url), self))
        node = self.node_id
        if node is not None and not is_token(node):
            raise ConfigError(
                "node-id", f"must be 1-64 characters of A-Z a-z 0-9 _ . : -, not {node!r}"
            )
        set_(
            self,
            "presence_ttl",
            _seconds("presence-ttl", self.presence_ttl, 0.3, 86400, open_low=False),
        )
        if not is_token(self.prefix):
            raise ConfigError(
                "redis-prefix", f"must be 1-64 of A-Z a-z 0-9 _ . : -, not {self.prefix!r}"
            )
        set_(
            self,
            "connect_timeout",
            _seconds("redis-connect-timeout", self.connect_timeout, 0, 3600, open_low=True),
        )
