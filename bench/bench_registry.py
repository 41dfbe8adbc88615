"""Registry client benchmark: one big blob, single stream vs parallel Range parts.

Fetches the big test layer (~163 MB) from a local docker-registry:

- ``loopback_single`` / ``loopback_parallel``: straight to the registry, verified
  (the sink hashes the contiguous prefix as it grows, as the store's ingest does).
- ``wan_single`` / ``wan_parallel``: through ``bench.wanproxy`` capping each connection
  at 30 MB/s with 40 ms before each response's first byte.

Targets: ``wan_parallel`` >= 4x ``wan_single`` with 8 parts; loopback >= 500 MB/s
with verification. ``loopback_client_only`` (a sink that drops the bytes) separates the
client's own rate from the cost of writing and hashing. Prints one JSON object.

Run: ``python -m bench.bench_registry [--parts 8] [--rate 30] [--delay 40] [--repeat 3]
[--sink-dir /dev/shm]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import tempfile
import time
from dataclasses import replace
from typing import Any

from bench.wanproxy import MB, WanProxy
from fetchd.config import Config, NetworkConfig
from fetchd.digest import Digest
from fetchd.manifest import Descriptor
from fetchd.reference import Reference
from fetchd.registry_async import RegistryClient
from tests.support import images as ti
from tests.support.registry import LocalRegistry

HASH_STEP = 4 * 1024 * 1024


class HashingSink:
    """Like the store's ingest file: writes to a file, hashes the contiguous prefix as it grows.

    Writing and hashing run in a thread (sha256 releases the GIL), so the event loop never
    hashes; data that continues the prefix is hashed as given, parts that arrived early are
    read back from the file (page cache) once the prefix reaches them.
    """

    def __init__(self, size: int, directory: str | None = None) -> None:
        self.size = size
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed in close()
        self.fd = self.file.fileno()
        self.hash = hashlib.sha256()
        self.hashed = 0
        self.spans: list[tuple[int, int]] = []
        self.written = 0
        self._lock = asyncio.Lock()

    @property
    def offset(self) -> int:
        return self.hashed

    def _contiguous(self) -> int:
        end = self.hashed
        for start, stop in sorted(self.spans):
            if start > end:
                break
            end = max(end, stop)
        return end

    def _absorb(self, offset: int, data: bytes) -> None:
        """Write, then hash what became contiguous: from ``data`` itself when it continues
        the prefix, else read back from the file (parallel parts arriving out of order)."""
        os.pwrite(self.fd, data, offset)
        self.written += len(data)
        end = offset + len(data)
        if offset <= self.hashed < end:
            self.hash.update(memoryview(data)[self.hashed - offset:])
            self.hashed = end
        else:
            self.spans.append((offset, end))
        reach = self._contiguous()
        while self.hashed < reach:
            chunk = os.pread(self.fd, min(HASH_STEP, reach - self.hashed), self.hashed)
            self.hash.update(chunk)
            self.hashed += len(chunk)
        self.spans = [(a, b) for a, b in self.spans if b > self.hashed]

    async def write_at(self, offset: int, data: bytes) -> None:
        async with self._lock:  # one writer/hasher at a time; the event loop stays free
            await asyncio.to_thread(self._absorb, offset, data)

    def held_ranges(self) -> list[tuple[int, int]]:
        return []  # a fresh sink holds nothing beyond its prefix (no resume in this bench)

    async def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, 0)
        self.hash, self.hashed, self.spans = hashlib.sha256(), 0, []

    def digest(self) -> Digest:
        return Digest("sha256", self.hash.hexdigest())

    def close(self) -> None:
        self.file.close()


class NullSink:
    """Takes bytes and forgets them: measures the client alone (no write, no hash)."""

    offset = 0
    written = 0
    hashed = 0

    async def write_at(self, offset: int, data: bytes) -> None:
        self.written += len(data)

    def held_ranges(self) -> list[tuple[int, int]]:
        return []

    async def truncate(self, size: int) -> None:
        self.written = 0

    def close(self) -> None:
        pass


async def fetch_once(host: str, layer: ti.Layer, repository: str, *, parts: int,
                     verify: bool = True, sink_dir: str | None = None) -> dict[str, Any]:
    # near_latency=0: the parallel variant uses ranges even on loopback (by default a near
    # host gets one stream, which is what the single variant measures)
    network = replace(NetworkConfig(), range_parts=max(1, parts),
                      range_threshold=32 * 1024 * 1024 if parts > 1 else 1 << 62,
                      near_latency=0.0)
    ref = Reference.parse(f"{host}/{repository}:bench")
    desc = Descriptor(layer.media_type, layer.digest, layer.size)
    sink: HashingSink | NullSink = HashingSink(layer.size, sink_dir) if verify else NullSink()
    async with RegistryClient(Config(network=network)) as client:
        start = time.perf_counter()
        await client.fetch_blob(ref, desc, sink)
        seconds = time.perf_counter() - start
        stats = client.stats().get(host, {})
    ok = (sink.digest() == layer.digest and sink.hashed == layer.size
          if isinstance(sink, HashingSink) else None)
    sink.close()
    return {"seconds": round(seconds, 3), "mb_per_s": round(layer.size / seconds / MB, 1),
            "verified": ok, "requests": stats.get("requests"), "bytes_written": sink.written}


async def best_of(repeat: int, host: str, layer: ti.Layer, repository: str, parts: int,
                  **kw: Any) -> dict[str, Any]:
    runs = [await fetch_once(host, layer, repository, parts=parts, **kw) for _ in range(max(1, repeat))]
    return min(runs, key=lambda r: r["seconds"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=int, default=8)
    p.add_argument("--rate", type=float, default=30.0, help="MB/s per connection through the proxy")
    p.add_argument("--delay", type=float, default=40.0, help="ms before each response")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sink-dir", default=None, help="where the verifying sink writes (default: $TMPDIR)")
    a = p.parse_args(argv)

    image = ti.make_big_image(ti.build_big_layer())
    layer = image.only.layers[0]
    results: dict[str, Any] = {"blob_bytes": layer.size, "parts": a.parts,
                               "wan": {"rate_mb_per_s": a.rate, "delay_ms": a.delay}}
    with LocalRegistry() as registry:
        pushed = ti.push_image(registry, image)
        repo = pushed.repository
        asyncio.run(fetch_once(registry.host, layer, repo, parts=1))  # warm the registry's cache
        results["loopback_client_only"] = asyncio.run(
            best_of(a.repeat, registry.host, layer, repo, 1, verify=False))
        results["loopback_single"] = asyncio.run(
            best_of(a.repeat, registry.host, layer, repo, 1, sink_dir=a.sink_dir))
        results["loopback_parallel"] = asyncio.run(
            best_of(a.repeat, registry.host, layer, repo, a.parts, sink_dir=a.sink_dir))
        with WanProxy(registry.host, rate=a.rate * MB, delay=a.delay / 1000) as proxy:
            results["wan_single"] = asyncio.run(best_of(1, proxy.host, layer, repo, 1,
                                                        sink_dir=a.sink_dir))
            results["wan_parallel"] = asyncio.run(best_of(a.repeat, proxy.host, layer, repo, a.parts,
                                                          sink_dir=a.sink_dir))
    single, parallel = results["wan_single"]["seconds"], results["wan_parallel"]["seconds"]
    results["wan_speedup"] = round(single / parallel, 2)
    results["targets"] = {
        "wan_speedup_ge_4": results["wan_speedup"] >= 4,
        "loopback_ge_500_mb_per_s": results["loopback_single"]["mb_per_s"] >= 500,
        "client_only_ge_500_mb_per_s": results["loopback_client_only"]["mb_per_s"] >= 500,
        "all_verified": all(results[k]["verified"] for k in
                            ("loopback_single", "loopback_parallel", "wan_single", "wan_parallel")),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
