"""
What the trio and asyncio clients share: the URL, the protocol, and the one routine
that carries out the protocol's outputs (:meth:`DriverBase.transmit`).

A driver subclass supplies the I/O: opening a connection, writing its bytes, closing
it, and waking whoever waits (the event iterator, a publish, the timer).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

import attrs

from ..core.streams import Position
from .protocol import (
    ClientOptions,
    ClientProtocol,
    CloseConnection,
    Event,
    OpenConnection,
    Outcome,
    Phase,
    PublishFailed,
    SendText,
)
from .wire import ClientWire, Closed, Opened, Refused, Text, WireEvent

#: Credentials asked for before every connection attempt (None: none).
TokenSource = Callable[[], Awaitable[str | None]] | Callable[[], str | None]


class PublishError(Exception):
    """The server refused a publish (``code`` as in its ``error``), or it was dropped."""

    def __init__(self, code: str, content: str) -> None:
        super().__init__(f"{code}: {content}")
        self.code = code
        self.content = content


@attrs.frozen
class Address:
    """Where to connect: from a ``ws://`` or ``wss://`` URL."""

    secure: bool
    host: str
    port: int
    path: str
    params: dict[str, str]

    @property
    def host_header(self) -> str:
        default = 443 if self.secure else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Address:
    """Split a ``ws://host:port/path?query`` URL (ValueError if it is not one)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    for managed in ("room", "since", "partial"):
        params.pop(managed, None)
    return Address(secure, parts.hostname, port, parts.path or "/ws", params)


class DriverBase:
    """The client's state and outputs; a subclass carries them out on its loop."""

    def __init__(
        self,
        url: str,
        rooms: Iterable[str],
        *,
        username: str | None,
        get_token: TokenSource | None,
        positions: Mapping[str, Position] | None,
        options: ClientOptions | None,
        headers: Iterable[tuple[str, str]],
        rng: random.Random | None,
    ) -> None:
        self.address = parse_url(url)
        rooms = list(rooms)
        if not rooms:
            raise ValueError("a client needs at least one room to connect")
        self.protocol = ClientProtocol(
            rooms,
            username=username,
            positions=positions,
            params=self.address.params,
            path=self.address.path,
            options=options,
            rng=rng,
        )
        self._get_token = get_token
        self._headers = list(headers)

    # -- what a subclass supplies -------------------------------------------------------

    def _now(self) -> float:
        raise NotImplementedError

    def _open(self, action: OpenConnection) -> None:
        """Start connection attempt *action* (a task of the loop)."""
        raise NotImplementedError

    def _write(self, gen: int, wire: ClientWire) -> None:
        """Connection *gen*'s wire has output: see that it is written."""
        raise NotImplementedError

    def _wire(self, gen: int) -> ClientWire | None:
        """Connection *gen*'s wire, once its socket is there (None: not, or no more)."""
        raise NotImplementedError

    def _abort(self, gen: int) -> None:
        """End connection *gen* now (it has no open WebSocket, or took too long)."""
        raise NotImplementedError

    def _closing(self, gen: int) -> None:
        """Connection *gen* began its close handshake: end it if the reply is slow."""
        raise NotImplementedError

    def _settle(self, pub_id: str, outcome: Outcome) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        """Something changed: the timer and the event iterator look again."""
        raise NotImplementedError

    # -- the one routine ------------------------------------------------------------------

    def transmit(self) -> None:
        """Carry out what the protocol asks for, in order; settle answered publishes."""
        proto = self.protocol
        for action in proto.take_actions():
            if isinstance(action, SendText):
                wire = self._wire(action.gen)
                if wire is not None:
                    wire.send_text(action.text)
                    self._write(action.gen, wire)
            elif isinstance(action, OpenConnection):
                self._open(action)
            else:
                assert isinstance(action, CloseConnection)
                wire = self._wire(action.gen)
                if wire is not None and wire.is_open:
                    wire.close(action.code, action.reason)
                    self._write(action.gen, wire)
                    self._closing(action.gen)
                else:
                    self._abort(action.gen)
        for pub_id, outcome in proto.take_settled():
            self._settle(pub_id, outcome)
        self._wake()

    def _dispatch(self, gen: int, events: list[WireEvent]) -> bool:
        """Tell the protocol what connection *gen*'s bytes meant; True once it ended."""
        proto = self.protocol
        ended = False
        for ev in events:
            now = self._now()
            if isinstance(ev, Text):
                proto.received(gen, ev.text, now)
            elif isinstance(ev, Opened):
                proto.opened(gen, now)
            elif isinstance(ev, Refused):
                proto.failed(gen, now, reason=f"refused: HTTP {ev.status}", status=ev.status)
                ended = True
            else:
                assert isinstance(ev, Closed)
                proto.closed(gen, now, ev.code, ev.reason)
                ended = True
        return ended

    async def _token(self) -> str | None:
        source = self._get_token
        if source is None:
            return None
        token = source()
        if not isinstance(token, (str, type(None))):
            token = await token
        if token is not None and not isinstance(token, str):
            raise TypeError(f"get_token() must give a str or None, not {type(token).__name__}")
        return token

    def _new_wire(self, target: str, token: str | None) -> ClientWire:
        return ClientWire(self.address.host_header, target, token=token, headers=self._headers)

    # -- the application's side ------------------------------------------------------------

    def join(self, room: str) -> None:
        """Join *room* (on this and every later connection)."""
        self.protocol.join(room, self._now())
        self.transmit()

    def leave(self, room: str) -> None:
        """Leave *room*."""
        self.protocol.leave(room)
        self.transmit()

    def ping(self) -> None:
        """Check the connection now (e.g. after the network came back)."""
        self.protocol.ping(self._now())
        self.transmit()

    def presence(self, room: str) -> frozenset[str]:
        """Who is in *room*, as the server last told."""
        return self.protocol.presence(room)

    def positions(self) -> dict[str, Position]:
        """The last position per room: pass them as ``positions=`` to resume later."""
        return self.protocol.positions()

    @property
    def rooms(self) -> list[str]:
        return self.protocol.rooms

    @property
    def connected(self) -> bool:
        return self.protocol.phase is Phase.OPEN

    @property
    def closed(self) -> bool:
        return self.protocol.phase is Phase.CLOSED

    def _next(self) -> Event | None:
        event = self.protocol.next_event()
        if event is not None:
            self.transmit()  # reading may let a room catch up
        return event

    @staticmethod
    def _result(outcome: Outcome) -> Position:
        if isinstance(outcome, PublishFailed):
            raise PublishError(outcome.code, outcome.content)
        return outcome
