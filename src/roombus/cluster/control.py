"""
The messages of a cluster's control channel, encoded and parsed here only. Sans-IO.

A node sends a command of the server API (``disconnect``, ``kick``) to every node by
publishing it on the cluster's one control channel (``<prefix>:ctl``,
:func:`roombus.cluster.schema.control_channel`); every node listens to it while
connected, and carries out the commands of the other nodes on the connections it
holds (its own it carried out itself). A message is one JSON object:

* ``{"v":1,"from":N,"op":"disconnect","username":U,"code":C,"reason":R}``: close
  every connection of user U;
* ``{"v":1,"from":N,"op":"disconnect","connection":"<node>/<n>","code":C,"reason":R}``:
  close that one connection (on its node);
* ``{"v":1,"from":N,"op":"kick","room":ROOM,"username":U,"reason":R}``: U out of ROOM.

``from`` is the sending node's id. :func:`parse_control` accepts exactly what
:func:`encode_control` writes (valid names, a close code 1000 or 3000-4999, a
reason of at most 200 UTF-8 bytes) and answers None for anything else: it raises
nothing.
"""

from __future__ import annotations

import json
from typing import Any, Final

from ..core.actions import ControlCommand, DisconnectCommand, KickCommand
from ..core.names import RoomName, Username, is_valid_room, is_valid_username
from .room import is_valid_node_id

#: The format's version: a node ignores messages of another one.
VERSION: Final = 1
#: The longest reason a command carries, in UTF-8 bytes.
MAX_REASON_BYTES: Final = 200
#: The longest connection id.
MAX_CONNECTION: Final = 200
#: The longest control message parsed (bigger: not one of ours).
MAX_MESSAGE_BYTES: Final = 4096


def encode_control(origin: str, command: ControlCommand) -> bytes:
    """The message that sends *command* from node *origin*."""
    body: dict[str, object] = {"v": VERSION, "from": origin}
    if isinstance(command, KickCommand):
        body |= {
            "op": "kick",
            "room": command.room,
            "username": command.username,
            "reason": command.reason,
        }
    else:
        body["op"] = "disconnect"
        if command.username is not None:
            body["username"] = command.username
        else:
            body["connection"] = command.connection
        body |= {"code": command.code, "reason": command.reason}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _reason(value: object) -> str | None:
    if type(value) is not str:
        return None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        return None
    return value if size <= MAX_REASON_BYTES else None


def _connection(value: object) -> str | None:
    if type(value) is not str or not 0 < len(value) <= MAX_CONNECTION or not value.isascii():
        return None
    return value if value.isprintable() else None


def _code(value: object) -> int | None:
    if type(value) is not int or not (value == 1000 or 3000 <= value <= 4999):
        return None
    return value


def parse_control(data: bytes) -> tuple[str, ControlCommand] | None:
    """``(origin, command)`` of a control message, or None if it is not one of ours."""
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        body: Any = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None
    if type(body) is not dict or body.get("v") != VERSION or type(body.get("v")) is not int:
        return None
    if not is_valid_node_id(body.get("from")):
        return None
    origin: str = body["from"]
    op = body.get("op")
    reason = _reason(body.get("reason"))
    if reason is None:
        return None
    if op == "kick":
        if set(body) != {"v", "from", "op", "room", "username", "reason"}:
            return None
        room, username = body["room"], body["username"]
        if not is_valid_room(room) or not is_valid_username(username):
            return None
        return origin, KickCommand(room=RoomName(room), username=Username(username), reason=reason)
    if op != "disconnect":
        return None
    code = _code(body.get("code"))
    if code is None:
        return None
    if set(body) == {"v", "from", "op", "username", "code", "reason"}:
        username = body["username"]
        if not is_valid_username(username):
            return None
        return origin, DisconnectCommand(username=username, code=code, reason=reason)
    if set(body) == {"v", "from", "op", "connection", "code", "reason"}:
        connection = _connection(body["connection"])
        if connection is None:
            return None
        return origin, DisconnectCommand(connection=connection, code=code, reason=reason)
    return None


__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_REASON_BYTES",
    "VERSION",
    "encode_control",
    "parse_control",
]
