"""Session fixtures shared by every test: a real registry, the image catalog, proxies.

- ``registry``: a ``LocalRegistry`` (Debian's docker-registry) for the whole session.
- ``images``: the small catalog (``support.images.CATALOG_NAMES``) pushed once into ``registry``.
- ``big_image``: the ~163 MB image, pushed on first use (generated once, cached on disk).
- ``registry_factory``: fresh registries for one test (e.g. ``proxy_remote=`` pull-through).
- ``proxy_factory`` / ``proxy``: fault-injecting HTTP proxies in front of ``registry``.
Every process and thread started here is stopped at the end, also when tests fail.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.images import (
    Catalog,
    CatalogImage,
    build_big_layer,
    make_big_image,
    push_catalog,
    push_image,
)
from support.proxy import RegistryProxy
from support.registry import LocalRegistry


@pytest.fixture(scope="session")
def registry() -> Iterator[LocalRegistry]:
    reg = LocalRegistry()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def images(registry: LocalRegistry) -> Catalog:
    return push_catalog(registry)


@pytest.fixture(scope="session")
def big_image(registry: LocalRegistry) -> CatalogImage:
    return push_image(registry, make_big_image(build_big_layer()))


@pytest.fixture
def registry_factory() -> Iterator[Callable[..., LocalRegistry]]:
    started: list[LocalRegistry] = []

    def make(**kwargs: Any) -> LocalRegistry:
        reg = LocalRegistry(**kwargs)
        started.append(reg)
        return reg

    try:
        yield make
    finally:
        for reg in reversed(started):
            reg.stop()


@pytest.fixture
def proxy_factory(registry: LocalRegistry) -> Iterator[Callable[..., RegistryProxy]]:
    """``make(upstream=registry)`` -> a new proxy; all are stopped when the test ends."""
    started: list[RegistryProxy] = []

    def make(upstream: Any = None) -> RegistryProxy:
        proxy = RegistryProxy(upstream if upstream is not None else registry)
        started.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in reversed(started):
            proxy.stop()


@pytest.fixture
def proxy(proxy_factory: Callable[..., RegistryProxy]) -> RegistryProxy:
    """One fresh proxy in front of the session registry (no rules, zero counters)."""
    return proxy_factory()


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temp dir every uid may enter (pytest's own tmp_path sits under a 0700 directory), for
    tests that act as another user."""
    d = Path(tempfile.mkdtemp(prefix="fetchd-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
