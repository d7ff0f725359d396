"""
Peer labels: how a connection's client is named in logs and counted by address.

An adapter names each connection's peer once, from what its transport reports
(:func:`peer_label`), and hands the label to the hub; the hub reads the client's IP
address back out of it (:func:`peer_address`) for the per-address limits. Both
directions live here so that they cannot drift apart. Behind a proxy
(``forwarded_allow_ips``, ``proxy_protocol``) the hub names the client the proxy
reports instead, with :func:`client_label`, and counts its address.
"""

from __future__ import annotations

import ipaddress


def peer_label(address: object, *, unknown: str = "") -> str:
    """
    The label of a peer whose transport reports *address*.

    Args:
        address: A socket's peer name: ``(host, port)`` (IPv4), ``(host, port, flow,
            scope)`` (IPv6), an ASGI scope's ``client`` (``[host, port]``), a Unix
            socket's path (``str``), or None when the transport knows none.
        unknown: The label when *address* is None or empty.

    Returns:
        ``"203.0.113.9:51234"`` or ``"::1:51234"`` for an address with a port; the
        path for a Unix socket; *unknown* otherwise.
    """
    if isinstance(address, tuple | list) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    if not address:
        return unknown
    return str(address)


def peer_address(peer: str) -> str | None:
    """
    The client address in a peer label such as ``"203.0.113.9:51234"`` or
    ``"::1:80"``; None if the label holds no IP address (a Unix socket's path, an
    ASGI server that reports no client).
    """
    host, sep, _ = peer.rpartition(":")
    try:
        return str(ipaddress.ip_address(host.strip("[]") if sep else peer))
    except ValueError:
        return None


def client_label(ip: str | None, port: int | None = None, *, unknown: str = "") -> str:
    """
    The label of a client a proxy named: *ip* (canonical) with *port* if the proxy
    gave one (the PROXY protocol does, ``X-Forwarded-For`` does not), like
    :func:`peer_label`'s.
    """
    if ip is None:
        return unknown
    return ip if port is None else peer_label((ip, port))
