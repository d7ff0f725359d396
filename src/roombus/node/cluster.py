"""What every Redis backplane driver does the same way before it connects: its
:class:`~roombus.cluster.config.ClusterConfig`, and a node id when none is given."""

from __future__ import annotations

import os
import re
import secrets
import socket

import attrs

from ..cluster.config import ClusterConfig


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
