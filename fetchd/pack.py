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

Each layer's frame is made by ``layer_frame.make_layer_frame`` (the blob read and
decompressed exactly once, its diff_id checked while streaming), in a slot of the
``compress_budget.CompressionBudget``; the archive file is assembled by
``archive_writer.ArchiveBuilder``. This module orchestrates them and keeps the frame cache.

Assembly overlaps compression: the archive file is appended in layer order while layers are
compressed, each in a slot of a ``CompressionBudget`` (the daemon shares one among all packs,
so CPU and zstd memory stay bounded however many images are packed at once). Cached
frames are copied in (``copy_file_range``); the first layer still to be made when everything
before it is in writes its output straight into the archive, so the biggest bytes (a
single-layer base image) are written once, never copied, and hashed once (the archive is
hashed in a thread of its own as each entry is completed, ``archive_writer.PrefixHasher``, so
the commit does not read it again); a layer made out of turn goes to a temporary file (unlinked once complete and opened)
and is copied in when its turn comes. A verified frame from the fleet's frame cache at the
archive's start *is* the archive's start (its file appended to, its hash continued). The tail
frame closes the file.

The pack works on a look-ahead window of layers (``_Window``, ``[pack] window``): a layer
starts (looks for a frame in flight or cached, takes a slot, opens its files) only once it is
within ``window_size`` entries of the archive's write position, and cached frames are opened
as the window reaches them. So the files a pack holds follow the layers in progress, not the
image's layer count (a 1000-layer image held ~1000 descriptors before).

Compression may start before a layer is downloaded: with ``follow``, a layer still arriving
is decompressed and compressed as its bytes come in (``LayerStore.open_following``).

Concurrent packs in one process share frames being made (single-flight per store and frame
key): two images on one new base compress that base once; the waiting pack copies the
frame's bytes from the maker's open file (``FrameBytes``, reference counted).

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
- a layer outside its pack's window holds nothing: no slot, no file, no single-flight entry
  (so no pack ever waits for a layer that waits for another pack's window);
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
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, cast

import zstandard

from .archive_format import archive_tail, qualified_repo_tag
from .archive_writer import Aborted, ArchiveBuilder, FrameBytes, GivenFrame
from .compress_budget import CompressionBudget, CompressionSlot, check_level, compressor
from .config import PackConfig
from .digest import BlobSpan, Digest
from .errors import DigestMismatch, ManifestInvalid, store_error
from .layer_frame import DEFAULT_LIMITS, LayerJob, ProgressSink, make_layer_frame
from .manifest import ImageManifest, parse_config

__all__ = [
    "ARCHIVE_MEDIA_TYPE", "FRAME_MEDIA_TYPE", "FollowSource", "PackResult", "PackStore",
    "STAGGER", "ProgressSink", "archive_key", "frame_key", "pack_image", "window_size",
]

ARCHIVE_MEDIA_TYPE = "application/x-docker-archive+zstd"
FRAME_MEDIA_TYPE = "application/vnd.fetchd.tar-member+zstd"

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
                    lease: str | None = None,
                    hashed: tuple[Digest, int] | None = None) -> Digest: ...

    def get_frame(self, key: str) -> BlobSpan | None: ...

    def blob_path(self, digest: Digest) -> Path: ...

    def alease(self, digests: Iterable[Digest], holder: str = "") -> AbstractAsyncContextManager[Any]: ...


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


def archive_key(manifest_digest: Digest | str, repo_tag: str, level: int) -> str:
    """The store alias key of a finished archive: ``<manifest digest> <name:tag> <level>``.

    ``repo_tag`` is normalized as RepoTags are (``debian:12`` == ``docker.io/library/debian:12``).
    """
    return f"{manifest_digest} {qualified_repo_tag(repo_tag)} {check_level(level)}"


def frame_key(diff_id: Digest, level: int) -> str:
    return f"{diff_id}@{level}"


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

    async def wait_for_bytes(self, digest: Digest, at_least: int) -> None:
        """On the event loop: return once ``at_least`` bytes can be read without waiting,
        or the download ended, or the source cannot tell (then the reader waits)."""
        ...

STAGGER = 64  # per-layer steps (events, tasks started) per turn of the event loop (pull too)
_WAKE = 0.05  # seconds between looks at ``abort`` while a reader waits for bytes
_START_BYTES = 64 << 10  # a following layer asks for a slot once this much (or all) is in


class _FollowReader:
    """A blocking reader (for a worker thread) over an async byte stream of the event loop.

    Each ``read`` returns (part of) the stream's next chunk, asking the loop for it and
    blocking until it comes; ``bytes_ready`` asks for it ahead. At most one chunk is in
    flight and one held, so memory stays flat whatever the layer size. While it waits it
    looks at ``abort`` every 50 ms (the download may stall; the pack may be stopped meanwhile).
    """

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop,
                 abort: threading.Event) -> None:
        self._chunks = chunks
        self._loop = loop
        self._abort = abort
        self._buf = b""
        self._eof = False
        self._task: asyncio.Task[Any] | None = None
        self._ahead: concurrent.futures.Future[bytes | None] | None = None

    async def _next(self) -> bytes | None:
        self._task = asyncio.current_task()
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        finally:
            self._task = None

    def _fetch(self) -> concurrent.futures.Future[bytes | None]:
        if self._abort.is_set() or self._loop.is_closed():
            raise Aborted
        try:
            return asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        except RuntimeError:  # the loop is closed
            raise Aborted from None

    def bytes_ready(self) -> bool:
        """Whether a ``read`` now returns without waiting (asks for the next chunk ahead)."""
        if self._buf or self._eof:
            return True
        if self._ahead is None:
            self._ahead = self._fetch()
        return self._ahead.done()

    def _pull(self) -> bytes | None:
        fut = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = None
        while True:
            try:
                return fut.result(timeout=_WAKE)
            except concurrent.futures.TimeoutError:
                if self._abort.is_set() or self._loop.is_closed():
                    raise Aborted from None

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the next chunk (b"" only at the end); all the rest when
        ``n`` < 0."""
        if n < 0:
            parts = [self._buf]
            while not self._eof:
                more = self._pull()
                if more is None:
                    self._eof = True
                else:
                    parts.append(more)
            self._buf = b""
            return b"".join(parts)
        if not self._buf and not self._eof:
            chunk = self._pull()
            if chunk is None:
                self._eof = True
            else:
                self._buf = chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

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


class _ParkingReader:
    """The layer's bytes for its frame worker, which holds the CPU slot only while there are
    bytes to compress: before a read that would wait for the download (``bytes_ready()``
    false), it parks the slot, gathers ``n`` bytes (or the end) without it, then waits to
    resume. A trickling source so costs the others no CPU slot, only its reserved memory.
    """

    def __init__(self, src: Any, slot: CompressionSlot, abort: threading.Event) -> None:
        self._src = src
        self._slot = slot
        self._abort = abort

    def read(self, n: int = -1) -> bytes:
        if n < 0 or self._src.bytes_ready():
            return cast(bytes, self._src.read(n))
        self._slot.park()
        parts: list[bytes] = []
        have = 0
        while have < n:
            chunk = self._src.read(n - have)
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        if not self._slot.resume(self._abort):
            raise Aborted
        return b"".join(parts)


def _build_frame(store: PackStore, job: LayerJob, level: int, threads: int, image_name: str,
                 abort: threading.Event, progress: ProgressSink | None,
                 archive: ArchiveBuilder,
                 source: Callable[[], AbstractContextManager[Any]],
                 cctx: zstandard.ZstdCompressor | None = None,
                 slot: CompressionSlot | None = None,
                 limits: PackConfig = DEFAULT_LIMITS) -> FrameBytes:
    """Make one layer frame and get it into the archive (worker thread); returns the frame's
    bytes (a reference the caller releases), for packs waiting on it and for the cache.

    ``source`` opens the layer's bytes: the blob file, or a reader that follows its download
    and ends cleanly only once the store verified and committed the blob. So a frame is made
    only from a committed blob whose diff_id matched. Nothing is hashed or committed here:
    the frame is cached as a span of the archive when that is committed. With ``slot``, a
    reader that can tell when it would wait for the download (``bytes_ready``) parks the
    slot meanwhile (``_ParkingReader``).
    """
    tmp = store.temp_path(".frame.zst")
    frame: FrameBytes | None = None
    try:
        with source() as opened:
            src = (_ParkingReader(opened, slot, abort)
                   if slot is not None and hasattr(opened, "bytes_ready") else opened)
            size, frame = make_layer_frame(cast(BinaryIO, src), tmp, job, level, threads,
                                           image_name=image_name, abort=abort,
                                           progress=progress, archive=archive, cctx=cctx,
                                           limits=limits)
        if frame is None:  # in its own file: into the archive by copy, when its turn comes
            frame = FrameBytes.open(tmp)
            tmp.unlink()  # the open file keeps the bytes for the archive and waiting packs
            frame.acquire()  # one reference for the archive, one for the caller
            # A discarded archive (the pack stops) drops its reference and raises Aborted;
            # the frame ended cleanly all the same: the caller keeps it as a frame blob.
            with contextlib.suppress(Aborted):
                archive.add_ready({job.entry: frame})
    except BaseException as e:
        if frame is not None:
            frame.release()
        stopped = abort.is_set()  # another layer failed first (or the pack was cancelled)
        abort.set()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if stopped and not isinstance(e, Aborted):
            raise Aborted from e  # the first failure is the one to report, not its echo
        raise
    if progress is not None:
        progress({"state": "layer-done", "diff_id": str(job.diff_id), "bytes": size})
    return frame


def _keep_frames(store: PackStore, level: int, made: Sequence[tuple[LayerJob, FrameBytes]]
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


def _layer_jobs(manifest: ImageManifest, diff_ids: Sequence[Digest], where: str) -> list[LayerJob]:
    if len(diff_ids) != len(manifest.layers):
        raise ManifestInvalid(
            f"{where}: the manifest has {len(manifest.layers)} layers but the config lists "
            f"{len(diff_ids)} diff_ids; the image is inconsistent"
        )
    if not diff_ids:
        raise ManifestInvalid(f"{where}: the image has no layers; nothing to pack")
    jobs: dict[Digest, LayerJob] = {}
    for i, (desc, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
        if diff_id not in jobs:
            jobs[diff_id] = LayerJob(desc, diff_id, i, len(jobs))
    return list(jobs.values())


# --------------------------------------------------------------------------- pack_image


async def pack_image(store: PackStore, manifest: ImageManifest, config_raw: bytes, repo_tag: str,
                     level: int, *, threads: int | None = None,
                     progress: ProgressSink | None = None, image_name: str = "",
                     manifest_digest: Digest | None = None,
                     budget: CompressionBudget | None = None,
                     follow: FollowSource | None = None,
                     lease: str | None = None,
                     frames: Mapping[Digest, GivenFrame] | None = None,
                     owner: object = None, limits: PackConfig = DEFAULT_LIMITS) -> PackResult:
    """The image as a zstd docker-archive in the store (made now, or found in the cache).

    ``frames``: frame files from outside the store, per diff_id, already verified to be
    exactly this level's frame of that layer (``frame_check``; the fleet's frame cache): used
    like cached frames, their layers are not read. The first entry's file becomes the
    archive (``ArchiveBuilder(head=)``: not copied, and its hash continued, not computed
    again); the caller removes what is left of the files (``missing_ok``).

    The layer blobs of ``manifest`` must be in the store (the caller leases them), or, with
    ``follow``, be downloading into it: a layer not in the store when its compression starts
    is read through ``follow`` while its bytes arrive (``LayerStore.open_following``, or
    ``read_following`` bridged into the worker thread).
    A follow that fails fails the pack; every frame and the archive are committed only from
    a stream that ended cleanly, i.e. after the store committed (size and digest verified)
    the blob, and after the layer's diff_id matched.

    Compressions wait for slots of ``budget`` (shared by every pack of the daemon, which
    bounds CPU and memory across images, shared fairly between owners: ``owner`` is the
    requesting peer's uid); without one, this call gets a budget of its own with ``threads``
    (default: usable CPUs) workers. ``limits``: how far a layer may expand (LayerTooLarge,
    decompression bombs). A layer still downloading asks for its slot only once
    bytes are there, and gives back the CPU while its download stalls. ``threads`` never changes the bytes. The archive
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
                                 manifest_digest=manifest_digest, follow=follow, lease=lease,
                                 given=frames or {}, owner=owner, limits=limits)
    except OSError as e:
        raise store_error(e, store.root, f"pack {image_name or repo_tag}") from e


async def _pack_image(store: PackStore, manifest: ImageManifest, config_raw: bytes, repo_tag: str,
                      level: int, *, budget: CompressionBudget, progress: ProgressSink | None,
                      image_name: str, manifest_digest: Digest | None,
                      follow: FollowSource | None, lease: str | None,
                      given: Mapping[Digest, GivenFrame], owner: object,
                      limits: PackConfig) -> PackResult:
    check_level(level)
    where = image_name or repo_tag
    # in a thread: the config's parse, its legacy entries and the tail are per-layer work
    # (about 0.1 ms per layer: 100 ms of the event loop for a 1000-layer image)
    jobs, tail, key = await asyncio.to_thread(_prepare, manifest, config_raw, repo_tag, level,
                                              manifest_digest, where)
    reused = await asyncio.to_thread(_packed_already, store, key, len(jobs))  # index + stat
    if reused is not None:
        _emit(progress, {"state": "done", "digest": str(reused.digest), "size": reused.size,
                         "reused": True})
        return reused

    frames: dict[Digest, BlobSpan | GivenFrame] = {
        **await asyncio.to_thread(_cached_frames, store, jobs, level), **given}  # index reads
    todo = [job for job in jobs if job.diff_id not in frames]
    holder = f"pack {where}"
    loop = asyncio.get_running_loop()
    complete = asyncio.Event()
    window = _Window(window_size(limits, budget.workers))
    head = frames.get(jobs[0].diff_id)  # entry 0 (jobs are in entry order)
    head = head if isinstance(head, GivenFrame) else None
    archive = ArchiveBuilder(store.temp_path(".docker-archive.zst"), len(jobs),
                              lambda: loop.call_soon_threadsafe(complete.set), _fsyncs(store),
                              on_advance=_advance_from_thread(loop, window), head=head)
    window.advance(archive.position)  # a given head is in already

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
        async with store.alease([*(f.digest for f in frames.values() if isinstance(f, BlobSpan)),
                                 *(job.descriptor.digest for job in todo)], holder) as own:
            joined.append(own)  # used only when the caller passed no lease
            for i, job in enumerate(jobs, 1):
                _emit(progress, {"state": "layer", "diff_id": str(job.diff_id),
                                 "reused": job.diff_id in frames})
                if i % STAGGER == 0:
                    await asyncio.sleep(0)  # a turn of the loop for others now and then
            cached = {job.entry: frames[job.diff_id] for job in jobs if job.diff_id in frames
                      and not (head is not None and job.entry == 0)}  # the head is in
            # cached frames at the head go in first, so the first new layer can tee
            await _feed_cached(store, archive, window, cached, first=True)
            made, compressed = await _build_frames(store, todo, level, budget, where, progress,
                                                   archive, follow, owner, limits, window,
                                                   cached)
            try:
                _emit(progress, {"state": "assemble", "layers": len(jobs)})
                digest = await finisher
            finally:
                for frame in made:
                    frame.release()
    except BaseException:
        window.close()
        finisher.cancel()
        archive.discard()
        raise
    path = store.blob_path(digest)
    size = path.stat().st_size
    _emit(progress, {"state": "done", "digest": str(digest), "size": size, "reused": False})
    return PackResult(digest, path, size, compressed, len(jobs) - compressed)


def _prepare(manifest: ImageManifest, config_raw: bytes, repo_tag: str, level: int,
             manifest_digest: Digest | None, where: str) -> tuple[list[LayerJob], bytes, str]:
    """The image's layer jobs, its archive's tail and cache key (config checked against the
    manifest first)."""
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
    return jobs, tail, archive_key(manifest_digest or config_digest, qualified, level)


def _cached_frames(store: PackStore, jobs: Sequence[LayerJob], level: int
                   ) -> dict[Digest, BlobSpan]:
    """The cached frames of ``jobs`` by diff_id (a worker thread: an index read per layer)."""
    frames: dict[Digest, BlobSpan] = {}
    for job in jobs:
        found = store.get_frame(frame_key(job.diff_id, level))
        if found is not None:
            frames[job.diff_id] = found
    return frames


def _finish_archive(store: PackStore, archive: ArchiveBuilder, tail: bytes, key: str,
                    level: int, frame_keys: dict[int, str], lease: str) -> Digest:
    # one thread: the tail is small, and the bytes are the same for any thread count >= 1
    archive.finish(compressor(level, 1).compress(tail))
    assert archive.digest is not None
    hexdigest, size = archive.digest
    spans = [(frame_keys[entry], offset, length)
             for entry, (offset, length) in sorted(archive.spans.items())]
    # hashed while it was assembled: the commit does not read the archive again
    return store.commit_file(archive.path, alias=("archive", key), media_type=ARCHIVE_MEDIA_TYPE,
                             frame_spans=spans, lease=lease,
                             hashed=(Digest("sha256", hexdigest), size))


def _packed_already(store: PackStore, key: str, layers: int) -> PackResult | None:
    """The archive already committed under ``key``; None when there is none (or gc took it)."""
    cached = store.get_alias("archive", key)
    if cached is None:
        return None
    path = store.blob_path(cached)
    try:
        return PackResult(cached, path, path.stat().st_size, 0, layers, archive_reused=True)
    except FileNotFoundError:
        return None


def _add_cached(store: PackStore, archive: ArchiveBuilder,
                frames: Mapping[int, BlobSpan | GivenFrame]) -> None:
    """Cached frames (spans of the store, or given frame files) into the archive (opened
    now: FileNotFoundError if a gc took one)."""
    opened: dict[int, FrameBytes] = {}
    try:
        for entry, span in frames.items():
            opened[entry] = (FrameBytes.open(span.path, 0, span.length)
                             if isinstance(span, GivenFrame) else
                             FrameBytes.open(store.blob_path(span.digest), span.offset,
                                             span.length))
    except BaseException:
        for frame in opened.values():
            frame.release()
        raise
    archive.add_ready(opened)


class _Window:
    """Which entries of one archive may be worked on now: those less than ``size`` entries
    past its write position (``ArchiveBuilder.position``, the next entry to append).

    A layer takes a compression slot, opens its files or holds a finished frame only inside
    the window, so a pack holds descriptors for at most ``size`` layers whatever its layer
    count (the frames made out of turn wait, open, for the archive to reach them). The
    archive's thread reports each advance (``ArchiveBuilder(on_advance=...)`` through
    ``loop.call_soon_threadsafe``): no polling, O(1) per entry that enters.

    No deadlock: the window advances when the entry at the write position is in, and that
    entry never waits for anything outside its pack's window. A layer outside it has taken
    nothing (no slot, no single-flight entry: other packs do not wait for it), and what an
    entry inside waits for (its download, a slot, another pack's frame in flight, which is
    inside that pack's window) progresses without this window moving. ``close`` (the pack
    fails or stops) releases every waiter with ``Aborted``.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.position = 0
        self._closed = False
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    def admits(self, entry: int) -> bool:
        return entry < self.position + self.size

    async def reach(self, entry: int) -> None:
        """Return once ``entry`` is inside the window; Aborted once the window is closed."""
        if self._closed:
            raise Aborted
        if self.admits(entry):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(entry, []).append(fut)
        await fut  # cancelled: the future is dropped with the others when the entry enters

    def advance(self, position: int) -> None:
        """On the event loop: the archive's write position is now ``position``."""
        if position <= self.position:
            return
        entered = range(self.position + self.size, position + self.size)
        self.position = position
        for entry in entered:
            for fut in self._waiters.pop(entry, ()):
                if not fut.done():
                    fut.set_result(None)

    def close(self) -> None:
        """The pack stops: every waiter (and every later ``reach``) raises Aborted."""
        self._closed = True
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(Aborted())
                    fut.exception()  # retrieved: the waiter raises it, or was cancelled


def window_size(limits: PackConfig, workers: int) -> int:
    """Layers a pack works on ahead of its archive's write position: ``[pack] window``, or
    by default 4 x the compression workers and at least 16 (room for every core while a
    few layers wait for their downloads, and for layers of very different sizes)."""
    return limits.window if limits.window > 0 else max(16, 4 * workers)


def _advance_from_thread(loop: asyncio.AbstractEventLoop, window: _Window
                         ) -> Callable[[int], None]:
    def advance(position: int) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(window.advance, position)
    return advance


async def _feed_cached(store: PackStore, archive: ArchiveBuilder, window: _Window,
                       cached: dict[int, BlobSpan | GivenFrame], first: bool = False) -> None:
    """Cached frames (by entry, taken out of ``cached`` as they go in) into the archive,
    each opened only once its entry is inside the window: a batch per advance, opened in a
    worker thread. ``first``: only the batch the window admits now (the head, before any
    layer starts, so the first layer to make can write straight into the archive)."""
    entries = sorted(cached)
    i = 0
    while i < len(entries):
        await window.reach(entries[i])
        batch: dict[int, BlobSpan | GivenFrame] = {}
        while i < len(entries) and window.admits(entries[i]):
            batch[entries[i]] = cached.pop(entries[i])
            i += 1
        await asyncio.to_thread(_add_cached, store, archive, batch)
        if first:
            return


async def _build_frames(store: PackStore, todo: Sequence[LayerJob], level: int,
                        budget: CompressionBudget, where: str, progress: ProgressSink | None,
                        archive: ArchiveBuilder, follow: FollowSource | None,
                        owner: object, limits: PackConfig, window: _Window,
                        cached: dict[int, BlobSpan | GivenFrame]) -> tuple[list[FrameBytes], int]:
    """Make the missing layer frames, each in a slot of ``budget`` taken for ``owner`` once
    the layer is inside ``window`` and has bytes to compress, and get them into the
    archive, with the ``cached`` frames not yet in (``_feed_cached``). Returns the frames
    this call made (references the caller releases once the archive is committed) and how
    many layers it compressed itself (the others were being made by a concurrent pack of
    another image and were waited for, or found cached).

    On the first failure the other layers stop early and that first failure is raised; so
    does cancellation (the worker threads notice ``abort`` within one chunk; the window is
    closed, so layers waiting for it stop too). The frames that ended cleanly before a
    failure are kept as frame blobs (``_keep_frames``).
    """
    abort = threading.Event()
    finished: list[tuple[LayerJob, FrameBytes]] = []  # made, then cancelled: see ``one``
    flights = _flights(store)
    loop = asyncio.get_running_loop()

    def source(digest: Digest) -> Callable[[], AbstractContextManager[Any]]:
        if follow is None:
            return lambda: store.open_blob(digest)
        src = follow

        def following() -> AbstractContextManager[Any]:
            # in the worker thread (a stat per layer is no work for the event loop): the
            # blob, or, still downloading, a reader of the bytes as they arrive
            if store.blob_path(digest).is_file():
                return store.open_blob(digest)
            reader = src.open_following(digest, abort)
            if reader is not None:
                return reader
            return _FollowReader(src.read_following(digest), loop, abort)
        return following

    async def bytes_to_compress(digest: Digest, size: int) -> None:
        # A layer asks for a slot only once it has bytes to compress: a download that has
        # not started or trickles keeps no slot from the others (a blob in the store, or
        # one not downloading here, returns at once: no stat on the loop)
        if follow is not None:
            await follow.wait_for_bytes(digest, min(size, _START_BYTES))

    async def one(job: LayerJob) -> tuple[FrameBytes | None, bool]:
        try:
            # Nothing before this: outside the window a layer holds no file, no slot and no
            # single-flight entry (another pack waiting for it could wait on this window)
            await window.reach(job.entry)
            return await make(job)
        except BaseException:
            window.close()  # the pack fails: the layers waiting for the window stop too
            raise

    async def make(job: LayerJob) -> tuple[FrameBytes | None, bool]:
        key = frame_key(job.diff_id, level)
        while True:
            other = flights.get(key)
            if other is not None:
                await asyncio.wait([other])
                shared = (other.result() if not other.cancelled() and other.exception() is None
                          else None)
                if shared is not None and shared.acquire():
                    await asyncio.to_thread(archive.add_ready, {job.entry: shared})
                    return None, False
                # else that pack failed or stopped (maybe over another layer): look again
            # a concurrent pack may have committed this frame since pack_image looked (the
            # index is read in a thread: a pack may start making it meanwhile, look again)
            cached = await asyncio.to_thread(store.get_frame, key)
            if cached is not None:
                try:
                    await asyncio.to_thread(_add_cached, store, archive, {job.entry: cached})
                    return None, False
                except FileNotFoundError:
                    pass  # a gc took it before this pack could open it: make the frame again
            if key not in flights:
                break
        fut: asyncio.Future[FrameBytes] = asyncio.get_running_loop().create_future()
        flights[key] = fut
        try:
            blob = job.descriptor.digest
            await bytes_to_compress(blob, job.descriptor.size)
            async with budget.slot(level, owner) as slot:
                if abort.is_set():
                    raise Aborted
                threads = slot.threads
                cctx = slot.compressor()
                work = asyncio.ensure_future(_in_thread(
                    _build_frame, store, job, level, threads, where, abort, progress, archive,
                    source(blob), cctx, slot, limits))
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
                        # it ended cleanly before the cancellation reached this task:
                        # _settle keeps it like the frames of the tasks that returned
                        finished.append((job, work.result()))
                    raise
                slot.recycle(cctx)  # its frame ended cleanly
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

    async def feed() -> None:
        try:
            await _feed_cached(store, archive, window, cached)
        except BaseException:
            abort.set()
            window.close()
            raise

    tasks: list[asyncio.Task[tuple[FrameBytes | None, bool]]] = []
    feeding = [asyncio.ensure_future(feed())] if cached else []
    for feeder in feeding:
        feeder.add_done_callback(_retrieve)
    if not todo and not feeding:
        return [], 0
    try:
        for i, job in enumerate(todo, 1):
            tasks.append(asyncio.ensure_future(one(job)))
            if i % STAGGER == 0:
                # the first steps of a thousand tasks in one turn held the loop for ms
                await asyncio.sleep(0)
        await asyncio.wait([*tasks, *feeding])
    except asyncio.CancelledError:
        # The pull cancels its pack when a download fails: the frames that ended cleanly
        # stay cached all the same (every task ends: ``one`` waits for its worker).
        abort.set()
        window.close()
        for task in tasks:
            task.cancel()
        for feeder in feeding:
            feeder.cancel()
        await asyncio.shield(_settle(store, level, todo[:len(tasks)], tasks, keep=True,
                                     finished=finished))
        raise
    results = [asyncio.CancelledError() if t.cancelled() else t.exception() or t.result()
               for t in tasks]
    errors = [r for r in results if isinstance(r, BaseException)]
    errors += [e for t in feeding if (e := asyncio.CancelledError() if t.cancelled()
                                      else t.exception()) is not None]
    real = [e for e in errors if not isinstance(e, Aborted | asyncio.CancelledError)]
    if errors:
        abort.set()
        await _settle(store, level, todo, tasks, keep=bool(real), finished=finished)
        raise (real or errors)[0]
    compressed = sum(1 for r in results if not isinstance(r, BaseException) and r[1])
    return [r[0] for r in results if not isinstance(r, BaseException) and r[0] is not None], \
        compressed


async def _settle(store: PackStore, level: int, todo: Sequence[LayerJob],
                  tasks: Sequence[asyncio.Future[tuple[FrameBytes | None, bool]]],
                  keep: bool, finished: Sequence[tuple[LayerJob, FrameBytes]] = ()) -> None:
    """A pack that fails: wait for every layer task, keep the frames this pack made that
    ended cleanly (``keep``; as frame blobs, no archive will hold them), release them all.
    ``finished``: frames that ended cleanly in tasks cancelled before they could return."""
    await asyncio.wait(tasks)
    made: list[tuple[LayerJob, FrameBytes]] = list(finished)
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
_IN_FLIGHT: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Future[FrameBytes]]] = (
    weakref.WeakKeyDictionary())


def _flights(store: PackStore) -> dict[str, asyncio.Future[FrameBytes]]:
    try:
        return _IN_FLIGHT.setdefault(store, {})
    except TypeError:  # a store that cannot be weakly referenced: no sharing, still correct
        return {}


class _Workers:
    """Threads for frame workers, kept for the next layer.

    Not the loop's default executor: a frame worker may block for as long as its layer
    downloads, and the downloads' own file writes go through that executor. Not a thread
    per layer: starting a thread blocks the event loop until the new thread runs (about
    1 ms on a loaded host, once per layer of a 1000-layer image before). A thread counts as
    idle again *before* its worker's outcome is handed over (``done``), so the next layer
    never starts a thread while one is about to be free (a ThreadPoolExecutor marks it idle
    only after): there are as many threads as frames were ever made at once (at most the
    compressions a budget lets hold slots, running or parked). Idle threads wait; they are
    daemon threads. Each is named ``fetchd-pack`` while it works, ``fetchd-pack-idle`` else.
    """

    BUSY, IDLE = "fetchd-pack", "fetchd-pack-idle"

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.started = 0  # threads started so far

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` in an idle thread, or a new one; ``job`` calls ``done()`` before it
        hands its outcome over."""
        with self._lock:
            new = self._idle == 0
            if new:
                self.started += 1
            else:
                self._idle -= 1
        self._jobs.put(job)
        if new:
            threading.Thread(target=self._run, name=self.IDLE, daemon=True).start()

    def done(self) -> None:
        """From a job's thread: it takes the next job (the caller's last step follows)."""
        threading.current_thread().name = self.IDLE
        with self._lock:
            self._idle += 1

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            threading.current_thread().name = self.BUSY
            job()


_WORKERS = _Workers()


async def _in_thread(fn: Callable[..., _R], *args: Any) -> _R:
    """``fn(*args)`` in a frame worker thread (``_Workers``). When this returns (or raises
    ``fn``'s error), ``fn`` has returned and its thread is idle again."""
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
        # idle before the awaiting task hears of it: "the pack ended" means "no worker of
        # it still works", and the next layer finds this thread free, whatever the scheduling
        _WORKERS.done()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    _WORKERS.submit(run)
    return await fut


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a background future's outcome as seen (the pack reports its own error)."""
    if not fut.cancelled():
        fut.exception()


def _emit(progress: ProgressSink | None, event: dict[str, Any]) -> None:
    if progress is not None:
        progress(event)
