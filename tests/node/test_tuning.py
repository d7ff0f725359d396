"""The adapters' tuning constants have one home, :mod:`roombus.node.tuning`."""

from __future__ import annotations

import ast
from pathlib import Path

import roombus.node.tuning as tuning

SRC = Path(__file__).resolve().parents[2] / "src" / "roombus"
ADAPTERS = [SRC / "trio" / "_server.py", SRC / "asyncio" / "_server.py", SRC / "asgi.py"]


def _assigned(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_no_adapter_defines_a_tuning_constant_of_its_own() -> None:
    for path in ADAPTERS:
        again = sorted(_assigned(path) & set(tuning.__all__))
        assert again == [], f"{path.name} defines {again}: import them from roombus.node.tuning"


def test_the_servers_share_the_coalescing_constants() -> None:
    import roombus.asyncio._server as asyncio_server
    import roombus.trio._server as trio_server

    for name in ("BUSY_SWEEP", "WRITE_DELAY"):
        assert getattr(trio_server, name) is getattr(tuning, name)
        assert getattr(asyncio_server, name) is getattr(tuning, name)
    assert trio_server.RECEIVE_SIZE is tuning.RECEIVE_SIZE


def test_the_values_are_sane() -> None:
    assert tuning.RECEIVE_SIZE >= 4096
    assert tuning.BUSY_SWEEP >= 1
    assert 0 < tuning.WRITE_DELAY < 0.1  # a latency a client must not notice
    assert tuning.ACCEPT_BATCH >= 1
    assert 0 < tuning.ACCEPT_PAUSE <= 1
