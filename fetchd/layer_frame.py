"""One layer's zstd frame: read the layer blob once, decompress, check its diff_id and compress
its tar member (header, content, padding).

The member header needs the content size, which is known only at the end of the stream. So
the unit is two frames: a fixed-size *raw* zstd frame holding the 512-byte header (written by
hand: frame header + one raw block, 522 bytes) followed by an ordinary compressed frame of
content + padding. The worker reserves the 522 bytes, streams blob -> decompress -> sha256 +
zstd into its output, then writes the header frame into the reserved space. (A layer of 8 GiB
or more needs a PAX header, 1536 bytes: that rare frame is rewritten once.)

Invariants: a frame is returned only when the content hashed to the layer's diff_id (else
``DiffIdMismatch``); a frame written into the archive and then failed is cut off again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from .archive_format import BLOCK, layer_member_header, padding
from .archive_writer import Aborted, ArchiveBuilder, FrameBytes, FrameSink
from .compress_budget import compressor
from .config import PackConfig
from .decompress import decompressed_chunks
from .digest import Digest
from .errors import DiffIdMismatch
from .manifest import Descriptor

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HEADER_FRAME_SIZE = 4 + 1 + 2 + 3 + BLOCK  # magic, descriptor, content size, block header, data
_PROGRESS_INTERVAL = 0.25
HASH_THREAD_FROM = 4 << 20  # blob bytes from which a layer's sha256 runs in a thread of its own

DEFAULT_LIMITS = PackConfig()  # the [pack] defaults: how far a layer may expand

ProgressSink = Callable[[dict[str, Any]], None]
"""Receives pack events (``{"state": ..., ...}``); may be called from worker threads."""


def raw_zstd_frame(data: bytes) -> bytes:
    """A zstd frame holding ``data`` uncompressed (one raw block), for 256..65791 bytes.

    Frame header descriptor 0x60: single segment, 2-byte content size (stored minus 256),
    no checksum, no dictionary. Block header: last block, type raw, size ``len(data)``.
    """
    n = len(data)
    if not 256 <= n <= 65791:
        raise ValueError(f"raw zstd frame of {n} bytes not supported")
    return (ZSTD_MAGIC + b"\x60" + (n - 256).to_bytes(2, "little")
            + (1 | n << 3).to_bytes(3, "little") + data)


@dataclass(frozen=True)
class LayerJob:
    """One distinct layer of an image to make a frame of."""

    descriptor: Descriptor
    diff_id: Digest
    index: int  # position in the manifest (for messages)
    entry: int = 0  # position among the archive's distinct layers


def make_layer_frame(src: BinaryIO, out_path: Path, job: LayerJob, level: int, threads: int, *,
                     image_name: str = "", abort: threading.Event | None = None,
                     progress: ProgressSink | None = None,
                     archive: ArchiveBuilder | None = None,
                     cctx: zstandard.ZstdCompressor | None = None,
                     limits: PackConfig = DEFAULT_LIMITS
                     ) -> tuple[int, FrameBytes | None]:
    """Make one layer's frame: ``(layer size, its bytes in the archive or None)``.

    Reads ``src`` once: decompress, hash and compress in one pass. When ``archive`` lets this
    entry in now (it is next in line and no other frame is being written there), the frame
    goes straight into the archive and comes back as a span of it (a reference the caller
    releases); otherwise it is written to ``out_path`` and None comes back. Raises
    DiffIdMismatch when the content does not hash to ``job.diff_id``: then the archive is
    cut back and the caller discards ``out_path``. ``cctx``: a context made by
    ``compressor(level, threads)`` to reuse (default: a new one). LayerTooLarge as soon as the
    content passes ``limits.layer_limit`` of the blob's size (a decompression bomb).
    """
    what = f"layer {job.descriptor.digest} of {image_name or 'image'}"
    # a thread of its own pays off for big layers only: for a small one its start costs
    # more than the hashing (a thread per layer of a 1000-layer image of small layers)
    hasher = (Sha256Thread() if threads > 1 and job.descriptor.size >= HASH_THREAD_FROM
              else _Sha256Inline())
    size = 0
    last = time.monotonic()
    start = archive.claim(job.entry) if archive is not None else None
    teed = archive if start is not None else None
    in_archive = False
    framed: FrameBytes | None = None
    out: BinaryIO | None = None
    fits = True
    try:
        with contextlib.ExitStack() as stack:
            if teed is None:  # a file of its own: temporary, it never needs to reach the disk
                out = stack.enter_context(open(out_path, "wb"))
            sink = FrameSink(out, teed)
            sink.write(b"\0" * HEADER_FRAME_SIZE)  # the header frame, once the size is known
            # No ``with``: leaving it on an error would first compress all buffered input
            # (seconds at level 19); an abandoned writer ends without finishing its frame.
            w = (cctx or compressor(level, threads)).stream_writer(
                cast(IO[bytes], sink), closefd=False, write_size=1 << 20)
            for chunk in decompressed_chunks(src, job.descriptor.media_type, what=what,
                                             max_size=limits.layer_limit(job.descriptor.size),
                                             limit=_limit_text(job.descriptor.size, limits)):
                if abort is not None and abort.is_set():
                    raise Aborted
                hasher.update(chunk)
                size += len(chunk)
                w.write(chunk)
                if progress is not None and time.monotonic() - last >= _PROGRESS_INTERVAL:
                    last = time.monotonic()
                    progress({"state": "layer-progress", "diff_id": str(job.diff_id),
                              "bytes": size})
            w.write(padding(size))
            w.flush(zstandard.FLUSH_FRAME)
            actual = Digest("sha256", hasher.hexdigest())
            if actual != job.diff_id:
                raise DiffIdMismatch(
                    f"{what}: uncompressed content hashes to {actual}, but the image config says "
                    f"diff_id {job.diff_id} for layer {job.index + 1}; the layer or the config is "
                    "corrupt or does not belong to this image, nothing was packed"
                )
            header = raw_zstd_frame(layer_member_header(job.diff_id, size))
            fits = len(header) == HEADER_FRAME_SIZE
            if teed is not None and start is not None:
                if fits:
                    teed.pwrite(header, start)
                    in_archive = True
                else:  # a PAX header (>= 8 GiB): the frame moves to its own file, in by copy
                    with open(out_path, "wb") as own:
                        own.write(header)
                        teed.copy_out(start + HEADER_FRAME_SIZE, own)
            elif out is not None and fits:
                out.seek(0)
                out.write(header)
    finally:
        hasher.close()
        if teed is not None and start is not None:
            framed = teed.end_tee(in_archive, start, job.entry)
    if in_archive and framed is None:
        raise Aborted  # the archive was discarded meanwhile: another layer failed
    if out is not None and not fits:
        _prepend_header(out_path, header)  # PAX header (>= 8 GiB): rewrite once
    return size, framed


class _Sha256Inline:
    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        pass


class Sha256Thread(_Sha256Inline):
    """sha256 in its own thread, beside gunzip in the feeding one.

    On a many-core host zstd's workers keep up and the feeding thread is the critical path;
    moving the hash off it (hashlib releases the GIL) cuts a third of that path.
    """

    def __init__(self) -> None:
        super().__init__()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)  # <= 8 MiB in flight
        self._thread = threading.Thread(target=self._run, name="fetchd-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            super().update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self.close()
        return super().hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _prepend_header(path: Path, header: bytes) -> None:
    tmp = path.with_name(path.name + ".pax")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(header)
        src.seek(HEADER_FRAME_SIZE)
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)




def _limit_text(compressed_size: int, limits: PackConfig) -> str:
    return (f" uncompressed, the most this daemon allows for a layer of {compressed_size} bytes "
            f"({limits.max_layer_ratio:g} times its size, at least 64 MiB, at most "
            f"{limits.max_layer_size} bytes); nothing was packed. A decompression bomb, or a "
            "legitimately huge layer: then raise [pack] max_layer_ratio or max_layer_size in "
            "the daemon's config")
