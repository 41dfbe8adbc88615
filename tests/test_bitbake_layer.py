"""The layer as BitBake parses it: conf/layer.conf, INHERIT of fetchd.bbclass, task signatures.

Parsed with bitbake's own parser (bb.parse) the way the cooker does for a layer and a
recipe. PyPI's bitbake-setup lacks the ``hashserv`` package that bb.siggen imports at
module level; an empty stand-in is enough because no hash server is used here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from test_bitbake_helpers import LAYER, bb, fetchd_bitbake, unregister

if importlib.util.find_spec("hashserv") is None:
    _hs = types.ModuleType("hashserv")
    _hs.__path__ = []  # a package, so "import hashserv.client" resolves to the stand-in below
    sys.modules["hashserv"] = _hs
    sys.modules["hashserv.client"] = types.ModuleType("hashserv.client")

import bb.parse  # noqa: E402
import bb.siggen  # noqa: E402

RECIPE = """\
SRC_URI = "{src_uri}"
ZSTD_THREADS = "{threads}"
ZSTD_COMPRESSION_LEVEL ?= "-3"
ZSTD_DEFAULTS ?= "--threads=${{ZSTD_THREADS}} ${{ZSTD_COMPRESSION_LEVEL}}"
{extra}
do_fetch() {{
    :
}}
addtask fetch
"""


def parse(tmp: Path, src_uri: str, *, threads: int = 2, extra: str = "", **conf: str) -> tuple[Any, str]:
    """Parse layer.conf then a recipe inheriting the class; return (recipe data, do_fetch basehash)."""
    d = bb.data.init()
    d.setVar("LAYERDIR", str(LAYER))
    d = bb.parse.handle(str(LAYER / "conf" / "layer.conf"), d, include=True) or d
    d.expandVarref("LAYERDIR")  # as the cooker does after each layer.conf
    d.delVar("LAYERDIR")
    d.setVar("__bbclasstype", "recipe")
    d.setVar("__exportlist", set())
    d.setVar("BB_SIGNATURE_HANDLER", "basic")
    d.setVar("INHERIT", "fetchd")
    for key, value in conf.items():
        d.setVar(key, value)
    recipe = tmp / "recipes" / "img.bb"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    body = RECIPE.format(src_uri=src_uri, threads=threads, extra=extra)
    # INHERIT is applied by the cooker from bitbake.conf; a plain parse needs the inherit line.
    recipe.write_text(body + "inherit ${INHERIT}\n")
    bb.parse.siggen = bb.siggen.init(d)
    datastores = bb.parse.handle(str(recipe), d)
    rd = datastores[""]
    return rd, bb.parse.siggen.basehash[f"{recipe}:do_fetch"]


@pytest.fixture(autouse=True)
def _clean_methods() -> Any:
    yield
    unregister()


def test_layer_conf_declares_the_collection() -> None:
    d = bb.data.init()
    d.setVar("LAYERDIR", str(LAYER))
    d = bb.parse.handle(str(LAYER / "conf" / "layer.conf"), d, include=True) or d
    d.expandVarref("LAYERDIR")
    assert "fetchd" in d.getVar("BBFILE_COLLECTIONS").split()
    assert str(LAYER) in d.getVar("BBPATH").split(":")
    assert d.getVar("FETCHD_LAYERDIR") == str(LAYER)
    assert d.getVar("BBFILE_PATTERN_fetchd") == f"^{LAYER}/"


def test_inherit_registers_the_method_once_in_front(tmp_path: Path) -> None:
    parse(tmp_path, "docker://debian;tag=12")
    parse(tmp_path, "docker://debian;tag=12")
    fetchers = [m for m in bb.fetch2.methods if type(m).__name__ == "Fetchd"]
    assert len(fetchers) == 1 and bb.fetch2.methods[0] is fetchers[0]
    assert str(LAYER / "lib") in sys.path


def test_parsed_recipe_fetches_with_isars_names(tmp_path: Path) -> None:
    rd, _ = parse(tmp_path, "docker://127.0.0.1:5000/foo;tag=1", DL_DIR=str(tmp_path / "dl"),
                  PACKAGE_ARCH="armhf")
    ud = bb.fetch2.FetchData(rd.getVar("SRC_URI"), rd)
    assert type(ud.method).__name__ == "Fetchd"
    assert ud.localpath == os.path.join(tmp_path, "dl", "container-images/arm/v7/127.0.0.1:5000.foo_1.zst")


def test_level_is_in_do_fetch_signature_and_threads_are_not(tmp_path: Path) -> None:
    rd, h3 = parse(tmp_path, "docker://debian;tag=12", threads=2)
    assert rd.getVar("FETCHD_ZSTD_LEVEL") == "3"
    _, h3_other_host = parse(tmp_path, "docker://debian;tag=12", threads=16)
    _, h9 = parse(tmp_path, "docker://debian;tag=12", extra='ZSTD_COMPRESSION_LEVEL = "-9"')
    assert h3 == h3_other_host
    assert h9 != h3


def test_recipes_without_docker_urls_are_left_alone(tmp_path: Path) -> None:
    rd, _ = parse(tmp_path, "https://example.org/x.tar.gz")
    assert "FETCHD_ZSTD_LEVEL" not in (rd.getVarFlag("do_fetch", "vardeps") or "")
    assert isinstance(bb.fetch2.methods[0], fetchd_bitbake.Fetchd)


@pytest.mark.parametrize("src_uri,nostamp", [
    ("docker://debian;tag=12", "1"),
    ("docker://debian;digest=sha256:" + "a" * 64, None),
])
def test_refresh_tags_reruns_fetch_only_for_unpinned(tmp_path: Path, src_uri: str, nostamp: str | None) -> None:
    rd, _ = parse(tmp_path, src_uri, FETCHD_REFRESH_TAGS="1")
    assert rd.getVarFlag("do_fetch", "nostamp") == nostamp


def _isar_like_build(tmp: Path) -> Path:
    """A build dir whose core layer declares Isar's series (meta/conf/layer.conf of Isar)."""
    core = tmp / "isar-meta"
    (core / "conf").mkdir(parents=True)
    (core / "classes").mkdir()
    (core / "conf" / "layer.conf").write_text(
        'BBPATH .= ":${LAYERDIR}"\n'
        'BBFILE_COLLECTIONS += "core"\n'
        'BBFILE_PATTERN_core = "^${LAYERDIR}/"\n'
        'LAYERSERIES_CORENAMES = "v0.6 next"\n'
        'LAYERSERIES_COMPAT_core = "v0.6"\n'
    )
    (core / "conf" / "bitbake.conf").write_text('INHERIT += "fetchd"\n')
    (core / "classes" / "base.bbclass").write_text("")
    build = tmp / "build"
    (build / "conf").mkdir(parents=True)
    (build / "conf" / "bblayers.conf").write_text(f'BBLAYERS = "{core} {LAYER}"\n')
    return build


def test_layer_is_accepted_next_to_isars_core_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BitBake refuses a layer whose LAYERSERIES_COMPAT misses the core layer's series."""
    import bb.cookerdata

    build = _isar_like_build(tmp_path)
    monkeypatch.chdir(build)
    monkeypatch.delenv("BBPATH", raising=False)
    cfg = bb.cookerdata.CookerConfiguration()
    cfg.env = {}
    builder = bb.cookerdata.CookerDataBuilder(cfg)
    data = builder.parseConfigurationFiles([], [])  # bb.fatal (an exception) when incompatible
    assert "fetchd" in data.getVar("BBFILE_COLLECTIONS").split()
    assert data.getVar("FETCHD_LAYERDIR") == str(LAYER)
