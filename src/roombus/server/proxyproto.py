"""
The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer writes
at the start of a TCP connection to name the client it forwards. Sans-IO.

:func:`parse_proxy_header` reads it from the first bytes of a connection: a
:class:`ProxyHeader` (the client's address, or None to keep the socket's own, and the
bytes after the header), None while more bytes are needed, or
:class:`ProxyHeaderError`, and nothing else, whatever the bytes. It is bounded: a
version 1 header is at most :data:`V1_MAX` bytes, a version 2 header at most *limit*.
:func:`encode_v1` and :func:`encode_v2` write headers (for tests and test clients).

The specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

import attrs

#: The longest version 1 header, ``\\r\\n`` included (the specification's 107).
V1_MAX: Final = 107
#: The 12 bytes that start a version 2 header.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: A version 2 header's fixed part: the signature, version and command, family and
#: protocol, and the length of what follows.
V2_FIXED: Final = 16
#: The longest version 2 header the specification allows (the length is 16 bits).
V2_MAX: Final = V2_FIXED + 0xFFFF

_V1_PREFIX: Final = b"PROXY "
_V2_ADDRESS_BYTES: Final = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header (the message says why)."""


@attrs.frozen
class ProxyHeader:
    """
    A complete PROXY protocol header.

    Attributes:
        version: 1 or 2.
        source: The client's address and port, or None when the header names none the
            receiver may use: a ``LOCAL`` command (the balancer's own health check),
            ``UNKNOWN`` (version 1), or a family other than TCP over IPv4 or IPv6
            (version 2). Then the connection's own address stands.
        destination: The address and port the client connected to, or None likewise.
        local: A version 2 ``LOCAL`` command.
        rest: The bytes after the header (the start of the proxied stream).
    """

    version: int
    source: Address | None
    destination: Address | None
    local: bool = False
    rest: bytes = b""


def parse_proxy_header(data: bytes | bytearray, *, limit: int = V2_MAX) -> ProxyHeader | None:
    """
    The PROXY header at the start of *data*, or None if *data* is a valid beginning of
    one that is not complete yet.

    Args:
        data: The connection's first bytes (everything received so far).
        limit: The longest version 2 header accepted, in bytes (at most
            :data:`V2_MAX`): one declaring more is an error before it is read.

    Raises:
        ProxyHeaderError: *data* does not start with a valid header.
    """
    data = bytes(data)
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data, limit)
    if data[0] == _V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if not _V1_PREFIX.startswith(data[: len(_V1_PREFIX)]):
            raise ProxyHeaderError("no PROXY protocol signature")
        if len(data) >= V1_MAX or b"\n" in data[: V1_MAX - 1]:
            raise ProxyHeaderError(f"version 1 header without CRLF in {V1_MAX} bytes")
        return None
    line, rest = data[:end], data[end + 2 :]
    if not line.startswith(_V1_PREFIX):
        raise ProxyHeaderError("no PROXY protocol signature")
    parts = line[len(_V1_PREFIX) :].split(b" ")
    if parts[0] == b"UNKNOWN":
        # The rest of the line is to be ignored (the specification's words).
        return ProxyHeader(version=1, source=None, destination=None, rest=rest)
    if len(parts) != 5:
        raise ProxyHeaderError("version 1 header needs 5 fields after PROXY")
    proto, src, dst, sport, dport = parts
    if proto == b"TCP4":
        version = 4
    elif proto == b"TCP6":
        version = 6
    else:
        raise ProxyHeaderError("version 1 protocol is not TCP4, TCP6 or UNKNOWN")
    source = (_v1_address(src, version), _v1_port(sport))
    destination = (_v1_address(dst, version), _v1_port(dport))
    return ProxyHeader(version=1, source=source, destination=destination, rest=rest)


def _v1_address(text: bytes, version: int) -> str:
    try:
        decoded = text.decode("ascii")
        address = ipaddress.IPv4Address(decoded) if version == 4 else ipaddress.IPv6Address(decoded)
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"version 1 address is not IPv{version}") from None
    if address.version == 6 and "%" in decoded:
        raise ProxyHeaderError("version 1 address has a scope")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not (1 <= len(text) <= 5 and text.isdigit()) or (len(text) > 1 and text[0] == 0x30):
        raise ProxyHeaderError("version 1 port is not a number 0-65535")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError("version 1 port is not a number 0-65535")
    return port


def _parse_v2(data: bytes, limit: int) -> ProxyHeader | None:
    head = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(head):
        raise ProxyHeaderError("no PROXY protocol signature")
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family, protocol = data[13] >> 4, data[13] & 0x0F
    (length,) = struct.unpack_from("!H", data, 14)
    if version != 2:
        raise ProxyHeaderError(f"version 2 signature with version {version}")
    if command > 1:
        raise ProxyHeaderError(f"version 2 command {command} is neither LOCAL nor PROXY")
    if family > 3 or protocol > 2:
        raise ProxyHeaderError("version 2 family or protocol unknown")
    total = V2_FIXED + length
    if total > min(limit, V2_MAX):
        raise ProxyHeaderError(f"version 2 header of {total} bytes, over {min(limit, V2_MAX)}")
    need = _V2_ADDRESS_BYTES.get(family, 0) if command == 1 else 0
    if length < need:
        raise ProxyHeaderError(f"version 2 address block of {length} bytes, under {need}")
    if len(data) < total:
        return None
    rest = data[total:]
    if command == 0:
        # LOCAL: the balancer's own connection (a health check); addresses are ignored.
        return ProxyHeader(version=2, source=None, destination=None, local=True, rest=rest)
    if protocol != 1 or family not in (1, 2):
        # UNSPEC, UNIX or datagrams: nothing usable as a TCP client's address.
        return ProxyHeader(version=2, source=None, destination=None, rest=rest)
    block = data[V2_FIXED:total]
    size = 4 if family == 1 else 16
    make = ipaddress.IPv4Address if family == 1 else ipaddress.IPv6Address
    src = str(make(block[:size]))
    dst = str(make(block[size : 2 * size]))
    sport, dport = struct.unpack_from("!HH", block, 2 * size)
    return ProxyHeader(version=2, source=(src, sport), destination=(dst, dport), rest=rest)


def encode_v1(source: Address | None, destination: Address | None = None) -> bytes:
    """A version 1 header naming *source* (None: ``PROXY UNKNOWN``)."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    src = ipaddress.ip_address(source[0])
    dest = destination or (("0.0.0.0" if src.version == 4 else "::"), 0)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dest[0]} {source[1]} {dest[1]}\r\n".encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None = None,
    *,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    """
    A version 2 header: ``PROXY`` over TCP naming *source* (None: family UNSPEC), or
    ``LOCAL`` with *local*; *tlvs* are appended to the address block as they are.
    """
    command = 0x20 if local else 0x21
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", command, 0x00, len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    dest = destination or (("0.0.0.0" if src.version == 4 else "::"), 0)
    dst = ipaddress.ip_address(dest[0])
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], dest[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(block)) + block


__all__ = [
    "V1_MAX",
    "V2_MAX",
    "ProxyHeader",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "parse_proxy_header",
]
