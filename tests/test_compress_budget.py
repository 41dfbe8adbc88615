"""compress_budget: CPU slots and zstd memory bounded, shared fairly between owners (uids),
a parked compression holds no CPU slot, and grants never scan the waiters.

Everything here is event-loop bookkeeping: no compression runs, no timing is asserted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from fetchd.compress_budget import CompressionBudget, context_memory


async def _turns(cond: Callable[[], bool], limit: int = 1000) -> None:
    """Let the loop run until ``cond`` holds (loop turns, not time; fails after ``limit``)."""
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0)
    assert cond(), "the condition never held"


class Holder:
    """A task holding a slot of ``budget`` for ``owner`` until ``release`` is set."""

    def __init__(self, budget: CompressionBudget, order: list[str], name: str,
                 owner: object = None, level: int = 3) -> None:
        self.release = asyncio.Event()
        self.granted = asyncio.Event()

        async def run() -> None:
            async with budget.slot(level, owner):
                order.append(name)
                self.granted.set()
                await self.release.wait()

        self.task = asyncio.create_task(run())


def test_budget_threads_and_memory_by_level() -> None:
    budget = CompressionBudget(workers=2)
    assert budget.threads(3) == 2 and budget.threads(9) == 2
    assert budget.threads(19) == 1  # one high-level context with 2 threads alone is > 300 MB
    assert context_memory(19, 1) < context_memory(19, 2)
    # two level-9 compressions do not fit the default memory: they run one after the other
    assert 2 * context_memory(9, 2) > budget.memory >= 2 * context_memory(3, 2)


async def test_a_big_compression_runs_alone_and_is_not_overtaken() -> None:
    budget = CompressionBudget(workers=2)
    order: list[str] = []
    big = Holder(budget, order, "big", level=19)  # alone: too big for company
    await big.granted.wait()
    small = [Holder(budget, order, f"small{i}") for i in range(2)]
    await _turns(lambda: budget.waiting == 2)
    assert order == ["big"] and budget.active == 1  # a CPU slot is free, the memory is not
    big.release.set()
    await asyncio.gather(*(h.granted.wait() for h in small))
    assert order == ["big", "small0", "small1"] and budget.active == 2
    for h in small:
        h.release.set()
    await asyncio.gather(big.task, *(h.task for h in small))
    assert budget.active == 0 and budget.used == 0 and budget.waiting == 0


async def test_owners_take_turns() -> None:
    # uid 1 queues four compressions, uid 2 one later: uid 2 does not wait behind all of uid 1
    budget = CompressionBudget(workers=1)
    order: list[str] = []
    first = Holder(budget, order, "a0", owner=1)
    await first.granted.wait()
    a = [Holder(budget, order, f"a{i}", owner=1) for i in range(1, 4)]
    await _turns(lambda: budget.waiting == 3)
    b = Holder(budget, order, "b0", owner=2)
    await _turns(lambda: budget.waiting == 4)
    for h in [first, *a, b]:
        h.release.set()  # each leaves as soon as it got its turn
    await asyncio.gather(*(h.task for h in [first, *a, b]))
    assert order == ["a0", "b0", "a1", "a2", "a3"]


async def test_the_owner_holding_fewer_slots_goes_first() -> None:
    budget = CompressionBudget(workers=2)
    order: list[str] = []
    a = [Holder(budget, order, f"a{i}", owner=1) for i in range(2)]
    await asyncio.gather(*(h.granted.wait() for h in a))  # uid 1 holds both CPU slots
    more_a = Holder(budget, order, "a2", owner=1)
    await _turns(lambda: budget.waiting == 1)
    b = Holder(budget, order, "b0", owner=2)
    await _turns(lambda: budget.waiting == 2)
    a[0].release.set()  # uid 1 still holds one, uid 2 none: uid 2's turn
    await b.granted.wait()
    assert order == ["a0", "a1", "b0"] and not more_a.granted.is_set()
    for h in [*a, more_a, b]:
        h.release.set()
    await asyncio.gather(*(h.task for h in [*a, more_a, b]))
    assert order[-1] == "a2" and budget.active == 0 and budget.used == 0


async def test_a_parked_compression_gives_its_cpu_slot_to_another_owner() -> None:
    import threading

    budget = CompressionBudget(workers=1)
    order: list[str] = []
    parked = asyncio.Event()
    resumed = asyncio.Event()
    done = asyncio.Event()
    stop = threading.Event()

    async def stalled() -> None:  # a layer whose download stalls mid-way
        async with budget.slot(3, owner=1) as slot:
            order.append("stalled")
            slot.park()  # no bytes: give the CPU back
            parked.set()
            assert await asyncio.to_thread(slot.resume, stop)  # bytes again: wait for the CPU
            order.append("resumed")
            resumed.set()
            await done.wait()

    task = asyncio.create_task(stalled())
    await parked.wait()
    await _turns(lambda: budget.parked == 1)
    assert budget.active == 0 and budget.used == context_memory(3, 1)  # memory stays reserved
    other = Holder(budget, order, "other", owner=2)
    await other.granted.wait()  # the stalled owner's slot does not block it
    await _turns(lambda: budget.waiting == 1)  # the resume waits for the CPU slot
    assert not resumed.is_set()
    other.release.set()
    await resumed.wait()
    assert order == ["stalled", "other", "resumed"] and budget.active == 1
    done.set()
    await asyncio.gather(task, other.task)
    assert (budget.active, budget.parked, budget.used, budget.waiting) == (0, 0, 0, 0)


async def test_a_resume_stopped_while_waiting_leaves_the_slot_parked() -> None:
    import threading

    budget = CompressionBudget(workers=1)
    order: list[str] = []
    stop = threading.Event()
    outcome: list[bool] = []

    async def stalled() -> None:
        async with budget.slot(3, owner=1) as slot:
            slot.park()
            await _turns(lambda: budget.parked == 1)
            blocker.set()
            await asyncio.to_thread(lambda: outcome.append(slot.resume(stop)))

    blocker = asyncio.Event()
    task = asyncio.create_task(stalled())
    await blocker.wait()
    other = Holder(budget, order, "other", owner=2)
    await other.granted.wait()
    await _turns(lambda: budget.waiting == 1)
    stop.set()  # the pack stops while its layer waits to resume
    await task
    assert outcome == [False]
    assert (budget.active, budget.parked, budget.waiting) == (1, 0, 0)
    other.release.set()
    await other.task
    assert (budget.active, budget.used) == (0, 0)


async def test_budget_slot_cancelled_while_waiting_is_not_lost() -> None:
    budget = CompressionBudget(workers=1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with budget.slot(3):
            await gate.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await _turns(lambda: budget.waiting == 1)
    waiter.cancel()
    gate.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.active == 0 and budget.waiting == 0 and budget.used == 0
    async with budget.slot(3) as slot:  # the slot is free again
        assert slot.threads == 1


@pytest.mark.parametrize("owners", [1, 100])
@pytest.mark.parametrize("cancelled", [False, True], ids=["all-granted", "half-cancelled"])
async def test_grants_do_not_scan_the_waiters(owners: int, cancelled: bool) -> None:
    """Issue 13/14: a grant looked at every waiter (a stat each): quadratic with 20k waiting
    layers. Now each grant looks at a bounded number of queue entries."""
    n = 20_000
    budget = CompressionBudget(workers=1)
    gate = asyncio.Event()
    granted = 0

    async def one(owner: int) -> None:
        nonlocal granted
        async with budget.slot(3, owner):
            granted += 1

    async def first() -> None:
        async with budget.slot(3, -1):
            await gate.wait()

    holder = asyncio.create_task(first())
    await _turns(lambda: budget.active == 1)
    tasks = [asyncio.create_task(one(i % owners)) for i in range(n)]
    await _turns(lambda: budget.waiting == n, limit=10)
    steps_before = budget.grant_steps
    if cancelled:
        for t in tasks[::2]:
            t.cancel()
    gate.set()
    await asyncio.gather(holder, *tasks, return_exceptions=True)
    assert granted == (n // 2 if cancelled else n)
    assert (budget.active, budget.waiting, budget.used) == (0, 0, 0)
    # each ticket is looked at O(1) times: far from n * n / 2 (a scan per grant)
    assert budget.grant_steps - steps_before <= 4 * n
