"""Readers that follow a blob while it downloads (``LayerStore.read_following``).

Invariant: a follower yields bytes before the blob is verified; it ends cleanly only when the
bytes it yielded are exactly the blob the store committed, else it raises (the ingest's own
error, or DigestMismatch). By default it hashes everything it yields to prove that. A
follower of this process's ingest may instead (``verify=False``) rely on the ingest: it reads
only the ingest's hashed prefix, which no write changes except a ``truncate`` (counted in
``Ingest.rewrites``), so "the ingest committed and never cut back its prefix" means the
same, without hashing every byte a second time. A caller trusts the bytes only when
iteration ends cleanly.

Bytes are read from the ingest file by their own file descriptor: the commit renames
that same inode into ``blobs/``, so a follower reads on across the commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .digest import Digest
from .errors import BlobUnknown, DigestMismatch
from .ingest import FileLock, Ingest

CHUNK = 1 << 20
_POLL = 0.02  # seconds between looks at another process's sidecar


class Flight:
    """One in-process ingest of a digest: the task, its writer, a change signal.

    ``notify`` runs on the event loop; it wakes async followers and, through ``cond``,
    followers in worker threads (``ThreadFollower``). ``outcome`` is set (on the loop) when
    the flight ends: the committed path or the exception.
    """

    def __init__(self) -> None:
        self.task: asyncio.Task[Path] | None = None
        self.ingest: Ingest | None = None
        self.source: str | None = None  # where its fetch gets the bytes (LayerStore.ensure_blob)
        self.preempted = False  # cancelled by a waiter with another source: it stalled
        self.outcome: Path | BaseException | None = None
        self.cond = threading.Condition()
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        with self.cond:
            self.cond.notify_all()

    async def wait(self) -> None:
        await self._changed.wait()


def pread_hash(fd: int, n: int, pos: int, hasher: hashlib._Hash) -> bytes:
    data = os.pread(fd, n, pos)
    hasher.update(data)
    return data


def _pread(fd: int, n: int, pos: int, hasher: hashlib._Hash | None) -> bytes:
    return os.pread(fd, n, pos) if hasher is None else pread_hash(fd, n, pos, hasher)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


async def _rest(fd: int, pos: int, hasher: hashlib._Hash | None, d: Digest
                ) -> AsyncIterator[bytes]:
    """Read the committed file to its end, then check what was yielded in total (when
    ``hasher`` is given: it holds what was yielded before ``pos``)."""
    while chunk := await asyncio.to_thread(_pread, fd, CHUNK, pos, hasher):
        pos += len(chunk)
        yield chunk
    if hasher is None:
        return
    actual = Digest(d.algorithm, hasher.hexdigest())
    if actual != d:
        raise DigestMismatch(
            f"blob {d}: the bytes read while it downloaded hash to {actual}; "
            "discard them and read the blob again"
        )


async def follow_flight(flight: Flight, d: Digest, verify: bool = True) -> AsyncIterator[bytes]:
    """Follow an ingest of this process: bytes up to its hashed prefix, woken by its writes.

    ``verify=False``: no second hash; the ingest's commit and an unchanged ``rewrites``
    count prove the bytes instead (see the module docstring).
    """
    hasher = d.hasher() if verify else None
    rewrites: int | None = None  # the ingest's count when this follower first read from it
    pos = 0
    fd = -1

    def check_prefix() -> None:
        _check_rewrites(flight, d, rewrites)

    try:
        while True:
            ing = flight.ingest
            task = flight.task
            assert task is not None
            if task.done():
                path = task.result()  # raises the ingest's error
                if hasher is None:
                    check_prefix()
                if fd < 0:
                    fd = await asyncio.to_thread(_open, path)
                async for chunk in _rest(fd, pos, hasher, d):  # same inode as the part
                    yield chunk
                return
            if ing is not None and ing.offset > pos:
                if fd < 0:
                    try:
                        fd = await asyncio.to_thread(_open, ing.part)
                    except FileNotFoundError:
                        # committed (renamed into blobs/) or discarded since: the task
                        # ends next and says which
                        await asyncio.wait([task])
                        continue
                if rewrites is None:
                    rewrites = ing.rewrites
                want = min(ing.offset - pos, CHUNK)
                chunk = await asyncio.to_thread(_pread, fd, want, pos, hasher)
                if hasher is None:
                    check_prefix()  # cut back while we read: these bytes may be stale
                pos += len(chunk)
                yield chunk
                continue
            await flight.wait()
    finally:
        if fd >= 0:
            os.close(fd)


def held_by_sidecar(part: Path, d: Digest) -> int:
    """The prefix length another process recorded for its ingest of ``d`` (0 if none)."""
    try:
        state = json.loads(part.with_suffix(".state").read_text())
        return int(state["offset"]) if state.get("digest") == str(d) else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


async def follow_other_process(
    d: Digest, part: Path, blob: Path, lock: FileLock, has: Callable[[], bool], root: Path,
) -> AsyncIterator[bytes]:
    """Follow an ingest run by another process by polling its sidecar (2 MiB steps).

    Raises BlobUnknown when nobody holds the digest's lock and the blob is absent.
    """
    hasher = d.hasher()
    pos = 0
    fd = -1
    try:
        while True:
            if has():
                if fd < 0:
                    fd = await asyncio.to_thread(_open, blob)
                async for chunk in _rest(fd, pos, hasher, d):  # same inode as the part
                    yield chunk
                return
            held = await asyncio.to_thread(held_by_sidecar, part, d)
            if held > pos:
                if fd < 0:
                    try:
                        fd = await asyncio.to_thread(_open, part)
                    except FileNotFoundError:
                        continue  # committed or discarded meanwhile: look again
                want = min(held - pos, CHUNK)
                chunk = await asyncio.to_thread(pread_hash, fd, want, pos, hasher)
                if chunk:
                    pos += len(chunk)
                    yield chunk
                    continue
            if lock.try_acquire():  # nobody ingests it (any more)
                lock.release()
                if has():
                    continue
                raise BlobUnknown(
                    f"blob {d} is not in the store at {root} and no download of it is "
                    "running; fetch it first"
                )
            await asyncio.sleep(_POLL)
    finally:
        if fd >= 0:
            os.close(fd)


class FollowStopped(Exception):
    """The caller's ``stop`` event was set while a ``ThreadFollower`` waited for bytes."""


_THREAD_WAKE = 0.05  # seconds between looks at ``stop`` while a thread follower waits


class ThreadFollower:
    """A blocking reader, for a worker thread, of a blob an ingest of this process writes.

    Reads the ingest file directly (``os.pread`` in the calling thread: no hop through the
    event loop per chunk) up to the ingest's hashed prefix, waits on ``Flight.cond`` for
    more, and reads the committed file on once the flight ends. It does not hash: like
    ``follow_flight(verify=False)`` it relies on the ingest, whose commit verified the very
    prefix bytes read unless ``Ingest.rewrites`` changed (then DigestMismatch). ``read``
    returns b"" only at the end of a blob the store committed; it raises the ingest's error
    when the flight fails, and FollowStopped once ``stop`` is set.
    """

    def __init__(self, flight: Flight, d: Digest, stop: threading.Event) -> None:
        self._flight = flight
        self._d = d
        self._stop = stop
        self._pos = 0
        self._fd = -1
        self._rewrites: int | None = None

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        while True:
            if self._stop.is_set():
                raise FollowStopped(f"stopped reading blob {self._d}")
            outcome = self._flight.outcome
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:  # committed: read on from the blob (same inode as the part)
                self._check_prefix()
                if self._fd < 0:
                    self._fd = _open(outcome)
                return self._take(os.pread(self._fd, n, self._pos))
            ing = self._flight.ingest
            if ing is not None and ing.offset > self._pos:
                if self._fd < 0:
                    try:
                        self._fd = _open(ing.part)
                    except FileNotFoundError:
                        self._wait()  # committed or discarded since: the outcome comes next
                        continue
                if self._rewrites is None:
                    self._rewrites = ing.rewrites
                data = os.pread(self._fd, min(n, ing.offset - self._pos), self._pos)
                self._check_prefix()  # cut back while we read: these bytes may be stale
                return self._take(data)
            self._wait()

    def bytes_ready(self) -> bool:
        """Whether a ``read`` now returns without waiting for the download (bytes beyond
        the position are hashed, or the flight ended)."""
        ing = self._flight.ingest
        return self._flight.outcome is not None or (ing is not None and ing.offset > self._pos)

    def _take(self, data: bytes) -> bytes:
        self._pos += len(data)
        return data

    def _check_prefix(self) -> None:
        _check_rewrites(self._flight, self._d, self._rewrites)

    def _wait(self) -> None:
        flight = self._flight
        with flight.cond:
            ing = flight.ingest
            # checked under the lock: a notify after this look wakes the wait below
            if (flight.outcome is None and not self._stop.is_set()
                    and not (ing is not None and ing.offset > self._pos)):
                flight.cond.wait(_THREAD_WAKE)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ThreadFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_rewrites(flight: Flight, d: Digest, seen: int | None) -> None:
    """DigestMismatch if the ingest a follower read from (``seen``: its rewrite count then)
    was cut back or is gone: the bytes read so far are no longer known to be the blob's."""
    ing = flight.ingest
    if seen is not None and (ing is None or ing.rewrites != seen):
        raise DigestMismatch(
            f"blob {d}: the download started over while it was being read; the bytes read "
            "so far are not trusted, read the blob again")
