"""The public surface: what `import roombus` gives, and that it needs no trio."""

from __future__ import annotations

import subprocess
import sys

import roombus


def test_all_is_sorted_and_complete() -> None:
    assert roombus.__all__ == sorted(roombus.__all__)
    for name in roombus.__all__:
        assert hasattr(roombus, name), name
    public = {n for n in dir(roombus) if not n.startswith("_")}
    # Besides __all__, only the subpackages (the layers; the adapters and the hub once
    # imported) are visible.
    layers = {"cluster", "core", "node", "server"}
    assert (
        public - set(roombus.__all__) <= {"annotations", "asgi", "asyncio", "hub", "trio"} | layers
    )


def test_core_imports_without_trio_and_trio_adapter_needs_it() -> None:
    code = (
        "import sys; sys.modules['trio'] = None\n"
        "import roombus\n"
        "b = roombus.Broker()\n"
        "assert 'trio' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    import roombus.trio\n"
        "except ImportError:\n"
        "    print('adapter-needs-trio')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "adapter-needs-trio"


def test_core_imports_no_socket_or_clock_modules() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import roombus\n"
        "new = set(sys.modules) - before\n"
        "bad = {m for m in new if m.split('.')[0] in {'trio', 'socket', 'asyncio', 'wsproto',"
        " 'h11', 'selectors', 'ssl'}}\n"
        "print(sorted(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_adapter_modules_export_what_they_document() -> None:
    import roombus.asgi
    import roombus.asyncio
    import roombus.hub

    assert roombus.asyncio.__all__ == [
        "BackplaneStatistics",
        "NoticeHook",
        "RedisBackplane",
        "Server",
        "serve",
    ]
    assert roombus.asgi.__all__ == ["RoombusASGI", "create_app"]
    assert roombus.hub.__all__ == ["Hub", "NoticeHook"]
    for module in (roombus.asgi, roombus.asyncio, roombus.hub):
        for name in module.__all__:
            assert hasattr(module, name), (module, name)


def test_asyncio_adapter_imports_without_trio() -> None:
    code = (
        "import sys; sys.modules['trio'] = None\nimport roombus.asyncio, roombus.hub\nprint('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "ok"


def test_asgi_without_anyio_names_the_extra() -> None:
    code = "import sys; sys.modules['anyio'] = None\nimport roombus.asgi\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: roombus.asgi needs anyio"), last
    assert "pip install 'roombus[asgi]'" in last
