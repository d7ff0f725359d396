"""
docs/deploying.md, snippet by snippet, with the tools this machine has:

- the systemd unit (```ini): ``systemd-analyze verify`` (if installed; else parsed),
  and its stop timeout above the drain it starts;
- the nginx block (```nginx): run by a real nginx (as tests/e2e/test_nginx.py does),
  its certificate a trustme one and its ports free loopback ones, in front of a real
  ``roombus serve`` with the unit's options; a WebSocket goes through it over TLS, and
  the server sees the client's own address;
- the HAProxy configurations (```haproxy): ``haproxy -c``; the TCP one also runs, in
  front of ``roombus serve --proxy-protocol``, and carries a WebSocket after its
  health check has passed;
- the Dockerfile (```dockerfile): not built (no Docker daemon on these machines):
  every instruction is a known one, the image runs as a non-root user, and its
  HEALTHCHECK command, run here against a real server, passes on 200 and fails on a
  draining node's 503;
- every ``roombus serve`` command line of the page (ExecStart, CMD, shell blocks,
  inline code) parses with roombus's own parser into Settings.

Every process is started here, stopped by its PID, and every wait is bounded.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from websockets.sync.client import connect as ws_connect

from roombus._cli import _parser
from roombus.node.options import build_configs
from roombus.node.settings import Settings
from tests.e2e.conftest import CliServer
from tests.e2e.rawws import HOST, TIMEOUT
from tests.e2e.test_nginx import NGINX, Nginx, free_port

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "deploying.md").read_text(encoding="utf-8")
HAPROXY = shutil.which("haproxy")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
ORIGIN = "https://chat.example.com"
# Paths the page uses, and what stands in for them here.
CERT = "/etc/ssl/roombus/fullchain.pem"
KEY = "/etc/ssl/roombus/privkey.pem"
REDIS_CA = "/etc/roombus/redis-ca.pem"
HAPROXY_CRT = "/etc/haproxy/certs/chat.example.com.pem"
DOC_PORT = "8765"


def blocks(label: str) -> list[str]:
    """The fenced blocks of the page whose info string is *label*."""
    return re.findall(rf"^```{re.escape(label)}\n(.*?)^```$", DOC, re.S | re.M)


def one_block(label: str) -> str:
    found = blocks(label)
    assert len(found) == 1, f"expected one ```{label} block, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trustme CA, and a certificate for chat.example.com in the files the page names."""
    tmp = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("chat.example.com", "127.0.0.1")
    files = {
        "ca": tmp / "ca.pem",
        CERT: tmp / "fullchain.pem",
        KEY: tmp / "privkey.pem",
        HAPROXY_CRT: tmp / "combined.pem",
        REDIS_CA: tmp / "redis-ca.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    ca.cert_pem.write_to_path(str(files[REDIS_CA]))
    cert.private_key_pem.write_to_path(str(files[KEY]))
    cert.cert_chain_pems[0].write_to_path(str(files[CERT]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(files[CERT]), append=True)
    cert.private_key_and_cert_chain_pem.write_to_path(str(files[HAPROXY_CRT]))
    return files


def client_tls(pki: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    return ctx


# -- command lines --------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(one_block("ini"))
    return parser


def exec_start() -> list[str]:
    return shlex.split(unit()["Service"]["ExecStart"])


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", one_block("dockerfile"))
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def docker_cmd() -> list[str]:
    cmds = [json.loads(args) for word, args in dockerfile() if word == "CMD"]
    assert len(cmds) == 1, cmds
    return list(cmds[0])


def command_lines() -> list[list[str]]:
    """Every ``roombus serve`` command line of the page."""
    lines = [exec_start(), docker_cmd()]
    for block in blocks("sh"):
        lines += [shlex.split(ln) for ln in block.splitlines() if ln.startswith("roombus ")]
    for code in re.findall(r"`(roombus serve[^`]*)`", DOC.replace("\n", " ")):
        lines.append(shlex.split(code))
    return lines


def parse_serve(argv: list[str], pki: dict[str, Path]) -> Settings:
    """*argv* (``.../roombus serve ...``) through roombus's own parser, into Settings;
    the files it names replaced by real ones, no ROOMBUS_* variable in play."""
    assert Path(argv[0]).name == "roombus" and argv[1] == "serve", argv
    args = [str(pki[a]) if a in pki else a for a in argv[1:]]
    namespace = _parser().parse_args(args)
    return build_configs(namespace, {})


def test_the_page_has_every_snippet() -> None:
    for label in ("ini", "nginx", "haproxy", "dockerfile"):
        assert blocks(label), label
    assert len(blocks("haproxy")) == 2
    assert len(command_lines()) >= 5


def test_every_command_line_parses_with_roombus_options(pki: dict[str, Path]) -> None:
    for argv in command_lines():
        settings = parse_serve(argv, pki)
        assert settings.server.host in ("127.0.0.1", "0.0.0.0", "10.0.0.11"), argv
    tls = parse_serve(
        next(a for a in command_lines() if "--certfile" in a),
        pki,
    )
    assert tls.ssl_context is not None
    cluster = parse_serve(next(a for a in command_lines() if "--redis" in a), pki)
    assert cluster.cluster is not None


# -- systemd --------------------------------------------------------------------------


def test_the_unit_stops_after_its_drain(pki: dict[str, Path]) -> None:
    service = unit()["Service"]
    for key, value in {
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "DynamicUser": "yes",
    }.items():
        assert service.get(key) == value, key
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/roombus/")
    server = parse_serve(exec_start(), pki).server
    assert "--drain-seconds" in exec_start() and "--close-timeout" in exec_start()
    stop = float(service["TimeoutStopSec"].rstrip("s"))
    assert stop > server.drain_seconds + server.close_timeout
    assert server.host == "127.0.0.1" and server.forwarded_allow_ips


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    roombus = Path(sys.executable).parent / "roombus"
    assert os.access(roombus, os.X_OK), f"{roombus} (roombus's console script) is not installed"
    assert SYSTEMD_ANALYZE is not None, "systemd-analyze (Debian's systemd) is needed"
    argv = exec_start()
    text = one_block("ini").replace(argv[0], str(roombus), 1)
    path = tmp_path / "roombus.service"
    path.write_text(text)
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    # It warns about unknown keys and bad values on stderr, yet exits 0.
    assert (done.returncode, done.stderr.strip()) == (0, ""), done.stderr


# -- nginx ----------------------------------------------------------------------------


def serve_with(argv: list[str], *extra: str) -> CliServer:
    """``roombus serve`` with the options of *argv*, on a free port, plus *extra*."""
    args = ["0" if a == DOC_PORT else a for a in argv[2:]]
    server = CliServer(*args, "--drain-seconds", "0", *extra)
    try:
        server.wait_listening()
    except BaseException:
        server.stop()
        raise
    return server


class DocNginx(Nginx):
    """nginx running the page's block (inside ``http {}``), on free loopback ports."""

    def __init__(self, tmp: Path, pki: dict[str, Path], upstream: int) -> None:
        self.tmp = tmp
        self.http_port = free_port()  # the page's port 80
        self.stream_port = free_port()  # the page's port 443 (the name _wait_listening knows)
        snippet = one_block("nginx")
        assert "listen 80;" in snippet and "listen 443 ssl;" in snippet
        snippet = (
            snippet.replace("listen 80;", f"listen {HOST}:{self.http_port};")
            .replace("listen 443 ssl;", f"listen {HOST}:{self.stream_port} ssl;")
            .replace(f"127.0.0.1:{DOC_PORT}", f"{HOST}:{upstream}")
            .replace(CERT, str(pki[CERT]))
            .replace(KEY, str(pki[KEY]))
        )
        conf = tmp / "nginx.conf"
        conf.write_text(
            "worker_processes 1;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            "    access_log off;\n"
            f"    client_body_temp_path {tmp}/body;\n"
            f"    proxy_temp_path {tmp}/proxy;\n"
            f"    fastcgi_temp_path {tmp}/fastcgi;\n"
            f"    uwsgi_temp_path {tmp}/uwsgi;\n"
            f"    scgi_temp_path {tmp}/scgi;\n" + snippet + "}\n"
        )
        self.error_log = tmp / "error.log"
        command = [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(self.error_log)]
        test = subprocess.run(
            [*command, "-t", "-g", f"pid {tmp}/nginx.pid;"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert test.returncode == 0, test.stderr
        self.proc = subprocess.Popen(
            [*command, "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {self.error_log} info;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._wait_listening()


def wss_from(source: str, port: int, pki: dict[str, Path], path: str = "/ws?room=lobby"):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect((HOST, port))
    return ws_connect(
        f"wss://chat.example.com:{port}{path}",
        sock=sock,
        ssl=client_tls(pki),
        origin=ORIGIN,  # type: ignore[arg-type]
        open_timeout=TIMEOUT,
        close_timeout=2,
        compression=None,
        proxy=None,
    )


def https_get(port: int, path: str, pki: dict[str, Path]) -> tuple[int, bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: chat.example.com\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection((HOST, port), timeout=TIMEOUT) as raw,
        client_tls(pki).wrap_socket(raw, server_hostname="chat.example.com") as tls,
    ):
        tls.sendall(request.encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
def behind_doc_nginx(tmp_path: Path, pki: dict[str, Path]) -> Iterator[tuple[DocNginx, CliServer]]:
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"{NGINX} is missing: apt-get install nginx (what .ci/run does)")
    server = serve_with(exec_start(), "--log-level", "debug")
    try:
        assert server.port is not None
        nginx = DocNginx(tmp_path, pki, server.port)
        try:
            yield nginx, server
        finally:
            nginx.stop()
    finally:
        server.stop()


def test_a_websocket_through_the_documented_nginx(
    behind_doc_nginx: tuple[DocNginx, CliServer], pki: dict[str, Path]
) -> None:
    nginx, server = behind_doc_nginx
    status, body = https_get(nginx.stream_port, "/healthz", pki)
    assert (status, body.strip()) == (200, b"ok")
    # Port 80 sends browsers to https.
    with socket.create_connection((HOST, nginx.http_port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\nConnection: close\r\n\r\n")
        assert sock.recv(1024).split()[1] == b"301"
    with wss_from("127.0.0.2", nginx.stream_port, pki, "/ws?room=lobby&username=ann") as ann:
        first = json.loads(ann.recv(timeout=TIMEOUT))
        assert (first["type"], first.get("username")) == ("presence", "ann"), first
        ann.send('{"type":"chat","content":"hi"}')
        while (msg := json.loads(ann.recv(timeout=TIMEOUT)))["type"] != "chat":
            pass
        assert (msg["username"], msg["content"]) == ("ann", "hi")
    # X-Forwarded-For from a trusted 127.0.0.1: the server saw the client's address.
    connected = [ln for ln in server.lines if " connected as " in ln]
    assert connected and all("127.0.0.2" in ln for ln in connected), server.stderr


# -- HAProxy --------------------------------------------------------------------------


def haproxy_config(text: str, pki: dict[str, Path], front: int, upstream: str) -> str:
    assert "bind :443 ssl crt " in text
    return (
        text.replace("bind :443", f"bind {HOST}:{front}")
        .replace(HAPROXY_CRT, str(pki[HAPROXY_CRT]))
        .replace(f"127.0.0.1:{DOC_PORT}", f"{HOST}:{upstream}")
        .replace("log stdout format raw local0", "log stderr format raw local0")
        # within this machine's open-file limit (HAProxy wants about 2 per connection)
        .replace("maxconn 20000", "maxconn 256")
    )


@pytest.mark.parametrize("mode", ["tcp", "http"])
def test_haproxy_accepts_the_documented_config(
    tmp_path: Path, pki: dict[str, Path], mode: str
) -> None:
    text = next(b for b in blocks("haproxy") if f"mode {mode}" in b)
    assert "option httpchk GET /healthz" in text and "http-check expect status 200" in text
    assert ("send-proxy-v2" in text) == (mode == "tcp")
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(haproxy_config(text, pki, free_port(), DOC_PORT))
    assert HAPROXY is not None, "haproxy is needed (.ci/run installs it)"
    done = subprocess.run(
        [HAPROXY, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_websocket_through_the_documented_haproxy_tcp_mode(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The TCP config in front of ``roombus serve --proxy-protocol``: its health check
    (with a PROXY header) passes, and a client's WebSocket is seen from its address."""
    text = next(b for b in blocks("haproxy") if "mode tcp" in b)
    assert "`roombus serve --host 127.0.0.1 --port 8765 --proxy-protocol`" in DOC
    server = serve_with(
        ["roombus", "serve", "--host", "127.0.0.1", "--port", DOC_PORT, "--proxy-protocol"],
        "--log-level",
        "debug",
    )
    try:
        run_haproxy_tcp(tmp_path, pki, text, server)
    finally:
        server.stop()


def run_haproxy_tcp(tmp_path: Path, pki: dict[str, Path], text: str, server: CliServer) -> None:
    front = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(haproxy_config(text, pki, front, str(server.port)))
    assert HAPROXY is not None
    with (tmp_path / "haproxy.log").open("w") as log_file:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
            try:
                socket.create_connection((HOST, front), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy is not listening after 10 s"
                time.sleep(0.05)
        # Past the first health check (inter 2s, fall 1): a failing one would have
        # taken the only server out, and the WebSocket below would get no server.
        time.sleep(2.5)
        with wss_from("127.0.0.2", front, pki, "/ws?room=lobby&username=bob") as bob:
            first = json.loads(bob.recv(timeout=TIMEOUT))
            assert (first["type"], first.get("username")) == ("presence", "bob"), first
        log = (tmp_path / "haproxy.log").read_text()
        assert "is DOWN" not in log, log
        connected = [ln for ln in server.lines if " connected as " in ln]
        assert connected and all("127.0.0.2:" in ln for ln in connected), server.stderr
    finally:
        proc.send_signal(signal.SIGTERM)  # our own PID only
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- the Dockerfile -------------------------------------------------------------------

DOCKER_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
    "WORKDIR",
}  # fmt: skip


def healthcheck() -> list[str]:
    (args,) = [a for w, a in dockerfile() if w == "HEALTHCHECK"]
    _, _, command = args.partition("CMD ")
    return list(json.loads(command))


def test_the_dockerfile_is_well_formed() -> None:
    instructions = dockerfile()
    assert {w for w, _ in instructions} <= DOCKER_INSTRUCTIONS
    assert instructions[0][0] == "FROM" and re.fullmatch(r"python:3\.\d+-slim", instructions[0][1])
    values = dict(instructions)  # the last of each
    assert values["USER"] not in ("root", "0")
    assert values["STOPSIGNAL"] == "SIGTERM"
    assert values["EXPOSE"] == DOC_PORT
    assert docker_cmd() == ["roombus", "serve", "--host", "0.0.0.0"]
    assert any(w == "RUN" and "pip install" in a and "/src" in a for w, a in instructions)
    # It installs the extra it names.
    extra = re.search(r"/src\[(\w+)\]", DOC)
    assert extra is not None
    assert f"\n{extra.group(1)} = [" in (ROOT / "pyproject.toml").read_text()
    assert f"http://127.0.0.1:{DOC_PORT}/healthz" in " ".join(healthcheck())


def test_the_healthcheck_passes_on_200_and_fails_while_draining() -> None:
    argv = healthcheck()
    assert argv[0] == "python"
    server = CliServer("--port", "0", "--drain-seconds", "30")
    try:
        port = server.wait_listening()
        check = [sys.executable, *[a.replace(DOC_PORT, str(port)) for a in argv[1:]]]
        assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0
        # A WebSocket keeps the drain going, so that /healthz answers 503 meanwhile.
        with ws_connect(
            f"ws://{HOST}:{port}/ws?room=lobby&username=ann", open_timeout=TIMEOUT, proxy=None
        ) as ws:
            ws.recv(timeout=TIMEOUT)
            server.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while subprocess.run(check, capture_output=True, timeout=30).returncode == 0:
                assert time.monotonic() < deadline, "the health check still passes"
                time.sleep(0.1)
    finally:
        server.stop()
