"""
The Redis protocol (RESP2) without I/O: addresses, commands out, replies in.

What a Redis client needs besides its sockets, for any event loop:

* :class:`RedisAddress` and :func:`parse_redis_url`: where a server is and how to log in;
* :func:`packer` and :func:`pack_commands`: commands to bytes;
* :func:`new_reader` and :func:`parse`: bytes to replies (an error reply becomes a
  :class:`RedisError` instance, garbage raises :class:`RespProtocolError`);
* :func:`handshake_commands` and :func:`check_handshake`: the login that opens a
  connection (AUTH, SELECT, PING) and what its replies mean;
* :data:`SHARDED_PROBE`, :data:`VERSION_PROBE` and :func:`sharded_from_command_info`,
  :func:`sharded_from_info`: whether a server has sharded pub/sub.

hiredis encodes and parses. It is an optional dependency (``pip install 'roombus[redis]'``)
and this module is the only one that imports it, and only when a reader or the packer is
made (:func:`new_reader`, :func:`packer`). Addresses parse without it, so settings and
``import roombus`` never need it; only a client that connects does, and
:func:`require_hiredis` says so in one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, TypeAlias, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs

if TYPE_CHECKING:
    import hiredis

__all__ = [
    "DEFAULT_PORT",
    "HIREDIS_MISSING",
    "INCOMPLETE",
    "SHARDED_PROBE",
    "run_id_from_info",
    "VERSION_PROBE",
    "Arg",
    "RedisAddress",
    "RedisError",
    "RedisTLS",
    "RespProtocolError",
    "SENTINEL_PORT",
    "check_handshake",
    "cluster_node",
    "primary_address",
    "sentinel_addresses",
    "sentinel_query",
    "handshake_commands",
    "new_reader",
    "pack_commands",
    "packer",
    "parse",
    "parse_redis_url",
    "require_hiredis",
    "sharded_from_command_info",
    "sharded_from_info",
]

#: A command argument, as :func:`hiredis.pack_command` accepts it (str is sent as UTF-8).
Arg: TypeAlias = "bytes | memoryview | str | int | float"

DEFAULT_PORT: Final = 6379

#: What is missing, and how to get it, when hiredis cannot be imported.
HIREDIS_MISSING: Final = "the Redis backplane needs hiredis: pip install 'roombus[redis]'"


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-WRONGPASS ...``): ``str(exc)`` is its text.

    The connection that received it is still fine.
    """


class RespProtocolError(Exception):
    """Bytes that are not RESP (``str(exc)`` says what): the connection is unusable."""


# --------------------------------------------------------------------------------------
# hiredis, imported here only


def require_hiredis() -> ModuleType:
    """Import hiredis, or raise :class:`ModuleNotFoundError` naming the ``redis`` extra."""
    try:
        import hiredis
    except ImportError as exc:
        raise ModuleNotFoundError(f"{HIREDIS_MISSING} ({exc})", name="hiredis") from None
    return hiredis


def packer() -> Callable[[tuple[Arg, ...]], bytes]:
    """The command encoder: ``packer()((b"SET", b"k", 1))`` is the command's bytes.

    It is hiredis's own function, so a hot loop pays no wrapper; get it once.
    """
    # hiredis's stub types the argument as a 1-tuple and leaves the result untyped.
    return cast("Callable[[tuple[Arg, ...]], bytes]", require_hiredis().pack_command)


def pack_commands(commands: Iterable[Sequence[Arg]]) -> bytes:
    """Several commands as one write (a pipeline). An empty command is a ValueError."""
    pack = packer()
    batch = [tuple(command) for command in commands]
    if not all(batch):  # Redis would never answer an empty command
        raise ValueError("empty command in pipeline")
    return b"".join(map(pack, batch))


class _Incomplete:
    """What ``gets()`` returns when no whole reply is buffered.

    hiredis's default, False, would be indistinguishable from a RESP3 boolean; a private
    sentinel cannot be confused with any reply.
    """

    def __repr__(self) -> str:
        return "INCOMPLETE"


#: What a reader's ``gets()`` returns while no whole reply is buffered.
INCOMPLETE: Final = _Incomplete()


def new_reader() -> hiredis.Reader:
    """A RESP parser for one connection: ``feed(data)`` what arrives, ``gets()`` each reply.

    ``gets()`` returns a reply -- bytes, int, None, a list of replies, or a
    :class:`RedisError` for an error reply (also nested in a list, as ``EXEC`` and
    ``EVAL`` give them) -- or :data:`INCOMPLETE`. It raises :class:`RespProtocolError` for
    bytes that are not RESP, and again on every later call. This is hiredis's reader
    itself, so a loop over replies pays no wrapper.
    """
    reader: hiredis.Reader = require_hiredis().Reader(
        protocolError=RespProtocolError, replyError=RedisError, notEnoughData=INCOMPLETE
    )
    return reader


def parse(reader: hiredis.Reader, data: bytes) -> list[Any]:
    """Feed *reader* and return every whole reply it now holds, in order (maybe none).

    Raises:
        RespProtocolError: the bytes are not RESP.
    """
    reader.feed(data)
    replies: list[Any] = []
    while (reply := reader.gets()) is not INCOMPLETE:
        replies.append(reply)
    return replies


# --------------------------------------------------------------------------------------
# Addresses


@attrs.frozen
class RedisTLS:
    """How to speak TLS to Redis (a ``rediss://`` URL): file names and a name, no I/O.

    Attributes:
        ca_file: PEM file of the certificate authorities to trust (None: the system's).
        cert_file: PEM client certificate (with its key, unless *key_file* is given),
            for a server that requires one (``tls-auth-clients yes``).
        key_file: PEM private key of *cert_file*.
        server_name: The name to send (SNI) and to verify the server's certificate
            against (None: the host of the URL).

    A driver makes its :class:`ssl.SSLContext` of this once
    (:func:`roombus.node.cluster.redis_ssl_context`).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@attrs.frozen
class RedisAddress:
    """Where a Redis server is and how to log in: what a ``redis://`` URL says.

    With ``unix_path`` set, ``host`` and ``port`` are ignored. The password is left out of
    ``repr()`` so that logging an address does not leak it. ``tls`` is set for a
    ``rediss://`` URL.
    """

    host: str = "localhost"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    unix_path: str | None = None
    tls: RedisTLS | None = None
    #: Of a ``redis+sentinel://`` URL: the sentinels to ask for the primary (then
    #: ``host`` and ``port`` mean nothing), and the name they know it by. A resolved
    #: address (:func:`primary_address`) has the primary's host and port, no sentinels,
    #: and keeps the name, so that its login checks the server's role.
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    #: Of a ``redis+cluster://`` URL: the seed nodes of a Redis Cluster, asked in turn
    #: for the slot map (then ``host`` and ``port`` are the first seed's). A node of
    #: the cluster (:func:`cluster_node`) has its own host and port and no seeds.
    cluster: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        if self.cluster:
            where = "cluster " + ",".join(_host_port(h, p) for h, p in self.cluster)
        elif self.sentinels:
            hosts = ",".join(_host_port(h, p) for h, p in self.sentinels)
            where = f"{self.master_name} via sentinel {hosts}"
        elif self.unix_path is not None:
            where = f"unix:{self.unix_path}"
        else:
            where = _host_port(self.host, self.port)
            if self.master_name is not None:
                where += f" (primary {self.master_name})"
        if self.tls is not None:
            where += " (TLS)"
        return where if self.db == 0 else f"{where} db {self.db}"

    @property
    def server_name(self) -> str:
        """The name a TLS connection sends and verifies: the TLS setting's, or the host."""
        tls = self.tls
        return tls.server_name if tls is not None and tls.server_name else self.host


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_DIGITS: Final = re.compile(r"[0-9]+")

#: Where a sentinel listens unless the URL says.
SENTINEL_PORT: Final = 26379
_MASTER_NAME: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def _parse_db(text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"bad Redis URL: the db must be a number >= 0, not {text!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path[?db=N]``;
    ``rediss://`` is the first form over TLS (``tls`` set, with the default
    :class:`RedisTLS`: the system's authorities, the host's name).

    ``?db=N`` and ``?password=...`` are accepted in the query of either form (the unix form
    has no other place for them). Anything unexpected is a :class:`ValueError` that says
    what is wrong -- without echoing the URL, which may hold a password.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise ValueError(f"bad Redis URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel_url(parts, tls=scheme == "rediss+sentinel")
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _parse_cluster_url(parts, tls=scheme == "rediss+cluster")
    if scheme not in ("redis", "rediss", "unix"):
        shown = f"{scheme}://" if scheme else "none"
        raise ValueError(
            f"bad Redis URL: the scheme must be redis://, rediss://, redis+sentinel://, "
            f"redis+cluster:// or unix://, not {shown}"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("bad Redis URL: the port must be a number from 1 to 65535")

    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("db", "password"):
            raise ValueError(f"bad Redis URL: unknown query parameter {name!r}")
        if name in query:
            raise ValueError(f"bad Redis URL: query parameter {name!r} given twice")
        query[name] = value

    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if "password" in query:
        if password is not None:
            raise ValueError("bad Redis URL: the password is given twice")
        password = query["password"] or None
    if username is not None and password is None:
        raise ValueError("bad Redis URL: a username needs a password (redis://user:password@host)")

    db = _parse_db(query["db"]) if "db" in query else 0

    if scheme == "unix":
        if parts.hostname or port is not None:
            raise ValueError(
                "bad Redis URL: a unix:// URL names no host; write unix:///path/to/socket"
            )
        path = unquote(parts.path)
        if not path or path == "/":
            raise ValueError("bad Redis URL: unix:// needs a socket path (unix:///path/to/socket)")
        return RedisAddress(db=db, username=username, password=password, unix_path=path)

    if not parts.hostname:
        raise ValueError("bad Redis URL: no host (redis://host[:port][/db])")
    path = parts.path.removeprefix("/")
    if path:
        if "db" in query:
            raise ValueError("bad Redis URL: the db is given twice (path and ?db=)")
        db = _parse_db(path)
    return RedisAddress(
        host=parts.hostname,
        port=DEFAULT_PORT if port is None else port,
        db=db,
        username=username,
        password=password,
        tls=RedisTLS() if scheme == "rediss" else None,
    )


def _auth_hosts(
    parts: Any, default_port: int
) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """The login and the ``host[:port],...`` list of a multi-host URL."""
    auth, _, hosts_text = parts.netloc.rpartition("@")
    username = password = None
    if auth:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
        if username is not None and password is None:
            raise ValueError("bad Redis URL: a username needs a password")
    hosts = [_sentinel_host(item.strip(), default_port) for item in hosts_text.split(",")]
    return username, password, hosts


def _parse_cluster_url(parts: Any, *, tls: bool) -> RedisAddress:
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` (no db: a
    cluster has only db 0)."""
    username, password, seeds = _auth_hosts(parts, DEFAULT_PORT)
    if parts.path.strip("/") or parts.query:
        raise ValueError(
            "bad Redis URL: redis+cluster:// takes no db or query (a Redis Cluster has db 0 "
            "only): redis+cluster://host:port,host:port"
        )
    return RedisAddress(
        host=seeds[0][0],
        port=seeds[0][1],
        username=username,
        password=password,
        tls=RedisTLS() if tls else None,
        cluster=tuple(dict.fromkeys(seeds)),
    )


def cluster_node(address: RedisAddress, node: tuple[str, int]) -> RedisAddress:
    """The address of one node of the cluster of *address*: its login and TLS, no seeds."""
    return attrs.evolve(address, host=node[0], port=node[1], cluster=())


def _parse_sentinel_url(parts: Any, *, tls: bool) -> RedisAddress:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/name[/db]``."""
    username, password, sentinels = _auth_hosts(parts, SENTINEL_PORT)
    names = [unquote(p) for p in parts.path.split("/")[1:] if p]
    if not names or len(names) > 2:
        raise ValueError(
            "bad Redis URL: redis+sentinel:// needs the primary's name as its path "
            "(redis+sentinel://host:26379,host:26379/mymaster[/db])"
        )
    if not _MASTER_NAME.fullmatch(names[0]):
        raise ValueError("bad Redis URL: the primary's name is 1-128 of A-Z a-z 0-9 _ . : -")
    db = _parse_db(names[1]) if len(names) == 2 else 0
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name != "db" or len(names) == 2:
            raise ValueError(f"bad Redis URL: unknown or repeated query parameter {name!r}")
        db = _parse_db(value)
    return RedisAddress(
        host=sentinels[0][0],
        port=sentinels[0][1],
        db=db,
        username=username,
        password=password,
        tls=RedisTLS() if tls else None,
        sentinels=tuple(sentinels),
        master_name=names[0],
    )


def _sentinel_host(text: str, default_port: int = SENTINEL_PORT) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("bad Redis URL: an unbalanced [ in a sentinel's address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        what = "sentinel" if default_port == SENTINEL_PORT else "cluster node"
        raise ValueError(f"bad Redis URL: a {what} without a host")
    if not port_text:
        return host, default_port
    if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError("bad Redis URL: the port must be a number from 1 to 65535")
    return host, int(port_text)


# --------------------------------------------------------------------------------------
# Sentinel


def sentinel_query(address: RedisAddress) -> tuple[Arg, ...]:
    """What to ask a sentinel of *address*: where its primary is."""
    assert address.master_name is not None
    return (b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", address.master_name)


def sentinel_addresses(address: RedisAddress) -> list[RedisAddress]:
    """The sentinels of *address*, each as an address to connect to: over TLS if the
    primary is, without the primary's login (a sentinel has its own, or none)."""
    return [RedisAddress(host=h, port=p, tls=address.tls) for h, p in address.sentinels]


def primary_address(address: RedisAddress, reply: Any) -> RedisAddress:
    """The primary a sentinel named (``[host, port]``): *address* resolved, its login
    then checking the role (:func:`handshake_commands`).

    Raises:
        ValueError: the sentinel does not know the name (nil), or an unreadable reply.
    """
    if reply is None:
        raise ValueError(f"the sentinel knows no primary named {address.master_name!r}")
    if isinstance(reply, RedisError):
        raise ValueError(f"the sentinel refused: {reply}")
    if (
        not isinstance(reply, list)
        or len(reply) != 2
        or not all(isinstance(r, bytes) for r in reply)
        or not _DIGITS.fullmatch(reply[1].decode("latin-1"))
    ):
        raise ValueError(f"unreadable sentinel reply {reply!r:.80}")
    return attrs.evolve(address, host=reply[0].decode("latin-1"), port=int(reply[1]), sentinels=())


# --------------------------------------------------------------------------------------
# Opening a connection


def handshake_commands(address: RedisAddress) -> list[tuple[Arg, ...]]:
    """What a new connection sends first, pipelined: AUTH and SELECT as needed, then PING.

    The PING makes the opener prove that a Redis server answers (and accepts us), rather
    than leave that to the first command.
    """
    commands: list[tuple[Arg, ...]] = []
    if address.password is not None:
        if address.username is None:
            commands.append((b"AUTH", address.password))
        else:
            commands.append((b"AUTH", address.username, address.password))
    if address.db:
        commands.append((b"SELECT", address.db))
    commands.append((b"PING",))
    if address.master_name is not None and not address.sentinels:
        commands.append((b"ROLE",))  # a sentinel's answer may be stale: is it the primary?
    return commands


def check_handshake(replies: Sequence[Any], address: RedisAddress | None = None) -> None:
    """Raise the first error reply to :func:`handshake_commands` (a refused login or db);
    for a primary found through sentinels, a :class:`RedisError` (``READONLY``) if the
    server is not the primary (any more)."""
    for reply in replies:
        if isinstance(reply, RedisError):
            raise reply
    if address is not None and address.master_name is not None and not address.sentinels:
        role = replies[-1] if replies else None
        if not (isinstance(role, list) and role and role[0] == b"master"):
            shown = role[0].decode("latin-1") if isinstance(role, list) and role else role
            raise RedisError(
                f"READONLY {address} is a {shown}, not the primary: the sentinel's answer "
                "was stale (a failover under way)"
            )


# --------------------------------------------------------------------------------------
# Sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis >= 7)

#: Ask first: ``COMMAND INFO`` answers ``[nil]`` for a command the server does not know.
SHARDED_PROBE: Final[tuple[Arg, ...]] = (b"COMMAND", b"INFO", b"SPUBLISH")
#: Where ``COMMAND`` is disabled (some hosted services), the version decides.
VERSION_PROBE: Final[tuple[Arg, ...]] = (b"INFO", b"server")

_VERSION: Final = re.compile(rb"^redis_version:(\d+)\.(\d+)", re.MULTILINE)


def sharded_from_command_info(reply: Any) -> bool:
    """Whether the reply to :data:`SHARDED_PROBE` describes ``SPUBLISH``."""
    return isinstance(reply, list) and bool(reply) and reply[0] is not None


def sharded_from_info(reply: Any) -> bool:
    """Whether the reply to :data:`VERSION_PROBE` names Redis 7.0 or later.

    A reply without a readable version says no: classic pub/sub works everywhere.
    """
    found = _VERSION.search(reply) if isinstance(reply, bytes) else None
    return found is not None and (int(found[1]), int(found[2])) >= (7, 0)


def run_id_from_info(reply: object) -> str:
    """The ``run_id`` of an ``INFO server`` reply ("" if it has none, or is an error)."""
    if not isinstance(reply, bytes):
        return ""
    m = re.search(rb"^run_id:([0-9a-f]{1,64})\r?$", reply, re.MULTILINE)
    return m.group(1).decode() if m is not None else ""
