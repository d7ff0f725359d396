"""
The Redis schema of a cluster: key and channel names, the Lua scripts, which command
each backplane action becomes, and what a reply means. Data and pure functions only:
a backplane driver sends what these build and hands back what Redis answers.

* Each room has a channel, ``<prefix>:{<room>}:c`` (:func:`channel`), listened to
  (``SSUBSCRIBE``, or ``SUBSCRIBE`` on a server without sharded pub/sub) only while
  the node has members in the room. The ``{<room>}`` hash tag keeps a room's channel
  and keys on one shard of a Redis Cluster, and spreads rooms over shards.
* A room's stream: ``<prefix>:{<room>}:e`` is its epoch and the ``run_id`` of the
  Redis server that made it (a new epoch, from the server's ``TIME``, starts ``seq``
  and the history over: when it is missing, when its seq is, or when the server is
  another run, restarted or failed over, whose data may be older than what the nodes
  saw), ``<prefix>:{<room>}:s`` counts its chat messages and
  ``<prefix>:{<room>}:h`` (a Redis stream, entry id ``<seq>-1``, fields ``p`` the
  envelope up to its seq and ``t`` the publish time in ms) keeps its history,
  ``MAXLEN ~`` the room's history size, expiring with the history TTL. The ``relay``
  script numbers, keeps and publishes one message atomically, so ``(epoch, seq)`` is
  one position per message for the whole cluster and every node, the sender's
  included, delivers messages in the same order. An acknowledged publish also sets
  ``<prefix>:{<room>}:d:<n>:<user>:<id>`` (``<n>`` the username's length) to
  ``"<epoch> <seq>"`` for the dedup window: a second publish of it within the epoch
  answers the first position and publishes nothing. ``read`` answers a range of the
  stream (:func:`parse_read`): a resume, a ``history`` request, a node's gap repair.
* ``<prefix>:{<room>}:p`` is the room's presence, a sorted set of members
  ``"<node> <username>"`` (:func:`~roombus.cluster.records.member`), one per user per node,
  scored with its expiry (server time, ms). ``<prefix>:{<room>}:v`` counts its
  changes: each publishes a ``j``/``l``/``x`` record numbered by it, so a node reading a
  snapshot knows which records it reflects. ``announce`` adds or removes a member (a
  forced leave is published even if the entry is gone); ``refresh`` renews a node's
  members and removes (``reap``) those of nodes that stopped renewing theirs,
  publishing each as an expiry (``x``); ``snapshot`` reaps, then answers
  ``{version, members, epoch, top, gone}`` (:func:`parse_snapshot`).
  ``<prefix>:{<room>}:g`` keeps the leaves (members whose node said they left, not
  expiries) for three presence TTLs, scored with their end; a member back is taken out:
  a node settling after an outage drops those at once (it keeps the others until it
  settles).
* The cluster's control channel, ``<prefix>:ctl`` (:func:`control_channel`): every
  node listens to it while connected; a command of the server API for every node
  (:class:`~roombus.core.actions.Control`, encoded by :mod:`roombus.cluster.control`)
  is published on it (:func:`control_command`) and reaches each node as a
  :class:`~roombus.core.events.ControlReceived`.
* Presence keys of a room idle for :data:`KEY_TTL_MS` (no presence change) are left
  to expire; its epoch and seq live the position TTL after its last message or read,
  or after the last refresh of a node with members in it.

The record text the scripts publish comes from :mod:`roombus.cluster.records`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Final, TypeAlias, cast

from ..core.actions import Announce, ReadCluster, ReadStream, Relay
from ..core.events import (
    ClusterRead,
    ControlReceived,
    Event,
    RecordReceived,
    Relayed,
    RoomSynced,
    StreamRead,
)
from ..core.names import TOKEN_PATTERN, RoomName
from ..core.streams import is_valid_epoch
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
  {_publish(lua_presence_record(False, _NEXT_VERSION, "m", expired=True))}
end
"""
_KEEP: Final = """
redis.call('PEXPIRE', KEYS[1], {key_ttl})
redis.call('PEXPIRE', KEYS[2], {key_ttl})
"""


# The leaves of the last three presence TTLs (KEYS[key]; ARGV[life] the lifetime, two
# thirds of the TTL): a member left (its node said so), or came back.
def _gone(key: int, m: str, life: int) -> str:
    return (
        f"redis.call('ZREMRANGEBYSCORE', KEYS[{key}], '-inf', now) "
        f"redis.call('ZADD', KEYS[{key}], now + math.floor(ARGV[{life}] * 9 / 2), {m})"
    )


def _back(key: int, m: str) -> str:
    return f"redis.call('ZREM', KEYS[{key}], {m})"


# The room's epoch, as Lua: ``local e = epoch(e, s, h, ttl, run)``. KEYS[e] holds
# "<epoch> <run_id>": an epoch is made (and seq and history start over) when it is
# missing, when its seq is (evicted), or when it was written by another run of the
# server (a restart or a failover: the data may be older than what the nodes saw).
_EPOCH: Final = """
local function epoch(ke, ks, kh, ttl, run)
  local v = redis.call('GET', ke)
  if v then
    local sp = string.find(v, ' ', 1, true)
    if sp and string.sub(v, sp + 1) == run and redis.call('EXISTS', ks) == 1 then
      return string.sub(v, 1, sp - 1)
    end
  end
  local t = redis.call('TIME')
  local e = 'R' .. t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', ke, e .. ' ' .. run, 'PX', ttl)
  redis.call('SET', ks, 0, 'PX', ttl)
  redis.call('DEL', kh)
  return e
end
"""
# KEYS: seq, epoch, history[, dedup]. ARGV: channel, node, ref, prefix, keep, keep ms,
# position ms, dedup ms, run id. Returns {seq, epoch, duplicate 0/1}.
_RELAY: Final = (
    _EPOCH
    + f"""
local e = epoch(KEYS[2], KEYS[1], KEYS[3], ARGV[7], ARGV[9])
if KEYS[4] then
  local d = redis.call('GET', KEYS[4])
  if d then
    local sp = string.find(d, ' ', 1, true)
    if sp and string.sub(d, 1, sp - 1) == e then
      return {{tonumber(string.sub(d, sp + 1)), e, 1}}
    end
  end
end
local s = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
if tonumber(ARGV[5]) > 0 then
  local t = redis.call('TIME')
  local ms = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], s .. '-1', 'p', ARGV[4], 't', ms)
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
if KEYS[4] then
  redis.call('SET', KEYS[4], e .. ' ' .. s, 'PX', ARGV[8])
end
{_publish(lua_chat_record("s", "ARGV[2]", "ARGV[3]", "e", "ARGV[4]"))}
return {{s, e, 0}}
"""
)
# KEYS: seq, epoch, history. ARGV: after, upto, count, keep, keep ms, position ms,
# oldest '1'/'0', run id. Returns {epoch, top, first kept, {seq, prefix, ...}}: the latest
# (oldest '1': the first) `count` kept messages in after+1..upto (upto 0 or above the
# top: the top).
_READ: Final = (
    _EPOCH
    + """
local e = epoch(KEYS[2], KEYS[1], KEYS[3], ARGV[6], ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local keep = tonumber(ARGV[4])
local first = top + 1
if keep > 0 and top > 0 then
  local t = redis.call('TIME')
  local cut = t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ARGV[5])
  local start = math.max(1, top - keep + 1) .. '-0'
  while first > top do
    local batch = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', 64)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      local f = entry[2]
      for i = 1, #f, 2 do
        if f[i] == 't' and tonumber(f[i + 1]) >= cut then
          first = tonumber(string.match(entry[1], '^(%d+)'))
        end
      end
      if first <= top then break end
    end
    start = '(' .. batch[#batch][1]
  end
end
local upto = tonumber(ARGV[2])
if upto <= 0 or upto > top then upto = top end
local from = math.max(tonumber(ARGV[1]) + 1, first)
if ARGV[7] == '1' then
  upto = math.min(upto, from + tonumber(ARGV[3]) - 1)
else
  from = math.max(from, upto - tonumber(ARGV[3]) + 1)
end
local out = {}
if from <= upto then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[3], from .. '-0', upto .. '-1')) do
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'p' then
        out[#out + 1] = tonumber(string.match(entry[1], '^(%d+)'))
        out[#out + 1] = f[i + 1]
      end
    end
  end
end
return {e, top, first, out}
"""
)
# KEYS: presence, version, gone. ARGV: channel, member, "1" (join) / "0" (leave) / "2"
# (leave, published even if the entry is gone: it may have expired, and been published
# as an expiry, which the other nodes may hold back), lifetime ms. A leave is kept in
# gone for three TTLs, for the snapshots of nodes settling after an outage.
_ANNOUNCE: Final = (
    _NOW
    + f"""
if ARGV[3] == '1' then
  if redis.call('ZADD', KEYS[1], now + ARGV[4], ARGV[2]) == 1 then
    {_back(3, "ARGV[2]")}
    {_publish(lua_presence_record(True, _NEXT_VERSION, "ARGV[2]"))}
  end
elseif redis.call('ZREM', KEYS[1], ARGV[2]) == 1 or ARGV[3] == '2' then
  {_gone(3, "ARGV[2]", 4)}
  redis.call('PEXPIRE', KEYS[3], {{key_ttl}})
  {_publish(lua_presence_record(False, _NEXT_VERSION, "ARGV[2]"))}
end
"""
    + _KEEP
)
# KEYS: presence, version, epoch, seq, gone. ARGV: channel, lifetime ms, position ms,
# members to keep... Refresh this node's members first (so that a late refresh does
# not flap them), then reap; a room with members keeps its stream's position.
_REFRESH: Final = (
    _NOW
    + f"""
for i = 4, #ARGV do
  if redis.call('ZADD', KEYS[1], now + ARGV[2], ARGV[i]) == 1 then
    {_back(5, "ARGV[i]")}
    {_publish(lua_presence_record(True, _NEXT_VERSION, "ARGV[i]"))}
  end
end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
"""
    + _REAP
    + _KEEP
)
# KEYS: presence, version, epoch, seq, history, gone. ARGV: channel, position ms, run
# id. Returns {version, members, epoch, top, gone} (an epoch made if the room has none;
# gone: the members that left within three TTLs).
_SNAPSHOT: Final = (
    _EPOCH
    + _NOW
    + _REAP
    + """
local e = epoch(KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('ZRANGE', KEYS[1], 0, -1),
        e, tonumber(redis.call('GET', KEYS[4]) or '0'), redis.call('ZRANGE', KEYS[6], 0, -1)}
"""
)

#: The scripts by name, in the order a driver loads them (``SCRIPT LOAD``).
SCRIPTS: Final[Mapping[str, str]] = {
    "relay": _RELAY,
    "read": _READ,
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
    """
    A room's key: *kind* ``c`` (channel), ``s`` (seq), ``e`` (epoch), ``h`` (history),
    ``p`` (presence), ``v`` (version), ``g`` (the leaves of the last three TTLs).
    """
    return f"{prefix}:{{{room}}}:{kind}"


def channel(prefix: str, room: str) -> str:
    """The room's channel (what Subscribe listens to and Unsubscribe stops)."""
    return f"{prefix}:{{{room}}}:c"


def control_channel(prefix: str) -> str:
    """The cluster's control channel (every node listens to it while connected)."""
    return f"{prefix}:ctl"


def control_command(prefix: str, data: bytes, *, sharded: bool) -> Command:
    """The command that publishes control message *data* to every node."""
    return (publish_verb(sharded), control_channel(prefix), data)


def lifetime_ms(presence_ttl: float) -> int:
    """How long a presence member lives unrefreshed (refreshed every third of the TTL)."""
    return int(presence_ttl * 2000 / 3)


def dedup_key(prefix: str, room: str, username: str, msg_id: str) -> str:
    """The key that remembers an acknowledged publish of *username* with *msg_id*."""
    return key(prefix, room, f"d:{len(username)}:{username}:{msg_id}")


def command_for(
    action: Relay | Announce | ReadStream,
    *,
    prefix: str,
    node: str,
    shas: Mapping[str, bytes],
    lifetime: int,
    run: str = "",
) -> Command:
    """
    The command a Relay (the ``relay`` script), a ReadStream (``read``) or an Announce
    (``announce``) becomes.

    Args:
        shas: The loaded scripts' SHA1s, by name.
        lifetime: :func:`lifetime_ms` of the presence TTL.
        run: The Redis server's ``run_id`` (the epochs are tied to it).
    """
    room = action.room
    if isinstance(action, Relay):
        dedup = action.dedup
        keys: tuple[str, ...] = tuple(key(prefix, room, kind) for kind in "seh")
        if dedup is not None:
            keys += (dedup_key(prefix, room, *dedup),)
        return (
            "EVALSHA",
            shas["relay"],
            len(keys),
            *keys,
            key(prefix, room, "c"),
            node,
            action.ref,
            action.prefix,
            action.keep,
            max(1, action.keep_ms),
            max(1, action.position_ms),
            max(1, action.dedup_ms),
            run,
        )
    if isinstance(action, ReadStream):
        return (
            "EVALSHA",
            shas["read"],
            3,
            key(prefix, room, "s"),
            key(prefix, room, "e"),
            key(prefix, room, "h"),
            action.after,
            action.upto,
            action.count,
            action.keep,
            max(1, action.keep_ms),
            max(1, action.position_ms),
            "1" if action.oldest else "0",
            run,
        )
    return (
        "EVALSHA",
        shas["announce"],
        3,
        key(prefix, room, "p"),
        key(prefix, room, "v"),
        key(prefix, room, "g"),
        key(prefix, room, "c"),
        member(node, action.username),
        "1" if action.present else "2" if action.force else "0",
        lifetime,
    )


def _epoch(value: Any) -> str:
    epoch = value.decode("ascii")
    if not is_valid_epoch(epoch):
        raise ValueError(epoch)
    return str(epoch)


def parse_relayed(action: Relay, reply: object) -> Relayed:
    """
    What a ``relay`` reply means, for an acknowledged publish: the message's position,
    and whether it was a duplicate.

    Raises:
        ValueError: the reply is not ``[seq, epoch, 0 | 1]``.
    """
    try:
        triple: Any = reply
        seq, epoch, dup = triple
        return Relayed(
            room=action.room,
            ref=action.ref,
            epoch=_epoch(epoch),
            seq=int(seq),
            duplicate=int(dup) == 1,
        )
    except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"unreadable relay reply for room {action.room!r}") from None


def _seq(value: object) -> int:
    """A stream entry's seq: a positive integer (or its decimal bytes)."""
    seq: int = int(value)  # type: ignore[call-overload]
    if not 0 < seq < 2**63:
        raise ValueError
    return seq


def parse_read(action: ReadStream, reply: object) -> StreamRead:
    """
    What a ``read`` reply means: the room's stream position and the messages read.

    Raises:
        ValueError: the reply is not ``[epoch, top, first kept, [seq, prefix, ...]]``.
    """
    try:
        quad: Any = reply
        epoch, top, first, flat = quad
        if not isinstance(flat, list) or len(flat) % 2:
            raise ValueError
        entries = tuple((_seq(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2))
        if not all(type(prefix) is bytes for _, prefix in entries):
            raise ValueError
        return StreamRead(
            room=action.room,
            ticket=action.ticket,
            epoch=_epoch(epoch),
            top=int(top),
            first_kept=int(first),
            entries=tuple(entries),
        )
    except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"unreadable stream read of room {action.room!r}") from None


def refresh_command(
    room: str,
    users: Iterable[str],
    *,
    prefix: str,
    node: str,
    shas: Mapping[str, bytes],
    lifetime: int,
    position_ms: int = 86_400_000,
) -> Command:
    """
    The command that renews this node's members *users* of *room*, reaps the dead,
    and keeps the room's stream position alive (*position_ms* more).
    """
    return (
        "EVALSHA",
        shas["refresh"],
        5,
        key(prefix, room, "p"),
        key(prefix, room, "v"),
        key(prefix, room, "e"),
        key(prefix, room, "s"),
        key(prefix, room, "g"),
        key(prefix, room, "c"),
        lifetime,
        max(1, position_ms),
        *(member(node, user) for user in users),
    )


def snapshot_command(
    room: str,
    *,
    prefix: str,
    shas: Mapping[str, bytes],
    position_ms: int = 86_400_000,
    run: str = "",
) -> Command:
    """The command that reads *room*'s presence and position (after listening to it)."""
    return (
        "EVALSHA",
        shas["snapshot"],
        6,
        key(prefix, room, "p"),
        key(prefix, room, "v"),
        key(prefix, room, "e"),
        key(prefix, room, "s"),
        key(prefix, room, "h"),
        key(prefix, room, "g"),
        key(prefix, room, "c"),
        max(1, position_ms),
        run,
    )


def parse_snapshot(room: RoomName, gen: int, reply: object) -> RoomSynced:
    """
    What a ``snapshot`` reply means: the room's presence as of its version, and its
    stream's position then.

    Raises:
        ValueError: the reply is not ``[version, [member, ...], epoch, top, [gone,
            ...]]`` (or the four first, as before the leaves were kept).
    """
    try:
        items: Any = reply
        version, members, epoch, top, *rest = items
        if len(rest) > 1:
            raise ValueError
        entries = tuple(parse_member(m) for m in members)
        gone = tuple(parse_member(m) for m in rest[0]) if rest else ()
        return RoomSynced(
            room=room,
            version=int(version),
            entries=entries,
            gen=gen,
            epoch=_epoch(epoch),
            seq=int(top),
            gone=gone,
        )
    except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"unreadable presence snapshot of room {room!r}") from None


def room_of_channel(channel: bytes) -> RoomName | None:
    """The room whose channel *channel* is (any prefix), or None if it is none."""
    m = _CHANNEL_RE.search(channel)
    return None if m is None else RoomName(m.group(1).decode())


def records_received(
    messages: Sequence[tuple[bytes, bytes]], control: bytes | None = None
) -> list[Event]:
    """
    The records (RecordReceived) of a burst of ``(channel, data)`` messages, in order;
    with *control* (:func:`control_channel`, encoded), those of that channel as
    ControlReceived.
    """
    search = _CHANNEL_RE.search
    events: list[Event] = []
    for chan, data in messages:
        m = search(chan)
        if m is not None:
            events.append(RecordReceived(room=RoomName(m.group(1).decode()), data=data))
        elif chan == control:
            events.append(ControlReceived(data=data))
    return events


__all__ = [
    "KEY_TTL_MS",
    "SCRIPTS",
    "Arg",
    "Command",
    "channel",
    "command_for",
    "control_channel",
    "control_command",
    "dedup_key",
    "key",
    "lifetime_ms",
    "parse_read",
    "parse_relayed",
    "parse_snapshot",
    "publish_verb",
    "records_received",
    "refresh_command",
    "room_of_channel",
    "script_source",
    "snapshot_command",
]


# -- the server API's cluster-wide view ------------------------------------------------
#
# Three keys of the cluster as a whole, with one hash tag (``{@}``: no room is named
# so) so that a script may use them together on a Redis Cluster:
#
# * ``<prefix>:{@}:nodes`` (:func:`index_key`): the live nodes, a sorted set of node
#   ids scored with the time (server time, ms) each last renewed its entry: at every
#   presence refresh and with every announce of a join. An entry older than the
#   presence lifetime (:func:`lifetime_ms`) is a dead node's: ignored and trimmed.
# * ``<prefix>:{@}:rooms``: the room index, a sorted set of room names all scored 0
#   (listed by name, ``ZRANGEBYLEX``), and ``<prefix>:{@}:seen``: the same names
#   scored with the time a node with members in the room last renewed it (where the
#   presence is renewed). A name not renewed within the lifetime is ignored, and
#   trimmed (from both) by the next ``touch``.
#
# A room's presence set lives under its own hash tag, so the index cannot be changed
# in the same script as the presence: a room whose last member left stays listed until
# its entry is older than the lifetime.

# KEYS: rooms, seen, nodes. ARGV: lifetime ms, node, rooms... Renews the node and the
# rooms, trims what no one renewed within the lifetime (at most 256 rooms a call).
_TOUCH: Final = (
    _NOW
    + """
local cut = now - tonumber(ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[2], now, ARGV[i])
  redis.call('ZADD', KEYS[1], 0, ARGV[i])
end
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. cut, 'LIMIT', 0, 256)) do
  redis.call('ZREM', KEYS[2], r)
  redis.call('ZREM', KEYS[1], r)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. cut)
redis.call('PEXPIRE', KEYS[1], {key_ttl})
redis.call('PEXPIRE', KEYS[2], {key_ttl})
redis.call('PEXPIRE', KEYS[3], {key_ttl})
"""
)
# KEYS: rooms, seen. ARGV: lifetime ms, start, stop (ZRANGEBYLEX bounds), Lua pattern,
# limit, budget. Returns {names, last}: up to `limit` live names matching the pattern,
# in order from `start`, looking at no more than `budget` names; `last` is the last
# name looked at ("" if the index holds no more).
_ROOMS: Final = (
    _NOW
    + """
local cut = now - tonumber(ARGV[1])
local limit = tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local out = {}
local last = ''
local from = ARGV[2]
local looked = 0
while #out < limit and looked < budget do
  local batch = redis.call('ZRANGEBYLEX', KEYS[1], from, ARGV[3], 'LIMIT', 0, 100)
  if #batch == 0 then return {out, ''} end
  for _, r in ipairs(batch) do
    looked = looked + 1
    last = r
    local seen = redis.call('ZSCORE', KEYS[2], r)
    if seen and tonumber(seen) >= cut and string.find(r, ARGV[4]) then
      out[#out + 1] = r
    end
    if #out >= limit or looked >= budget then break end
  end
  from = '(' .. last
end
if #redis.call('ZRANGEBYLEX', KEYS[1], '(' .. last, ARGV[3], 'LIMIT', 0, 1) == 0 then
  last = ''
end
return {out, last}
"""
)
# KEYS: nodes. ARGV: lifetime ms. Trims the dead; returns {node, ms since renewed, ...}.
_NODES: Final = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))
local out = {}
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = now - tonumber(all[i + 1])
end
return out
"""
)
# KEYS: presence. Returns the live members (expiry still to come), a read only.
_MEMBERS: Final = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""
)

# Loaded with the others, after them (the earlier scripts keep their order).
cast("dict[str, str]", SCRIPTS).update(touch=_TOUCH, rooms=_ROOMS, nodes=_NODES, members=_MEMBERS)

#: The most names of the room index one ``rooms`` read looks at: a page may hold fewer
#: than its limit (even none) with a cursor when few names match the pattern.
ROOMS_BUDGET: Final = 5000

#: The characters of a room name (what a glob is matched against).
_ROOM_CHARS: Final = "".join(
    sorted("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
)


def index_key(prefix: str, kind: str) -> str:
    """A key of the cluster as a whole: *kind* ``nodes``, ``rooms`` or ``seen``."""
    return f"{prefix}:{{@}}:{kind}"


def _lua_char(c: str) -> str:
    """A room character as a Lua pattern matching just it; any other, a set nothing
    matches (no room holds a '!')."""
    if c not in _ROOM_CHARS:
        return "[%!]"
    return c if c.isalnum() else "%" + c


def glob_to_lua(pattern: str) -> tuple[str, str]:
    """
    A glob (``*``, ``?``, ``[...]``, ``[!...]``, as :func:`fnmatch.fnmatchcase`) as
    an anchored Lua pattern matching the same room names, and its literal prefix
    (what every match starts with).
    """
    out = ["^"]
    prefix: list[str] = []
    fixed = True  # still in the literal prefix
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if out[-1] != ".*":
                out.append(".*")
            fixed = False
        elif c == "?":
            out.append(".")
            fixed = False
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal '[' (no room holds one)
                out.append("[%!]")
                fixed = False
                continue
            cls = pattern[i - 1 : j + 1]
            i = j + 1
            chars = [ch for ch in _ROOM_CHARS if fnmatchcase(ch, cls)]
            # No room character: a set nothing matches.
            out.append("[" + "".join(_lua_char(ch) for ch in chars) + "]" if chars else "[%!]")
            fixed = False
        else:
            out.append(_lua_char(c))
            if fixed:
                prefix.append(c)
    out.append("$")
    return "".join(out), "".join(prefix)


def touch_command(
    rooms: Iterable[str], *, prefix: str, node: str, shas: Mapping[str, bytes], lifetime: int
) -> Command:
    """The command that renews this node's entry in the node list and *rooms* in the
    room index, and trims what no node renewed."""
    return (
        "EVALSHA",
        shas["touch"],
        3,
        index_key(prefix, "rooms"),
        index_key(prefix, "seen"),
        index_key(prefix, "nodes"),
        lifetime,
        node,
        *rooms,
    )


def cluster_read_command(
    action: ReadCluster, *, prefix: str, shas: Mapping[str, bytes], lifetime: int
) -> Command:
    """The command a ReadCluster becomes (``members``, ``rooms`` or ``nodes``)."""
    if action.kind == "presence":
        return ("EVALSHA", shas["members"], 1, key(prefix, action.room, "p"))
    if action.kind == "nodes":
        return ("EVALSHA", shas["nodes"], 1, index_key(prefix, "nodes"), lifetime)
    lua, literal = glob_to_lua(action.pattern)
    stop: Arg = b"[" + literal.encode() + b"\xff" if literal else "+"
    if action.after and action.after >= literal:
        start: Arg = "(" + action.after
    else:
        start = "[" + literal if literal else "-"
    return (
        "EVALSHA",
        shas["rooms"],
        2,
        index_key(prefix, "rooms"),
        index_key(prefix, "seen"),
        lifetime,
        start,
        stop,
        lua,
        max(1, action.limit),
        ROOMS_BUDGET,
    )


def parse_cluster_read(action: ReadCluster, reply: object) -> ClusterRead:
    """
    What a ``members``, ``rooms`` or ``nodes`` reply means.

    Raises:
        ValueError: the reply is not of the kind's shape.
    """
    try:
        value: Any = reply
        if action.kind == "presence":
            return ClusterRead(
                ticket=action.ticket,
                kind=action.kind,
                entries=tuple(sorted(parse_member(m) for m in value)),
            )
        if action.kind == "nodes":
            if not isinstance(value, list) or len(value) % 2:
                raise ValueError
            nodes = tuple(
                sorted(
                    (value[i].decode("ascii"), max(0, int(value[i + 1])))
                    for i in range(0, len(value), 2)
                )
            )
            return ClusterRead(ticket=action.ticket, kind=action.kind, nodes=nodes)
        names, last = value
        return ClusterRead(
            ticket=action.ticket,
            kind=action.kind,
            rooms=tuple(name.decode("ascii") for name in names),
            more=last.decode("ascii"),
        )
    except (TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"unreadable {action.kind} read") from None


__all__ += [
    "ROOMS_BUDGET",
    "cluster_read_command",
    "glob_to_lua",
    "index_key",
    "parse_cluster_read",
    "touch_command",
]
