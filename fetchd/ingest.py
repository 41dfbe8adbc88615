"""The ingest writer: a partial blob in ``ingest/`` that hashes itself as it grows.

Invariants:
- ``offset`` is the length of the contiguous prefix that is written *and* hashed;
  bytes beyond it (parallel ranges written out of order) are hashed by reading them
  back from the file once the prefix reaches them, in a thread.
- A write never changes bytes inside the hashed prefix (such writes are trimmed), so
  the hash always describes the bytes on disk.
- The sidecar ``.state`` file records the prefix length and the extents written beyond
  it (parallel parts), all bytes that are on disk (rewritten atomically every 2 MiB of
  progress and on suspend). After a crash the next ingest re-hashes that prefix, hashes
  the recorded extents that continue it, and keeps the others as ``held_ranges()``: a
  resumed fetch asks only for the gaps. Bytes on disk outside the record are dropped or
  rewritten; nothing is trusted before the commit's digest check anyway.
- ``commit`` is the only way into ``blobs/``: fsync, size and digest check, chmod 0444,
  rename, fsync of the directory.

File I/O runs in threads (``asyncio.to_thread``); the event loop only keeps books.
Only ``layer_store`` uses this module.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .digest import Digest
from .errors import DigestMismatch, SizeMismatch, store_error

_READ_CHUNK = 4 << 20
_PARALLEL_HASH = 256 << 10  # writes at least this big hash in a second thread meanwhile
_STATE_EVERY = 2 << 20  # bytes of progress between sidecar updates (lost on SIGKILL at most)

class FileLock:
    """An exclusive ``flock`` on a lock file, polled so that waiting stays cancellable.

    The inode check after locking makes it safe for gc to unlink lock files it holds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # unlinked by gc between open and flock: lock the new file

    async def acquire(self) -> None:
        """Wait for the lock. Each try (open with O_CREAT, flock, two stats: file system
        work, slow on a busy disk) runs in a worker thread, off the event loop; a try that
        won just as the wait was cancelled gives the lock back."""
        delay = 0.002
        while True:
            attempt = asyncio.ensure_future(asyncio.to_thread(self.try_acquire))
            try:
                got = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                attempt.add_done_callback(self._undo)
                raise
            if got:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _undo(self, attempt: asyncio.Future[bool]) -> None:
        if not attempt.cancelled() and attempt.exception() is None and attempt.result():
            self.release()

    def release(self, unlink: bool = False) -> None:
        if self._fd is None:
            return
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def hash_file(path: Path, algorithm: str = "sha256") -> tuple[Digest, int]:
    """(digest, size) of a file, read in chunks (blocking: run it in a thread)."""
    h = hashlib.new(algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Digest(algorithm, h.hexdigest()), size


def _forget(pending: set[asyncio.Future[object]]) -> Callable[[asyncio.Future[object]], None]:
    def done(fut: asyncio.Future[object]) -> None:
        pending.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: its caller may have been cancelled
    return done


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ingest:
    """A partial blob; implements the ``BlobSink`` protocol for fetchers.

    Create with ``await Ingest.open(...)`` while holding the digest's lock.
    """

    def __init__(self, root: Path, part: Path, digest: Digest, size: int, fsync: bool) -> None:
        self.root = root
        self.part = part
        self.state_path = part.with_suffix(".state")
        self.digest = digest
        self.size = size
        self._fsync = fsync
        # The committed blob's mode: 0444, or 0400 for a private registry's blob (the store
        # sets it before the commit; see LayerStore.restrict).
        self.mode = 0o444
        self.owner: int | None = None
        self._fd = -1
        self._hash = digest.hasher()
        # Contiguous bytes held (written and hashed): where a resumed fetch starts.
        # Fetchers read it; only this class changes it.
        self.offset = 0
        # Bytes below the floor are held or being hashed right now: writes never touch them.
        self._floor = 0
        self._state_at = 0  # bytes held (prefix + extents) when the sidecar was last written
        self._state_lock = threading.Lock()  # sidecar writers run in threads
        self._state_fd = -1  # the sidecar, rewritten in place (see _save_state)
        self._state_len = 0  # its length on disk
        self._extents: list[tuple[int, int]] = []  # disjoint, sorted, all above the prefix
        self._advancing = False
        self._writes = 0  # writes in flight
        self.resumed_from = 0
        self.bytes_written = 0
        # Times the hashed prefix was cut back (``truncate``): the only way bytes a follower
        # already read from the prefix can change; see ``store_follow.follow_flight``.
        self.rewrites = 0
        self.failure: BaseException | None = None  # a StoreError/SizeMismatch raised to the fetcher
        self._changed = asyncio.Event()
        self._pending: set[asyncio.Future[object]] = set()  # thread work still running
        self.on_change: Callable[[], None] | None = None  # the store's flight listens here

    # -- BlobSink ----------------------------------------------------------------------

    def held_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges beyond ``offset`` already on disk (parts of an earlier parallel fetch)."""
        return list(self._extents)

    async def write_at(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            exc = SizeMismatch(
                f"blob {self.digest}: write of {len(data)} bytes at {offset} goes past the "
                f"expected size {self.size}; the source serves a different blob"
            )
            self.failure = exc
            raise exc
        if offset < self._floor:  # already held (and hashed): never rewrite those bytes
            data = data[self._floor - offset :]
            offset = self._floor
        if not data:
            return
        n = len(data)
        self._writes += 1
        try:
            if offset == self.offset and not self._advancing:
                self._advancing = True  # fast path: write and hash in one thread hop
                self._floor = offset + n
                try:
                    work: asyncio.Future[Any]
                    if n >= _PARALLEL_HASH:
                        # pwrite and sha256 both release the GIL: run them side by side
                        work = asyncio.ensure_future(asyncio.gather(
                            self._io(self._write_and_hash, offset, data, False),
                            self._io(self._hash.update, data)))
                    else:
                        work = asyncio.ensure_future(self._io(self._write_and_hash, offset, data))
                    try:
                        await asyncio.shield(work)
                    except asyncio.CancelledError:
                        # The threads write and hash on (they cannot be stopped): let them end
                        # and count the bytes, so that a partial suspended now (a stopping
                        # daemon) keeps them instead of fetching them again.
                        await asyncio.wait([work])
                        if not work.cancelled() and work.exception() is None:
                            self.offset += n
                        raise
                    self.offset += n
                finally:
                    self._advancing = False
            else:
                await self._io(self._pwrite, offset, data)
                self._add_extent(offset, offset + n)
                held = self._held(self.offset)
                if held - self._state_at >= _STATE_EVERY:
                    self._state_at = held  # parts finishing meanwhile need no save of their own
                    await self._io(self._save_state)
            self.bytes_written += n
            await self._advance()
        finally:
            self._writes -= 1
            self._notify()

    async def truncate(self, size: int) -> None:
        """Drop everything at and beyond ``size`` (a fetcher restarting without Range)."""
        size = max(0, min(size, self.size))
        while self._advancing:
            await self._wait_changed()
        await self.quiesce()  # no thread may write the sidecar with what is cut off here
        self._extents = [(a, min(b, size)) for a, b in self._extents if a < size]
        if size < self.offset:
            self.rewrites += 1
            self._advancing = True
            try:
                self._hash = self.digest.hasher()
                self.offset = self._floor = 0
                await self._io(self._hash_range, 0, size)
                self.offset = size
            finally:
                self._advancing = False
        self._floor = self.offset
        await self._io(os.ftruncate, self._fd, size)
        await self._io(self._save_state)
        self._notify()

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(cls, root: Path, part: Path, digest: Digest, size: int, fsync: bool,
                   mode: int = 0o444, owner: int | None = None) -> Ingest:
        """Open (or resume) the partial; the hashed prefix is re-hashed from disk.

        ``mode`` is the committed blob's; a partial is readable by others only when the
        blob will be (0400: the partial is 0600 from its creation, also when resumed).
        """
        ing = cls(root, part, digest, size, fsync)
        ing.mode = mode
        ing.owner = owner  # the uid it is downloaded for, kept in the sidecar (per-uid caps)
        opening = asyncio.ensure_future(asyncio.to_thread(ing._open_sync))
        try:
            await asyncio.shield(opening)
        except BaseException as e:
            # Also when cancelled: the thread still works on the file (re-hashing a big
            # partial takes a while) and the caller releases the digest's lock next; wait
            # for it so that no other ingest opens the file meanwhile and no fd leaks.
            if not opening.done():
                await asyncio.wait([opening])
            ing.close()
            if isinstance(e, OSError):
                raise store_error(e, root, f"open the ingest file for {digest}") from e
            raise
        return ing

    def _open_sync(self) -> None:
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                           0o644 if self.mode & 0o044 else 0o600)
        if not self.mode & 0o044:
            os.fchmod(self._fd, 0o600)  # a partial of a blob now private, made before
        on_disk = min(os.fstat(self._fd).st_size, self.size)
        held, extents = 0, []
        try:
            state = json.loads(self.state_path.read_text())
            if state.get("digest") == str(self.digest) and state.get("size") == self.size:
                held = min(int(state["offset"]), on_disk)
                extents = _extents_within(state.get("extents", []), held, on_disk)
        except (OSError, ValueError, KeyError, TypeError):
            held, extents = 0, []  # no usable record of what is valid: start over
        # Bytes past the last recorded extent may be a part cut mid-way: drop them.
        os.ftruncate(self._fd, max([held] + [b for _, b in extents]))
        self._hash_range(0, held)
        self.offset = held
        while extents and extents[0][0] <= self.offset:  # parts that continue the prefix
            _, end = extents.pop(0)
            self._hash_range(self.offset, end)
            self.offset = end
        self._extents = extents
        self._floor = self.resumed_from = self.offset
        self._save_state()

    async def quiesce(self) -> None:
        """Wait until no thread works on the file any more (also cancelled writes)."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    async def commit(self, dest: Path) -> None:
        """Verify and move the partial to ``dest``; raise Size/DigestMismatch or StoreError."""
        while self._writes or self._advancing:
            await self._wait_changed()
        await self.quiesce()
        if self.failure is not None:
            raise self.failure
        if self.offset != self.size:
            held = self._held(self.offset)
            raise SizeMismatch(
                f"blob {self.digest}: the fetch ended with {held} of {self.size} bytes "
                f"({self.offset} contiguous); nothing was kept"
            )
        actual = Digest(self.digest.algorithm, self._hash.hexdigest())
        if actual != self.digest:
            raise DigestMismatch(
                f"blob {self.digest}: content hashes to {actual}; the source served wrong "
                "bytes, nothing was kept"
            )
        try:
            await asyncio.to_thread(self._commit_sync, dest)
        except OSError as e:
            raise store_error(e, self.root, f"commit blob {self.digest}") from e
        self._notify()

    def _commit_sync(self, dest: Path) -> None:
        if self._fsync:
            os.fsync(self._fd)
        os.fchmod(self._fd, self.mode)  # read-only before it becomes visible
        os.replace(self.part, dest)
        if self._fsync:
            fsync_dir(dest.parent)
        self.close()
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass

    def suspend(self) -> None:
        """Keep the partial for a later resume (the fetch failed in a retryable way).

        Call after ``quiesce``: no thread may still use the file descriptor.
        """
        try:
            self._save_state()
        except OSError:
            pass  # the next open starts from 0 then; nothing unverified is trusted
        self.close()
        self._notify()

    def discard(self) -> None:
        """Remove the partial and its sidecar (mismatch, store error); after ``quiesce``."""
        self.close()
        for p in (self.part, self.state_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # gc reaps it later; it is never visible under blobs/
        self._notify()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with self._state_lock:
            if self._state_fd >= 0:
                os.close(self._state_fd)
                self._state_fd = -1

    # -- progress for followers --------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_change is not None:
            self.on_change()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    async def wait_progress(self, seen: int) -> None:
        """Return once ``offset`` moved past ``seen`` or the ingest changed state."""
        if self.offset <= seen:
            await self._changed.wait()

    # -- internals (the sync ones run in threads) --------------------------------------

    async def _io(self, fn: Callable[..., object], *args: object) -> object:
        # The thread runs on even if the caller is cancelled (a thread cannot be stopped):
        # track it, so that the file descriptor is closed only after it finished.
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._pending.add(fut)
        fut.add_done_callback(_forget(self._pending))
        try:
            return await asyncio.shield(fut)
        except OSError as e:
            exc = store_error(e, self.root, f"write the ingest file for {self.digest}")
            self.failure = exc
            raise exc from e

    def _pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def _write_and_hash(self, offset: int, data: bytes, hash_it: bool = True) -> None:
        self._pwrite(offset, data)
        if hash_it:
            self._hash.update(data)
        # The sidecar only promises bytes on disk (a resume re-hashes them), not the hash.
        self._maybe_save_state(offset + len(data))

    def _hash_range(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            chunk = os.pread(self._fd, min(_READ_CHUNK, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, f"ingest file shorter than expected at {pos}")
            self._hash.update(chunk)
            pos += len(chunk)

    def _held(self, prefix: int) -> int:
        """Bytes on disk: the prefix and the parts beyond it."""
        return prefix + sum(b - max(a, prefix) for a, b in list(self._extents) if b > prefix)

    def _maybe_save_state(self, prefix: int) -> None:
        if self._held(prefix) - self._state_at >= _STATE_EVERY:
            self._save_state(prefix)

    def _save_state(self, prefix: int | None = None) -> None:
        """Record ``prefix`` (default: the hashed prefix) and the extents beyond it.

        Only bytes already written are recorded: ``_extents`` gets a part after its pwrite.
        The sidecar is a hint (a resume re-hashes the prefix, the commit checks the digest):
        it is rewritten in place with one ``pwrite``, padded with spaces (JSON ignores them)
        to its length on disk, so a kill leaves the old record or the new one whole; it was
        a write to a temporary file and a rename every 2 MiB, 60 per 120 MB blob.
        """
        with self._state_lock:
            held = self.offset if prefix is None else prefix
            extents = [[max(a, held), b] for a, b in list(self._extents) if b > held]
            data = json.dumps({"digest": str(self.digest), "size": self.size, "offset": held,
                               "extents": extents, "uid": self.owner}).encode()
            if self._state_fd < 0:
                self._state_fd = os.open(self.state_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                         0o644 if self.mode & 0o044 else 0o600)
                self._state_len = os.fstat(self._state_fd).st_size
            os.pwrite(self._state_fd, data.ljust(self._state_len), 0)
            self._state_len = max(self._state_len, len(data))
            self._state_at = held + sum(b - a for a, b in extents)

    def _add_extent(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in self._extents:
            if b < start or a > end:
                merged.append((a, b))
            else:
                start, end = min(a, start), max(b, end)
        merged.append((start, end))
        merged.sort()
        self._extents = merged

    async def _advance(self) -> None:
        """Hash parts that became contiguous with the prefix (read back in a thread)."""
        if self._advancing:
            return  # the task that holds it loops until nothing is left
        self._advancing = True
        try:
            while self._extents and self._extents[0][0] <= self.offset:
                start, end = self._extents.pop(0)
                if end > self.offset:
                    self._floor = max(self._floor, end)
                    await self._io(self._hash_range, self.offset, end)
                    self.offset = end
                    await self._io(self._maybe_save_state, end)
        finally:
            self._advancing = False


def _extents_within(raw: Any, start: int, end: int) -> list[tuple[int, int]]:
    """A sidecar's extents clipped to ``[start, end)``, sorted and merged; bad entries dropped."""
    spans = sorted(
        (max(int(a), start), min(int(b), end))
        for a, b in (raw if isinstance(raw, list) else [])
        if isinstance(a, int) and isinstance(b, int) and max(a, start) < min(b, end)
    )
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged
