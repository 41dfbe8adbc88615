"""Helpers for the BitBake layer's tests: a real bb datastore, the layer loaded as the bbclass does.

Not a conftest and holds no tests: imported by the other tests/test_bitbake_*.py (pytest puts
tests/ on sys.path because tests/ has a conftest and no __init__.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LAYER = ROOT / "bitbake-client"
LAYER_LIB = LAYER / "lib"

# As fetchd.bbclass does: the layer's lib/ on sys.path, then import the package.
if str(LAYER_LIB) not in sys.path:
    sys.path.insert(0, str(LAYER_LIB))

import bb  # noqa: E402
import bb.data  # noqa: E402
import bb.fetch2  # noqa: E402
import fetchd_bitbake  # noqa: E402


def make_datastore(tmp: Path, arch: str = "amd64", **variables: str) -> Any:
    """A datastore as bitbake's own FetcherTest builds it, plus PACKAGE_ARCH."""
    d = bb.data.init()
    dl_dir = tmp / "downloads"
    dl_dir.mkdir(parents=True, exist_ok=True)
    d.setVar("DL_DIR", str(dl_dir))
    d.setVar("PERSISTENT_DIR", str(tmp / "persist"))
    d.setVar("PACKAGE_ARCH", arch)
    d.setVar("BB_STRICT_CHECKSUM", "0")
    for key, value in variables.items():
        d.setVar(key, value)
    return d


def register() -> Any:
    """Put the fetchd method at the front of bb.fetch2.methods, as the bbclass does."""
    return fetchd_bitbake.register(bb.fetch2.methods)


def unregister() -> None:
    bb.fetch2.methods[:] = [m for m in bb.fetch2.methods if type(m).__name__ != "Fetchd"]


def fetch(url: str, d: Any, unpack_to: Path | None = None) -> Any:
    """``Fetch([url], d).download()`` (and ``.unpack(dir)``); returns the FetchData."""
    f = bb.fetch2.Fetch([url], d, cache=False)
    f.download()
    if unpack_to is not None:
        os.makedirs(unpack_to, exist_ok=True)
        f.unpack(str(unpack_to))
    return f.ud[url]
