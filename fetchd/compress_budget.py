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
import collections
import concurrent.futures
import contextlib
import heapq
import itertools
import os
import threading
from collections.abc import AsyncIterator

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


_STOP_WAKE = 0.05  # seconds between looks at ``stop`` while a worker thread waits to resume


class _Owner:
    """One requester (a peer uid) of the budget: what it holds and what it waits for."""

    __slots__ = ("name", "active", "served", "holding", "tickets", "waiting")

    def __init__(self, name: object) -> None:
        self.name = name
        self.active = 0  # CPU slots it holds
        self.served = 0  # when it was last granted a CPU slot (0: never)
        self.holding = 0  # compressions it started and that did not end (running or parked)
        self.tickets = 0  # its slots not left yet (waiting ones too): the record lives as long
        # per queue (starts, resumes): its waiting tickets, oldest first
        self.waiting: tuple[collections.deque[_Ticket], collections.deque[_Ticket]] = (
            collections.deque(), collections.deque())


_WAITING, _RUNNING, _PARKED, _RESUMING, _ENDED = range(5)


class _Ticket:
    """One compression of a slot: from the wait for its start until the slot is left."""

    __slots__ = ("owner", "cost", "key", "seq", "state", "fut", "cctx")

    def __init__(self, owner: _Owner, cost: int, key: tuple[int, int]) -> None:
        self.owner = owner
        self.cost = cost
        self.key = key
        self.seq = 0
        self.state = _WAITING
        self.fut: asyncio.Future[None] | None = None
        # an idle pooled context set aside for it when it started (its memory is in
        # ``cost``, so it no longer counts as idle)
        self.cctx: zstandard.ZstdCompressor | None = None


class _FairQueue:
    """Tickets waiting for a CPU slot, grouped by owner. ``peek`` names the next one: of the
    owners that wait, the one holding the fewest CPU slots, ties to the one served least
    recently (so owners take turns), then to the longest waiting; its oldest ticket.

    A heap of (slots held, last served, head's arrival, version, owner) with lazy
    invalidation: every change
    of an owner's standing pushes a fresh entry and bumps its version, stale entries are
    dropped when they surface, cancelled tickets when they reach their owner's head. So each
    operation costs O(log owners) amortized, never a scan of the waiters; ``steps`` counts
    the entries and tickets looked at (a test checks it stays flat in the number of waiters).
    """

    def __init__(self, index: int) -> None:
        self._index = index  # which of ``_Owner.waiting``
        self._heap: list[tuple[int, int, int, int, int, _Owner]] = []
        self._version: dict[int, int] = {}  # id(owner) -> its current version
        self._owners: dict[int, _Owner] = {}  # owners with waiting tickets (live or not)
        self.waiting = 0  # live tickets
        self.steps = 0

    def push(self, ticket: _Ticket) -> None:
        owner = ticket.owner
        queue = owner.waiting[self._index]
        queue.append(ticket)
        self.waiting += 1
        if len(queue) == 1:
            self._owners[id(owner)] = owner
            self.touch(owner)

    def touch(self, owner: _Owner) -> None:
        """The owner's standing changed (slots held, head): re-rank it."""
        queue = owner.waiting[self._index]
        self._drop_cancelled(queue)
        if not queue:
            self._owners.pop(id(owner), None)
            self._version.pop(id(owner), None)
            return
        version = self._version.get(id(owner), 0) + 1
        self._version[id(owner)] = version
        heapq.heappush(self._heap, (owner.active, owner.served, queue[0].seq, version,
                                    id(owner), owner))
        if len(self._heap) > 4 * len(self._owners) + 64:
            self._compact()

    def peek(self) -> _Ticket | None:
        while self._heap:
            self.steps += 1
            _, _, _, version, key, owner = self._heap[0]
            if self._version.get(key) != version:
                heapq.heappop(self._heap)  # stale: the owner was re-ranked or left
                continue
            queue = owner.waiting[self._index]
            if self._drop_cancelled(queue):
                self.touch(owner)  # its head changed: rank it again
                continue
            return queue[0]
        return None

    def pop(self, ticket: _Ticket) -> None:
        """Take ``ticket``, which ``peek`` just named, out of the queue."""
        owner = ticket.owner
        queue = owner.waiting[self._index]
        queue.popleft()
        self.waiting -= 1
        self.touch(owner)

    def cancel(self, ticket: _Ticket) -> None:
        """``ticket`` no longer waits; it leaves the queue when it reaches its owner's head."""
        self.waiting -= 1
        ticket.state = _ENDED if ticket.state == _WAITING else _PARKED
        ticket.fut = None
        queue = ticket.owner.waiting[self._index]
        if queue and queue[0] is ticket:
            self.touch(ticket.owner)

    def _drop_cancelled(self, queue: collections.deque[_Ticket]) -> bool:
        dropped = False
        while queue and queue[0].fut is None:
            self.steps += 1
            queue.popleft()
            dropped = True
        return dropped

    def _compact(self) -> None:
        self._heap = []
        for key, owner in list(self._owners.items()):
            self._version.pop(key, None)
            self.touch(owner)


class CompressionSlot:
    """A compression's hold on the budget, yielded by ``CompressionBudget.slot``.

    ``threads`` is the zstd thread count to use, ``compressor()`` the context to use (a
    pooled one set aside when the slot started, or a new one). A worker thread that runs out
    of input calls ``park`` before it waits for bytes (the CPU slot goes to another
    compression; the context's memory stays reserved) and ``resume`` once it has bytes again
    (it waits for a CPU slot like a new compression, ahead of new ones). ``park`` and
    ``resume`` are safe from any thread; ``compressor`` and ``recycle`` belong to the loop.
    """

    def __init__(self, budget: CompressionBudget, ticket: _Ticket, threads: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.threads = threads
        self._budget = budget
        self._ticket = ticket
        self._loop = loop

    def compressor(self) -> zstandard.ZstdCompressor:
        """The context for this slot's frame: the pooled one set aside for it, or a new one
        (``compress_budget.compressor(level, threads)``)."""
        cctx, self._ticket.cctx = self._ticket.cctx, None
        if cctx is not None:
            return cctx
        self._budget.contexts_made += 1
        return compressor(*self._ticket.key)

    def recycle(self, cctx: zstandard.ZstdCompressor) -> None:
        """Give back, before leaving the slot, the context whose frame ended cleanly (never
        one abandoned mid-frame) for the next compression with the same parameters."""
        self._budget._recycle(self._ticket.key, cctx)

    def park(self) -> None:
        """Give back the CPU slot while the input is not there (memory stays reserved)."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._budget._park, self._ticket)

    def resume(self, stop: threading.Event) -> bool:
        """From a worker thread after ``park``: block until a CPU slot is held again (True),
        or ``stop`` is set first (False; the slot stays parked until it is left)."""
        try:
            fut = asyncio.run_coroutine_threadsafe(self._budget._resume(self._ticket),
                                                   self._loop)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            try:
                fut.result(timeout=_STOP_WAKE)
                return True
            except concurrent.futures.TimeoutError:
                if stop.is_set() or self._loop.is_closed():
                    fut.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False


class CompressionBudget:
    """The daemon-wide bound on layer compressions, shared by every pack of one process.

    A compression holds a slot from before its ZstdCompressor exists until its frame is
    written. Within it, it holds a CPU slot only while it has bytes to compress: a layer
    whose download stalls ``park``s (``CompressionSlot``), so a slow or hostile source never
    keeps the CPU from others. Invariants:

    - at most ``workers`` compressions hold CPU slots at once (``active``);
    - the estimated memory (``context_memory``) of the compressions in progress, running or
      parked, stays within ``memory`` -- except that each owner may always have one
      compression in progress (so a level whose single context exceeds ``memory``, 17-19,
      still works one layer at a time, and one owner's parked contexts never shut another
      owner out): the bound is ``memory`` plus one context per further owner;
    - fairness: a free CPU slot goes first to a parked compression that has bytes again (it
      holds memory; finishing it frees memory), then to a new one; among owners, to the one
      holding the fewest CPU slots, ties to the one served least recently (owners take
      turns); within an owner, first come, first served. A new compression that does not fit the memory waits at the head
      (no overtaking, so a big compression is not starved) while resumes go on;
    - each grant costs O(log owners): nothing scans the waiters (``grant_steps``).

    Each compression gets the most zstd threads (up to ``workers``) whose estimate fits
    ``memory``: the output bytes are the same for any thread count >= 1, so this changes
    speed and memory, never the archive. Use only from one event loop (``CompressionSlot``'s
    ``park``/``resume`` hop onto it).

    Compression contexts are pooled: a context whose frame ended cleanly is kept idle for
    the next compression with the same (level, threads), which saves its allocation (tens
    of MiB of fresh pages and zstd's worker threads, ~15 ms of CPU per layer at level 3).
    The estimated memory of contexts in use and idle together stays within ``memory``: a
    compression started for another (level, threads) first frees the idle contexts, and
    idle contexts are freed ``keep_idle`` seconds after the last compression ended. Reuse
    never changes the bytes (each frame starts from a reset context with the same
    parameters).
    """

    def __init__(self, workers: int | None = None, memory: int = 128 * MiB,
                 keep_idle: float = 5.0) -> None:
        self.workers = max(1, workers if workers is not None else usable_cpus())
        self.memory = memory
        self.keep_idle = keep_idle
        self.active = 0  # compressions holding a CPU slot
        self.parked = 0  # compressions in progress without a CPU slot (waiting for bytes)
        self.used = 0  # estimated memory of the compressions in progress
        self.peak_active = 0  # the most compressions that ever held CPU slots at once
        self.contexts_made = 0  # compression contexts created (the rest were reused)
        self._owners: dict[object, _Owner] = {}
        self._starts = _FairQueue(0)
        self._resumes = _FairQueue(1)
        self._seq = itertools.count()
        self._served = itertools.count(1)
        self._idle: dict[tuple[int, int], list[zstandard.ZstdCompressor]] = {}
        self._trim_handle: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """Compressions waiting for a CPU slot (new ones and parked ones with bytes again)."""
        return self._starts.waiting + self._resumes.waiting

    @property
    def grant_steps(self) -> int:
        """Queue entries looked at by all grants so far (flat per grant, whatever waits)."""
        return self._starts.steps + self._resumes.steps

    def threads(self, level: int) -> int:
        """zstd threads for one compression at ``level`` (>= 1; the bytes do not depend on it)."""
        t = self.workers
        while t > 1 and context_memory(level, t) > self.memory:
            t -= 1
        return t

    @contextlib.asynccontextmanager
    async def slot(self, level: int, owner: object = None) -> AsyncIterator[CompressionSlot]:
        """Hold a compression slot for ``level`` on behalf of ``owner`` (a peer uid; None:
        the daemon itself). Ask only once there are bytes to compress: a waiter here is
        granted the CPU as soon as it is its turn."""
        threads = self.threads(level)
        who = self._owners.get(owner)
        if who is None:
            who = self._owners[owner] = _Owner(owner)
        ticket = _Ticket(who, context_memory(level, threads), (level, threads))
        who.tickets += 1
        try:
            if self.waiting == 0 and self._fits(ticket):
                self._start(ticket)
            else:
                await self._wait(self._starts, ticket)
            yield CompressionSlot(self, ticket, threads, asyncio.get_running_loop())
        finally:
            self._leave(ticket)

    def _recycle(self, key: tuple[int, int], cctx: zstandard.ZstdCompressor) -> None:
        # kept only while every context fits ``memory`` (its own cost is still in ``used``)
        if self.used + self._idle_memory() <= self.memory:
            self._idle.setdefault(key, []).append(cctx)

    def idle_contexts(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def trim(self) -> None:
        """Free every idle context now."""
        self._idle.clear()

    # -- the scheduler (event loop only) -----------------------------------------------

    async def _wait(self, queue: _FairQueue, ticket: _Ticket) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket.fut = fut
        ticket.seq = next(self._seq)
        ticket.state = _WAITING if queue is self._starts else _RESUMING
        queue.push(ticket)
        self._grant()
        try:
            await fut
        except BaseException:
            if ticket.state in (_WAITING, _RESUMING):
                queue.cancel(ticket)
            raise  # a ticket granted just now is RUNNING: leaving the slot passes it on

    def _fits(self, ticket: _Ticket) -> bool:
        if self.active >= self.workers:
            return False
        return ticket.owner.holding == 0 or self.used + ticket.cost <= self.memory

    def _start(self, ticket: _Ticket) -> None:
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        key = ticket.key
        for other in [k for k in self._idle if k != key]:
            del self._idle[other]  # another level: its contexts would only add memory
        self.used += ticket.cost
        ticket.owner.holding += 1
        mine = self._idle.get(key, [])
        if mine:  # set aside now: a slot leaving meanwhile sees it as taken, not idle
            ticket.cctx = mine.pop()
        while mine and self.used + self._idle_memory() > self.memory:
            mine.pop()
        self._run(ticket)

    def _run(self, ticket: _Ticket) -> None:
        ticket.state = _RUNNING
        ticket.fut = None
        ticket.owner.active += 1
        ticket.owner.served = next(self._served)
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        self._rerank(ticket.owner)

    def _stop_running(self, ticket: _Ticket) -> None:
        ticket.owner.active -= 1
        self.active -= 1
        self._rerank(ticket.owner)

    def _rerank(self, owner: _Owner) -> None:
        for queue in (self._starts, self._resumes):
            if owner.waiting[queue._index]:
                queue.touch(owner)

    def _park(self, ticket: _Ticket) -> None:
        if ticket.state != _RUNNING:
            return
        self._stop_running(ticket)
        ticket.state = _PARKED
        self.parked += 1
        self._grant()

    async def _resume(self, ticket: _Ticket) -> None:
        if ticket.state != _PARKED:
            return
        self.parked -= 1
        if self._resumes.waiting == 0 and self.active < self.workers:
            self._run(ticket)
            return
        try:
            await self._wait(self._resumes, ticket)
        finally:
            if ticket.state == _PARKED:  # stopped while waiting: parked again
                self.parked += 1

    def _leave(self, ticket: _Ticket) -> None:
        state = ticket.state
        if state == _WAITING:  # cancelled before it started (``_wait`` took it out)
            return self._forget(ticket)
        if state == _RUNNING:
            self._stop_running(ticket)
        elif state == _PARKED:
            self.parked -= 1
        elif state == _RESUMING:  # left while a resume waits (not counted as parked then)
            self._resumes.cancel(ticket)
        if state != _ENDED:
            self.used -= ticket.cost
            ticket.owner.holding -= 1
        ticket.state = _ENDED
        self._forget(ticket)
        self._grant()
        if self.active == 0 and self.parked == 0 and self._idle:
            self._trim_handle = asyncio.get_running_loop().call_later(self.keep_idle, self.trim)

    def _forget(self, ticket: _Ticket) -> None:
        owner = ticket.owner
        owner.tickets -= 1
        if owner.tickets == 0:
            self._owners.pop(owner.name, None)

    def _grant(self) -> None:
        """Hand free CPU slots to waiters: parked compressions with bytes first, then new
        ones (stopping at a new one that does not fit the memory)."""
        while self.active < self.workers:
            ticket = self._resumes.peek()
            if ticket is not None:
                self._resumes.pop(ticket)
                fut = ticket.fut
                self._run(ticket)
                assert fut is not None
                fut.set_result(None)
                continue
            ticket = self._starts.peek()
            if ticket is None or not self._fits(ticket):
                return
            self._starts.pop(ticket)
            fut = ticket.fut
            self._start(ticket)
            assert fut is not None
            fut.set_result(None)

    def _idle_memory(self) -> int:
        return sum(context_memory(level, threads) * len(v)
                   for (level, threads), v in self._idle.items())
