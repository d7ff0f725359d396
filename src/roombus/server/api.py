"""
The server API over HTTP: ``POST /api/<method>`` with a JSON body. Sans-IO.

:func:`handle_api` turns one request (its HTTP method, path, headers and body) into
an :class:`~roombus.server.http.HttpResponse`: it checks the API key
(``Authorization: apikey <key>``) and its scopes, validates the body per method,
and dispatches the call onto an :class:`Operations` (the hub's,
:class:`~roombus.server.operations.HubOperations`). Nothing it is given makes it
raise: bad input is a 4xx answer with a JSON error naming the field, and a failure of
the operations themselves a 500 with no detail (logged by the caller).

A key is compared with every configured key, in constant time each and with no early
exit, so the time taken says nothing about which key (or how much of one) matched.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeVar

import attrs

from ..core import codec
from ..core.errors import ConfigError
from ..core.names import is_valid_request_id, is_valid_room, is_valid_username
from ..core.streams import Position, is_valid_epoch
from .http import HttpResponse
from .typing import Headers

log: Final = logging.getLogger("roombus")

#: The scopes a key may have: publish (publish, broadcast), read (presence,
#: presence_stats, history, rooms, info), admin (disconnect, kick).
SCOPES: Final = ("publish", "read", "admin")
ALL_SCOPES: Final = frozenset(SCOPES)

#: The largest request body the API reads (bigger: 413).
MAX_BODY_BYTES: Final = 1024 * 1024
#: Most calls in one ``batch``.
MAX_BATCH: Final = 100
#: Most rooms in one ``broadcast``.
MAX_BROADCAST_ROOMS: Final = 1000
#: Most rooms one ``rooms`` page lists (and its default).
MAX_ROOMS_PAGE: Final = 1000
#: The shortest API key accepted.
MIN_KEY_LENGTH: Final = 16

JSON_TYPE: Final = b"application/json"


def _scopes(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


@attrs.frozen(kw_only=True)
class ApiKey:
    """
    One API key: its secret (never shown in a repr) and the scopes it grants.

    Attributes:
        secret: The key as clients send it (``Authorization: apikey <secret>``).
        scopes: What it may do: a subset of :data:`SCOPES` (all of them by default).
    """

    secret: str = attrs.field(repr=False)
    scopes: frozenset[str] = attrs.field(default=ALL_SCOPES, converter=_scopes)
    digest: bytes = attrs.field(
        init=False,
        repr=False,
        default=attrs.Factory(lambda self: _digest(self.secret.encode()), takes_self=True),
    )

    def __attrs_post_init__(self) -> None:
        if (
            len(self.secret) < MIN_KEY_LENGTH
            or not self.secret.isascii()
            or not self.secret.isprintable()
            or any(c in self.secret for c in " :,")
        ):
            raise ConfigError(
                "api-key",
                f"a key must be at least {MIN_KEY_LENGTH} printable ASCII characters, "
                "none of them a space, ':' or ','",
            )
        if not self.scopes or not self.scopes <= ALL_SCOPES:
            raise ConfigError("api-key", f"scopes must be some of {', '.join(SCOPES)}")


def _digest(secret: bytes) -> bytes:
    # Compared as digests: equal lengths, so compare_digest leaks nothing of a length.
    return hashlib.sha256(secret).digest()


def parse_api_key(text: str) -> ApiKey:
    """
    An ``--api-key`` value: ``SECRET`` (every scope) or ``SECRET:scope,scope``.

    Raises:
        ConfigError: for a short or malformed secret, or an unknown scope (the message
            never shows the secret).
    """
    secret, colon, scopes = text.strip().partition(":")
    if not colon:
        return ApiKey(secret=secret)
    names = [s.strip().lower() for s in scopes.split(",") if s.strip()]
    unknown = [n for n in names if n not in ALL_SCOPES]
    if unknown or not names:
        raise ConfigError(
            "api-key", f"unknown scope {unknown[0]!r}" if unknown else "no scope after ':'"
        )
    return ApiKey(secret=secret, scopes=frozenset(names))


def authenticate(headers: Headers, keys: Iterable[ApiKey]) -> ApiKey | None:
    """
    The key an ``Authorization: apikey <key>`` header names, or None (no such header,
    another scheme, several headers, or no key matches). Every key is compared, in
    constant time, whatever matched before.
    """
    values = [value for name, value in headers if name == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, presented = values[0].strip(b" \t").partition(b" ")
    if scheme.lower() != b"apikey":
        return None
    digest = _digest(presented.strip(b" \t"))
    found: ApiKey | None = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest) and found is None:
            found = key
    return found


class ApiError(ValueError):
    """
    A refused call: its HTTP status, error code, the field at fault, a message. A
    ``ValueError``, as what the in-process API (``Server.api``) raises.
    """

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, "bad_request", message, field)


T = TypeVar("T")
U = TypeVar("U")


class Pending(Generic[T]):
    """
    A result still to come: the backplane's answer is awaited. Sans-IO: whoever
    learns the outcome (the hub, when the answer or the deadline comes) calls
    :meth:`resolve` or :meth:`fail` with the time; the callbacks given to :meth:`then`
    run then, in order, with the outcome (the value or the :class:`ApiError`) and that
    time. Settled once: later calls change nothing.
    """

    __slots__ = ("_callbacks", "_outcome", "_settled_at", "done")

    def __init__(self) -> None:
        self.done = False
        self._outcome: T | ApiError | None = None
        self._settled_at = (0.0, 0)
        self._callbacks: list[Callable[[T | ApiError, float, int], None]] = []

    @property
    def outcome(self) -> T | ApiError:
        """The value or the error (only once :attr:`done`)."""
        if not self.done:
            raise RuntimeError("not settled yet")
        return self._outcome  # type: ignore[return-value]

    def resolve(self, value: T, now: float, timestamp: int) -> None:
        self._settle(value, now, timestamp)

    def fail(self, error: ApiError, now: float, timestamp: int) -> None:
        self._settle(error, now, timestamp)

    def _settle(self, outcome: T | ApiError, now: float, timestamp: int) -> None:
        if self.done:
            return
        self.done = True
        self._outcome = outcome
        self._settled_at = (now, timestamp)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(outcome, now, timestamp)

    def then(self, callback: Callable[[T | ApiError, float, int], None]) -> None:
        """Call *callback* with the outcome once settled (at once if it is)."""
        if self.done:
            callback(self._outcome, *self._settled_at)  # type: ignore[arg-type]
        else:
            self._callbacks.append(callback)


#: What an operation answers: its JSON result now, or later.
Result: TypeAlias = "dict[str, object] | Pending[dict[str, object]]"


def map_result(result: T | Pending[T], f: Callable[[T], U]) -> U | Pending[U]:
    """*f* of *result*: at once if it is known, else once it is (an error stays one)."""
    if not isinstance(result, Pending):
        return f(result)
    if result.done:
        outcome = result.outcome
        if isinstance(outcome, ApiError):
            raise outcome
        return f(outcome)
    mapped: Pending[U] = Pending()

    def settle(outcome: T | ApiError, now: float, timestamp: int) -> None:
        if isinstance(outcome, ApiError):
            mapped.fail(outcome, now, timestamp)
            return
        try:
            value = f(outcome)
        except ApiError as error:
            mapped.fail(error, now, timestamp)
        else:
            mapped.resolve(value, now, timestamp)

    result.then(settle)
    return mapped


def gather(results: list[Result]) -> list[dict[str, object]] | Pending[list[dict[str, object]]]:
    """All of *results*, in order: at once if all are known, else once the last is
    (failed as soon as one fails)."""
    waiting = [r for r in results if isinstance(r, Pending) and not r.done]
    if not waiting:
        return [_known(r) for r in results]
    together: Pending[list[dict[str, object]]] = Pending()
    left = [len(waiting)]

    def one(outcome: dict[str, object] | ApiError, now: float, timestamp: int) -> None:
        if isinstance(outcome, ApiError):
            together.fail(outcome, now, timestamp)
            return
        left[0] -= 1
        if not left[0]:
            together.resolve([_known(r) for r in results], now, timestamp)

    for r in waiting:
        r.then(one)
    return together


def _known(result: Result) -> dict[str, object]:
    if not isinstance(result, Pending):
        return result
    outcome = result.outcome
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


class Operations(Protocol):
    """
    What the API calls, once a call is authorized and its arguments are valid: each
    method returns the call's JSON result, or a :class:`Pending` one (the answer of
    the backplane is awaited). ``now`` is the driver's monotonic clock, ``timestamp``
    the wall-clock Unix seconds (sans-IO: nothing here reads a clock). An
    :class:`ApiError` raised here (or failing the pending result) is the caller's
    answer.
    """

    def publish(
        self,
        room: str,
        content: object,
        *,
        username: str,
        idempotency_key: str | None,
        now: float,
        timestamp: int,
    ) -> Result: ...

    def broadcast(
        self,
        rooms: list[str],
        content: object,
        *,
        username: str,
        now: float,
        timestamp: int,
    ) -> Result: ...

    def presence(self, room: str, *, now: float, timestamp: int) -> Result: ...

    def presence_stats(self, room: str, *, now: float, timestamp: int) -> Result: ...

    def history(
        self,
        room: str,
        *,
        since: Position | None,
        limit: int | None,
        now: float,
        timestamp: int,
    ) -> Result: ...

    def disconnect(
        self,
        *,
        username: str | None,
        connection: str | None,
        code: int,
        reason: str,
        now: float,
        timestamp: int,
    ) -> Result: ...

    def kick(
        self, room: str, username: str, *, reason: str, now: float, timestamp: int
    ) -> Result: ...

    def rooms(
        self,
        *,
        pattern: str,
        cursor: str | None,
        limit: int,
        now: float,
        timestamp: int,
    ) -> Result: ...

    def info(self, *, now: float, timestamp: int) -> Result: ...


# -- the arguments of each method --------------------------------------------------------


class _Params:
    """A call's JSON object, read field by field; every refusal names its field."""

    def __init__(self, value: object, allowed: Iterable[str], prefix: str = "") -> None:
        if not isinstance(value, dict):
            raise _bad(prefix.rstrip(".") or "body", "must be a JSON object")
        self.obj: dict[str, object] = value
        self.prefix = prefix
        for name in value:
            if name not in allowed:
                raise _bad(prefix + name, "unknown field")

    def name(self, field: str) -> str:
        return self.prefix + field

    def room(self, field: str = "room") -> str:
        value = self.obj.get(field)
        if field not in self.obj:
            raise _bad(self.name(field), "required")
        if not is_valid_room(value):
            raise _bad(self.name(field), "must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        return value  # type: ignore[return-value]

    def username(self, field: str, default: str | None) -> str | None:
        if field not in self.obj or self.obj[field] is None:
            return default
        value = self.obj[field]
        if not is_valid_username(value):
            raise _bad(self.name(field), "must be 1-64 characters, no control or format characters")
        return value  # type: ignore[return-value]

    def required_username(self, field: str = "username") -> str:
        if field not in self.obj:
            raise _bad(self.name(field), "required")
        value = self.username(field, None)
        if value is None:
            raise _bad(self.name(field), "required")
        return value

    def content(self, field: str = "content") -> object:
        if field not in self.obj:
            raise _bad(self.name(field), "required")
        value = self.obj[field]
        try:
            codec.check_content(value)
        except (TypeError, ValueError) as exc:
            raise _bad(self.name(field), f"cannot be published: {exc}") from None
        return value

    def text(self, field: str, default: str, most: int) -> str:
        value = self.obj.get(field, default)
        if value is None:
            return default
        if type(value) is not str or len(value.encode("utf-8", "surrogatepass")) > most:
            raise _bad(self.name(field), f"must be a string of at most {most} bytes")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise _bad(self.name(field), "must be Unicode text (no lone surrogate)")
        return value

    def count(self, field: str, default: int | None, least: int, most: int) -> int | None:
        value = self.obj.get(field)
        if value is None:
            return default
        if type(value) is not int or not least <= value <= most:
            raise _bad(self.name(field), f"must be an integer from {least} to {most}")
        return value

    def id(self, field: str) -> str | None:
        value = self.obj.get(field)
        if value is None:
            return None
        if not is_valid_request_id(value):
            raise _bad(
                self.name(field), "must be a string of 1-64 characters, no control characters"
            )
        return value  # type: ignore[return-value]


def _publish(p: _Params) -> dict[str, Any]:
    return {
        "room": p.room(),
        "content": p.content(),
        "username": p.username("username", "api"),
        "idempotency_key": p.id("idempotency_key"),
    }


def _broadcast(p: _Params) -> dict[str, Any]:
    rooms = p.obj.get("rooms")
    if "rooms" not in p.obj:
        raise _bad(p.name("rooms"), "required")
    if type(rooms) is not list or not 0 < len(rooms) <= MAX_BROADCAST_ROOMS:
        raise _bad(p.name("rooms"), f"must be a list of 1 to {MAX_BROADCAST_ROOMS} rooms")
    for i, room in enumerate(rooms):
        if not is_valid_room(room):
            raise _bad(f"{p.name('rooms')}[{i}]", "must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return {
        "rooms": list(dict.fromkeys(rooms)),  # each room once, in order
        "content": p.content(),
        "username": p.username("username", "api"),
    }


def _room_only(p: _Params) -> dict[str, Any]:
    return {"room": p.room()}


def _history(p: _Params) -> dict[str, Any]:
    room = p.room()
    since = p.obj.get("since")
    position: Position | None = None
    if since is not None:
        s = _Params(since, ("epoch", "seq"), p.name("since."))
        epoch = s.obj.get("epoch")
        if not is_valid_epoch(epoch):
            raise _bad(s.name("epoch"), "must be 1-32 characters of A-Z a-z 0-9 _ -")
        seq = s.count("seq", None, 0, 2**63 - 1)
        if seq is None:
            raise _bad(s.name("seq"), "required")
        position = Position(epoch, seq)  # type: ignore[arg-type]
    return {"room": room, "since": position, "limit": p.count("limit", None, 0, 1_000_000)}


def _close_code(p: _Params) -> int:
    code = p.count("code", 1000, 1000, 4999)
    if code is None or not (code == 1000 or 3000 <= code <= 4999):
        raise _bad(p.name("code"), "must be 1000 or from 3000 to 4999")
    return code


def _disconnect(p: _Params) -> dict[str, Any]:
    username = p.username("username", None)
    connection = p.obj.get("connection")
    if connection is not None and (
        type(connection) is not str or not 0 < len(connection) <= 200 or not connection.isascii()
    ):
        raise _bad(p.name("connection"), "must be a connection id, as presence lists them")
    if (username is None) == (connection is None):
        raise _bad(p.name("username"), "give either username or connection")
    return {
        "username": username,
        "connection": connection,
        "code": _close_code(p),
        "reason": p.text("reason", "disconnected by the server", 120),
    }


def _kick(p: _Params) -> dict[str, Any]:
    return {
        "room": p.room(),
        "username": p.required_username(),
        "reason": p.text("reason", "removed from the room by the server", 200),
    }


def _rooms(p: _Params) -> dict[str, Any]:
    pattern = p.text("pattern", "*", 200)
    cursor = p.obj.get("cursor")
    if cursor is not None and (type(cursor) is not str or room_of_cursor(cursor) is None):
        raise _bad(p.name("cursor"), "must be a cursor from an earlier answer")
    return {
        "pattern": pattern,
        "cursor": cursor,
        "limit": p.count("limit", 100, 1, MAX_ROOMS_PAGE),
    }


def _nothing(p: _Params) -> dict[str, Any]:
    return {}


@attrs.frozen
class _Method:
    scope: str
    fields: tuple[str, ...]
    read: Callable[[_Params], dict[str, Any]]


#: Every method: the scope it needs, its fields, and how its arguments are read.
METHODS: Final[Mapping[str, _Method]] = {
    "publish": _Method("publish", ("room", "content", "username", "idempotency_key"), _publish),
    "broadcast": _Method("publish", ("rooms", "content", "username"), _broadcast),
    "presence": _Method("read", ("room",), _room_only),
    "presence_stats": _Method("read", ("room",), _room_only),
    "history": _Method("read", ("room", "since", "limit"), _history),
    "rooms": _Method("read", ("pattern", "cursor", "limit"), _rooms),
    "info": _Method("read", (), _nothing),
    "disconnect": _Method("admin", ("username", "connection", "code", "reason"), _disconnect),
    "kick": _Method("admin", ("room", "username", "reason"), _kick),
}


def cursor_of(room: str) -> str:
    """The opaque cursor that resumes a ``rooms`` listing after *room*."""
    return base64.urlsafe_b64encode(room.encode()).decode().rstrip("=")


def room_of_cursor(cursor: str) -> str | None:
    """The room a cursor resumes after, or None if it is not a cursor."""
    if not 0 < len(cursor) <= 100 or not cursor.isascii():
        return None
    try:
        room = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (ValueError, UnicodeError):
        return None
    return room if is_valid_room(room) and cursor_of(room) == cursor else None


# -- the request ---------------------------------------------------------------------------


def _reply(status: int, body: object, *headers: tuple[bytes, bytes]) -> HttpResponse:
    return HttpResponse(
        status=status,
        # ASCII: a field name the client sent may hold a lone surrogate (JSON allows
        # "\ud800"), which UTF-8 cannot encode.
        body=json.dumps(body, separators=(",", ":")).encode() + b"\n",
        content_type=JSON_TYPE,
        headers=headers,
    )


def error_response(error: ApiError, *headers: tuple[bytes, bytes]) -> HttpResponse:
    """*error* as its HTTP answer."""
    return _reply(error.status, error.body(), *headers)


#: The answer to a body over the size limit (the wire reads no more of it).
TOO_LARGE: Final = error_response(
    ApiError(413, "payload_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
)


def _no_constants(text: str) -> object:
    raise ValueError(f"{text} is not JSON")


_decode = json.JSONDecoder(parse_constant=_no_constants).decode


def _parse_body(body: bytes) -> object:
    if not body.strip():
        return {}
    try:
        return _decode(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "bad_json", "the body is not JSON (UTF-8)", "body") from None


def call(
    ops: Operations,
    name: str,
    params: object,
    *,
    now: float,
    timestamp: int,
    scopes: frozenset[str] = ALL_SCOPES,
) -> Result:
    """
    Validate and run one call of method *name* with *params* (its JSON object) on
    *ops*, if *scopes* allow it: its result (:class:`Pending` while the backplane's
    answer is awaited).

    Raises:
        ApiError: for an unknown method (404), a missing scope (403), a bad argument
            (400, naming the field), or what *ops* refuses.
    """
    method = METHODS.get(name) if type(name) is str else None
    if method is None:
        raise ApiError(404, "not_found", f"no such method: {str(name)[:64]!r}")
    if method.scope not in scopes:
        raise ApiError(403, "forbidden", f"the key lacks the {method.scope!r} scope")
    kwargs = method.read(_Params(params, method.fields))
    result: Result = getattr(ops, name)(**kwargs, now=now, timestamp=timestamp)
    return result


def _entry(outcome: dict[str, object] | ApiError) -> dict[str, object]:
    if isinstance(outcome, ApiError):
        return {"status": outcome.status, **outcome.body()}
    return {"status": 200, "result": outcome}


#: The most a batch's calls may wait for the backplane, all together (seconds): the
#: time one call may (``HubOperations.timeout``), so that the answer comes before the
#: connection's deadline.
BATCH_SECONDS: Final = 5.0


def _batch(ops: Operations, key: ApiKey, params: object, now: float, timestamp: int) -> Result:
    """The calls in order: one whose answer is awaited holds back those after it."""
    p = _Params(params, ("calls",))
    calls = p.obj.get("calls")
    if type(calls) is not list or not 0 < len(calls) <= MAX_BATCH:
        raise _bad("calls", f"must be a list of 1 to {MAX_BATCH} calls")
    entries: list[object] = []
    done: Pending[dict[str, object]] = Pending()
    # One deadline for the whole batch (as for one call): a call not begun by then
    # fails, so a batch never outlives the request that asked for it.
    deadline = now + BATCH_SECONDS

    def run(start: int, now: float, timestamp: int) -> bool:
        """Run calls from *start* on; False if one is awaited (it goes on later)."""
        for i in range(start, len(calls)):
            if now >= deadline:
                entries.append(
                    _entry(
                        ApiError(
                            503,
                            "backplane_timeout",
                            f"the batch did not reach this call within {BATCH_SECONDS:g} s",
                        )
                    )
                )
                continue
            try:
                c = _Params(calls[i], ("method", "params"), f"calls[{i}].")
                name = c.obj.get("method")
                if name == "batch":
                    raise _bad(c.name("method"), "a batch cannot hold a batch")
                if type(name) is not str:
                    raise _bad(c.name("method"), "required: the method's name")
                result = call(
                    ops,
                    name,
                    c.obj.get("params", {}),
                    now=now,
                    timestamp=timestamp,
                    scopes=key.scopes,
                )
            except ApiError as error:
                entries.append(_entry(error))
                continue
            if isinstance(result, Pending) and not result.done:
                result.then(functools.partial(resume, i))
                return False
            entries.append(_entry(result.outcome if isinstance(result, Pending) else result))
        return True

    def resume(i: int, outcome: dict[str, object] | ApiError, now: float, ts: int) -> None:
        entries.append(_entry(outcome))
        try:
            finished = run(i + 1, now, ts)
        except Exception:  # a bug of the operations: the batch's answer is a 500
            log.exception("API batch call failed")
            done.fail(ApiError(500, "internal", "internal error"), now, ts)
            return
        if finished:
            done.resolve({"results": entries}, now, ts)

    if run(0, now, timestamp):
        return {"results": entries}
    return done


def handle_api(
    method: bytes,
    path: bytes,
    headers: Headers,
    body: bytes,
    *,
    keys: Iterable[ApiKey],
    operations: Operations,
    now: float,
    timestamp: int,
) -> HttpResponse | Pending[HttpResponse]:
    """
    The answer to one request for ``/api/...`` (*path* without the query), or a
    pending one (the backplane's answer is awaited: an operation's deadline, past
    which it fails with 503 ``backplane_timeout``, bounds it). Never raises: what the
    client did wrong is a 4xx; a failure of *operations* (a bug) is logged and
    answered 500, with no detail.
    """
    try:
        if method != b"POST":
            raise ApiError(405, "method_not_allowed", "the API takes POST only")
        key = authenticate(headers, keys)
        if key is None:
            return error_response(
                ApiError(401, "unauthorized", "a valid 'Authorization: apikey <key>' is needed"),
                (b"www-authenticate", b"apikey"),
            )
        name = path[len(b"/api/") :].decode("ascii", "replace") if path.startswith(b"/api/") else ""
        if name != "batch" and name not in METHODS:
            raise ApiError(404, "not_found", f"no such method: {name[:64]!r}")
        params = _parse_body(body)
        if name == "batch":
            result = _batch(operations, key, params, now, timestamp)
        else:
            result = call(operations, name, params, now=now, timestamp=timestamp, scopes=key.scopes)
        if not isinstance(result, Pending):
            return _reply(200, result)
        answer: Pending[HttpResponse] = Pending()

        def respond(outcome: dict[str, object] | ApiError, now: float, ts: int) -> None:
            answer.resolve(_answer(outcome, path), now, ts)

        result.then(respond)
        return answer
    except ApiError as error:
        allow = ((b"allow", b"POST"),) if error.status == 405 else ()
        return error_response(error, *allow)
    except Exception:
        log.exception("API call %r failed", path[:80])
        return error_response(ApiError(500, "internal", "internal error"))


def _answer(outcome: dict[str, object] | ApiError, path: bytes) -> HttpResponse:
    """The HTTP answer of an awaited call's outcome."""
    if isinstance(outcome, ApiError):
        return error_response(outcome)
    try:
        return _reply(200, outcome)
    except Exception:
        log.exception("API call %r failed", path[:80])
        return error_response(ApiError(500, "internal", "internal error"))


__all__ = [
    "ALL_SCOPES",
    "MAX_BODY_BYTES",
    "METHODS",
    "SCOPES",
    "ApiError",
    "ApiKey",
    "Operations",
    "Pending",
    "Result",
    "authenticate",
    "call",
    "cursor_of",
    "gather",
    "handle_api",
    "map_result",
    "parse_api_key",
    "room_of_cursor",
]
