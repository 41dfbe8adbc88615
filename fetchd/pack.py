"""Pack one image into a zstd-compressed docker-archive, reusing per-layer zstd frames.

The archive is a concatenation of zstd frames (a valid stream for zstd, pzstd and
python-zstandard), whose decompressed bytes are exactly skopeo 1.9's docker-archive
(see ``archive_format``):

    [layer frame of diff_id_1] [layer frame of diff_id_2] ... [tail frame]

A layer's tar member (header, content, padding) depends on nothing but the layer, so its frame
is made once per (diff_id, level) and cached in the store under the alias
``("frame", "<diff_id>@<level>")``. A second image sharing base layers compresses only its new
layers; another level compresses each layer once more at that level. The tail frame (config,
legacy entries, manifest.json, repositories, end blocks) is small and made every time.

Design of a layer frame, chosen so each layer blob is read and decompressed exactly once:
the member header needs the content size, which is known only at the end of the stream. So
the cached unit is two frames: a fixed-size *raw* zstd frame holding the 512-byte header
(written by hand: frame header + one raw block, 522 bytes) followed by an ordinary compressed
frame of content + padding. The worker reserves the 522 bytes, streams blob -> decompress ->
sha256 + zstd into the file, then writes the header frame into the reserved space. (A layer of
8 GiB or more needs a PAX header, 1536 bytes: that rare file is rewritten once.)

Assembly overlaps compression: the archive file is appended in layer order while layers are
compressed, up to ``threads`` layers at a time, each with ``threads`` zstd workers. Cached
frames are copied in (``copy_file_range``); the first layer still to be made when everything
before it is in writes its output to its frame file and to the archive at once, so the
biggest bytes (a single-layer base image) are never copied. The tail frame closes the file.

Concurrent packs in one process share frames being made (single-flight per store and frame
key): two images on one new base compress that base once.

Invariants:
- each diff_id is checked against the image config while streaming; a mismatch raises
  ``DiffIdMismatch`` and nothing is committed for that layer nor any archive for the image;
- the bytes depend only on (config, layers, name:tag, level): libzstd is pinned through
  python-zstandard 0.25.0, compression always runs with ``threads >= 1`` (the same bytes for
  any thread count), frames carry a checksum and never a content size;
- finished archives are cached under ``("archive", archive_key(...))``; the store commits
  files atomically, so an alias always names a complete archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from .archive_format import (
    BLOCK,
    archive_tail,
    layer_member_header,
    padding,
    qualified_repo_tag,
)
from .decompress import decompressed_chunks
from .digest import Digest
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


class PackStore(Protocol):
    """What pack needs from the store (``fetchd.layer_store.LayerStore`` implements it)."""

    @property
    def root(self) -> Path: ...

    def open_blob(self, digest: Digest) -> BinaryIO: ...

    def get_alias(self, kind: str, key: str) -> Digest | None: ...

    def temp_path(self, suffix: str = "") -> Path: ...

    def commit_file(self, tmp: Path, digest: Digest | None = None,
                    alias: tuple[str, str] | None = None,
                    media_type: str | None = None) -> Digest: ...

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


# --------------------------------------------------------------------------- the archive file


def _write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) or 0:]


def _copy_into(dst: BinaryIO, path: Path) -> None:
    """Append the file at ``path`` to ``dst`` (an unbuffered file positioned at its end)."""
    with open(path, "rb") as src:
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining > 0:
                n = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
                if n == 0:
                    break
                remaining -= n
        except OSError:  # no copy_file_range between these files: copy through user space
            pass
        if remaining > 0:
            src.seek(-remaining, os.SEEK_END)
            dst.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, dst, 1 << 20)


class _ArchiveBuilder:
    """The archive file, appended entry by entry in layer order while frames are being made.

    Entry ``i`` (the i-th distinct layer) gets in either by copying its finished frame file
    (``add_ready``), or while it is made: the worker of the entry right after everything
    appended so far may ``claim`` the file and write its frame there too, saving a copy of
    the biggest bytes (``tee``). One tee at a time; copies wait while a tee runs. All methods
    are thread-safe; ``write``/``pwrite`` belong to the claiming worker alone.
    """

    def __init__(self, path: Path, count: int, on_complete: Callable[[], object]) -> None:
        self.path = path
        self.count = count
        self._on_complete = on_complete
        self.file: BinaryIO = open(path, "wb", buffering=0)  # noqa: SIM115 -- closed in finish/discard
        self._next = 0
        self._ready: dict[int, Path] = {}
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

    def pwrite(self, data: bytes, offset: int) -> None:
        with self._lock:
            self._check()
            os.pwrite(self.file.fileno(), data, offset)

    def _check(self) -> None:
        if self._failed:
            raise _Aborted

    def end_tee(self, ok: bool, start: int) -> None:
        """The claiming worker is done: its entry is in (``ok``), or is cut off again."""
        with self._lock:
            self._teeing = False
            if self._failed:
                return
            if ok:
                self._next += 1
            else:
                self.file.truncate(start)
                self.file.seek(start)
            self._drain()

    def add_ready(self, entries: dict[int, Path]) -> None:
        """Finished frame files; each is copied in when its turn comes."""
        with self._lock:
            self._check()
            self._ready.update(entries)
            self._drain()

    def _drain(self) -> None:
        while not self._teeing and self._next in self._ready:
            _copy_into(self.file, self._ready.pop(self._next))
            self._next += 1
        if self._next == self.count and not self._teeing:
            self._on_complete()  # every layer entry is in: only the tail is missing

    def finish(self, tail: bytes) -> None:
        with self._lock:
            if self._failed or self._teeing or self._next != self.count:
                raise _Aborted
            self.file.seek(0, os.SEEK_END)
            _write_all(self.file, tail)
            self.file.close()

    def discard(self) -> None:
        with self._lock:
            self._failed = True
            self.file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class _Tee:
    """The compressor's output: the frame file and, while claimed, the archive too."""

    def __init__(self, frame: BinaryIO, archive: _ArchiveBuilder | None) -> None:
        self.frame = frame
        self.archive = archive

    def write(self, data: bytes) -> int:
        self.frame.write(data)
        if self.archive is not None:
            self.archive.write(data)
        return len(data)

    def flush(self) -> None:
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
                     archive: _ArchiveBuilder | None = None) -> tuple[int, bool]:
    """Write the cached unit of one layer to ``out_path``: ``(layer size, also in archive)``.

    Reads ``src`` once: decompress, hash and compress in one pass. When ``archive`` lets this
    entry in now, the same bytes go into the archive as well. Raises DiffIdMismatch when the
    content does not hash to ``job.diff_id`` (the caller discards ``out_path``).
    """
    what = f"layer {job.descriptor.digest} of {image_name or 'image'}"
    hasher = _Sha256Thread() if threads > 1 else _Sha256Inline()
    size = 0
    last = time.monotonic()
    start = archive.claim(job.entry) if archive is not None else None
    tee = archive if start is not None else None
    in_archive = False
    try:
        with open(out_path, "wb") as out:
            sink = _Tee(out, tee)
            sink.write(b"\0" * _HEADER_FRAME_SIZE)  # the header frame, once the size is known
            # No ``with``: leaving it on an error would first compress all buffered input
            # (seconds at level 19); an abandoned writer ends without finishing its frame.
            w = compressor(level, threads).stream_writer(cast(IO[bytes], sink), closefd=False,
                                                         write_size=1 << 20)
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
            if len(header) == _HEADER_FRAME_SIZE:
                out.seek(0)
                out.write(header)
                if tee is not None and start is not None:
                    tee.pwrite(header, start)
                    in_archive = True
                return size, in_archive
    finally:
        hasher.close()
        if tee is not None and start is not None:
            tee.end_tee(in_archive, start)
    _prepend_header(out_path, header)  # PAX header (>= 8 GiB): rewrite once
    return size, False


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
                 archive: _ArchiveBuilder) -> Digest:
    """Make, verify and commit one layer frame, and get it into the archive (worker thread)."""
    tmp = store.temp_path(".frame.zst")
    try:
        with store.open_blob(job.descriptor.digest) as src:
            size, in_archive = make_layer_frame(src, tmp, job, level, threads,
                                                image_name=image_name, abort=abort,
                                                progress=progress, archive=archive)
        digest = store.commit_file(tmp, alias=("frame", frame_key(job.diff_id, level)),
                                   media_type=FRAME_MEDIA_TYPE)
    except BaseException:
        abort.set()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if not in_archive:
        archive.add_ready({job.entry: store.blob_path(digest)})
    if progress is not None:
        progress({"state": "layer-done", "diff_id": str(job.diff_id), "bytes": size,
                  "frame": str(digest)})
    return digest


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
                     manifest_digest: Digest | None = None) -> PackResult:
    """The image as a zstd docker-archive in the store (made now, or found in the cache).

    The layer blobs of ``manifest`` must be in the store (the caller leases them). The archive
    is cached under ``archive_key(manifest_digest, repo_tag, level)``; without a
    ``manifest_digest`` the config digest stands in for it (the archive's content depends
    only on the config, the layers it names and ``repo_tag``).
    When this returns, ``PackResult.path`` is a complete, committed archive. A file system
    failure (disk full, read-only store) raises StoreError; nothing half-written is kept.
    """
    try:
        return await _pack_image(store, manifest, config_raw, repo_tag, level, threads=threads,
                                 progress=progress, image_name=image_name,
                                 manifest_digest=manifest_digest)
    except OSError as e:
        raise store_error(e, store.root, f"pack {image_name or repo_tag}") from e


async def _pack_image(store: PackStore, manifest: ImageManifest, config_raw: bytes, repo_tag: str,
                      level: int, *, threads: int | None, progress: ProgressSink | None,
                      image_name: str, manifest_digest: Digest | None) -> PackResult:
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
    workers = max(1, threads if threads is not None else _usable_cpus())

    cached = store.get_alias("archive", key)
    if cached is not None:
        path = store.blob_path(cached)
        with contextlib.suppress(FileNotFoundError):
            result = PackResult(cached, path, path.stat().st_size, 0, len(jobs), archive_reused=True)
            _emit(progress, {"state": "done", "digest": str(cached), "size": result.size,
                             "reused": True})
            return result

    frames: dict[Digest, Digest] = {}
    for job in jobs:
        found = store.get_alias("frame", frame_key(job.diff_id, level))
        if found is not None and store.blob_path(found).is_file():
            frames[job.diff_id] = found
    todo = [job for job in jobs if job.diff_id not in frames]
    holder = f"pack {where}"
    loop = asyncio.get_running_loop()
    complete = asyncio.Event()
    archive = _ArchiveBuilder(store.temp_path(".docker-archive.zst"), len(jobs),
                              lambda: loop.call_soon_threadsafe(complete.set))

    async def finish() -> Digest:
        await complete.wait()
        return await asyncio.to_thread(_finish_archive, store, archive, tail, key, level, workers)

    # The archive is finished and committed as soon as its last layer entry is in, while the
    # frames' own commits (hashing, fsync) may still run.
    finisher = asyncio.ensure_future(finish())
    finisher.add_done_callback(_retrieve)
    try:
        with contextlib.ExitStack() as leases:
            leases.enter_context(store.lease(
                [*frames.values(), *(job.descriptor.digest for job in todo)], holder))
            for job in jobs:
                _emit(progress, {"state": "layer", "diff_id": str(job.diff_id),
                                 "reused": job.diff_id in frames})
            # cached frames at the head go in first, so the first new layer can tee
            await asyncio.to_thread(archive.add_ready, {
                job.entry: store.blob_path(frames[job.diff_id])
                for job in jobs if job.diff_id in frames})
            made, compressed = await _build_frames(store, todo, level, workers, where, progress,
                                                   archive)
            leases.enter_context(store.lease(made.values(), holder))
            _emit(progress, {"state": "assemble", "layers": len(jobs)})
            digest = await finisher
    except BaseException:
        finisher.cancel()
        archive.discard()
        raise
    path = store.blob_path(digest)
    size = path.stat().st_size
    _emit(progress, {"state": "done", "digest": str(digest), "size": size, "reused": False})
    return PackResult(digest, path, size, compressed, len(jobs) - compressed)


def _finish_archive(store: PackStore, archive: _ArchiveBuilder, tail: bytes, key: str,
                    level: int, threads: int) -> Digest:
    archive.finish(compressor(level, threads).compress(tail))
    return store.commit_file(archive.path, alias=("archive", key), media_type=ARCHIVE_MEDIA_TYPE)


async def _build_frames(store: PackStore, todo: Sequence[_LayerJob], level: int, workers: int,
                        where: str, progress: ProgressSink | None,
                        archive: _ArchiveBuilder) -> tuple[dict[Digest, Digest], int]:
    """Make the missing layer frames: up to ``workers`` layers at a time, each with ``workers``
    zstd threads. Returns the frames and how many of them this call compressed itself (the
    others were being made by a concurrent pack of another image and were waited for).

    On the first failure the other layers stop early and that first failure is raised; so
    does cancellation (the worker threads notice ``abort`` within one chunk).
    """
    abort = threading.Event()
    slots = asyncio.Semaphore(workers)
    flights = _flights(store)

    async def one(job: _LayerJob) -> tuple[Digest, bool]:
        key = frame_key(job.diff_id, level)
        other = flights.get(key)
        if other is not None:
            await asyncio.wait([other])
            if not other.cancelled() and other.exception() is None:
                digest = other.result()
                await asyncio.to_thread(archive.add_ready, {job.entry: store.blob_path(digest)})
                return digest, False
            # that pack failed or stopped (maybe over another layer): make the frame here
        else:
            # a concurrent pack may have finished this frame since pack_image looked
            done = store.get_alias("frame", key)
            if done is not None:
                await asyncio.to_thread(archive.add_ready, {job.entry: store.blob_path(done)})
                return done, False
        fut: asyncio.Future[Digest] = asyncio.get_running_loop().create_future()
        flights[key] = fut
        try:
            async with slots:
                if abort.is_set():
                    raise _Aborted
                digest = await asyncio.to_thread(_build_frame, store, job, level, workers, where,
                                                 abort, progress, archive)
            fut.set_result(digest)
            return digest, True
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters decide what to do with it
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if flights.get(key) is fut:
                del flights[key]

    try:
        results = await asyncio.gather(*(one(job) for job in todo), return_exceptions=True)
    except asyncio.CancelledError:
        abort.set()
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    real = [e for e in errors if not isinstance(e, _Aborted | asyncio.CancelledError)]
    if real or errors:
        abort.set()
        raise (real or errors)[0]
    made: dict[Digest, Digest] = {}
    compressed = 0
    for job, r in zip(todo, results, strict=True):
        assert not isinstance(r, BaseException)
        made[job.diff_id] = r[0]
        compressed += r[1]
    return made, compressed


# Frames being made in this process, per store: when two images on one base are packed at
# once, the second waits for the first's frame instead of compressing the same layer again.
_IN_FLIGHT: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Future[Digest]]] = (
    weakref.WeakKeyDictionary())


def _flights(store: PackStore) -> dict[str, asyncio.Future[Digest]]:
    try:
        return _IN_FLIGHT.setdefault(store, {})
    except TypeError:  # a store that cannot be weakly referenced: no sharing, still correct
        return {}


def _usable_cpus() -> int:
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


def iter_archive_frames(store: PackStore, digest: Digest) -> Iterator[bytes]:
    """The decompressed archive (tests, debugging): all frames, in 1 MiB chunks."""
    with store.open_blob(digest) as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True,
                                                            closefd=False)
        while chunk := reader.read(1 << 20):
            yield chunk
