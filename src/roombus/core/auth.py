"""
Room authorization, as pure functions: who may join, publish and see presence where.

:class:`Authorizer` — *may this identity do that in this room?* — is asked by the
broker when a connection joins a room, so it is synchronous and pure.
:class:`ClaimsAuthorizer` answers from the identity's :class:`RoomRules`. An
:class:`Identity` is what an authenticator (:mod:`roombus.server.auth`) made of a
request: a username, an expiry, room rules and the claims.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final, Protocol, final

import attrs

from .names import RoomName, Username

#: Most patterns in one of a :class:`RoomRules`' lists.
MAX_ROOM_PATTERNS: Final = 256
#: Longest room pattern.
MAX_ROOM_PATTERN_LENGTH: Final = 128

# --- Room rules ------------------------------------------------------------------


@attrs.frozen
class _Glob:
    """
    One wildcard pattern, split at its ``*`` into fixed-length segments.

    A glob matches when the first segment matches at the start, the last at the
    end, and the middle ones in order in between; taking each middle segment at
    its leftmost place is always right, so matching is a few regex scans with no
    backtracking. (A regex like ``.*a.*a.*a`` would backtrack exponentially, and
    the patterns come from tokens.) ``?`` is one character; everything else,
    ``[`` included, is literal.
    """

    head: re.Pattern[str]
    head_length: int
    middles: tuple[re.Pattern[str], ...]
    #: None when the pattern has no ``*``: then *head* must match the whole name.
    tail: re.Pattern[str] | None
    tail_length: int

    def matches(self, name: str) -> bool:
        if self.tail is None:
            return self.head.fullmatch(name) is not None
        end = len(name) - self.tail_length
        if end < self.head_length or self.head.match(name) is None:
            return False
        if self.tail.match(name, end) is None:
            return False
        pos = self.head_length
        for middle in self.middles:
            found = middle.search(name, pos, end)
            if found is None:
                return False
            pos = found.end()
        return True


def _segment(text: str) -> re.Pattern[str]:
    return re.compile("".join("." if c == "?" else re.escape(c) for c in text), re.DOTALL)


def _compile_glob(pattern: str) -> _Glob:
    head, *rest = pattern.split("*")
    if not rest:
        return _Glob(_segment(head), len(head), (), None, 0)
    *middles, tail = rest
    return _Glob(
        _segment(head),
        len(head),
        tuple(_segment(m) for m in middles if m),
        _segment(tail),
        len(tail),
    )


@attrs.frozen
class _Matcher:
    """A compiled pattern list, with the common cases (``*``, plain names) kept cheap."""

    anything: bool
    exact: frozenset[str]
    globs: tuple[_Glob, ...]

    def __call__(self, name: str) -> bool:
        return self.anything or name in self.exact or any(g.matches(name) for g in self.globs)


def _compile(patterns: tuple[str, ...]) -> _Matcher:
    anything = any(p.strip("*") == "" for p in patterns)
    exact = frozenset(p for p in patterns if "*" not in p and "?" not in p)
    globs = tuple(_compile_glob(p) for p in patterns if p not in exact and p.strip("*"))
    return _Matcher(anything, exact, globs)


def _check_patterns(value: object) -> tuple[str, ...]:
    """*value* as a tuple of room patterns, or ValueError if it is not a short list of them."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("room patterns must be a list of strings")
    patterns = tuple(value)
    if len(patterns) > MAX_ROOM_PATTERNS:
        raise ValueError(f"at most {MAX_ROOM_PATTERNS} room patterns")
    for p in patterns:
        if type(p) is not str or not 0 < len(p) <= MAX_ROOM_PATTERN_LENGTH:
            raise ValueError(
                f"a room pattern must be a string of 1-{MAX_ROOM_PATTERN_LENGTH} characters"
            )
        if not p.isascii():
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a room pattern must be UTF-8 text (no lone surrogate)") from None
    return patterns


def _pattern_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return _check_patterns(value)


_RIGHTS: Final = frozenset({"join", "publish", "presence"})


@attrs.frozen(kw_only=True)
class RoomRules:
    """
    Which rooms an identity may join, publish to, and see the presence of.

    Each list holds patterns: a room name (``"lobby"``), or one with wildcards
    (``"tenant-42:*"``, ``"*"``), where ``*`` is any run of characters and ``?`` any
    one character. Nothing else is special: ``[`` is literal, unlike in
    :mod:`fnmatch` (room names cannot contain it anyway). A list is at most
    :data:`MAX_ROOM_PATTERNS` patterns of at most :data:`MAX_ROOM_PATTERN_LENGTH`
    characters, and matching never backtracks, so rules from a token cannot make
    a join slow.

    An empty list allows nothing: the rights are independent, so a token can grant
    a read-only seat (``join`` without ``publish``) or a silent one (no ``presence``).

    Attributes:
        join: Rooms the identity may join (and so receive messages from).
        publish: Rooms it may send messages to.
        presence: Rooms whose presence (who is there, who joins and leaves) it sees.

    Raises:
        ValueError: A list is not a list of strings, or is out of bounds.
    """

    join: tuple[str, ...] = attrs.field(default=(), converter=_pattern_tuple)
    publish: tuple[str, ...] = attrs.field(default=(), converter=_pattern_tuple)
    presence: tuple[str, ...] = attrs.field(default=(), converter=_pattern_tuple)
    # Compiled once, here: the broker asks on every join.
    _join: _Matcher = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(lambda s: _compile(s.join), True)
    )
    _publish: _Matcher = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(lambda s: _compile(s.publish), True),
    )
    _presence: _Matcher = attrs.field(
        init=False,
        eq=False,
        repr=False,
        default=attrs.Factory(lambda s: _compile(s.presence), True),
    )

    @classmethod
    def from_claim(cls, claim: object) -> RoomRules:
        """
        Rules from a token's ``rooms`` claim.

        The claim is either a list of patterns, granting all three rights in those
        rooms, or an object ``{"join": [...], "publish": [...], "presence": [...]}``.
        In the object form a missing key grants that right nowhere, and an unknown
        key is an error rather than ignored, so a misspelt ``"publsh"`` is caught
        at the first handshake instead of silently muting a user.

        Raises:
            ValueError: The claim has any other shape (``null`` included: an issuer
                that meant "no rooms" must not get "all rooms").
        """
        if isinstance(claim, list):
            patterns = _check_patterns(claim)
            return cls(join=patterns, publish=patterns, presence=patterns)
        if isinstance(claim, dict):
            if not claim.keys() <= _RIGHTS:
                raise ValueError("a rooms object may only have join, publish and presence")
            lists = {}
            for right in _RIGHTS:
                value = claim.get(right, [])
                if not isinstance(value, list):
                    raise ValueError(f"rooms.{right} must be a list")
                lists[right] = _check_patterns(value)
            return cls(**lists)
        raise ValueError("the rooms claim must be a list or an object")

    def may_join(self, room: RoomName) -> bool:
        """Tell whether the rules allow joining *room*."""
        return self._join(room)

    def may_publish(self, room: RoomName) -> bool:
        """Tell whether the rules allow publishing to *room*."""
        return self._publish(room)

    def may_see_presence(self, room: RoomName) -> bool:
        """Tell whether the rules allow seeing who is in *room*."""
        return self._presence(room)


# --- Identities and refusals --------------------------------------------------------


def _freeze(value: object) -> object:
    """A deep, read-only copy of a JSON value: objects become mappingproxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _frozen_claims(claims: Mapping[str, object]) -> Mapping[str, object]:
    return _freeze(claims)  # type: ignore[return-value]  # a Mapping freezes to a Mapping


@attrs.frozen(kw_only=True)
class Identity:
    """
    Who a client is, as an :class:`Authenticator` established it.

    Attributes:
        username: The user; presence is per username.
        expires_at: When the credentials expire, in unix seconds (a token's
            ``exp``), or None if they do not. The driver closes the connection then.
        rooms: What the identity may do where, or None for no restrictions.
        claims: Everything the authenticator learnt (a token's claims), for a custom
            :class:`Authorizer`. A read-only deep copy, and left out of ``repr`` so a
            logged identity does not leak what the issuer put in the token.
    """

    username: Username
    expires_at: float | None = None
    rooms: RoomRules | None = None
    claims: Mapping[str, object] = attrs.field(
        factory=dict, converter=_frozen_claims, repr=False, hash=False
    )


# --- Authorization ---------------------------------------------------------------------


class Authorizer(Protocol):
    """
    Decides what an identity may do in a room.

    The broker asks when a connection joins a room (rights are fixed for the
    membership), so implementations must be quick, synchronous and pure: no I/O,
    no clock. Anything slow (a database lookup) belongs in the
    :class:`Authenticator`, whose result can carry it in :attr:`Identity.claims`.
    """

    def may_join(self, identity: Identity, room: RoomName) -> bool:
        """Tell whether *identity* may join *room*."""
        ...

    def may_publish(self, identity: Identity, room: RoomName) -> bool:
        """Tell whether *identity* may send messages to *room*."""
        ...

    def may_see_presence(self, identity: Identity, room: RoomName) -> bool:
        """Tell whether *identity* may see who joins and leaves *room*."""
        ...


@final
@attrs.frozen
class ClaimsAuthorizer:
    """
    The default :class:`Authorizer`: an identity's own :attr:`Identity.rooms` decide,
    and an identity without room rules may do anything.
    """

    def may_join(self, identity: Identity, room: RoomName) -> bool:
        """Tell whether *identity*'s room rules allow joining *room*."""
        return identity.rooms is None or identity.rooms.may_join(room)

    def may_publish(self, identity: Identity, room: RoomName) -> bool:
        """Tell whether *identity*'s room rules allow publishing to *room*."""
        return identity.rooms is None or identity.rooms.may_publish(room)

    def may_see_presence(self, identity: Identity, room: RoomName) -> bool:
        """Tell whether *identity*'s room rules allow seeing *room*'s presence."""
        return identity.rooms is None or identity.rooms.may_see_presence(room)
