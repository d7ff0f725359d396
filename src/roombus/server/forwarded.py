"""
The client behind trusted proxies: ``X-Forwarded-For`` and RFC 7239 ``Forwarded``,
believed only from addresses the operator trusts (``--forwarded-allow-ips``). Sans-IO.

:class:`TrustedProxies` holds the trusted addresses (IPs, CIDR networks, ``*`` for
any), and :func:`forwarded_client` names a request's client: the connection's own
address, unless that is trusted and a forwarding header names the hop before it, and
so on right to left, past every trusted hop, to the first address that is not trusted
(or the leftmost, if all are). An entry that names no address (``unknown``, an
obfuscated ``_identifier``, anything unreadable) stops the walk: the last address
known stands. ``X-Forwarded-For`` is read when the request has one, else
``Forwarded``; a proxy that sets the other must remove the one it does not set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

import attrs

from .typing import Headers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Parser = Callable[[str], list[str | None]]


def normalize_ip(text: str) -> str | None:
    """*text* as an IP address in its canonical form (an IPv4-mapped IPv6 address as
    IPv4), or None if it is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)


def parse_trusted(text: str) -> list[str]:
    """
    The entries of a comma-separated list of trusted addresses, checked: each an IP
    address, a CIDR network (``10.0.0.0/8``, ``fd00::/8``) or ``*``.

    Raises:
        ValueError: an entry is none of these (the message names it).
    """
    entries = [part.strip() for part in text.split(",") if part.strip()]
    for entry in entries:
        if entry != "*":
            _network(entry)
    return entries


def _network(entry: str) -> Network:
    try:
        if "%" in entry:
            raise ValueError("a scoped address never names a peer")
        return ipaddress.ip_network(entry)
    except ValueError as exc:
        raise ValueError(f"{entry!r} is not an IP address, a CIDR network or *: {exc}") from None


@attrs.frozen
class TrustedProxies:
    """
    The addresses whose forwarding headers are believed. Empty (the default): none.

    Attributes:
        networks: The trusted networks (an address is a network of one).
        any: ``*``: every address is trusted.
    """

    networks: tuple[Network, ...] = ()
    any: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str] | str) -> TrustedProxies:
        """
        Trusted addresses from IPs, CIDR networks and ``*``, each entry possibly a
        comma-separated list.

        Raises:
            ValueError: an entry is none of these.
        """
        if isinstance(entries, str):
            entries = [entries]
        networks: list[Network] = []
        any_ = False
        for text in entries:
            for entry in parse_trusted(text):
                if entry == "*":
                    any_ = True
                else:
                    networks.append(_network(entry))
        return cls(networks=tuple(networks), any=any_)

    def __bool__(self) -> bool:
        return self.any or bool(self.networks)

    def trusts(self, ip: str | None) -> bool:
        """Whether *ip* (an address in canonical form, or None for none) is trusted."""
        if ip is None:
            return self.any
        if self.any:
            return True
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    @property
    def entries(self) -> list[str]:
        """The entries as text (``*`` first if given)."""
        return (["*"] if self.any else []) + [str(n) for n in self.networks]


def forwarded_client(peer: str | None, headers: Headers, trusted: TrustedProxies) -> str | None:
    """
    The address of the client behind the hop at *peer* (its canonical address, or
    None if it has none), by the request's *headers* (names in lower case).

    *peer* itself unless it is trusted and the request carries ``X-Forwarded-For``
    (or else ``Forwarded``); then the hops those name, right to left, past every
    trusted one.
    """
    if not trusted or not trusted.trusts(peer):
        return peer
    hops = _hops(headers, b"x-forwarded-for", _x_forwarded_for)
    if hops is None:
        hops = _hops(headers, b"forwarded", _forwarded_for)
    client = peer
    for hop in reversed(hops or ()):
        if hop is None:
            break  # a hop with no address: the last one known stands
        client = hop
        if not trusted.trusts(hop):
            break
    return client


def _hops(headers: Headers, name: bytes, parse: _Parser) -> list[str | None] | None:
    """The hops of every *name* header in order, or None if there is none."""
    values = [value for key, value in headers if key == name]
    if not values:
        return None
    hops: list[str | None] = []
    for value in values:
        hops.extend(parse(value.decode("latin-1")))
    return hops


def _host(text: str) -> str | None:
    """An address with or without a port (``1.2.3.4:80``, ``[::1]:80``, ``::1``)."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            return None
        return normalize_ip(text[1:end])
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return normalize_ip(text)


def _x_forwarded_for(value: str) -> list[str | None]:
    return [_host(part) for part in value.split(",") if part.strip()]


def _forwarded_for(value: str) -> list[str | None]:
    """The ``for=`` of each element of a ``Forwarded`` value (None: no usable one)."""
    out: list[str | None] = []
    for element in _split(value, ","):
        if not element.strip():
            continue
        found: str | None = None
        for pair in _split(element, ";"):
            key, sep, raw = pair.partition("=")
            if sep and key.strip().lower() == "for":
                raw = raw.strip()
                if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                    raw = raw[1:-1].replace("\\", "")
                found = _host(raw)  # unknown, _obfuscated: None
                break
        out.append(found)
    return out


def _split(text: str, sep: str) -> list[str]:
    """*text* split at *sep* outside double quotes (RFC 7230 quoted-string)."""
    parts: list[str] = []
    start = 0
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


__all__ = ["TrustedProxies", "forwarded_client", "normalize_ip", "parse_trusted"]
