"""
The envelope codec: client JSON text -> requests, and server envelopes -> JSON bytes.

Pure functions. Decoding never raises: input it refuses becomes an :class:`Invalid`
value carrying the ``error`` code the protocol names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring

import attrs

from .names import RoomName, is_valid_request_id, is_valid_room
from .streams import Position, Recovery, Span, is_valid_epoch

# Error codes of the protocol's ``error`` envelope.
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
NOT_JOINED = "not_joined"
INVALID_ROOM = "invalid_room"
RATE_LIMITED = "rate_limited"
FORBIDDEN = "forbidden"
KICKED = "kicked"


@attrs.frozen
class Chat:
    """
    ``{"type":"chat","content":...,"room"?:R,"id"?:X}``: publish; room None means the
    default. With an *id*, the sender is acknowledged and a resend is not published twice.
    """

    room: RoomName | None
    content: object
    id: str | None = None


@attrs.frozen
class Join:
    """
    ``{"type":"join","room":R,"since"?:{"epoch":E,"seq":N}|null,"partial"?:bool}``.

    *positioned* tells a join that carried ``since`` (null included: "tell me the
    current position") from a v1 join, which is answered without ``joined``.
    """

    room: RoomName
    positioned: bool = False
    since: Position | None = None
    partial: bool = False


@attrs.frozen
class Leave:
    """``{"type":"leave","room":R}``."""

    room: RoomName


@attrs.frozen
class Ping:
    """``{"type":"ping"}``: an application-level ping."""


@attrs.frozen
class History:
    """
    ``{"type":"history","room":R,"since"?:{...}|null,"limit"?:L,"id"?:X}``: kept
    messages after *since* (the latest when None); *limit* None means the default.
    """

    room: RoomName
    since: Position | None = None
    limit: int | None = None
    id: str | None = None


@attrs.frozen
class Invalid:
    """
    A message the server refuses; answered with an ``error`` envelope, which echoes
    the message's ``id`` when it had a valid one.
    """

    code: str
    reason: str
    id: str | None = None


Request = Chat | Join | Leave | Ping | History | Invalid

_PING = Ping()


def _no_constants(text: str) -> object:
    raise ValueError(f"not JSON: {text}")


# NaN and Infinity are not JSON. A number too large for a float (1e999) decodes to inf
# and is refused when the envelope is encoded (allow_nan=False); checking every float
# while decoding would cost a Python call per number.
_decoder = json.JSONDecoder(parse_constant=_no_constants)
_scan_once: Callable[[str, int], tuple[object, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def _parse(text: str) -> object:
    """
    ``_decoder.decode(text)``, with the decoder's C scanner called directly when
    *text* is one JSON value with nothing around it (what clients send): ``decode``
    adds two regular-expression matches and two Python calls, which cost more than
    the scan itself. Anything else (whitespace around the value, extra data, not
    JSON) goes to ``decode``, for its result or its error.

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), or a NaN or Infinity.
        RecursionError: nested too deep.
    """
    try:
        obj, end = _scan_once(text, 0)
    except StopIteration:
        return _decoder.decode(text)
    if end != len(text):
        return _decoder.decode(text)
    return obj


def _room_field(value: object) -> RoomName | Invalid:
    if is_valid_room(value):
        return RoomName(value)  # type: ignore[arg-type]
    return Invalid(INVALID_ROOM, "room must be 1-64 characters of A-Z a-z 0-9 _ . : -")


_BAD_SINCE = 'since must be null or {"epoch": 1-32 of A-Z a-z 0-9 _ -, "seq": an integer >= 0}'
_BAD_ID = "id must be a string of 1-64 characters, none of them a control character"


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def decode_position(value: object) -> Position | Invalid | None:
    """A ``since`` value: a :class:`Position`, None (``null``), or :class:`Invalid`."""
    if value is None:
        return None
    if type(value) is dict:
        epoch, seq = value.get("epoch"), value.get("seq")
        if is_valid_epoch(epoch) and _is_count(seq):
            return Position(epoch, seq)  # type: ignore[arg-type]
    return Invalid(BAD_MESSAGE, _BAD_SINCE)


def decode_request(text: str) -> Request:
    """
    Decode one client message.

    Fields the protocol does not define, and ``username``, ``timestamp`` and ``seq``
    on a chat, are ignored: the server sets those. A chat's ``room`` that is absent,
    null or empty (as the original clients send it) means the connection's default room.
    """
    try:
        obj = _parse(text)
    except (ValueError, RecursionError):
        return Invalid(BAD_JSON, "message is not valid JSON")
    if type(obj) is not dict:
        return Invalid(BAD_MESSAGE, "message must be a JSON object")
    kind = obj.get("type")
    if kind == "chat":
        msg_id = obj.get("id")
        if msg_id is not None and is_valid_request_id(msg_id):
            return _decode_acked_chat(obj)
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
        if kind == "leave":
            return Leave(checked)  # type: ignore[arg-type]
        if "since" not in obj:
            return Join(checked)  # type: ignore[arg-type]
        since = decode_position(obj["since"])
        if type(since) is Invalid:
            return since
        partial = obj.get("partial", False)
        if type(partial) is not bool:
            return Invalid(BAD_MESSAGE, "partial must be true or false")
        return Join(checked, True, since, partial)  # type: ignore[arg-type]
    if kind == "ping":
        return _PING
    if kind == "history":
        return _decode_history(obj)
    if type(kind) is not str:
        return Invalid(BAD_MESSAGE, "message needs a string type field")
    return Invalid(BAD_MESSAGE, "unknown message type")


def request_id(text: str) -> str | None:
    """
    The ``id`` of a message (a chat's or a history request's), or None: for a refusal
    decided before the message is decoded (rate limiting), which must still echo it.
    """
    if '"id"' not in text:
        return None
    request = decode_request(text)
    msg_id = getattr(request, "id", None)
    return msg_id if type(msg_id) is str else None


def _decode_acked_chat(obj: dict[str, object]) -> Chat | Invalid:
    """
    A chat with a valid ``id`` (an ``id`` that is not one, as a client of the first
    protocol may send, is ignored like any unknown field); refusals echo it.
    """
    msg_id = obj["id"]
    assert type(msg_id) is str
    if "content" not in obj:
        return Invalid(BAD_MESSAGE, "chat needs a content field", msg_id)
    room = obj.get("room")
    if room is None or room == "":
        return Chat(None, obj["content"], msg_id)
    checked = _room_field(room)
    if type(checked) is Invalid:
        return Invalid(checked.code, checked.reason, msg_id)
    return Chat(checked, obj["content"], msg_id)  # type: ignore[arg-type]


def _decode_history(obj: dict[str, object]) -> History | Invalid:
    msg_id = obj.get("id")
    if msg_id is not None and not is_valid_request_id(msg_id):
        return Invalid(BAD_MESSAGE, _BAD_ID)
    echo = msg_id if type(msg_id) is str else None
    if "room" not in obj:
        return Invalid(BAD_MESSAGE, "history needs a room field", echo)
    room = _room_field(obj["room"])
    if type(room) is Invalid:
        return Invalid(room.code, room.reason, echo)
    since = decode_position(obj.get("since"))
    if type(since) is Invalid:
        return Invalid(since.code, since.reason, echo)
    limit = obj.get("limit")
    if limit is not None and not _is_count(limit):
        return Invalid(BAD_MESSAGE, "limit must be an integer >= 0", echo)
    return History(room, since, limit, echo)  # type: ignore[arg-type]


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
    """
    prefix = chat_prefix(username, content, room, timestamp)
    return None if prefix is None else complete_chat(prefix, seq)


def chat_prefix(
    username: str, content: object, room: str, timestamp: int, msg_id: str | None = None
) -> bytes | None:
    """
    A chat envelope up to its ``seq`` value (``...,"seq":``), for a sequence number
    assigned when it is numbered; complete it with :func:`complete_chat`. None as for
    :func:`encode_chat`. With *msg_id* (the sender's ``id``), the envelope carries it:
    a receiver drops a (username, id) it already has, even in another epoch (a resend
    after an ack lost across an epoch change is numbered again).

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
    ident = "" if msg_id is None else f'"id":{_escape(msg_id)},'
    text = (
        f'{{"type":"chat","username":{_escape(username)},"content":{body},{ident}'
        f'"room":{_escape(room)},"timestamp":{int(timestamp)},"seq":'
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


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


def encode_error(code: str, reason: str, msg_id: str | None = None) -> bytes:
    """Encode an ``error`` envelope (echoing the refused message's ``id``, if any)."""
    envelope: dict[str, object] = {"type": "error", "code": code, "content": reason}
    if msg_id is not None:
        envelope["id"] = msg_id
    return encode(envelope)


def encode_kicked(room: str, reason: str) -> bytes:
    """The ``error`` ``kicked`` a connection removed from *room* by the server gets."""
    return encode({"type": "error", "code": KICKED, "room": room, "content": reason})


def _span(span: Span) -> dict[str, int]:
    return {"from": span.first, "to": span.last}


def encode_joined(room: str, position: Position, recovery: Recovery) -> bytes:
    """Encode a ``joined`` envelope: *room*'s position and what the join recovered."""
    envelope: dict[str, object] = {
        "type": "joined",
        "room": room,
        "epoch": position.epoch,
        "seq": position.seq,
    }
    if recovery.recovered is not None:
        envelope["recovered"] = recovery.recovered
    if recovery.reason is not None:
        envelope["reason"] = recovery.reason
    if recovery.lost is not None:
        envelope["lost"] = _span(recovery.lost)
    if recovery.skipped is not None:
        envelope["skipped"] = _span(recovery.skipped)
    return encode(envelope)


def replayed(payload: bytes) -> bytes:
    """A kept chat envelope as a replay sends it: with ``"replayed":true``."""
    return payload[:-1] + b',"replayed":true}'


def encode_ack(msg_id: str, room: str, position: Position) -> bytes:
    """Encode the ``ack`` of an idempotent publish."""
    return encode(
        {"type": "ack", "id": msg_id, "room": room, "epoch": position.epoch, "seq": position.seq}
    )


def encode_history(
    room: str, position: Position, items: Sequence[bytes], msg_id: str | None
) -> bytes:
    """Encode a ``history`` answer; *items* are kept chat envelopes, oldest first."""
    head = encode({"type": "history", "room": room, "epoch": position.epoch, "seq": position.seq})
    tail = b"" if msg_id is None else b',"id":' + _utf8(_escape(msg_id))
    return b'%b,"items":[%b]%b}' % (head[:-1], b",".join(items), tail)


def encode_reset(room: str, position: Position, reason: str) -> bytes:
    """Encode a ``reset``: the room's continuity is lost, this is a valid position again."""
    return encode(
        {
            "type": "reset",
            "room": room,
            "epoch": position.epoch,
            "seq": position.seq,
            "reason": reason,
        }
    )


PONG = encode({"type": "pong"})
