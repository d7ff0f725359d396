"""The pieces of a server put together: what every adapter builds the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cluster.broker import ClusterBroker
from ..core.broker import Broker
from ..server.auth import authorizer_for

if TYPE_CHECKING:
    from ..core.auth import Authorizer
    from ..core.config import BrokerConfig
    from ..server.auth import Authenticator


def build_broker(
    broker_config: BrokerConfig | None = None,
    *,
    authorizer: Authorizer | None = None,
    authenticator: Authenticator | None = None,
    node: str | None = None,
) -> Broker:
    """
    The broker of a server: on its own, or of a cluster's node *node*.

    Args:
        broker_config: The core's limits and intervals.
        authorizer: Decides per room who may join, publish and see presence. With an
            *authenticator* and no authorizer, the identity's room rules decide (see
            :func:`~roombus.server.auth.authorizer_for`).
        authenticator: The server's authenticator, if any (only for that default).
        node: This node's id in a cluster (its backplane's), or None on its own.

    Raises:
        ConfigError: if *node* is not a valid node id.
    """
    authorizer = authorizer_for(authorizer, authenticator)
    if node is None:
        return Broker(broker_config, authorizer=authorizer)
    return ClusterBroker(broker_config, authorizer=authorizer, node=node)
