"""
The Redis schema of a cluster: key and channel names, the Lua scripts, which command
each backplane action becomes, and what a reply means. Data and pure functions only:
a backplane driver sends what these build and hands back what Redis answers.

* Each room has a channel, ``<prefix>:{<room>}:c`` (:func:`channel`), listened to
  (``SSUBSCRIBE``, or ``SUBSCRIBE`` on a server without sharded pub/sub) only while
  the node has members in the room. The ``{<room>}`` hash tag keeps a room's channel
  and keys on one shard of a Redis Cluster, and spreads rooms over shards.
* ``<prefix>:{<room>}:s`` counts the room's chat messages. The ``relay`` script
  (``INCR``, then publish the record) numbers and publishes one, so ``seq`` is one
  counter per room for the whole cluster and every node, the sender's included,
  delivers messages in the same order.
* ``<prefix>:{<room>}:p`` is the room's presence, a sorted set of members
  ``"<node> <username>"`` (:func:`~roombus.cluster.records.member`), one per user per node,
  scored with its expiry (server time, ms). ``<prefix>:{<room>}:v`` counts its
  changes: each publishes a ``j``/``l`` record numbered by it, so a node reading a
  snapshot knows which records it reflects. ``announce`` adds or removes a member;
  ``refresh`` renews a node's members and removes (``reap``) those of nodes that
  stopped renewing theirs; ``snapshot`` reaps, then answers ``{version, members}``
  (:func:`parse_snapshot`).
* Keys of a room idle for :data:`KEY_TTL_MS` (no message, no presence change) are
  left to expire.

The record text the scripts publish comes from :mod:`roombus.cluster.records`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypeAlias

from ..core.actions import Announce, Relay
from ..core.events import Event, RecordReceived, RoomSynced
from ..core.names import TOKEN_PATTERN, RoomName
from .records import lua_chat_record, lua_presence_record, member, parse_member

#: One argument of a Redis command, and a command.
Arg: TypeAlias = "bytes | str | int"
Command: TypeAlias = "tuple[Arg, ...]"

#: Keys of a room idle this long (no message, no presence change) are left to expire.
KEY_TTL_MS: Final = 24 * 3600 * 1000

# The Lua scripts. {pub} is SPUBLISH or PUBLISH and {key_ttl} KEY_TTL_MS, both filled
# in by script_source(); times are the Redis server's, in ms, so the nodes' clocks do
# not matter.


def _publish(record: str) -> str:
    return f"redis.call('{{pub}}', ARGV[1], {record})"


_NEXT_VERSION: Final = "redis.call('INCR', KEYS[2])"
_NOW: Final = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)"
# KEYS: presence, version. ARGV: channel. Removes (and publishes the leave of) the
# members whose expiry has passed.
_REAP: Final = f"""
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(dead) do
  redis.call('ZREM', KEYS[1], m)
  {_publish(lua_presence_record(False, _NEXT_VERSION, "m"))}
end
"""
_KEEP: Final = """
redis.call('PEXPIRE', KEYS[1], {key_ttl})
redis.call('PEXPIRE', KEYS[2], {key_ttl})
"""
# KEYS: seq. ARGV: channel, node, ref, prefix. Returns the seq.
_RELAY: Final = f"""
local s = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], {{key_ttl}})
{_publish(lua_chat_record("s", "ARGV[2]", "ARGV[3]", "ARGV[4]"))}
return s
"""
# KEYS: presence, version. ARGV: channel, member, "1"/"0", lifetime ms.
_ANNOUNCE: Final = (
    _NOW
    + f"""
if ARGV[3] == '1' then
  if redis.call('ZADD', KEYS[1], now + ARGV[4], ARGV[2]) == 1 then
    {_publish(lua_presence_record(True, _NEXT_VERSION, "ARGV[2]"))}
  end
elseif redis.call('ZREM', KEYS[1], ARGV[2]) == 1 then
  {_publish(lua_presence_record(False, _NEXT_VERSION, "ARGV[2]"))}
end
"""
    + _KEEP
)
# KEYS: presence, version. ARGV: channel, lifetime ms, members to keep... Refresh this
# node's members first (so that a late refresh does not flap them), then reap.
_REFRESH: Final = (
    _NOW
    + f"""
for i = 3, #ARGV do
  if redis.call('ZADD', KEYS[1], now + ARGV[2], ARGV[i]) == 1 then
    {_publish(lua_presence_record(True, _NEXT_VERSION, "ARGV[i]"))}
  end
end
"""
    + _REAP
    + _KEEP
)
# KEYS: presence, version. ARGV: channel. Returns {version, members}.
_SNAPSHOT: Final = (
    _NOW
    + _REAP
    + """
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('ZRANGE', KEYS[1], 0, -1)}
"""
)

#: The scripts by name, in the order a driver loads them (``SCRIPT LOAD``).
SCRIPTS: Final[Mapping[str, str]] = {
    "relay": _RELAY,
    "announce": _ANNOUNCE,
    "refresh": _REFRESH,
    "snapshot": _SNAPSHOT,
}

_CHANNEL_RE: Final = re.compile(rb"\{(" + TOKEN_PATTERN.encode() + rb")\}:c\Z")


def publish_verb(sharded: bool) -> str:
    """The publish command: ``SPUBLISH`` with sharded pub/sub, else ``PUBLISH``."""
    return "SPUBLISH" if sharded else "PUBLISH"


def script_source(name: str, sharded: bool) -> str:
    """The Lua source of script *name* (see :data:`SCRIPTS`), ready to load."""
    return (
        SCRIPTS[name].replace("{pub}", publish_verb(sharded)).replace("{key_ttl}", str(KEY_TTL_MS))
    )


def key(prefix: str, room: str, kind: str) -> str:
    """A room's key: *kind* ``c`` (channel), ``s`` (seq), ``p`` (presence), ``v`` (version)."""
    return f"{prefix}:{{{room}}}:{kind}"


def channel(prefix: str, room: str) -> str:
    """The room's channel (what Subscribe listens to and Unsubscribe stops)."""
    return f"{prefix}:{{{room}}}:c"


def lifetime_ms(presence_ttl: float) -> int:
    """How long a presence member lives unrefreshed (refreshed every third of the TTL)."""
    return int(presence_ttl * 2000 / 3)


def command_for(
    action: Relay | Announce,
    *,
    prefix: str,
    node: str,
    shas: Mapping[str, bytes],
    lifetime: int,
) -> Command:
    """
    The command a Relay (the ``relay`` script) or an Announce (``announce``) becomes.

    Args:
        shas: The loaded scripts' SHA1s, by name.
        lifetime: :func:`lifetime_ms` of the presence TTL.
    """
    room = action.room
    if isinstance(action, Relay):
        return (
            "EVALSHA",
            shas["relay"],
            1,
            key(prefix, room, "s"),
            key(prefix, room, "c"),
            node,
            action.ref,
            action.prefix,
        )
    return (
        "EVALSHA",
        shas["announce"],
        2,
        key(prefix, room, "p"),
        key(prefix, room, "v"),
        key(prefix, room, "c"),
        member(node, action.username),
        "1" if action.present else "0",
        lifetime,
    )


def refresh_command(
    room: str,
    users: Iterable[str],
    *,
    prefix: str,
    node: str,
    shas: Mapping[str, bytes],
    lifetime: int,
) -> Command:
    """The command that renews this node's members *users* of *room* and reaps the dead."""
    return (
        "EVALSHA",
        shas["refresh"],
        2,
        key(prefix, room, "p"),
        key(prefix, room, "v"),
        key(prefix, room, "c"),
        lifetime,
        *(member(node, user) for user in users),
    )


def snapshot_command(room: str, *, prefix: str, shas: Mapping[str, bytes]) -> Command:
    """The command that reads *room*'s presence (after listening to its channel)."""
    return (
        "EVALSHA",
        shas["snapshot"],
        2,
        key(prefix, room, "p"),
        key(prefix, room, "v"),
        key(prefix, room, "c"),
    )


def parse_snapshot(room: RoomName, gen: int, reply: object) -> RoomSynced:
    """
    What a ``snapshot`` reply means: the room's presence as of its version.

    Raises:
        ValueError: the reply is not ``[version, [member, ...]]``.
    """
    try:
        pair: Any = reply
        version, members = pair
        entries = tuple(parse_member(m) for m in members)
        return RoomSynced(room=room, version=int(version), entries=entries, gen=gen)
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"unreadable presence snapshot of room {room!r}") from None


def room_of_channel(channel: bytes) -> RoomName | None:
    """The room whose channel *channel* is (any prefix), or None if it is none."""
    m = _CHANNEL_RE.search(channel)
    return None if m is None else RoomName(m.group(1).decode())


def records_received(messages: Sequence[tuple[bytes, bytes]]) -> list[Event]:
    """The records (RecordReceived) of a burst of ``(channel, data)`` messages, in order."""
    search = _CHANNEL_RE.search
    events: list[Event] = []
    for chan, data in messages:
        m = search(chan)
        if m is not None:
            events.append(RecordReceived(room=RoomName(m.group(1).decode()), data=data))
    return events


__all__ = [
    "KEY_TTL_MS",
    "SCRIPTS",
    "Arg",
    "Command",
    "channel",
    "command_for",
    "key",
    "lifetime_ms",
    "parse_snapshot",
    "publish_verb",
    "records_received",
    "refresh_command",
    "room_of_channel",
    "script_source",
    "snapshot_command",
]
