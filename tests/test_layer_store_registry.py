"""The layer store fed by the real registry client from the real docker-registry on loopback:
single-flight over HTTP, parallel ranges into the ingest file, and a resume that asks the
registry for the missing range only."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from fetchd.config import Config, NetworkConfig
from fetchd.errors import RegistryError
from fetchd.layer_store import BlobSink, LayerStore
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient

pytestmark = pytest.mark.registry


def _client(**net: object) -> RegistryClient:
    network = replace(NetworkConfig(), backoff_base=0.001, backoff_cap=0.01, **net)  # type: ignore[arg-type]
    return RegistryClient(Config(network=network))


def _biggest_layer(images):  # type: ignore[no-untyped-def]
    return max(
        ((image, layer) for image in images.values() for part in image.all_parts()
         for layer in part.layers),
        key=lambda pair: pair[1].size,
    )


async def test_every_layer_through_the_store_once(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = LayerStore(tmp_path / "store")
    calls: dict[str, int] = {}
    async with _client() as client:

        async def ensure(image, layer):  # type: ignore[no-untyped-def]
            ref = Reference.parse(image.reference)

            async def fetch(sink: BlobSink) -> None:
                calls[str(layer.digest)] = calls.get(str(layer.digest), 0) + 1
                await client.fetch_blob(ref, layer.descriptor(), sink)

            return await store.ensure_blob(layer.digest, layer.size, fetch, layer.media_type)

        pairs = [(image, layer) for image in images.values() for part in image.all_parts()
                 for layer in part.layers]
        # every layer asked for three times at once
        paths = await asyncio.gather(*(ensure(i, lyr) for i, lyr in pairs * 3))
    for (_, layer), path in zip(pairs * 3, paths, strict=True):
        assert path.read_bytes() == layer.read()
    assert set(calls.values()) == {1}
    assert len(calls) == len({layer.digest for _, layer in pairs})
    store.close()


async def test_parallel_ranges_write_into_the_ingest_file(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image, layer = _biggest_layer(images)
    store = LayerStore(tmp_path / "store")
    async with _client(range_threshold=1, range_parts=4) as client:
        ref = Reference.parse(image.reference)
        path = await store.ensure_blob(
            layer.digest, layer.size, lambda sink: client.fetch_blob(ref, layer.descriptor(), sink))
    assert path.read_bytes() == layer.read()
    store.close()


async def test_resume_asks_the_registry_for_the_rest_only(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image, layer = _biggest_layer(images)
    data = layer.read()
    cut = layer.size // 3
    assert cut > 0
    store = LayerStore(tmp_path / "store")

    async def interrupted(sink: BlobSink) -> None:
        await sink.write_at(0, data[:cut])
        raise RegistryError("connection cut (test)")

    with pytest.raises(RegistryError):
        await store.ensure_blob(layer.digest, layer.size, interrupted)

    seen: list[int] = []
    async with _client() as client:
        ref = Reference.parse(image.reference)

        async def resume(sink: BlobSink) -> None:
            seen.append(sink.offset)
            await client.fetch_blob(ref, layer.descriptor(), sink)

        path = await store.ensure_blob(layer.digest, layer.size, resume)
        host = client.stats()[images.host]
    assert seen == [cut]
    assert host["bytes"] == layer.size - cut  # only the missing range crossed the wire
    assert path.read_bytes() == data
    store.close()


async def test_resume_keeps_parallel_parts_done_beyond_the_prefix(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image, layer = _biggest_layer(images)
    data = layer.read()
    n = layer.size
    done = [(0, n // 8), (n // 2, 3 * n // 4)]  # the first and third of four parts finished
    store = LayerStore(tmp_path / "store")

    async def interrupted(sink: BlobSink) -> None:
        for a, b in done:
            await sink.write_at(a, data[a:b])
        raise RegistryError("connection cut (test)")

    with pytest.raises(RegistryError):
        await store.ensure_blob(layer.digest, layer.size, interrupted)
    store.close()
    store = LayerStore(tmp_path / "store")  # as after a restart of the daemon
    async with _client() as client:
        ref = Reference.parse(image.reference)
        path = await store.ensure_blob(
            layer.digest, layer.size, lambda sink: client.fetch_blob(ref, layer.descriptor(), sink))
        host = client.stats()[images.host]
    assert path.read_bytes() == data
    assert host["bytes"] == n - sum(b - a for a, b in done)  # only the gaps crossed the wire
    store.close()


async def test_a_big_blob_arrives_front_to_back_for_followers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More range pieces than connections, taken in blob order: the verified prefix (what
    pack may read while the blob downloads) grows all along, not only at the end."""
    import os

    from fake_registry import FakeRegistry

    import fetchd.registry_async as registry_async
    from fetchd.digest import Digest
    from fetchd.manifest import Descriptor

    monkeypatch.setattr(registry_async, "ORDERED_SPAN", 2 * 1024 * 1024)
    data = os.urandom(16 * 1024 * 1024)
    fake = await FakeRegistry().start()
    store = LayerStore(tmp_path / "store")
    try:
        fake.add_blob(data)
        d = Digest.of(data)
        desc = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", d, len(data))
        ref = Reference.parse(f"{fake.host}/x/y:1")
        async with _client(range_threshold=4 * 1024 * 1024, range_parts=2) as client:
            path = await store.ensure_blob(d, len(data),
                                           lambda sink: client.fetch_blob(ref, desc, sink))
        assert path.read_bytes() == data
        starts = [int(s.headers["Range"].split("=")[1].split("-")[0])
                  for s in fake.requests("blob")[1:]]  # after the probe
        assert len(starts) == 8  # 8 pieces of 2 MiB on 2 connections, not 2 halves
        assert starts == sorted(starts)  # asked for in blob order
    finally:
        store.close()
        await fake.close()
