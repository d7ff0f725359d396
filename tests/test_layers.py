"""
The import direction of ``src/roombus``: no import runs up the layers.

Every module has a layer (``LAYERS``, by module or package, the longest match wins),
and every layer a rank. An import may go to a lower rank or stay inside its own
layer; layers of one rank (``server`` and ``cluster``; the three adapters) never
import each other. Every import counts: inside functions and under ``TYPE_CHECKING``
too (an upward type-only import is coupling all the same). The lower layers may not
import sockets, clocks or event loops, nor third-party packages but the few listed.

``KNOWN`` holds today's violations. It may only shrink: a violation not in it fails,
and so does one in it that no longer occurs (remove it from the set when it is fixed).
docs/design.md ("Layers") carries the table :func:`render_layers` makes of ``LAYERS``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
SRC: Final = ROOT / "src"

#: Layer -> rank (see docs/design.md, "Layers").
RANKS: Final = {
    "core": 0,
    "server": 1,
    "cluster": 1,
    "client": 1,
    "node": 2,
    "trio": 3,
    "asyncio": 3,
    "asgi": 3,
    "root": 4,
}

#: Module or package -> layer; a package entry covers its submodules, except the
#: root ``roombus`` entry, which covers ``roombus/__init__.py`` only. A module of
#: ``src/roombus`` that matches no entry fails :func:`test_every_module_has_a_layer`.
LAYERS: Final = {
    "roombus.core": "core",
    "roombus._version": "core",
    "roombus.server": "server",
    "roombus.cluster": "cluster",
    "roombus.client": "root",  # connect() picks the driver of the running loop
    "roombus.client.protocol": "client",
    "roombus.client.wire": "client",
    "roombus.client._driver": "client",
    "roombus.client._trio": "trio",
    "roombus.client._asyncio": "asyncio",
    "roombus.client.testing": "root",  # serves a trio or asyncio server in memory
    "roombus.node": "node",
    "roombus.trio": "trio",
    "roombus.asyncio": "asyncio",
    "roombus.asgi": "asgi",
    "roombus": "root",
    "roombus.__main__": "root",
    "roombus._cli": "root",
    "roombus._run": "root",
    "roombus.hub": "root",
    "roombus.lowlevel": "root",
    "roombus.logging": "node",  # JsonFormatter, RedactTokens: for any program's log, asgi's too
}

#: Standard modules the layers below ``node`` may not import: sockets, clocks,
#: threads, signals, event loops, the environment.
NO_IO: Final = frozenset(
    {
        "_thread",
        "asyncio",
        "concurrent",
        "datetime",
        "multiprocessing",
        "os",
        "select",
        "selectors",
        "signal",
        "socket",
        "socketserver",
        "ssl",
        "subprocess",
        "threading",
        "time",
    }
)

#: Third-party packages (top-level names) each layer may import; ``root`` may import
#: anything. A module entry adds to its layer's set.
THIRD_PARTY: Final = {
    "core": frozenset({"attrs"}),
    "server": frozenset({"attrs"}),
    "cluster": frozenset({"attrs"}),
    "client": frozenset({"attrs"}),
    "node": frozenset({"attrs"}),
    "trio": frozenset({"attrs", "trio"}),
    "asyncio": frozenset({"attrs"}),
    # it runs on either loop; sniffio tells anyio which, in the backplane's callbacks
    "asgi": frozenset({"attrs", "anyio", "sniffio", "trio"}),
    "roombus.server.wire": frozenset({"h11", "wsproto"}),
    "roombus.client.wire": frozenset({"wsproto"}),
    # JWTAuthenticator: PyJWT and cryptography, imported when one is made
    "roombus.server.auth": frozenset({"cryptography", "jwt"}),
    "roombus.cluster.resp": frozenset({"hiredis"}),  # the RESP parser, imported on first use
    "roombus.node.options": frozenset({"tomli"}),  # the configuration file, before 3.11
    # each server's own CollectorRegistry, its collector and the process collectors
    "roombus.node.metrics": frozenset({"prometheus_client"}),
}

#: Event loops each adapter may import (the others' are not its business).
LOOPS: Final = {
    "trio": frozenset({"trio"}),
    "asyncio": frozenset({"asyncio"}),
    "asgi": frozenset({"anyio", "asyncio", "trio"}),
}

#: Standard modules a module of a lower layer may import all the same.
STDLIB_ALLOWED: Final = {
    "roombus.node.facade": frozenset({"time"}),  # wall(): the adapters' clock
    # generate_node_id(): host, pid; redis_ssl_context(): the TLS context of rediss://
    "roombus.node.cluster": frozenset({"os", "socket", "ssl"}),
    # the settings of `roombus serve`: the environment, the TLS context of --certfile
    "roombus.node.options": frozenset({"os", "ssl"}),
    "roombus.node.settings": frozenset({"ssl"}),  # the context's type (TYPE_CHECKING)
    "roombus.logging": frozenset({"time"}),  # JsonFormatter's timestamps
}

#: ``(importer, imported)`` allowed across the rules: the ASGI app picks a backplane
#: driver by the running loop (inside a function).
EXCEPTIONS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("roombus.asgi", "roombus.trio._backplane"),
        ("roombus.asgi", "roombus.asyncio._backplane"),
    }
)

#: Compatibility modules (re-exports for old import paths): ``src`` may not import them.
SHIMS: Final[frozenset[str]] = frozenset()

#: Today's violations. Only ever remove from this set.
KNOWN: Final[frozenset[str]] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "roombus").rglob("*.py"))}


def layer_of(module: str) -> str | None:
    if module == "roombus" or module in LAYERS:
        return LAYERS.get(module)
    parts = module.split(".")
    for end in range(len(parts) - 1, 1, -1):  # never down to the bare root entry
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module *module* imports, anywhere in it (``roombus.*`` or top-level names)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "__future__":
                continue
            # ``from . import codec`` imports the submodule; a name imports the module.
            subs = {f"{target}.{alias.name}" for alias in node.names}
            found = subs & known.keys()
            out.update(found)
            if len(found) < len(subs):
                out.add(target)
    return out


def _owner(imported: str, known: dict[str, Path]) -> str:
    """The module of ours *imported* names (``roombus.trio._redis.X`` -> its module)."""
    while imported not in known and "." in imported:
        imported = imported.rpartition(".")[0]
    return imported


def violations() -> set[str]:
    known = modules()
    out: set[str] = set()
    for module, path in known.items():
        layer = layer_of(module)
        if layer is None:
            continue  # test_every_module_has_a_layer reports it
        rank = RANKS[layer]
        for imported in sorted(imports(module, path, known)):
            top = imported.partition(".")[0]
            if top == "roombus":
                target = _owner(imported, known)
                if target in SHIMS:
                    out.add(f"{module} -> {target} (a compatibility shim)")
                other = layer_of(target)
                if other is None or other == layer or (module, target) in EXCEPTIONS:
                    continue
                if layer != "root" and RANKS[other] >= rank:
                    out.add(f"{module} -> {target} ({layer} {rank} -> {other} {RANKS[other]})")
            elif layer == "root":
                continue
            elif layer in LOOPS and top in {"anyio", "asyncio", "trio"} - LOOPS[layer]:
                out.add(f"{module} imports {top} (another adapter's loop, {layer})")
            elif top in sys.stdlib_module_names:
                if rank < RANKS["trio"] and top in NO_IO - STDLIB_ALLOWED.get(module, set()):
                    out.add(f"{module} imports {top} (I/O or clock, {layer})")
            else:
                allowed = THIRD_PARTY[layer] | THIRD_PARTY.get(module, frozenset())
                if top not in allowed:
                    out.add(f"{module} imports {top} (third party, {layer})")
    return out


def render_layers() -> str:
    """The layer table of docs/design.md, from ``RANKS`` and ``LAYERS``."""
    lines = ["| rank | layer | modules |", "| --- | --- | --- |"]
    for layer, rank in sorted(RANKS.items(), key=lambda item: (item[1], item[0])):
        names = sorted(m for m, lay in LAYERS.items() if lay == layer)
        cells = ", ".join(f"`{n}`" for n in names)
        lines.append(f"| {rank} | {layer} | {cells} |")
    return "\n".join(lines) + "\n"


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert missing == [], f"modules without a layer (add them to LAYERS): {missing}"


def test_every_layer_entry_names_a_module() -> None:
    known = modules()
    stale = sorted(m for m in LAYERS if m not in known)
    assert stale == [], f"LAYERS names modules that do not exist: {stale}"


def test_no_import_runs_up_the_layers() -> None:
    found = violations()
    new = sorted(found - KNOWN)
    fixed = sorted(KNOWN - found)
    assert new == [], f"imports against the layers: {new}"
    assert fixed == [], f"fixed, so remove them from KNOWN: {fixed}"


def test_the_checker_sees_lazy_relative_and_type_only_imports(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..core import codec, nothing\n"
        "from . import _redis\n"
        "if TYPE_CHECKING:\n"
        "    from ..server.hub import Hub\n"
        "def f():\n"
        "    import socket\n"
        "    from ..asgi import create_app\n",
        encoding="utf-8",
    )
    known = {m: Path() for m in ("roombus.core.codec", "roombus.trio._redis", "roombus.server.hub")}
    # As if it were src/roombus/trio/m.py: "." is roombus.trio, ".." is roombus.
    assert imports("roombus.trio.m", path, known) == {
        "typing",
        "roombus.core",  # `nothing` is a name of the package
        "roombus.core.codec",
        "roombus.trio._redis",
        "roombus.server.hub",
        "socket",
        "roombus.asgi",  # create_app is a name of it
    }


def test_layer_of_takes_the_longest_match() -> None:
    assert layer_of("roombus") == "root"
    assert layer_of("roombus.trio._redis") == "trio"
    assert layer_of("roombus.core.broker") == "core"
    assert layer_of("roombus._new") is None  # the root entry covers no submodule


def test_design_doc_has_the_layer_table() -> None:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert render_layers() in text, "docs/design.md: paste render_layers() under 'Layers'"
