"""
The PROXY protocol parser: generated headers read back, at every split, and garbage
never raising anything but ProxyHeaderError.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roombus.server.proxyproto import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

FUZZ = settings(max_examples=3 * settings.default.max_examples)

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(int(a))))
pairs = st.one_of(
    st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
    st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)),
)
rest = st.binary(max_size=64)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(
    lambda items: b"".join(struct.pack("!BH", t, len(v)) + v for t, v in items)
)


def parse_all(data: bytes, **kw: int) -> ProxyHeader:
    header = parse_proxy_header(data, **kw)
    assert header is not None
    return header


@given(pairs, rest)
def test_a_v1_header_reads_back(addresses: tuple, after: bytes) -> None:
    source, destination = addresses
    header = encode_v1(source, destination)
    assert len(header) <= V1_MAX
    parsed = parse_all(header + after)
    assert parsed == ProxyHeader(version=1, source=source, destination=destination, rest=after)


@given(pairs, tlvs, rest)
def test_a_v2_header_reads_back(addresses: tuple, extra: bytes, after: bytes) -> None:
    source, destination = addresses
    parsed = parse_all(encode_v2(source, destination, tlvs=extra) + after)
    assert parsed == ProxyHeader(version=2, source=source, destination=destination, rest=after)


@given(st.one_of(st.none(), st.tuples(v4, ports)), tlvs, rest)
def test_a_v2_local_command_names_no_client(source, extra: bytes, after: bytes) -> None:
    parsed = parse_all(encode_v2(source, local=True, tlvs=extra) + after)
    assert parsed.local and parsed.source is None and parsed.rest == after


def test_unknown_and_unspec_name_no_client() -> None:
    assert parse_all(b"PROXY UNKNOWN\r\nGET").source is None
    assert parse_all(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").rest == b""
    assert parse_all(encode_v2(None) + b"x") == ProxyHeader(2, None, None, rest=b"x")
    unix = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + bytes(216)
    assert parse_all(unix).source is None
    udp = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x12, 12) + bytes(12)
    assert parse_all(udp).source is None


@given(pairs, st.booleans(), rest)
def test_every_split_needs_more_until_the_header_is_whole(
    addresses: tuple, v2: bool, after: bytes
) -> None:
    header = encode_v2(*addresses) if v2 else encode_v1(*addresses)
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None, cut
    assert parse_all(header + after).source == addresses[0]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "5 fields"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv4"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "scope"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
        (b"PROXY TCP4 " + b"1" * 100, "CRLF"),
        (b"PROXY TCP4 " + b" " * 200 + b"\r\n", "CRLF"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "signature"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c", "version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c", "command"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c", "family"),
        (V2_SIGNATURE + b"\x21\x13\x00\x0c", "family"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "under 12"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "under 36"),
    ],
)
def test_a_bad_header_is_an_error_that_says_why(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse_proxy_header(data)


def test_a_v2_header_is_bounded_before_it_is_read() -> None:
    big = encode_v2(("1.2.3.4", 1), tlvs=bytes(1000))
    assert parse_all(big).source == ("1.2.3.4", 1)
    with pytest.raises(ProxyHeaderError, match="over 512"):
        parse_proxy_header(big[:16], limit=512)
    longest = V2_SIGNATURE + b"\x21\x00\xff\xff"
    assert parse_proxy_header(longest) is None  # 65535 more bytes: within the protocol
    assert len(longest) + 0xFFFF == V2_MAX


def test_an_unterminated_v1_header_fails_at_its_bound_not_later() -> None:
    start = b"PROXY TCP6 " + b"f" * (V1_MAX - 12)
    assert parse_proxy_header(start) is None
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(start + b"f")


@FUZZ
@given(st.binary(max_size=300), st.integers(16, V2_MAX))
def test_garbage_never_raises_anything_else(data: bytes, limit: int) -> None:
    try:
        parse_proxy_header(data, limit=limit)
    except ProxyHeaderError:
        pass


@FUZZ
@given(
    pairs,
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_damaged_headers_parse_or_fail_cleanly(addresses: tuple, v2: bool, flips: list) -> None:
    """Fuzz: real headers with bytes changed are read, wait for more, or are refused."""
    data = bytearray((encode_v2 if v2 else encode_v1)(*addresses) + b"GET / HTTP/1.1\r\n")
    for at, value in flips:
        data[at % len(data)] = value
    try:
        parsed = parse_proxy_header(bytes(data))
    except ProxyHeaderError:
        return
    if parsed is not None and parsed.source is not None:
        ipaddress.ip_address(parsed.source[0])
        assert 0 <= parsed.source[1] <= 65535
