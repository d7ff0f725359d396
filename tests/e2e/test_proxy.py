"""
Behind proxies, over loopback: a test client writes PROXY protocol headers (v1, v2)
or forwarding headers, and the per-address limit counts the clients they name.
roombus's own servers only (trio, asyncio): under an ASGI server the client address
is the server's to resolve (tests/server/test_hub_proxy.py covers the app's part).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest

from roombus.server.proxyproto import encode_v1, encode_v2

from .rawws import open_socket, parse_response_head, read_to_eof, read_until, upgrade_request
from .servers import ServerThread


@pytest.fixture(params=["trio", "asyncio"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def handshake(port: int, prefix: bytes = b"", headers: dict[str, str] | None = None, user="u"):
    """Open a connection, send *prefix* then an upgrade; (socket, status)."""
    sock = open_socket(port)
    sock.sendall(prefix + upgrade_request(f"/ws?room=lobby&username={user}", headers))
    status, _, _ = parse_response_head(read_until(sock, b"\r\n\r\n"))
    return sock, status


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for sock in held:
            sock.close()


def statuses(port: int, attempts: list[tuple[bytes, dict[str, str] | None]]) -> list[int]:
    """The status of each attempt, each connection held open until all are made."""
    out = []
    with sockets() as held:
        for i, (prefix, headers) in enumerate(attempts):
            sock, status = handshake(port, prefix, headers, user=f"u{i}")
            held.append(sock)
            out.append(status)
    return out


def test_proxy_protocol_v1_and_v2_clients_are_limited_per_claimed_address(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(proxy_protocol=True, max_connections_per_ip=1)
    got = statuses(
        srv.port,
        [
            (encode_v1(("203.0.113.1", 40001)), None),
            (encode_v2(("203.0.113.2", 40002)), None),
            (encode_v2(("2001:db8::7", 40003)), None),
            (encode_v1(("203.0.113.2", 40004)), None),  # .2 again: over its limit
            (encode_v2(None, local=True), None),  # the balancer itself: 127.0.0.1
        ],
    )
    assert got == [101, 101, 101, 429, 101]


def test_proxy_protocol_refuses_a_connection_without_a_header(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(proxy_protocol=True)
    with open_socket(srv.port) as sock:
        sock.sendall(upgrade_request())
        assert read_to_eof(sock) == b""  # closed unanswered
    sock, status = handshake(srv.port, encode_v1(("203.0.113.1", 1)))
    sock.close()
    assert status == 101


def test_a_proxy_header_that_never_completes_is_dropped_at_the_handshake_timeout(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(proxy_protocol=True, handshake_timeout=0.5)
    with open_socket(srv.port) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.1 ")
        assert read_to_eof(sock, timeout=3.0) == b""


def test_x_forwarded_for_from_a_trusted_peer_names_the_client(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(forwarded_allow_ips="127.0.0.1", max_connections_per_ip=1)
    got = statuses(
        srv.port,
        [
            (b"", {"X-Forwarded-For": "203.0.113.1"}),
            (b"", {"X-Forwarded-For": "198.51.100.9, 203.0.113.2"}),
            (b"", {"Forwarded": 'for="[2001:db8::7]:4711"'}),
            (b"", {"X-Forwarded-For": "203.0.113.1"}),  # over .1's limit
        ],
    )
    assert got == [101, 101, 101, 429]


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(forwarded_allow_ips="10.0.0.0/8", max_connections_per_ip=1)
    got = statuses(
        srv.port,
        [
            (b"", {"X-Forwarded-For": "203.0.113.1"}),
            (b"", {"X-Forwarded-For": "203.0.113.2"}),  # both are 127.0.0.1's
        ],
    )
    assert got == [101, 429]


def test_the_command_line_takes_both_options(cli) -> None:
    proc = cli("--port", "0", "--proxy-protocol", "--forwarded-allow-ips", "127.0.0.1,::1")
    port = proc.wait_listening()
    sock, status = handshake(port, encode_v2(("203.0.113.5", 9)))
    sock.close()
    assert status == 101
    bad = cli("--port", "0", "--forwarded-allow-ips", "127.0.0.1,nginx")
    assert bad.wait(15) == 2
    assert "--forwarded-allow-ips" in bad.stderr
    assert "'nginx' is not an IP address, a CIDR network or *" in bad.stderr
