"""Benchmark of the layer store's ingest path; prints one JSON object.

- ``single``: one ~200 MB blob from memory chunks through ensure_blob (pwrite in a thread,
  sha256 of the prefix, fsync, rename, fsync of the directory): MB/s end to end.
- ``parallel_ranges``: the same blob written as 8 parts in parallel (the prefix catches up
  by reading parts back from the file).
- ``concurrent``: 16 concurrent ensure_blob calls for one new digest: bytes written once,
  the time of all 16 relative to one alone (target <= 1.2x).
- ``follow``: a reader following the ingest; its bytes arrive before the commit.

Usage: python bench/bench_store.py [--size-mb 200] [--root DIR] [--chunk-kb 1024] [--repeat 3]
(figures are medians of --repeat runs; the load average is printed: other work skews them)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fetchd.digest import Digest  # noqa: E402
from fetchd.layer_store import BlobSink, LayerStore  # noqa: E402


def make_data(size: int) -> bytes:
    # Incompressible and cheap: repeat 16 MiB of random bytes with a varying prefix per block.
    block = os.urandom(16 << 20)
    out = bytearray()
    i = 0
    while len(out) < size:
        out += i.to_bytes(8, "little") + block[8:]
        i += 1
    return bytes(out[:size])


class Source:
    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk = data, chunk
        self.calls = 0
        self.written = 0

    async def __call__(self, sink: BlobSink) -> None:
        self.calls += 1
        view = memoryview(self.data)
        for pos in range(sink.offset, len(self.data), self.chunk):
            piece = bytes(view[pos : pos + self.chunk])
            await sink.write_at(pos, piece)
            self.written += len(piece)


class Parts(Source):
    async def __call__(self, sink: BlobSink) -> None:
        self.calls += 1
        n = 8
        bounds = [len(self.data) * i // n for i in range(n + 1)]
        view = memoryview(self.data)

        async def part(a: int, b: int) -> None:
            for pos in range(a, b, self.chunk):
                piece = bytes(view[pos : min(pos + self.chunk, b)])
                await sink.write_at(pos, piece)
                self.written += len(piece)

        await asyncio.gather(*(part(a, b) for a, b in zip(bounds, bounds[1:], strict=False)))


def fresh(root: Path, name: str) -> LayerStore:
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    return LayerStore(path)


async def timed(store: LayerStore, data: bytes, d: Digest, src: Source) -> float:
    t = time.perf_counter()
    await store.ensure_blob(d, len(data), src)
    return time.perf_counter() - t


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--chunk-kb", type=int, default=1024)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-store-", dir="/var/tmp"))
    size = args.size_mb * 1_000_000
    chunk = args.chunk_kb * 1024
    data = make_data(size)
    d = Digest.of(data)
    mb = size / 1e6
    result: dict[str, object] = {"size_mb": mb, "chunk_kb": args.chunk_kb, "root": str(root)}
    try:
        # warm-up (thread pool, page cache of the code), not measured
        store = fresh(root, "warm")
        await store.ensure_blob(Digest.of(data[: 8 << 20]), 8 << 20, Source(data[: 8 << 20], chunk))
        store.close()

        singles, partss, togethers, follows, halves = [], [], [], [], []
        calls = written = got = 0
        half_before_commit = True
        for _ in range(args.repeat):
            store = fresh(root, "single")
            singles.append(await timed(store, data, d, Source(data, chunk)))
            store.close()

            store = fresh(root, "parts")
            partss.append(await timed(store, data, d, Parts(data, chunk)))
            store.close()

            store = fresh(root, "concurrent")
            src = Source(data, chunk)
            t = time.perf_counter()
            paths = await asyncio.gather(*(store.ensure_blob(d, size, src) for _ in range(16)))
            togethers.append(time.perf_counter() - t)
            store.close()
            assert len(set(paths)) == 1
            calls, written = src.calls, src.written

            store = fresh(root, "follow")
            download = asyncio.create_task(store.ensure_blob(d, size, Source(data, chunk)))
            t = time.perf_counter()
            got = 0
            half_at = None
            async for piece in store.read_following(d):
                got += len(piece)
                if half_at is None and got >= size // 2:
                    half_at = time.perf_counter() - t
                    half_before_commit = half_before_commit and not download.done()
            await download
            follows.append(time.perf_counter() - t)
            halves.append(half_at or 0.0)
            store.close()

        single = statistics.median(singles)
        result["single"] = {"seconds_median": round(single, 3),
                            "mb_per_s_median": round(mb / single, 1),
                            "mb_per_s_best": round(mb / min(singles), 1)}
        result["parallel_ranges"] = {"parts": 8,
                                     "mb_per_s_median": round(mb / statistics.median(partss), 1),
                                     "mb_per_s_best": round(mb / min(partss), 1)}
        together = statistics.median(togethers)
        result["concurrent"] = {
            "requests": 16, "fetch_calls": calls, "bytes_written": written,
            "seconds_median": round(together, 3), "ratio_to_single": round(together / single, 2),
        }
        result["follow"] = {"mb_per_s_median": round(mb / statistics.median(follows), 1),
                            "first_half_seconds_median": round(statistics.median(halves), 3),
                            "half_before_commit": half_before_commit, "bytes": got}
        result["load_avg"] = os.getloadavg()[0]
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
