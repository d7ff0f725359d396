"""
Safe to expose: authentication, authorization, connection limits, abuse, TLS.

Each refusal is asserted by its status or close code, over every transport unless a
test says why not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import statistics
import threading
import time
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import trustme
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from roombus import Username
from roombus.core.auth import Identity
from roombus.server.auth import JWTAuthenticator

from .conftest import Client
from .rawws import (
    HOST,
    OP_CLOSE,
    OP_TEXT,
    TIMEOUT,
    client_frame,
    http_exchange,
    open_socket,
    read_to_eof,
    upgrade_request,
)

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def token(sub: str = "ann", *, ttl: float = 3600, **claims: Any) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256"
    )


def auth(**kw: Any) -> dict[str, Any]:
    return {"authenticator": JWTAuthenticator(secret=SECRET, **kw)}


def connect(
    port: int,
    query: dict[str, str],
    *,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    scheme: str = "ws",
    ssl_context: ssl.SSLContext | None = None,
) -> Client:
    ws = ws_connect(
        f"{scheme}://{HOST}:{port}/ws?" + urlencode(query),
        open_timeout=TIMEOUT,
        close_timeout=2,
        proxy=None,
        compression=None,
        additional_headers=headers,
        subprotocols=subprotocols,  # type: ignore[arg-type]
        ssl=ssl_context,
    )
    ws.__enter__()
    return Client(ws, query.get("room", "lobby"), "?")


def status_of(port: int, target: str, headers: dict[str, str] | None = None) -> int:
    return http_exchange(port, upgrade_request(target, headers)).status


# -- authentication ----------------------------------------------------------------------------


def test_the_token_is_the_identity_and_the_query_username_is_ignored(make_server):
    srv = make_server(extra=auth())
    c = connect(
        srv.port,
        {"room": "lobby", "username": "mallory"},
        headers={"Authorization": f"Bearer {token('ann')}"},
    )
    try:
        c.expect(type="presence", event="join", username="ann")
        assert c.expect(type="presence_state")["users"] == ["ann"]
        c.chat("hi", username="mallory")
        c.expect(type="chat", username="ann", content="hi")
    finally:
        c.close()


def test_token_in_the_query_or_as_a_subprotocol(make_server):
    srv = make_server(extra=auth())
    by_query = connect(srv.port, {"room": "lobby", "token": token("ann")})
    by_protocol = connect(
        srv.port, {"room": "lobby"}, subprotocols=["roombus", f"bearer.{token('bob')}"]
    )
    try:
        by_query.expect(type="presence", event="join", username="ann")
        by_query.expect(type="presence_state")
        # The server answers with the plain subprotocol, never the token.
        assert by_protocol.ws.subprotocol == "roombus"
        by_protocol.expect(type="presence", event="join", username="bob")
        assert by_protocol.expect(type="presence_state")["users"] == ["ann", "bob"]
    finally:
        by_query.close()
        by_protocol.close()


@pytest.mark.parametrize(
    ("credentials", "status"),
    [
        pytest.param({}, 401, id="missing"),
        pytest.param({"token": "not.a.jwt"}, 401, id="malformed"),
        pytest.param(
            {"token": jwt.encode({"sub": "ann", "exp": 2**40}, "x" * 40, algorithm="HS256")},
            401,
            id="wrong-key",
        ),
        pytest.param({"token": token(ttl=-120)}, 401, id="expired"),
        pytest.param({"token": token(rooms=["other"])}, 403, id="room-not-granted"),
        pytest.param({"token": token(rooms="everything")}, 403, id="bad-rooms-claim"),
    ],
)
def test_refused_credentials_get_401_or_403_before_the_upgrade(make_server, credentials, status):
    srv = make_server(extra=auth())
    target = "/ws?" + urlencode({"room": "lobby", **credentials})
    resp = http_exchange(srv.port, upgrade_request(target))
    assert resp.status == status, resp
    assert "sec-websocket-accept" not in resp.headers
    with pytest.raises(InvalidStatus) as info:
        connect(srv.port, {"room": "lobby", **credentials})
    assert info.value.response.status_code == status


def test_a_bearer_subprotocol_without_the_roombus_one_is_refused_400(make_server):
    srv = make_server(extra=auth())
    headers = {"Sec-WebSocket-Protocol": f"bearer.{token()}"}
    assert status_of(srv.port, "/ws?room=lobby", headers) == 400


def test_a_token_expiring_closes_its_connection_with_1008(make_server):
    srv = make_server(extra=auth(leeway=0))
    watcher = connect(srv.port, {"room": "lobby", "token": token("watcher")})
    watcher.expect(type="presence")
    watcher.expect(type="presence_state")
    short = connect(srv.port, {"room": "lobby", "token": token("short", ttl=1.2)})
    try:
        watcher.expect(type="presence", event="join", username="short")
        closed = short.until_closed(timeout=5)
        assert closed.rcvd is not None and closed.rcvd.code == 1008
        assert closed.rcvd.reason == "credentials expired"
        watcher.expect(type="presence", event="leave", username="short")
        watcher.ping()  # the others' connections carry on
    finally:
        watcher.close()
        short.close()


def test_logs_never_contain_tokens(make_server, caplog):
    caplog.set_level(logging.DEBUG, logger="roombus")
    srv = make_server(extra=auth())
    good, expired, forbidden = token("ann"), token(ttl=-120), token(rooms=["elsewhere"])
    c = connect(srv.port, {"room": "lobby", "token": good})
    c.expect(type="presence")
    c.close()
    for bad in (expired, forbidden, good + "x"):
        http_exchange(
            srv.port, upgrade_request("/ws?" + urlencode({"room": "lobby", "token": bad}))
        )
    status_of(srv.port, "/ws?room=lobby", {"Authorization": f"Bearer {expired}"})
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("roombus"))
    assert "refused with 401" in text  # refusals are logged, but not what was refused
    assert SECRET not in text
    for secret in (good, expired, forbidden):
        assert secret not in text
        assert secret.split(".")[1] not in text  # not even the claims


# -- authorization ------------------------------------------------------------------------------


def test_room_rights_from_the_token(make_server):
    srv = make_server(extra=auth())
    rights = {
        "join": ["lobby", "news", "team-*"],
        "publish": ["lobby", "team-*"],
        "presence": ["lobby"],
    }
    ann = connect(srv.port, {"room": "lobby", "token": token("ann", rooms=rights)})
    bob = connect(srv.port, {"room": "news", "token": token("bob")})  # no rooms claim: anything
    try:
        ann.expect(type="presence", event="join", username="ann")
        ann.expect(type="presence_state")
        bob.expect(type="presence")
        bob.expect(type="presence_state")
        ann.send({"type": "join", "room": "secret"})
        ann.expect(type="error", code="forbidden")
        ann.send({"type": "join", "room": "news"})
        # news: may read, may not publish, may not see who is there.
        bob.expect(type="presence", event="join", username="ann")
        ann.send({"type": "chat", "room": "news", "content": "x"})
        ann.expect(type="error", code="forbidden")
        bob.chat("headline")
        bob.expect(type="chat", content="headline")
        ann.expect(type="chat", room="news", content="headline", username="bob")
        ann.send({"type": "join", "room": "team-7"})  # no presence there either
        ann.send({"type": "chat", "room": "team-7", "content": "ok"})
        ann.expect(type="chat", room="team-7", content="ok")
        bob.send({"type": "join", "room": "lobby"})
        ann.expect(type="presence", event="join", username="bob", room="lobby")
        bob.expect(type="presence", event="join", username="bob", room="lobby")
        bob.expect(type="presence_state", room="lobby")
        bob.send({"type": "leave", "room": "news"})
        ann.ping()  # no presence from news reached ann: the pong comes next
    finally:
        ann.close()
        bob.close()


class OnlyStaff:
    """A custom authorizer: users named staff-* may publish; everyone may read."""

    def may_join(self, identity: Identity, room: str) -> bool:
        return True

    def may_publish(self, identity: Identity, room: str) -> bool:
        return identity.username.startswith("staff-")

    def may_see_presence(self, identity: Identity, room: str) -> bool:
        return True


def test_a_custom_authorizer_without_authentication(make_server):
    srv = make_server(extra={"authorizer": OnlyStaff()})
    staff, guest = srv.room("lobby", "staff-1", "guest")
    guest.chat("hello?")
    guest.expect(type="error", code="forbidden")
    staff.chat("welcome")
    guest.expect_chat("welcome", "staff-1")


# -- connection limits ---------------------------------------------------------------------------


def test_max_connections_refuses_with_503(make_server):
    srv = make_server(max_connections=2)
    a, b = srv.room("lobby", "a", "b")
    assert status_of(srv.port, "/ws?room=lobby&username=c") == 503
    b.close()
    a.expect(type="presence", event="leave", username="b")
    srv.connect("lobby", "c")  # room again once one left


def test_max_connections_per_ip_refuses_with_429(make_server):
    srv = make_server(max_connections_per_ip=2)
    srv.room("lobby", "a", "b")
    resp = http_exchange(srv.port, upgrade_request("/ws?room=lobby&username=c"))
    assert resp.status == 429
    assert resp.headers.get("retry-after") == "5"


def test_max_connections_per_room(make_server):
    srv = make_server(max_connections_per_room=2)
    a, _ = srv.room("lobby", "a", "b")
    assert status_of(srv.port, "/ws?room=lobby&username=c") == 403
    c = srv.connect("hall", "c")
    c.send({"type": "join", "room": "lobby"})
    c.expect(type="error", code="forbidden")
    c.ping()
    a.ping()  # nothing about c reached the lobby


# -- abuse -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["trio", "asyncio"], indirect=True)
def test_a_flood_does_not_slow_a_well_behaved_client(make_server):
    """An abuser floods as fast as it can (refused, then closed 1008); meanwhile a polite
    client's round trips stay as fast as they were before the flood."""
    srv = make_server(rate_limit=100, rate_burst=200)
    polite = srv.connect("calm", "polite")

    def round_trips(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            polite.ping()
            times.append(time.perf_counter() - t0)
        return times

    quiet = statistics.median(round_trips(50))
    abuser = srv.raw("noisy", "abuser")
    frame = client_frame(OP_TEXT, json.dumps({"type": "chat", "content": "x" * 2000}).encode())
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        try:
            while not stop.is_set():
                abuser.send_raw(frame)
                sent[0] += 1
        except OSError:
            pass  # closed by the server

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        time.sleep(0.05)
        busy = round_trips(100)
    finally:
        stop.set()
        flooder.join(5)
    assert sent[0] > 200, "the flood never got going"
    # Generous bounds on a shared machine: a stall behind the flood would be seconds.
    assert statistics.median(busy) < max(20 * quiet, 0.05), (quiet, statistics.median(busy))
    assert max(busy) < 1.0
    codes = [f.close_code for f in abuser.wait_eof() if f.opcode == OP_CLOSE]
    assert codes == [1008]


def test_a_trickling_request_is_dropped_at_the_handshake_timeout(make_server, caps):
    """Slowloris: one byte at a time still ends at the handshake timeout, not later. An
    ASGI server owns the request and its time limits (uvicorn's, hypercorn's idle
    timeout): it may keep the socket, but it never upgrades it, and serves others."""
    srv = make_server(handshake_timeout=0.5)
    request = upgrade_request("/ws?room=lobby&username=slow")
    with open_socket(srv.port) as sock:
        t0 = time.monotonic()
        dropped_after = None
        received = b""
        try:
            for byte in request[:-4]:
                sock.sendall(bytes([byte]))
                time.sleep(0.02)
                if time.monotonic() - t0 > 2:
                    break
            if caps.owns_protocol:
                received = read_to_eof(sock, timeout=3)
                dropped_after = time.monotonic() - t0
        except (ConnectionResetError, BrokenPipeError):
            dropped_after = time.monotonic() - t0
        if caps.owns_protocol:
            assert received == b""
            assert dropped_after is not None and dropped_after < 1.5
        else:
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                received = read_to_eof(sock, timeout=0.3)
            assert not received.startswith(b"HTTP/1.1 101"), received
    srv.assert_serving()


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("transport", ["trio", "asyncio"], indirect=True)
def test_tls_round_trip(make_server, ca):
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    srv = make_server(extra={"ssl_context": server_context})
    ann = connect(
        srv.port, {"room": "lobby", "username": "ann"}, scheme="wss", ssl_context=client_context
    )
    try:
        ann.expect(type="presence", event="join", username="ann")
        ann.expect(type="presence_state")
        ann.chat("over tls")
        ann.expect(type="chat", content="over tls", username="ann")
        # Plain HTTP to a TLS port is no WebSocket, and the server survives it.
        with open_socket(srv.port) as sock:
            sock.sendall(upgrade_request())
            try:
                data = read_to_eof(sock, timeout=5)
            except ConnectionResetError:
                data = b""
            assert b"101" not in data
        ann.ping()
    finally:
        ann.close()


def test_identity_claims_stay_out_of_repr():
    identity = Identity(username=Username("ann"), claims={"secret": "hunter2"})
    assert "hunter2" not in repr(identity)
