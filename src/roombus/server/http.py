"""
Plain HTTP answers: what the server says when it does not open a WebSocket.

:class:`HttpResponse` is the decision (status, body, extra headers);
:func:`response_head` is the one place its header fields are made, for every
transport: the framed wire writes them after its status line, and an ASGI app hands
them to its server as they are.
"""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class HttpResponse:
    """
    Answer with a plain HTTP response and close.

    Attributes:
        status: The status code.
        body: The body.
        content_type: The body's media type.
        headers: Any further headers.
    """

    status: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


def response_head(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    """
    The header fields of *response*, in order: its media type and length, then
    ``connection: close`` (every plain answer ends its connection) and
    ``cache-control: no-store``, then the response's own headers.
    """
    return [
        (b"content-type", response.content_type),
        (b"content-length", b"%d" % len(response.body)),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
        *response.headers,
    ]
