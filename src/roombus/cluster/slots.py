"""
Redis Cluster routing without I/O: key slots, the slot map, where a command goes, and
what a redirection means.

* :func:`crc16` and :func:`key_slot`: the slot (0..16383) of a key, hash tags
  (``{...}``) included, as Redis computes it (``CLUSTER KEYSLOT``);
* :func:`command_keys` and :func:`command_slot`: the keys of a command the backplane
  sends (``EVALSHA``'s keys, a published or subscribed channel) and their one slot;
* :class:`SlotMap`, made of a ``CLUSTER SHARDS`` (Redis 7, :func:`slot_map_from_shards`)
  or ``CLUSTER SLOTS`` reply (:func:`slot_map_from_slots`): the primary of each slot;
* :func:`parse_redirect` (``-MOVED``/``-ASK``) and :func:`is_retry`
  (``-TRYAGAIN``/``-CLUSTERDOWN``);
* :class:`Router`: one pipeline carried out across the primaries, round by round: the
  driver sends each :class:`Send` of :meth:`Router.plan` on the connection to its node
  and feeds the replies back (:meth:`Router.feed`) until :attr:`Router.done`, waiting
  :attr:`Router.delay` before a round when the cluster said to try again.

A driver holds one connection per primary and nothing else; every decision is here.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

import attrs

from .resp import Arg, RedisError

__all__ = [
    "MAX_REDIRECTS",
    "RETRY_DELAY",
    "SHARDS_QUERY",
    "SLOTS",
    "SLOTS_QUERY",
    "Node",
    "Redirect",
    "Router",
    "Send",
    "SlotMap",
    "command_keys",
    "command_slot",
    "crc16",
    "hash_tag",
    "is_retry",
    "key_slot",
    "parse_redirect",
    "slot_map_from_shards",
    "slot_map_from_slots",
]

#: How many slots a cluster has.
SLOTS: Final = 16384
#: A node: ``(host, port)``.
Node: TypeAlias = "tuple[str, int]"

#: Ask a Redis 7 node for the map (an error reply: ask :data:`SLOTS_QUERY`).
SHARDS_QUERY: Final[tuple[Arg, ...]] = (b"CLUSTER", b"SHARDS")
SLOTS_QUERY: Final[tuple[Arg, ...]] = (b"CLUSTER", b"SLOTS")

#: How often one command is redirected or retried before its error reply stands.
MAX_REDIRECTS: Final = 8
#: Seconds to wait before retrying after TRYAGAIN or CLUSTERDOWN (doubled each time).
RETRY_DELAY: Final = 0.05


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE: Final = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum of Redis Cluster: ``crc16(b"123456789") == 0x31C3``."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def _bytes(key: Arg) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, memoryview):
        return key.tobytes()
    return str(key).encode()


def hash_tag(key: bytes | str) -> bytes:
    """The part of *key* that is hashed: between the first ``{`` and the first ``}``
    after it, if that is not empty; else the whole key."""
    data = _bytes(key)
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            return data[start + 1 : end]
    return data


def key_slot(key: bytes | str) -> int:
    """The slot of *key* (what ``CLUSTER KEYSLOT`` answers)."""
    return crc16(hash_tag(key)) & (SLOTS - 1)


_EVAL: Final = frozenset({b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO", b"FCALL"})
_CHANNEL: Final = frozenset({b"PUBLISH", b"SPUBLISH"})
_CHANNELS: Final = frozenset({b"SSUBSCRIBE", b"SUNSUBSCRIBE"})
#: Commands of one key, the first argument (for tools and tests; the backplane sends
#: scripts and publishes only).
_FIRST_KEY: Final = frozenset(
    {b"GET", b"SET", b"INCR", b"EXISTS", b"TTL", b"PTTL", b"PEXPIRE", b"TYPE", b"XADD", b"ZADD"}
    | {b"ZRANGE", b"ZRANGEBYSCORE", b"ZREM", b"XRANGE", b"XLEN", b"ZCARD", b"DEL", b"STRLEN"}
)
#: Commands with no key that every primary must get (a script must be on each).
_BROADCAST: Final = frozenset({b"SCRIPT"})


def _verb(command: Sequence[Arg]) -> bytes:
    return _bytes(command[0]).upper()


def command_keys(command: Sequence[Arg]) -> tuple[bytes, ...]:
    """The keys (or sharded channels) of *command* that decide its slot; () for a
    command with none (``PING``, ``INFO``, ``SCRIPT LOAD``, ``SUBSCRIBE``, ...)."""
    verb = _verb(command)
    if verb in _EVAL:
        count = int(_bytes(command[2]))
        return tuple(_bytes(k) for k in command[3 : 3 + count])
    if verb in _CHANNEL:
        return (_bytes(command[1]),)
    if verb in _CHANNELS:
        return tuple(_bytes(c) for c in command[1:])
    if verb in _FIRST_KEY and len(command) > 1:
        return (_bytes(command[1]),)
    return ()


def command_slot(command: Sequence[Arg]) -> int | None:
    """The one slot of *command*'s keys (None: it has none).

    Raises:
        ValueError: its keys are in several slots (Redis would answer ``-CROSSSLOT``).
    """
    slots = {key_slot(k) for k in command_keys(command)}
    if len(slots) > 1:
        raise ValueError(f"the keys of {_verb(command).decode()} are in {len(slots)} slots")
    return slots.pop() if slots else None


# --------------------------------------------------------------------------------------
# The slot map


@attrs.frozen
class SlotMap:
    """The primary of each slot: ``ranges`` are ``(first, last, node)``, sorted."""

    ranges: tuple[tuple[int, int, Node], ...] = ()

    @property
    def primaries(self) -> tuple[Node, ...]:
        """Every primary that owns a slot, each once, in slot order."""
        return tuple(dict.fromkeys(node for _, _, node in self.ranges))

    @property
    def complete(self) -> bool:
        """Every slot has a primary."""
        covered = 0
        for first, last, _ in self.ranges:
            if first != covered:
                return False
            covered = last + 1
        return covered == SLOTS

    def node_of(self, slot: int) -> Node | None:
        """The primary of *slot*, or None if no node owns it."""
        ranges = self.ranges
        i = bisect.bisect_right(ranges, slot, key=lambda r: r[0]) - 1
        if i >= 0 and ranges[i][0] <= slot <= ranges[i][1]:
            return ranges[i][2]
        return None

    def moved(self, slot: int, node: Node) -> SlotMap:
        """The map once *slot* is *node*'s (what a ``-MOVED`` says)."""
        out: list[tuple[int, int, Node]] = []
        for first, last, owner in self.ranges:
            if first <= slot <= last and owner != node:
                if first < slot:
                    out.append((first, slot - 1, owner))
                if slot < last:
                    out.append((slot + 1, last, owner))
            elif first <= slot <= last:
                return self
            else:
                out.append((first, last, owner))
        out.append((slot, slot, node))
        return SlotMap(_merge(out))


def _merge(ranges: list[tuple[int, int, Node]]) -> tuple[tuple[int, int, Node], ...]:
    out: list[tuple[int, int, Node]] = []
    for first, last, node in sorted(ranges):
        if out and out[-1][2] == node and out[-1][1] + 1 == first:
            out[-1] = (out[-1][0], last, node)
        else:
            out.append((first, last, node))
    return tuple(out)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _host(value: Any, default: str) -> str:
    host = _text(value)
    return default if host in ("", "?") else host


def _check(ranges: list[tuple[int, int, Node]]) -> SlotMap:
    for first, last, _ in ranges:
        if not 0 <= first <= last < SLOTS:
            raise ValueError(f"bad slot range {first}-{last}")
    slot_map = SlotMap(_merge(ranges))
    for (_, last, _), (first, _, _) in zip(slot_map.ranges, slot_map.ranges[1:], strict=False):
        if first <= last:
            raise ValueError("overlapping slot ranges")
    return slot_map


def slot_map_from_shards(reply: Any, *, default_host: str, tls: bool = False) -> SlotMap:
    """The map of a ``CLUSTER SHARDS`` reply: each shard's slots and its online primary
    (its ``endpoint``, else its ``ip``; ``tls-port`` with *tls*). An unknown endpoint
    (``?``, empty) is *default_host*, the node asked.

    Raises:
        ValueError: an unreadable reply.
    """
    if isinstance(reply, RedisError) or not isinstance(reply, list):
        raise ValueError(f"unreadable CLUSTER SHARDS reply {reply!r:.80}")
    ranges: list[tuple[int, int, Node]] = []
    try:
        for shard in reply:
            fields = _pairs(shard)
            slots = [int(s) for s in fields.get("slots", [])]
            primary: Node | None = None
            for node in fields.get("nodes", []):
                attrs_ = _pairs(node)
                if _text(attrs_.get("role")) != "master":
                    continue
                if _text(attrs_.get("health", b"online")) != "online":
                    continue
                port = int(attrs_.get("tls-port" if tls else "port") or attrs_.get("port") or 0)
                host = _host(attrs_.get("endpoint") or attrs_.get("ip"), default_host)
                primary = (host, port)
            if primary is None or not primary[1]:
                continue  # a shard without a live primary: its slots are unowned
            ranges += [(slots[i], slots[i + 1], primary) for i in range(0, len(slots) - 1, 2)]
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"unreadable CLUSTER SHARDS reply: {exc}") from None
    return _check(ranges)


def _pairs(flat: Any) -> dict[str, Any]:
    if isinstance(flat, dict):
        return {_text(k): v for k, v in flat.items()}
    if not isinstance(flat, list) or len(flat) % 2:
        raise ValueError("not a map")
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def slot_map_from_slots(reply: Any, *, default_host: str) -> SlotMap:
    """The map of a ``CLUSTER SLOTS`` reply: ``[[first, last, [host, port, id...],
    replicas...], ...]``; an empty or ``?`` host is *default_host*.

    Raises:
        ValueError: an unreadable reply.
    """
    if isinstance(reply, RedisError) or not isinstance(reply, list):
        raise ValueError(f"unreadable CLUSTER SLOTS reply {reply!r:.80}")
    ranges: list[tuple[int, int, Node]] = []
    try:
        for item in reply:
            first, last, primary = int(item[0]), int(item[1]), item[2]
            ranges.append((first, last, (_host(primary[0], default_host), int(primary[1]))))
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"unreadable CLUSTER SLOTS reply: {exc}") from None
    return _check(ranges)


# --------------------------------------------------------------------------------------
# Redirections


@attrs.frozen
class Redirect:
    """A ``-MOVED slot host:port`` (for good) or ``-ASK slot host:port`` (this once)."""

    ask: bool
    slot: int
    node: Node


_REDIRECT: Final = re.compile(r"(MOVED|ASK) (\d+) (\S*):(\d+)\Z")


def parse_redirect(reply: object, *, default_host: str = "") -> Redirect | None:
    """The redirection an error reply is, or None. An empty host is *default_host*
    (Redis omits an unknown endpoint)."""
    if not isinstance(reply, RedisError):
        return None
    m = _REDIRECT.match(str(reply))
    if m is None:
        return None
    host = m[3].removeprefix("[").removesuffix("]")
    return Redirect(m[1] == "ASK", int(m[2]), (host or default_host, int(m[4])))


def is_retry(reply: object) -> bool:
    """An error reply that says to wait and try again: ``TRYAGAIN`` (a multi-key command
    during a slot's migration) or ``CLUSTERDOWN`` (the cluster is failing over)."""
    return isinstance(reply, RedisError) and str(reply).startswith(("TRYAGAIN", "CLUSTERDOWN"))


# --------------------------------------------------------------------------------------
# One pipeline across the primaries

#: An index in :attr:`Send.indices` of a command the router added (``ASKING``).
ASKING: Final = -1


@attrs.frozen
class Send:
    """Send *commands* as one pipeline to *node*; feed the replies back with it.

    ``indices[i]`` is the place in the pipeline of ``commands[i]``'s reply, or
    :data:`ASKING` for an ``ASKING`` the router put before a command redirected by ASK.
    """

    node: Node
    indices: tuple[int, ...]
    commands: tuple[tuple[Arg, ...], ...]


class Router:
    """
    One pipeline of *commands* carried out across a cluster's primaries.

    Each command goes to the primary of its slot (:func:`command_slot`); one without a
    key to *default* (the first primary), except ``SCRIPT`` which goes to every primary
    (its reply is the first error, else the first primary's). Commands to the same node
    keep their order. A reply that is ``-MOVED`` updates :attr:`slot_map` (and sets
    :attr:`refresh`: the driver should read the whole map again) and the command is sent
    again to the node named; ``-ASK`` sends it once to the node named, after ``ASKING``;
    ``-TRYAGAIN`` and ``-CLUSTERDOWN`` send it again after :attr:`delay`. After
    :data:`MAX_REDIRECTS` of those the error reply stands.

    Raises:
        ValueError: a command whose keys are in several slots, or a slot no node owns
            (the driver must refresh the map: the cluster is incomplete).
    """

    def __init__(self, commands: Sequence[tuple[Arg, ...]], slot_map: SlotMap) -> None:
        if not slot_map.ranges:
            raise ValueError("the cluster owns no slot")
        self.slot_map = slot_map
        self.commands: Final = tuple(commands)
        self.replies: list[Any] = [None] * len(self.commands)
        #: Seconds to wait before the next :meth:`plan` (TRYAGAIN, CLUSTERDOWN).
        self.delay = 0.0
        #: A MOVED came: the map changed, read it again once this pipeline is done.
        self.refresh = False
        self._slots = [command_slot(c) for c in self.commands]
        self._broadcast = {
            i
            for i, c in enumerate(self.commands)
            if _verb(c) in _BROADCAST and self._slots[i] is None
        }
        self._tries = [0] * len(self.commands)
        # Where each pending command goes next: None, by the map; a node after ASK.
        self._pending: dict[int, Node | None] = dict.fromkeys(range(len(self.commands)))
        self._asking: set[int] = set()
        self._retries = 0
        self._out = 0  # sends planned and not fed back

    @property
    def done(self) -> bool:
        """Every reply is final (:attr:`replies`)."""
        return not self._pending and not self._out

    def _target(self, index: int) -> Node:
        slot = self._slots[index]
        if slot is None:
            return self.slot_map.ranges[0][2]
        node = self.slot_map.node_of(slot)
        if node is None:
            raise ValueError(f"no node of the cluster owns slot {slot}")
        return node

    def plan(self) -> list[Send]:
        """The pipelines to send now, one per node (feed each back); [] while sends are
        out or when done."""
        if self._out or not self._pending:
            return []
        groups: dict[Node, tuple[list[int], list[tuple[Arg, ...]]]] = {}
        pending, self._pending = self._pending, {}
        self.delay = 0.0
        for index in sorted(pending):
            command = self.commands[index]
            if index in self._broadcast:
                self._asking.discard(index)
                self.replies[index] = None
                for node in self.slot_map.primaries:
                    indices, commands = groups.setdefault(node, ([], []))
                    indices.append(index)
                    commands.append(command)
                continue
            ask = pending[index]
            node = ask if ask is not None else self._target(index)
            indices, commands = groups.setdefault(node, ([], []))
            if ask is not None:
                indices.append(ASKING)
                commands.append((b"ASKING",))
            indices.append(index)
            commands.append(command)
        sends = [Send(node, tuple(i), tuple(c)) for node, (i, c) in groups.items()]
        self._out = len(sends)
        return sends

    def feed(self, send: Send, replies: Sequence[Any]) -> None:
        """The replies to *send*, one per command, in order."""
        if len(replies) != len(send.commands):
            raise ValueError(f"{len(replies)} replies to {len(send.commands)} commands")
        self._out -= 1
        default_host = send.node[0]
        for index, reply in zip(send.indices, replies, strict=True):
            if index == ASKING:
                continue
            if index in self._broadcast:
                if self.replies[index] is None or (
                    isinstance(reply, RedisError)
                    and not isinstance(self.replies[index], RedisError)
                ):
                    self.replies[index] = reply
                continue
            redirect = parse_redirect(reply, default_host=default_host)
            retry = redirect is None and is_retry(reply)
            if (redirect is None and not retry) or self._tries[index] >= MAX_REDIRECTS:
                self.replies[index] = reply
                continue
            self._tries[index] += 1
            if redirect is None:
                self._retries += 1
                self.delay = max(self.delay, RETRY_DELAY * 2 ** min(self._retries - 1, 5))
                self._pending[index] = None
            elif redirect.ask:
                self._pending[index] = redirect.node
            else:
                self.slot_map = self.slot_map.moved(redirect.slot, redirect.node)
                self.refresh = True
                self._pending[index] = None
