"""In-test BlobSinks for the registry client tests (the real one is the store's ingest writer).

``MemorySink`` keeps the blob in a bytearray, accepts out-of-order writes (parallel
ranges), tracks the contiguous prefix as ``offset`` and counts every byte written, so a
test can tell how many bytes arrived twice. ``verify()`` is what the store does on
commit: hash the whole content with ``digest.Verifier``; on a mismatch nothing is
accepted (``accepted`` stays None).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fetchd.digest import Digest, Verifier


class HalfThenWait:
    """A fetch for ``LayerStore.ensure_blob``: writes ``data[:split]`` (default: half), then
    waits for ``release`` and either raises ``fail`` or writes the rest."""

    def __init__(self, data: bytes, fail: BaseException | None = None,
                 split: int | None = None) -> None:
        self.data = data
        self.fail = fail
        self.split = len(data) // 2 if split is None else split
        self.release = asyncio.Event()
        self.half_written = asyncio.Event()

    async def __call__(self, sink: Any) -> None:
        await sink.write_at(0, self.data[: self.split])
        self.half_written.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        await sink.write_at(self.split, self.data[self.split :])


class MemorySink:
    def __init__(self, prefix: bytes = b"") -> None:
        self.data = bytearray(prefix)
        self._covered: list[tuple[int, int]] = [(0, len(prefix))] if prefix else []
        self.written = 0            # every byte write_at was given, duplicates included
        self.truncations: list[int] = []
        self.accepted: bytes | None = None

    @property
    def offset(self) -> int:
        end = 0
        for start, stop in sorted(self._covered):
            if start > end:
                break
            end = max(end, stop)
        return end

    def held_ranges(self) -> list[tuple[int, int]]:
        start = self.offset
        return sorted((a, b) for a, b in self._covered if a > start)

    async def write_at(self, offset: int, data: bytes) -> None:
        if offset > len(self.data):
            self.data.extend(b"\0" * (offset - len(self.data)))
        self.data[offset:offset + len(data)] = data
        self._covered.append((offset, offset + len(data)))
        self.written += len(data)

    async def truncate(self, size: int) -> None:
        self.truncations.append(size)
        del self.data[size:]
        self._covered = [(a, min(b, size)) for a, b in self._covered if a < size]

    def verify(self, digest: Digest, size: int) -> bytes:
        """Check like the store's commit; only then is the content 'accepted'."""
        verifier = Verifier(digest, size)
        verifier.feed(bytes(self.data))
        verifier.check()
        self.accepted = bytes(self.data)
        return self.accepted
