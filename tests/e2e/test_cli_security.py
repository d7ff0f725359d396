"""
The command line's security options, in a real ``python -m roombus serve`` subprocess:
JWT authentication (a secret from the environment, an RS256 public key file), TLS
(``--certfile``/``--keyfile``), connection limits, the TOML ``--config`` file and its
precedence, configuration errors (exit 2 naming the setting), and tokens kept out of
the log.

Everything listens on loopback; every wait is bounded; processes are ended by PID
(the ``cli`` fixture and :class:`CliServer` do it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed

from .conftest import Client, CliServer, open_client
from .rawws import (
    HOST,
    TIMEOUT,
    http_exchange,
    open_socket,
    read_to_eof,
    response_head,
    upgrade_request,
)
from .test_security import connect

EXIT_BOUND = 5.0  # seconds from SIGTERM to the exit
START_BOUND = 15.0  # seconds for a process to print its listening line, or exit
SECRET = "cli-secret-for-tests-only-0123456789abcdef"
TLS_LISTENING_RE = re.compile(r"listening on wss://[^/\s]+:(\d+)/ws")


def hs256(sub: str = "ann", *, ttl: float = 3600, secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, secret, "HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand: HMAC-SHA256 with *key* (any bytes, a PEM too), or unsigned."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def joined_as(client: Client, username: str) -> None:
    """The client's own presence join (as *username*) and the room's state arrive."""
    try:
        client.expect(type="presence", event="join", username=username, room=client.room)
        assert username in client.expect(type="presence_state", room=client.room)["users"]
    except BaseException:
        client.close()
        raise


def stop(proc: CliServer) -> None:
    proc.signal(signal.SIGTERM)
    assert proc.wait(EXIT_BOUND) == 0
    assert "Traceback" not in proc.stderr, proc.stderr


def wait_listening_tls(proc: CliServer, timeout: float = START_BOUND) -> int:
    """The port of a ``listening on wss://`` line (CliServer waits for ``ws://`` only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = TLS_LISTENING_RE.search(proc.stderr)
        if m:
            return int(m.group(1))
        if proc.proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"no 'listening on wss://' line: {proc.stderr}")


def wait_for_status(port: int, target: str, status: int, timeout: float = TIMEOUT) -> None:
    """Retry an upgrade until the server answers *status* (capacity coming back)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = response_head(port, upgrade_request(target))
        if seen == status:
            return
        time.sleep(0.05)
    pytest.fail(f"still {seen}, not {status}, after {timeout} s")


@pytest.fixture
def cli_once() -> Iterator[Any]:
    """``roombus serve`` over trio only, for what does not depend on the transport."""
    procs: list[CliServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliServer:
        p = CliServer(*args, env=env, transport="trio")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- authentication ------------------------------------------------------------------------------


def test_jwt_secret_from_the_environment(cli):
    proc = cli("--port", "0", env={"ROOMBUS_JWT_SECRET": SECRET})
    port = proc.wait_listening()
    # No token: 401 before the upgrade, with the scheme to use.
    resp = http_exchange(port, upgrade_request("/ws?room=lobby&username=ann"))
    assert resp.status == 401, resp
    assert resp.headers.get("www-authenticate") == "Bearer"
    assert "sec-websocket-accept" not in resp.headers
    # Another key's token: 401 too.
    other = hs256(secret="another-secret-of-32-bytes-or-more-000")
    assert http_exchange(port, upgrade_request(f"/ws?room=lobby&token={other}")).status == 401
    # A good token is the identity; the query's username is ignored.
    ann = connect(
        port,
        {"room": "lobby", "username": "mallory"},
        headers={"Authorization": f"Bearer {hs256('ann')}"},
    )
    try:
        joined_as(ann, "ann")
        ann.chat("hi", username="mallory")
        ann.expect(type="chat", username="ann", content="hi")
    finally:
        ann.close()
    stop(proc)
    assert SECRET not in proc.stderr


def test_jwt_public_key_file_accepts_rs256_and_nothing_else(cli, tmp_path, rsa_key):
    pem = public_pem(rsa_key)
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem)
    proc = cli(
        "--port",
        "0",
        "--jwt-public-key",
        str(key_file),
        "--jwt-issuer",
        "https://issuer.example",
        env={"ROOMBUS_JWT_AUDIENCE": "roombus-tests"},
    )
    port = proc.wait_listening()
    claims = {
        "sub": "bob",
        "exp": int(time.time() + 3600),
        "aud": "roombus-tests",
        "iss": "https://issuer.example",
    }
    good = jwt.encode(claims, rsa_key, algorithm="RS256")
    bob = connect(port, {"room": "lobby", "token": good})
    try:
        joined_as(bob, "bob")
    finally:
        bob.close()
    refused = {
        # algorithm confusion: HS256 "signed" with the public key's PEM as the secret
        "hs256-with-the-public-key": forged({"alg": "HS256", "typ": "JWT"}, claims, pem),
        "alg-none": forged({"alg": "none", "typ": "JWT"}, claims, None),
        "wrong-issuer": jwt.encode(
            {**claims, "iss": "https://elsewhere.example"}, rsa_key, algorithm="RS256"
        ),
        "wrong-audience": jwt.encode({**claims, "aud": "other"}, rsa_key, algorithm="RS256"),
        "expired": jwt.encode(
            {**claims, "exp": int(time.time() - 120)}, rsa_key, algorithm="RS256"
        ),
    }
    for name, token in refused.items():
        status = http_exchange(port, upgrade_request(f"/ws?room=lobby&token={token}")).status
        assert status == 401, name
    stop(proc)


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_certfile_and_keyfile_serve_wss(cli, tmp_path, ca):
    cert = ca.issue_cert(HOST)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    proc = cli("--port", "0", "--certfile", str(cert_file), "--keyfile", str(key_file))
    port = wait_listening_tls(proc)
    assert f"listening on wss://{HOST}:{port}/ws" in proc.stderr
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    ann = connect(
        port, {"room": "lobby", "username": "ann"}, scheme="wss", ssl_context=client_context
    )
    try:
        joined_as(ann, "ann")
        ann.chat("over tls")
        ann.expect(type="chat", content="over tls", username="ann")
        # Plain HTTP to the TLS port is not a WebSocket, and the server survives it.
        with open_socket(port) as sock:
            sock.sendall(upgrade_request())
            try:
                data = read_to_eof(sock, timeout=TIMEOUT)
            except ConnectionResetError:
                data = b""
            assert b"101" not in data
        ann.ping()
    finally:
        ann.close()
    stop(proc)


# -- connection limits ---------------------------------------------------------------------------


def test_max_connections_answers_503(cli):
    proc = cli("--port", "0", "--max-connections", "1")
    port = proc.wait_listening()
    ann = open_client(port, "lobby", "ann")
    try:
        resp = http_exchange(port, upgrade_request("/ws?room=lobby&username=bob"))
        assert resp.status == 503, resp
        assert resp.headers.get("retry-after") == "5"
        ann.ping()  # the one admitted carries on
    finally:
        ann.close()
    wait_for_status(port, "/ws?room=lobby&username=bob", 101)  # room again
    stop(proc)


def test_max_connections_per_ip_answers_429(cli):
    proc = cli("--port", "0", "--max-connections-per-ip", "1")
    port = proc.wait_listening()
    ann = open_client(port, "lobby", "ann")
    try:
        resp = http_exchange(port, upgrade_request("/ws?room=lobby&username=bob"))
        assert resp.status == 429, resp
        assert resp.headers.get("retry-after") == "5"
        ann.ping()
    finally:
        ann.close()
    wait_for_status(port, "/ws?room=lobby&username=bob", 101)
    stop(proc)


# -- the configuration file ----------------------------------------------------------------------


def _too_big(port: int, origin: str, size: int) -> int | None:
    """The close code a chat of *size* characters gets (None: it was delivered)."""
    client = open_client(port, "lobby", "ann", origin=origin)
    with client.ws:
        client.chat("x" * size)
        try:
            msg = client.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        assert msg["type"] == "chat" and len(msg["content"]) == size, msg
        return None


def _origin_status(port: int, origin: str) -> int:
    return response_head(port, upgrade_request("/ws?room=lobby&username=o", {"Origin": origin}))


def test_config_file_is_honoured_and_flags_and_variables_win(cli, tmp_path):
    config = tmp_path / "roombus.toml"
    config.write_text(
        "# limits for the tests\n"
        "[roombus]\n"
        "max-message-bytes = 1024\n"
        "send_queue_bytes = 4096\n"  # underscores work too
        'allowed-origin = ["https://ok.example", "https://also.example"]\n'
    )
    proc = cli("--port", "0", "--config", str(config))
    port = proc.wait_listening()
    assert _origin_status(port, "https://bad.example") == 403
    assert _origin_status(port, "https://also.example") == 101
    assert _too_big(port, "https://ok.example", 2000) == 1009
    stop(proc)

    # The same file through ROOMBUS_CONFIG; a flag wins over it, and so does a variable.
    proc = cli(
        "--port",
        "0",
        "--max-message-bytes",
        "4096",
        "--send-queue-bytes",
        "8192",
        env={"ROOMBUS_CONFIG": str(config), "ROOMBUS_ALLOWED_ORIGIN": "https://env.example"},
    )
    port = proc.wait_listening()
    assert _origin_status(port, "https://ok.example") == 403
    assert _too_big(port, "https://env.example", 2000) is None
    assert _too_big(port, "https://env.example", 5000) == 1009
    stop(proc)


# -- configuration errors ------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path, rsa_key) -> Path:
    """Files the error cases name: a few TOML files, a public key, a certificate."""
    (tmp_path / "unknown.toml").write_text("max-message-bytes = 1024\nbogus-setting = 1\n")
    (tmp_path / "badvalue.toml").write_text('[roombus]\nmax-message-bytes = "lots"\n')
    (tmp_path / "range.toml").write_text("ping_interval = -1\n")
    (tmp_path / "broken.toml").write_text("port = \n")
    (tmp_path / "public.pem").write_bytes(public_pem(rsa_key))
    (tmp_path / "notakey.pem").write_text("hello\n")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        pytest.param(["--config", "{d}/unknown.toml"], "bogus-setting", id="unknown-key"),
        pytest.param(["--config", "{d}/badvalue.toml"], "max-message-bytes", id="bad-value"),
        pytest.param(["--config", "{d}/range.toml"], "ping-interval", id="out-of-range"),
        pytest.param(["--config", "{d}/broken.toml"], "config", id="not-toml"),
        pytest.param(["--config", "{d}/missing.toml"], "config", id="missing-config"),
        pytest.param(["--certfile", "{d}/missing.pem"], "certfile", id="unreadable-certfile"),
        pytest.param(["--keyfile", "{d}/public.pem"], "keyfile", id="keyfile-alone"),
        pytest.param(["--jwt-secret", "too-short"], "jwt-secret", id="short-secret"),
        pytest.param(
            ["--jwt-secret", SECRET, "--jwt-public-key", "{d}/public.pem"],
            "jwt-secret",
            id="secret-and-public-key",
        ),
        pytest.param(["--jwt-leeway", "5"], "jwt-leeway", id="leeway-without-key"),
        pytest.param(["--jwt-public-key", "{d}/notakey.pem"], "jwt-public-key", id="not-a-key"),
        pytest.param(["--jwt-public-key", "{d}/missing.pem"], "jwt-public-key", id="no-key"),
    ],
)
def test_config_errors_exit_2_naming_the_setting(cli_once, files, args, setting):
    proc = cli_once("--port", "0", *[a.format(d=files) for a in args])
    assert proc.wait(START_BOUND) == 2, proc.stderr
    pattern = rf"^roombus serve: error: (?:.*: )?{re.escape(setting)}: \S"
    assert re.search(pattern, proc.stderr, re.MULTILINE), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stderr
    assert SECRET not in proc.stderr  # a secret is named, never echoed


def test_a_short_secret_from_the_environment_is_an_error_too(cli_once):
    proc = cli_once("--port", "0", env={"ROOMBUS_JWT_SECRET": "short"})
    assert proc.wait(START_BOUND) == 2
    assert "roombus serve: error: jwt-secret: " in proc.stderr
    assert "Traceback" not in proc.stderr


# -- tokens stay out of the log ------------------------------------------------------------------


def test_debug_log_never_shows_a_token(cli):
    proc = cli("--port", "0", "--log-level", "debug", env={"ROOMBUS_JWT_SECRET": SECRET})
    port = proc.wait_listening()
    good = hs256("ann")
    expired = hs256("bob", ttl=-120)
    forbidden = hs256("cid", rooms=["elsewhere"])
    wrong_key = hs256("dan", secret="another-secret-of-32-bytes-or-more-000")
    ann = connect(port, {"room": "lobby", "token": good})
    try:
        joined_as(ann, "ann")
        ann.chat("logged?")
        ann.expect(type="chat", content="logged?")
    finally:
        ann.close()
    for token, status in ((expired, 401), (forbidden, 403), (wrong_key, 401), (good + "x", 401)):
        target = "/ws?" + urlencode({"room": "lobby", "token": token})
        assert http_exchange(port, upgrade_request(target)).status == status
    headers = {"Authorization": f"Bearer {expired}"}
    assert http_exchange(port, upgrade_request("/ws?room=lobby", headers)).status == 401
    stop(proc)
    log = proc.stderr
    assert " DEBUG " in log  # the level took effect
    assert "connected as 'ann'" in log
    assert "refused with 401" in log  # refusals are logged, not what was refused
    assert SECRET not in log
    for token in (good, expired, forbidden, wrong_key):
        assert token not in log
        for part in token.split("."):
            assert part not in log  # not the header, the claims or the signature


def test_json_log_has_every_connection_event_and_never_a_token(cli):
    proc = cli(
        "--port", "0", "--log-format", "json", "--log-level", "debug", "--jwt-secret", SECRET
    )
    port = proc.wait_listening()
    by_query = hs256("ann")
    by_protocol = hs256("bob")
    ann = connect(port, {"room": "lobby", "token": by_query})
    try:
        joined_as(ann, "ann")
        bob = connect(port, {"room": "lobby"}, subprotocols=["roombus", f"bearer.{by_protocol}"])
        try:
            joined_as(bob, "bob")
            bob.send({"type": "join", "room": "side"})
            bob.expect(type="presence", event="join", username="bob", room="side")
            bob.expect(type="presence_state", room="side")
            ann.expect(type="presence", event="join", username="bob")
            bob.chat("hello, lobby", room="lobby")
            ann.expect(type="chat", content="hello, lobby", username="bob")
        finally:
            bob.close()
        ann.expect(type="presence", event="leave", username="bob")
    finally:
        ann.close()
    refused = "/ws?" + urlencode({"room": "lobby", "token": by_query + "x"})
    assert http_exchange(port, upgrade_request(refused)).status == 401
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sum("closed by the client" in x for x in proc.lines) < 2:
        time.sleep(0.05)  # the server logs both closes soon after the clients are gone
    stop(proc)
    records = [json.loads(line) for line in proc.lines]  # every line is one JSON object
    assert records, proc.stderr
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= set(r), r
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", r["ts"]), r
    levels = {r["level"] for r in records}
    assert "DEBUG" in levels and "INFO" in levels
    joins = [r for r in records if " joined " in r["msg"]]
    assert {(r["user"], r["room"]) for r in joins} == {
        ("ann", "lobby"),
        ("bob", "lobby"),
        ("bob", "side"),
    }
    assert all(isinstance(r["conn"], int) for r in joins)
    connected = {r["user"]: r for r in records if "connected as" in r["msg"]}
    assert set(connected) == {"ann", "bob"}
    assert connected["ann"]["room"] == "lobby" and connected["ann"]["peer"].startswith("127.0.0.1:")
    closes = [r for r in records if "closed by the client" in r["msg"]]
    assert {r["user"] for r in closes} == {"ann", "bob"}
    for r in closes:
        assert r["code"] == 1000 and isinstance(r["conn"], int)
        assert r["conn"] == connected[r["user"]]["conn"]
    (refusal,) = [r for r in records if "refused with 401" in r["msg"]]
    assert refusal["status"] == 401 and refusal["reason"]
    text = proc.stderr + proc.stdout
    assert SECRET not in text
    for token in (by_query, by_protocol, by_query + "x"):
        for part in token.split("."):
            assert part not in text  # not the header, the claims or the signature
