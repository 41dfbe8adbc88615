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
    net = {"near_latency": 0, **net}  # parallel ranges even on loopback, as on a far link
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


async def test_ranges_of_the_blob_needed_first_take_the_connections_first() -> None:
    """Two blobs as ranges from one host at once: the one with the lower priority gets the
    host's connections as soon as a piece ends, not turn about with the other."""
    import os

    from fake_registry import FakeRegistry
    from registry_sinks import MemorySink

    import fetchd.registry_async as registry_async
    from fetchd.digest import Digest
    from fetchd.manifest import Descriptor

    fake = await FakeRegistry().start()
    try:
        blobs = {name: os.urandom(8 * 1024 * 1024 + i) for i, name in enumerate("ab")}
        descs = {}
        for name, data in blobs.items():
            fake.add_blob(data)
            descs[name] = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip",
                                     Digest.of(data), len(data))
        ref = Reference.parse(f"{fake.host}/x/y:1")
        old = registry_async.ORDERED_SPAN
        registry_async.ORDERED_SPAN = 1024 * 1024
        try:
            async with _client(range_threshold=1024 * 1024, range_parts=2,
                               max_connections=2) as client:
                sinks = {name: MemorySink() for name in blobs}
                await client.fetch_blob(ref, descs["a"], MemorySink(), priority=0)  # probe once
                fake.seen.clear()
                later = asyncio.create_task(client.fetch_blob(ref, descs["a"], sinks["a"],
                                                              priority=10))
                await asyncio.sleep(0)
                first = asyncio.create_task(client.fetch_blob(ref, descs["b"], sinks["b"],
                                                              priority=1))
                await asyncio.gather(later, first)
        finally:
            registry_async.ORDERED_SPAN = old
        for name, data in blobs.items():
            sinks[name].verify(Digest.of(data), len(data))
        order = ["a" if str(descs["a"].digest) in s.path else "b" for s in fake.requests("blob")]
        assert order.count("b") == 8 and order.count("a") == 8
        # 'a' started first and holds both connections for one piece each; from then on every
        # freed connection goes to 'b' until it is done
        assert order[:2] == ["a", "a"] and order[2:10].count("b") == 8, order
    finally:
        await fake.close()


async def test_priority_gate_serves_the_lowest_priority_first_and_skips_the_cancelled() -> None:
    from fetchd.registry_async import _PriorityGate

    gate = _PriorityGate(1)
    order: list[int] = []
    release = asyncio.Event()

    async def use(priority: int) -> None:
        async with gate.turn(priority):
            order.append(priority)
            if priority == 0:
                await release.wait()

    holder = asyncio.create_task(use(0))
    await asyncio.sleep(0)
    waiters = {p: asyncio.create_task(use(p)) for p in (5, 1, 3, 2)}
    await asyncio.sleep(0)
    waiters[2].cancel()
    release.set()
    await asyncio.gather(holder, *(t for p, t in waiters.items() if p != 2))
    assert order == [0, 1, 3, 5]
    assert gate.held == 0
