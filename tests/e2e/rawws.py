"""
A raw-socket WebSocket client for tests that need to misbehave.

It speaks just enough RFC 6455 to drive a server: it builds client frames by hand
(masked or not, any opcode, RSV bits, fragmentation) and parses whatever the server
sends back, close frames included. It also sends arbitrary HTTP requests and reads
the response. Every read has a timeout; nothing here retries or sleeps.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any, NamedTuple

HOST = "127.0.0.1"
TIMEOUT = 5.0

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class Frame(NamedTuple):
    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> int | None:
        """The close code of a close frame (None if it has no body)."""
        assert self.opcode == OP_CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


class Eof(Exception):
    """The server ended the TCP connection (FIN or RST)."""


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One client frame; *length* overrides the declared payload length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def upgrade_request(
    target: str = "/ws?room=lobby&username=raw",
    headers: dict[str, str] | None = None,
    *,
    key: str | None = None,
) -> bytes:
    """A WebSocket opening request (extra *headers* are added or override)."""
    h = {
        "Host": f"{HOST}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key or base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    h.update(headers or {})
    lines = [f"GET {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def open_socket(port: int, *, rcvbuf: int | None = None, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            # Before connect, so that the TCP window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


class HttpResponse(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def parse_response_head(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response head in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, rest


def http_exchange(port: int, request: bytes, *, timeout: float = TIMEOUT) -> HttpResponse:
    """Send raw *request* bytes and read until the server closes; parse the response."""
    with open_socket(port, timeout=timeout) as sock:
        sock.sendall(request)
        data = read_to_eof(sock, timeout=timeout)
    status, headers, body = parse_response_head(data)
    return HttpResponse(status, headers, body)


def response_head(port: int, request: bytes, *, timeout: float = TIMEOUT) -> int:
    """Send *request*, read just the response head, close; returns the status."""
    with open_socket(port, timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return parse_response_head(data)[0]


def read_to_eof(sock: socket.socket, *, timeout: float = TIMEOUT) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"peer did not close within {timeout} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def get(
    port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> HttpResponse:
    """A plain HTTP/1.1 request."""
    h = {"Host": HOST, "Connection": "close"}
    h.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items()]
    return http_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


class RawWS:
    """
    A WebSocket client on a raw socket. Nothing is answered automatically (no pongs,
    no close replies) unless asked: that is the point.
    """

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self.buf = buffered

    @classmethod
    def connect(
        cls,
        port: int,
        room: str = "lobby",
        username: str = "raw",
        *,
        rcvbuf: int | None = None,
        extra: bytes = b"",
        timeout: float = TIMEOUT,
    ) -> RawWS:
        """Open a socket, do the opening handshake (plus *extra* bytes right after it)."""
        sock = open_socket(port, rcvbuf=rcvbuf, timeout=timeout)
        try:
            sock.sendall(upgrade_request(f"/ws?room={room}&username={username}") + extra)
            data = b""
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in data:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    raise Eof(f"closed during the handshake: {data!r}")
                data += chunk
            status, _, rest = parse_response_head(data)
            assert status == 101, data
        except BaseException:
            sock.close()
            raise
        return cls(sock, rest)

    def __enter__(self) -> RawWS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- sending ----------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **kw: Any) -> None:
        self.sock.sendall(client_frame(opcode, payload, **kw))

    def send_json(self, obj: Any) -> None:
        self.send_frame(OP_TEXT, json.dumps(obj).encode())

    # -- receiving --------------------------------------------------------------------

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError as exc:
            raise Eof("connection reset") from exc
        if not chunk:
            raise Eof("connection closed")
        self.buf += chunk

    def _need(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            self._fill(deadline)

    def recv_frame(self, timeout: float = TIMEOUT) -> Frame:
        """The next frame the server sent (server frames must be unmasked)."""
        deadline = time.monotonic() + timeout
        self._need(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "server frames must not be masked"
        assert not b0 & 0x70, "no extension was negotiated: RSV bits must be 0"
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            self._need(4, deadline)
            n = struct.unpack("!H", self.buf[2:4])[0]
            pos = 4
        elif n == 127:
            self._need(10, deadline)
            n = struct.unpack("!Q", self.buf[2:10])[0]
            pos = 10
        self._need(pos + n, deadline)
        payload = self.buf[pos : pos + n]
        self.buf = self.buf[pos + n :]
        return Frame(b0 & 0x0F, payload, bool(b0 & 0x80))

    def recv_json(self, timeout: float = TIMEOUT, *, answer_pings: bool = False) -> Any:
        """The next text message, decoded; pings are skipped (and answered if asked)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            if frame.opcode == OP_PING:
                if answer_pings:
                    self.send_frame(OP_PONG, frame.payload)
                continue
            assert frame.opcode == OP_TEXT and frame.fin, frame
            return json.loads(frame.payload)

    def recv_close(self, timeout: float = TIMEOUT) -> Frame:
        """Skip data and pings up to the server's close frame, and return it."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            if frame.opcode == OP_CLOSE:
                return frame

    def close_code(self, timeout: float = TIMEOUT) -> int | None:
        """The code of the server's close frame; None if the connection ended without one."""
        try:
            return self.recv_close(timeout).close_code
        except Eof:
            return None

    def wait_eof(self, timeout: float = TIMEOUT) -> list[Frame]:
        """Read frames until the server ends the TCP connection; returns them."""
        deadline = time.monotonic() + timeout
        frames = []
        while True:
            try:
                frames.append(self.recv_frame(max(deadline - time.monotonic(), 0.001)))
            except Eof:
                return frames


def read_until(sock: socket.socket, marker: bytes, *, timeout: float = TIMEOUT) -> bytes:
    """Read until *marker* has arrived (the peer may keep the connection open)."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{marker!r} did not arrive; got {data[:200]!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise Eof(f"closed before {marker!r}; got {data[:200]!r}")
        data += chunk
    return data


def read_response(port: int, request: bytes, *, timeout: float = TIMEOUT) -> HttpResponse:
    """Send *request*; read one response (head, then the body by its length), not to EOF."""
    with open_socket(port, timeout=timeout) as sock:
        sock.sendall(request)
        status, headers, body = parse_response_head(read_until(sock, b"\r\n\r\n"))
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return HttpResponse(status, headers, body)
