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
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .digest import Digest
from .errors import BlobUnknown, DigestMismatch
from .ingest import FileLock, Ingest

CHUNK = 1 << 20
_POLL = 0.02  # seconds between looks at another process's sidecar


class Flight:
    """One in-process ingest of a digest: the task, its writer, a change signal."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Path] | None = None
        self.ingest: Ingest | None = None
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

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
        ing = flight.ingest
        if rewrites is not None and (ing is None or ing.rewrites != rewrites):
            raise DigestMismatch(
                f"blob {d}: the download started over while it was being read; the bytes "
                "read so far are not trusted, read the blob again")

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
