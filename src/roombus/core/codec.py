"""
The envelope codec: client JSON text -> requests, and server envelopes -> JSON bytes.

Pure functions. Decoding never raises: input it refuses becomes an :class:`Invalid`
value carrying the ``error`` code the protocol names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from json.encoder import encode_basestring

import attrs

from .names import RoomName, is_valid_room

# Error codes of the protocol's ``error`` envelope.
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
NOT_JOINED = "not_joined"
INVALID_ROOM = "invalid_room"
RATE_LIMITED = "rate_limited"
FORBIDDEN = "forbidden"


@attrs.frozen
class Chat:
    """``{"type":"chat","content":...,"room"?:R}``: publish; room None means the default."""

    room: RoomName | None
    content: object


@attrs.frozen
class Join:
    """``{"type":"join","room":R}``."""

    room: RoomName


@attrs.frozen
class Leave:
    """``{"type":"leave","room":R}``."""

    room: RoomName


@attrs.frozen
class Ping:
    """``{"type":"ping"}``: an application-level ping."""


@attrs.frozen
class Invalid:
    """A message the server refuses; answered with an ``error`` envelope."""

    code: str
    reason: str


Request = Chat | Join | Leave | Ping | Invalid

_PING = Ping()


def _no_constants(text: str) -> object:
    raise ValueError(f"not JSON: {text}")


# NaN and Infinity are not JSON. A number too large for a float (1e999) decodes to inf
# and is refused when the envelope is encoded (allow_nan=False); checking every float
# while decoding would cost a Python call per number.
_decoder = json.JSONDecoder(parse_constant=_no_constants)


def _room_field(value: object) -> RoomName | Invalid:
    if is_valid_room(value):
        return RoomName(value)  # type: ignore[arg-type]
    return Invalid(INVALID_ROOM, "room must be 1-64 characters of A-Z a-z 0-9 _ . : -")


def decode_request(text: str) -> Request:
    """
    Decode one client message.

    Fields the protocol does not define, and ``username``, ``timestamp`` and ``seq``
    on a chat, are ignored: the server sets those. A chat's ``room`` that is absent,
    null or empty (as the original clients send it) means the connection's default room.
    """
    try:
        obj = _decoder.decode(text)
    except (ValueError, RecursionError):
        return Invalid(BAD_JSON, "message is not valid JSON")
    if type(obj) is not dict:
        return Invalid(BAD_MESSAGE, "message must be a JSON object")
    kind = obj.get("type")
    if kind == "chat":
        if "content" not in obj:
            return Invalid(BAD_MESSAGE, "chat needs a content field")
        room = obj.get("room")
        if room is None or room == "":
            return Chat(None, obj["content"])
        checked = _room_field(room)
        if type(checked) is Invalid:
            return checked
        return Chat(checked, obj["content"])  # type: ignore[arg-type]
    if kind == "join" or kind == "leave":
        if "room" not in obj:
            return Invalid(BAD_MESSAGE, f"{kind} needs a room field")
        checked = _room_field(obj["room"])
        if type(checked) is Invalid:
            return checked
        return Join(checked) if kind == "join" else Leave(checked)  # type: ignore[arg-type]
    if kind == "ping":
        return _PING
    if type(kind) is not str:
        return Invalid(BAD_MESSAGE, "message needs a string type field")
    return Invalid(BAD_MESSAGE, "unknown message type")


_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode
_escape = encode_basestring  # a str as a JSON string literal, non-ASCII kept
_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
    r"""
    UTF-8 bytes of JSON text. Text is not escaped to ASCII (which would triple the
    size of non-ASCII content), except lone surrogates (JSON can carry ``"\ud800"``,
    UTF-8 cannot), which are escaped back. None reach here from a client (names and
    chat content holding one are refused); this is what keeps a server's own error
    text encodable whatever it quotes.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")


def encode(envelope: dict[str, object]) -> bytes:
    """Encode a server envelope as compact JSON, in UTF-8."""
    return _utf8(_dumps(envelope))


def check_content(content: object) -> None:
    """
    Raise ValueError (TypeError for a value JSON has no form for) unless *content*
    can be a chat's content: JSON-encodable, not nested too deeply, and Unicode
    text throughout (no lone surrogate, which UTF-8 cannot carry).
    """
    try:
        _dumps(content).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("content holds a lone surrogate, which is not Unicode text") from None
    except RecursionError:
        raise ValueError("content is nested too deeply") from None


def encode_chat(
    username: str, content: object, room: str, timestamp: int, seq: int
) -> bytes | None:
    """
    Encode a chat envelope; None when *content* cannot be re-encoded (nested too
    deeply, a number out of range such as 1e999, or a lone surrogate, which JSON
    can spell as ``"\ud800"`` but UTF-8 cannot carry: refused rather than passed
    on, so no node, client or backplane has to cope with text that is not Unicode).

    Built from pieces rather than through a dict: this runs once per published
    message, and string content (the common case) needs only the C string escaper.
    """
    if type(content) is str:
        body = _escape(content)
    else:
        try:
            body = _dumps(content)
        except (ValueError, RecursionError):
            return None
    text = (
        f'{{"type":"chat","username":{_escape(username)},"content":{body},'
        f'"room":{_escape(room)},"timestamp":{int(timestamp)},"seq":{int(seq)}}}'
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def chat_prefix(username: str, content: object, room: str, timestamp: int) -> bytes | None:
    """
    A chat envelope up to its ``seq`` value (``...,"seq":``), for a sequence number
    someone else assigns; complete it with :func:`complete_chat`. None as for
    :func:`encode_chat`.
    """
    encoded = encode_chat(username, content, room, timestamp, 0)
    return None if encoded is None else encoded[:-2]


def complete_chat(prefix: bytes, seq: int) -> bytes:
    """The chat envelope of :func:`chat_prefix`'s *prefix* with *seq*."""
    return b"%b%d}" % (prefix, seq)


def encode_presence(event: str, username: str, room: str, timestamp: int) -> bytes:
    """Encode a ``presence`` join or leave envelope."""
    verb = "joined" if event == "join" else "left"
    return encode(
        {
            "type": "presence",
            "event": event,
            "username": username,
            "content": f"{username} {verb} the room",
            "room": room,
            "timestamp": timestamp,
        }
    )


def encode_presence_state(room: str, users: Sequence[str]) -> bytes:
    """Encode a ``presence_state`` envelope; *users* must already be sorted."""
    return encode({"type": "presence_state", "room": room, "users": list(users)})


def user_literal(name: str) -> bytes:
    """*name* as a JSON string literal in UTF-8: one piece of :func:`presence_state_of`."""
    return _utf8(_escape(name))


def presence_state_of(room: str, literals: Sequence[bytes]) -> bytes:
    """
    The ``presence_state`` envelope from the sorted users' :func:`user_literal` pieces:
    the same bytes as :func:`encode_presence_state`, without encoding every name again
    (a room keeps the pieces, so a join costs a join of bytes, not a JSON encoding of
    the whole member list).
    """
    return b'{"type":"presence_state","room":%b,"users":[%b]}' % (
        user_literal(room),
        b",".join(literals),
    )


def encode_error(code: str, reason: str) -> bytes:
    """Encode an ``error`` envelope."""
    return encode({"type": "error", "code": code, "content": reason})


PONG = encode({"type": "pong"})
