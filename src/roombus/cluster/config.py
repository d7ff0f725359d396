"""ClusterConfig: where a node's Redis is and how it takes part in the cluster, validated once."""

from __future__ import annotations

import math

import attrs

from ..core.errors import ConfigError
from ..core.names import is_token
from .resp import RedisAddress, parse_redis_url


def _address(url: object) -> RedisAddress:
    if not isinstance(url, str):
        raise ConfigError("redis", f"must be a redis:// or unix:// URL, not {url!r}")
    try:
        return parse_redis_url(url)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError("redis", str(exc)) from None


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
        url: ``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path``.
        node_id: This node's id, unique in the cluster (1-64 characters of
            ``A-Z a-z 0-9 _ . : -``). None: the driver generates one (host name,
            process id and a random part) when it is made.
        presence_ttl: Seconds within which the users of a node that died (without a
            goodbye) leave everywhere (0.3 to 86400).
        prefix: Prefix of every Redis key and channel (1-64 characters of the node
            id's alphabet); clusters sharing one Redis use different prefixes.
        connect_timeout: Seconds to connect to Redis, log in and set up a session
            (above 0, at most 3600).
        address: The parsed *url* (not an argument).

    Raises:
        ConfigError: naming the setting (``redis``, ``node-id``, ``presence-ttl``,
            ``redis-prefix``, ``redis-connect-timeout``) that is wrong.
    """

    url: str = attrs.field(repr=False)  # it may hold a password; the address does not show it
    node_id: str | None = None
    presence_ttl: float = 15.0
    prefix: str = "roombus"
    connect_timeout: float = 5.0
    address: RedisAddress = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "address", _address(self.url))
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
