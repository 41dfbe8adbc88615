"""Readers that follow a blob while it downloads (``LayerStore.read_following``).

Invariant: a follower yields bytes before the blob is verified, so it hashes everything
it yields and raises unless the whole stream hashes to the digest (or re-raises the
ingest's own error). A caller trusts the bytes only when iteration ends cleanly.

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


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


async def _rest(fd: int, pos: int, hasher: hashlib._Hash, d: Digest) -> AsyncIterator[bytes]:
    """Read the committed file to its end, then check what was yielded in total."""
    while chunk := await asyncio.to_thread(pread_hash, fd, CHUNK, pos, hasher):
        pos += len(chunk)
        yield chunk
    actual = Digest(d.algorithm, hasher.hexdigest())
    if actual != d:
        raise DigestMismatch(
            f"blob {d}: the bytes read while it downloaded hash to {actual}; "
            "discard them and read the blob again"
        )


async def follow_flight(flight: Flight, d: Digest) -> AsyncIterator[bytes]:
    """Follow an ingest of this process: bytes up to its hashed prefix, woken by its writes."""
    hasher = d.hasher()
    pos = 0
    fd = -1
    try:
        while True:
            ing = flight.ingest
            task = flight.task
            assert task is not None
            if task.done():
                path = task.result()  # raises the ingest's error
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
                want = min(ing.offset - pos, CHUNK)
                chunk = await asyncio.to_thread(pread_hash, fd, want, pos, hasher)
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
