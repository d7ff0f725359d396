"""What every Redis backplane driver does the same way before it connects: its
:class:`~roombus.cluster.config.ClusterConfig`, a node id when none is given, and the
TLS context of a ``rediss://`` address."""

from __future__ import annotations

import os
import re
import secrets
import socket
import ssl

import attrs

from ..cluster.config import ClusterConfig
from ..cluster.resp import RedisTLS
from ..core.errors import ConfigError


def generate_node_id() -> str:
    """A node id unique enough across restarts: host name, process id, random."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def cluster_config(
    url: str | ClusterConfig,
    *,
    node_id: str | None = None,
    presence_ttl: float = 15.0,
    prefix: str = "roombus",
    connect_timeout: float = 5.0,
) -> ClusterConfig:
    """
    The config a driver runs with: *url* as given if it is a :class:`ClusterConfig`
    (then the other arguments must keep their defaults), else one made of the
    arguments; with a generated node id if it has none.

    Raises:
        ConfigError: for a bad setting (see :class:`ClusterConfig`).
        TypeError: for a ClusterConfig together with other settings.
    """
    if isinstance(url, ClusterConfig):
        if (node_id, presence_ttl, prefix, connect_timeout) != (None, 15.0, "roombus", 5.0):
            raise TypeError("give either a ClusterConfig or the settings, not both")
        config = url
    else:
        config = ClusterConfig(
            url=url,
            node_id=node_id,
            presence_ttl=presence_ttl,
            prefix=prefix,
            connect_timeout=connect_timeout,
        )
    if config.node_id is None:
        config = attrs.evolve(config, node_id=generate_node_id())
    return config


def _readable(setting: str, path: str | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror or exc}") from None


def redis_ssl_context(tls: RedisTLS) -> ssl.SSLContext:
    """
    The client context of a ``rediss://`` address: the server's certificate verified
    (against *tls.ca_file*, or the system's authorities) and its name checked; the
    client certificate loaded if there is one. Made once per driver.

    Raises:
        ConfigError: naming the setting (``redis-ca``, ``redis-cert``, ``redis-key``)
            whose file is missing, unreadable or not PEM of the right kind.
    """
    _readable("redis-ca", tls.ca_file)
    _readable("redis-cert", tls.cert_file)
    _readable("redis-key", tls.key_file)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError("redis-ca", f"not a PEM file of certificates: {reason}") from None
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except ssl.SSLError as exc:  # before OSError, of which it is a kind
            raise ConfigError(
                "redis-key" if tls.key_file else "redis-cert",
                f"not a usable certificate and private key: {exc.reason or exc}",
            ) from None
        except OSError as exc:
            raise ConfigError("redis-cert", f"cannot load: {exc.strerror or exc}") from None
    return context
