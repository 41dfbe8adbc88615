"""The loop lag monitor: what it reports over its window, and that it sees a blocked loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from fetchd.loop_lag import LoopLag, percentile


@pytest.mark.parametrize("values, q, want", [
    ([], 99, 0.0),
    ([5.0], 99, 5.0),
    ([float(i) for i in range(1, 101)], 99, 99.0),
    ([float(i) for i in range(1, 101)], 100, 100.0),
    ([3.0, 1.0, 2.0], 50, 2.0),
])
def test_percentile_nearest_rank(values: list[float], q: float, want: float) -> None:
    assert percentile(values, q) == want


def test_snapshot_reports_max_and_p99_of_the_window_only() -> None:
    lag = LoopLag(interval=0.1, window=10.0)
    lag.record(2.0, now=0.0)  # expires: older than the window at t=15
    for i in range(200):
        lag.record(0.001 * (i % 10), now=5.0 + i * 0.05)
    snap = lag.snapshot(now=15.0)
    assert snap.samples == 200
    assert snap.max_s == pytest.approx(0.009)
    assert snap.p99_s == pytest.approx(0.009)
    assert lag.snapshot(now=100.0).samples == 0  # everything expired
    assert lag.snapshot(now=100.0).max_s == 0.0


def test_snapshot_of_the_last_seconds_only() -> None:
    lag = LoopLag(interval=0.1, window=60.0)
    lag.record(0.3, now=10.0)
    lag.record(0.002, now=18.0)
    lag.record(0.001, now=19.0)
    last = lag.snapshot(now=20.0, last=5.0)
    assert (last.max_s, last.samples, last.window_s) == (0.002, 2, 5.0)
    assert lag.snapshot(now=20.0).max_s == 0.3  # the whole window still has the stall
    assert lag.snapshot(now=20.0, last=600.0).window_s == 60.0  # never beyond the window


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoopLag(interval=0)
    with pytest.raises(ValueError):
        LoopLag(interval=1.0, window=0.5)


async def test_a_blocked_loop_shows_as_lag() -> None:
    lag = LoopLag(interval=0.01, window=60.0)
    lag.start()
    try:
        await lag.next_sample()  # the timer runs
        sample = asyncio.ensure_future(lag.next_sample())
        await asyncio.sleep(0)  # the waiter is registered before the loop blocks
        time.sleep(0.3)  # noqa: ASYNC251 -- deliberately block the loop: this is the lag to see
        seen = await sample
        # the timer was due at most 10 ms into the 300 ms block: at least ~290 ms late
        assert seen >= 0.25
        snap = lag.snapshot()
        assert snap.max_s >= 0.25 and snap.samples >= 2
        assert snap.to_json()["max_ms"] >= 250
    finally:
        lag.stop()
