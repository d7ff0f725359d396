"""
roombus.js: its own tests (node's test runner, against real servers it starts) on every
transport, and the package folder kept consistent with the Python package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import roombus

JS = Path(str(resources.files("roombus").joinpath("js")))
pytestmark = pytest.mark.slow


def _node() -> list[str]:
    node = shutil.which("node")
    assert node is not None, "node (Node.js >= 20.10) is needed for roombus.js's tests"
    has_ws = subprocess.run(
        [node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False
    )
    return [node] if has_ws.returncode == 0 else [node, "--experimental-websocket"]


@pytest.mark.parametrize("transport", ["trio", "asyncio", "asgi"])
def test_roombus_js_suite(transport: str) -> None:
    env = {
        **os.environ,
        "ROOMBUS_TEST_PYTHON": sys.executable,
        "ROOMBUS_TEST_TRANSPORT": transport,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    for name in list(env):
        if name.startswith("ROOMBUS_") and name not in (
            "ROOMBUS_TEST_PYTHON",
            "ROOMBUS_TEST_TRANSPORT",
        ):
            del env[name]  # the tests' servers take only the settings they give
    run = subprocess.run(
        [*_node(), "--test", "--test-reporter=tap", "test/"],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    summary = dict(re.findall(r"^# (pass|fail|cancelled) (\d+)$", run.stdout, re.M))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert int(summary.get("pass", 0)) >= 15, summary
    assert summary.get("fail") == "0", summary


def test_package_version_is_the_python_package_version() -> None:
    package = json.loads((JS / "package.json").read_text(encoding="utf-8"))
    assert package["version"] == roombus.__version__
    for name in package["files"]:
        assert (JS / name).is_file(), name


def test_declarations_name_every_export() -> None:
    source = (JS / "roombus.js").read_text(encoding="utf-8")
    declared = (JS / "roombus.d.ts").read_text(encoding="utf-8")
    exported = set(re.findall(r"^export (?:function|class|const) (\w+)", source, re.M))
    typed = set(re.findall(r"^export (?:function|class|const) (\w+)", declared, re.M))
    assert exported == typed
    assert {"Client", "connect", "PublishError", "OutboxFullError"} <= exported
