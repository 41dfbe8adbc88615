"""The compute floor: the least CPU work any correct fetcher must do for the same bytes.

For each layer blob: sha256 of the blob (registry integrity), isal gunzip across all members,
sha256 of the tar (the diff_id that ``docker load`` checks) and zstd at the requested level
with one worker per core. Everything runs in-process, from memory or page cache, with no
network, no disk writes and no tar assembly, pipelined so that all cores are busy:

    reader thread: read 1 MiB -> sha256 -> gunzip -> sha256 -> queue
    caller thread: queue -> python-zstandard compressobj(threads=ncpu)

So a fetcher at 1.0x the floor is as fast as the libraries allow on this machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard
from isal import isal_zlib

READ = 1 << 20


@dataclass(frozen=True)
class BlobInput:
    """One layer blob: bytes or a file, and how it is compressed (gzip | zstd | none)."""

    source: bytes | Path
    compression: str

    def open(self) -> io.BufferedIOBase:
        if isinstance(self.source, bytes):
            return io.BytesIO(self.source)
        return open(self.source, "rb")  # noqa: SIM115 - closed by the caller


@dataclass(frozen=True)
class FloorResult:
    seconds: float
    cpu_s: float  # process CPU (all threads) during the run
    blob_bytes: int
    tar_bytes: int
    zst_bytes: int
    level: int
    threads: int


def _decompressed(blob: BlobInput, blob_hash: hashlib._Hash) -> Iterator[bytes]:
    with blob.open() as f:
        if blob.compression == "gzip":
            d = isal_zlib.decompressobj(31)
            while chunk := f.read(READ):
                blob_hash.update(chunk)
                while chunk:
                    out = d.decompress(chunk)
                    if out:
                        yield out
                    if d.eof:  # next gzip member (multi-member layers)
                        chunk = d.unused_data
                        d = isal_zlib.decompressobj(31)
                    else:
                        chunk = b""
        elif blob.compression == "zstd":
            data = f.read()
            blob_hash.update(data)
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                                read_across_frames=True)
            while out := reader.read(READ):
                yield out
        else:
            while chunk := f.read(READ):
                blob_hash.update(chunk)
                yield chunk


def _producer(blobs: Sequence[BlobInput], q: queue.Queue[bytes | None],
              errors: list[BaseException]) -> None:
    try:
        for blob in blobs:
            blob_hash, tar_hash = hashlib.sha256(), hashlib.sha256()
            for out in _decompressed(blob, blob_hash):
                tar_hash.update(out)
                q.put(out)
            blob_hash.hexdigest()
            tar_hash.hexdigest()
            q.put(b"")  # layer boundary: the consumer ends this layer's frame
    except BaseException as e:  # surfaced by compute_floor
        errors.append(e)
    finally:
        q.put(None)


def compute_floor(blobs: Sequence[BlobInput], level: int = 3, threads: int | None = None
                  ) -> FloorResult:
    """Time the floor work for ``blobs`` once (one zstd frame per layer, like fetchd's store)."""
    threads = threads or os.cpu_count() or 1
    cctx = zstandard.ZstdCompressor(level=level, threads=threads)
    q: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
    errors: list[BaseException] = []
    blob_bytes = sum(len(b.source) if isinstance(b.source, bytes) else b.source.stat().st_size
                     for b in blobs)
    start, cpu0 = time.perf_counter(), time.process_time()
    worker = threading.Thread(target=_producer, args=(blobs, q, errors), daemon=True)
    worker.start()
    tar_bytes = zst_bytes = 0
    cobj = cctx.compressobj()
    while (item := q.get()) is not None:
        if item:
            tar_bytes += len(item)
            zst_bytes += len(cobj.compress(item))
        else:
            zst_bytes += len(cobj.flush())
            cobj = cctx.compressobj()
    worker.join()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    if errors:
        raise errors[0]
    return FloorResult(seconds, cpu, blob_bytes, tar_bytes, zst_bytes, level, threads)


def warm_page_cache(blobs: Sequence[BlobInput]) -> None:
    """Read file blobs once so the first timed run does not pay for the disk."""
    for b in blobs:
        if isinstance(b.source, Path):
            with open(b.source, "rb") as f:
                while f.read(8 * READ):
                    pass


def median_floor(blobs: Sequence[BlobInput], level: int, runs: int) -> FloorResult:
    warm_page_cache(blobs)
    results = sorted((compute_floor(blobs, level) for _ in range(max(1, runs))),
                     key=lambda r: r.seconds)
    return results[len(results) // 2]
