"""docs/adapters.md, "Writing an adapter", against the code it describes: every hub,
queue, backplane and facade name it uses exists, trio's ``transmit()`` is quoted
whole, and every adapter's ``transmit()`` does the same four steps in the same order."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path

import roombus.asyncio._backplane
import roombus.asyncio._server
import roombus.trio._backplane
import roombus.trio._server
from roombus.asgi import RoombusASGI
from roombus.node.facade import ServerFacade

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
SECTION = DOC[DOC.index("## Writing an adapter") : DOC.index("### Testing your adapter")]
ADAPTERS = [roombus.trio._server.Server, roombus.asyncio._server.Server, RoombusASGI]
STEPS = ["# 1. close", "# 2. write", "# 3. backplane", "# 4. timer"]


def _members(package: Path) -> set[str]:
    """Methods and ``self.x`` attributes of every class in the modules of *package*."""
    names: set[str] = set()
    for path in package.glob("*.py"):
        for cls in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in ast.walk(cls):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                elif (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "self"
                ):
                    names.add(node.attr)
    return names


def _used(prefix: str) -> set[str]:
    return set(re.findall(rf"\b{prefix}\.([a-z_]+)\b", SECTION))


def test_the_hub_and_queue_names_in_the_doc_exist() -> None:
    server = _members(ROOT / "src" / "roombus" / "server")
    hub, queue = _used("hub"), _used("queue")
    assert {"take_to_close", "has_dirty", "take_backplane", "deadline_moved"} <= hub
    assert sorted(hub - server) == []
    assert {"data", "consume"} <= queue
    assert sorted(queue - server) == []


def test_the_backplane_names_in_the_doc_exist() -> None:
    drivers = [roombus.trio._backplane.RedisBackplane, roombus.asyncio._backplane.RedisBackplane]
    used = _used("backplane")
    assert {"submit", "wait_idle", "aclose", "run", "start"} <= used
    for name in used:
        assert any(hasattr(d, name) for d in drivers), name
    for name in ("submit", "wait_idle"):
        assert all(hasattr(d, name) for d in drivers), name
    assert hasattr(drivers[0], "run") and hasattr(drivers[1], "start")
    assert hasattr(drivers[1], "aclose")


def test_every_adapter_is_a_facade_with_its_own_transmit() -> None:
    for name in ("transmit", "backplane_events", "local_presence", "publish"):
        assert f"`{name}" in SECTION or f"{name}(" in SECTION, name
        assert callable(getattr(ServerFacade, name))
    for adapter in ADAPTERS:
        assert issubclass(adapter, ServerFacade)
        assert adapter.transmit is not ServerFacade.transmit, adapter


def _body(function: object) -> str:
    """A method's source without its docstring, dedented."""
    source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    tree = ast.parse(source).body[0]
    assert isinstance(tree, ast.FunctionDef)
    doc = tree.body[0]
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    lines = source.splitlines()
    return "\n".join(lines[: doc.lineno - 1] + lines[doc.end_lineno :]).strip() + "\n"


def test_the_doc_quotes_trio_s_transmit_whole() -> None:
    quoted = SECTION.split("(trio's, whole):\n\n```python\n", 1)[1].split("```", 1)[0]
    assert quoted == _body(roombus.trio._server.Server.transmit)


def test_every_transmit_does_the_four_steps_in_the_same_order() -> None:
    for adapter in ADAPTERS:
        body = _body(adapter.transmit)
        at = [body.find(step) for step in STEPS]
        assert -1 not in at and at == sorted(at), (adapter, at)
        # each step reads its own hub output, in that order
        outputs = ["take_to_close()", "dirty", "take_backplane()", "deadline_moved"]
        found = [body.find(o) for o in outputs]
        assert -1 not in found and found == sorted(found), (adapter, found)
