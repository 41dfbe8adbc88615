"""How late the daemon's event loop runs: a periodic timer that measures its own lateness.

Every ``interval`` seconds a callback is due; the time between when it was due and when the
loop ran it is the loop's lag at that moment (a handler or a callback that blocked the loop
for 300 ms shows as ~300 ms). ``LoopLag`` keeps the samples of the last ``window`` seconds
and reports their maximum and 99th percentile (``snapshot``), for ``status`` and /metrics,
or those of a shorter recent span (``snapshot(last=...)``: a benchmark's step).

Invariants: the monitor never blocks the loop itself (one ``call_later`` per sample, O(1)
work, the percentile is computed on request over at most ``window / interval`` samples); a
sample is the lateness of one timer, never negative; samples older than ``window`` seconds
(by the loop's clock) are not reported.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class LagSnapshot:
    """Lag over the window: ``max_s`` and ``p99_s`` in seconds, ``samples`` behind them."""

    max_s: float
    p99_s: float
    samples: int
    window_s: float
    interval_s: float

    def to_json(self) -> dict[str, float | int]:
        return {"max_ms": round(self.max_s * 1000, 3), "p99_ms": round(self.p99_s * 1000, 3),
                "samples": self.samples, "window_s": self.window_s,
                "interval_s": self.interval_s}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class LoopLag:
    """Samples the running loop's lateness every ``interval`` seconds (``start``/``stop``)."""

    def __init__(self, interval: float = 0.1, window: float = 60.0) -> None:
        if interval <= 0 or window < interval:
            raise ValueError("loop lag: interval must be > 0 and window >= interval")
        self.interval = interval
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()  # (when, lag), oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._waiters: list[asyncio.Future[float]] = []

    def start(self) -> None:
        """Begin sampling on the running loop (idempotent)."""
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters = []

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.record(max(0.0, now - self._due), now)
        self._schedule()

    def record(self, lag: float, now: float) -> None:
        """One sample of ``lag`` seconds taken at loop time ``now``; older ones expire."""
        self._samples.append((now, lag))
        self._expire(now)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(lag)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()

    async def next_sample(self) -> float:
        """The lag of the next sample taken (for tests and tools: no polling needed)."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    def snapshot(self, now: float | None = None, last: float | None = None) -> LagSnapshot:
        """Max and p99 of the samples of the last ``window`` seconds, or of the last ``last``
        seconds when that is shorter (a tool measuring one step asks for the step's length;
        ``window_s`` is then ``last``)."""
        if now is None:
            now = self._loop.time() if self._loop is not None else 0.0
        self._expire(now)
        window = self.window if last is None else min(max(last, 0.0), self.window)
        cutoff = now - window
        lags = [lag for when, lag in self._samples if when >= cutoff]
        return LagSnapshot(max(lags, default=0.0), percentile(lags, 99), len(lags),
                           window, self.interval)
