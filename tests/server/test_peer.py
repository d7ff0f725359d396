"""Peer labels: what the adapters build from a transport's address, the hub reads back."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from roombus.server.peer import peer_address, peer_label

ports = st.integers(min_value=0, max_value=65535)


@given(st.ip_addresses(v=4), ports)
def test_an_ipv4_peer_name_gives_its_address_back(ip: ipaddress.IPv4Address, port: int) -> None:
    label = peer_label((str(ip), port))
    assert label == f"{ip}:{port}"
    assert peer_address(label) == str(ip)


@given(st.ip_addresses(v=6), ports, st.integers(0, 2**20), st.integers(0, 2**8))
def test_an_ipv6_peer_name_gives_its_address_back(
    ip: ipaddress.IPv6Address, port: int, flow: int, scope: int
) -> None:
    label = peer_label((str(ip), port, flow, scope))
    assert peer_address(label) == str(ip)


@given(st.ip_addresses(), ports)
def test_an_asgi_client_list_is_labelled_like_a_socket_tuple(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    assert peer_label([str(ip), port]) == peer_label((str(ip), port))


def test_no_address_is_the_unknown_label_and_counts_for_no_ip() -> None:
    assert peer_label(None) == ""
    assert peer_label(None, unknown="asgi") == "asgi"
    assert peer_label("", unknown="asgi") == "asgi"
    assert peer_address("") is None
    assert peer_address("asgi") is None


def test_a_unix_socket_path_is_its_label_and_no_ip() -> None:
    assert peer_label("/run/roombus.sock") == "/run/roombus.sock"
    assert peer_address("/run/roombus.sock") is None
    # An abstract Unix socket name, as Linux reports it.
    assert peer_address(peer_label(b"\0roombus".decode())) is None


def test_a_hostname_is_not_taken_for_an_address() -> None:
    assert peer_address(peer_label(("localhost", 80))) is None
    assert peer_address("[::1]:80") == "::1"
