"""
uvicorn with the log configuration docs/security.md gives ("Under uvicorn"): its
access log and its WebSocket lines keep their shape, and never show a ``?token=``.
A real ``python -m uvicorn --factory roombus.asgi:create_app`` process on a socket
bound here; ended by its PID.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

from .rawws import HOST, get, http_exchange, upgrade_request
from .test_cli_security import SECRET, hs256, joined_as
from .test_security import connect

DOCS = Path(__file__).resolve().parents[2] / "docs" / "security.md"
BOUND = 15.0


def documented_log_config() -> str:
    """The JSON block of docs/security.md's "Under uvicorn" section."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("### Under uvicorn", 1)[1]
    match = re.search(r"```json\n(.*?)```", section, re.DOTALL)
    assert match, "docs/security.md: no JSON log configuration under 'Under uvicorn'"
    return match.group(1)


@contextmanager
def uvicorn_app(tmp_path: Path, env: dict[str, str], *extra: str) -> Iterator[int]:
    """``uvicorn --factory roombus.asgi:create_app`` (with *extra* options and the
    ``ROOMBUS_*`` variables of *env* only) on a socket bound here, serving once it
    answers ``/healthz``: yields its port, and ends it (our own PID only) on exit. What
    it wrote is then in ``tmp_path / "stderr"`` and ``"stdout"`` (see :func:`logged`)."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ROOMBUS_")}
    environ.update(env, PYTHONUNBUFFERED="1")
    with socket.socket() as sock, out.open("w") as stdout, err.open("w") as stderr:
        sock.bind((HOST, 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        fd = sock.fileno()
        app = ("-m", "uvicorn", "--factory", "roombus.asgi:create_app", "--fd", str(fd))
        proc = subprocess.Popen(
            [sys.executable, *app, *extra],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=environ,
        )
        try:
            deadline = time.monotonic() + BOUND
            while True:
                assert proc.poll() is None, err.read_text()
                try:
                    if get(port, "/healthz").status == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.05)
            yield port
            time.sleep(0.3)  # the last lines reach the files
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(BOUND)


def logged(tmp_path: Path) -> str:
    """What the last :func:`uvicorn_app` of *tmp_path* wrote."""
    return (tmp_path / "stderr").read_text() + (tmp_path / "stdout").read_text()


def test_uvicorn_with_the_documented_log_config_shows_no_token(tmp_path):
    config = tmp_path / "uvicorn-log.json"
    config.write_text(documented_log_config(), encoding="utf-8")
    env = {"ROOMBUS_JWT_SECRET": SECRET, "ROOMBUS_LOG_LEVEL": "debug"}
    with uvicorn_app(tmp_path, env, "--log-config", str(config)) as port:
        good = hs256("ann")
        bad = hs256("bob", ttl=-120)
        ann = connect(port, {"room": "lobby", "token": good})
        try:
            joined_as(ann, "ann")
        finally:
            ann.close()
        target = "/ws?" + urlencode({"room": "lobby", "token": bad})
        assert http_exchange(port, upgrade_request(target)).status == 401
        assert get(port, f"/healthz?token={good}").status == 200  # the access log
    text = logged(tmp_path)
    assert '"WebSocket /ws?room=lobby&token=[redacted]" [accepted]' in text, text
    assert '"GET /healthz?token=[redacted] HTTP/1.1" 200' in text, text
    assert "connected as 'ann'" in text  # roombus's own lines reach the handler too
    for token in (good, bad):
        for part in token.split("."):
            assert part not in text
    assert SECRET not in text


def test_a_bad_variable_under_uvicorn_is_one_line_and_status_2(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ROOMBUS_")}
    environ.update(ROOMBUS_PORT="abc", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "--factory", "roombus.asgi:create_app", "--port", "0"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=environ,
        timeout=BOUND,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("roombus: ")]
    assert len(lines) == 1 and lines[0].startswith("roombus: ROOMBUS_PORT: "), done.stderr


def _uvicorn_refusal_log(tmp_path: Path, *extra: str) -> str:
    """What uvicorn (its default logging, or *extra* options) and roombus write, with
    ``ROOMBUS_LOG_LEVEL=debug``, for one WebSocket refused for its origin."""
    env = {"ROOMBUS_LOG_LEVEL": "debug", "ROOMBUS_ALLOWED_ORIGIN": "https://good.example"}
    with uvicorn_app(tmp_path, env, *extra) as port:
        request = upgrade_request(headers={"Origin": "https://evil.example"})
        assert http_exchange(port, request).status == 403
    return logged(tmp_path)


def _refusal_lines(logged: str) -> list[str]:
    return [line for line in logged.splitlines() if "refused with 403" in line]


def test_roombus_lines_show_under_uvicorns_default_logging(tmp_path):
    logged = _uvicorn_refusal_log(tmp_path)
    lines = _refusal_lines(logged)
    assert len(lines) == 1, logged  # roombus's line for the refused request, once
    assert " roombus: " in lines[0] and "origin not allowed" in lines[0], lines


def test_roombus_lines_are_not_doubled_under_a_host_log_config(tmp_path):
    config = tmp_path / "uvicorn-log.json"
    config.write_text(documented_log_config(), encoding="utf-8")
    logged = _uvicorn_refusal_log(tmp_path, "--log-config", str(config))
    assert len(_refusal_lines(logged)) == 1, logged  # the root handler's, not ours too
