"""The content-addressed layer store shared by every build on the host.

Layout under ``root``::

    blobs/sha256/<hex>   complete, verified, mode 0444 -- nothing else ever appears here
    ingest/              partial downloads (<alg>-<hex>.part) and their .state sidecars
    tmp/                 locally produced files before commit_file
    locks/               per-digest flock files (single-flight across processes), gc.lock
    quarantine/          blobs that failed verify, moved aside
    index.sqlite         metadata (WAL); see store_index

Invariants:
- A path under ``blobs/`` holds exactly the bytes its name promises: every file got
  there by a rename after fsync and a size and digest check (``ingest.Ingest.commit``,
  ``commit_file``).
- ``fetch`` of a digest runs at most once at a time on the host: one flight per digest
  in this process (tasks share its result or error), a ``flock`` on
  ``locks/<alg>-<hex>.lock`` across processes.
- A blob under a live lease is never removed by ``gc``.
- At most ``max_open_ingests`` downloads of this process hold files open (lock, .part);
  a flight waiting for its turn has opened nothing (its followers wait for its ingest).

The store knows files and digests, nothing of HTTP. Helpers, used only from here:
``ingest`` (the resumable writer, BlobSink), ``store_index`` (sqlite), ``store_follow``
(readers of a blob still downloading), ``store_gc`` (gc and verify).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar, cast

from .digest import BlobSpan, Digest
from .errors import BlobUnknown, DigestMismatch, SizeMismatch, StoreError, store_error
from .ingest import FileLock, Ingest, fsync_dir, hash_file
from .store_follow import CHUNK, Flight, ThreadFollower, follow_flight, follow_other_process
from .store_gc import GcReport, VerifyReport, cap_partials, collect, scan_partials, verify_all
from .store_index import ImageRow, StoreIndex

_T = TypeVar("_T")
log = logging.getLogger("fetchd.store")
_TOUCH_FLUSH_COUNT = 256
_TOUCH_FLUSH_SECONDS = 5.0


@dataclass(frozen=True)
class StoreSettings:
    """Store tuning; ``config`` builds it from the TOML file.

    ``max_size`` None means unbounded (gc then only reaps ingests, tmp files and stale
    metadata). Above ``high_watermark * max_size`` gc evicts least recently used blobs
    down to ``low_watermark * max_size``. ``tag_cache_ttl`` is how long a resolved tag
    counts as fresh (the caller revalidates after that); ``tag_cache_max_age`` is when
    gc forgets it entirely (offline builds may still use a stale entry until then).
    ``max_open_ingests``: downloads of this process that hold their files (the digest's
    lock, the ``.part``) at once; the others wait for a turn before opening anything, so
    the descriptors follow the work in progress, not the layer count of the images asked.
    """

    max_size: int | None = None
    high_watermark: float = 0.9
    low_watermark: float = 0.7
    stale_ingest_age: float = 7 * 24 * 3600.0
    tag_cache_ttl: float = 300.0
    tag_cache_max_age: float = 30 * 24 * 3600.0
    fsync: bool = True
    max_open_ingests: int = 32
    # One uid's idle partial downloads are kept within this many bytes (oldest reaped).
    max_ingest_per_uid: int | None = 16 * 1024**3
    # A waiter of another source cancels a flight that held no new byte for this long
    # (``ensure_blob``); the daemon sets it from network.stall_timeout. 0: never.
    flight_stall_timeout: float = 60.0

    @classmethod
    def from_config(cls, config: object) -> StoreSettings:
        """Copy the fields ``config`` has (e.g. config.StoreConfig); defaults for the rest."""
        if isinstance(config, cls):
            return config
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(config, n) for n in names if hasattr(config, n)})


class BlobSink(Protocol):
    """Where a fetcher writes a blob's bytes (``ingest.Ingest`` implements it).

    ``offset`` is the contiguous prefix already held: the fetch writes [offset, size),
    and may skip the ``held_ranges()`` beyond it (parts an earlier fetch completed).
    """

    @property
    def offset(self) -> int: ...

    def held_ranges(self) -> list[tuple[int, int]]: ...

    async def write_at(self, offset: int, data: bytes) -> None: ...

    async def truncate(self, size: int) -> None: ...


def held_bytes(sink: BlobSink) -> int:
    """The bytes of the blob ``sink`` already holds: its prefix and the parts beyond it."""
    return sink.offset + sum(b - a for a, b in sink.held_ranges())


Fetch = Callable[[BlobSink], Awaitable[None]]


@dataclass(frozen=True)
class TagEntry:
    digest: Digest
    media_type: str
    resolved_at: float


@dataclass(frozen=True)
class BlobInfo:
    digest: Digest
    size: int | None  # None: known metadata, blob not (or no longer) in the store
    media_type: str | None
    diff_id: Digest | None
    last_used: float | None


@dataclass(frozen=True)
class ImageEntry:
    reference: str
    platform: str
    level: int
    manifest_digest: Digest
    archive_digest: Digest
    created: float
    present: bool
    size: int | None = None  # the archive's, None when it is not in the store
    last_used: float | None = None

    def to_json(self) -> dict[str, object]:
        return {"reference": self.reference, "platform": self.platform, "level": self.level,
                "manifest_digest": str(self.manifest_digest),
                "archive_digest": str(self.archive_digest), "created": self.created,
                "present": self.present, "size": self.size, "last_used": self.last_used}


def _digest(value: Digest | str) -> Digest:
    return value if isinstance(value, Digest) else Digest.parse(value)


class LayerStore:
    """Files and digests under one root; see the module docstring for the invariants."""

    def __init__(self, root: Path | str, settings: StoreSettings | object | None = None) -> None:
        """Open (creating if needed) the store at ``root``.

        ``settings`` is a StoreSettings or any object with some of its fields (the
        daemon passes ``config.StoreConfig``); missing fields take the defaults.
        """
        self.root = Path(root)
        self.settings = StoreSettings.from_config(settings) if settings else StoreSettings()
        self._blobs = self.root / "blobs"
        self.ingest_dir = self.root / "ingest"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.quarantine_dir = self.root / "quarantine"
        try:
            for d in (self._blobs / "sha256", self.ingest_dir, self.tmp_dir, self.locks_dir,
                      self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store_error(e, self.root, "create the store directories") from e
        # A store on a read-only filesystem still serves what it holds; writes raise StoreError.
        self.read_only = bool(os.statvfs(self.root).f_flag & os.ST_RDONLY)
        try:
            self.index = StoreIndex(self.root / "index.sqlite", readonly=self.read_only)
        except sqlite3.Error as e:
            raise StoreError(
                f"store {self.root}: cannot open index.sqlite: {e}; check that the store is "
                "writable and on a local filesystem"
            ) from e
        self._flights: dict[Digest, Flight] = {}
        self._private: set[str] = set()
        self._private_leases: set[str] = set()
        # FIFO: downloads get their turn in the order asked (pull asks in pack's order)
        self._ingest_slots = asyncio.Semaphore(max(1, self.settings.max_open_ingests))
        self._touches: dict[str, float] = {}
        self._touch_lock = threading.Lock()
        self._touched_at = time.monotonic()
        self._gc_lock = asyncio.Lock()
        self._gc_task: asyncio.Task[GcReport] | None = None
        try:  # the daemon's loop: commits in worker threads hand the autogc check to it
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._collecting = threading.Lock()  # held by a gc thread while it uses the index
        self._usage = self._index(lambda: self.index.usage())[0]
        self._partial_bytes = sum(p.size for p in scan_partials(self))  # ingest/: partials
        self._partial_scans = self._partial_applied = 0  # see _recount_partials
        self._committed_bytes = 0  # by this process, ever (see gc)
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- paths and presence ------------------------------------------------------------

    def blob_path(self, digest: Digest | str) -> Path:
        d = _digest(digest)
        return self._blobs / d.algorithm / d.hex

    def has(self, digest: Digest | str) -> bool:
        return self.blob_path(digest).is_file()

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path in tmp/ (same filesystem as blobs/, so commit_file renames)."""
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    def _lock(self, digest: Digest) -> FileLock:
        return FileLock(self.locks_dir / f"{digest.algorithm}-{digest.hex}.lock")

    def _part(self, digest: Digest) -> Path:
        return self.ingest_dir / f"{digest.algorithm}-{digest.hex}.part"

    # -- ingest ------------------------------------------------------------------------

    async def ensure_blob(
        self, digest: Digest | str, size: int, fetch: Fetch, media_type: str | None = None,
        source: str | None = None, owner: int | None = None,
    ) -> Path:
        """Return the path of the complete, verified blob, fetching it if needed.

        Single-flight: concurrent callers in this process share one fetch; other processes
        wait on the digest's flock and then find the blob. A partial left by an earlier
        failure or crash is resumed: ``fetch`` sees ``sink.offset > 0``.

        ``source`` names where ``fetch`` gets the bytes (e.g. registry/repository). A caller
        shares the error of a flight from its own source (or when either is unnamed); the
        flight of another source cannot make it fail: when that flight fails, or makes no
        progress for ``flight_stall_timeout`` seconds (then it is cancelled, and its own
        callers fall back in turn), the caller fetches from its own source. Whoever named a
        digest, the bytes are checked against it: a flight's source only decides whose
        failure it is. ``owner`` (a uid) is whom a partial left behind counts against
        (``max_ingest_per_uid``).
        """
        d = _digest(digest)
        path = self.blob_path(d)
        if path.is_file():
            self._touch(d)
            return path
        fallbacks = 0
        while True:
            flight = self._flights.get(d)
            # A flight whose task has ended but whose done-callback has not run yet is over:
            # waiting on it again would return at once, without a turn of the loop, and spend
            # every fallback on the one failure.
            if flight is None or (flight.task is not None and flight.task.done()):
                flight = self._start_flight(d, size, fetch, media_type, source, owner)
            assert flight.task is not None
            # Another source's flight cannot make us fail, within a bound (the same flight
            # cannot fail twice, but new ones could keep starting): then we share its fate.
            foreign = (source is not None and flight.source is not None
                       and flight.source != source and fallbacks < 3)
            try:
                if foreign and await self._wait_foreign(flight):
                    fallbacks += 1
                    log.warning("the download of %s from %s stalled; fetching it from %s",
                                d, flight.source, source)
                    # Ours at once, before its other waiters resume (it waits for the lock).
                    self._start_flight(d, size, fetch, media_type, source, owner)
                    continue
                return await asyncio.shield(flight.task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not flight.preempted or (current is not None and current.cancelling()):
                    raise
                error: BaseException = StoreError(f"the download of {d} stalled and was preempted")
            except Exception as e:
                error = e
            if not (foreign or flight.preempted) or fallbacks >= 3:
                raise error
            fallbacks += 1
            if path.is_file():
                self._touch(d)
                return path
            log.info("the download of %s from %s failed (%s); fetching it from %s",
                     d, flight.source, getattr(error, "code", type(error).__name__), source)

    def _start_flight(self, d: Digest, size: int, fetch: Fetch, media_type: str | None,
                      source: str | None, owner: int | None) -> Flight:
        flight = Flight()
        flight.source = source
        task = asyncio.ensure_future(self._run_flight(flight, d, size, fetch, media_type, owner))
        flight.task = task
        self._flights[d] = flight
        task.add_done_callback(lambda t: self._flight_done(d, flight, t))
        return flight

    async def _wait_foreign(self, flight: Flight) -> bool:
        """Wait for a flight of another source to end; True when it stalled (no new byte in
        ``flight_stall_timeout`` seconds) and was cancelled for that (see ensure_blob)."""
        window = self.settings.flight_stall_timeout
        assert flight.task is not None
        seen = -1
        while not flight.task.done():
            ing = flight.ingest  # None while it waits for its turn (max_open_ingests)
            held = held_bytes(ing) if ing else -1
            if held == seen and held >= 0 and window:
                flight.preempted = True
                flight.task.cancel()
                return True
            seen = held
            await asyncio.wait([flight.task], timeout=window or None)
        return False

    def _flight_done(self, d: Digest, flight: Flight, task: asyncio.Task[Path]) -> None:
        if self._flights.get(d) is flight:
            del self._flights[d]
        if task.cancelled():
            flight.outcome = asyncio.CancelledError(f"the download of {d} was cancelled")
        else:
            flight.outcome = task.exception() or task.result()  # retrieved: waiters may be gone
        flight.notify()

    async def _run_flight(
        self, flight: Flight, d: Digest, size: int, fetch: Fetch, media_type: str | None,
        owner: int | None = None,
    ) -> Path:
        try:
            async with self._ingest_slots:  # nothing is opened before this flight's turn
                path = await self._ingest(flight, d, size, fetch, media_type, owner)
        except asyncio.CancelledError:
            self._in_background(self._partials_changed(owner))
            raise
        except Exception:
            # Before its callers hear of the failure: what it left behind is within the caps.
            with contextlib.suppress(Exception):
                await self._partials_changed(owner)
            raise
        self._in_background(self._partials_changed(owner))
        return path

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    async def _partials_changed(self, owner: int | None) -> None:
        """After a flight: keep ``owner``'s idle partials within ``max_ingest_per_uid``,
        re-count the bytes in ingest/ (they are part of the store's size) and gc if needed."""
        if self._closed:
            return
        cap = self.settings.max_ingest_per_uid

        def work() -> int:
            partials = scan_partials(self)
            reaped, freed = cap_partials(self, partials, owner, cap)
            if reaped:
                log.warning("uid %s left %d bytes more than store.max_ingest_per_uid (%s) in "
                            "partial downloads: removed the %d oldest idle ones", owner, freed,
                            cap, reaped)
            return sum(p.size for p in partials) - freed

        await self._recount_partials(work)
        self._maybe_autogc()

    async def _recount_partials(self, count: Callable[[], int]) -> None:
        """``_partial_bytes`` from ``count`` (a scan of ingest/, in a thread), unless a scan
        that began later was applied first: a stale count (a partial since committed) never
        overwrites a newer one."""
        self._partial_scans += 1
        scan = self._partial_scans
        total = await asyncio.to_thread(count)
        if scan > self._partial_applied:
            self._partial_applied = scan
            self._partial_bytes = total

    async def _ingest(
        self, flight: Flight, d: Digest, size: int, fetch: Fetch, media_type: str | None,
        owner: int | None = None,
    ) -> Path:
        path = self.blob_path(d)
        if path.is_file():  # another process committed it while this flight waited
            self._touch(d)
            return path
        try:
            lock = self._lock(d)
            await lock.acquire()
        except OSError as e:
            raise store_error(e, self.root, f"lock {d} for ingest") from e
        try:
            if path.is_file():  # another process finished it while we waited
                self._touch(d)
                return path
            if d.algorithm != "sha256":
                path.parent.mkdir(exist_ok=True)
            ing = await Ingest.open(self.root, self._part(d), d, size, self.settings.fsync,
                                    self._mode(d), owner)
            ing.on_change = flight.notify
            flight.ingest = ing
            flight.notify()
            try:
                await fetch(ing)
                await ing.commit(path)
            except (DigestMismatch, SizeMismatch, StoreError):
                await ing.quiesce()
                ing.discard()
                raise
            except BaseException:
                # Also after a cancellation: threads may still write through the fd. If
                # this wait is interrupted too, the fd leaks rather than being closed early.
                await ing.quiesce()
                if ing.failure is not None:  # the store failed under the fetcher
                    ing.discard()
                    raise ing.failure from None
                ing.suspend()
                raise
        finally:
            # Unlinked while held: lock files do not pile up, and FileLock's inode check
            # makes a waiter that opened the old file try again on a fresh one.
            lock.release(unlink=True)
        # the index write in a thread (a gc's transaction must not stall the loop), and
        # carried through if this task is cancelled meanwhile: the blob is in blobs/ already
        await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(
            self._record_commit, d, size, media_type)))
        self._count_commit(size)
        return path

    # -- private blobs: 0400 instead of 0444 (config: registries.<host>.private) ----------

    def restrict(self, digests: Iterable[Digest | str] = (), lease: str | None = None) -> None:
        """Keep these blobs (and what is committed under ``lease``) out of world-readable files.

        Blobs committed from now on get mode 0400 (only the daemon's user reads them); those
        already in the store are chmodded now. In memory for this store object: the puller
        names them again on every pull of a private image, before anything is committed.
        """
        keys = {str(d) for d in digests}
        self._private.update(keys)
        if lease is not None:
            self._private_leases.add(lease)
        for key in keys:
            with contextlib.suppress(OSError):
                path = self.blob_path(_digest(key))
                if os.stat(path).st_mode & 0o044:
                    os.chmod(path, 0o400)

    def end_restriction(self, lease: str) -> None:
        """``lease`` has ended: forget it (its blobs keep their mode)."""
        self._private_leases.discard(lease)

    def _mode(self, d: Digest, lease: str | None = None) -> int:
        private = str(d) in self._private or (lease is not None and lease in self._private_leases)
        return 0o400 if private else 0o444

    def _committed(self, d: Digest, size: int, media_type: str | None,
                   alias: tuple[str, str] | None = None,
                   frame_spans: Sequence[tuple[str, int, int]] = ()) -> None:
        self._record_commit(d, size, media_type, alias, frame_spans)
        self._count_commit(size)

    def _record_commit(self, d: Digest, size: int, media_type: str | None,
                       alias: tuple[str, str] | None = None,
                       frame_spans: Sequence[tuple[str, int, int]] = ()) -> None:
        self._index(lambda: self.index.add_blob(str(d), size, time.time(), alias, frame_spans,
                                                media_type))

    def _count_commit(self, size: int) -> None:
        self._usage += size
        self._committed_bytes += size
        self._maybe_autogc()

    # -- reading -----------------------------------------------------------------------

    def open_blob(self, digest: Digest | str) -> BinaryIO:
        """Open a complete, verified blob for reading; records its use (batched)."""
        d = _digest(digest)
        try:
            f = open(self.blob_path(d), "rb")  # noqa: SIM115 -- the caller closes it
        except FileNotFoundError:
            raise BlobUnknown(
                f"blob {d} is not in the store at {self.root}; fetch it again"
            ) from None
        self._touch(d)
        return f

    async def read_following(self, digest: Digest | str,
                             verify: bool = True) -> AsyncIterator[bytes]:
        """Yield the blob's bytes, following an ingest in progress (this process or another).

        Bytes are yielded as the ingest's hashed prefix grows, before the commit; the
        iterator raises (DigestMismatch, or the ingest's error) unless the bytes it yielded
        are the blob the store committed: trust them only if iteration ends cleanly. It
        proves that by hashing what it yields; with ``verify=False``, an ingest of this
        process is trusted instead (its commit verifies the very bytes read; see
        ``store_follow``), which saves hashing every byte twice.
        A complete blob is streamed from its file. BlobUnknown when it is neither present
        nor being downloaded.
        """
        d = _digest(digest)
        flight = self._flights.get(d)
        if flight is None and not self.has(d):
            await asyncio.sleep(0)  # let a just-created ensure_blob task register
            flight = self._flights.get(d)
        if flight is not None:
            source = follow_flight(flight, d, verify)
        elif self.has(d):
            source = self._stream(d)
        else:
            source = follow_other_process(d, self._part(d), self.blob_path(d), self._lock(d),
                                          lambda: self.has(d), self.root)
        async for chunk in source:
            yield chunk

    async def wait_for_bytes(self, digest: Digest | str, at_least: int) -> None:
        """Return once ``at_least`` bytes of the blob are readable (its download in this
        process has hashed that far), or its download ended (committed or failed: a reader
        then says which), or no download of it runs in this process (nothing to wait on
        here). Woken by the ingest's writes: no polling, O(1) per wake-up.
        """
        d = _digest(digest)
        while True:
            flight = self._flights.get(d)
            if flight is None or flight.outcome is not None or (
                    flight.task is not None and flight.task.done()):
                return
            ing = flight.ingest
            if ing is not None and ing.offset >= at_least:
                return
            await flight.wait()

    def open_following(self, digest: Digest | str, stop: threading.Event) -> BinaryIO | None:
        """For a worker thread: a blocking reader of the blob, following this process's
        ingest of it (``store_follow.ThreadFollower``: no event loop hop per chunk), or the
        complete blob's file. None when neither (another process ingests it, or nothing
        yet): use ``read_following`` then. The reader raises once ``stop`` is set.
        """
        d = _digest(digest)
        flight = self._flights.get(d)
        if flight is not None:
            return cast(BinaryIO, ThreadFollower(flight, d, stop))
        try:
            return self.open_blob(d)
        except BlobUnknown:
            return None

    async def _stream(self, d: Digest) -> AsyncIterator[bytes]:
        with self.open_blob(d) as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk

    # -- local files -------------------------------------------------------------------

    def commit_file(
        self,
        tmp: Path,
        digest: Digest | None = None,
        alias: tuple[str, str] | None = None,
        media_type: str | None = None,
        frame_spans: Sequence[tuple[str, int, int]] = (),
        lease: str | None = None,
        hashed: tuple[Digest, int] | None = None,
    ) -> Digest:
        """Move a locally produced file into blobs/ and record ``alias`` -> its digest, and
        the ``frame_spans`` (``(key, offset, length)``) it holds (see ``get_frame``).

        ``lease`` (an id ``lease()`` yielded) gets the blob before it becomes visible: no gc
        can take it between its commit and the end of that lease.

        Hashes the file (and checks ``digest`` when given): blocking, so call it from a
        thread (``asyncio.to_thread``) for big files. ``hashed``: the file's (digest, size)
        as this process computed it from the very bytes it wrote (the packer hashes its
        archive while assembling it): the file is not read again, only its size checked.
        ``tmp`` is gone afterwards, also on a digest or size mismatch.
        """
        try:
            if hashed is not None:
                d, size = hashed
                actual = tmp.stat().st_size
                if actual != size:
                    tmp.unlink(missing_ok=True)
                    raise DigestMismatch(f"local file {tmp.name}: {actual} bytes, {size} were "
                                         "hashed while it was written; nothing was kept")
            else:
                d, size = hash_file(tmp, digest.algorithm if digest else "sha256")
            if digest is not None and d != digest:
                tmp.unlink(missing_ok=True)
                raise DigestMismatch(
                    f"local file {tmp.name}: hashes to {d}, expected {digest}; nothing was kept"
                )
            if lease is not None:
                self._index(lambda: self.index.add_lease(lease, "commit", [str(d)], time.time()))
            dest = self.blob_path(d)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, self._mode(d, lease))
            if dest.is_file():
                tmp.unlink()  # same content already there: "already exists" is success
            else:
                if self.settings.fsync:
                    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.replace(tmp, dest)
                if self.settings.fsync:
                    fsync_dir(dest.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise store_error(e, self.root, f"commit {tmp.name}") from e
        self._committed(d, size, media_type, alias, frame_spans)
        return d

    def commit_bytes(
        self, data: bytes, digest: Digest | None = None, media_type: str | None = None
    ) -> Digest:
        """``commit_file`` for content held in memory (a manifest, a config), hashed in
        memory (the file is not read back). Blocking."""
        hasher = digest.hasher() if digest is not None else hashlib.sha256()
        hasher.update(data)
        hashed = (Digest(digest.algorithm if digest else "sha256", hasher.hexdigest()), len(data))
        tmp = self.temp_path()
        try:
            tmp.write_bytes(data)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise store_error(e, self.root, f"write {digest or 'a blob'}") from e
        return self.commit_file(tmp, digest, media_type=media_type, hashed=hashed)

    async def acommit_file(
        self,
        tmp: Path,
        digest: Digest | None = None,
        alias: tuple[str, str] | None = None,
        media_type: str | None = None,
    ) -> Digest:
        """``commit_file`` in a thread."""
        return await asyncio.to_thread(self.commit_file, tmp, digest, alias, media_type)

    # -- metadata ----------------------------------------------------------------------

    def _index(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except sqlite3.Error as e:
            raise StoreError(
                f"store {self.root}: index.sqlite failed: {e}; check that the store is "
                "writable, then retry (run `fetchd verify` if it persists)"
            ) from e

    def put_alias(self, kind: str, key: str, digest: Digest) -> None:
        self._index(lambda: self.index.put_alias(kind, key, str(digest), time.time()))

    def get_alias(self, kind: str, key: str) -> Digest | None:
        """The digest recorded for (kind, key), or None if unknown or its blob is gone."""
        text = self._index(lambda: self.index.get_alias(kind, key))
        if text is None:
            return None
        d = Digest.parse(text)
        return d if self.has(d) else None

    def get_frame(self, key: str) -> BlobSpan | None:
        """Where the cached pack frame ``key`` is: a blob of its own (``("frame", key)``
        alias), or a span of an archive that holds it; None if unknown or its blob is gone."""
        own = self.get_alias("frame", key)
        if own is not None:
            try:
                return BlobSpan(own, 0, self.blob_path(own).stat().st_size)
            except FileNotFoundError:
                return None
        span = self._index(lambda: self.index.get_frame_span(key))
        if span is None:
            return None
        d = Digest.parse(span[0])
        return BlobSpan(d, span[1], span[2]) if self.has(d) else None

    def get_frames(self, keys: Iterable[str]) -> dict[str, BlobSpan]:
        """``get_frame`` for many keys: one index read for all of them (blocking: call it
        from a thread when there are many). Keys without a frame are left out."""
        wanted = list(dict.fromkeys(keys))
        own, spans = self._index(lambda: self.index.frames(wanted))
        out: dict[str, BlobSpan] = {}
        for key in wanted:
            if key in own:
                d = Digest.parse(own[key])
                try:
                    out[key] = BlobSpan(d, 0, self.blob_path(d).stat().st_size)
                    continue
                except FileNotFoundError:
                    pass  # gone: a span of an archive may still hold it
            if key in spans:
                text, offset, length = spans[key]
                d = Digest.parse(text)
                if self.has(d):
                    out[key] = BlobSpan(d, offset, length)
        return out

    def record_blob_infos(
        self, items: Iterable[tuple[Digest, str | None, Digest | None]]
    ) -> None:
        """``record_blob_info`` for many ``(digest, media_type, diff_id)``: one transaction."""
        rows = [(str(d), media_type, str(diff_id) if diff_id else None)
                for d, media_type, diff_id in items]
        self._index(lambda: self.index.set_infos(rows))

    def record_tag(self, name: str, tag: str, digest: Digest, media_type: str) -> None:
        self._index(lambda: self.index.put_tag(name, tag, str(digest), media_type, time.time()))

    def lookup_tag(self, name: str, tag: str) -> TagEntry | None:
        row = self._index(lambda: self.index.get_tag(name, tag))
        if row is None:
            return None
        return TagEntry(Digest.parse(row[0]), row[1], row[2])

    def record_blob_info(
        self, digest: Digest, media_type: str | None = None, diff_id: Digest | None = None
    ) -> None:
        self._index(lambda: self.index.set_info(
            str(digest), media_type, str(diff_id) if diff_id else None))

    def blob_info(self, digest: Digest) -> BlobInfo | None:
        """What the index knows of ``digest`` (None if nothing).

        ``media_type`` and ``diff_id`` are hints: any image's manifest may name any digest
        with any type, so they are shown, never decided on (a manifest's type comes from its
        own verified bytes, a layer's diff_id from the image config being packed).
        """
        row = self._index(lambda: self.index.blob_row(str(digest)))
        media_type, diff_id = self._index(lambda: self.index.info(str(digest)))
        if row is None and media_type is None and diff_id is None:
            return None
        return BlobInfo(
            digest=_digest(digest),
            size=row.size if row else None,
            media_type=media_type,
            diff_id=Digest.parse(diff_id) if diff_id else None,
            last_used=row.last_used if row else None,
        )

    def digests_with_diff_id(self, diff_id: Digest) -> list[Digest]:
        rows = self._index(lambda: self.index.digests_by_diff_id(str(diff_id)))
        return [Digest.parse(r) for r in rows]

    def record_image(
        self, reference: str, platform: str, manifest_digest: Digest,
        archive_digest: Digest, level: int,
    ) -> None:
        row = ImageRow(reference, platform, level, str(manifest_digest),
                       str(archive_digest), time.time())
        self._index(lambda: self.index.put_image(row))

    def list_images(self) -> list[ImageEntry]:
        """The archives the store has made, with their size and last use: one index query
        (and a stat per archive, the files being the truth about what is present)."""
        out = []
        blobs = os.fspath(self._blobs)
        for r, size, last_used in self._index(self.index.images_with_blobs):
            archive = Digest.parse(r.archive_digest)
            # a stat by string: thousands of archives, no Path objects made for them
            present = os.path.isfile(f"{blobs}/{archive.algorithm}/{archive.hex}")
            out.append(ImageEntry(r.reference, r.platform, r.level,
                                  Digest.parse(r.manifest_digest), archive, r.created,
                                  present, size if present else None,
                                  last_used if present else None))
        return out

    def usage(self) -> tuple[int, int]:
        """(bytes, count): the bytes of the blobs the index knows (gc reconciles it with the
        disk) and of the partial downloads in ingest/ (as of the last flight's end or gc),
        and the count of blobs."""
        size, count = self._index(self.index.usage)
        return size + self._partial_bytes, count

    @contextlib.contextmanager
    def lease(self, digests: Iterable[Digest], holder: str = "") -> Iterator[str]:
        """Protect ``digests`` from gc (in every process) while the block runs.

        A lease of a digest not yet in the store is fine: take it before ensure_blob.
        Leases of a process that died are ignored and dropped.
        """
        lease_id = uuid.uuid4().hex
        self._add_lease(lease_id, holder, digests)
        try:
            yield lease_id
        finally:
            self._drop_lease(lease_id)

    @contextlib.asynccontextmanager
    async def alease(self, digests: Iterable[Digest], holder: str = "") -> AsyncIterator[str]:
        """``lease`` for the event loop: its two index writes run in a worker thread, so a
        long write transaction of another thread or process (a gc) makes the caller wait,
        never the loop. The lease is dropped also when the block is cancelled."""
        lease_id = uuid.uuid4().hex
        keys = list(digests)
        adding = asyncio.ensure_future(asyncio.to_thread(self._add_lease, lease_id, holder, keys))

        def drop_once_in(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is None:
                self._in_background(asyncio.to_thread(self._drop_lease, lease_id))

        try:
            await asyncio.shield(adding)
        except asyncio.CancelledError:
            adding.add_done_callback(drop_once_in)  # the add runs on in its thread
            raise
        try:
            yield lease_id
        finally:
            await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(self._drop_lease, lease_id)))

    def _add_lease(self, lease_id: str, holder: str, digests: Iterable[Digest]) -> None:
        keys = [str(d) for d in digests]
        self._index(lambda: self.index.add_lease(lease_id, holder, keys, time.time()))

    def _drop_lease(self, lease_id: str) -> None:
        self._index(lambda: self.index.drop_lease(lease_id))

    def _touch(self, d: Digest) -> None:
        with self._touch_lock:
            self._touches[str(d)] = time.time()
            due = (len(self._touches) >= _TOUCH_FLUSH_COUNT
                   or time.monotonic() - self._touched_at >= _TOUCH_FLUSH_SECONDS)
        if due:
            self.flush_uses()

    def flush_uses(self) -> None:
        """Write the batched last-use times to the index."""
        with self._touch_lock:
            pending, self._touches = self._touches, {}
            self._touched_at = time.monotonic()
        if pending:
            try:
                self.index.touch(pending.items())
            except sqlite3.Error:
                pass  # last use is a hint for LRU only; never fail a read for it

    # -- gc and verify (store_gc does the work in a thread) ----------------------------

    def _over_high_watermark(self) -> bool:
        limit = self.settings.max_size
        return (limit is not None
                and self._usage + self._partial_bytes > limit * self.settings.high_watermark)

    def _maybe_autogc(self) -> None:
        if not self._over_high_watermark():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # a commit in a worker thread (a pack's archive): check again on the store's loop
            if self._loop is not None and not self._closed:
                with contextlib.suppress(RuntimeError):  # that loop has closed
                    self._loop.call_soon_threadsafe(self._maybe_autogc)
            return
        if self._gc_task is not None and not self._gc_task.done():
            return  # it checks the watermark again when it ends
        self._gc_task = loop.create_task(self._autogc())
        self._gc_task.add_done_callback(
            lambda t: None if t.cancelled() else t.exception())

    async def _autogc(self) -> GcReport:
        """gc down to the low watermark; again while commits that landed during one left the
        store above the high watermark (as long as the last one freed something: what is
        leased stays)."""
        while True:
            report = await self.gc()
            if report.freed_bytes == 0 or not self._over_high_watermark():
                return report

    async def gc(self, max_size: int | None = None) -> GcReport:
        """Evict LRU unleased blobs (see StoreSettings), reap stale ingests and metadata."""
        async with self._gc_lock:
            self.flush_uses()
            committed = self._committed_bytes
            report = await self._store_errors("collect garbage", asyncio.to_thread(
                self._collect, max_size))
            # what the index held at the end, plus this process's commits since gc began
            # (some may be counted twice: an estimate errs on the side of another gc)
            self._usage = report.remaining_bytes + self._committed_bytes - committed
            await self._recount_partials(lambda: sum(p.size for p in scan_partials(self)))
            return report

    def _collect(self, max_size: int | None) -> GcReport:
        """``collect`` in a worker thread; ``close`` waits for it (it uses the index)."""
        with self._collecting:
            if self._closed:
                raise StoreError(f"store {self.root} was closed; nothing was collected")
            return collect(self, max_size)

    async def verify(self) -> VerifyReport:
        """Re-hash every blob; corrupt ones move to quarantine/ (and will be re-fetched)."""
        return await self._store_errors("verify blobs", verify_all(self))

    async def _store_errors(self, what: str, work: Awaitable[_T]) -> _T:
        """``work``'s result; file system and index failures as StoreError naming the store."""
        try:
            return await work
        except OSError as e:
            raise store_error(e, self.root, what) from e
        except sqlite3.Error as e:
            raise StoreError(f"store {self.root}: cannot {what}: index.sqlite failed: {e}; "
                             "check that the store is writable") from e

    async def stop_downloads(self) -> None:
        """Cancel every download in flight and wait until each has ended: its partial is
        suspended with its state saved (what reached this process written), so the next
        daemon resumes it. For a daemon that is stopping; ``close`` after it."""
        tasks = [f.task for f in self._flights.values() if f.task is not None and not f.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for flight in list(self._flights.values()):
            if flight.task is not None:
                flight.task.cancel()
        if self._gc_task is not None:
            self._gc_task.cancel()  # its thread runs on: wait for it before closing the index
        with self._collecting:
            self.flush_uses()
            self.index.close()


__all__ = [
    "BlobInfo", "BlobSink", "Fetch", "GcReport", "ImageEntry", "LayerStore", "held_bytes",
    "StoreSettings", "TagEntry", "VerifyReport",
]
