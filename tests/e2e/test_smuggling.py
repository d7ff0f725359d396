"""
Requests a proxy may read differently from the server behind it (request-smuggling
material) are never upgraded. roombus's own transports parse HTTP themselves and answer
with the status named in docs/protocol.md; behind an ASGI server, the server parses and
may refuse first in its own way, so there the test asserts only roombus's promise: no
101, and no frame read out of a body.
"""

from __future__ import annotations

import pytest

from .rawws import TIMEOUT, open_socket, parse_response_head, upgrade_request

TARGET = "/ws?room=lobby&username=ann"
# A masked text frame holding {"type":"ping"}: were the body read as frames, the client
# would get a pong (after a 101).
PING = b"\x81\x8f\x00\x00\x00\x00" + b'{"type":"ping"}'


def status_or_none(port: int, request: bytes) -> int | None:
    """The response status, or None if the server ended the connection without one."""
    with open_socket(port, timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
        except ConnectionResetError:
            return None
    return parse_response_head(data)[0]


@pytest.fixture
def port(make_server) -> int:
    return make_server(allowed_origins=["https://ok.example"]).port


def _with(*lines: str, version: str = "HTTP/1.1", body: bytes = b"") -> bytes:
    request = upgrade_request(TARGET, {"Origin": "https://ok.example"})
    head = request.removesuffix(b"\r\n").replace(b"HTTP/1.1", version.encode(), 1)
    return head + "".join(line + "\r\n" for line in lines).encode("latin-1") + b"\r\n" + body


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ("Content-Length: 21", PING + b"\x88\x80\x00\x00\x00\x00"),
        ("Transfer-Encoding: chunked", b"15\r\n" + PING + b"\r\n0\r\n\r\n"),
        ("Content-Length: 0", b""),
    ],
    ids=["content-length", "chunked", "content-length-0"],
)
def test_an_upgrade_with_body_framing_is_never_upgraded(port, caps, header, body):
    if not caps.early_frames_safe:
        # Bytes behind the head break hypercorn itself, before the app has a say (see
        # Capabilities.early_frames_safe): the header alone is what roombus answers.
        body = b""
    status = status_or_none(port, _with(header, body=body))
    assert status != 101
    if caps.owns_protocol:
        assert status == 400


def test_two_origin_headers_are_never_upgraded(port, caps):
    request = upgrade_request(TARGET, {"Origin": "https://ok.example"})
    request = request.replace(b"\r\n\r\n", b"\r\nOrigin: https://evil.example\r\n\r\n")
    status = status_or_none(port, request)
    assert status != 101
    if caps.owns_protocol:
        assert status == 403
    # And the same with the order swapped: the first one does not decide either.
    request = upgrade_request(TARGET, {"Origin": "https://evil.example"})
    request = request.replace(b"\r\n\r\n", b"\r\nOrigin: https://ok.example\r\n\r\n")
    assert status_or_none(port, request) != 101


def test_an_origin_with_a_trailing_nbsp_is_not_the_allowed_one(port, caps):
    request = upgrade_request(TARGET, {"Origin": "https://ok.example\xa0"})
    status = status_or_none(port, request)
    assert status != 101
    if caps.owns_protocol:
        assert status == 403
    # The well-formed origin still gets in.
    assert status_or_none(port, upgrade_request(TARGET, {"Origin": "https://ok.example"})) == 101


#: The transports whose HTTP parser is roombus's own (Capabilities.owns_protocol).
OWN_PARSER = ("asyncio", "trio")


@pytest.mark.parametrize("transport", OWN_PARSER, indirect=True)
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_with(version="HTTP/9.9"), 505),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 505),
        (_with().replace(b"\r\n", b"\n"), 400),
        (_with("X-Folded: a", " b"), 400),
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400),
    ],
    ids=["upgrade-9.9", "healthz-9.9", "bare-lf", "obs-fold", "healthz-bare-lf"],
)
def test_what_roombus_parses_leniently_nowhere(port, request_bytes, status):
    assert status_or_none(port, request_bytes) == status


def test_the_server_goes_on_serving(port, caps):
    body = PING if caps.early_frames_safe else b""
    for _ in range(3):
        assert status_or_none(port, _with("Content-Length: 15", body=body)) != 101
    assert status_or_none(port, upgrade_request(TARGET, {"Origin": "https://ok.example"})) == 101
