"""X-Forwarded-For and Forwarded, believed only from trusted hops: examples and properties."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus.server.forwarded import (
    TrustedProxies,
    forwarded_client,
    normalize_ip,
    parse_trusted,
)

PROXY = "10.0.0.5"
TRUSTED = TrustedProxies.parse(["10.0.0.0/24", "127.0.0.1", "fd00::/8"])

addresses = st.ip_addresses().map(str)
untrusted = st.ip_addresses(v=4, network="203.0.113.0/24").map(str)
trusted_hops = st.ip_addresses(v=4, network="10.0.0.0/24").map(str)


def xff(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", value.encode())]


def fwd(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"forwarded", value.encode())]


def test_the_default_trusts_nothing() -> None:
    assert not TrustedProxies()
    assert forwarded_client(PROXY, xff("203.0.113.9"), TrustedProxies()) == PROXY


def test_an_untrusted_peer_is_its_own_client_whatever_it_claims() -> None:
    assert forwarded_client("198.51.100.1", xff("203.0.113.9"), TRUSTED) == "198.51.100.1"
    assert forwarded_client(None, xff("203.0.113.9"), TRUSTED) is None


@pytest.mark.parametrize(
    ("value", "client"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("203.0.113.9, 10.0.0.7", "203.0.113.9"),
        ("198.51.100.1, 203.0.113.9, 10.0.0.7", "203.0.113.9"),  # spoofed left entry
        ("10.0.0.8, 10.0.0.7", "10.0.0.8"),  # all trusted: the leftmost
        ("203.0.113.9:4711", "203.0.113.9"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("unknown", PROXY),
        ("203.0.113.9, garbage", PROXY),
        ("garbage, 203.0.113.9", "203.0.113.9"),
        ("", PROXY),
        (" , ", PROXY),
    ],
)
def test_x_forwarded_for_right_to_left(value: str, client: str) -> None:
    assert forwarded_client(PROXY, xff(value), TRUSTED) == client


@pytest.mark.parametrize(
    ("value", "client"),
    [
        ("for=203.0.113.9", "203.0.113.9"),
        ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
        ('For="[2001:db8::1]"', "2001:db8::1"),
        ("for=203.0.113.9;proto=https;by=10.0.0.5", "203.0.113.9"),
        ("proto=https;for=203.0.113.9", "203.0.113.9"),
        ("for=198.51.100.1, for=203.0.113.9, for=10.0.0.7", "203.0.113.9"),
        ("for=unknown", PROXY),
        ("for=_hidden, for=203.0.113.9", "203.0.113.9"),
        ("for=203.0.113.9, for=_hidden", PROXY),
        ('for="203.0.113.9:_port"', "203.0.113.9"),
        ('for="[2001:db8::1;x, y]"', PROXY),
        ("proto=https", PROXY),
        ('for="203.0.113.9", for="10.0.0.7\\"', "203.0.113.9"),
    ],
)
def test_forwarded_for_elements(value: str, client: str) -> None:
    assert forwarded_client(PROXY, fwd(value), TRUSTED) == client


def test_x_forwarded_for_wins_and_repeated_headers_are_one_list() -> None:
    headers = [*fwd("for=198.51.100.1"), *xff("203.0.113.9")]
    assert forwarded_client(PROXY, headers, TRUSTED) == "203.0.113.9"
    headers = [*xff("203.0.113.9"), *xff("10.0.0.7")]
    assert forwarded_client(PROXY, headers, TRUSTED) == "203.0.113.9"


def test_star_trusts_every_hop() -> None:
    star = TrustedProxies.parse("*")
    assert forwarded_client("198.51.100.1", xff("203.0.113.9, 198.51.100.2"), star) == "203.0.113.9"
    assert star.trusts(None)


@pytest.mark.parametrize(
    "entry", ["10.0.0.300", "10.0.0.1/8", "example.com", "10.0.0.0/33", "**", "fe80::1%eth0"]
)
def test_a_bad_entry_is_a_value_error_naming_it(entry: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address, a CIDR network or"):
        parse_trusted(f"127.0.0.1, {entry}")
    with pytest.raises(ValueError, match="is not an IP address"):
        TrustedProxies.parse([entry])


def test_entries_are_comma_separated_and_read_back() -> None:
    parsed = TrustedProxies.parse(["127.0.0.1, 10.0.0.0/8", "", "*"])
    assert parsed.entries == ["*", "127.0.0.1/32", "10.0.0.0/8"]
    assert TrustedProxies.parse(parsed.entries) == parsed


# -- properties ------------------------------------------------------------------------


@given(st.lists(trusted_hops, max_size=4), untrusted, st.lists(addresses, max_size=4))
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    hops: list[str], client: str, spoofed: list[str]
) -> None:
    chain = ", ".join([*spoofed, client, *hops])
    assert forwarded_client(PROXY, xff(chain), TRUSTED) == client
    forwarded = ", ".join(f'for="{_bracketed(a)}"' for a in [*spoofed, client, *hops])
    assert forwarded_client(PROXY, fwd(forwarded), TRUSTED) == client


@given(addresses, st.text(max_size=80))
def test_an_untrusted_peer_never_changes(peer: str, value: str) -> None:
    assert forwarded_client(peer, xff(value), TrustedProxies()) == peer
    assert forwarded_client(peer, fwd(value), TrustedProxies()) == peer


@given(st.text(max_size=120), st.sampled_from([b"x-forwarded-for", b"forwarded"]))
def test_any_header_gives_the_peer_or_an_address_it_names(value: str, name: bytes) -> None:
    """Fuzz: whatever the header holds, the answer is the peer or a valid address."""
    raw = value.encode("utf-8", "surrogatepass")
    got = forwarded_client(PROXY, [(name, raw)], TRUSTED)
    assert got == PROXY or (got is not None and normalize_ip(got) == got)


@given(addresses)
def test_normalize_ip_is_idempotent(address: str) -> None:
    once = normalize_ip(address)
    assert once is not None and normalize_ip(once) == once
    ipaddress.ip_address(once)


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address
