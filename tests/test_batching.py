"""Coalescing of the calls of one event-loop iteration, and how items spread over servers."""

from __future__ import annotations

import asyncio

import pytest

from mopd.batching import Coalescer, ItemBudget, assign_shares


class Recorder:
    def __init__(self, delay_s: float = 0.0, fail: Exception | None = None):
        self.batches: list[tuple[list[int], list[int]]] = []
        self.delay_s, self.fail = delay_s, fail

    async def __call__(self, items: list[int], callers: list[int]) -> list[int]:
        self.batches.append((list(items), list(callers)))
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [10 * x for x in items]


def test_calls_of_one_iteration_run_as_one_batch_and_get_their_own_outputs():
    rec = Recorder()

    async def go():
        c = Coalescer(rec)
        together = await asyncio.gather(c([1, 2]), c([3]), c([4, 5, 6]))
        alone = await c([7])
        return together, alone, c.batches

    together, alone, batches = asyncio.run(go())
    assert together == [[10, 20], [30], [40, 50, 60]]
    assert alone == [70]
    assert batches == 2
    assert rec.batches[0] == ([1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 2, 2])


def test_max_items_splits_a_wave_and_a_single_large_call():
    rec = Recorder()

    async def go():
        c = Coalescer(rec, max_items=2)
        return await asyncio.gather(c([1, 2, 3]), c([4]))

    assert asyncio.run(go()) == [[10, 20, 30], [40]]
    assert [items for items, _ in rec.batches] == [[1, 2], [3, 4]]
    assert rec.batches[1][1] == [0, 1]  # callers are numbered per batch


def test_a_failed_batch_raises_in_every_caller_and_the_next_batch_is_fresh():
    rec = Recorder(fail=ValueError("server said no"))

    async def go():
        c = Coalescer(rec)
        results = await asyncio.gather(c([1]), c([2]), return_exceptions=True)
        rec.fail = None
        return results, await c([3])

    results, after = asyncio.run(go())
    assert [type(r) for r in results] == [ValueError, ValueError]
    assert str(results[0]) == "server said no"
    assert after == [30]


def test_a_cancelled_caller_runs_on_cancel_and_the_others_still_get_results():
    rec = Recorder(delay_s=0.2)
    cancelled: list[list[int]] = []

    async def go():
        c = Coalescer(rec, on_cancel=cancelled.append)
        a = asyncio.create_task(c([1, 2]))
        b = asyncio.create_task(c([3]))
        await asyncio.sleep(0.05)  # the batch is running
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        return await b

    assert asyncio.run(go()) == [30]
    assert cancelled == [[1, 2]]
    assert len(rec.batches) == 1


def test_a_wrong_number_of_outputs_is_an_error_for_every_caller():
    async def short(items, callers):
        return items[:-1]

    async def go():
        c = Coalescer(short)
        return await asyncio.gather(c([1]), c([2]), return_exceptions=True)

    results = asyncio.run(go())
    assert all(isinstance(r, RuntimeError) and "1 outputs for 2 items" in str(r) for r in results)


def test_empty_calls_return_at_once_and_bad_limits_are_refused():
    async def go():
        return await Coalescer(Recorder())([])

    assert asyncio.run(go()) == []
    with pytest.raises(ValueError, match="max_items"):
        Coalescer(Recorder(), max_items=0)
    with pytest.raises(ValueError, match="limit"):
        ItemBudget(0)


def test_assign_shares_keeps_units_together_and_balances_largest_first():
    # One long item and ten short ones over three idle servers: the long one alone.
    costs = [1000] + [10] * 10
    shares = assign_shares(costs, [0, 0, 0])
    assert shares == [[0], [1, 3, 5, 7, 9], [2, 4, 6, 8, 10]]
    # Units (e.g. the samples of one group) never split; outstanding load counts.
    shares = assign_shares([5, 5, 5, 5], [0, 100], units=["a", "a", "b", "b"])
    assert shares == [[0, 1, 2, 3], []]
    shares = assign_shares([5, 5, 5, 5], [0, 0], units=["a", "a", "b", "b"])
    assert shares == [[0, 1], [2, 3]]


def test_item_budget_bounds_items_in_flight():
    budget = ItemBudget(3)
    peak = 0

    async def use(n: int) -> None:
        nonlocal peak
        async with budget(n):
            peak = max(peak, budget.in_flight)
            await asyncio.sleep(0.01)

    async def go():
        await asyncio.gather(use(2), use(2), use(5), use(1))

    asyncio.run(go())
    assert peak == 3 and budget.in_flight == 0
