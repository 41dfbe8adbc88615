"""Pack one image into a zstd-compressed docker-archive, reusing per-layer zstd frames.

The archive is a concatenation of zstd frames (a valid stream for zstd, pzstd and
python-zstandard), whose decompressed bytes are exactly skopeo 1.9's docker-archive
(see ``archive_format``):

    [layer frame of diff_id_1] [layer frame of diff_id_2] ... [tail frame]

A layer's tar member (header, content, padding) depends on nothing but the layer, so its frame
is made once per (diff_id, level) and cached in the store as the key ``<diff_id>@<level>``
(``LayerStore.get_frame``): normally as a *span* of the committed archive that holds it (the
compressed bytes are stored once, and a frame lives as long as the newest archive holding
it); a frame that ended cleanly in a pack that then failed is kept as a blob of its own. A
second image sharing base layers compresses only its new layers; another level compresses
each layer once more at that level. The tail frame (config, legacy entries, manifest.json,
repositories, end blocks) is small and made every time.

Design of a layer frame, chosen so each layer blob is read and decompressed exactly once:
the member header needs the content size, which is known only at the end of the stream. So
the cached unit is two frames: a fixed-size *raw* zstd frame holding the 512-byte header
(written by hand: frame header + one raw block, 522 bytes) followed by an ordinary compressed
frame of content + padding. The worker reserves the 522 bytes, streams blob -> decompress ->
sha256 + zstd into its output, then writes the header frame into the reserved space. (A layer
of 8 GiB or more needs a PAX header, 1536 bytes: that rare frame is rewritten once.)

Assembly overlaps compression: the archive file is appended in layer order while layers are
compressed, each in a slot of a ``CompressionBudget`` (the daemon shares one among all packs,
so CPU and zstd memory stay bounded however many images are packed at once). Cached
frames are copied in (``copy_file_range``); the first layer still to be made when everything
before it is in writes its output straight into the archive, so the biggest bytes (a
single-layer base image) are written once, never copied, and hashed once (by the archive's
commit); a layer made out of turn goes to a temporary file (unlinked once complete and opened)
and is copied in when its turn comes. The tail frame closes the file.

Compression may start before a layer is downloaded: with ``follow``, a layer still arriving
is decompressed and compressed as its bytes come in (``LayerStore.open_following``).

Concurrent packs in one process share frames being made (single-flight per store and frame
key): two images on one new base compress that base once; the waiting pack copies the
frame's bytes from the maker's open file (``_FrameBytes``, reference counted).

Invariants:
- each diff_id is checked against the image config while streaming; a mismatch raises
  ``DiffIdMismatch`` and nothing is committed for that layer nor any archive for the image;
- a frame, and the archive, are committed only from layer streams that ended cleanly: when
  pack follows a download, that means after the store committed the blob (size and digest
  verified). A frame finished before another layer's download failed stays cached (as a
  blob of its own): its content is verified by its diff_id, so it is a correct cache entry;
  the archive is not made;
- compressions run in slots of a ``CompressionBudget`` (CPU and zstd memory bounded across
  all packs that share it); a pack that ends (also cancelled) has no worker left running;
- the bytes depend only on (config, layers, name:tag, level): libzstd is pinned through
  python-zstandard 0.25.0, compression always runs with ``threads >= 1`` (the same bytes for
  any thread count), frames carry a checksum and never a content size;
- finished archives are cached under ``("archive", archive_key(...))`` together with the
  spans of their frames, in one index transaction; the store commits files atomically, so
  an alias or a span always names bytes of a complete, committed blob.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import os
import queue
import shutil
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, TypeVar, cast

import zstandard

from .archive_format import (
    BLOCK,
    archive_tail,
    layer_member_header,
    padding,
    qualified_repo_tag,
)
from .decompress import decompressed_chunks
from .digest import BlobSpan, Digest
from .errors import (
    CompressionLevelInvalid,
    DiffIdMismatch,
    DigestMismatch,
    ManifestInvalid,
    store_error,
)
from .manifest import Descriptor, ImageManifest, parse_config

MIN_LEVEL = 1
MAX_LEVEL = 19
DEFAULT_LEVEL = 3
ARCHIVE_MEDIA_TYPE = "application/x-docker-archive+zstd"
FRAME_MEDIA_TYPE = "application/vnd.fetchd.tar-member+zstd"

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HEADER_FRAME_SIZE = 4 + 1 + 2 + 3 + BLOCK  # magic, descriptor, content size, block header, data
_PROGRESS_INTERVAL = 0.25
_WRITEBACK_EVERY = 32 << 20
_R = TypeVar("_R")


class PackStore(Protocol):
    """What pack needs from the store (``fetchd.layer_store.LayerStore`` implements it)."""

    @property
    def root(self) -> Path: ...

    def open_blob(self, digest: Digest) -> BinaryIO: ...

    def get_alias(self, kind: str, key: str) -> Digest | None: ...

    def temp_path(self, suffix: str = "") -> Path: ...

    def commit_file(self, tmp: Path, digest: Digest | None = None,
                    alias: tuple[str, str] | None = None,
                    media_type: str | None = None,
                    frame_spans: Sequence[tuple[str, int, int]] = (),
                    lease: str | None = None) -> Digest: ...

    def get_frame(self, key: str) -> BlobSpan | None: ...

    def blob_path(self, digest: Digest) -> Path: ...

    def lease(self, digests: Iterable[Digest], holder: str = "") -> AbstractContextManager[Any]: ...


ProgressSink = Callable[[dict[str, Any]], None]
"""Receives pack events (``{"state": ..., ...}``); may be called from worker threads."""


@dataclass(frozen=True)
class PackResult:
    """A committed archive. Of the image's distinct layers, ``frames_compressed`` were
    compressed by this call and ``frames_reused`` found cached (or made by a concurrent pack);
    when the whole archive was cached, ``archive_reused`` is true and every layer counts as
    reused."""

    digest: Digest
    path: Path
    size: int
    frames_compressed: int
    frames_reused: int
    archive_reused: bool = False


def check_level(level: object) -> int:
    """``level`` if it is a zstd level fetchd offers (1-19), else CompressionLevelInvalid."""
    if isinstance(level, bool) or not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise CompressionLevelInvalid(
            f"invalid zstd compression level {level!r}: use an integer from {MIN_LEVEL} to "
            f"{MAX_LEVEL} (Isar's default is {DEFAULT_LEVEL})"
        )
    return level


def archive_key(manifest_digest: Digest | str, repo_tag: str, level: int) -> str:
    """The store alias key of a finished archive: ``<manifest digest> <name:tag> <level>``.

    ``repo_tag`` is normalized as RepoTags are (``debian:12`` == ``docker.io/library/debian:12``).
    """
    return f"{manifest_digest} {qualified_repo_tag(repo_tag)} {check_level(level)}"


def frame_key(diff_id: Digest, level: int) -> str:
    return f"{diff_id}@{level}"


def compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """The one compressor configuration every frame uses (see the determinism invariant)."""
    return zstandard.ZstdCompressor(level=check_level(level), threads=max(1, threads),
                                    write_checksum=True, write_content_size=False)


def raw_zstd_frame(data: bytes) -> bytes:
    """A zstd frame holding ``data`` uncompressed (one raw block), for 256..65791 bytes.

    Frame header descriptor 0x60: single segment, 2-byte content size (stored minus 256),
    no checksum, no dictionary. Block header: last block, type raw, size ``len(data)``.
    """
    n = len(data)
    if not 256 <= n <= 65791:
        raise ValueError(f"raw zstd frame of {n} bytes not supported")
    return (_ZSTD_MAGIC + b"\x60" + (n - 256).to_bytes(2, "little")
            + (1 | n << 3).to_bytes(3, "little") + data)


# --------------------------------------------------------------------------- the CPU budget

MiB = 1 << 20
# RSS growth of one ZstdCompressor stream (python-zstandard 0.25.0) while it compresses a
# large input: (upper bound of the level band, MiB with threads=1, MiB per extra thread).
# Measured by streaming 160 MiB through a fresh context; a later level's window and tables
# dominate, the worker count adds buffers.
_CONTEXT_MEMORY = ((1, 11, 2), (4, 33, 9), (8, 40, 13), (9, 74, 26), (11, 84, 36),
                   (16, 130, 57), (19, 210, 112))
_OWN_BUFFERS = 12 * MiB  # per layer: 1 MiB chunks, <= 8 MiB queued for sha256, write buffers


def context_memory(level: int, threads: int) -> int:
    """Estimated peak bytes one layer compression at ``level`` with ``threads`` takes."""
    for top, one, extra in _CONTEXT_MEMORY:
        if level <= top:
            return (one + extra * (max(1, threads) - 1)) * MiB + _OWN_BUFFERS
    raise CompressionLevelInvalid(f"no memory estimate for zstd level {level}")


class CompressionBudget:
    """The daemon-wide bound on layer compressions, shared by every pack of one process.

    A compression holds a slot from before its ZstdCompressor exists until the frame is
    written. Invariants: at most ``workers`` compressions hold slots at once, and their
    estimated memory (``context_memory``) stays within ``memory`` -- except that one
    compression may always run alone, so a level whose single context exceeds ``memory``
    (17-19) still works, one layer at a time. Each compression gets the most zstd threads
    (up to ``workers``) whose estimate fits ``memory``: the output bytes are the same for any
    thread count >= 1, so this changes speed and memory, never the archive.

    Slots go first come, first served, except that a waiter whose input is complete (its
    ``ready()`` is true) goes before one still waiting for bytes: a slot should not sit idle
    behind a download while a downloaded layer waits. Use only from one event loop.

    Compression contexts are pooled: a context whose frame ended cleanly is kept idle for
    the next compression with the same (level, threads), which saves its allocation (tens
    of MiB of fresh pages and zstd's worker threads, ~15 ms of CPU per layer at level 3).
    The estimated memory of active and idle contexts together stays within ``memory``: a
    slot taken for another (level, threads) first frees the idle contexts, and idle
    contexts are freed ``keep_idle`` seconds after the last compression ended. Reuse never
    changes the bytes (each frame starts from a reset context with the same parameters).
    """

    def __init__(self, workers: int | None = None, memory: int = 128 * MiB,
                 keep_idle: float = 5.0) -> None:
        self.workers = max(1, workers if workers is not None else usable_cpus())
        self.memory = memory
        self.keep_idle = keep_idle
        self.active = 0
        self.used = 0
        self.peak_active = 0  # the most compressions that ever held slots at once
        self.contexts_made = 0  # compression contexts created (the rest were reused)
        self._waiters: list[tuple[asyncio.Future[None], int, Callable[[], bool] | None,
                                  tuple[int, int]]] = []
        self._idle: dict[tuple[int, int], list[zstandard.ZstdCompressor]] = {}
        self._trim_handle: asyncio.TimerHandle | None = None

    def threads(self, level: int) -> int:
        """zstd threads for one compression at ``level`` (>= 1; the bytes do not depend on it)."""
        t = self.workers
        while t > 1 and context_memory(level, t) > self.memory:
            t -= 1
        return t

    @contextlib.asynccontextmanager
    async def slot(self, level: int,
                   ready: Callable[[], bool] | None = None) -> AsyncIterator[int]:
        """Hold a compression slot for ``level``; yields the zstd thread count to use."""
        threads = self.threads(level)
        cost = context_memory(level, threads)
        key = (level, threads)
        if self._waiters or not self._fits(cost):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (fut, cost, ready, key)
            self._waiters.append(entry)
            try:
                await fut
            except BaseException:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                elif fut.done() and not fut.cancelled():
                    self._release(cost)  # granted just as we were cancelled: pass it on
                raise
        else:
            self._take(cost, key)
        try:
            yield threads
        finally:
            self._release(cost)

    def compressor(self, level: int, threads: int) -> zstandard.ZstdCompressor:
        """A context for one frame, inside a slot: an idle pooled one, or a new one."""
        pool = self._idle.get((level, threads))
        if pool:
            return pool.pop()
        self.contexts_made += 1
        return compressor(level, threads)

    def recycle(self, level: int, threads: int, cctx: zstandard.ZstdCompressor) -> None:
        """Give back, from inside its slot, a context whose last frame ended cleanly (never
        one abandoned mid-frame). Kept only while every context fits ``memory``."""
        key = (level, threads)
        if self.used + self._idle_memory() <= self.memory:  # its own cost is in ``used``
            self._idle.setdefault(key, []).append(cctx)

    def idle_contexts(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def trim(self) -> None:
        """Free every idle context now."""
        self._idle.clear()

    def _idle_memory(self) -> int:
        return sum(context_memory(level, threads) * len(v)
                   for (level, threads), v in self._idle.items())

    def _fits(self, cost: int) -> bool:
        return self.active == 0 or (self.active < self.workers and self.used + cost <= self.memory)

    def _take(self, cost: int, key: tuple[int, int]) -> None:
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        for other in [k for k in self._idle if k != key]:
            del self._idle[other]  # another level: its contexts would only add memory
        self.active += 1
        self.used += cost
        self.peak_active = max(self.peak_active, self.active)
        mine = self._idle.get(key, [])
        while mine and self.used + self._idle_memory() > self.memory + cost:
            mine.pop()  # the one this slot takes stays counted in ``used``

    def _release(self, cost: int) -> None:
        self.active -= 1
        self.used -= cost
        self._grant()
        if self.active == 0 and self._idle:
            self._trim_handle = asyncio.get_running_loop().call_later(self.keep_idle, self.trim)

    def _grant(self) -> None:
        order = ([w for w in self._waiters if w[2] is not None and w[2]()]
                 + [w for w in self._waiters if w[2] is None or not w[2]()])
        for entry in order:
            fut, cost, _, key = entry
            if not self._fits(cost):
                return  # no overtaking beyond readiness: a big compression is not starved
            self._waiters.remove(entry)
            self._take(cost, key)
            fut.set_result(None)


# --------------------------------------------------------------------------- following a download

class FollowSource(Protocol):
    """Where pack reads a layer that is still downloading (``LayerStore`` implements it).

    Either way the bytes end cleanly only when the store committed (verified) the blob.
    """

    def open_following(self, digest: Digest, stop: threading.Event) -> BinaryIO | None:
        """In a worker thread: a blocking reader that follows the download, or None (then
        ``read_following`` is used). It raises once ``stop`` is set."""
        ...

    def read_following(self, digest: Digest) -> AsyncIterator[bytes]:
        """On the event loop: the blob's bytes as they arrive."""
        ...

_WAKE = 0.05  # seconds between looks at ``abort`` while a reader waits for bytes


class _FollowReader:
    """A blocking reader (for a worker thread) over an async byte stream of the event loop.

    Each ``read`` asks the loop for the next chunk and blocks until it comes: one chunk in
    flight, so memory stays flat whatever the layer size. While it waits it looks at
    ``abort`` every 50 ms (the download may stall; the pack may be stopped meanwhile).
    """

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop,
                 abort: threading.Event) -> None:
        self._chunks = chunks
        self._loop = loop
        self._abort = abort
        self._buf = b""
        self._eof = False
        self._task: asyncio.Task[Any] | None = None

    async def _next(self) -> bytes | None:
        self._task = asyncio.current_task()
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        finally:
            self._task = None

    def _pull(self) -> bytes | None:
        if self._abort.is_set() or self._loop.is_closed():
            raise _Aborted
        try:
            fut = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        except RuntimeError:  # the loop is closed
            raise _Aborted from None
        while True:
            try:
                return fut.result(timeout=_WAKE)
            except concurrent.futures.TimeoutError:
                if self._abort.is_set() or self._loop.is_closed():
                    raise _Aborted from None

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (fewer only at the end); all the rest when ``n`` < 0."""
        parts = [self._buf]
        have = len(self._buf)
        while not self._eof and (n < 0 or have < n):
            chunk = self._pull()
            if chunk is None:
                self._eof = True
            else:
                parts.append(chunk)
                have += len(chunk)
        data = b"".join(parts)
        if n < 0 or len(data) <= n:
            self._buf = b""
            return data
        self._buf = data[n:]
        return data[:n]

    def close(self) -> None:
        """Stop the stream on the loop (closes its file); waits for that unless stopped."""

        async def stop() -> None:
            task = self._task
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()

        if self._loop.is_closed():
            return
        try:
            fut = asyncio.run_coroutine_threadsafe(stop(), self._loop)
        except RuntimeError:
            return
        while True:
            try:
                fut.result(timeout=_WAKE)
                return
            except concurrent.futures.TimeoutError:
                if self._loop.is_closed():
                    return
            except Exception:  # noqa: BLE001 -- the stream's own error was reported by read
                return

    def __enter__(self) -> _FollowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the archive file


def _write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) or 0:]


class _FrameBytes:
    """A finished layer frame: ``length`` bytes at ``offset`` of an open file (its own
    temporary file, the archive being made, or a cached frame blob or archive of the store).

    Shared by the packs that use it and reference counted: ``acquire`` (False once closed)
    and ``release``; the file is closed with the last reference. Holding the open file keeps
    the bytes readable whatever happens to the path (a gc, a commit renaming it).
    """

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd = fd
        self.offset = offset
        self.length = length
        self._refs = 1
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, offset: int = 0, length: int | None = None) -> _FrameBytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if length is None:
            length = os.fstat(fd).st_size - offset
        return cls(fd, offset, length)

    def acquire(self) -> bool:
        with self._lock:
            if self._refs <= 0:
                return False
            self._refs += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise RuntimeError("pack frame released more often than acquired")
            self._refs -= 1
            if self._refs == 0:
                os.close(self._fd)

    def append_to(self, dst: BinaryIO) -> None:
        """Append the bytes to ``dst`` (an unbuffered file positioned at its end)."""
        pos, end = self.offset, self.offset + self.length
        try:
            while pos < end:
                n = os.copy_file_range(self._fd, dst.fileno(), end - pos, pos)
                if n == 0:
                    break
                pos += n
        except OSError:  # no copy_file_range between these files: copy through user space
            pass
        dst.seek(0, os.SEEK_END)
        while pos < end:
            chunk = os.pread(self._fd, min(1 << 20, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "a pack frame is shorter than recorded")
            _write_all(dst, chunk)
            pos += len(chunk)


class _Writeback:
    """Starts the disk write of a growing file early: an ``fdatasync`` in a thread of its own
    after every ``_WRITEBACK_EVERY`` bytes, so the fsync of the commit that follows the last
    byte has little left to write (the kernel would otherwise hold it all back until then).
    Does nothing when the store does not fsync. ``close`` before closing the file."""

    def __init__(self, fd: int, enabled: bool) -> None:
        self._fd = fd
        self._pending = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="fetchd-writeback", daemon=True)
            self._thread.start()

    def wrote(self, n: int) -> None:
        if self._thread is None:
            return
        self._pending += n
        if self._pending >= _WRITEBACK_EVERY:
            self._pending = 0
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            with contextlib.suppress(OSError):  # only a head start: the commit's fsync counts
                os.fdatasync(self._fd)

    def close(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join()
            self._thread = None


class _ArchiveBuilder:
    """The archive file, appended entry by entry in layer order while frames are being made.

    Entry ``i`` (the i-th distinct layer) gets in either by copying its finished frame
    (``add_ready``), or while it is made: the worker of the entry right after everything
    appended so far may ``claim`` the file and write its frame straight into it (a *tee*:
    the biggest bytes, a single-layer base image, are written once and never copied). One
    tee at a time; copies wait while a tee runs. ``spans`` records where each entry's frame
    lies in the file (the store keeps them as the frame cache). All methods are
    thread-safe; ``write``/``pwrite`` belong to the claiming worker alone.
    """

    def __init__(self, path: Path, count: int, on_complete: Callable[[], object],
                 writeback: bool = False) -> None:
        self.path = path
        self.count = count
        self._on_complete = on_complete
        # read too: spans of it are handed out (end_tee) for other packs and the cache
        self.file: BinaryIO = open(path, "w+b", buffering=0)  # noqa: SIM115 -- closed in finish/discard
        self._writeback = _Writeback(self.file.fileno(), writeback)
        self._next = 0
        self.spans: dict[int, tuple[int, int]] = {}  # entry -> (offset, length) in the file
        # open files: a frame stays readable after a gc took its blob (commit -> lease window)
        self._ready: dict[int, _FrameBytes] = {}
        self._teeing = False
        self._failed = False
        self._lock = threading.Lock()

    def claim(self, entry: int) -> int | None:
        """The offset where ``entry`` starts if its worker may write it here now, else None."""
        with self._lock:
            if self._failed or self._teeing or entry != self._next:
                return None
            self._teeing = True
            return self.file.seek(0, os.SEEK_END)

    # Every use of the file holds the lock (uncontended while a tee runs), so ``discard`` can
    # never close it under a worker that still writes: a stale descriptor number could name
    # another file by then.
    def write(self, data: bytes | memoryview) -> None:
        with self._lock:
            self._check()
            _write_all(self.file, data)
            self._writeback.wrote(len(data))

    def pwrite(self, data: bytes, offset: int) -> None:
        with self._lock:
            self._check()
            os.pwrite(self.file.fileno(), data, offset)

    def _check(self) -> None:
        if self._failed:
            raise _Aborted

    def copy_out(self, start: int, dst: BinaryIO) -> None:
        """Copy the archive's bytes from ``start`` to its end into ``dst`` (the claiming
        worker, before it gives up its claim)."""
        with self._lock:
            self._check()
            pos, end = start, self.file.seek(0, os.SEEK_END)
            while pos < end:
                chunk = os.pread(self.file.fileno(), min(1 << 20, end - pos), pos)
                if not chunk:
                    raise OSError(errno.EIO, "the archive is shorter than written")
                dst.write(chunk)
                pos += len(chunk)

    def end_tee(self, ok: bool, start: int, entry: int) -> _FrameBytes | None:
        """The claiming worker is done: its entry is in (``ok``; returns the frame's bytes,
        shared with the archive file), or is cut off again."""
        with self._lock:
            self._teeing = False
            if self._failed:
                return None
            frame = None
            if ok:
                end = self.file.seek(0, os.SEEK_END)
                self.spans[entry] = (start, end - start)
                frame = _FrameBytes(os.dup(self.file.fileno()), start, end - start)
                self._next += 1
            else:
                self.file.truncate(start)
                self.file.seek(start)
            try:
                self._drain()
            except BaseException:
                if frame is not None:
                    frame.release()
                raise
            return frame

    def add_ready(self, entries: dict[int, _FrameBytes]) -> None:
        """Finished frames, each copied in when its turn comes; takes over one reference of
        each (released once copied, or on ``discard``)."""
        with self._lock:
            if self._failed:
                for frame in entries.values():
                    frame.release()
                raise _Aborted
            self._ready.update(entries)
            self._drain()

    def _drain(self) -> None:
        while not self._teeing and self._next in self._ready:
            frame = self._ready.pop(self._next)
            try:
                before = self.file.seek(0, os.SEEK_END)
                frame.append_to(self.file)
            finally:
                frame.release()
            size = self.file.seek(0, os.SEEK_END) - before
            self.spans[self._next] = (before, size)
            self._writeback.wrote(size)
            self._next += 1
        if self._next == self.count and not self._teeing:
            self._on_complete()  # every layer entry is in: only the tail is missing

    def finish(self, tail: bytes) -> None:
        with self._lock:
            if self._failed or self._teeing or self._next != self.count:
                raise _Aborted
            self.file.seek(0, os.SEEK_END)
            _write_all(self.file, tail)
            self._writeback.close()
            self.file.close()

    def discard(self) -> None:
        with self._lock:
            self._failed = True
            self._writeback.close()
            self.file.close()
            for frame in self._ready.values():
                frame.release()
            self._ready.clear()
        with contextlib.suppress(OSError):
            self.path.unlink()


class _Sink:
    """The compressor's output: the frame's own file, or (claimed) the archive itself."""

    def __init__(self, frame: BinaryIO | None, archive: _ArchiveBuilder | None) -> None:
        self.frame = frame
        self.archive = archive

    def write(self, data: bytes) -> int:
        if self.archive is not None:
            self.archive.write(data)
        else:
            assert self.frame is not None
            self.frame.write(data)
        return len(data)

    def flush(self) -> None:
        if self.frame is not None:
            self.frame.flush()


# --------------------------------------------------------------------------- layer frames


@dataclass(frozen=True)
class _LayerJob:
    descriptor: Descriptor
    diff_id: Digest
    index: int  # position in the manifest (for messages)
    entry: int = 0  # position among the archive's distinct layers


class _Aborted(Exception):
    """Another layer failed: stop early, the archive will not be made."""


def make_layer_frame(src: BinaryIO, out_path: Path, job: _LayerJob, level: int, threads: int, *,
                     image_name: str = "", abort: threading.Event | None = None,
                     progress: ProgressSink | None = None,
                     archive: _ArchiveBuilder | None = None,
                     cctx: zstandard.ZstdCompressor | None = None
                     ) -> tuple[int, _FrameBytes | None]:
    """Make one layer's frame: ``(layer size, its bytes in the archive or None)``.

    Reads ``src`` once: decompress, hash and compress in one pass. When ``archive`` lets this
    entry in now (it is next in line and no other frame is being written there), the frame
    goes straight into the archive and comes back as a span of it (a reference the caller
    releases); otherwise it is written to ``out_path`` and None comes back. Raises
    DiffIdMismatch when the content does not hash to ``job.diff_id``: then the archive is
    cut back and the caller discards ``out_path``. ``cctx``: a context made by
    ``compressor(level, threads)`` to reuse (default: a new one).
    """
    what = f"layer {job.descriptor.digest} of {image_name or 'image'}"
    hasher = _Sha256Thread() if threads > 1 else _Sha256Inline()
    size = 0
    last = time.monotonic()
    start = archive.claim(job.entry) if archive is not None else None
    teed = archive if start is not None else None
    in_archive = False
    framed: _FrameBytes | None = None
    out: BinaryIO | None = None
    fits = True
    try:
        with contextlib.ExitStack() as stack:
            if teed is None:  # a file of its own: temporary, it never needs to reach the disk
                out = stack.enter_context(open(out_path, "wb"))
            sink = _Sink(out, teed)
            sink.write(b"\0" * _HEADER_FRAME_SIZE)  # the header frame, once the size is known
            # No ``with``: leaving it on an error would first compress all buffered input
            # (seconds at level 19); an abandoned writer ends without finishing its frame.
            w = (cctx or compressor(level, threads)).stream_writer(
                cast(IO[bytes], sink), closefd=False, write_size=1 << 20)
            for chunk in decompressed_chunks(src, job.descriptor.media_type, what=what):
                if abort is not None and abort.is_set():
                    raise _Aborted
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
            fits = len(header) == _HEADER_FRAME_SIZE
            if teed is not None and start is not None:
                if fits:
                    teed.pwrite(header, start)
                    in_archive = True
                else:  # a PAX header (>= 8 GiB): the frame moves to its own file, in by copy
                    with open(out_path, "wb") as own:
                        own.write(header)
                        teed.copy_out(start + _HEADER_FRAME_SIZE, own)
            elif out is not None and fits:
                out.seek(0)
                out.write(header)
    finally:
        hasher.close()
        if teed is not None and start is not None:
            framed = teed.end_tee(in_archive, start, job.entry)
    if in_archive and framed is None:
        raise _Aborted  # the archive was discarded meanwhile: another layer failed
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


class _Sha256Thread(_Sha256Inline):
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
        src.seek(_HEADER_FRAME_SIZE)
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)


def _build_frame(store: PackStore, job: _LayerJob, level: int, threads: int, image_name: str,
                 abort: threading.Event, progress: ProgressSink | None,
                 archive: _ArchiveBuilder,
                 source: Callable[[], AbstractContextManager[Any]],
                 cctx: zstandard.ZstdCompressor | None = None) -> _FrameBytes:
    """Make one layer frame and get it into the archive (worker thread); returns the frame's
    bytes (a reference the caller releases), for packs waiting on it and for the cache.

    ``source`` opens the layer's bytes: the blob file, or a reader that follows its download
    and ends cleanly only once the store verified and committed the blob. So a frame is made
    only from a committed blob whose diff_id matched. Nothing is hashed or committed here:
    the frame is cached as a span of the archive when that is committed.
    """
    tmp = store.temp_path(".frame.zst")
    frame: _FrameBytes | None = None
    try:
        with source() as src:
            size, frame = make_layer_frame(src, tmp, job, level, threads,
                                           image_name=image_name, abort=abort,
                                           progress=progress, archive=archive, cctx=cctx)
        if frame is None:  # in its own file: into the archive by copy, when its turn comes
            frame = _FrameBytes.open(tmp)
            tmp.unlink()  # the open file keeps the bytes for the archive and waiting packs
            frame.acquire()  # one reference for the archive, one for the caller
            archive.add_ready({job.entry: frame})
    except BaseException as e:
        if frame is not None:
            frame.release()
        stopped = abort.is_set()  # another layer failed first (or the pack was cancelled)
        abort.set()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if stopped and not isinstance(e, _Aborted):
            raise _Aborted from e  # the first failure is the one to report, not its echo
        raise
    if progress is not None:
        progress({"state": "layer-done", "diff_id": str(job.diff_id), "bytes": size})
    return frame


def _keep_frames(store: PackStore, level: int, made: Sequence[tuple[_LayerJob, _FrameBytes]]
                 ) -> None:
    """Commit frames that ended cleanly as blobs of their own: the pack failed (another
    layer), so no archive will hold them, and a retry should not compress them again."""
    for job, frame in made:
        tmp = store.temp_path(".frame.zst")
        try:
            with open(tmp, "wb", buffering=0) as f:
                frame.append_to(f)
            store.commit_file(tmp, alias=("frame", frame_key(job.diff_id, level)),
                              media_type=FRAME_MEDIA_TYPE)
        except Exception:  # noqa: BLE001 -- best effort: the pack's own failure is reported
            with contextlib.suppress(OSError):
                tmp.unlink()


def _fsyncs(store: PackStore) -> bool:
    """Whether the store fsyncs its commits (``LayerStore.settings.fsync``; others: no)."""
    return bool(getattr(getattr(store, "settings", None), "fsync", False))


def _layer_jobs(manifest: ImageManifest, diff_ids: Sequence[Digest], where: str) -> list[_LayerJob]:
    if len(diff_ids) != len(manifest.layers):
        raise ManifestInvalid(
            f"{where}: the manifest has {len(manifest.layers)} layers but the config lists "
            f"{len(diff_ids)} diff_ids; the image is inconsistent"
        )
    if not diff_ids:
        raise ManifestInvalid(f"{where}: the image has no layers; nothing to pack")
    jobs: dict[Digest, _LayerJob] = {}
    for i, (desc, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
        if diff_id not in jobs:
            jobs[diff_id] = _LayerJob(desc, diff_id, i, len(jobs))
    return list(jobs.values())


# --------------------------------------------------------------------------- pack_image


async def pack_image(store: PackStore, manifest: ImageManifest, config_raw: bytes, repo_tag: str,
                     level: int, *, threads: int | None = None,
                     progress: ProgressSink | None = None, image_name: str = "",
                     manifest_digest: Digest | None = None,
                     budget: CompressionBudget | None = None,
                     follow: FollowSource | None = None,
                     lease: str | None = None) -> PackResult:
    """The image as a zstd docker-archive in the store (made now, or found in the cache).

    The layer blobs of ``manifest`` must be in the store (the caller leases them), or, with
    ``follow``, be downloading into it: a layer not in the store when its compression starts
    is read through ``follow`` while its bytes arrive (``LayerStore.open_following``, or
    ``read_following`` bridged into the worker thread).
    A follow that fails fails the pack; every frame and the archive are committed only from
    a stream that ended cleanly, i.e. after the store committed (size and digest verified)
    the blob, and after the layer's diff_id matched.

    Compressions wait for slots of ``budget`` (shared by every pack of the daemon, which
    bounds CPU and memory across images); without one, this call gets a budget of its own
    with ``threads`` (default: usable CPUs) workers. ``threads`` never changes the bytes. The archive
    is cached under ``archive_key(manifest_digest, repo_tag, level)``; without a
    ``manifest_digest`` the config digest stands in for it (the archive's content depends
    only on the config, the layers it names and ``repo_tag``).
    The archive joins ``lease`` (an id ``LayerStore.lease`` yielded) as it is committed, so
    the caller's lease keeps it from gc after this returns; without one, the pack's own lease
    protects it only until then.
    When this returns, ``PackResult.path`` is a complete, committed archive. A file system
    failure (disk full, read-only store) raises StoreError; nothing half-written is kept.
    """
    try:
        if budget is None:
            budget = CompressionBudget(threads)
        return await _pack_image(store, manifest, config_raw, repo_tag, level, budget=budget,
                                 progress=progress, image_name=image_name,
                                 manifest_digest=manifest_digest, follow=follow, lease=lease)
    except OSError as e:
        raise store_error(e, store.root, f"pack {image_name or repo_tag}") from e


async def _pack_image(store: PackStore, manifest: ImageManifest, config_raw: bytes, repo_tag: str,
                      level: int, *, budget: CompressionBudget, progress: ProgressSink | None,
                      image_name: str, manifest_digest: Digest | None,
                      follow: FollowSource | None, lease: str | None) -> PackResult:
    check_level(level)
    where = image_name or repo_tag
    qualified = qualified_repo_tag(repo_tag)
    config_digest = Digest.of(config_raw)
    if config_digest != manifest.config.digest:
        raise DigestMismatch(
            f"{where}: config bytes hash to {config_digest}, the manifest names "
            f"{manifest.config.digest}; pass the config blob of this manifest"
        )
    config = parse_config(config_raw, where)
    jobs = _layer_jobs(manifest, config.diff_ids, where)
    tail = archive_tail(config_raw, qualified, where)
    key = archive_key(manifest_digest or config_digest, qualified, level)

    cached = store.get_alias("archive", key)
    if cached is not None:
        path = store.blob_path(cached)
        with contextlib.suppress(FileNotFoundError):
            result = PackResult(cached, path, path.stat().st_size, 0, len(jobs), archive_reused=True)
            _emit(progress, {"state": "done", "digest": str(cached), "size": result.size,
                             "reused": True})
            return result

    frames: dict[Digest, BlobSpan] = {}
    for job in jobs:
        found = store.get_frame(frame_key(job.diff_id, level))
        if found is not None:
            frames[job.diff_id] = found
    todo = [job for job in jobs if job.diff_id not in frames]
    holder = f"pack {where}"
    loop = asyncio.get_running_loop()
    complete = asyncio.Event()
    archive = _ArchiveBuilder(store.temp_path(".docker-archive.zst"), len(jobs),
                              lambda: loop.call_soon_threadsafe(complete.set), _fsyncs(store))

    # every frame of the archive is cached as a span of it, also those reused from others:
    # a frame lives as long as the newest archive that holds it
    spans = {job.entry: frame_key(job.diff_id, level) for job in jobs}

    joined = [lease] if lease is not None else []  # the lease the archive joins

    async def finish() -> Digest:
        await complete.wait()
        return await asyncio.to_thread(_finish_archive, store, archive, tail, key, level, spans,
                                       joined[0])

    # The archive is finished and committed as soon as its last layer entry is in.
    finisher = asyncio.ensure_future(finish())
    finisher.add_done_callback(_retrieve)
    try:
        with store.lease([*(f.digest for f in frames.values()),
                          *(job.descriptor.digest for job in todo)], holder) as own:
            joined.append(own)  # used only when the caller passed no lease
            for job in jobs:
                _emit(progress, {"state": "layer", "diff_id": str(job.diff_id),
                                 "reused": job.diff_id in frames})
            # cached frames at the head go in first, so the first new layer can tee
            await asyncio.to_thread(_add_cached, store, archive, {
                job.entry: frames[job.diff_id] for job in jobs if job.diff_id in frames})
            made, compressed = await _build_frames(store, todo, level, budget, where, progress,
                                                   archive, follow)
            try:
                _emit(progress, {"state": "assemble", "layers": len(jobs)})
                digest = await finisher
            finally:
                for frame in made:
                    frame.release()
    except BaseException:
        finisher.cancel()
        archive.discard()
        raise
    path = store.blob_path(digest)
    size = path.stat().st_size
    _emit(progress, {"state": "done", "digest": str(digest), "size": size, "reused": False})
    return PackResult(digest, path, size, compressed, len(jobs) - compressed)


def _finish_archive(store: PackStore, archive: _ArchiveBuilder, tail: bytes, key: str,
                    level: int, frame_keys: dict[int, str], lease: str) -> Digest:
    # one thread: the tail is small, and the bytes are the same for any thread count >= 1
    archive.finish(compressor(level, 1).compress(tail))
    spans = [(frame_keys[entry], offset, length)
             for entry, (offset, length) in sorted(archive.spans.items())]
    return store.commit_file(archive.path, alias=("archive", key), media_type=ARCHIVE_MEDIA_TYPE,
                             frame_spans=spans, lease=lease)


def _add_cached(store: PackStore, archive: _ArchiveBuilder, frames: dict[int, BlobSpan]) -> None:
    """Cached frames into the archive (opened now: FileNotFoundError if a gc took one)."""
    opened: dict[int, _FrameBytes] = {}
    try:
        for entry, span in frames.items():
            opened[entry] = _FrameBytes.open(store.blob_path(span.digest), span.offset,
                                             span.length)
    except BaseException:
        for frame in opened.values():
            frame.release()
        raise
    archive.add_ready(opened)


async def _build_frames(store: PackStore, todo: Sequence[_LayerJob], level: int,
                        budget: CompressionBudget, where: str, progress: ProgressSink | None,
                        archive: _ArchiveBuilder,
                        follow: FollowSource | None) -> tuple[list[_FrameBytes], int]:
    """Make the missing layer frames, each in a slot of ``budget``, and get them into the
    archive. Returns the frames this call made (references the caller releases once the
    archive is committed) and how many layers it compressed itself (the others were being
    made by a concurrent pack of another image and were waited for, or found cached).

    On the first failure the other layers stop early and that first failure is raised; so
    does cancellation (the worker threads notice ``abort`` within one chunk). The frames
    that ended cleanly before a failure are kept as frame blobs (``_keep_frames``).
    """
    abort = threading.Event()
    flights = _flights(store)
    loop = asyncio.get_running_loop()

    def source(digest: Digest) -> Callable[[], AbstractContextManager[Any]]:
        if follow is None or store.blob_path(digest).is_file():
            return lambda: store.open_blob(digest)
        src = follow

        def following() -> AbstractContextManager[Any]:
            # still downloading: the worker thread reads the bytes as they arrive
            reader = src.open_following(digest, abort)
            if reader is not None:
                return reader
            return _FollowReader(src.read_following(digest), loop, abort)
        return following

    async def one(job: _LayerJob) -> tuple[_FrameBytes | None, bool]:
        key = frame_key(job.diff_id, level)
        other = flights.get(key)
        if other is not None:
            await asyncio.wait([other])
            shared = other.result() if not other.cancelled() and other.exception() is None else None
            if shared is not None and shared.acquire():
                await asyncio.to_thread(archive.add_ready, {job.entry: shared})
                return None, False
            # else that pack failed or stopped (maybe over another layer): look again below
        # a concurrent pack may have committed this frame since pack_image looked
        cached = store.get_frame(key)
        if cached is not None:
            try:
                await asyncio.to_thread(_add_cached, store, archive, {job.entry: cached})
                return None, False
            except FileNotFoundError:
                pass  # a gc took it before this pack could open it: make the frame again
        fut: asyncio.Future[_FrameBytes] = asyncio.get_running_loop().create_future()
        flights[key] = fut
        try:
            blob = job.descriptor.digest
            async with budget.slot(level, lambda: store.blob_path(blob).is_file()) as threads:
                if abort.is_set():
                    raise _Aborted
                cctx = budget.compressor(level, threads)
                work = asyncio.ensure_future(_in_thread(
                    _build_frame, store, job, level, threads, where, abort, progress, archive,
                    source(blob), cctx))
                try:
                    frame = await asyncio.shield(work)
                except asyncio.CancelledError:
                    # Hold the slot until the worker is gone (it sees ``abort`` within a
                    # chunk, or 50 ms while it waits for bytes): when the pack ends, nothing
                    # of it still runs, holds a zstd context or leaves a file behind.
                    abort.set()
                    archive.discard()  # a frame finishing meanwhile must not complete it
                    await asyncio.wait([work])
                    if not work.cancelled() and work.exception() is None:
                        work.result().release()
                    raise
                budget.recycle(level, threads, cctx)  # its frame ended cleanly
            fut.set_result(frame)
            return frame, True
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters decide what to do with it
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if flights.get(key) is fut:
                del flights[key]

    tasks = [asyncio.ensure_future(one(job)) for job in todo]
    if not tasks:
        return [], 0
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        # The pull cancels its pack when a download fails: the frames that ended cleanly
        # stay cached all the same (every task ends: ``one`` waits for its worker).
        abort.set()
        for task in tasks:
            task.cancel()
        await asyncio.shield(_settle(store, level, todo, tasks, keep=True))
        raise
    results = [asyncio.CancelledError() if t.cancelled() else t.exception() or t.result()
               for t in tasks]
    errors = [r for r in results if isinstance(r, BaseException)]
    real = [e for e in errors if not isinstance(e, _Aborted | asyncio.CancelledError)]
    if errors:
        abort.set()
        await _settle(store, level, todo, tasks, keep=bool(real))
        raise (real or errors)[0]
    compressed = sum(1 for r in results if not isinstance(r, BaseException) and r[1])
    return [r[0] for r in results if not isinstance(r, BaseException) and r[0] is not None], \
        compressed


async def _settle(store: PackStore, level: int, todo: Sequence[_LayerJob],
                  tasks: Sequence[asyncio.Future[tuple[_FrameBytes | None, bool]]],
                  keep: bool) -> None:
    """A pack that fails: wait for every layer task, keep the frames this pack made that
    ended cleanly (``keep``; as frame blobs, no archive will hold them), release them all."""
    await asyncio.wait(tasks)
    made: list[tuple[_LayerJob, _FrameBytes]] = []
    for job, task in zip(todo, tasks, strict=True):
        frame = None if task.cancelled() or task.exception() else task.result()[0]
        if frame is not None:
            made.append((job, frame))
    try:
        if made and keep:
            await asyncio.to_thread(_keep_frames, store, level, made)
    finally:
        for _, frame in made:
            frame.release()


# Frames being made in this process, per store: when two images on one base are packed at
# once, the second waits for the first's frame instead of compressing the same layer again.
_IN_FLIGHT: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Future[_FrameBytes]]] = (
    weakref.WeakKeyDictionary())


def _flights(store: PackStore) -> dict[str, asyncio.Future[_FrameBytes]]:
    try:
        return _IN_FLIGHT.setdefault(store, {})
    except TypeError:  # a store that cannot be weakly referenced: no sharing, still correct
        return {}


async def _in_thread(fn: Callable[..., _R], *args: Any) -> _R:
    """``fn(*args)`` in a thread of its own, not the loop's default executor: a frame worker
    may block for as long as its layer downloads, and the download's own file writes go
    through that executor."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_R] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        outcome: tuple[bool, Any]
        try:
            outcome = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 -- handed to the awaiting task
            outcome = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="fetchd-pack", daemon=True).start()
    return await fut


def usable_cpus() -> int:
    """CPUs this process may run on (taskset/cpuset limits count, unlike os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a background future's outcome as seen (the pack reports its own error)."""
    if not fut.cancelled():
        fut.exception()


def _emit(progress: ProgressSink | None, event: dict[str, Any]) -> None:
    if progress is not None:
        progress(event)
