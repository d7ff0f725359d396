"""The public surface: what `import roombus` gives, and that it needs no trio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import roombus
import roombus.cluster
import roombus.lowlevel

TIERS = (roombus, roombus.lowlevel, roombus.cluster)


def test_all_is_sorted_and_complete() -> None:
    for tier in TIERS:
        assert tier.__all__ == sorted(tier.__all__), tier.__name__
        for name in tier.__all__:
            assert name in vars(tier), (tier.__name__, name)
    public = {n for n in dir(roombus) if not n.startswith("_")}
    # Besides __all__, only the layer packages, the adapters, the hub module and the
    # logging helpers (once imported) are visible.
    layers = {"client", "cluster", "core", "logging", "lowlevel", "node", "server"}
    adapters = {"asgi", "asyncio", "hub", "trio"}
    assert public - set(roombus.__all__) <= {"annotations"} | layers | adapters


def test_core_imports_without_trio_and_trio_adapter_needs_it() -> None:
    code = (
        "import sys; sys.modules['trio'] = None\n"
        "import roombus.lowlevel\n"
        "b = roombus.lowlevel.Broker()\n"
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
    assert roombus.hub.__all__ == ["FramedHub", "Hub", "MessageHub", "NoticeHook"]
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


def test_every_public_name_has_exactly_one_home() -> None:
    homes: dict[str, list[str]] = {}
    for tier in TIERS:
        for name in tier.__all__:
            homes.setdefault(name, []).append(tier.__name__)
    assert {name: where for name, where in homes.items() if len(where) > 1} == {}
    # The application tier is small; the hub's contract types are public below it.
    assert len(roombus.__all__) <= 28
    for name in ("FramedHub", "MessageHub", "HubBase", "HttpResponse", "Headers", "SendQueue"):
        assert name in roombus.lowlevel.__all__, name


def test_a_name_that_moved_tier_still_works_with_a_warning() -> None:
    assert set(roombus._MOVED) & set(roombus.__all__) == set()
    for name, tier in sorted(roombus._MOVED.items()):
        home = getattr(roombus, tier)
        assert name in home.__all__, (name, tier)
        with pytest.warns(
            DeprecationWarning, match=rf"roombus\.{name} is roombus\.{tier}\.{name} now"
        ):
            assert getattr(roombus, name) is getattr(home, name)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        roombus.Nope  # noqa: B018


def test_from_roombus_import_of_a_moved_name_warns_at_the_importing_line(
    tmp_path: Path,
) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    from roombus import Broker, Settings\n"
        "print(sorted({(str(w.message), w.filename, w.lineno) for w in caught}))\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    expected = [("roombus.Broker is roombus.lowlevel.Broker now", str(script), 4)]
    assert out.stdout.strip() == repr(expected)
