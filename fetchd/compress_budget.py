"""The daemon-wide compression scheduler: how many layers compress at once, with how many zstd
threads, and the pool of zstd contexts they reuse.

One ``CompressionBudget`` is shared by every pack of a process, so CPU and zstd memory stay
bounded however many images are packed at once. This module knows zstd levels, compressor
configuration and memory estimates; it knows nothing of layers, archives or the store.

Invariants:
- every frame is made by ``compressor(level, threads)`` (checksum, no content size,
  ``threads >= 1``): the bytes are the same for any thread count, so the budget may choose
  threads freely;
- at most ``workers`` compressions hold slots at once and their estimated memory stays within
  ``memory`` (one compression may always run alone);
- a pooled context is reused only after its frame ended cleanly, with the same parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

import zstandard

from .errors import CompressionLevelInvalid

MIN_LEVEL = 1
MAX_LEVEL = 19
DEFAULT_LEVEL = 3


def check_level(level: object) -> int:
    """``level`` if it is a zstd level fetchd offers (1-19), else CompressionLevelInvalid."""
    if isinstance(level, bool) or not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise CompressionLevelInvalid(
            f"invalid zstd compression level {level!r}: use an integer from {MIN_LEVEL} to "
            f"{MAX_LEVEL} (Isar's default is {DEFAULT_LEVEL})"
        )
    return level


def compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """The one compressor configuration every frame uses (see the determinism invariant)."""
    return zstandard.ZstdCompressor(level=check_level(level), threads=max(1, threads),
                                    write_checksum=True, write_content_size=False)


def usable_cpus() -> int:
    """CPUs this process may run on (taskset/cpuset limits count, unlike os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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

