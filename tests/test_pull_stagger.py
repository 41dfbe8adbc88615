"""pull's staggered start of many tasks: a thousand downloads started at once ran their first
steps in one turn of the event loop (issue 14: ~18 ms of loop lag for a 1000-layer image)."""

from __future__ import annotations

import asyncio
import collections
import gc
from typing import Any

import pytest

from fetchd import pull


class _Turns:
    """Counts the event loop's turns: a callback that schedules itself for the next one."""

    def __init__(self) -> None:
        self.turn = 0
        self._stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if not self._stopped:
            self.turn += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True


async def test_tasks_start_a_bounded_number_per_turn_and_results_keep_their_order() -> None:
    turns = _Turns()
    started: list[int] = []

    async def job(i: int) -> int:
        started.append(turns.turn)  # the first step of the task runs in this turn
        await asyncio.sleep(0)
        return i * i

    try:
        results = await pull._gather_staggered(job(i) for i in range(1000))
    finally:
        turns.stop()
    assert results == [i * i for i in range(1000)]
    per_turn = collections.Counter(started)
    assert max(per_turn.values()) <= pull.STAGGER
    assert len(per_turn) >= 1000 // pull.STAGGER


async def test_the_first_error_is_raised_and_the_others_go_on() -> None:
    finished: list[int] = []
    release = asyncio.Event()

    async def job(i: int) -> int:
        if i == 3:
            raise ValueError("layer 3 failed")
        await release.wait()
        finished.append(i)
        return i

    with pytest.raises(ValueError, match="layer 3"):
        await pull._gather_staggered(job(i) for i in range(200))
    release.set()
    while len(finished) < 199:  # noqa: ASYNC110 -- the others end on their own, as gather's do
        await asyncio.sleep(0)
    assert sorted(finished) == [i for i in range(200) if i != 3]


async def test_cancelling_stops_every_started_task_and_leaves_none_unawaited() -> None:
    made: list[int] = []
    cancelled: list[int] = []

    async def job(i: int) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    def jobs() -> Any:
        for i in range(1000):
            made.append(i)
            yield job(i)

    task = asyncio.ensure_future(pull._gather_staggered(jobs()))
    await asyncio.sleep(0)  # it started the first batch and waits for the next turn
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0 < len(made) < 1000  # the rest were never made: no coroutine left unawaited
    assert sorted(cancelled) == made  # every started task was cancelled, and ended
    gc.collect()  # a never-awaited coroutine would warn here (warnings are errors)
