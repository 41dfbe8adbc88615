"""The dependency direction of docs/DESIGN.md, checked on the real imports of every module.

A module may import only from layers above it; the clients never import the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fetchd"

LAYERS: dict[str, int] = {
    # pure, stdlib only
    "errors": 0, "retry": 0, "ranges": 0, "digest": 1, "config": 1, "reference": 2, "platform": 2,
    "manifest": 3, "registry_errors": 3, "archive_format": 4,
    # I/O, one concern each: registry side
    "auth": 4, "registry_http": 5, "registry_async": 6, "fleet_cache": 6,
    # store side
    "store_index": 4, "ingest": 4, "store_follow": 5, "store_gc": 5, "layer_store": 6,
    # pack side
    "decompress": 4, "compress_budget": 4, "archive_writer": 4, "layer_frame": 5, "pack": 6,
    "frame_check": 6,
    # hand-back and service plumbing
    "deliver": 4, "sdnotify": 4, "loop_lag": 4, "listener": 4,
    # the meeting point
    "pull": 7,
    # wiring
    "server": 8, "cli": 9, "__main__": 10,
}
PURE = {"errors", "retry", "ranges", "digest", "config", "reference", "platform", "manifest",
        "registry_errors", "archive_format"}
IO_NEIGHBOURS_FORBIDDEN = {
    "registry_async": {"layer_store", "pack", "pull", "deliver"},
    "registry_http": {"layer_store", "pack", "pull", "deliver"},
    "layer_store": {"registry_async", "auth", "pack", "pull", "aiohttp"},
    "ingest": {"registry_async", "auth", "pack", "pull", "aiohttp"},
    "store_index": {"registry_async", "auth", "pack", "pull", "aiohttp"},
    "pack": {"registry_async", "auth", "pull", "aiohttp", "server", "layer_store"},
    "compress_budget": {"registry_async", "auth", "pull", "aiohttp", "server", "layer_store",
                        "pack", "archive_writer", "layer_frame", "decompress", "store_index"},
    "archive_writer": {"registry_async", "auth", "pull", "aiohttp", "server", "layer_store",
                       "pack", "compress_budget", "layer_frame", "zstandard", "store_index"},
    "layer_frame": {"registry_async", "auth", "pull", "aiohttp", "server", "layer_store",
                    "pack", "store_index"},
    "deliver": {"registry_async", "pack", "pull", "layer_store"},
    "fleet_cache": {"layer_store", "pack", "pull", "deliver", "zstandard", "frame_check",
                    "layer_frame", "registry_async", "store_index"},
    "frame_check": {"registry_async", "registry_http", "auth", "pull", "aiohttp", "server",
                    "layer_store", "pack", "fleet_cache", "store_index"},
}


def _imports(path: Path) -> set[str]:
    """Top-level names imported by a module: fetchd siblings by module name, others by package."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level and node.module:
                names.add(node.module.split(".")[0])
            elif node.level:
                names.update(alias.name for alias in node.names)
            elif node.module:
                parts = node.module.split(".")
                names.add(parts[1] if parts[0] == "fetchd" and len(parts) > 1 else parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                names.add(parts[1] if parts[0] == "fetchd" and len(parts) > 1 else parts[0])
    return names


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.stem)
def test_module_imports_only_from_layers_above(path: Path) -> None:
    own = LAYERS.get(path.stem)
    assert own is not None, f"fetchd/{path.name} is not placed in a layer: add it to docs/DESIGN.md and LAYERS"
    siblings = {p.stem for p in _modules()}
    for name in _imports(path) & siblings:
        assert LAYERS[name] < own, (
            f"fetchd/{path.name} imports {name}, which is not above it in the dependency direction"
        )


@pytest.mark.parametrize("path", [p for p in _modules() if p.stem in PURE], ids=lambda p: p.stem)
def test_pure_modules_use_only_the_standard_library(path: Path) -> None:
    third_party = {"aiohttp", "zstandard", "isal", "yarl", "multidict"}
    assert not (_imports(path) & third_party), f"fetchd/{path.name} must stay pure (stdlib only)"


@pytest.mark.parametrize("module,forbidden", sorted(IO_NEIGHBOURS_FORBIDDEN.items()))
def test_io_modules_do_not_reach_across(module: str, forbidden: set[str]) -> None:
    path = PACKAGE / f"{module}.py"
    if not path.exists():
        pytest.fail(f"fetchd/{module}.py is missing")
    assert not (_imports(path) & forbidden), f"fetchd/{module}.py imports {_imports(path) & forbidden}"


def test_client_library_is_standard_library_only() -> None:
    client = ROOT / "client" / "fetchd_client"
    files = sorted(client.glob("*.py"))
    assert files, "client/fetchd_client has no modules"
    for path in files:
        names = _imports(path)
        assert not names & {"fetchd", "aiohttp", "zstandard", "isal"}, (
            f"{path.relative_to(ROOT)} must use the standard library only"
        )
