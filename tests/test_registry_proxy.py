"""Pulls through the fault-injecting proxy (tests/support/proxy.py) in front of the real registry.

The proxy counts the body bytes it sends per path and injects scripted faults (cut
mid-body, 500, 429, stall before the first byte, Range ignored). Every pull must complete
and verify; the tests report how many bytes were sent twice (a resume must not re-send).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from registry_sinks import MemorySink
from support.proxy import RegistryProxy

from fetchd.config import Config, NetworkConfig
from fetchd.manifest import ImageIndex, ImageManifest, select_platform
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

pytestmark = pytest.mark.registry


def client(**net: Any) -> RegistryClient:
    # read_timeout well under the injected stall, well over any pause of a busy test host
    values = {"backoff_base": 0.001, "backoff_cap": 0.01, "read_timeout": 1.0,
              "near_latency": 0, **net}  # parallel ranges even on loopback, as on a far link
    return RegistryClient(Config(network=replace(NetworkConfig(), **values)))


async def pull_all(c: RegistryClient, image: Any, host: str) -> dict[str, int]:
    """Every platform's manifest, config and distinct layers, verified; layer size per path."""
    ref = Reference.parse(image.ref(host))
    top = (await c.get_manifest(ref)).parse()
    sizes: dict[str, int] = {}
    for part in image.platforms.values():
        if isinstance(top, ImageIndex):
            desc = select_platform(top, part.platform, image.name)
            manifest = (await c.get_manifest(ref.with_digest(desc.digest))).parse()
        else:
            manifest = top
        assert isinstance(manifest, ImageManifest)
        assert await c.get_blob_bytes(ref, manifest.config) == part.config_bytes
        for layer in manifest.layers:
            path = f"/v2/{image.repository}/blobs/{layer.digest}"
            if path in sizes:
                continue  # a shared base layer: the store would hold it already
            sink = MemorySink()
            await c.fetch_blob(ref, layer, sink)
            sink.verify(layer.digest, layer.size)
            sizes[path] = layer.size
    return sizes


def body_bytes(proxy: RegistryProxy, path_part: str) -> int:
    """Blob bytes the proxy sent for a path (error bodies of injected failures not counted)."""
    return sum(r.bytes_sent for r in proxy.log if path_part in r.path and r.status in (200, 206))


def sent_twice(proxy: RegistryProxy, sizes: dict[str, int]) -> int:
    return sum(max(0, body_bytes(proxy, path) - size) for path, size in sizes.items())


def distinct_layers(image: Any) -> list[Any]:
    seen: dict[str, Any] = {}
    for part in image.platforms.values():
        for layer in part.layers:
            seen.setdefault(str(layer.digest), layer)
    return list(seen.values())


async def test_pull_through_cuts_500_429_and_stalls_completes_and_verifies(
        proxy: RegistryProxy, images: Any) -> None:
    image = images["multi-oci"]
    # Faults of different kinds that match the same request fire together, so each one
    # targets its own path: the tag (500, then 429), a platform manifest (cut), one layer each.
    proxy.fail(f"/manifests/{image.tag}$", 500)
    proxy.rate_limit(f"/manifests/{image.tag}$", retry_after=0)
    proxy.cut("/manifests/sha256:", after_bytes=300)
    layers = distinct_layers(image)
    cuts = [(layer, layer.size * (i + 1) // 5) for i, layer in enumerate(layers[:4])]
    for layer, after in cuts:
        proxy.cut(str(layer.digest), after_bytes=after)
    proxy.stall(str(layers[4].digest), seconds=2.5)
    proxy.fail(str(layers[5].digest), 503)
    async with client() as c:
        sizes = await pull_all(c, image, proxy.host)
        stats = c.stats()[proxy.host]
    twice = sent_twice(proxy, sizes)
    faults = [f for rec in proxy.log for f in rec.faults]
    print(f"faults injected: {faults}; layer bytes sent twice: {twice}; retries: {stats['retries']}")
    # (the proxy does not log the stalled request the client gave up on)
    assert faults.count("cut") == 5 and faults.count("status") == 3
    assert stats["retries"] == 9 and stats["errors"] == 0  # one per fault, stall included
    for layer, after in cuts:  # each resume asked for exactly the rest
        ranges = [r.range for r in proxy.log if str(layer.digest) in r.path]
        assert ranges == [None, f"bytes={after}-"]
    assert twice == 0


async def test_range_ignored_by_the_path_restarts_cleanly(proxy: RegistryProxy, images: Any) -> None:
    layer = max(images["single-oci"].only.layers, key=lambda x: x.size)
    ref = Reference.parse(images["single-oci"].ref(proxy.host))
    proxy.cut("/blobs/", after_bytes=layer.size // 2)
    proxy.ignore_range("/blobs/")
    sink = MemorySink()
    async with client() as c:
        await c.fetch_blob(ref, layer.descriptor(), sink)
    sink.verify(layer.digest, layer.size)
    assert sink.truncations == [0]
    twice = body_bytes(proxy, str(layer.digest)) - layer.size
    print(f"Range ignored after a cut: {twice} bytes sent twice (the cut half, by necessity)")
    assert twice == layer.size // 2


@pytest.mark.slow
async def test_big_blob_in_parallel_parts_survives_cuts(proxy: RegistryProxy, big_image: Any) -> None:
    layer = big_image.only.layers[0]
    proxy.cut("/blobs/", after_bytes=3 * 1024 * 1024, times=3)
    ref = Reference.parse(big_image.ref(proxy.host))
    sink = MemorySink()
    async with client(range_threshold=32 * 1024 * 1024, range_parts=8) as c:
        proxy.fail("/blobs/", 500)
        await c.fetch_blob(ref, layer.descriptor(), sink)
        stats = c.stats()[proxy.host]
    await asyncio.to_thread(sink.verify, layer.digest, layer.size)
    twice = body_bytes(proxy, str(layer.digest)) - layer.size
    faults = [f for rec in proxy.log for f in rec.faults]
    print(f"big blob: faults {faults}, bytes sent twice: {twice} (the 1-byte range probe "
          f"included), requests {len(proxy.log)}, retries {stats['retries']}")
    assert stats["range_supported"] is True and "cut" in faults
    assert stats["retries"] >= 1 and stats["errors"] == 0
    assert twice <= 1 and sink.written == layer.size
