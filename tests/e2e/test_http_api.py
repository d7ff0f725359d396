"""The server API over HTTP (POST /api/<method>), on every transport, with http.client."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import pytest

from .rawws import HOST, TIMEOUT

KEY = "k" * 24
READER = "r" * 24
KEYS = (KEY, READER + ":read")


def call(
    port: int,
    method: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    raw: bytes | None = None,
    verb: str = "POST",
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"apikey {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(verb, f"/api/{method}", body=data, headers=headers)
        response = conn.getresponse()
        text = response.read()
        assert response.getheader("content-type", "").startswith("application/json"), text
        return response.status, json.loads(text)
    finally:
        conn.close()


@pytest.fixture
def api(make_server: Any) -> Any:
    return make_server(api_keys=KEYS)


def test_publish_reaches_a_client_and_returns_its_position(api: Any) -> None:
    (ann,) = api.room("lobby", "ann")
    status, result = call(api.port, "publish", {"room": "lobby", "content": {"hi": 1}})
    assert status == 200, result
    assert result["seq"] == 1 and result["epoch"] and result["delivered"] == 1
    msg = ann.expect(type="chat", username="api", content={"hi": 1}, seq=1)
    assert msg["room"] == "lobby"


def test_idempotency_key_publishes_once(api: Any) -> None:
    (ann,) = api.room("lobby", "ann")
    body = {"room": "lobby", "content": "once", "username": "bot", "idempotency_key": "m-1"}
    s1, first = call(api.port, "publish", body)
    s2, second = call(api.port, "publish", body)
    assert s1 == s2 == 200
    assert (first["epoch"], first["seq"]) == (second["epoch"], second["seq"])
    assert not first["duplicate"] and second["duplicate"]
    ann.expect(type="chat", content="once", username="bot")
    ann.ping()  # nothing else came


def test_errors_are_json(api: Any) -> None:
    status, body = call(api.port, "publish", {"room": "x"}, key=None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = call(api.port, "publish", {"room": "x"}, key="w" * 24)
    assert status == 401
    status, body = call(api.port, "publish", {"room": "x", "content": 1}, key=READER)
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = call(api.port, "publish", {"room": "bad room", "content": 1})
    assert status == 400 and body["error"]["field"] == "room"
    status, body = call(api.port, "publish", {"room": "r"})
    assert status == 400 and body["error"]["field"] == "content"
    status, body = call(api.port, "nope", {})
    assert status == 404
    status, body = call(api.port, "publish", raw=b"{not json")
    assert status == 400 and body["error"]["code"] == "bad_json"
    status, body = call(api.port, "info", verb="GET")
    assert status == 405
    status, body = call(api.port, "info", {}, key=READER)
    assert status == 200 and body["connections"] == 0


def test_disconnect_closes_with_the_code(api: Any) -> None:
    (ann,) = api.room("lobby", "ann")
    status, result = call(
        api.port, "disconnect", {"username": "ann", "code": 4001, "reason": "bye"}
    )
    assert status == 200 and len(result["disconnected"]) == 1
    closed = ann.until_closed()
    assert closed.rcvd is not None and closed.rcvd.code == 4001 and closed.rcvd.reason == "bye"
    status, result = call(api.port, "disconnect", {"username": "ann", "code": 1001})
    assert status == 400 and result["error"]["field"] == "code"


def test_kick_removes_from_presence(api: Any) -> None:
    ann, bob = api.room("lobby", "ann", "bob")
    status, result = call(api.port, "presence", {"room": "lobby"})
    assert status == 200
    assert [u["username"] for u in result["users"]] == ["ann", "bob"]
    assert all(u["connections"] == 1 for u in result["users"])
    status, result = call(api.port, "kick", {"room": "lobby", "username": "bob"})
    assert status == 200 and len(result["kicked"]) == 1
    bob.expect(type="error", code="kicked", room="lobby")
    ann.expect(type="presence", event="leave", username="bob")
    status, result = call(api.port, "presence_stats", {"room": "lobby"})
    assert result == {"room": "lobby", "users": 1, "connections": 1}


def test_history(api: Any) -> None:
    for i in range(5):
        call(api.port, "publish", {"room": "h", "content": i})
    status, result = call(api.port, "history", {"room": "h", "limit": 2})
    assert status == 200 and [m["content"] for m in result["items"]] == [3, 4]
    since = {"epoch": result["epoch"], "seq": 1}
    status, result = call(api.port, "history", {"room": "h", "since": since})
    assert [m["seq"] for m in result["items"]] == [2, 3, 4, 5]


def test_batch_answers_each_call_in_order(api: Any) -> None:
    calls = [
        {"method": "publish", "params": {"room": "b", "content": 1}},
        {"method": "publish", "params": {"room": "bad room", "content": 1}},
        {"method": "presence_stats", "params": {"room": "b"}},
        {"method": "batch", "params": {}},
    ]
    status, result = call(api.port, "batch", {"calls": calls})
    assert status == 200
    statuses = [r["status"] for r in result["results"]]
    assert statuses == [200, 400, 200, 400]
    assert result["results"][1]["error"]["field"] == "room"


def test_rooms_pagination_lists_every_room_once(api: Any) -> None:
    names = [f"r{i:02d}" for i in range(7)]
    for name in names:
        api.connect(name, "u")
    api.connect("other", "u")
    seen: list[str] = []
    cursor = None
    while True:
        body: dict[str, Any] = {"pattern": "r*", "limit": 3}
        if cursor is not None:
            body["cursor"] = cursor
        status, page = call(api.port, "rooms", body)
        assert status == 200, page
        seen += [r["room"] for r in page["rooms"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == names


def test_broadcast(api: Any) -> None:
    (ann,) = api.room("a", "ann")
    (bob,) = api.room("b", "bob")
    status, result = call(api.port, "broadcast", {"rooms": ["a", "b", "c"], "content": "all"})
    assert status == 200 and [r["seq"] for r in result["results"]] == [1, 1, 1]
    ann.expect(type="chat", content="all", room="a")
    bob.expect(type="chat", content="all", room="b")


def test_api_is_off_without_a_key(server: Any) -> None:
    conn = http.client.HTTPConnection(HOST, server.port, timeout=TIMEOUT)
    conn.request("POST", "/api/info", body=b"{}", headers={"authorization": f"apikey {KEY}"})
    assert conn.getresponse().status in (404, 405)
    conn.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\x00garbage",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"room": "r", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"room": "r", "content": 1e999}',
        b'{"room": "r", "content": ' + b"9" * 10_000 + b"}",
        b'{"room": "r", "content": NaN}',
        b'{"room": "r", "content": "\\ud800"}',
        b'{"room": 1e400, "content": 1}',
        b"null",
        b'"text"',
        b'{"room": "r", "content": 1, "username": {"a": 1}}',
    ],
    ids=lambda raw: repr(raw[:20]),
)
def test_no_body_is_a_500(api: Any, raw: bytes) -> None:
    for method in ("publish", "batch", "history", "rooms"):
        status, body = call(api.port, method, raw=raw)
        assert 400 <= status < 500 or status == 200, body
        assert "error" in body or status == 200


def test_too_large_is_413(api: Any) -> None:
    size = 1024 * 1024 + 10
    with socket.create_connection((HOST, api.port), timeout=TIMEOUT) as sock:
        head = (
            f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\n"
            f"Content-Length: {size}\r\n\r\n"
        )
        sock.sendall(head.encode() + b" " * 1000)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.split()[1] == b"413", data
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "payload_too_large"


def test_in_process_api(server: Any) -> None:
    (ann,) = server.room("lobby", "ann")

    async def publish() -> Any:
        return await server.server.api.publish("lobby", "hello", idempotency_key="x1")

    result = server.call(lambda: _run_coroutine(publish()))
    assert result["seq"] == 1 and result["delivered"] == 1
    ann.expect(type="chat", content="hello", username="api")


def _run_coroutine(coro: Any) -> Any:
    """Run a coroutine that never awaits anything (the API's single-node calls)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the call awaited something")


# An ASGI app opens no listener: the ASGI server has the sockets (docs/api-http.md).
@pytest.mark.parametrize("transport", ["trio", "asyncio"], indirect=True)
def test_api_on_its_own_listener(make_server: Any, transport: str) -> None:
    st = make_server(api_keys=KEYS, api_port=0)
    api_port = st.server.api_port
    assert api_port and api_port != st.port
    status, result = call(api_port, "info", {})
    assert status == 200 and result["connections"] == 0
    conn = http.client.HTTPConnection(HOST, api_port, timeout=TIMEOUT)
    conn.request("GET", "/metrics")
    assert conn.getresponse().status == 200
    conn.close()
    conn = http.client.HTTPConnection(HOST, api_port, timeout=TIMEOUT)
    conn.request("GET", "/")
    assert conn.getresponse().status == 404
    conn.close()
    # Not on the main listener.
    conn = http.client.HTTPConnection(HOST, st.port, timeout=TIMEOUT)
    conn.request("POST", "/api/info", body=b"{}", headers={"authorization": f"apikey {KEY}"})
    assert conn.getresponse().status in (404, 405)
    conn.close()


def test_cli_api_key(cli: Any) -> None:
    proc = cli("--port", "0", "--api-port", "0", env={"ROOMBUS_API_KEY": f"{KEY} {READER}:read"})
    proc.wait_listening()
    deadline = time.monotonic() + 10
    while "server API listening" not in proc.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    port = int(
        proc.stderr.split("server API listening on http://")[1].split("/")[0].rsplit(":", 1)[1]
    )
    assert call(port, "info", {})[0] == 200
    assert call(port, "kick", {"room": "r", "username": "u"}, key=READER)[0] == 403
    assert KEY not in proc.stderr
