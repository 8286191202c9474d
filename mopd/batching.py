"""Calls made together go together: one batched call for what many tasks ask at once.

The producer runs one task per prompt group, and in a synchronous step they move in waves:
every group's generation comes back in the same event-loop iteration, every group then asks
for its rewards, then for its teacher's scores, then publishes. Sent one group at a time
these are hundreds of round trips per step (HTTP requests, worker-process calls, Redis
pipelines), each with its own fixed cost, and a server that receives its work spread over
time runs many small forward passes instead of one. ``Coalescer`` turns each wave into one
batched call without changing the per-group code: ``await coalescer(items)`` queues the
items, the first call of an iteration schedules a flush for the next one, and the flush runs
``run_batch`` once over everything queued meanwhile and hands each caller its own slice of
the outputs, in order. A call that arrives alone is a batch of one, one iteration later.

Failures and cancellation keep their per-caller meaning: an exception of the batched call is
raised in every caller of that batch (each handles it as if its own call had failed), and a
caller that is cancelled while its batch runs gets its ``on_cancel(items)`` run (e.g. abort
its requests on the server); the batch goes on for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer", "ItemBudget", "assign_shares"]

log = logging.getLogger(__name__)


def assign_shares(
    costs: Sequence[float], loads: Sequence[float], units: Sequence[object] | None = None
) -> list[list[int]]:
    """Spread items over servers: the item indices each server gets, in item order.

    Items with the same unit key next to each other (e.g. the samples of one prompt group,
    which share their prompt's prefill, or one caller's items) stay on one server. Units go largest first, each to
    the server with the least load so far: its outstanding ``loads`` plus what it was given
    here (ties to the lower index), as least-outstanding-work routing would send them one by
    one.
    """
    groups: list[list[int]] = []
    for i in range(len(costs)):
        if groups and units is not None and units[i] == units[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    load = [float(x) for x in loads]
    shares: list[list[int]] = [[] for _ in load]
    for group in sorted(groups, key=lambda g: -sum(costs[i] for i in g)):
        target = min(range(len(load)), key=lambda s: load[s])
        shares[target].extend(group)
        load[target] += sum(costs[i] for i in group)
    return [sorted(share) for share in shares]


In = TypeVar("In")
Out = TypeVar("Out")


class Coalescer(Generic[In, Out]):
    """Coalesce the calls of one event-loop iteration into one ``run_batch`` call.

    Args:
        run_batch: ``run_batch(items, callers)``: outputs for the items, one per item and in
            order; ``callers[i]`` numbers the call item ``i`` came with (0, 1, ... per batch),
            e.g. to keep one caller's items together.
        on_cancel: called with a cancelled caller's items (best effort; errors are logged).
        max_items: items per batch at most (a larger wave, or call, runs as several batches;
            a caller's future is set when all of its items are done).
    """

    def __init__(
        self,
        run_batch: Callable[[list[In], list[int]], Awaitable[Sequence[Out]]],
        *,
        on_cancel: Callable[[list[In]], None] | None = None,
        max_items: int | None = None,
    ) -> None:
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self._run_batch = run_batch
        self._on_cancel = on_cancel
        self._max_items = max_items
        self._queued: list[tuple[list[In], asyncio.Future]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0
        """Batched calls made so far (for tests and metrics)."""

    async def __call__(self, items: Sequence[In]) -> list[Out]:
        items = list(items)
        if not items:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queued.append((items, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()  # the flush skips it if it has not run yet
                self._cancelled(items)
            raise

    def _cancelled(self, items: list[In]) -> None:
        if self._on_cancel is None:
            return
        try:
            self._on_cancel(items)
        except Exception as exc:
            log.warning("cancelling %d coalesced item(s) failed: %s", len(items), exc)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queued = [_Call(items, f) for items, f in self._queued if not f.done()]
        self._queued.clear()
        entries = [(call, j) for call in queued for j in range(len(call.items))]
        size = self._max_items or max(len(entries), 1)
        for start in range(0, len(entries), size):
            task = asyncio.get_running_loop().create_task(self._run(entries[start : start + size]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, entries: list[tuple[_Call, int]]) -> None:
        self.batches += 1
        flat = [call.items[j] for call, j in entries]
        numbers: dict[int, int] = {}
        callers = [numbers.setdefault(id(call), len(numbers)) for call, _ in entries]
        try:
            outputs = list(await self._run_batch(flat, callers))
            if len(outputs) != len(flat):
                raise RuntimeError(
                    f"a batched call returned {len(outputs)} outputs for {len(flat)} items"
                )
        except BaseException as exc:
            for call, _ in entries:
                call.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (call, j), out in zip(entries, outputs, strict=True):
            call.put(j, out)


class _Call:
    """One caller's items and its future, filled as its batches finish."""

    def __init__(self, items: list, future: asyncio.Future) -> None:
        self.items, self.future = items, future
        self.outputs: list = [None] * len(items)
        self.missing = len(items)

    def put(self, j: int, out: object) -> None:
        self.outputs[j] = out
        self.missing -= 1
        if self.missing == 0 and not self.future.done():
            self.future.set_result(self.outputs)

    def fail(self, exc: BaseException) -> None:
        if self.future.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.future.cancel()
        else:
            self.future.set_exception(exc)


class ItemBudget:
    """At most ``limit`` items in flight over all batches: ``async with budget(n):`` waits
    until ``n`` more fit (a batch larger than the limit waits for an empty budget)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self._changed: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def __call__(self, n: int) -> AsyncIterator[None]:
        if self._changed is None:
            self._changed = asyncio.Condition()
        n = min(n, self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight + n <= self.limit)
            self.in_flight += n
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= n
                self._changed.notify_all()
