"""
Plain HTTP answers: what the server says when it does not open a WebSocket.

:class:`HttpResponse` is the decision (status, body, extra headers);
:func:`response_head` is the one place its header fields are made, for every
transport: the framed wire writes them after its status line, and an ASGI app hands
them to its server as they are. :class:`StaticFile` is a file served as it is (the
JavaScript client), and :func:`serve_file` its answer to a request, conditional on
``If-None-Match``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import attrs

from .typing import Headers


@attrs.frozen(kw_only=True)
class HttpResponse:
    """
    Answer with a plain HTTP response and close.

    Attributes:
        status: The status code.
        body: The body.
        content_type: The body's media type.
        headers: Any further headers.
        cache_control: The ``Cache-Control`` value: ``no-store`` (nothing a server
            says outside a WebSocket is worth keeping), but for a file that may be
            kept and revalidated (``no-cache``).
    """

    status: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    cache_control: bytes = b"no-store"


def response_head(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    """
    The header fields of *response*, in order: its media type and length, then
    ``connection: close`` (every plain answer ends its connection) and its
    ``cache-control`` (``no-store`` unless it says otherwise), then the response's own
    headers.

    A 304 has no content, so it has no media type nor length either (RFC 9110 15.4.5:
    a ``Content-Length`` there would have to be that of the 200 it stands for, and a
    server would then have to send that many bytes to a reader that counts them).
    """
    fields = (
        []
        if response.status == 304
        else [
            (b"content-type", response.content_type),
            (b"content-length", b"%d" % len(response.body)),
        ]
    )
    fields.append((b"connection", b"close"))
    fields.append((b"cache-control", response.cache_control))
    fields.extend(response.headers)
    return fields


def entity_tag(body: bytes) -> bytes:
    """A strong ``ETag`` for *body*: the first 64 bits of its SHA-256, quoted."""
    return b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"'


@attrs.frozen(kw_only=True)
class StaticFile:
    """
    A file served as it is, at one path: its bytes, media type and a strong
    ``ETag``, computed once, here, not per request.

    Attributes:
        body: The file's bytes.
        content_type: Its media type, e.g. ``b"text/javascript; charset=utf-8"``.
        etag: Its entity tag, quotes included (:func:`entity_tag` of *body*).
    """

    body: bytes = attrs.field(repr=lambda body: f"<{len(body)} bytes>")
    content_type: bytes
    etag: bytes = attrs.field(
        init=False, default=attrs.Factory(lambda self: entity_tag(self.body), takes_self=True)
    )


# One member of an If-None-Match list (RFC 9110 8.8.3 and 5.6.1): empty members and
# whitespace around them are allowed, and a weak tag's W/ is dropped (weak comparison).
_LIST_MEMBER = re.compile(rb'[ \t,]*(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|\Z)')


def none_match(values: Iterable[bytes], etag: bytes) -> bool:
    """
    Whether the ``If-None-Match`` field *values* (one per header line) name *etag*:
    ``*``, or a list of entity tags one of which is *etag* by the weak comparison
    (RFC 9110 13.1.2; ``W/"x"`` matches ``"x"``). A member that does not parse ends
    its line's list.
    """
    for value in values:
        if value.strip(b" \t") == b"*":
            return True
        pos = 0
        while (member := _LIST_MEMBER.match(value, pos)) is not None:
            if member.group(1) == etag:
                return True
            pos = member.end()
    return False


def serve_file(file: StaticFile, headers: Headers) -> HttpResponse:
    """
    *file*'s answer to a ``GET`` or ``HEAD`` with *headers* (names in lower case):
    200 with the file, or 304 without it when ``If-None-Match`` names its tag. Either
    may be kept by a cache, which revalidates it before each use (``no-cache``).
    """
    tag = ((b"etag", file.etag),)
    if none_match((value for name, value in headers if name == b"if-none-match"), file.etag):
        return HttpResponse(status=304, body=b"", headers=tag, cache_control=b"no-cache")
    return HttpResponse(
        status=200,
        body=file.body,
        content_type=file.content_type,
        headers=tag,
        cache_control=b"no-cache",
    )
