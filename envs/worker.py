"""RewardWorker: scores batches of responses in a process pool, one timeout per call.

Verifiers run untrusted model output through parsers and solvers (SymPy, task scorers) that
can hang or crash. Each call runs in a pebble ``ProcessPool`` worker with its own timeout:
pebble kills a worker whose call overruns and starts a fresh one, and reports a worker that
died. Either way the sample gets reward 0 and a counter goes up (``reward_timeout``,
``reward_error``); the batch and the run go on. A verifier that raises, or returns something
that is not a finite number, counts as ``reward_error`` too. The first few failures are
logged with the source and the reason.

A batch goes to the workers as one task per process (a contiguous chunk of calls, each timed
in the worker), not one task per sample: a step's rewards cost a few IPC round trips. A chunk
that overruns one call's limit or loses its worker is scored again one call per task, which
isolates the culprit as above.

The pool starts on first use with the ``spawn`` method (no fork of a process that holds
threads, e.g. a Ray worker or torch), and each worker imports the heavy verifier dependencies
before it takes work, so imports never eat into a call's time budget.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pebble

from envs.base import RewardFn
from envs.registry import REWARDS, get_reward
from envs.rewards import warm_up
from mopd.types import RolloutSample

__all__ = ["RewardWorker"]

log = logging.getLogger(__name__)

_LOGGED_FAILURES = 20
_CHUNK_SLACK_S = 1.0  # a chunk's time limit: one call's limit plus this  # then only counted, so a broken verifier cannot flood the log


def _init_worker() -> None:
    try:
        warm_up()
    except Exception as e:  # an optional dependency missing fails its calls later, loudly
        log.warning("reward worker warm-up failed: %s", e)


def _call(fn: RewardFn, response: str, answer: str | None, metadata: Mapping[str, Any]) -> Any:
    return fn(response, answer, metadata)


def _call_many(
    calls: Sequence[tuple[RewardFn, str, str | None, Mapping[str, Any]]],
) -> list[tuple[bool, Any, float]]:
    """Several calls in one worker task: (ok, value or error text, seconds) per call."""
    out: list[tuple[bool, Any, float]] = []
    for fn, response, answer, metadata in calls:
        t0 = time.monotonic()
        try:
            value = fn(response, answer, metadata)
        except Exception as e:
            out.append((False, f"{type(e).__name__}: {e}", time.monotonic() - t0))
            continue
        out.append((True, value, time.monotonic() - t0))
    return out


class RewardWorker:
    """Scores rollout samples with their source's reward function, in worker processes.

    Args:
        source_rewards: source name -> reward name (``{s.name: s.reward for s in sources}``).
        rewards: reward name -> function (default: ``envs.registry.REWARDS``); the functions
            must be picklable.
        timeout_s: time limit of one call, counted from when a worker starts it.
        num_processes: worker processes.
    """

    def __init__(
        self,
        source_rewards: Mapping[str, str],
        *,
        rewards: Mapping[str, RewardFn] | None = None,
        timeout_s: float = 10.0,
        num_processes: int = 2,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        if num_processes < 1:
            raise ValueError(f"num_processes={num_processes} must be >= 1")
        table = REWARDS if rewards is None else rewards
        self._fns = {src: get_reward(name, table) for src, name in source_rewards.items()}
        self._timeout_s = timeout_s
        self._num_processes = num_processes
        self._pool: pebble.ProcessPool | None = None
        self._counts: Counter[str] = Counter()

    def _get_pool(self) -> pebble.ProcessPool:
        if self._pool is None or not self._pool.active:
            self._pool = pebble.ProcessPool(
                max_workers=self._num_processes,
                initializer=_init_worker,
                context=multiprocessing.get_context("spawn"),
            )
        return self._pool

    def score(self, samples: Sequence[RolloutSample]) -> list[float]:
        """Rewards of the samples, in order (0.0 for a call that timed out or failed)."""
        return self.score_texts(
            [(s.prompt.source, s.text, s.prompt.answer, s.prompt.metadata) for s in samples]
        )

    def score_texts(
        self, items: Sequence[tuple[str, str, str | None, Mapping[str, Any]]]
    ) -> list[float]:
        """Rewards of (source, response, answer, metadata) tuples, in order."""
        unknown = sorted({src for src, *_ in items if src not in self._fns})
        if unknown:
            raise ValueError(
                f"no reward configured for source(s) {unknown}; configured: "
                f"{', '.join(sorted(self._fns))}"
            )
        for attempt in range(2):
            pool = self._get_pool()
            try:
                return self._score_chunks(pool, items)
            except BrokenProcessPool as e:
                # Workers that cannot even start are a broken environment, not a bad verifier:
                # rebuild the pool once, then fail loudly rather than hand out zero rewards.
                self.close()
                if attempt:
                    raise RuntimeError(f"reward worker processes cannot start: {e}") from e
        raise AssertionError("unreachable")

    def _score_chunks(
        self, pool: pebble.ProcessPool, items: Sequence[tuple[str, str, str | None, Mapping]]
    ) -> list[float]:
        """One worker task per process, each scoring a contiguous chunk (a few IPC round trips
        per batch instead of one per sample). A call slower than the timeout inside a chunk
        counts as a timeout; a chunk that runs past one call's limit (a hang, or many slow
        calls) or kills its worker is scored again one call per task, so only a culprit gets
        reward 0 and a hang costs at most two time limits."""
        n = len(items)
        per = max(1, -(-n // self._num_processes))
        chunks = [list(range(i, min(i + per, n))) for i in range(0, n, per)]
        futures = [
            pool.schedule(
                _call_many,
                args=([(self._fns[items[i][0]], *items[i][1:3], dict(items[i][3])) for i in c],),
                timeout=self._timeout_s + _CHUNK_SLACK_S,
            )
            for c in chunks
        ]
        out: list[float] = [0.0] * n
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                results = future.result()
            except BrokenProcessPool:
                raise
            except Exception:  # hung or died: isolate the bad call(s) one call per task
                singles = [self._schedule_one(pool, items[i]) for i in chunk]
                for i, f in zip(chunk, singles, strict=True):
                    out[i] = self._gather(f, items[i][0])
                continue
            for i, (ok, value, seconds) in zip(chunk, results, strict=True):
                out[i] = self._judge(items[i][0], ok, value, seconds)
        return out

    def _schedule_one(self, pool: pebble.ProcessPool, item: tuple) -> Any:
        src, resp, ans, meta = item
        return pool.schedule(
            _call, args=(self._fns[src], resp, ans, dict(meta)), timeout=self._timeout_s
        )

    def _judge(self, source: str, ok: bool, value: Any, seconds: float) -> float:
        self._counts["reward_calls"] += 1
        if seconds > self._timeout_s:
            return self._fail("reward_timeout", source, f"no result within {self._timeout_s} s")
        if not ok:
            return self._fail("reward_error", source, str(value))
        return self._as_reward(value, source)

    def _gather(self, future: Any, source: str) -> float:
        self._counts["reward_calls"] += 1
        try:
            value = future.result()
        except FutureTimeout:
            return self._fail("reward_timeout", source, f"no result within {self._timeout_s} s")
        except BrokenProcessPool:
            raise
        except pebble.ProcessExpired as e:
            return self._fail("reward_error", source, f"worker died (exit code {e.exitcode})")
        except Exception as e:
            return self._fail("reward_error", source, f"{type(e).__name__}: {e}")
        return self._as_reward(value, source)

    def _as_reward(self, value: Any, source: str) -> float:
        try:
            reward = float(value)
        except (TypeError, ValueError):
            return self._fail("reward_error", source, f"returned {value!r:.80}, not a number")
        if not math.isfinite(reward):
            return self._fail("reward_error", source, f"returned {reward}")
        return reward

    def _fail(self, kind: str, source: str, why: str) -> float:
        self._counts[kind] += 1
        self._counts[f"{kind}/{source}"] += 1
        if self._counts["reward_timeout"] + self._counts["reward_error"] <= _LOGGED_FAILURES:
            log.warning("%s for source %r: %s; reward 0", kind, source, why)
        return 0.0

    def metrics(self) -> dict[str, float]:
        """``reward_calls``, ``reward_timeout``, ``reward_error`` and their per-source splits
        (``reward_timeout/<source>``), counted since the worker was built."""
        out = {k: 0.0 for k in ("reward_calls", "reward_timeout", "reward_error")}
        out.update({k: float(v) for k, v in self._counts.items()})
        return out

    def close(self) -> None:
        """Stop the worker processes (a later call starts a new pool)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
