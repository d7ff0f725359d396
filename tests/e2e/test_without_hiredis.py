"""Without hiredis (the ``redis`` extra), a single node imports and serves; a cluster says what
to install.

Each test runs Python in a subprocess where ``sys.modules['hiredis'] = None``, so any
``import hiredis`` fails as if it were not installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from .conftest import LISTENING_RE, open_client
from .rawws import HOST

BLOCK = "import sys; sys.modules['hiredis'] = None\n"
#: ``python -m roombus`` with hiredis blocked first; the arguments follow.
SERVE = (
    BLOCK
    + "import runpy; sys.argv[0] = 'roombus'; runpy.run_module('roombus', run_name='__main__')"
)
EXTRA = "pip install 'roombus[redis]'"
BOUND = 15.0  # seconds for any one step of a subprocess


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ROOMBUS_")}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def test_the_adapters_import_without_hiredis_and_the_backplane_names_the_extra() -> None:
    code = BLOCK + (
        "import roombus, roombus.hub, roombus.trio, roombus.asyncio, roombus.asgi\n"
        "assert sys.modules['hiredis'] is None\n"
        "assert 'RedisBackplane' in roombus.trio.__all__\n"
        "assert 'BackplaneStatistics' in roombus.trio.__all__\n"
        "assert {'RedisBackplane', 'serve'} <= set(dir(roombus.trio))\n"
        "for name in ('RedisBackplane', 'BackplaneStatistics'):\n"
        "    try:\n"
        "        getattr(roombus.trio, name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        assert exc.name == 'hiredis', exc.name\n"
        "        print(name, str(exc).splitlines()[0])\n"
        "try:\n"
        "    from roombus.trio import RedisBackplane\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('from-import', str(exc).splitlines()[0])\n"
        "assert 'RedisBackplane' in roombus.asyncio.__all__\n"
        "try:\n"
        "    roombus.asyncio.RedisBackplane\n"
        "except ModuleNotFoundError as exc:\n"
        "    assert exc.name == 'hiredis', exc.name\n"
        "    print('asyncio', str(exc).splitlines()[0])\n"
        "try:\n"
        "    roombus.trio.NoSuchName\n"
        "except AttributeError as exc:\n"
        "    print('other', exc)\n"
    )
    proc = _python(code)
    out, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    needs = f"the Redis backplane needs hiredis: {EXTRA}"
    assert [line.split(" ", 1)[0] for line in lines] == [
        "RedisBackplane",
        "BackplaneStatistics",
        "from-import",
        "asyncio",
        "other",
    ]
    for line in lines[:4]:
        assert line.split(" ", 1)[1].startswith(needs), line
    assert lines[4] == "other module 'roombus.trio' has no attribute 'NoSuchName'"


@pytest.fixture
def serve() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # our own PID only
        proc.communicate(timeout=BOUND)


@pytest.mark.parametrize("transport", ["trio", "asyncio"])
def test_a_single_node_serves_without_hiredis(
    serve: list[subprocess.Popen[str]], transport: str
) -> None:
    proc = _python(
        SERVE, "serve", "--host", HOST, "--port", "0", env={"ROOMBUS_TRANSPORT": transport}
    )
    serve.append(proc)
    lines: list[str] = []
    listening = threading.Event()
    port: list[int] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            found = LISTENING_RE.search(line)
            if found and not port:
                port.append(int(found[2]))
                listening.set()
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert listening.wait(BOUND) and port, "".join(lines)
    ann = open_client(port[0], "lobby", "ann")
    bob = open_client(port[0], "lobby", "bob")
    try:
        ann.expect(type="presence", event="join", username="bob")
        bob.chat("no hiredis here")
        ann.expect_chat("no hiredis here", "bob")
    finally:
        ann.close()
        bob.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(BOUND) == 0
    reader.join(BOUND)
    assert "Traceback" not in "".join(lines)


@pytest.mark.parametrize(
    "args",
    [
        ("--redis", "redis://127.0.0.1:1"),
        ("--redis", "redis://127.0.0.1:1", "--node-id", "n1", "--redis-prefix", "p"),
        ("--redis", "redis://127.0.0.1:1", "--transport", "asyncio"),
    ],
)
def test_redis_without_hiredis_is_a_one_line_config_error(args: tuple[str, ...]) -> None:
    proc = _python(SERVE, "serve", "--host", HOST, "--port", "0", *args)
    out, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 2
    assert out == ""
    assert err == f"roombus serve: error: redis: needs hiredis: {EXTRA}\n"
