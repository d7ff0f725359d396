"""A POST's body is read only for an API call with a valid key: any other is answered
from its head, so that no one can make the server hold a body it does not want."""

from __future__ import annotations

import json

import pytest

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub

KEY = "k" * 24
BIG = 1024 * 1024


def post(hub: Hub, path: str, *, key: str | None, body: bytes) -> bytes:
    cid = hub.open(now=0.0, peer="10.0.0.1:1000")
    auth = f"Authorization: apikey {key}\r\n" if key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {BIG}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    hub.receive(cid, head + body, now=0.0, timestamp=0)
    return b"".join(q.data() for _, q in hub.take_dirty())


@pytest.mark.parametrize(
    ("config", "path", "key", "status"),
    [
        (ServerConfig(), "/ws", None, b"405"),
        (ServerConfig(), "/api/info", KEY, b"405"),  # no API without a key configured
        (ServerConfig(api_keys=[KEY]), "/healthz", KEY, b"405"),
        (ServerConfig(api_keys=[KEY]), "/api/info", None, b"401"),
        (ServerConfig(api_keys=[KEY]), "/api/info", "w" * 24, b"401"),
    ],
)
def test_an_unwanted_body_is_answered_from_the_head(config, path, key, status) -> None:
    hub = Hub(BrokerConfig(), config)
    out = post(hub, path, key=key, body=b"a" * 65536)
    assert out.startswith(b"HTTP/1.1 " + status), out[:80]
    assert b"100 Continue" not in out


def test_a_valid_call_gets_100_continue_then_its_body_is_read() -> None:
    hub = Hub(BrokerConfig(), ServerConfig(api_keys=[KEY]))
    body = json.dumps({"room": "lobby", "content": "hi"}).encode()
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    cid = hub.open(now=0.0, peer="10.0.0.1:1000")
    hub.receive(cid, head + b"Expect: 100-continue\r\n\r\n", now=0.0, timestamp=0)
    assert b"".join(q.data() for _, q in hub.take_dirty()) == b"HTTP/1.1 100 Continue\r\n\r\n"
    cid = hub.open(now=0.0, peer="10.0.0.1:1001")
    hub.receive(cid, head + b"\r\n" + body, now=0.0, timestamp=0)
    out = b"".join(q.data() for _, q in hub.take_dirty())
    assert out.startswith(b"HTTP/1.1 200"), out[:80]
    assert json.loads(out.partition(b"\r\n\r\n")[2])["seq"] == 1


def _answer(hub: Hub, cid: int) -> tuple[int, dict]:
    out = b"".join(q.data() for c, q in hub.take_dirty() if c == cid)
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _call(hub: Hub, path: str, body: bytes, now: float = 0.0) -> int:
    cid = hub.open(now=now, peer="192.0.2.1:1")
    hub.receive(
        cid,
        b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: apikey %s\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), KEY.encode(), len(body), body),
        now=now,
        timestamp=int(now),
    )
    return cid


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/info", b'{"\\ud800": 1}'),
        ("/api/batch", b'{"calls": [{"method": "info", "params": {"x\\udfff": 0}}]}'),
    ],
)
def test_a_field_name_that_is_not_text_is_named_in_a_400(path: str, body: bytes) -> None:
    hub = Hub(BrokerConfig(), ServerConfig(api_keys=[KEY]))
    status, answer = _answer(hub, _call(hub, path, body))
    if path == "/api/batch":
        assert status == 200
        status, answer = answer["results"][0]["status"], answer["results"][0]
    assert status == 400
    assert answer["error"]["field"] in ("\ud800", "x\udfff")


def test_a_batch_waiting_on_a_silent_redis_answers_before_the_connection_s_deadline() -> None:
    from roombus.cluster import BackplaneRestored, ClusterBroker

    hub = Hub(
        broker=ClusterBroker(BrokerConfig(heartbeat=False, rate_limit=0), node="n1"),
        config=ServerConfig(api_keys=[KEY]),
    )
    hub.backplane_event(BackplaneRestored(), now=0.0, timestamp=0)
    hub.take_backplane()
    calls = [{"method": "publish", "params": {"room": f"r{i}", "content": i}} for i in range(4)]
    calls.append({"method": "disconnect", "params": {"username": "bob"}})
    cid = _call(hub, "/api/batch", json.dumps({"calls": calls}).encode())
    sent: list[str] = []
    out = b""
    t = 0.0
    while not out and t < 9.0:  # the connection's deadline: timeout + close_timeout, 10 s
        t += 0.5
        hub.timeout(now=t, timestamp=int(t))
        sent += [type(a).__name__ for a in hub.take_backplane()]
        out = b"".join(q.data() for c, q in hub.take_dirty() if c == cid)
    assert out.startswith(b"HTTP/1.1 200"), (t, out[:60])
    results = json.loads(out.partition(b"\r\n\r\n")[2])["results"]
    # Redis never answers: the first publish times out, the others are not begun
    # (before, each waited its own 5 s and the disconnect went out after the client left).
    assert [r["status"] for r in results] == [503] * 5
    assert {r["error"]["code"] for r in results} == {"backplane_timeout"}
    assert "Control" not in sent
    assert t <= 6.0


def test_a_call_waiting_on_the_backplane_outlives_the_handshake_timeout_and_ignores_input() -> None:
    """The connection of a call whose answer is awaited is held past its handshake
    timeout (up to the operations' timeout and the close timeout), and what its client
    sends meanwhile is not read: the answer is the call's."""
    from roombus.cluster import BackplaneRestored, ClusterBroker

    hub = Hub(
        broker=ClusterBroker(BrokerConfig(heartbeat=False, rate_limit=0), node="n1"),
        config=ServerConfig(api_keys=[KEY], handshake_timeout=1.0, close_timeout=2.0),
    )
    hub.backplane_event(BackplaneRestored(), now=0.0, timestamp=0)
    hub.take_backplane()
    body = json.dumps({"room": "lobby", "content": "hi"}).encode()
    cid = _call(hub, "/api/publish", body)
    assert [type(a).__name__ for a in hub.take_backplane()]  # the relay, unanswered
    hub.receive(cid, b"GET /healthz HTTP/1.1\r\n\r\n", now=0.5, timestamp=0)
    hub.receive(cid, b"\x00garbage\r\n\r\n", now=0.6, timestamp=0)
    out = b""
    t = 0.0
    while not out and t < 10.0:
        assert hub.take_to_close() == [], t  # not dropped at its handshake timeout
        t += 0.5
        hub.timeout(now=t, timestamp=int(t))
        out = b"".join(q.data() for c, q in hub.take_dirty() if c == cid)
    assert out.startswith(b"HTTP/1.1 503"), (t, out[:60])
    assert json.loads(out.partition(b"\r\n\r\n")[2])["error"]["code"] == "backplane_timeout"
    assert 1.0 < t <= hub.operations.timeout + 0.5
    hub.timeout(now=t + 2.0, timestamp=0)  # unread, it goes at the close timeout
    assert hub.take_to_close() == [cid]


@pytest.mark.parametrize("api_port", [None, 0])
def test_a_bare_api_path_is_the_api_s_and_healthz_is_a_probe(api_port: int | None) -> None:
    """``/api`` names no method but is the API's (404 from it, JSON; a GET its 405),
    on whichever listener serves the API; ``/healthz`` is a probe there too."""
    hub = Hub(BrokerConfig(), ServerConfig(api_keys=[KEY], api_port=api_port))
    api = api_port is not None
    cid = hub.open(now=0.0, peer="10.0.0.1:1000", api=api)
    hub.receive(
        cid,
        f"POST /api HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {KEY}\r\n"
        "Content-Length: 2\r\n\r\n{}".encode(),
        now=0.0,
        timestamp=0,
    )
    status, answer = _answer(hub, cid)
    assert status == 404 and answer["error"]["code"] == "not_found"
    cid = hub.open(now=0.0, peer="10.0.0.1:1001", api=api)
    hub.receive(cid, b"GET /api?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    status, answer = _answer(hub, cid)
    assert status == 405 and answer["error"]["code"] == "method_not_allowed"
    cid = hub.open(now=0.0, peer="10.0.0.1:1002", api=api)
    hub.receive(cid, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", now=0.0, timestamp=0)
    assert hub.probe_count == 1  # not counted as a transport connection
    assert hub.metrics()["roombus_transport_connections"] == 2
    out = b"".join(q.data() for c, q in hub.take_dirty() if c == cid)
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    ("api_port", "target", "status"),
    [(None, b"/api/info", b"405"), (0, b"/api/info", b"405"), (0, b"/ws?room=a", b"404")],
)
def test_a_head_request_on_the_api_s_paths_is_answered_without_a_body(
    api_port: int | None, target: bytes, status: bytes
) -> None:
    hub = Hub(BrokerConfig(), ServerConfig(api_keys=[KEY], api_port=api_port))
    cid = hub.open(now=0.0, peer="10.0.0.1:1000", api=api_port is not None)
    hub.receive(cid, b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % target, now=0.0, timestamp=0)
    out = b"".join(q.data() for c, q in hub.take_dirty() if c == cid)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" ")
    assert body == b"" and int(head.partition(b"content-length: ")[2].split(b"\r")[0]) > 0


@pytest.mark.parametrize("gone", ["lost", "shut down"])
def test_the_answer_of_a_call_whose_connection_went_while_it_waited_is_dropped(gone: str) -> None:
    """The connection went (the adapter said it was lost, or a shutdown dropped it)
    before the backplane answered: the answer, when it comes, is written nowhere."""
    from roombus.cluster import BackplaneRestored, ClusterBroker

    hub = Hub(
        broker=ClusterBroker(BrokerConfig(heartbeat=False, rate_limit=0), node="n1"),
        config=ServerConfig(api_keys=[KEY]),
    )
    hub.backplane_event(BackplaneRestored(), now=0.0, timestamp=0)
    hub.take_backplane()
    body = json.dumps({"room": "lobby", "content": "hi"}).encode()
    cid = _call(hub, "/api/publish", body)
    assert hub.take_backplane()  # the relay, unanswered
    assert not [c for c, _ in hub.take_dirty() if c == cid]
    if gone == "lost":
        hub.lost(cid, now=1.0, timestamp=1)
    else:
        hub.shutdown(now=1.0, timestamp=1)
        assert hub.take_to_close() == [cid]
    for t in range(2, 12):  # past the operations' timeout: the call is answered 503
        hub.timeout(now=float(t), timestamp=t)
        assert not [c for c, _ in hub.take_dirty() if c == cid], t
    assert hub.take_to_close() == []
