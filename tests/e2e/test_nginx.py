"""
Behind a real nginx (Debian's package; .ci/run installs it): the WebSocket upgrade
through its HTTP proxy with ``X-Forwarded-For``, and through its stream proxy with
``proxy_protocol on``; the server sees each client's own address (clients bind
distinct loopback sources, 127.0.0.2 and 127.0.0.3), and the per-address limit applies
per client, not to nginx. nginx runs in the foreground in a temporary directory,
listening on free loopback ports, and is stopped by its PID only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from .rawws import HOST, TIMEOUT
from .servers import ServerThread

NGINX = "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
INSTALL = "apt-get install nginx libnginx-mod-stream (what .ci/run does)"


@pytest.fixture(params=["trio", "asyncio"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


CONFIG = """\
load_module {module};
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{http_port};
        location /ws {{
            proxy_pass http://{host}:{forwarded_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 120s;
        }}
    }}
}}
stream {{
    server {{
        listen {host}:{stream_port};
        proxy_pass {host}:{proxy_port};
        proxy_protocol on;
    }}
}}
"""


class Nginx:
    """nginx in the foreground (``daemon off``); its error log and PID in *tmp*."""

    def __init__(self, tmp: Path, forwarded_port: int, proxy_port: int) -> None:
        if not os.access(NGINX, os.X_OK):
            pytest.fail(f"{NGINX} is missing: {INSTALL}")
        if not os.path.exists(STREAM_MODULE):
            pytest.fail(f"{STREAM_MODULE} (nginx's stream module) is missing: {INSTALL}")
        self.tmp = tmp
        self.http_port = free_port()
        self.stream_port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(
            CONFIG.format(
                module=STREAM_MODULE,
                tmp=tmp,
                host=HOST,
                http_port=self.http_port,
                stream_port=self.stream_port,
                forwarded_port=forwarded_port,
                proxy_port=proxy_port,
            )
        )
        self.error_log = tmp / "error.log"
        self.proc = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(tmp),
                "-c",
                str(conf),
                "-e",
                str(self.error_log),
                "-g",
                f"daemon off; pid {tmp}/nginx.pid; error_log {self.error_log} info;",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"nginx exited ({self.proc.returncode}): {self.log()}")
            try:
                for port in (self.http_port, self.stream_port):
                    socket.create_connection((HOST, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"nginx is not listening after 10 s: {self.log()}")

    def log(self) -> str:
        out = self.error_log.read_text() if self.error_log.exists() else ""
        if self.proc.poll() is not None and self.proc.stdout is not None:
            out += self.proc.stdout.read().decode(errors="replace")
        return out

    def stop(self) -> None:
        """Stop nginx by its own PID (the master; its worker follows)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def behind_nginx(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> Iterator[tuple[Nginx, ServerThread, ServerThread]]:
    """nginx in front of two servers: one trusting its X-Forwarded-For, one reading
    the PROXY protocol from its stream proxy; one connection per address at most."""
    forwarded = make_server(forwarded_allow_ips="127.0.0.1", max_connections_per_ip=1)
    proxied = make_server(proxy_protocol=True, max_connections_per_ip=1)
    nginx = Nginx(tmp_path, forwarded.port, proxied.port)
    try:
        yield nginx, forwarded, proxied
    finally:
        nginx.stop()


def connect_from(source: str, port: int, username: str):
    """A WebSocket through nginx at *port*, from the loopback address *source*."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect((HOST, port))
    ws = ws_connect(
        f"ws://{HOST}:{port}/ws?room=lobby&username={username}",
        sock=sock,
        open_timeout=TIMEOUT,
        close_timeout=2,
        compression=None,
        proxy=None,
    )
    ws.__enter__()
    return ws


def expect_own_join(ws, username: str) -> None:
    first = json.loads(ws.recv(timeout=TIMEOUT))
    assert (first["type"], first.get("username")) == ("presence", username), first


def connected_peers(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage().split(" connected as ")[0]
        for r in caplog.records
        if " connected as " in r.getMessage()
    ]


@pytest.mark.parametrize("path", ["x-forwarded-for", "proxy-protocol"])
def test_through_nginx_the_server_sees_and_limits_each_client(
    behind_nginx: tuple[Nginx, ServerThread, ServerThread],
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    nginx, _, _ = behind_nginx
    port = nginx.http_port if path == "x-forwarded-for" else nginx.stream_port
    caplog.set_level(logging.DEBUG, logger="roombus")
    ann = connect_from("127.0.0.2", port, "ann")
    bob = connect_from("127.0.0.3", port, "bob")
    try:
        expect_own_join(ann, "ann")
        expect_own_join(bob, "bob")
        # The WebSocket works through nginx both ways.
        bob.send('{"type":"chat","content":"hi"}')
        for ws in (ann, bob):
            while True:
                msg = json.loads(ws.recv(timeout=TIMEOUT))
                if msg["type"] == "chat":
                    assert (msg["username"], msg["content"]) == ("bob", "hi")
                    break
        peers = connected_peers(caplog)
        hosts = sorted(p if path == "x-forwarded-for" else p.rpartition(":")[0] for p in peers)
        assert hosts == ["127.0.0.2", "127.0.0.3"], (peers, nginx.log())
        # A second connection from ann's address is over its limit of one; nginx's
        # own address (127.0.0.1, shared by all) is not what counts.
        with pytest.raises(InvalidStatus) as info:
            connect_from("127.0.0.2", port, "ann2")
        assert info.value.response.status_code == 429
    finally:
        ann.close()
        bob.close()
