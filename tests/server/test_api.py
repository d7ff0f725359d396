"""The sans-IO server API: keys and scopes, validation, dispatch (roombus.server.api)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roombus import ConfigError
from roombus.core.streams import Position
from roombus.server.api import (
    METHODS,
    ApiError,
    ApiKey,
    Pending,
    authenticate,
    cursor_of,
    handle_api,
    parse_api_key,
    room_of_cursor,
)

KEY = "s" * 20
READ = "r" * 20
KEYS = (ApiKey(secret=KEY), parse_api_key(READ + ":read"))


class FakeOps:
    """Records every call; answers with its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        if name not in METHODS:
            raise AttributeError(name)

        def method(*args: Any, **kwargs: Any) -> dict[str, object]:
            kwargs.pop("now")
            kwargs.pop("timestamp")
            self.calls.append((name, kwargs))
            return {"ok": name}

        return method


def request(
    method: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    raw: bytes | None = None,
    ops: Any = None,
) -> tuple[int, Any, FakeOps]:
    ops = ops if ops is not None else FakeOps()
    headers = [] if key is None else [(b"authorization", b"apikey " + key.encode())]
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    response = handle_api(
        b"POST",
        f"/api/{method}".encode(),
        headers,
        data,
        keys=KEYS,
        operations=ops,
        now=0.0,
        timestamp=0,
    )
    assert response.content_type == b"application/json"
    return response.status, json.loads(response.body), ops


def test_parse_api_key() -> None:
    assert parse_api_key(KEY).scopes == {"publish", "read", "admin"}
    assert parse_api_key(KEY + ":publish, read").scopes == {"publish", "read"}
    for bad in ("short", KEY + ":write", KEY + ":", "a b" * 10):
        with pytest.raises(ConfigError) as info:
            parse_api_key(bad)
        assert KEY not in str(info.value)
    assert KEY not in repr(parse_api_key(KEY))


def test_authenticate() -> None:
    assert authenticate([(b"authorization", b"apikey " + KEY.encode())], KEYS) is KEYS[0]
    assert authenticate([(b"authorization", b"ApiKey " + READ.encode())], KEYS) is KEYS[1]
    assert authenticate([(b"authorization", b"Bearer " + KEY.encode())], KEYS) is None
    assert authenticate([(b"authorization", b"apikey " + KEY.encode() + b"x")], KEYS) is None
    two = [(b"authorization", b"apikey " + KEY.encode())] * 2
    assert authenticate(two, KEYS) is None
    assert authenticate([], KEYS) is None


def test_statuses() -> None:
    assert request("info", key=None)[0] == 401
    assert request("info", key="x" * 20)[0] == 401
    assert request("kick", {"room": "r", "username": "u"}, key=READ)[0] == 403
    assert request("nope", {})[0] == 404
    response = handle_api(
        b"GET", b"/api/info", [], b"", keys=KEYS, operations=FakeOps(), now=0, timestamp=0
    )
    assert response.status == 405 and (b"allow", b"POST") in response.headers
    status, body, ops = request("info")
    assert status == 200 and body == {"ok": "info"} and ops.calls == [("info", {})]


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("publish", {"content": 1}, "room"),
        ("publish", {"room": "a b", "content": 1}, "room"),
        ("publish", {"room": "r"}, "content"),
        ("publish", {"room": "r", "content": 1, "username": ""}, "username"),
        ("publish", {"room": "r", "content": 1, "idempotency_key": 5}, "idempotency_key"),
        ("publish", {"room": "r", "content": 1, "extra": 1}, "extra"),
        ("broadcast", {"rooms": [], "content": 1}, "rooms"),
        ("broadcast", {"rooms": ["a", "b c"], "content": 1}, "rooms[1]"),
        ("history", {"room": "r", "since": {"epoch": "!", "seq": 1}}, "since.epoch"),
        ("history", {"room": "r", "since": {"epoch": "e"}}, "since.seq"),
        ("history", {"room": "r", "limit": -1}, "limit"),
        ("history", {"room": "r", "limit": True}, "limit"),
        ("disconnect", {}, "username"),
        ("disconnect", {"username": "u", "connection": "1"}, "username"),
        ("disconnect", {"username": "u", "code": 1001}, "code"),
        ("disconnect", {"username": "u", "code": 5000}, "code"),
        ("kick", {"room": "r"}, "username"),
        ("rooms", {"cursor": "???"}, "cursor"),
        ("rooms", {"limit": 0}, "limit"),
        ("publish", [1], "body"),
    ],
)
def test_bad_fields_are_named(method: str, body: Any, field: str) -> None:
    status, answer, ops = request(method, body)
    assert status == 400, answer
    assert answer["error"]["code"] == "bad_request" and answer["error"]["field"] == field
    assert ops.calls == []


def test_arguments_reach_the_operations() -> None:
    _, _, ops = request("publish", {"room": "r", "content": [1]})
    assert ops.calls == [
        ("publish", {"room": "r", "content": [1], "username": "api", "idempotency_key": None})
    ]
    _, _, ops = request("history", {"room": "r", "since": {"epoch": "e1", "seq": 3}, "limit": 2})
    assert ops.calls == [("history", {"room": "r", "since": Position("e1", 3), "limit": 2})]
    _, _, ops = request("disconnect", {"connection": "7"})
    assert ops.calls[0][1]["code"] == 1000 and ops.calls[0][1]["connection"] == "7"


def test_batch_checks_each_call_and_its_scope() -> None:
    calls = [
        {"method": "info"},
        {"method": "kick", "params": {"room": "r", "username": "u"}},
        {"method": "publish", "params": {"room": "r"}},
        {"method": "nope"},
        {"method": "batch", "params": {"calls": []}},
        "not a call",
    ]
    status, body, ops = request("batch", {"calls": calls}, key=READ)
    assert status == 200
    assert [r["status"] for r in body["results"]] == [200, 403, 403, 404, 400, 400]
    assert ops.calls == [("info", {})]
    assert body["results"][5]["error"]["field"] == "calls[5]"
    assert request("batch", {"calls": []})[0] == 400


def test_cursor_round_trip() -> None:
    for room in ("a", "lobby:1", "x" * 64):
        assert room_of_cursor(cursor_of(room)) == room
    for bad in ("", "!!!", cursor_of("a") + "A", "a" * 200):
        assert room_of_cursor(bad) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "room",
                    "rooms",
                    "content",
                    "username",
                    "since",
                    "limit",
                    "code",
                    "calls",
                    "method",
                    "params",
                    "cursor",
                    "pattern",
                    "connection",
                    "epoch",
                    "seq",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


class Raising:
    def __getattr__(self, name: str) -> Any:
        def method(*args: Any, **kwargs: Any) -> dict[str, object]:
            return {}

        return method


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from([*METHODS, "batch", "x"]), body=json_values)
def test_any_json_body_is_answered_without_raising(method: str, body: Any) -> None:
    raw = json.dumps(body).encode()
    status, answer, _ = request(method, raw=raw, ops=Raising())
    assert status in (200, 400, 404)
    assert ("error" in answer) == (status != 200)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from([*METHODS, "batch"]), raw=st.binary(max_size=200))
def test_any_bytes_are_answered_without_raising(method: str, raw: bytes) -> None:
    status, _, _ = request(method, raw=raw, ops=Raising())
    assert status in (200, 400)


class LaterOps:
    """Answers every call later (a Pending each, settled by the test), in order."""

    def __init__(self, now: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.pending: list[tuple[str, Pending[dict[str, object]]]] = []
        self.now = now

    def __getattr__(self, name: str) -> Any:
        if name not in METHODS:
            raise AttributeError(name)

        def method(*args: Any, **kwargs: Any) -> Any:
            if name in self.now:
                return {"now": name}
            pending: Pending[dict[str, object]] = Pending()
            self.pending.append((name, pending))
            return pending

        return method


def _call(method: str, body: Any, ops: Any) -> Any:
    return handle_api(
        b"POST",
        f"/api/{method}".encode(),
        [(b"authorization", b"apikey " + KEY.encode())],
        json.dumps(body).encode(),
        keys=KEYS,
        operations=ops,
        now=0,
        timestamp=0,
    )


def test_an_awaited_call_is_answered_once_settled() -> None:
    ops = LaterOps()
    answer = _call("publish", {"room": "a", "content": 1}, ops)
    assert isinstance(answer, Pending) and not answer.done
    ((_, pending),) = ops.pending
    pending.resolve({"seq": 3}, 1.0, 0)
    assert answer.done and answer.outcome.status == 200  # type: ignore[union-attr]
    assert json.loads(answer.outcome.body) == {"seq": 3}  # type: ignore[union-attr]
    pending.resolve({"seq": 4}, 2.0, 0)  # settled once
    assert json.loads(answer.outcome.body) == {"seq": 3}  # type: ignore[union-attr]
    failed = _call("history", {"room": "a"}, ops)
    ops.pending[-1][1].fail(ApiError(503, "backplane_timeout", "late"), 5.0, 0)
    assert failed.outcome.status == 503  # type: ignore[union-attr]
    assert json.loads(failed.outcome.body)["error"]["code"] == "backplane_timeout"  # type: ignore[union-attr]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["publish", "presence", "bad", "info"]), min_size=1, max_size=12))
def test_a_batch_answers_in_order_whatever_is_awaited(methods: list[str]) -> None:
    """Calls answered at once and awaited ones mix; each runs only after the one
    before it is answered, and the results come in the calls' order."""
    ops = LaterOps(now={"info"})
    calls = [
        {"method": "nope"}
        if m == "bad"
        else {"method": m, "params": {"room": "a"} | ({"content": 0} if m == "publish" else {})}
        for m in methods
    ]
    for c in calls:
        if c["method"] == "info":
            c["params"] = {}
    answer = _call("batch", {"calls": calls}, ops)
    settled = 0
    while isinstance(answer, Pending) and not answer.done:
        # Only the first awaited call not answered is running: the rest wait for it.
        assert len(ops.pending) == settled + 1
        _name, pending = ops.pending[-1]
        pending.resolve({"later": settled}, settled * 0.01, 0)  # within the batch's 5 s
        settled += 1
    response = answer.outcome if isinstance(answer, Pending) else answer
    results = json.loads(response.body)["results"]
    assert len(results) == len(methods)
    later = iter(range(settled))
    for m, r in zip(methods, results, strict=True):
        if m == "bad":
            assert r["status"] == 404
        elif m == "info":
            assert r["result"] == {"now": "info"}
        else:
            assert r["result"] == {"later": next(later)}
